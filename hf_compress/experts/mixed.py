"""Mixed-batch LoRA with one adapter's amount of work: every row through its own expert, two matmuls per layer.

PEFT's per-row path (``adapter_names=[...]``) splits each LoRA layer's input by adapter, runs every adapter on
its sub-batch and scatters the results back: per layer and per adapter a gather, two small matmuls and an
indexed add. On a small model those fixed costs dominate a decode step. Stacking the K adapters' ``A``
matrices (``[K·r, in]``) and their scaled ``B`` matrices (``[out, K·r]``) gives every row its update at once::

    update = ((x @ A.T) * row_mask) @ B.T        # row_mask keeps the row's own expert's r columns

The other experts' columns are multiplied by exact zeros, so each row gets its own adapter's update; only
the matmul blocking differs from PEFT's path (agreement to float rounding, tested). The layers run with
PEFT's adapters disabled and a forward hook adds the update; nothing is copied into the model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from .. import _compat


__all__ = ["stacked_lora"]


@contextlib.contextmanager
def stacked_lora(model: nn.Module, adapter_names: Sequence[str], rows: Sequence[int]) -> Iterator[bool]:
    """Inside, ``model`` (a ``PeftModel`` in eval mode) runs batch row ``i`` through ``adapter_names[rows[i]]``.

    Yields ``True``; yields ``False`` and changes nothing when some LoRA layer is not a plain LoRA linear
    (e.g. DoRA) or an expert has ``modules_to_save`` / trainable tokens, so the caller can fall back to
    ``adapter_names=``. Rows repeated by ``generate`` (beams, ``num_return_sequences``: each row expanded in
    place) keep their expert.

    Example:
        >>> with stacked_lora(router.model, router.adapter_names, [0, 2, 1]) as ok:  # doctest: +SKIP
        ...     out = router.model.generate(**batch) if ok else None
    """
    names = list(adapter_names)
    with torch.no_grad():  # the stacked weights are inference copies, not part of any graph
        layers = [(module, _compat.lora_linear_factors(module, names)) for module in model.modules()
                  if isinstance(getattr(module, "lora_A", None), nn.ModuleDict)]
    if not layers or any(factors is None for _, factors in layers) or _compat.auxiliary_adapters(model, names):
        yield False  # modules_to_save etc.: disable_adapter() would switch them off for every row
        return
    experts = torch.as_tensor(list(rows), dtype=torch.long, device="cpu")
    if experts.numel() and not (0 <= int(experts.min()) and int(experts.max()) < len(names)):
        raise ValueError(f"Expert indices must be in 0..{len(names) - 1}, got {experts.tolist()[:5]}.")
    one_hot = nn.functional.one_hot(experts, len(names))

    def hook_for(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor):
        def add_update(module, args, output):
            x = args[0]
            row_mask = mask
            if x.shape[0] != row_mask.shape[0]:
                if x.shape[0] % row_mask.shape[0]:
                    raise RuntimeError(f"A batch of {x.shape[0]} rows was routed as {row_mask.shape[0]} rows.")
                row_mask = row_mask.repeat_interleave(x.shape[0] // row_mask.shape[0], dim=0)
            row_mask = row_mask.view(row_mask.shape[0], *([1] * (x.dim() - 2)), row_mask.shape[1])
            low = nn.functional.linear(x.to(a.dtype), a) * row_mask
            return output + nn.functional.linear(low, b).to(output.dtype)

        return add_update

    masks: dict[tuple, torch.Tensor] = {}  # by (ranks, device, dtype): layers of one shape share a mask
    hooks = []
    for module, (a, b, ranks) in layers:
        if not any(ranks):  # holds none of these adapters (they target other modules): the base layer is right
            continue
        key = (tuple(ranks), a.device, a.dtype)
        if key not in masks:
            repeats = torch.tensor(ranks, device=a.device)
            masks[key] = one_hot.to(a.device).repeat_interleave(repeats, dim=1).to(a.dtype)
        hooks.append((module, hook_for(a, b, masks[key])))

    handles = []
    try:
        with model.disable_adapter():
            for module, hook in hooks:
                handles.append(module.register_forward_hook(hook))
            yield True
    finally:
        for handle in handles:
            handle.remove()
