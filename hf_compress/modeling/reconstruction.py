"""Block-wise reconstruction: measure and train how well a modified decoder block matches a teacher.

Methods that edit a block and then repair it against the block's original outputs (SDS re-densing,
mask-fixed tuning after pruning, later Týr's and DL-QAT's layer-wise initialisation) share two steps:

- ``reconstruction_error(ctx, targets)``: ``Σ‖f(X) − Y‖² / Σ‖Y‖²`` over the block's calibration
  inputs, the scale-free error every method logs;
- ``train_block_reconstruction(ctx, targets, parameters, ...)``: AdamW on that error (plus an optional
  regulariser) over the calibration micro-batches, for a few epochs, with a hook after every step
  (e.g. to re-apply a mask).

Both work on the ``BlockContext`` that ``for_each_block`` hands a callback; the targets are usually
``ctx.dense_outputs`` (``keep_dense_outputs=True``). Training runs in float32 whatever the model's
dtype (Adam on bf16 weights loses most small updates): a half-precision block is upcast for the
duration and cast back after.

Example:
    >>> import torch
    >>> from hf_compress.assets import tiny_model
    >>> from hf_compress.modeling import calibration_batches, for_each_block, weight_matrix
    >>> model, tokenizer = tiny_model("llama")
    >>> ids = calibration_batches(["calibration text " * 80], tokenizer, num_sequences=4, seq_len=32)
    >>> def damage_and_repair(ctx):
    ...     layer = ctx.linear_layers["mlp.down_proj"]
    ...     weight_matrix(layer).mul_(0.5)
    ...     before = reconstruction_error(ctx, ctx.dense_outputs)
    ...     train_block_reconstruction(ctx, ctx.dense_outputs, [layer.weight], epochs=20, learning_rate=1e-2)
    ...     assert reconstruction_error(ctx, ctx.dense_outputs) < before
    >>> _ = for_each_block(model, ids, damage_and_repair, keep_dense_outputs=True, progress=False)
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from .calibration import BlockContext


__all__ = ["reconstruction_error", "train_block_reconstruction"]


def reconstruction_error(ctx: BlockContext, targets: Sequence[torch.Tensor]) -> float:
    """``Σ‖block(X) − Y‖² / Σ‖Y‖²`` over ``ctx.inputs`` and ``targets`` (micro-batch by micro-batch).

    Example:
        >>> reconstruction_error(ctx, ctx.dense_outputs)  # doctest: +SKIP
        0.0
    """
    _check_targets(ctx, targets)
    error = total = 0.0
    with torch.no_grad():
        for hidden, target in zip(ctx.inputs, targets, strict=True):
            output = ctx.forward(hidden).float()
            target = target.to(output.device, torch.float32)
            error += float((output - target).pow(2).sum())
            total += float(target.pow(2).sum())
    return error / total if total > 0 else 0.0


def train_block_reconstruction(
    ctx: BlockContext,
    targets: Sequence[torch.Tensor],
    parameters: Sequence[nn.Parameter],
    *,
    epochs: int,
    learning_rate: float,
    relative_learning_rate: bool = False,
    regularizer: Callable[[], torch.Tensor] | None = None,
    after_step: Callable[[], None] | None = None,
    seed: int = 0,
) -> list[float]:
    """Fit ``parameters`` of ``ctx.block`` so that the block's outputs on ``ctx.inputs`` match ``targets``.

    One optimizer step per calibration micro-batch, micro-batches shuffled each epoch (seeded). The loss
    of a step is ``‖block(X) − Y‖² / ‖Y‖²`` on its micro-batch plus ``regularizer()`` (already
    weighted by the caller). Every other parameter of the block is frozen for the duration.

    Args:
        ctx: the block's context (its inputs, call arguments and device).
        targets: the teacher outputs, one per micro-batch of ``ctx.inputs``.
        parameters: the parameters to train (members of ``ctx.block``).
        epochs: passes over the calibration micro-batches.
        learning_rate: AdamW learning rate (no weight decay).
        relative_learning_rate: scale the rate of each parameter by its RMS at the start, so that one
            setting moves weights by the same fraction whatever their scale (Adam's step size does not
            depend on the gradient's scale, only on the rate's).
        regularizer: returns a scalar added to each step's loss (computed on the float32 parameters).
        after_step: called after every optimizer step under ``torch.no_grad()`` (e.g. re-masking).
        seed: order of the micro-batches.

    Returns:
        The mean loss of each epoch.
    """
    _check_targets(ctx, targets)
    owned = {id(p) for p in ctx.block.parameters()}
    if not parameters or any(id(p) not in owned for p in parameters):
        raise ValueError(
            "train_block_reconstruction trains parameters of ctx.block; got none or ones from another module."
        )
    generator = torch.Generator().manual_seed(seed)
    history: list[float] = []
    with _float32_training(ctx, parameters) as float_ctx:
        groups = [{"params": [p], "lr": learning_rate * (_rms(p) if relative_learning_rate else 1.0)}
                  for p in parameters]
        optimizer = torch.optim.AdamW(groups, lr=learning_rate, weight_decay=0.0)
        for _ in range(epochs):
            losses = []
            for index in torch.randperm(len(ctx.inputs), generator=generator).tolist():
                hidden = ctx.inputs[index].to(float_ctx.device, torch.float32)
                target = targets[index].to(float_ctx.device, torch.float32)
                with torch.enable_grad():
                    output = float_ctx.forward(hidden)
                    loss = (output - target).pow(2).sum() / target.pow(2).sum().clamp_min(1e-12)
                    if regularizer is not None:
                        loss = loss + regularizer()
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                optimizer.step()
                if after_step is not None:
                    with torch.no_grad():
                        after_step()
                losses.append(float(loss))
            history.append(sum(losses) / len(losses))
        optimizer.zero_grad(set_to_none=True)
    return history


def _rms(parameter: nn.Parameter) -> float:
    return float(parameter.detach().float().pow(2).mean().sqrt())


def _check_targets(ctx: BlockContext, targets: Sequence[torch.Tensor] | None) -> None:
    if targets is None or len(targets) != len(ctx.inputs):
        raise ValueError(
            "targets must hold one tensor per calibration micro-batch of the block (pass "
            "ctx.dense_outputs from for_each_block(..., keep_dense_outputs=True))."
        )


@contextlib.contextmanager
def _float32_training(ctx: BlockContext, parameters: Sequence[nn.Parameter]) -> Iterator[BlockContext]:
    # Freeze everything but `parameters`, upcast half-precision tensors of the block (in place through
    # `.data`, so the optimizer's Parameter references stay valid) and restore flags and dtypes afterwards.
    block = ctx.block
    trainable = {id(p) for p in parameters}
    flags = [(p, p.requires_grad) for p in block.parameters()]
    tensors = [t for t in (*block.parameters(), *block.buffers()) if t.is_floating_point()]
    dtypes = [(t, t.dtype) for t in tensors if t.dtype != torch.float32]
    try:
        for param, _ in flags:
            param.requires_grad_(id(param) in trainable)
        for tensor, _ in dtypes:
            tensor.data = tensor.data.float()
        call = ctx.call.on(ctx.device, dtype=torch.float32) if dtypes else ctx.call
        yield dataclasses.replace(ctx, call=call)
    finally:
        for tensor, dtype in dtypes:
            tensor.data = tensor.data.to(dtype)
        for param, flag in flags:
            param.requires_grad_(flag)
            param.grad = None
