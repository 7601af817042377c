"""SparseGPT (Frantar & Alistarh, 2023): prune with second-order (OBS) reconstruction of the layer output.

For a linear layer with calibration inputs ``X`` the Hessian of ``‖WX − ŴX‖²`` is ``H = 2/n Σ x xᵀ``
(``HessianCollector``). Columns are processed left to right; when a weight is zeroed its error is
spread over the not-yet-processed columns of its row through the upper Cholesky factor ``U`` of
``H⁻¹`` (``H⁻¹ = UᵀU``), so the remaining weights compensate for it. The procedure follows the
reference implementation:

1. dead inputs (``H_jj = 0``): ``H_jj = 1`` and column ``j`` of ``W`` zeroed;
2. damping ``H += λI``, ``λ = percdamp · mean(diag H)``;
3. ``U`` = upper Cholesky factor of ``H⁻¹``; ``d_j = U_jj``;
4. columns in lazy blocks of ``blocksize``: the updates inside a block are applied column by column,
   the block's accumulated error reaches the columns to its right in one matrix product;
5. masks: unstructured: at the start of each block, prune the ``s``-fraction of the block with the
   lowest saliency ``w² / d²`` (adaptive, per-block mask); N:M: at every M-th column, in each row
   prune the ``M − N`` lowest-saliency entries of the next M columns, computed on the already
   updated weights. A layer pruned before (at least 10% exact zeros) keeps its zeros: they are pruned
   first, whatever the updates made of them, so a second prune gives the union of both masks.

All arithmetic is fp32 whatever the model's dtype; the result is cast back when written.

The math lives here; ``pruner.py`` is the lifecycle (statistics, the pruner class).

Example:
    >>> from hf_compress.pruning import SparseGPTConfig, SparseGPTPruner
    >>> pruner = SparseGPTPruner.from_pretrained("tiny-gpt2")
    >>> config = SparseGPTConfig(sparsity="2:4", num_calibration_sequences=4, calibration_seq_len=32)
    >>> model = pruner.prune(config, calibration_dataset=["calibration text " * 20], progress=False)
    >>> pruner.report.overall_sparsity
    0.5
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ...utils import get_logger
from ..config import SparsityPattern, parse_sparsity
from ..masks import n_m_mask, unstructured_mask


__all__ = ["FactorCache", "HessianFactor", "cpu_threads", "factor_hessian", "sparsegpt_prune"]

logger = get_logger(__name__)

_MAX_DAMPING_RETRIES = 6
# Fraction of exact zeros from which a weight counts as pruned before (keep_zeros=None); the threshold of DL-QAT's
# keep_sparsity="auto" (quantization.grid.SPARSITY_THRESHOLD).
_PRUNED_BEFORE = 0.1
# Elements of work per CPU thread in the column loop. Each step touches at most rows x blocksize floats
# (73k for a 576-row layer); below this size OpenMP's fork/join costs more than the arithmetic, and on a
# shared machine an oversubscribed thread team made a step ~300x slower (12 ms vs 20 us, measured).
_ELEMENTS_PER_THREAD = 1 << 18


@dataclass(frozen=True)
class HessianFactor:
    """What SparseGPT derives from a layer Hessian alone: reusable by every layer with the same Hessian.

    In a decoder block q/k/v (and gate/up) see the same inputs, so their Hessians are equal and one
    factorisation serves them all (``SparseGPTPruner`` reuses it; the weights come out bit-identical).

    Attributes:
        upper: upper Cholesky factor ``U`` of ``(H + λI)⁻¹`` (fp32, ``[in, in]``).
        dead: inputs with ``H_jj = 0``, whose weight columns are zeroed.
    """

    upper: torch.Tensor
    dead: torch.Tensor


def factor_hessian(hessian: torch.Tensor, percdamp: float = 0.01, name: str = "layer") -> HessianFactor:
    """Steps 1–3 of SparseGPT on an ``[in, in]`` Hessian (not modified), with torch's current thread count.

    Example:
        >>> x = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
        >>> factor = factor_hessian(2 * x.T @ x / 64)
        >>> tuple(factor.upper.shape), bool(torch.equal(factor.upper, factor.upper.triu()))
        ((8, 8), True)
    """
    H = hessian.detach().to(dtype=torch.float32, copy=True)
    if not torch.isfinite(H).all():
        raise ValueError(
            f"{name}: the calibration Hessian holds inf/NaN (activations overflowed in the model dtype?)."
        )
    dead = H.diagonal() == 0
    if dead.any():
        # An input that never fires carries no information: its weights are free to remove.
        H[dead, dead] = 1.0
        logger.debug("%s: %d dead input features", name, int(dead.sum()))
    return HessianFactor(_inverse_cholesky_upper(H, percdamp, name), dead)


class FactorCache:
    """The last ``HessianFactor`` computed, handed out again for an equal Hessian.

    Reused only for a bit-identical Hessian on the same device, with the same ``percdamp`` and CPU
    thread count, so a layer gets exactly the factor it would have computed itself. The Hessian it was computed from
    is held by reference, not copied (a copy of a down projection's is as large as the Hessian itself: 485 MB in
    fp32 for an FFN of 11,008); one changed in place since is never taken for equal (its version counter moved).

    Example:
        >>> x = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
        >>> cache = FactorCache()
        >>> cache.get(2 * x.T @ x / 64, 0.01) is cache.get(2 * x.T @ x / 64, 0.01)
        True
    """

    def __init__(self) -> None:
        self._hessian: torch.Tensor | None = None
        self._version = -1
        self._key: tuple | None = None
        self._factor: HessianFactor | None = None

    def get(self, hessian: torch.Tensor, percdamp: float, name: str = "layer") -> HessianFactor:
        key = (percdamp, hessian.device, hessian.dtype, hessian.shape, torch.get_num_threads())
        held = self._hessian
        if held is not None and self._key == key and held._version == self._version and (
                held is hessian or torch.equal(held, hessian)):
            return self._factor  # type: ignore[return-value]
        factor = factor_hessian(hessian, percdamp, name)
        self._hessian, self._version, self._key, self._factor = hessian, hessian._version, key, factor
        return factor

    def clear(self) -> None:
        self._hessian, self._key, self._factor = None, None, None


def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: SparsityPattern | float | str,
    blocksize: int = 128,
    percdamp: float = 0.01,
    name: str = "layer",
    factors: FactorCache | None = None,
    keep_zeros: bool | None = None,
) -> torch.Tensor:
    """SparseGPT on one ``[out, in]`` weight with its ``[in, in]`` Hessian; returns the new fp32 weight.

    ``weight`` and ``hessian`` are not modified. For N:M, ``blocksize`` is rounded down to a multiple
    of M so that no group straddles two blocks (the N:M result does not otherwise depend on it).
    ``factors``: a ``FactorCache`` shared by consecutive calls, so layers with equal Hessians (q/k/v)
    factor it once; the result is bit-identical to calling without it. ``keep_zeros``: whether weights that
    are already exactly zero stay zero (they count among the pruned ones; more of them than the pattern prunes
    all stay). Otherwise the OBS updates of other columns bring some of them back, silently undoing an earlier
    prune. ``None`` (default): when at least 10% of the weight is zero, i.e. the layer was pruned before (a
    dense trained weight holds a few exact zeros, 0.03% in SmolLM2, which the reference algorithm updates).

    Example:
        >>> x = torch.randn(256, 8, generator=torch.Generator().manual_seed(0))
        >>> w = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
        >>> pruned = sparsegpt_prune(w, 2 * x.T @ x / 256, "2:4")
        >>> (pruned.reshape(3, 2, 4) != 0).sum(-1).tolist()
        [[2, 2], [2, 2], [2, 2]]
    """
    pattern = parse_sparsity(sparsity)
    rows, cols = weight.shape
    if hessian.shape != (cols, cols):
        raise ValueError(f"{name}: the Hessian has shape {list(hessian.shape)}, expected [{cols}, {cols}].")
    if pattern.is_n_m:
        m, n = pattern.group_size, pattern.kept_per_group
        if cols % m:  # type: ignore[operator]
            n_m_mask(weight[:1], n, m)  # type: ignore[arg-type]  # raises the explanatory error
        blocksize = max(m, blocksize // m * m)  # type: ignore[operator]
    if blocksize < 1:
        raise ValueError(f"blocksize must be positive, got {blocksize}.")

    W = weight.detach().to(dtype=torch.float32, copy=True)
    fixed = W == 0
    if keep_zeros is None:
        keep_zeros = int(fixed.sum()) >= _PRUNED_BEFORE * fixed.numel()
    # Threads sized to the work of one column step (rows x blocksize elements at most).
    with cpu_threads(rows * blocksize // _ELEMENTS_PER_THREAD, W.device):
        hessian = hessian.detach().to(W.device)
        if factors is None:
            factor = factor_hessian(hessian, percdamp, name)
        else:
            factor = factors.get(hessian, percdamp, name)
        if factor.dead.any():
            W[:, factor.dead] = 0.0
        if keep_zeros and fixed.any():  # pruned before: the masks are the union of both prunes
            _prune_columns(W, factor.upper, pattern, blocksize, fixed)
        else:
            _prune_columns(W, factor.upper, pattern, blocksize)
    return W


def _prune_columns(
    W: torch.Tensor, U: torch.Tensor, pattern: SparsityPattern, blocksize: int, fixed: torch.Tensor | None = None
) -> None:
    """The lazy-batch OBS sweep over the columns of ``W`` (in place).

    ``fixed``: entries pruned whatever their saliency (weights that were already zero), counted among the
    entries each group (N:M) or block (unstructured) prunes; more of them than the pattern prunes are all kept
    at zero.

    The column loop runs once per input feature, so it works on views made once per block (``unbind``)
    and writes each error straight into its column of ``errors``: fewer tensor calls per column, the
    very same arithmetic in the same order.
    """
    cols = W.shape[1]
    m, n = pattern.group_size, pattern.kept_per_group
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()  # updated column by column; pruned entries end at exactly zero
        U1 = U[i1:i2, i1:i2]
        d1 = U1.diagonal()
        errors = torch.zeros_like(W1)
        fixed1 = None if fixed is None else fixed[:, i1:i2]
        if pattern.is_n_m:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        else:
            mask1 = unstructured_mask(_saliency(W1, d1, fixed1), pattern.ratio, per_row=False)
            if fixed1 is not None:
                mask1 |= fixed1
        zero = W1.new_zeros(())
        columns, masks, column_errors, diagonal = W1.unbind(1), mask1.unbind(1), errors.unbind(1), d1.unbind()
        for i in range(i2 - i1):
            if pattern.is_n_m and i % m == 0:  # type: ignore[operator]
                group = slice(i, i + m)  # type: ignore[operator]
                fixed_group = None if fixed1 is None else fixed1[:, group]
                mask1[:, group] = n_m_mask(_saliency(W1[:, group], d1[group], fixed_group), n, m)  # type: ignore[arg-type]
                if fixed_group is not None:
                    mask1[:, group] |= fixed_group
            mask, err = masks[i], column_errors[i]
            # e = (w − q) / d with q = w except the pruned entries, which are zeroed.
            torch.div(torch.where(mask, columns[i], zero), diagonal[i], out=err)
            # OBS compensation of the rest of the block; column i itself becomes q exactly.
            W1[:, i:].addr_(err, U1[i, i:], alpha=-1.0)
            columns[i].masked_fill_(mask, 0.0)  # exact zeros, not rounding residue
        W[:, i1:i2] = W1
        if i2 < cols:  # lazy update of every column right of the block
            W[:, i2:].addmm_(errors, U[i1:i2, i2:], alpha=-1.0)


def _saliency(W1: torch.Tensor, d1: torch.Tensor, fixed: torch.Tensor | None) -> torch.Tensor:
    """``w² / d²``; already-pruned (``fixed``) entries score -1, below any weight, so they are selected first."""
    scores = (W1 / d1).pow(2)
    return scores if fixed is None else scores.masked_fill(fixed, -1.0)


@contextlib.contextmanager
def cpu_threads(threads: int, device: torch.device | None = None) -> Iterator[None]:
    """Cap torch's intra-op CPU threads at ``threads`` inside the block (restored afterwards).

    Nothing changes for a non-CPU ``device``. Meant for small element-wise work and the OBS column
    loop; matrix products keep the caller's thread count (their rounding may depend on it).

    Example:
        >>> with cpu_threads(1):
        ...     torch.get_num_threads()
        1
    """
    before = torch.get_num_threads()
    wanted = max(1, min(before, threads))
    if (device is not None and device.type != "cpu") or wanted == before:
        yield
        return
    torch.set_num_threads(wanted)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _inverse_cholesky_upper(H: torch.Tensor, percdamp: float, name: str) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + λI)⁻¹``; λ grows tenfold while that is not positive definite."""
    mean_diagonal = H.diagonal().mean()
    damp = percdamp
    for attempt in range(_MAX_DAMPING_RETRIES):
        damped = H.clone()
        damped.diagonal().add_(damp * mean_diagonal)
        lower, info = torch.linalg.cholesky_ex(damped)
        if info.item() == 0:
            inverse = torch.cholesky_inverse(lower)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if info.item() == 0 and torch.isfinite(upper).all():
                return upper
        if attempt + 1 < _MAX_DAMPING_RETRIES:
            logger.warning(
                "%s: the damped Hessian is not positive definite with percdamp=%g; retrying with percdamp=%g",
                name, damp, damp * 10,
            )
        damp *= 10
    raise RuntimeError(
        f"{name}: Cholesky factorisation of the Hessian failed even with percdamp={damp / 10:g}; the "
        "calibration inputs of this layer are degenerate (skip the layer or use more calibration data)."
    )
