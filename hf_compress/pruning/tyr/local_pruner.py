"""Týr's local pruner: remove whole input groups of one linear layer, then re-fit what is kept.

For a layer ``y = x Wᵀ`` with calibration Hessian ``H = Σ x xᵀ`` (any positive scale), work in the
input-major layout ``W ∈ R^{in × out}``. Groups of ``unit_size`` consecutive inputs (one attention
key/value-head group, or one FFN channel) are removed in ``update_rounds`` rounds; each round scores
every surviving group with the objective of the reference implementation,
``Σ W_g ⊙ (½ (H⁻¹_gg)⁻¹ W_g + G_g)`` with ``G = H W₀``, drops the lowest, and applies the OBS group
update to the survivors (and the matching downdate of ``H⁻¹``). Finally the kept inputs ``K`` are
re-fitted by least squares to the dense output, ``W_K = H_KK⁻¹ G_K``.

Example:
    >>> _ = torch.manual_seed(0)
    >>> x = torch.randn(256, 8)
    >>> weight = torch.randn(4, 8)
    >>> pruner = LocalPruner(weight, x.T @ x, unit_size=2)
    >>> result = pruner.prune(num_removed=2, update_rounds=1)
    >>> result.kept.tolist(), tuple(result.weight.shape)
    ([0, 3], (4, 4))
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...modeling.structure import unit_channels


__all__ = ["LocalPruneResult", "LocalPruner"]


@dataclass
class LocalPruneResult:
    """``kept``: sorted indices of the kept groups; ``weight``: ``[out, kept · unit_size]`` re-fitted weight;
    ``relative_error``: ``‖X(W − W₀)‖² / ‖X W₀‖²`` on the calibration inputs."""

    kept: torch.Tensor
    weight: torch.Tensor
    relative_error: float


class LocalPruner:
    """One layer's structural OBS pruner (Týr stage 1), reusable for every sparsity level.

    Args:
        weight: the dense weight ``[out_features, in_features]``.
        hessian: ``[in, in]`` sum (or mean) of ``x xᵀ`` over the calibration inputs.
        unit_size: inputs per removable group.
        damping: added to the diagonal, relative to its mean (1% in Týr).
    """

    def __init__(self, weight: torch.Tensor, hessian: torch.Tensor, unit_size: int, damping: float = 0.01) -> None:
        in_features = weight.shape[1]
        if hessian.shape != (in_features, in_features):
            raise ValueError(f"hessian shape {list(hessian.shape)} does not match {in_features} inputs.")
        if unit_size < 1 or in_features % unit_size:
            raise ValueError(f"{in_features} inputs do not split into groups of {unit_size}.")
        H = hessian.detach().float().clone()
        W = weight.detach().float().t().clone()
        dead = torch.diag(H) == 0
        W[dead] = 0  # inputs never active carry nothing
        H[dead, dead] = 1
        H += damping * torch.diag(H).mean() * torch.eye(in_features, dtype=H.dtype, device=H.device)
        self.unit_size = unit_size
        self.num_units = in_features // unit_size
        self.H = H
        self.W0 = W
        self.G = H @ W
        self.Hinv = torch.cholesky_inverse(torch.linalg.cholesky(H))
        self._dense_energy = float((W * self.G).sum())
        self._dtype = weight.dtype

    def prune(self, num_removed: int, update_rounds: int = 1) -> LocalPruneResult:
        """Remove ``num_removed`` groups in ``update_rounds`` rounds (at most one per group), then re-fit."""
        if not 0 <= num_removed < self.num_units:
            raise ValueError(f"can remove 0..{self.num_units - 1} of {self.num_units} groups, not {num_removed}.")
        size, units = self.unit_size, self.num_units
        removed = torch.zeros(units, dtype=torch.bool, device=self.W0.device)  # beside the statistics (CUDA too)
        if num_removed:
            W, Hinv = self.W0.clone(), self.Hinv.clone()
            rounds = max(min(update_rounds, num_removed), 1)
            per_round = [num_removed // rounds + (1 if r < num_removed % rounds else 0) for r in range(rounds)]
            for count in per_round:
                scores = self._scores(W, Hinv, removed)
                picked = torch.argsort(scores)[:count]
                index = unit_channels(picked, size)
                block_inv = _spd_inverse(Hinv[index][:, index])
                W -= Hinv[:, index] @ block_inv @ W[index]
                Hinv -= Hinv[:, index] @ block_inv @ Hinv[index]
                W[index] = 0
                Hinv[index] = 0
                Hinv[:, index] = 0
                removed[picked] = True
        kept = torch.nonzero(~removed).flatten()
        index = unit_channels(kept, size)
        refit = torch.linalg.solve(self.H[index][:, index], self.G[index])
        full = torch.zeros_like(self.W0)
        full[index] = refit
        delta = full - self.W0
        error = float((delta * (self.H @ delta)).sum()) / max(self._dense_energy, 1e-30)
        return LocalPruneResult(kept, refit.t().to(self._dtype).contiguous(), error)

    def _scores(self, W: torch.Tensor, Hinv: torch.Tensor, removed: torch.Tensor) -> torch.Tensor:
        size, units = self.unit_size, self.num_units
        if size == 1:
            inverse = 1.0 / torch.diag(Hinv).clamp_min(1e-12)
            objective = inverse[:, None] * W / 2 + self.G
        else:
            blocks = Hinv.reshape(units, size, units, size).diagonal(dim1=0, dim2=2).permute(2, 0, 1).contiguous()
            alive = ~removed
            inverse = torch.zeros_like(blocks)
            inverse[alive] = _spd_inverse(blocks[alive])
            grouped = W.reshape(units, size, -1)
            objective = (inverse @ grouped / 2).reshape_as(W) + self.G
        scores = (W * objective).reshape(units, size, -1).sum(dim=(1, 2))
        return scores.masked_fill(removed, float("inf"))



def _spd_inverse(matrix: torch.Tensor) -> torch.Tensor:
    """Inverse of symmetric positive-definite matrices (batched). Through Cholesky: batched ``linalg.inv``
    fails inside MKL's LU on some CPU builds (torch 2.13 wheel, 192×192 blocks)."""
    factor, info = torch.linalg.cholesky_ex(matrix)
    if bool((info == 0).all()):
        return torch.cholesky_inverse(factor)
    return torch.stack([torch.linalg.inv(m) for m in matrix.reshape(-1, *matrix.shape[-2:])]).reshape_as(matrix)
