"""Soft and hard matchings of a cost matrix: log-domain Sinkhorn (training) and Hungarian (export).

Convention everywhere in ``permutation/``: a permutation of ``n`` channels is an index vector ``p``
with ``p[j] = i`` when new position ``j`` holds old channel ``i``; its matrix is ``P[j, i] = 1``, so a
weight's input columns permute as ``W[:, p] = W Pᵀ`` and an activation as ``x[..., p] = x Pᵀ``. A cost
matrix ``C[j, i]`` is the cost of putting old channel ``i`` at position ``j``; the entropy-regularised
optimal transport ``min_P ⟨C, P⟩ + τ Σ P (log P − 1)`` over doubly stochastic ``P`` is
``Diag(u) exp(−C/τ) Diag(v)``, found by alternately normalising rows and columns in log space.

Example:
    >>> cost = torch.tensor([[[0.0, 5.0], [5.0, 0.0]]])
    >>> hungarian(cost).tolist()
    [[0, 1]]
    >>> soft = sinkhorn(cost, temperature=1.0, iterations=20)
    >>> torch.allclose(soft.sum(-1), torch.ones(1, 2), atol=1e-4)
    True
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["hungarian", "is_permutation", "permutation_matrix", "sinkhorn"]


def sinkhorn(cost: torch.Tensor, temperature: float, iterations: int = 5) -> torch.Tensor:
    """Doubly stochastic ``[B, n, n]`` matrices ``≈ argmin ⟨C, P⟩ − τ H(P)`` for ``[B, n, n]`` costs (fp32).

    Each iteration normalises rows, then columns, in log space (exact column sums, rows within the
    iteration's tolerance); a lower ``temperature`` gives sharper, more permutation-like matrices.
    """
    if cost.ndim != 3 or cost.shape[-1] != cost.shape[-2]:
        raise ValueError(f"sinkhorn expects [B, n, n] costs, got shape {list(cost.shape)}.")
    log_p = -cost.float() / temperature
    for _ in range(iterations):
        log_p = log_p - torch.logsumexp(log_p, dim=-1, keepdim=True)  # rows sum to 1
        log_p = log_p - torch.logsumexp(log_p, dim=-2, keepdim=True)  # columns sum to 1
    return log_p.exp()


def hungarian(cost: torch.Tensor) -> torch.Tensor:
    """The minimum-cost permutation of every ``[n, n]`` matrix of ``[B, n, n]`` costs: ``[B, n]`` indices ``p``.

    ``p[b, j] = i`` puts old channel ``i`` at position ``j`` (``scipy.optimize.linear_sum_assignment``).
    """
    from scipy.optimize import linear_sum_assignment

    if cost.ndim != 3 or cost.shape[-1] != cost.shape[-2]:
        raise ValueError(f"hungarian expects [B, n, n] costs, got shape {list(cost.shape)}.")
    matrices = cost.detach().double().cpu().numpy()
    rows = []
    for matrix in matrices:
        positions, channels = linear_sum_assignment(matrix)
        order = np.empty_like(channels)
        order[positions] = channels
        rows.append(torch.from_numpy(order))
    return torch.stack(rows).long()


def permutation_matrix(perm: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """One-hot ``[..., n, n]`` matrices ``P[j, p[j]] = 1`` of ``[..., n]`` index vectors."""
    return torch.nn.functional.one_hot(perm, perm.shape[-1]).to(dtype)


def is_permutation(perm: torch.Tensor) -> bool:
    """Whether a 1-D index vector holds every channel ``0..n-1`` exactly once."""
    perm = perm.reshape(-1)
    return bool(torch.equal(perm.sort().values, torch.arange(perm.numel(), device=perm.device)))
