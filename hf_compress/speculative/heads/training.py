"""Training drafting heads on a frozen base model with ``transformers.Trainer``.

Data is either the offline corpus (token windows, labels = the text) or the base model's own greedy
continuations of prompts (:func:`self_distillation_dataset`), which is what the heads will have to guess
at decoding time. The base features can be computed once and cached (:func:`cache_base_features`), which
is cheaper whenever the data is seen more than once or the base is large compared with the heads; the
``Trainer`` then only runs the heads and the frozen vocabulary projection.

Example:
    >>> from hf_compress.assets import tiny_model
    >>> from hf_compress.training import causal_lm_dataset, TrainingSettings
    >>> from hf_compress.speculative.heads import AmphistaConfig, AmphistaHeads
    >>> model, tok = tiny_model("llama")
    >>> heads = AmphistaHeads.for_model(model, AmphistaConfig(num_heads=2))
    >>> data = causal_lm_dataset(["some text " * 40], tok, num_sequences=4, seq_len=16)
    >>> result = train_heads(model, heads, data, TrainingSettings(max_steps=2, use_cpu=True))  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from datasets import Dataset
from torch import nn
from transformers import PreTrainedModel, TrainerCallback

from ...training import (
    OWN_LOSS_REFUSED,
    FrozenModelTrainingModule,
    TrainingSettings,
    largest_over_processes,
    refuse_arguments,
    train_with_trainer,
)
from ...utils import get_logger, progress_bar
from ...modeling.identity import record_base_model
from .modeling import BaseParts, DraftHeads


__all__ = [
    "FeatureDataset",
    "HeadsTrainingModule",
    "TimeBudget",
    "cache_base_features",
    "head_accuracy",
    "heads_loss",
    "self_distillation_dataset",
    "train_heads",
]

logger = get_logger(__name__)
IGNORE_INDEX = -100
MIN_WINDOW = 3  # position t drafts from the token after it, so the first head learns t + 2: three tokens at least


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Run ``model`` in eval mode (no dropout: its features as at decode time), then give back every module's flag."""
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, flag in flags:
            module.training = flag


def _head_predictions(heads: DraftHeads, hidden_states, input_ids, labels, base: BaseParts):
    """``(k, logits, targets)`` per head: at position ``t`` head ``k`` predicts ``labels[t + 2 + k]``.

    Position ``t`` drafts knowing the token that follows it (``input_ids[t + 1]``, the root at decode
    time), so the last position has nothing to draft from; heads reaching past the window are skipped.
    """
    features, _ = heads.features(hidden_states[:, :-1].to(heads.dtype), input_ids[:, 1:], base)
    for k in range(heads.num_heads):
        target = labels[:, 2 + k :]
        if target.shape[1] == 0:
            return
        yield k, heads.project(features[:, : target.shape[1], k], base, head=k), target


def heads_loss(
    heads: DraftHeads, hidden_states: torch.Tensor, input_ids: torch.LongTensor, labels: torch.LongTensor, base: BaseParts
) -> tuple[torch.Tensor, list[float]]:
    """``Σ_k decay^k · CE(head k)`` over the positions :func:`_head_predictions` aligns; also each head's CE."""
    total = hidden_states.new_zeros((), dtype=torch.float32)
    per_head = []
    for k, logits, target in _head_predictions(heads, hidden_states, input_ids, labels, base):
        if not (target != IGNORE_INDEX).any():  # nothing to learn here, nor for the farther heads
            break
        loss = F.cross_entropy(logits.flatten(0, 1).float(), target.flatten(), ignore_index=IGNORE_INDEX)
        total = total + heads.config.loss_decay**k * loss
        per_head.append(float(loss.detach()))
    return total, per_head


class HeadsTrainingModule(FrozenModelTrainingModule, nn.Module):
    """What ``Trainer`` trains: the heads, plus the frozen base (or only its output/input embeddings); its
    checkpoints hold the heads only.

    With ``features_cached`` the batches carry ``hidden_states`` and the base body is not held at all.
    """

    def __init__(self, heads: DraftHeads, model: PreTrainedModel, features_cached: bool):
        super().__init__()
        self.heads = heads
        self.lm_head = model.get_output_embeddings()
        self.embeddings = model.get_input_embeddings()
        self.body = None if features_cached else _feature_body(model)
        for module in (self.lm_head, self.embeddings, self.body):
            if module is not None:
                module.requires_grad_(False)

    def trained_part(self) -> nn.Module:
        return self.heads

    def train(self, mode: bool = True) -> HeadsTrainingModule:
        super().train(mode)
        for module in (self.lm_head, self.embeddings, self.body):  # frozen: features as at decode time (no dropout)
            if module is not None:
                module.eval()
        return self

    def forward(self, input_ids, labels=None, hidden_states=None, attention_mask=None):
        if hidden_states is None:
            if self.body is None:
                raise ValueError("The batches carry no cached `hidden_states`; train with cache_features=False instead.")
            with torch.no_grad():
                hidden_states = self.body(input_ids=input_ids, attention_mask=attention_mask,
                                          use_cache=False).last_hidden_state
        labels = input_ids if labels is None else labels
        loss, _ = heads_loss(self.heads, hidden_states, input_ids, labels, BaseParts(self.lm_head, self.embeddings))
        return {"loss": loss}


class FeatureDataset(torch.utils.data.Dataset):
    """Token windows with the base model's final hidden states, held as tensors (no Arrow round trip)."""

    def __init__(self, input_ids: torch.Tensor, labels: torch.Tensor, hidden_states: torch.Tensor):
        self.input_ids, self.labels, self.hidden_states = input_ids, labels, hidden_states

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[i], "labels": self.labels[i], "hidden_states": self.hidden_states[i]}


@torch.no_grad()
def cache_base_features(model: PreTrainedModel, dataset: Dataset, batch_size: int = 8, *, progress: bool = True
                        ) -> FeatureDataset:
    """Run the base model once over ``dataset`` (``input_ids``, optional ``labels``) and keep its features
    (``progress``: its progress bar)."""
    # Kept on the CPU with the cached features (the Trainer moves each batch to the device).
    input_ids = torch.tensor(dataset["input_ids"], device="cpu")
    labels = torch.tensor(dataset["labels"], device="cpu") if "labels" in dataset.column_names else input_ids.clone()
    body = _feature_body(model)
    device = model.get_input_embeddings().weight.device
    features = None  # filled in place: a list of chunks and their concatenation would hold the features twice
    with _eval_mode(model):
        for start in progress_bar(range(0, len(input_ids), batch_size), desc="caching base features", unit="batch",
                          disable=not progress):
            batch = input_ids[start : start + batch_size].to(device)
            hidden = body(input_ids=batch, use_cache=False).last_hidden_state
            if features is None:
                features = torch.empty(*input_ids.shape, hidden.shape[-1], dtype=hidden.dtype, device="cpu")
            features[start : start + len(batch)] = hidden.cpu()
    return FeatureDataset(input_ids, labels, features)


@torch.no_grad()
def self_distillation_dataset(
    model: PreTrainedModel, prompt_ids: torch.LongTensor, max_new_tokens: int, batch_size: int = 8
) -> Dataset:
    """The base model's greedy continuations of equal-length prompts: what the heads must learn to guess.

    Returns ``input_ids`` (prompt + continuation) and ``labels`` (the prompt masked out). Generation runs
    exactly ``max_new_tokens`` per prompt so the rows stay rectangular.
    """
    if prompt_ids.ndim != 2 or max_new_tokens < 1:
        raise ValueError("Pass prompt_ids as a (num_prompts, prompt_length) tensor and max_new_tokens >= 1.")
    device = model.get_input_embeddings().weight.device
    pad = model.generation_config.pad_token_id
    if pad is None:
        pad = model.generation_config.eos_token_id
    pad = pad[0] if isinstance(pad, list) else pad
    rows = []
    for start in progress_bar(range(0, len(prompt_ids), batch_size), desc="self-distillation", unit="batch"):
        prompts = prompt_ids[start : start + batch_size].to(device)
        rows.append(model.generate(
            prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
        ).cpu())
    sequences = torch.cat(rows)
    labels = sequences.clone()
    labels[:, : prompt_ids.shape[1]] = IGNORE_INDEX
    return Dataset.from_dict({"input_ids": sequences.tolist(), "labels": labels.tolist()})


class TimeBudget(TrainerCallback):
    """Stop training cleanly once ``seconds`` of wall-clock have passed (checked after every step)."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.started = None
        self.stopped_early = False

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        # Each rank reads its own clock: all stop once any crosses the budget, or DDP waits forever on the rest.
        if largest_over_processes(time.perf_counter() - self.started, args.device) >= self.seconds:
            self.stopped_early = state.global_step < state.max_steps
            control.should_training_stop = True


def train_heads(
    model: PreTrainedModel,
    heads: DraftHeads,
    dataset: Dataset | FeatureDataset,
    args: TrainingSettings | Any | None = None,
    *,
    cache_features: bool = True,
    max_train_seconds: float | None = None,
    data_description: str | None = None,
    eval_dataset: Dataset | FeatureDataset | None = None,
) -> dict[str, Any]:
    """Train ``heads`` on ``dataset`` with ``Trainer``; the base model stays frozen and unchanged.

    Args:
        model: The base causal LM the heads draft for.
        dataset: ``input_ids`` (+ optional ``labels`` with -100 for positions not to learn), e.g. from
            :func:`~hf_compress.training.causal_lm_dataset` or :func:`self_distillation_dataset`; or a
            :class:`FeatureDataset` already cached.
        args: ``TrainingArguments`` (used as given, so multi-GPU launchers work unchanged) or
            :class:`~hf_compress.training.TrainingSettings`; default: 1e-3, cosine, 100 steps (Medusa's lr).
            Its progress setting (``TrainingSettings.progress``, ``TrainingArguments.disable_tqdm``) also
            governs the feature-caching bar.
        cache_features: Compute the base features once before training (see :func:`cache_base_features`).
        max_train_seconds: Wall-clock budget; training stops after the step that crosses it. The learning
            rate schedule still follows ``max_steps``, so choose ``max_steps`` to roughly fit the budget.
        data_description: Recorded with the training summary in ``heads.config.training`` (model card).
        eval_dataset: Windows like ``dataset``'s, for an ``eval_strategy`` in ``args`` (``TrainingArguments``):
            ``eval_loss`` is the heads' training loss on them (cached like ``dataset`` when ``cache_features``).

    Returns:
        The Trainer's metrics plus ``train_seconds``, ``global_step``, ``stopped_by_budget``, ``log_history``.
    """
    heads.check_compatible(model)
    refuse_arguments(args, OWN_LOSS_REFUSED, what="Heads training")
    if isinstance(args, TrainingSettings) and any((args.extra_arguments or {}).get(name) not in (None, "no", False)
                                                  for name in ("save_strategy", "resume_from_checkpoint")):
        raise ValueError("TrainingSettings train the heads in a scratch folder removed afterwards, so its checkpoints "
                         "could be neither kept nor resumed from: pass TrainingArguments(output_dir=..., "
                         "save_strategy='steps', ...) to checkpoint and resume.")
    shortest = _shortest_window(dataset)
    needed = MIN_WINDOW + heads.num_heads - 1  # the last head's target is num_heads + 1 tokens past position 0
    if shortest is not None and shortest < needed:
        raise ValueError(
            f"Heads learn the token 2 + k positions after each one, so every training window needs at least "
            f"{needed} tokens for {heads.num_heads} heads (shorter ones leave the far heads untrained); this dataset "
            f"has windows of {shortest}. Make longer windows (e.g. causal_lm_dataset(..., seq_len=64)) or use fewer heads."
        )
    record_base_model(heads.config, model)  # heads saved before identities were recorded get one
    if args is None:
        args = TrainingSettings(max_steps=100, learning_rate=1e-3, lr_scheduler_type="cosine")
    progress = _shows_progress(args)
    features_cached = isinstance(dataset, FeatureDataset)
    if cache_features and not features_cached:
        dataset = cache_base_features(model, dataset, progress=progress)
        features_cached = True
    if eval_dataset is not None and features_cached and not isinstance(eval_dataset, FeatureDataset):
        # the training module holds no base body then
        eval_dataset = cache_base_features(model, eval_dataset, progress=progress)
    trained = [p for p in model.parameters() if p.requires_grad]
    module = HeadsTrainingModule(heads, model, features_cached)
    earlier = {name: value.detach().clone() for name, value in heads.state_dict().items()}
    heads.train()
    callbacks = [TimeBudget(max_train_seconds)] if max_train_seconds else []
    try:
        with tempfile.TemporaryDirectory() as output_dir, _eval_mode(model):  # the base comes back in its own mode
            result = train_with_trainer(module, dataset, getattr(args, "output_dir", None) or output_dir, args,
                                        callbacks=callbacks, eval_dataset=eval_dataset)
    except BaseException:
        # A failed or interrupted run hands the heads back as they came: half-trained weights under the earlier
        # run's training record would save with a card that does not describe them.
        heads.load_state_dict(earlier)
        raise
    finally:
        for p in trained:  # the base model is handed back as it came
            p.requires_grad_(True)
        heads.eval()
    result["stopped_by_budget"] = bool(callbacks and callbacks[0].stopped_early)
    heads.config.training = {
        "data": data_description,
        "sequences": len(dataset),
        "steps": result["global_step"],
        "train_seconds": round(result["train_seconds"], 1),
        "final_loss": round(float(result["training_loss"]), 4),
        "features_cached": features_cached,
        "stopped_by_budget": result["stopped_by_budget"],
    }
    return result


def _shows_progress(args: Any) -> bool:
    """Whether the training run ``args`` describes draws progress bars: ``TrainingSettings.progress`` (the CLI's
    ``-q``, a recipe's ``progress``), or not ``TrainingArguments.disable_tqdm``."""
    if isinstance(args, TrainingSettings):
        return args.progress
    return not getattr(args, "disable_tqdm", False)


def _feature_body(model: PreTrainedModel) -> nn.Module:
    """The module whose ``last_hidden_state`` feeds the ``lm_head``: what the engine hooks at decode time.

    ``get_decoder()``, not ``base_model``: a PEFT model's ``base_model`` is the tuner, which returns logits.
    """
    return model.get_decoder()


def _shortest_window(dataset: Dataset | FeatureDataset) -> int | None:
    """Tokens in the shortest training window; ``None`` when there is none to measure (the Trainer refuses an empty one)."""
    if isinstance(dataset, FeatureDataset):
        return dataset.input_ids.shape[1] if len(dataset) else None
    if isinstance(dataset, Dataset) and "input_ids" in dataset.column_names:
        return min((len(ids) for ids in dataset["input_ids"]), default=None)
    return None  # another kind of dataset: its windows are not known here


@torch.no_grad()
def head_accuracy(
    model: PreTrainedModel, heads: DraftHeads, dataset: Dataset | FeatureDataset, top_k: int = 10, batch_size: int = 8
) -> torch.Tensor:
    """``(num_heads, top_k)`` table: how often each head's rank-``r`` candidate is the right token.

    Feed it to :meth:`~..tree.DraftTree.from_accuracies` to build a tree for these heads.
    """
    if not isinstance(dataset, FeatureDataset):
        dataset = cache_base_features(model, dataset, batch_size)
    base = BaseParts.of(model)
    # Tallied on the CPU: the table is small and feeds DraftTree.from_accuracies there.
    hits = torch.zeros(heads.num_heads, top_k, dtype=torch.float64, device="cpu")
    counts = torch.zeros(heads.num_heads, dtype=torch.float64, device="cpu")
    device = model.get_input_embeddings().weight.device
    for start in range(0, len(dataset), batch_size):
        hidden = dataset.hidden_states[start : start + batch_size].to(device)
        input_ids = dataset.input_ids[start : start + batch_size].to(device)
        labels = dataset.labels[start : start + batch_size].to(device)
        for k, logits, target in _head_predictions(heads, hidden, input_ids, labels, base):
            candidates = logits.topk(top_k, dim=-1).indices
            valid = target != IGNORE_INDEX
            hits[k] += (candidates == target.unsqueeze(-1))[valid].sum(dim=0).double().cpu()
            counts[k] += valid.sum().cpu()
    return hits / counts.clamp_min(1).unsqueeze(1)

