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

__all__ = ["SiteScores", "kept_score", "ria_permutation"]


class SiteScores(Sequence[torch.Tensor]):
    """A site's Wanda scores, one ``[rows, site.width]`` tensor per pruned reader (each summing to 1), read on demand.

    Held all at once, the scores are an fp32 copy of every pruned weight, and the residual stream's site alone is read
    by every block's q/k/v/gate/up: memory that grows with the model. Read one reader at a time, a pass over them
    holds one reader's scores. They are the scores of the weights as they are when read, so read them before the
    permutation is absorbed (``absorb.py``), or with ``input_norms`` permuted alike (``step._permuted_norms``).

    ``input_norms`` maps a reader's name to its ``‖X_j‖₂`` (all its input columns); ``None`` scores ``|W|``.

    Example:
        >>> from hf_compress.assets import load_model
        >>> from hf_compress.pruning.permutation import find_sites
        >>> site = find_sites(load_model("tiny-llama", with_tokenizer=False)[0])[0]
        >>> scores = SiteScores(site, None)
        >>> len(scores) == len(site.scored_readers), sum(scores.row_counts) == sum(score.shape[0] for score in scores)
        (True, True)
        >>> round(float(scores[0].sum()), 4)
        1.0
    """

    def __init__(self, site: PermutationSite, input_norms: Mapping[str, torch.Tensor] | None) -> None:
        self.site = site
        self.input_norms = input_norms

    def __len__(self) -> int:
        return len(self.site.scored_readers)

    def __getitem__(self, index: int) -> torch.Tensor:  # type: ignore[override]  # no slices: one reader at a time
        reader = self.site.scored_readers[index]
        width = self.site.width
        weight = reader.layer.weight.detach()[:, reader.start:reader.start + width].float().abs()
        if self.input_norms is not None:
            norms = self.input_norms[reader.name][reader.start:reader.start + width]
            weight = weight * norms.to(weight.device).float().unsqueeze(0)
        return weight / weight.sum().clamp_min(1e-30)

    @property
    def row_counts(self) -> list[int]:
        """Rows of each reader's scores (its output features), without computing them."""
        return [reader.layer.weight.shape[0] for reader in self.site.scored_readers]


def kept_score(scores: Sequence[torch.Tensor], perm: torch.Tensor, kept: int, group: int) -> float:
    """Score an N:M mask keeps when the columns are taken in ``perm`` order, summed over ``scores``."""
    total = 0.0
    for score in scores:
        permuted = score[:, perm.to(score.device)]
        total += float(permuted.reshape(score.shape[0], -1, group).topk(kept, dim=-1).values.sum())
    return total


def ria_permutation(scores: Sequence[torch.Tensor], kept: int, group: int) -> torch.Tensor:
    """The best of the identity and RIA's two dealing orders for N:M groups of ``group`` channels.

    ``scores`` are read once for the channels' importance and once per candidate (a :class:`SiteScores` is never held
    whole).
    """
    importance = None
    for score in scores:
        column_sums = score.sum(dim=0).cpu()
        importance = column_sums if importance is None else importance + column_sums
    width = 0 if importance is None else importance.shape[0]
    # A permutation is a small index: built on the CPU by design (kept_score moves it to each score's device).
    identity = torch.arange(width, device="cpu")
    if importance is None or width % group:
        return identity
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
