"""RIA-style heuristic channel permutation and the kept-score objective every permutation is measured by.

RIA's channel reallocation (Zhang et al., ICLR 2024, ``--reallocation``) scores each input channel,
sorts the channels and deals them out so that every group of M consecutive channels mixes strong and
weak ones: N:M then rarely has to drop a strong weight because its neighbours are strong too. Here a
channel's score is the sum of its Wanda scores ``|W_ij| · ‖X_j‖₂`` (``|W_ij|`` without calibration)
over every pruned reader of the site, each reader normalised to total 1 so that a site shared by many
layers (the residual stream) weighs them equally.

The objective (``kept_score``) is the fraction of those scores an N:M mask in the permuted order
keeps, summed over readers. ``ria_permutation`` deals in the two classic orders (round robin and
serpentine) and keeps the best of them and the identity, so it never lowers the objective.

Example:
    >>> scores = [torch.tensor([[4.0, 3.0, 1.0, 0.0]]) / 8]  # one reader, one row; 1:2 keeps 1 of each pair
    >>> kept_score(scores, torch.arange(4), 1, 2)
    0.625
    >>> perm = ria_permutation(scores, 1, 2)
    >>> kept_score(scores, perm, 1, 2)
    0.875
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from .sites import PermutationSite

__all__ = ["kept_score", "ria_permutation", "site_scores"]


def site_scores(site: PermutationSite, input_norms: Mapping[str, torch.Tensor] | None) -> list[torch.Tensor]:
    """The Wanda scores ``[rows, site.width]`` of each pruned reader's permuted columns, each summing to 1.

    ``input_norms`` maps a reader's name to its ``‖X_j‖₂`` (all its input columns); ``None`` scores ``|W|``.
    """
    scores = []
    for reader in site.scored_readers:
        weight = reader.layer.weight.detach()[:, reader.start:reader.start + site.width].float().abs()
        if input_norms is not None:
            norms = input_norms[reader.name][reader.start:reader.start + site.width]
            weight = weight * norms.to(weight.device).float().unsqueeze(0)
        scores.append(weight / weight.sum().clamp_min(1e-30))
    return scores


def kept_score(scores: Sequence[torch.Tensor], perm: torch.Tensor, kept: int, group: int) -> float:
    """Score an N:M mask keeps when the columns are taken in ``perm`` order, summed over ``scores``."""
    total = 0.0
    for score in scores:
        permuted = score[:, perm.to(score.device)]
        total += float(permuted.reshape(score.shape[0], -1, group).topk(kept, dim=-1).values.sum())
    return total


def ria_permutation(scores: Sequence[torch.Tensor], kept: int, group: int) -> torch.Tensor:
    """The best of the identity and RIA's two dealing orders for N:M groups of ``group`` channels."""
    width = scores[0].shape[1] if scores else 0
    # A permutation is a small index: built on the CPU by design (kept_score moves it to each score's device).
    identity = torch.arange(width, device="cpu")
    if not scores or width % group:
        return identity
    importance = sum(score.sum(dim=0).cpu() for score in scores)
    ranked = torch.argsort(importance, descending=True, stable=True)  # channels, strongest first
    groups = width // group
    candidates = [identity]
    for serpentine in (False, True):
        tier = torch.arange(width, device="cpu") // groups  # rank r falls in tier r // groups, one channel per group per tier
        slot = torch.arange(width, device="cpu") % groups
        if serpentine:
            slot = torch.where(tier % 2 == 1, groups - 1 - slot, slot)
        position = slot * group + tier  # group `slot`, place `tier` inside it
        perm = torch.empty(width, dtype=torch.long, device="cpu")
        perm[position] = ranked
        candidates.append(perm)
    values = [kept_score(scores, candidate, kept, group) for candidate in candidates]
    return candidates[max(range(len(candidates)), key=lambda k: (values[k], -k))]
