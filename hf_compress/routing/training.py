"""``train_token_router``: learn the shared router with ``Trainer`` while the model stays frozen.

Losses (structure and equal weights confirmed for the paper; the forms are ours, as the paper does not define them):

- **guide**: binary cross-entropy between the router's compute probability and the static router's keep/skip
  labels at every routed block, its weight decayed linearly from ``guide_weight`` to 0 over training;
- **sparsity** (Eq. 5, one-sided): ``Σ_ℓ max(r_ℓ − ŝ_ℓ, 0)`` with ``ŝ_ℓ`` the mean skip probability
  ``1 − σ(logit)`` of block ℓ's tokens (top-k already enforces the exact count; this keeps the probabilities
  calibrated for the decode-time 0.5 threshold);
- **distillation** at the final output only: KL(dense model's next-token distribution ‖ routed model's) on the last
  ``loss_tail`` of each row's real tokens (the continuation a routed prompt serves; see ``TokenRouterConfig``).

The router starts as the static rule (``TokenRouter``'s initialisation), so training refines the static router.

Gradients reach the router through a straight-through gate on every token's block update (``layer.py``'s
``_training_forward``): the training forward computes every token, each attending to the kept tokens and itself, and
adds ``g · Δ`` with ``g = keep + σ(s) − stop_grad(σ(s))``, so the forward value is the routed model's while skipped
tokens learn whether computing them would have lowered the loss. (Mixture-of-Depths gates the kept tokens only;
from those alone the router cannot learn that a skipped token was worth computing.)
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import tempfile
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from ..modeling.layers import (
    TRAINS_ON_ONE_DEVICE,
    check_not_offloaded,
    check_within_learned_positions,
    evaluation_mode,
    find_decoder_blocks,
    learned_position_limit,
    module_execution_device,
)
from ..training import (
    OWN_LOSS_REFUSED,
    FrozenModelTrainingModule,
    TrainingSettings,
    broadcast_from_main,
    refuse_arguments,
    refuse_gradient_checkpointing,
    train_with_trainer,
)
from ..utils import InvalidArgumentTypeError, get_logger
from .config import TokenRouterConfig
from .layer import install_routing, remove_routing, routing_disabled, routing_state
from .router import TokenRouter
from .schedule import RoutingSchedule, check_schedule


if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedModel, TrainingArguments


__all__ = ["KeepBestRouter", "RouterTrainingModule", "router_losses", "train_token_router"]

logger = get_logger(__name__)


def router_losses(collected: list, config: TokenRouterConfig, guide_scale: float) -> dict[str, torch.Tensor]:
    """The guide and sparsity losses from what the routed blocks collected in one forward."""
    guide, sparsity = [], []
    for logits, valid, labels, target in collected:
        weight = valid.float()
        bce = nn.functional.binary_cross_entropy_with_logits(logits.float(), labels.float(), reduction="none")
        guide.append((bce * weight).sum() / weight.sum().clamp(min=1))
        skip_probability = ((1 - torch.sigmoid(logits.float())) * weight).sum() / weight.sum().clamp(min=1)
        sparsity.append(torch.relu(target - skip_probability))
    zero = torch.zeros(())
    return {
        "guide": config.guide_weight * guide_scale * (torch.stack(guide).mean() if guide else zero),
        "sparsity": config.sparsity_weight * (torch.stack(sparsity).sum() if sparsity else zero),
    }


class RouterTrainingModule(FrozenModelTrainingModule, nn.Module):
    """What ``Trainer`` trains: the routed model (frozen) whose router is the only trainable part (and the only
    part its checkpoints hold)."""

    def __init__(self, model: PreTrainedModel, config: TokenRouterConfig) -> None:
        super().__init__()
        self.model = model
        self.config = config
        self.progress = 0.0  # share of the optimizer steps done (GuideDecay sets it); the guide loss decays with it
        self.last_losses: dict[str, float] = {}

    def trained_part(self) -> nn.Module:
        return routing_state(self.model).router

    def train(self, mode: bool = True) -> RouterTrainingModule:
        """Only the module switches mode: the frozen model stays in eval (no dropout in teacher or student)."""
        super().train(mode)
        self.model.eval()
        return self

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, labels: Any = None) -> dict:
        if self.model.training:  # put there from outside this module's train(): checkpointing would run
            refuse_gradient_checkpointing(self.model, reason=GRADIENT_CHECKPOINTING_REFUSED)
        state = routing_state(self.model)
        tail, weight = _scored_tail(self.model, input_ids, attention_mask, self.config.loss_tail)
        with torch.no_grad(), routing_disabled(self.model):
            teacher = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                                 **tail).logits.float()
        state.collect = []
        try:
            student = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                                 **tail).logits.float()
            collected = state.collect
        finally:
            state.collect = None
        guide_scale = max(0.0, 1.0 - self.progress)
        losses = router_losses(collected, self.config, guide_scale)
        losses["distill"] = self.config.distill_weight * _tail_kl(teacher, student, weight)
        self.last_losses = {name: float(value.detach()) for name, value in losses.items()}
        return {"loss": sum(losses.values())}


GRADIENT_CHECKPOINTING_REFUSED = (
    "router training cannot run with gradient checkpointing (the blocks it recomputes in the backward pass, after "
    "the routed forward, would route again, differently, or leave the router without a gradient)"
)


def _tail_kl(teacher: torch.Tensor, student: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """KL(teacher ‖ student) of the next-token distributions, averaged over the positions ``weight`` scores."""
    log_teacher = torch.log_softmax(teacher, -1)
    log_student = torch.log_softmax(student, -1)
    kl = (log_teacher.exp() * (log_teacher - log_student)).sum(-1)
    return (kl * weight).sum() / weight.sum().clamp(min=1)


def _scored_tail(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                 tail: float) -> tuple[dict[str, int], torch.Tensor]:
    """The forward keyword that computes logits only from the first scored position on, and those positions'
    weights (:func:`_tail_weight`).

    The ``[batch, length, vocabulary]`` float logits of teacher and student are the largest tensors router training
    holds, and the loss reads only the last ``tail`` of each row: a model whose forward takes ``logits_to_keep``
    runs its language-model head on that span alone.
    """
    weight = _tail_weight(input_ids, attention_mask, tail)
    if not _takes_logits_to_keep(type(model)):
        return {}, weight
    scored = weight.any(0).nonzero()
    keep = weight.shape[1] - int(scored[0]) if len(scored) else 1
    return {"logits_to_keep": keep}, weight[:, -keep:]


@functools.cache
def _takes_logits_to_keep(model_class: type) -> bool:
    """Whether the class's forward takes ``logits_to_keep``: read once per class, not on every training forward."""
    return "logits_to_keep" in inspect.signature(model_class.forward).parameters


class GuideDecay(TrainerCallback):
    """Tells the training module how far training is, in optimizer steps (``Trainer`` knows the total for
    ``max_steps`` and epoch-based runs alike; counting forwards would run ahead under gradient accumulation)."""

    def __init__(self, module: RouterTrainingModule) -> None:
        self.module = module

    def on_step_begin(self, args, state, control, **kwargs):
        self.module.progress = state.global_step / max(1, state.max_steps)


SELECTION_RECORD = "router_selection.json"
SELECTION_WEIGHTS = "router_selection.safetensors"
"""Files :class:`KeepBestRouter` adds to each ``Trainer`` checkpoint: its record and the best router's weights."""


class KeepBestRouter(TrainerCallback):
    """Keeps the router state with the lowest held-out tail KL to the dense model, the starting (static) router
    included, and restores it when training ends: training can then only improve on the static router as measured
    on held-out windows, never silently make it worse."""

    def __init__(self, model: PreTrainedModel, windows: list[dict[str, Any]], config: TokenRouterConfig,
                 every: int) -> None:
        """``windows``: dataset rows (``input_ids`` and optionally ``attention_mask``, lists or tensors)."""
        self.windows = [{key: torch.as_tensor(value) for key, value in row.items()
                         if key in ("input_ids", "attention_mask")} for row in windows]
        self.model, self.config, self.every = model, config, max(1, every)
        self.history: list[dict[str, float]] = []
        self.best: tuple[float, int, dict[str, torch.Tensor]] | None = None

    @torch.no_grad()
    def validation_kl(self) -> float:
        """Mean tail KL of the routed model (inference path: gathered blocks) on the held-out windows."""
        total = 0.0
        device = module_execution_device(self.model.get_input_embeddings())  # 'meta' parameters under offload
        with evaluation_mode(self.model):
            for row in self.windows:
                ids = row["input_ids"][None].to(device)
                mask = row.get("attention_mask")
                mask = mask[None].to(device) if mask is not None else None
                tail, weight = _scored_tail(self.model, ids, mask, self.config.loss_tail)
                with routing_disabled(self.model):
                    teacher = self.model(input_ids=ids, attention_mask=mask, use_cache=False, **tail).logits.float()
                student = self.model(input_ids=ids, attention_mask=mask, use_cache=False, **tail).logits.float()
                total += float(_tail_kl(teacher, student, weight))
        return total / len(self.windows)

    def _check(self, step: int, args: TrainingArguments) -> None:
        # Rank 0's measurement on every rank (GPU kernels may differ in the last bits): ranks that chose different
        # steps would keep different routers.
        value = broadcast_from_main(self.validation_kl(), args)
        self.history.append({"step": step, "validation_kl": value})
        if self.best is None or value < self.best[0]:
            router = routing_state(self.model).router
            self.best = (value, step, {k: v.detach().clone() for k, v in router.state_dict().items()})
        logger.info("router validation KL %.5f at step %d (best %.5f at step %d)", value, step, *self.best[:2])

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step > 0 and self._restore(args, state.global_step):
            return  # resumed: the checkpoint's record goes on, measured up to its step
        self._check(state.global_step, args)

    def on_save(self, args, state, control, **kwargs):
        # Trainer has just written checkpoint-<step> (on every process that writes checkpoints: one per node with
        # save_on_each_node); the record and the best router's weights go with it.
        if self.best is None or not args.should_save:
            return
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        save_file({k: v.cpu().contiguous() for k, v in self.best[2].items()}, os.path.join(folder, SELECTION_WEIGHTS))
        with open(os.path.join(folder, SELECTION_RECORD), "w") as file:
            json.dump({"best_validation_kl": self.best[0], "best_step": self.best[1], "history": self.history}, file)

    def _restore(self, args, step: int) -> bool:
        # Rank 0's record on every rank: ranks that disagreed on whether to measure again would call the collectives
        # of _check unevenly, and hang.
        saved = broadcast_from_main(self._read_record(args), args)
        if saved is None:
            logger.warning("resumed at step %d from a checkpoint without the router's selection record (%s): model "
                           "selection starts again from this step", step, SELECTION_RECORD)
            return False
        record, weights = saved
        self.history = list(record["history"])
        self.best = (float(record["best_validation_kl"]), int(record["best_step"]), weights)
        logger.info("router selection resumed: best %.5f at step %d", *self.best[:2])
        return True

    @staticmethod
    def _read_record(args) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
        checkpoint = args.resume_from_checkpoint
        if checkpoint is True or checkpoint == "True":  # Trainer's own reading of True: the last one in output_dir
            checkpoint = get_last_checkpoint(args.output_dir)
        record_path = os.path.join(str(checkpoint), SELECTION_RECORD)
        if not checkpoint or not os.path.isfile(record_path):
            return None
        with open(record_path) as file:
            record = json.load(file)
        return record, load_file(os.path.join(str(checkpoint), SELECTION_WEIGHTS))

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0 and state.global_step < state.max_steps:
            self._check(state.global_step, args)

    def on_train_end(self, args, state, control, **kwargs):
        self._check(state.global_step, args)
        routing_state(self.model).router.load_state_dict(self.best[2])


def _tail_weight(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, tail: float) -> torch.Tensor:
    """1 on the last ``tail`` fraction of each row's real tokens (at least one), else 0; ``(B, T)`` float."""
    valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    counts = valid.sum(-1, keepdim=True)
    from_end = valid.flip(-1).long().cumsum(-1).flip(-1)  # 1 for the last real token, 2 for the one before, ...
    scored = (tail * counts).round().clamp(min=1)
    return (valid & (from_end <= scored)).float()


def _is_fresh_router(router: nn.Module) -> bool:
    """True when ``router`` holds exactly a new router's weights (the static rule, see ``TokenRouter``)."""
    fresh = TokenRouter(router.hidden.out_features).state_dict()
    return all(torch.equal(value.detach().cpu().float(), fresh[name]) for name, value in router.state_dict().items())


def _check_token_rows(name: str, rows: Any, required: bool) -> None:
    if rows is None and not required:
        return
    if rows is not None and not (hasattr(rows, "__getitem__") and hasattr(rows, "__len__")):
        return  # an iterable dataset: Trainer reads it as it streams
    first = rows[0] if rows is not None and len(rows) else None
    if not isinstance(first, Mapping) or "input_ids" not in first:
        what = ("empty" if rows is not None and not len(rows) else
                f"a {type(rows).__name__}" + (f" of {type(first).__name__}" if first is not None else ""))
        raise ValueError(f"{name} must be rows of token ids ({{'input_ids': [...]}}, e.g. "
                         f"hf_compress.training.causal_lm_dataset(texts, tokenizer, ...)), got {what}.")


def train_token_router(
    model: PreTrainedModel,
    schedule: RoutingSchedule,
    dataset: Dataset,
    *,
    args: TrainingSettings | TrainingArguments | None = None,
    config: TokenRouterConfig | None = None,
    output_dir: str | None = None,
    eval_dataset: Dataset | None = None,
) -> PreTrainedModel:
    """Train the shared router of ``model`` routed by ``schedule``; the model's own weights stay frozen.

    Returns the same model, routed by the trained router (``routing_state(model).mode == "router"``), ready for
    ``generate()`` and ``save_routed`` / ``save_pretrained``. The run's numbers are kept in
    ``routing_state(model).schedule.search["training"]``.

    When model selection keeps the untrained starting router (the static rule) and ``route_decode`` is off, the
    model is returned in ``"static"`` mode instead: the same tokens, without the router's features to compute.
    A schedule that skips no token trains nothing (0 steps): the model comes back routed in ``"static"`` mode, which
    computes every token (the base model's logits).

    A model that is routed already keeps its router (``config.router_hidden_size`` must be its size; without a
    ``config``, the default one takes the router's size and ``route_decode`` from the model) and takes ``schedule``
    and ``config.route_decode``. Gradient checkpointing is refused: see ``GRADIENT_CHECKPOINTING_REFUSED``.

    Model selection (:class:`KeepBestRouter`): every ``config.validation_every`` steps, and before the first, the
    routed model's tail KL to the dense model is measured on held-out windows (``eval_dataset``, or the last
    ``config.validation_windows`` rows of ``dataset``, which are then not trained on); the best router is kept.
    Its record goes into every checkpoint (``save_steps``), so a resumed run keeps what the uninterrupted one would.
    ``eval_dataset`` is also ``Trainer``'s evaluation set, for an ``eval_strategy`` in ``args`` (``eval_loss``: the
    training loss on it); ``load_best_model_at_end`` is refused while model selection is on.

    ``output_dir``: where ``Trainer`` writes checkpoints when ``args`` are ``TrainingSettings`` (default: a scratch
    folder removed afterwards); ``TrainingArguments`` carry their own.

    Example:
        >>> from hf_compress.assets import tiny_model
        >>> from hf_compress.training import causal_lm_dataset
        >>> model, tokenizer = tiny_model("llama")
        >>> data = causal_lm_dataset(["text " * 200], tokenizer, num_sequences=4, seq_len=16)
        >>> routed = train_token_router(model, RoutingSchedule([0.3, 0.3]), data,
        ...                             args=TrainingSettings(max_steps=2, use_cpu=True))  # doctest: +SKIP
    """
    # Every check before the model changes: a refused call leaves it as it came.
    check_schedule(schedule).check_blocks(len(find_decoder_blocks(model)[1]))
    if config is not None and not isinstance(config, TokenRouterConfig):
        raise InvalidArgumentTypeError(f"config must be a TokenRouterConfig (or None: the schedule's sparsity), got "
                                       f"{type(config).__name__}.")
    for name, rows in (("dataset", dataset), ("eval_dataset", eval_dataset)):
        _check_token_rows(name, rows, required=name == "dataset")
    check_not_offloaded(model, "Training the token router", does=TRAINS_ON_ONE_DEVICE)
    refuse_gradient_checkpointing(model, args, reason=GRADIENT_CHECKPOINTING_REFUSED)
    refuse_arguments(args, OWN_LOSS_REFUSED, what="Router training")
    state = routing_state(model)
    given_dir = getattr(args, "output_dir", None)
    if output_dir is not None and given_dir is not None and os.path.abspath(output_dir) != os.path.abspath(given_dir):
        raise ValueError(f"output_dir={output_dir!r} and the TrainingArguments' output_dir={given_dir!r} differ, and "
                         "Trainer writes to the latter; pass one of them.")
    if config is None:
        installed = {} if state is None else {"router_hidden_size": state.router.hidden.out_features,
                                              "route_decode": state.route_decode}
        config = TokenRouterConfig(token_sparsity=schedule.mean_sparsity, **installed)
    elif state is not None and state.router.hidden.out_features != config.router_hidden_size:
        size = state.router.hidden.out_features
        raise ValueError(
            f"the model's router has hidden size {size} but config.router_hidden_size is {config.router_hidden_size}; "
            f"pass router_hidden_size={size} to train this router, or call remove_routing(model) first to train a new "
            "one."
        )
    if config.validation_windows:
        keeps_its_best = ("the router keeps its best step itself, by held-out tail KL (model selection); pass "
                          "TokenRouterConfig(validation_windows=0) to let Trainer choose by its metric instead")
        refuse_arguments(args, {"load_best_model_at_end": keeps_its_best}, what="Router training with model selection")
    if learned_position_limit(model) is not None:
        for rows in (dataset, eval_dataset):
            if rows is not None and len(rows):
                longest = max(len(ids) for ids in rows["input_ids"])
                check_within_learned_positions(model, longest, "the longest training row has", "seq_len")
    trainable = {name: parameter.requires_grad for name, parameter in model.named_parameters()}
    earlier = None if state is None else (state.schedule, state.mode, state.route_decode,
                                          {k: v.detach().clone() for k, v in state.router.state_dict().items()})
    try:
        return _train(model, schedule, dataset, args, config, output_dir, eval_dataset)
    except BaseException:
        # A failed or interrupted run hands the model back as it came: a routed model left behind would save as a
        # routed checkpoint with an untrained router.
        if earlier is None:
            if routing_state(model) is not None:
                remove_routing(model)
        else:
            state.schedule, state.mode, state.route_decode, weights = earlier
            state.router.load_state_dict(weights)
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(trainable.get(name, False))
        raise


def _train(model, schedule: RoutingSchedule, dataset, args, config: TokenRouterConfig, output_dir, eval_dataset):
    """``train_token_router`` past its checks."""
    state = routing_state(model)
    if state is None:
        state = install_routing(model, schedule, mode="router", router_hidden_size=config.router_hidden_size,
                                route_decode=config.route_decode)
    else:
        state.schedule = schedule
        state.mode = "router"
        state.route_decode = config.route_decode
    if schedule.is_dense:
        # No block skips a token (`route --sparsity 0`): the router has nothing to learn and no gradient.
        if not state.route_decode and _is_fresh_router(state.router):
            state.mode = "static"
        schedule.search = {**schedule.search, "training": {"steps": 0, "skipped": "the schedule skips no token"}}
        logger.info("router training skipped: the schedule skips no token")
        return model
    model.requires_grad_(False)
    state.router.requires_grad_(True)
    state.router.float()
    settings = args or TrainingSettings(max_steps=200, learning_rate=1e-3, per_device_batch_size=1, seed=config.seed)
    module = RouterTrainingModule(model, config)
    if eval_dataset is None and config.validation_windows and len(dataset) >= 2 * config.validation_windows:
        held_out = len(dataset) - config.validation_windows
        dataset, eval_dataset = dataset.select(range(held_out)), dataset.select(range(held_out, len(dataset)))
    callbacks: list[TrainerCallback] = []
    if eval_dataset is not None and config.validation_windows:
        windows = list(eval_dataset.select(range(min(len(eval_dataset), config.validation_windows))))
        callbacks.append(KeepBestRouter(model, windows, config, config.validation_every))
    else:
        logger.info("router training without model selection (no held-out windows: pass eval_dataset or more rows)")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        result = train_with_trainer(module, dataset, output_dir or scratch, settings,
                                    callbacks=[*callbacks, GuideDecay(module)], eval_dataset=eval_dataset)
    model.requires_grad_(False)
    model.eval()
    selection = None
    if callbacks:
        best = callbacks[0].best
        selection = {"best_step": best[1], "best_validation_kl": best[0], "history": callbacks[0].history}
        if best[1] == 0 and not state.route_decode and _is_fresh_router(state.router):
            # Training found nothing better than where it started, the static rule itself: rank by the rule, which
            # selects the same tokens without computing the router's features at every block (a faster prefill).
            state.mode = "static"
            selection["kept_static_rule"] = True
    schedule.search = {
        **schedule.search,
        "training": {
            "steps": result["global_step"], "seconds": round(time.perf_counter() - start, 2),
            "training_loss": result["training_loss"], "last_losses": module.last_losses,
            "router_parameters": sum(p.numel() for p in state.router.parameters()),
            "selection": selection,
        },
    }
    logger.info("router trained: %s", schedule.search["training"])
    return model
