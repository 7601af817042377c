"""Joint expert training: every expert trains at every step, each batch row through its own cluster's expert.

Trained one after another, K experts sharing a budget of S optimizer steps get about S/K updates each, while one
LoRA on all the data gets S. Trained jointly, one ``Trainer`` run of S steps draws each batch from every cluster
(in proportion to their sizes, as one LoRA on all the data sees them) and sends each row through its own
expert, so every expert gets S (smaller) updates for the same tokens.

The update is computed as :mod:`.mixed` computes it for a mixed batch at inference — the K adapters' ``A``
stacked, a row mask keeping each row's own expert's columns, the ``B`` stacked — but from the live weights, so
gradients reach every expert through its own rows only. PEFT computes no adapter meanwhile (none is active; the
experts' weights are made trainable by hand): its own per-row path (``adapter_names=``) refuses a model in
training mode, and running all K adapters on every row and masking the results costs K passes over every
layer's output.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import torch
from torch import nn

from .. import _compat


__all__ = ["JointExpertsTrainingModule", "rows_through_experts"]


def _expert_layers(model: nn.Module, names: list[str]) -> list[nn.Module]:
    """The LoRA layers holding some of ``names``; refuses ones that are not plain LoRA linears."""
    layers = [module for module in model.modules()
              if isinstance(getattr(module, "lora_A", None), nn.ModuleDict) and any(n in module.lora_A for n in names)]
    with torch.no_grad():
        if not layers or any(_compat.lora_linear_factors(module, names) is None for module in layers):
            raise ValueError("Joint expert training needs plain LoRA linear layers (no DoRA or other LoRA variant, "
                             "no lora_bias): train these experts one after another "
                             "(ExpertConfig(joint_training=False)).")
    return layers


@contextlib.contextmanager
def rows_through_experts(model: nn.Module, adapter_names: Sequence[str], experts: torch.Tensor) -> Iterator[None]:
    """Inside, ``model`` (a ``PeftModel`` with no active adapter, see :class:`JointExpertsTrainingModule`) adds to
    batch row ``i`` the update of ``adapter_names[experts[i]]`` only, with gradients (for training;
    :func:`~.mixed.stacked_lora` is the inference path).

    Example:
        >>> module = JointExpertsTrainingModule(model, ["expert_0", "expert_1"])  # doctest: +SKIP
        >>> with rows_through_experts(model, ["expert_0", "expert_1"], torch.tensor([1, 0])):  # doctest: +SKIP
        ...     loss = model(input_ids=ids, labels=ids).loss
    """
    names = list(adapter_names)
    layers = _expert_layers(model, names)
    if any(name in names for module in layers for name in module.active_adapters):
        raise ValueError("An expert is active in PEFT, which would add its update to every row as well: call "
                         "model.base_model.set_adapter([]) first (JointExpertsTrainingModule does).")
    experts = torch.as_tensor(experts, dtype=torch.long)
    if experts.dim() != 1 or (experts.numel() and not (0 <= int(experts.min()) and int(experts.max()) < len(names))):
        raise ValueError(f"experts must be one index in 0..{len(names) - 1} per batch row, got {experts.tolist()[:8]}.")
    one_hot = nn.functional.one_hot(experts.cpu(), len(names))
    masks: dict[tuple, torch.Tensor] = {}  # by (ranks, device, dtype): layers of one shape share a mask

    def add_update(module, args, output):
        x = args[0]
        if x.shape[0] != one_hot.shape[0]:
            raise RuntimeError(f"A batch of {x.shape[0]} rows was routed as {one_hot.shape[0]} rows.")
        a, b, ranks = _compat.lora_linear_factors(module, names)  # the live weights: gradients reach each expert
        key = (tuple(ranks), a.device, a.dtype)
        if key not in masks:
            masks[key] = one_hot.to(a.device).repeat_interleave(torch.tensor(ranks, device=a.device), dim=1).to(a.dtype)
        mask = masks[key].view(x.shape[0], *([1] * (x.dim() - 2)), -1)
        dropout = _compat.lora_dropout_of(module, next(name for name in names if name in module.lora_A))  # one config
        low = nn.functional.linear(dropout(x).to(a.dtype), a) * mask
        return output + nn.functional.linear(low, b).to(output.dtype)

    handles = [module.register_forward_hook(add_update) for module in layers]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class LoadedKeys(NamedTuple):
    """What ``load_state_dict`` reports, as torch's own result (``Trainer`` reads both fields after resuming)."""

    missing_keys: list[str]
    unexpected_keys: list[str]


class JointExpertsTrainingModule(nn.Module):
    """What ``Trainer`` trains in a joint run: the ``PeftModel`` with no adapter active in PEFT and every expert
    trainable, each batch row (its ``expert`` column) through its own expert (:func:`rows_through_experts`).

    Its ``state_dict`` (what ``Trainer`` checkpoints) holds the experts' LoRA weights only: the frozen base
    needs no checkpoint, and ``Trainer`` writes a module that is not a ``PreTrainedModel`` with
    ``safetensors.save_file``, which refuses tied embeddings. ``load_state_dict`` takes back exactly such a
    checkpoint, strictly (keys and shapes) even where ``Trainer`` asks for a lenient load: a checkpoint of other
    experts would otherwise resume a run half-loaded.

    Example:
        >>> module = JointExpertsTrainingModule(peft_model, ["expert_0", "expert_1"])  # doctest: +SKIP
        >>> train_with_trainer(module, data_with_expert_column, "out")  # doctest: +SKIP
    """

    _keys_to_ignore_on_save = None  # Trainer reads it after a resume that reports missing keys

    def __init__(self, model: nn.Module, adapter_names: Sequence[str]) -> None:
        super().__init__()
        self.model = model
        self.adapter_names = list(adapter_names)
        # No adapter active in PEFT (the hooks add the updates), every expert trainable: before Trainer builds its
        # optimizer. set_adapter([]) also freezes them all, hence requires_grad by hand after it.
        model.base_model.set_adapter([])
        for module in _expert_layers(model, self.adapter_names):
            for name in self.adapter_names:
                if name in module.lora_A:
                    module.lora_A[name].requires_grad_(True)
                    module.lora_B[name].requires_grad_(True)

    def forward(self, input_ids: torch.Tensor, expert: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, **kwargs: Any) -> Any:
        # **kwargs: Trainer then passes num_items_in_batch, so gradient accumulation weighs every completion token
        # alike, as in the per-expert runs (it reads that from this signature).
        with rows_through_experts(self.model, self.adapter_names, expert):
            return self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)

    def _trained(self) -> dict[str, nn.Parameter]:
        return {name: parameter for name, parameter in self.named_parameters() if parameter.requires_grad}

    def state_dict(self, *args: Any, destination: Any = None, prefix: str = "", keep_vars: bool = False) -> Any:
        destination = {} if destination is None else destination
        for name, parameter in self._trained().items():
            destination[prefix + name] = parameter if keep_vars else parameter.detach()
        return destination

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        trained = self._trained()
        missing = [name for name in trained if name not in state_dict]
        unexpected = [name for name in state_dict if name not in trained]
        reshaped = [name for name in trained if name in state_dict and state_dict[name].shape != trained[name].shape]
        if missing or unexpected or reshaped:
            raise RuntimeError(f"The joint expert checkpoint does not match these experts (missing {missing[:3]}, "
                               f"unexpected {unexpected[:3]}, other shape {reshaped[:3]}): resume with the "
                               "ExpertConfig and data of the run that wrote it, or start a new run.")
        with torch.no_grad():
            for name, value in state_dict.items():
                if name in trained:
                    trained[name].copy_(value)
        return LoadedKeys(missing, unexpected)
