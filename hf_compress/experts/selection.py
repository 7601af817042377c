"""ASSL data selection: keep the examples that cover the semantic space, drop the redundant ones.

Objective (default ``"facility_location"``): choose ``S`` with ``|S| = budget * n`` maximising
``F(S) = sum_i max_{j in S} sim(i, j)`` with ``sim = (1 + cos) / 2`` in the experts' embedding space. Every
example then has a close kept representative (coverage), and a near-duplicate of a kept example adds
almost nothing to ``F`` (redundancy is dropped). Dense regions get more representatives than sparse ones,
but sub-linearly in their size, which is what the SilverSight spec asks of its density-aware sampling
(its A-DBSCAN + ``|c|^0.5`` quota + farthest-point formula is unpublished; this objective has the same
effect with one rule and no density threshold to tune). ``F`` is monotone submodular, so the greedy
choice is within ``1 - 1/e`` of the optimum; it is computed lazily (Minoux): gains only shrink, so a
candidate whose refreshed gain still tops the heap is the greedy pick, and similarities are computed one
column at a time (memory ``O(n d)``, no ``n x n`` matrix).

The model's own training needs (the spec's second stage): with ``weights``, each example's term in ``F`` is
weighted, ``F(S) = sum_i w_i max_{j in S} sim(i, j)`` (still monotone submodular, same greedy).
``weights="loss"`` uses the base model's loss on each completion (:mod:`.need`): regions the model already
predicts well need fewer representatives, regions it gets wrong get more.

Baselines, same interface: ``"k_center"`` (greedy farthest point: minimises the worst distance but
spends the budget on outliers) and ``"random"`` (seeded uniform sample).
"""

from __future__ import annotations

import heapq
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..routing.layer import check_not_routed
from ..training import TrainingSettings, broadcast_from_main
from ..utils import check_choice, check_fraction, check_int, check_seed, get_logger
from .config import SELECTION_METHODS, WEIGHTINGS
from .data import instruction_rows
from .embedding import DEFAULT_EMBEDDING_TOKENS, EmbeddingSpace, EmbeddingSpec, check_given_embeddings, embed_texts
from .need import completion_losses


if TYPE_CHECKING:
    from transformers import TrainingArguments


__all__ = ["SELECTION_KEY", "SELECTION_METHODS", "WEIGHTINGS", "SelectionReport", "coverage", "kept_count",
           "select_data", "select_indices"]

logger = get_logger(__name__)

SELECTION_KEY = "hf_compress_selection"
"""Key under which the selection summary is stored, as JSON, in the subset's ``info.description``."""


@dataclass(frozen=True)
class SelectionReport:
    """What :func:`select_data` kept and how well it covers the pool.

    ``mean_distance`` / ``max_distance``: mean and worst cosine distance from a pool example to its
    nearest kept example (lower is better); ``random_mean_distance``: the same for a seeded random subset of
    the same size, measured on the same embeddings; ``weighting``: ``"loss"``, ``"given"`` (weights passed
    in) or ``None``.
    """

    method: str
    budget: float
    pool_size: int
    kept: int
    indices: list[int]
    mean_distance: float
    max_distance: float
    random_mean_distance: float
    embedding: dict[str, Any]
    weighting: str | None = None

    def summary(self) -> dict[str, Any]:
        """Everything but the indices (what a saved expert folder records)."""
        return {k: v for k, v in asdict(self).items() if k != "indices"}


def select_indices(embeddings: torch.Tensor, count: int, method: str = "facility_location", seed: int = 0,
                   weights: torch.Tensor | None = None) -> list[int]:
    """Indices (ascending) of ``count`` rows of unit-norm ``embeddings`` chosen by ``method``.

    ``weights`` (``facility_location`` only): one non-negative weight per row, how much covering that row
    is worth.

    Example:
        >>> x = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.01], [0.0, 1.0]]), dim=1)
        >>> select_indices(x, 2)  # one of the two near-twins (row 1 leans towards row 2), and row 2
        [1, 2]
        >>> select_indices(x, 1, weights=torch.tensor([0.0, 0.0, 1.0]))  # only row 2 is worth covering
        [2]
    """
    check_choice("method", method, SELECTION_METHODS)
    n = len(embeddings)
    check_int("count", count, minimum=1, maximum=n)
    check_seed("seed", seed, numpy=True)
    x = embeddings.float()
    if weights is not None:
        _check_weighted_method(method)
        weights = torch.as_tensor(weights, dtype=torch.float32, device=x.device).flatten()
        if weights.numel() != n or not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()):
            raise ValueError(f"weights must be {n} finite, non-negative numbers (one per example); got "
                             f"{weights.numel()} values, min {float(weights.min()) if weights.numel() else 'n/a'}.")
    if method == "random":
        chosen = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:count].tolist()
    elif method == "k_center":
        chosen = _k_center(x, count)
    else:
        chosen = _facility_location(x, count, weights)
    return sorted(int(i) for i in chosen)


def _check_weighted_method(method: str) -> None:
    if method != "facility_location":
        raise ValueError(f"weights apply to method='facility_location' only, not {method!r}; drop weights or use "
                         "that method.")


def _facility_location(x: torch.Tensor, count: int, weights: torch.Tensor | None = None) -> list[int]:
    n = len(x)
    w = torch.ones(n, device=x.device) if weights is None else weights
    best = torch.zeros(n, device=x.device)  # sim of each row to its nearest chosen row (0 before any choice: sim >= 0)
    # Gain of j on the empty set: sum_i w_i (1 + cos_ij) / 2, for all j at once.
    initial = (w.sum() + x @ (w @ x)) / 2
    heap = [(-float(g), j) for j, g in enumerate(initial.tolist())]
    heapq.heapify(heap)
    chosen: list[int] = []
    tolerance = 1e-9 * float(w.sum().clamp_min(1.0))
    while len(chosen) < count:
        _, j = heapq.heappop(heap)
        similarity = (1 + x @ x[j]) / 2
        gain = float((w * (similarity - best).clamp(min=0)).sum())
        if not heap or gain >= -heap[0][0] - tolerance:
            chosen.append(j)
            best = torch.maximum(best, similarity)
        else:
            heapq.heappush(heap, (-gain, j))
    return chosen


def _k_center(x: torch.Tensor, count: int) -> list[int]:
    # Start at the row nearest the mean direction (deterministic), then always add the farthest row.
    first = int((x @ x.mean(0)).argmax())
    chosen = [first]
    distance = 1 - x @ x[first]
    distance[first] = -float("inf")  # a chosen row is never chosen again, even once every distance is 0
    for _ in range(1, count):
        index = int(distance.argmax())
        chosen.append(index)
        distance = torch.minimum(distance, 1 - x @ x[index])
        distance[chosen] = -float("inf")
    return chosen


def coverage(embeddings: torch.Tensor, indices: Sequence[int], chunk: int = 4096) -> tuple[float, float]:
    """(mean, max) cosine distance from each row of ``embeddings`` to its nearest row in ``indices``.

    Example:
        >>> coverage(torch.eye(2), [0])
        (0.5, 1.0)
    """
    if len(indices) == 0:
        raise ValueError("coverage of an empty selection is undefined; select at least one example.")
    kept = embeddings[list(indices)].float()
    nearest = torch.cat([(embeddings[i : i + chunk].float() @ kept.T).max(1).values
                         for i in range(0, len(embeddings), chunk)])
    distance = (1 - nearest).clamp(min=0)
    return float(distance.mean()), float(distance.max())


def kept_count(pool_size: int, budget: float) -> int:
    """How many of ``pool_size`` examples a ``budget`` keeps: ``budget * pool_size`` rounded half up, at least 1.

    Example:
        >>> kept_count(20, 0.25), kept_count(3, 0.1), kept_count(25, 0.58), kept_count(10, 0.25)
        (5, 1, 15, 3)
    """
    # The epsilon absorbs binary rounding (0.58 * 25 is 14.4999...): a fraction typed in decimal rounds as written.
    return max(1, math.floor(budget * pool_size + 0.5 + 1e-9))


def select_data(
    dataset,
    model,
    budget: float | str = 0.2,
    *,
    tokenizer=None,
    method: str = "facility_location",
    seed: int = 0,
    embedding_layer: int | None = None,
    embedding_max_length: int = DEFAULT_EMBEDDING_TOKENS,
    batch_size: int = 16,
    embeddings: torch.Tensor | None = None,
    weights: torch.Tensor | str | None = None,
    return_report: bool = False,
    args: TrainingSettings | TrainingArguments | None = None,
):
    """Keep ``kept_count(n, budget)`` examples (``budget * n`` rounded half up) of ``dataset`` that cover its
    semantic space (ASSL selection).

    Args:
        dataset: ``datasets.Dataset`` (``prompt``/``completion`` or ``text`` columns), a list of such
            dicts, or a list of strings. The prompts are embedded.
        model: The base causal LM whose hidden states define the space (the one the experts will train on).
        budget: Fraction of the examples kept, in ``(0, 1]``: ``0.2`` or ``"20%"`` (at least one example is kept).
        tokenizer: The model's tokenizer; default ``AutoTokenizer.from_pretrained(model.name_or_path)``.
        method: ``"facility_location"`` (default, see the module docstring), ``"k_center"`` or ``"random"``.
        seed: Seed of the random baseline (the other methods are deterministic).
        embedding_layer, embedding_max_length: The embedding (see :class:`ExpertConfig`).
        batch_size: Prompts embedded per forward.
        embeddings: Raw pooled embeddings of the prompts (``embed_texts``), to reuse ones already computed.
        weights: ``"loss"``: weight each example's coverage by the base model's loss on its completion
            (:func:`~.need.completion_losses`, one forward per example), or one weight per example already
            computed; ``facility_location`` only. Default: every example counts the same.
        return_report: Also return the :class:`SelectionReport`.
        args: The run's ``TrainingSettings`` / ``TrainingArguments`` (those ``train_experts`` gets next). Under
            ``torchrun`` rank 0's subset is shared with the other ranks through the process group ``Trainer`` will
            use, started from these (a run training on the CPU needs a CPU group, not the default GPU one).

    Returns:
        The subset, same type as ``dataset`` and in its order; for a ``Dataset`` its ``info.description``
        holds the report's summary as JSON (so ``train_experts`` records it in the saved folder).

    Example:
        >>> from hf_compress.assets import tiny_model
        >>> model, tokenizer = tiny_model("llama")
        >>> texts = [f"example number {i}" for i in range(20)]
        >>> len(select_data(texts, model, budget=0.25, tokenizer=tokenizer))
        5
    """
    budget = check_fraction("budget", budget, low_open=True, high_open=False,
                            hint="It is the fraction of the examples to keep, e.g. 0.2 or '20%'.")
    check_not_routed(model, "select with the model it was routed from (the embedding pass pads on the right, which "
                            "routing refuses)")
    check_choice("method", method, SELECTION_METHODS)
    check_seed("seed", seed, numpy=True)
    if weights is not None:  # before the embedding and loss passes
        _check_weighted_method(method)
    if isinstance(weights, str):
        check_choice("weights", weights, WEIGHTINGS)
    rows = instruction_rows(dataset)
    n = len(rows)
    count = kept_count(n, budget)
    tokenizer = resolve_tokenizer(model, tokenizer)
    spec = EmbeddingSpec.for_model(model, embedding_layer, embedding_max_length)
    raw = (check_given_embeddings(embeddings, n) if embeddings is not None
           else embed_texts(model, tokenizer, rows.prompts, spec, batch_size=batch_size))
    embeddings = EmbeddingSpace.fit(raw)(raw)
    weighting = None
    if isinstance(weights, str):
        weighting, weights = weights, completion_losses(model, tokenizer, dataset, batch_size=batch_size)
    elif weights is not None:
        weighting = "given"
    indices = select_indices(embeddings, count, method, seed, weights=weights)
    mean_distance, max_distance = coverage(embeddings, indices)
    random_mean, _ = coverage(embeddings, select_indices(embeddings, count, "random", seed))
    report = SelectionReport(method, budget, n, count, indices, mean_distance, max_distance, random_mean,
                             spec.to_dict(), weighting)
    # Under torchrun every rank embedded and scored the pool itself (GPU kernels may differ in the last bits):
    # rank 0's subset on every rank, or the ranks would train on different data.
    report = broadcast_from_main(report, args)
    logger.info("kept %d of %d examples (%s%s): mean distance to nearest kept %.4f (random subset %.4f)",
                count, n, method, f", weighted by {weighting}" if weighting else "", report.mean_distance,
                report.random_mean_distance)
    subset = _subset(dataset, report.indices, report)
    return (subset, report) if return_report else subset


def _subset(dataset, indices: list[int], report: SelectionReport):
    from datasets import Dataset

    if isinstance(dataset, Dataset):
        subset = dataset.select(indices)
        subset.info.description = json.dumps({SELECTION_KEY: report.summary()})
        return subset
    return [dataset[i] for i in indices]


def selection_of(dataset) -> dict[str, Any] | None:
    """The selection summary :func:`select_data` stored on a ``Dataset`` subset, if any."""
    description = getattr(getattr(dataset, "info", None), "description", None)
    if not description or not description.startswith("{"):
        return None
    try:
        return json.loads(description).get(SELECTION_KEY)
    except (ValueError, AttributeError):
        return None


def resolve_tokenizer(model, tokenizer):
    """``tokenizer``, or the one saved with ``model`` (``AutoTokenizer.from_pretrained(model.name_or_path)``)."""
    if tokenizer is not None:
        return tokenizer
    name = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "name_or_path", None)
    try:
        from transformers import AutoTokenizer

        if not name:
            raise OSError("the model records no name_or_path")
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as err:
        raise ValueError(f"No tokenizer found for the model ({err}); pass tokenizer=... explicitly.") from None
