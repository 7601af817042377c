"""Pure tensor functions that turn importance scores into pruning masks, and check patterns.

Every mask here is a boolean tensor shaped like the scores with **True where the weight is pruned**
(set to zero). Scores and weights are ``[out_features, in_features]`` matrices (use
``hf_compress.modeling.weight_matrix``); N:M groups run along the input (last) dimension.

Ties are broken deterministically: among equal scores the one with the lower index (row-major for a
whole matrix) is pruned first, so the same scores always give the same mask.

Example:
    >>> scores = torch.tensor([[4.0, 1.0, 3.0, 2.0]])
    >>> n_m_mask(scores, 2, 4)  # keep the 2 largest of the group
    tensor([[False,  True, False,  True]])
    >>> unstructured_mask(scores, 0.25)
    tensor([[False,  True, False, False]])
"""

from __future__ import annotations

import math

import torch

from .config import SparsityPattern, parse_sparsity


__all__ = [
    "check_pattern",
    "expected_pruned_count",
    "n_m_mask",
    "pattern_mask",
    "pruned_count",
    "sparsity_of",
    "unstructured_mask",
]


def pruned_count(ratio: float, total: int) -> int:
    """``floor(ratio · total)``, robust to float noise (``0.29 · 100`` is 28.999…: 29, not 28).

    Example:
        >>> pruned_count(0.29, 100), pruned_count(0.5, 7)
        (29, 3)
    """
    exact = ratio * total
    nearest = round(exact)
    return nearest if abs(exact - nearest) <= 1e-9 * max(1.0, exact) else math.floor(exact)


def _lowest(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Indices (along the last dim) of the ``count`` lowest scores, ties to the lower index."""
    return torch.sort(scores, dim=-1, stable=True).indices[..., :count]


def unstructured_mask(scores: torch.Tensor, ratio: float, per_row: bool = False) -> torch.Tensor:
    """Prune the ``ratio`` fraction of lowest scores, per output row or over the whole matrix.

    Exactly ``floor(ratio · in_features)`` entries per row (``per_row=True``, Wanda) or
    ``floor(ratio · numel)`` entries of the matrix (``per_row=False``, magnitude) are pruned.

    Example:
        >>> scores = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
        >>> unstructured_mask(scores, 0.5).tolist(), unstructured_mask(scores, 0.5, per_row=True).tolist()
        ([[True, True], [False, False]], [[True, False], [True, False]])
    """
    if scores.ndim != 2:
        raise ValueError(f"scores must be an [out_features, in_features] matrix, got {list(scores.shape)}.")
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio must be in [0, 1), got {ratio}.")
    # A fresh contiguous mask: zeros_like would copy the strides of a transposed (Conv1D) view.
    mask = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    if per_row:
        count = pruned_count(ratio, scores.shape[1])
        if count:
            mask.scatter_(1, _lowest(scores, count), True)
    else:
        count = pruned_count(ratio, scores.numel())
        if count:
            mask.view(-1)[_lowest(scores.reshape(-1), count)] = True
    return mask


def n_m_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """N:M mask: in each row, every group of ``m`` consecutive input columns keeps its ``n`` highest scores.

    ``n`` is the number *kept* (at most ``n`` non-zeros per group, the hardware meaning of 2:4);
    ``m - n`` entries per group are pruned.

    Raises:
        ValueError: ``in_features`` is not a multiple of ``m`` (skip that layer with a ``skip``
            pattern), or not ``0 < n < m``.

    Example:
        >>> n_m_mask(torch.tensor([[0.1, 0.9, 0.5, 0.2, 7.0, 6.0, 5.0, 8.0]]), 2, 4).int().tolist()
        [[1, 0, 0, 1, 0, 1, 1, 0]]
    """
    if scores.ndim != 2:
        raise ValueError(f"scores must be an [out_features, in_features] matrix, got {list(scores.shape)}.")
    if not 0 < n < m:
        raise ValueError(f"N:M needs 0 < N < M, got {n}:{m}.")
    rows, cols = scores.shape
    if cols % m:
        raise ValueError(
            f"a layer with {cols} input features cannot hold {n}:{m} groups ({cols} is not a multiple of "
            f"{m}); leave it dense with a skip pattern (e.g. skip=['*<layer name>'])."
        )
    groups = scores.reshape(rows, cols // m, m)
    mask = torch.zeros(groups.shape, dtype=torch.bool, device=groups.device)
    mask.scatter_(2, _lowest(groups, m - n), True)
    return mask.reshape(rows, cols)


def pattern_mask(
    scores: torch.Tensor, pattern: SparsityPattern | float | str, per_row: bool = False
) -> torch.Tensor:
    """The mask of ``pattern``: ``n_m_mask`` for N:M, else ``unstructured_mask(scores, ratio, per_row)``.

    Example:
        >>> pattern_mask(torch.tensor([[1.0, 2.0, 3.0, 4.0]]), "2:4").tolist()
        [[True, True, False, False]]
    """
    pattern = parse_sparsity(pattern)
    if pattern.is_n_m:
        return n_m_mask(scores, pattern.kept_per_group, pattern.group_size)  # type: ignore[arg-type]
    return unstructured_mask(scores, pattern.ratio, per_row=per_row)


def sparsity_of(weight: torch.Tensor) -> float:
    """Fraction of exactly-zero entries.

    Example:
        >>> sparsity_of(torch.tensor([[0.0, 1.0], [0.0, 0.0]]))
        0.75
    """
    if weight.numel() == 0:
        return 0.0
    return float((weight == 0).sum().item()) / weight.numel()


def expected_pruned_count(
    shape: tuple[int, int] | torch.Size, pattern: SparsityPattern | float | str, per_row: bool = False
) -> int:
    """How many entries of an ``[out, in]`` matrix ``pattern_mask`` prunes.

    Example:
        >>> expected_pruned_count((3, 8), "2:4"), expected_pruned_count((3, 5), 0.5, per_row=True)
        (12, 6)
    """
    pattern = parse_sparsity(pattern)
    rows, cols = shape
    if pattern.is_n_m:
        return rows * (cols // pattern.group_size) * pattern.pruned_per_group  # type: ignore[operator]
    if per_row:
        return rows * pruned_count(pattern.ratio, cols)
    return pruned_count(pattern.ratio, rows * cols)


def check_pattern(
    weight: torch.Tensor, pattern: SparsityPattern | float | str, per_row: bool = False
) -> bool:
    """Whether an ``[out, in]`` weight satisfies ``pattern``.

    N:M: every group of M consecutive input weights of every row has at most N non-zeros.
    Unstructured: at least ``floor(ratio · in_features)`` zeros in every row (``per_row=True``) or
    ``floor(ratio · numel)`` zeros in the matrix.

    Example:
        >>> check_pattern(torch.tensor([[1.0, 0.0, 0.0, 2.0]]), "2:4"), check_pattern(torch.ones(1, 4), "2:4")
        (True, False)
    """
    pattern = parse_sparsity(pattern)
    if weight.ndim != 2:
        raise ValueError(f"weight must be an [out_features, in_features] matrix, got {list(weight.shape)}.")
    rows, cols = weight.shape
    nonzero = weight != 0
    if pattern.is_n_m:
        m = pattern.group_size
        if cols % m:  # type: ignore[operator]
            return False
        per_group = nonzero.reshape(rows, cols // m, m).sum(dim=-1)  # type: ignore[operator]
        return bool((per_group <= pattern.kept_per_group).all())
    zeros = (~nonzero).sum(dim=1)
    if per_row:
        return bool((zeros >= pruned_count(pattern.ratio, cols)).all())
    return int(zeros.sum()) >= pruned_count(pattern.ratio, rows * cols)
