"""Joint expert training: every expert trains at every step, each batch row through its own cluster's expert.

Trained one after another, K experts sharing a budget of S optimizer steps get about S/K updates each, while one
LoRA on all the data gets S. Trained jointly, one ``Trainer`` run of S steps draws each batch from every cluster
(in proportion to their sizes, as one LoRA on all the data sees them) and sends each row through its own
expert, so every expert gets S (smaller) updates for the same tokens and compute: the LoRA updates of the other
experts are computed too but masked to zero on the row, which costs K small matmuls per layer instead of one.

All K adapters are active in PEFT during the run (``LoraModel.set_adapter([...])``, which also makes them the
trainable ones); a forward hook on each adapter's ``lora_B`` multiplies its update by a 0/1 mask of the rows
routed to it, so a row's loss reaches its own expert's weights only. PEFT's own per-row path
(``adapter_names=``) is inference-only (it refuses a model in training mode).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import torch
from torch import nn

from .. import _compat


__all__ = ["JointExpertsTrainingModule", "rows_through_experts"]


class LoadedKeys(NamedTuple):
    """What ``load_state_dict`` reports, as torch's own result (``Trainer`` reads both fields after resuming)."""

    missing_keys: list[str]
    unexpected_keys: list[str]


@contextlib.contextmanager
def rows_through_experts(model: nn.Module, adapter_names: Sequence[str], experts: torch.Tensor) -> Iterator[None]:
    """Inside, ``model`` (a ``PeftModel`` whose ``adapter_names`` are all active) adds to batch row ``i`` only the
    update of ``adapter_names[experts[i]]``, keeping gradients (for training; :func:`~.mixed.stacked_lora` is the
    inference path).

    Example:
        >>> model.base_model.set_adapter(["expert_0", "expert_1"])  # doctest: +SKIP
        >>> with rows_through_experts(model, ["expert_0", "expert_1"], torch.tensor([1, 0])):  # doctest: +SKIP
        ...     loss = model(input_ids=ids, labels=ids).loss
    """
    names = list(adapter_names)
    layers = _compat.lora_update_layers(model, names)
    if layers is None:
        raise ValueError("Joint expert training needs plain LoRA linear layers (no DoRA or other LoRA variant, no "
                         "lora_bias): train these experts one after another (ExpertConfig(joint_training=False)).")
    experts = torch.as_tensor(experts, dtype=torch.long)
    if experts.dim() != 1 or (experts.numel() and not (0 <= int(experts.min()) and int(experts.max()) < len(names))):
        raise ValueError(f"experts must be one index in 0..{len(names) - 1} per batch row, got {experts.tolist()[:8]}.")
    masks: dict[tuple[int, torch.device, torch.dtype], torch.Tensor] = {}

    def mask_for(index: int, like: torch.Tensor) -> torch.Tensor:
        key = (index, like.device, like.dtype)
        if key not in masks:
            masks[key] = (experts == index).to(device=like.device, dtype=like.dtype)
        mask = masks[key]
        return mask.view(mask.shape[0], *([1] * (like.dim() - 1)))

    def hook_for(index: int):
        def keep_own_rows(module, args, output):
            if output.shape[0] != experts.shape[0]:
                raise RuntimeError(f"A batch of {output.shape[0]} rows was routed as {experts.shape[0]} rows.")
            return output * mask_for(index, output)

        return keep_own_rows

    handles = [module.register_forward_hook(hook_for(index)) for index, module in layers]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class JointExpertsTrainingModule(nn.Module):
    """What ``Trainer`` trains in a joint run: the ``PeftModel`` with every expert active and trainable, each
    batch row (its ``expert`` column) through its own expert.

    Its ``state_dict`` (what ``Trainer`` checkpoints) holds the experts' LoRA weights only: the frozen base
    needs no checkpoint, and ``Trainer`` writes a module that is not a ``PreTrainedModel`` with
    ``safetensors.save_file``, which refuses tied embeddings.

    Example:
        >>> module = JointExpertsTrainingModule(peft_model, ["expert_0", "expert_1"])  # doctest: +SKIP
        >>> train_with_trainer(module, data_with_expert_column, "out")  # doctest: +SKIP
    """

    def __init__(self, model: nn.Module, adapter_names: Sequence[str]) -> None:
        super().__init__()
        self.model = model
        self.adapter_names = list(adapter_names)
        model.base_model.set_adapter(self.adapter_names)  # active and trainable, before Trainer builds its optimizer

    def forward(self, input_ids: torch.Tensor, expert: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> Any:
        with rows_through_experts(self.model, self.adapter_names, expert):
            return self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)

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
        if strict and (missing or unexpected):
            raise RuntimeError(f"joint expert checkpoint does not match the experts: missing {missing[:5]}, "
                               f"unexpected {unexpected[:5]}")
        with torch.no_grad():
            for name, value in state_dict.items():
                if name in trained:
                    trained[name].copy_(value)
        return LoadedKeys(missing, unexpected)
