"""Channel-swap refinement of a permutation: greedy exchanges of two channels between N:M groups.

Starting from a permutation (RIA's, in ``permutation="swap"``), each pass scores *every* exchange of two channels
that sit in different N:M groups and applies the best ones that touch disjoint groups, until no exchange raises
the kept score (``ria.kept_score``: the Wanda-metric score the N:M mask keeps) or the pass or time budget ends. It
is the channel-swap search of Pool & Yu (NeurIPS 2021, "Channel Permutations for N:M Sparsity") on the
Wanda metric, exact rather than sampled: the kept score never goes down, and every applied swap raises it.

Scoring all exchanges at once. In a row ``r``, let group ``A`` hold channel ``p``. Without ``p`` its other
``M − 1`` scores keep ``T_p[r]`` (their top-``N`` sum), and a newcomer with score ``x`` adds
``max(0, x − t_p[r])``, where ``t_p[r]`` is the ``N``-th largest of them. Swapping ``p`` (group ``A``) with
``q`` (group ``B``) therefore changes the kept score by

    base[p] + base[q] + H[p, q] + H[q, p],   base[p] = Σ_r T_p[r] − K_A[r],   H[p, q] = Σ_r max(0, S[r, q] − t_p[r])

(``K_A`` the group's current kept sum, ``S`` the scores in the current order), so one ``[C, C]`` matrix ``H``
(built in row chunks) scores all ``C²`` exchanges of a site. A site read by many layers (the residual stream:
every block's q/k/v/gate/up rows) has far more rows than a pass can afford, so ``H`` is built on a seeded
sample of at most ``max_rows`` rows to *propose* swaps; each proposed swap's gain is then computed exactly on
every row, and only swaps with an exact gain are applied (they touch disjoint groups, so their gains add). Such a
site's scores are never held whole: the sample and the exact gains are read reader by reader (``ria.SiteScores``).

Reusing ``H`` between passes. ``H[p, q]`` depends only on channel ``q``'s scores and on the group that holds
``p``, so after a pass only the rows of channels in the groups its swaps touched change. A site whose every row
proposes (no sample: an FFN's or a head's) keeps ``H`` by channel and rebuilds just those rows, built in the same
row chunks as the whole table; on SmolLM2's FFN sites the later passes touch a few groups of hundreds, and the
search gets several times faster. A sampled site draws new rows every pass, so it rebuilds ``H`` each time.

Run to convergence (the default: no deadline), the search is a deterministic function of the scores, so the
permutation, and every number measured with it, is the same on a fast machine and a slow one; a deadline makes it
depend on the machine's speed, and ``SwapSearch.converged`` says when that happened.

Example:
    >>> scores = [torch.tensor([[9.0, 8.0, 7.0, 1.0, 6.0, 5.0, 0.0, 2.0]])]  # 2:4 keeps 9 + 8 and 6 + 5, drops 7
    >>> search = swap_refine(scores, torch.arange(8), kept=2, group=4)
    >>> kept_score(scores, torch.arange(8), 2, 4), kept_score(scores, search.perm, 2, 4)  # 7 moved: 9+8 and 7+6
    (28.0, 30.0)
    >>> search.passes, search.converged  # one pass applied the swap, the second found nothing left to gain
    (2, True)
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import NamedTuple

import torch

from .ria import SiteScores, kept_score


__all__ = ["SwapSearch", "swap_refine"]

# Elements of the [rows, groups, C] temporaries H is built from, per chunk of rows (about 128 MB in float32).
_CHUNK_ELEMENTS = 32 * 2**20


class SwapSearch(NamedTuple):
    """What ``swap_refine`` found: the permutation, the passes it ran, and whether it stopped because no exchange
    was left to gain (``False``: the pass or time budget stopped it first)."""

    perm: torch.Tensor
    passes: int
    converged: bool


def swap_refine(
    scores: Sequence[torch.Tensor],
    perm: torch.Tensor,
    kept: int,
    group: int,
    *,
    max_passes: int = 100,
    max_rows: int = 8192,
    deadline: float | None = None,
) -> SwapSearch:
    """``perm`` improved by greedy channel exchanges between N:M groups (``kept`` of ``group``); never worse.

    ``scores``: the site's ``[rows, width]`` Wanda scores (a ``ria.SiteScores``, or tensors) in the original channel
    order;
    ``max_rows``: rows sampled to propose swaps (all rows judge them); ``deadline``: a ``time.perf_counter()``
    value after which no new pass starts (``None``: none, the result does not depend on the machine's speed).
    """
    if len(scores) == 0 or not 0 < kept < group:
        return SwapSearch(perm, 0, True)
    row_counts, width = _layout(scores)
    sampled = sum(row_counts) > max_rows
    # Every row proposes on a small site (an FFN's, a head's): hold its scores. A site read by many layers is read
    # reader by reader instead (see SiteScores), for the sample and for judging the proposals.
    matrix = None
    if not sampled:  # one device: a model split over GPUs by device_map has readers on several
        parts = [score.float() for score in scores]
        matrix = torch.cat([part.to(parts[0].device) for part in parts])
    if width % group or width // group < 2:
        return SwapSearch(perm, 0, True)
    initial = perm.to("cpu")
    perm = initial.clone()
    generator = torch.Generator(device="cpu").manual_seed(0)
    total = float(matrix.double().sum()) if matrix is not None else sum(float(score.double().sum()) for score in scores)
    floor = 1e-9 * total + 1e-12  # a clear gain, not float noise (the sum is order-free)
    table = None if sampled else _ChannelTable(group)  # a sample changes every pass: nothing to reuse
    passes, converged = 0, False
    while passes < max_passes:
        if deadline is not None and time.perf_counter() > deadline:
            break
        passes += 1
        if matrix is not None:
            ordered = matrix[:, perm.to(matrix.device)]
            swaps = _exact_gains([ordered], None, _best_disjoint_swaps(ordered, kept, group, table, perm), width,
                                 kept, group, floor)
        else:  # propose on a sample, judge on every row
            rows = torch.randperm(sum(row_counts), generator=generator, device="cpu")[:max_rows]
            sample = _sampled_rows(scores, row_counts, rows, perm)
            swaps = _exact_gains(scores, perm, _best_disjoint_swaps(sample, kept, group), width, kept, group, floor)
        if not swaps:
            converged = True
            break
        for p, q in swaps:
            perm[p], perm[q] = perm[q].clone(), perm[p].clone()
            if table is not None:
                table.touched(p, q)
    # Every swap's gain is exact in arithmetic; should float rounding have cost more than it won, keep the start.
    judged = [matrix] if matrix is not None else scores
    if kept_score(judged, perm, kept, group) < kept_score(judged, initial, kept, group):
        perm = initial
    return SwapSearch(perm, passes, converged)


def _layout(scores: Sequence[torch.Tensor]) -> tuple[list[int], int]:
    """Each reader's rows and the site's width, read without computing a ``SiteScores``'s scores."""
    if isinstance(scores, SiteScores):
        return scores.row_counts, scores.site.width
    return [score.shape[0] for score in scores], scores[0].shape[1]


def _sampled_rows(scores: Sequence[torch.Tensor], row_counts: list[int], rows: torch.Tensor,
                  perm: torch.Tensor) -> torch.Tensor:
    """``cat(scores)[rows][:, perm]``, gathered reader by reader (no reader's rows but the sampled ones are kept).

    The sample lives on the first reader's device; readers on other GPUs (a model split by ``device_map``) send theirs.
    """
    sample = None
    offset = 0
    for score, count in zip(scores, row_counts, strict=True):
        if sample is None:
            sample = torch.empty(rows.shape[0], perm.shape[0], dtype=torch.float32, device=score.device)
        hit = ((rows >= offset) & (rows < offset + count)).nonzero().squeeze(1)
        if hit.numel():
            picked = score.float().index_select(0, (rows[hit] - offset).to(score.device))[:, perm.to(score.device)]
            sample[hit.to(sample.device)] = picked.to(sample.device)
        offset += count
    assert sample is not None
    return sample


def _exact_gains(
    scores: Sequence[torch.Tensor], perm: torch.Tensor | None, swaps: list[tuple[int, int]], width: int, kept: int,
    group: int, floor: float,
) -> list[tuple[int, int]]:
    """The ``swaps`` (disjoint groups) whose kept-score gain over every row of ``scores`` exceeds ``floor``.

    ``scores`` are in the order ``perm`` (``None``: already in the current order); a swap moves only the columns of
    its two groups, so only those are read from each score.
    """
    if not swaps:
        return []
    # The swaps' column sets are small indices, built on the CPU and sent to each reader's device.
    members = torch.arange(width, device="cpu").view(-1, group)
    p = torch.tensor([a for a, _ in swaps], device="cpu")
    q = torch.tensor([b for _, b in swaps], device="cpu")
    before_a, before_b = members[p // group], members[q // group]  # [k, M] column positions
    after_a = torch.where(before_a == p.unsqueeze(1), q.unsqueeze(1), before_a)
    after_b = torch.where(before_b == q.unsqueeze(1), p.unsqueeze(1), before_b)
    # The positions' columns in each score: the scores are in the order perm.
    order = None if perm is None else perm.cpu()
    columns = [positions if order is None else order[positions] for positions in (after_a, after_b, before_a, before_b)]
    gain = torch.zeros(len(swaps), dtype=torch.float64, device="cpu")
    for score in scores:
        def kept_sum(index: torch.Tensor, score: torch.Tensor = score) -> torch.Tensor:  # [k]: Σ_r top-N per group
            values = score[:, index.reshape(-1).to(score.device)].float().view(score.shape[0], *index.shape)
            return values.topk(kept, dim=-1).values.sum(-1).double().sum(0).cpu()

        gained_a, gained_b, lost_a, lost_b = (kept_sum(index) for index in columns)
        gain += gained_a + gained_b - lost_a - lost_b
    return [swap for swap, value in zip(swaps, gain.tolist(), strict=True) if value > floor]


def _exceedance_table(ordered: torch.Tensor, is_kept: torch.Tensor, nth_kept: torch.Tensor,
                      next_one: torch.Tensor, groups: torch.Tensor | None = None) -> torch.Tensor:
    """``H[p, q] = Σ_r max(0, S[r, q] − t_p[r])`` as a ``[C, C]`` float64 table (``groups``: only their members' rows).

    ``t_p[r]`` takes one of two values per row and group: the group's (N+1)-th largest score if ``p`` is kept
    there, else its N-th largest. So ``H`` is built from ``[rows, groups, C]`` exceedances over those two
    thresholds (``M`` times fewer elements than ``[rows, C, C]``), mixed per member by its kept flags in one
    batched matrix product: ``H[p] = Σ_r over_nth[r, g] + Σ_r kept[r, p] · (over_next − over_nth)[r, g]``.
    With ``groups`` (indices of N:M groups) it returns ``[len(groups) · M, C]``: the rows of their members, in the
    same row chunks as the whole table, so a row is the same sum either way.
    """
    rows, width = ordered.shape
    step = max(1, _CHUNK_ELEMENTS // (is_kept.shape[1] * width))  # the whole table's chunks, whatever ``groups``
    if groups is not None:
        is_kept, nth_kept, next_one = is_kept[:, groups], nth_kept[:, groups], next_one[:, groups]
    groups_built, group = is_kept.shape[1:]
    table = torch.zeros(groups_built, group, width, dtype=torch.float64, device=ordered.device)
    for begin in range(0, rows, step):
        s = ordered[begin:begin + step].unsqueeze(1)  # [R, 1, C]
        over_nth = (s - nth_kept[begin:begin + step]).clamp_min_(0)  # [R, G, C]
        over_next = (s - next_one[begin:begin + step]).clamp_min_(0).sub_(over_nth)  # ≥ 0: next_one ≤ nth_kept
        kept = is_kept[begin:begin + step].to(ordered.dtype)  # [R, G, M]
        mixed = torch.bmm(kept.permute(1, 2, 0), over_next.permute(1, 0, 2))  # [G, M, C]
        table += (mixed + over_nth.sum(0).unsqueeze(1)).double()
    return table.view(groups_built * group, width)


class _ChannelTable:
    """``H`` kept by channel across the passes of a site that proposes on every row (see the module docstring).

    ``H[p, q]`` changes only when the group holding ``p`` changes, so after ``touched`` groups only their
    members' rows are rebuilt; ``positions`` returns the table in the current order.
    """

    def __init__(self, group: int) -> None:
        self.group = group
        self.by_channel: torch.Tensor | None = None
        self.stale: set[int] = set()  # groups whose members' rows are out of date

    def touched(self, p: int, q: int) -> None:
        """Positions ``p`` and ``q`` exchanged channels: both groups' thresholds changed."""
        self.stale.update((p // self.group, q // self.group))

    def positions(self, perm: torch.Tensor, ordered: torch.Tensor, is_kept: torch.Tensor, nth_kept: torch.Tensor,
                  next_one: torch.Tensor) -> torch.Tensor:
        """``H`` of ``ordered`` (the scores in the order ``perm``), rebuilding only the stale groups' rows."""
        perm = perm.to(ordered.device)
        inverse = perm.argsort()
        if self.by_channel is None:
            self.by_channel = _reindexed(_exceedance_table(ordered, is_kept, nth_kept, next_one), inverse)
        elif self.stale:
            groups = torch.tensor(sorted(self.stale), device=ordered.device)
            members = (groups.unsqueeze(1) * self.group + torch.arange(self.group, device=ordered.device)).reshape(-1)
            rows = _exceedance_table(ordered, is_kept, nth_kept, next_one, groups)
            self.by_channel[perm[members]] = rows[:, inverse]
        self.stale.clear()
        return _reindexed(self.by_channel, perm)


def _reindexed(table: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """``table[order][:, order]`` in one gather (one ``[C, C]`` copy, not two: C² float64 is large for wide FFNs)."""
    return table[order.unsqueeze(1), order.unsqueeze(0)]


def _best_disjoint_swaps(ordered: torch.Tensor, kept: int, group: int, table: _ChannelTable | None = None,
                         perm: torch.Tensor | None = None) -> list[tuple[int, int]]:
    """The exchanges of one greedy pass: best gain first, each N:M group in at most one, every gain > 0.

    ``table``/``perm``: ``H`` kept between passes (``ordered`` must then be every row, in the order ``perm``).
    """
    rows, width = ordered.shape
    groups = width // group
    grouped = ordered.view(rows, groups, group)
    values, order = grouped.sort(dim=-1, descending=True)
    current = values[..., :kept].sum(-1)  # K: [rows, groups]
    rank = order.argsort(dim=-1)  # rank of each member inside its group, per row
    is_kept = rank < kept
    nth_kept, next_one = values[..., kept - 1:kept], values[..., kept:kept + 1]
    # Without member p: the kept sum T_p and the N-th largest t_p of the other M - 1.
    without = torch.where(is_kept, current.unsqueeze(-1) - grouped + next_one, current.unsqueeze(-1))
    base = (without - current.unsqueeze(-1)).sum(0).reshape(width).double()
    if table is None:
        gain_table = _exceedance_table(ordered, is_kept, nth_kept, next_one)
    else:
        assert perm is not None
        gain_table = table.positions(perm, ordered, is_kept, nth_kept, next_one)
    gain = base.unsqueeze(1) + base.unsqueeze(0) + gain_table + gain_table.T
    member = torch.arange(width, device=ordered.device) // group
    # Each pair once (p < q), never two members of one group.
    gain.masked_fill_((member.unsqueeze(1) >= member.unsqueeze(0)), float("-inf"))
    # Only clear gains: a relative floor keeps float noise from swapping forever.
    floor = 1e-9 * float(current.sum().abs()) + 1e-12
    positive = int((gain > floor).sum())
    if positive == 0:
        return []
    best = torch.topk(gain.flatten(), min(positive, 4 * groups)).indices.cpu()
    used: set[int] = set()
    swaps = []
    for index in best.tolist():
        p, q = divmod(index, width)
        a, b = p // group, q // group
        if a in used or b in used:
            continue
        used.update((a, b))
        swaps.append((p, q))
    return swaps
