"""``train_experts``: cluster the data in the semantic space, then train one PEFT LoRA adapter per cluster."""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
import tempfile
from collections.abc import Sequence
from typing import Any

import torch

from .. import _compat
from ..hub import base_weights_of
from ..modeling.layers import TRAINS_ON_ONE_DEVICE, check_not_offloaded, check_within_learned_positions
from ..routing.layer import check_not_routed
from ..training import (
    OWN_LOSS_REFUSED,
    TrainingSettings,
    asked_arguments,
    broadcast_from_main,
    preserved_random_state,
    refuse_arguments,
    refuse_gradient_checkpointing,
    train_with_trainer,
)
from ..utils import get_logger
from .clustering import kmeans
from .config import ExpertConfig
from .data import InstructionRows, instruction_rows, packed_instruction_dataset
from .embedding import EmbeddingSpace, EmbeddingSpec, check_given_embeddings, embed_texts
from .folder import strip_lora
from .joint import JointExpertsTrainingModule
from .router import ExpertRouter
from .selection import resolve_tokenizer, selection_of


__all__ = ["split_steps", "train_experts"]

logger = get_logger(__name__)


JOINT_CHECKPOINTING_REFUSED = (
    "joint expert training cannot run with gradient checkpointing (the blocks it recomputes in the backward pass "
    "would run without the experts' per-row updates; or train the experts one after another, joint_training=False)"
)

_WARMUP_ADAPTER = "shared_warmup"  # trained first with ExpertConfig.shared_warmup, deleted once copied


def split_steps(total: int, sizes: Sequence[int]) -> list[int]:
    """``total`` steps shared in proportion to ``sizes`` (largest remainders; every share at least 1).

    Example:
        >>> split_steps(10, [5, 3, 2])
        [5, 3, 2]
        >>> split_steps(10, [1, 1, 1])
        [4, 3, 3]
    """
    weight = sum(sizes)
    exact = [total * size / weight for size in sizes]
    shares = [max(int(value), 1) for value in exact]
    order = sorted(range(len(sizes)), key=lambda i: (-(exact[i] - int(exact[i])), i))
    for i in order:
        if sum(shares) >= total:
            break
        shares[i] += 1
    return shares


def train_experts(
    model,
    dataset,
    config: ExpertConfig | None = None,
    args=None,
    *,
    tokenizer=None,
    clusters: Sequence[int] | None = None,
    embeddings: torch.Tensor | None = None,
    batch_size: int = 16,
) -> ExpertRouter:
    """Cluster ``dataset`` in ``model``'s semantic space and train one LoRA expert per cluster with ``Trainer``.

    Args:
        model: The plain base causal LM (LoRA layers are injected into it, as ``get_peft_model`` does).
        dataset: Instruction data (``prompt``/``completion`` or ``text``; see :mod:`~hf_compress.experts.data`),
            e.g. the subset :func:`~hf_compress.experts.select_data` kept.
        config: :class:`ExpertConfig` (number of experts, LoRA settings, embedding, clustering).
        args: ``transformers.TrainingArguments`` or :class:`~hf_compress.training.TrainingSettings` for the
            ``Trainer`` (default ``TrainingSettings()``). With ``config.split_steps`` its ``max_steps`` is
            the total over all experts, shared in proportion to cluster sizes, and an absolute ``warmup_steps``
            the same share of each run (ceiling). Each training run (every
            expert, and the shared warm-up) writes under its own sub-folder of ``TrainingArguments.output_dir``,
            named after its adapter (``out/expert_0/checkpoint-50``, ``out/shared_warmup/...``), so the runs'
            checkpoints and ``save_total_limit`` rotation stay apart. With ``config.joint_training`` one run of
            ``max_steps`` trains every expert (``split_steps`` does not apply) and writes under ``out/experts/``;
            it alone, or a single expert's run, can resume (``resume_from_checkpoint``). ``TrainingSettings``
            keep nothing (their runs write to a scratch folder removed after training).
        tokenizer: The model's tokenizer (default: loaded from ``model.name_or_path``).
        clusters: An explicit cluster per example (``0..num_experts-1``) instead of k-means, e.g. task labels
            or a random partition for a baseline; the centroids are then the clusters' mean directions.
        embeddings: The raw pooled embeddings of the prompts (``embed_texts`` with this config's spec), to
            reuse ones already computed (e.g. by a benchmark comparing variants on one pool).
        batch_size: Prompts embedded per forward.

    Returns:
        An :class:`ExpertRouter` (in eval mode) holding the trained experts; ``save_pretrained`` writes it.

    Example:
        >>> experts = train_experts(model, subset, ExpertConfig(num_experts=4, r=8),
        ...                         args=TrainingArguments("out", max_steps=200))  # doctest: +SKIP
        >>> experts.save_pretrained("experts/")  # doctest: +SKIP
    """
    from peft import get_peft_model, set_peft_model_state_dict

    config = config or ExpertConfig()
    if not isinstance(config, ExpertConfig):
        raise TypeError(f"config must be an ExpertConfig, got {type(config).__name__}.")
    if hasattr(model, "peft_config"):
        raise ValueError("model already carries PEFT adapters; pass the plain base model (the experts are "
                         "added to it as new LoRA adapters).")
    check_not_offloaded(model, "Training experts", does=TRAINS_ON_ONE_DEVICE)
    # Refused here, not by peft's "no target_modules" or the routing's left-padding check deep in the embedding pass.
    check_not_routed(model, "train the experts on the model it was routed from: the embedding pass pads on the right, "
                            "which routing refuses, and the experts folder has no place for the router")
    args = args if args is not None else TrainingSettings()  # another kind is refused by _asked (asked_arguments)
    one_run = config.num_experts == 1 or (config.joint_training and config.shared_warmup == 0)
    if _asked(args, "resume_from_checkpoint") and not one_run:
        raise ValueError("train_experts runs one Trainer per expert from these arguments, so one checkpoint to resume "
                         "from would be loaded into every expert: leave resume_from_checkpoint unset (train the "
                         "experts again, or train each cluster's adapter yourself with clusters=), or train them in "
                         "one run that can resume: ExpertConfig(joint_training=True) without shared_warmup.")
    if _asked(args, "push_to_hub"):
        raise ValueError("train_experts runs one Trainer per expert from these arguments, so every expert would push "
                         "to the same Hub repo: leave push_to_hub unset and push the trained experts together with "
                         "`experts.push_to_hub(repo_id)` (every adapter, the router and a card in one repo).")
    refuse_arguments(args, {"eval_strategy": "it takes no evaluation set (each expert trains on its own cluster); "
                                             "score the experts after training (ExpertRouter.generate)"},
                     what="train_experts")
    if config.joint_training and config.num_experts > 1:
        refuse_gradient_checkpointing(model, args, reason=JOINT_CHECKPOINTING_REFUSED)
        refuse_arguments(args, OWN_LOSS_REFUSED, what="Joint expert training")
    if config.shared_warmup > 0 and not (args.max_steps and args.max_steps > 1):
        raise ValueError("shared_warmup is a fraction of the step budget: set max_steps >= 2 in args "
                         "(e.g. TrainingArguments(..., max_steps=400)), or use shared_warmup=0.")
    rows = instruction_rows(dataset)
    _check_mixed_batches_possible(model, config)  # before the embedding pass and any training
    # Packed windows of seq_len tokens: past a learned position table, an IndexError deep inside Trainer.
    check_within_learned_positions(model, config.seq_len, "ExpertConfig.seq_len is", "seq_len")
    k = config.num_experts
    if k > len(rows):
        raise ValueError(f"num_experts={k} exceeds the {len(rows)} examples; use num_experts <= {len(rows)} "
                         "or more data.")
    tokenizer = resolve_tokenizer(model, tokenizer)

    spec = EmbeddingSpec.for_model(model, config.embedding_layer, config.embedding_max_length)
    if k == 1 and clusters is None and embeddings is None:
        # One expert: nothing to cluster or route, so no embedding pass (the router skips it too).
        hidden = _plain_width(model)
        # Routing state lives on the CPU (embed_batch returns CPU rows), whatever the model's device.
        space = EmbeddingSpace(torch.zeros(hidden, device="cpu"), torch.ones(hidden, device="cpu"))
        labels = torch.zeros(len(rows), dtype=torch.long, device="cpu")
        centroids = torch.eye(1, hidden, device="cpu")
        clustering = {"method": "single expert"}
    else:
        if embeddings is None:
            embeddings = embed_texts(model, tokenizer, rows.prompts, spec, batch_size=batch_size)
        else:
            embeddings = check_given_embeddings(embeddings, len(rows), _plain_width(model))
        space = EmbeddingSpace.fit(embeddings)
        labels, centroids, clustering = _clusters(space(embeddings), k, config, clusters)
        # Every rank embedded the prompts itself, and GPU kernels may differ in the last bits: rank 0's space and
        # clusters on every rank, or ranks train different clusters (different step counts hang DDP).
        space, labels, centroids, clustering = broadcast_from_main((space, labels, centroids, clustering), args)
    sizes = torch.bincount(labels, minlength=k).tolist()
    logger.info("clustered %d examples into %d experts of sizes %s", len(rows), k, sizes)

    total_steps, warmup_steps = args.max_steps, 0
    if config.shared_warmup > 0 and k > 1:
        warmup_steps = min(max(round(total_steps * config.shared_warmup), 1), total_steps - 1)
        total_steps -= warmup_steps
    joint = config.joint_training and k > 1  # one run of total_steps trains them all: nothing to split
    steps = [total_steps] * k
    if not joint and config.split_steps and total_steps and total_steps > 0:
        steps = split_steps(total_steps, sizes)
        if sum(steps) > total_steps:
            logger.warning("max_steps=%d < %d experts: every expert still trains 1 step (%d in all).",
                           total_steps, k, sum(steps))

    results: list[dict[str, Any]] = []
    windows: list = []  # joint training: each cluster's windows, tagged with its expert
    peft_model, warmup, start_from, joint_run = None, None, None, None
    try:
        with tempfile.TemporaryDirectory(prefix="hf_compress-experts-") as scratch:
            if warmup_steps:
                peft_model, warmup, start_from = _shared_warmup(model, rows, tokenizer, config, args, warmup_steps,
                                                                scratch)
            for index in range(k):
                name = config.adapter_name(index)
                members = torch.nonzero(labels == index).flatten().tolist()
                cluster = InstructionRows([rows.prompts[i] for i in members], [rows.completions[i] for i in members])
                data = packed_instruction_dataset(cluster, tokenizer, config.seq_len, seed=config.seed + index)
                # Each expert's LoRA starts from its own seed, not from whatever state the caller's generator is in.
                with _compat.third_party_warnings_silenced(), preserved_random_state():
                    torch.manual_seed(config.seed + index)
                    if peft_model is None:
                        peft_model = get_peft_model(model, config.lora_config(model), adapter_name=name)
                    else:
                        peft_model.add_adapter(name, config.lora_config(model))
                    if start_from is not None:
                        set_peft_model_state_dict(peft_model, start_from, adapter_name=name)
                record = {"adapter": name, "examples": len(members), "windows": len(data)}
                if joint:
                    windows.append(data.add_column("expert", [index] * len(data)))
                    results.append(record)
                    continue
                peft_model.set_adapter(name)  # only this expert's LoRA weights train
                logger.info("training %s on %d examples (%d windows of %d tokens), %s steps", name, len(members),
                            len(data), config.seq_len, steps[index])
                result = train_with_trainer(peft_model, data, scratch, _with_steps(args, steps[index], scratch, name))
                results.append({**record, "steps": result["global_step"],
                                "train_seconds": round(result["train_seconds"], 3),
                                "training_loss": result["training_loss"]})
            if joint:
                joint_run = _train_jointly(peft_model, [config.adapter_name(i) for i in range(k)], windows, args,
                                           total_steps, scratch)
    except BaseException:
        # An interrupted or failed run hands the caller's model back as it came (PEFT wraps it in place).
        strip_lora(model)
        raise
    if warmup is not None:
        peft_model.delete_adapter(_WARMUP_ADAPTER)  # its weights live on in every expert
    peft_model.set_adapter(config.adapter_name(0))  # one active adapter, as after the per-expert runs
    peft_model.eval()
    runs = ([joint_run] if joint_run is not None else results) + ([warmup] if warmup is not None else [])
    info = {
        "config": config.to_dict(),
        "cluster_sizes": sizes,
        "clustering": clustering,
        "training": {"experts": results, **({"joint": joint_run} if joint_run is not None else {}),
                     **({"shared_warmup": warmup} if warmup is not None else {}),
                     "total_steps": sum(r["steps"] for r in runs),
                     "train_seconds": round(sum(r["train_seconds"] for r in runs), 3)},
        "selection": selection_of(dataset),
    }
    base_weights = base_weights_of(model.config)  # a reference model's GGUF origin, for the cards
    if base_weights is not None:
        info["base_weights"] = base_weights
    router = ExpertRouter(peft_model, centroids, space, spec, [config.adapter_name(i) for i in range(k)],
                          tokenizer=tokenizer, info=info)
    router.training_labels = labels.tolist()  # each training example's expert (not saved)
    return router


def _check_mixed_batches_possible(model, config: ExpertConfig) -> None:
    """Refuse LoRA targets that peft wraps as parameters (``ParamWrapper``: an MoE's fused experts and router, which
    ``"all-linear"`` reaches on Mixtral or Qwen3-Next): peft cannot run rows of different adapters through them, so a
    routed batch would fail after the training was paid for. Probed on a copy of the architecture on the meta device."""
    from peft import get_peft_model

    from ..modeling.layers import built_on_meta

    try:
        skeleton = built_on_meta(type(model), model.config)
        with torch.device("meta"), _compat.third_party_warnings_silenced():
            probe = get_peft_model(skeleton, config.lora_config(model))
    except Exception as error:  # noqa: BLE001 - an architecture that does not build on meta: training will tell
        logger.debug("could not probe the LoRA targets on the meta device: %s", error)
        return
    wrapped = sorted({name.rpartition(".")[2] for name, module in probe.named_modules()
                      if _compat.is_lora_parameter_wrapper(module) and not name.endswith(".base_layer")})
    if wrapped:
        raise ValueError(
            f"target_modules={config.target_modules!r} puts LoRA on {type(model).__name__}'s fused parameters "
            f"({', '.join(wrapped)}: peft's ParamWrapper), which cannot run rows of different experts in one batch, "
            "as routed generation does. Name the linear layers instead, e.g. ExpertConfig(target_modules=['q_proj', "
            "'k_proj', 'v_proj', 'o_proj'])."
        )


def _shared_warmup(model, rows: InstructionRows, tokenizer, config: ExpertConfig, args, steps: int, scratch: str):
    """One LoRA trained on every example for ``steps``: the PEFT model, its run's record, and its weights."""
    from peft import get_peft_model, get_peft_model_state_dict

    data = packed_instruction_dataset(rows, tokenizer, config.seq_len, seed=config.seed + config.num_experts)
    with _compat.third_party_warnings_silenced(), preserved_random_state():
        torch.manual_seed(config.seed + config.num_experts)  # seeded like the experts' own adapters
        peft_model = get_peft_model(model, config.lora_config(model), adapter_name=_WARMUP_ADAPTER)
    logger.info("shared warm-up on all %d examples (%d windows of %d tokens), %d steps", len(rows), len(data),
                config.seq_len, steps)
    result = train_with_trainer(peft_model, data, scratch, _with_steps(args, steps, scratch, _WARMUP_ADAPTER))
    record = {"adapter": _WARMUP_ADAPTER, "examples": len(rows), "windows": len(data), "steps": result["global_step"],
              "train_seconds": round(result["train_seconds"], 3), "training_loss": result["training_loss"]}
    weights = {key: value.detach().clone()
               for key, value in get_peft_model_state_dict(peft_model, adapter_name=_WARMUP_ADAPTER).items()}
    return peft_model, record, weights


def _train_jointly(peft_model, names: list[str], windows: list, args, steps: int, scratch: str) -> dict[str, Any]:
    """All experts in one ``Trainer`` run of ``steps`` steps over every cluster's windows (``expert`` column)."""
    from datasets import concatenate_datasets

    data = concatenate_datasets(windows)  # Trainer's sampler shuffles: batches mix the clusters by size
    logger.info("training %d experts jointly on %d windows, %s steps", len(names), len(data), steps)
    result = train_with_trainer(JointExpertsTrainingModule(peft_model, names), data, scratch,
                                _with_steps(args, steps, scratch, "experts"))
    return {"adapters": names, "windows": len(data), "steps": result["global_step"],
            "train_seconds": round(result["train_seconds"], 3), "training_loss": result["training_loss"]}


def _plain_width(model) -> int:
    # The routing embeddings are hidden states: OPT-350m's input embeddings are narrower than its blocks.
    return int(model.config.get_text_config().hidden_size)


def _clusters(embeddings: torch.Tensor, k: int, config: ExpertConfig, clusters):
    if clusters is None:
        result = kmeans(embeddings, k, seed=config.seed, restarts=config.kmeans_restarts,
                        iterations=config.kmeans_iterations)
        return result.labels, result.centroids, {"method": "spherical k-means", "seed": config.seed,
                                                  "restarts": config.kmeans_restarts,
                                                  "inertia": round(result.inertia, 6)}
    values = list(clusters.tolist() if isinstance(clusters, torch.Tensor) else clusters)
    bad = next((v for v in values if isinstance(v, bool) or not isinstance(v, numbers.Integral)), None)
    if bad is not None:  # as_tensor(dtype=long) would truncate 0.7 to 0 and read True as 1
        raise ValueError(f"clusters must be integers in 0..{k - 1} (num_experts={k}), got {bad!r}.")
    labels = torch.as_tensor(values, dtype=torch.long, device=embeddings.device)
    if labels.shape != (len(embeddings),):
        raise ValueError(f"clusters must give one cluster per example ({len(embeddings)}), got {len(labels)}.")
    if labels.min() < 0 or labels.max() >= k:
        raise ValueError(f"clusters must be integers in 0..{k - 1} (num_experts={k}).")
    sizes = torch.bincount(labels, minlength=k)
    if (sizes == 0).any():
        empty = torch.nonzero(sizes == 0).flatten().tolist()
        raise ValueError(f"Cluster(s) {empty} are empty: every one of the {k} experts needs examples.")
    sums = torch.zeros(k, embeddings.shape[1], device=embeddings.device).index_add_(0, labels, embeddings.float())
    return labels, torch.nn.functional.normalize(sums, dim=1), {"method": "given"}


def _asked(args, argument: str) -> bool:
    """Whether ``args`` set the ``TrainingArguments`` field ``argument`` (``resume_from_checkpoint``, which
    ``train_with_trainer`` honours; ``push_to_hub``), directly or through ``TrainingSettings.extra_arguments``."""
    return bool(asked_arguments(args, [argument]).get(argument))


def _with_steps(args, steps: int, scratch: str, adapter: str):
    """``args`` for the run that trains ``adapter`` for ``steps`` steps.

    The user's ``output_dir`` gets one sub-folder per run, named after its adapter: one ``Trainer`` per expert in
    one folder would overwrite each other's ``checkpoint-N`` and rotate each other's out (``save_total_limit``).
    ``TrainingSettings`` runs write to ``scratch`` (removed after training; they save nothing unless asked).
    """
    changes: dict[str, Any] = {"max_steps": steps}
    budget, warmup = args.max_steps, args.warmup_steps
    if warmup >= 1 and budget and 0 < steps < budget:
        # An absolute warm-up is a share of the whole budget (max_steps): each run warms up over the same share of
        # its own steps, not the whole count (which could outlast a short expert's run, at a learning rate never
        # reached). A fractional warmup_steps (TrainingArguments) is a ratio of each run already.
        changes["warmup_steps"] = math.ceil(warmup * steps / budget)
        logger.info("%s: warm-up of %d steps in its %d-step run (%s of the %d-step budget)", adapter,
                    changes["warmup_steps"], steps, warmup, budget)
    if isinstance(args, TrainingSettings):
        return dataclasses.replace(args, **changes)
    # TrainingArguments is a dataclass; replace() re-runs its checks.
    output_dir = os.path.join(args.output_dir, adapter) if args.output_dir else scratch
    return dataclasses.replace(args, output_dir=output_dir, **changes)
