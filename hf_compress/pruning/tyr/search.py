"""Týr stage 2: evolutionary search over per-layer sparsity levels under an exact global budget.

A candidate is one integer level per (block, unit type). A mutation moves one level step of units
from one layer to another layer *of the same type* (one goes a level denser, the other a level
sparser), ``min(U{1..max_flips}, U{1..max_flips})`` times, so every candidate removes exactly the
same number of parameters as its parent; no penalty term is needed.

Each generation makes ``offspring`` unique children of the parent and selects by successive halving:
stage *i* scores the remaining candidates on ``selection_tokens[i]`` tokens drawn afresh from the
search pool and keeps the best ``selection_survivors[i]``; the parent rejoins before the last stage
(elitism) and the best candidate of the last stage becomes the next parent.

Fitness is the *sparse KL*: the dense model's top-``kl_topk`` logits per token are computed once for
the pool; a candidate's logits are gathered at the same indices, both are log-softmaxed over those
``k`` entries and ``KL(teacher ‖ student)`` is averaged over tokens (lower is better). The candidate's
output layer is restricted to the union of the stage's teacher indices while it runs, which turns
the vocabulary projection (half of a small model's forward) into a fraction of it.

The search state (iteration, generation, parent, RNG) is written after every generation, so an
interrupted run resumes where it stopped.

Example:
    >>> import random
    >>> space = SearchSpace(bounds=[(-1, 1), (-1, 1), (0, 2), (-2, 0)], types=["a", "a", "f", "f"])
    >>> child = space.mutate([0, 0, 0, 0], random.Random(0), max_flips=4)
    >>> sum(child[:2]), sum(child[2:])  # each type's total is preserved
    (0, 0)
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ...modeling.layers import module_execution_device
from ...utils import atomic_file, atomic_path, get_logger, progress_bar

__all__ = ["SearchSpace", "SearchState", "SparseKLFitness", "evolutionary_search", "restricted_vocabulary"]

logger = get_logger(__name__)


@dataclass
class SearchSpace:
    """Level bounds of every searched layer and its unit type (mutations stay within a type)."""

    bounds: list[tuple[int, int]]
    types: list[str]

    def mutate(self, levels: Sequence[int], rng: random.Random, max_flips: int) -> list[int]:
        """A child of ``levels``: ``min(U{1..max_flips}, U{1..max_flips})`` budget-preserving moves."""
        child = list(levels)
        flips = min(rng.randint(1, max_flips), rng.randint(1, max_flips))
        for _ in range(flips):
            denser = [i for i, (low, _) in enumerate(self.bounds) if child[i] - 1 >= low]
            rng.shuffle(denser)
            for i in denser:
                sparser = [j for j, (_, high) in enumerate(self.bounds)
                           if j != i and self.types[j] == self.types[i] and child[j] + 1 <= high]
                if sparser:
                    j = rng.choice(sparser)
                    child[i] -= 1
                    child[j] += 1
                    break
        return child


@dataclass
class SearchState:
    """What is needed to resume: written as JSON after every generation."""

    iteration: int = 0
    generation: int = 0
    parent: list[int] = field(default_factory=list)
    parent_fitness: float | None = None
    centres: dict[str, list[int]] = field(default_factory=dict)
    rng: list[Any] | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    fingerprint: str = ""

    def save(self, path: str | os.PathLike) -> None:
        with atomic_file(path) as handle:
            json.dump(self.__dict__, handle)

    @classmethod
    def load(cls, path: str | os.PathLike) -> SearchState:
        return cls(**json.loads(Path(path).read_text(encoding="utf-8")))


def rng_state(rng: random.Random) -> list[Any]:
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def restore_rng(state: list[Any]) -> random.Random:
    rng = random.Random()
    rng.setstate((state[0], tuple(state[1]), state[2]))
    return rng


# --------------------------------------------------------------------------------------------------
# Fitness
# --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def restricted_vocabulary(model: nn.Module, indices: torch.Tensor) -> Iterator[None]:
    """Within the block, the model's output layer computes only the logits of ``indices`` (sorted).

    Works for any ``get_output_embeddings()`` that is an ``nn.Linear`` (tied or not): its weight (and
    bias) are swapped for the selected rows and put back afterwards. Element-wise post-processing of
    the logits (Gemma's soft-capping) still applies.
    """
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        raise TypeError(f"the sparse-KL fitness needs an nn.Linear output layer, got {type(head).__name__}.")
    weight, bias, out_features = head.weight, head.bias, head.out_features
    index = indices.to(weight.device)
    try:
        head.weight = nn.Parameter(weight.detach().index_select(0, index), requires_grad=False)
        if bias is not None:
            head.bias = nn.Parameter(bias.detach().index_select(0, index), requires_grad=False)
        head.out_features = int(index.numel())
        yield
    finally:
        head.weight, head.bias, head.out_features = weight, bias, out_features


class SparseKLFitness:
    """Sparse KL to the dense model's top-k logits over a fixed pool of token windows.

    Args:
        model: the dense model (the teacher, evaluated once here).
        pool: ``[num_sequences, seq_len]`` token ids.
        topk: teacher logits kept per token.
        batch_size: sequences per forward.
    """

    def __init__(self, model: nn.Module, pool: torch.Tensor, topk: int, batch_size: int = 8,
                 progress: bool = True) -> None:
        self.model = model
        self.pool = pool
        self.batch_size = batch_size
        values, indices = [], []
        device = _input_device(model)
        with torch.no_grad():
            for start in progress_bar(range(0, pool.shape[0], batch_size), desc="teacher top-k", leave=False,
                              disable=not progress):
                # top-k in the logits' own dtype: a float copy of a half-precision batch of full-vocabulary logits
                # would be twice their size, for the same top values
                logits = model(pool[start : start + batch_size].to(device), use_cache=False).logits
                top = logits.topk(min(topk, logits.shape[-1]), dim=-1)
                del logits
                values.append(top.values.cpu().to(torch.bfloat16))
                indices.append(top.indices.cpu().to(torch.int32))
        self.values = torch.cat(values)
        self.indices = torch.cat(indices)

    @classmethod
    def load(cls, path: str | os.PathLike, model: nn.Module, batch_size: int = 8) -> SparseKLFitness:
        """The fitness stored by ``save`` (pool and teacher top-k), scoring ``model``."""
        stored = load_file(path)
        fitness = cls.__new__(cls)
        fitness.model, fitness.batch_size, fitness.pool = model, batch_size, stored["pool"]
        fitness.values, fitness.indices = stored["values"], stored["indices"]
        return fitness

    def save(self, path: str | os.PathLike) -> None:
        """Store the pool and the teacher's top-k (atomically), so a resumed search needs no dense model."""
        path = Path(path)
        with atomic_path(path) as partial:
            save_file({"pool": self.pool.contiguous(), "values": self.values, "indices": self.indices}, partial)

    def sample(self, num_tokens: int, rng: random.Random) -> list[tuple[int, int]]:
        """``(sequence, length)`` pairs drawn without replacement, totalling exactly ``num_tokens``."""
        seq_len = self.pool.shape[1]
        count = math.ceil(num_tokens / seq_len)
        chosen = rng.sample(range(self.pool.shape[0]), count)
        last = num_tokens - (count - 1) * seq_len
        return [(index, seq_len if position < count - 1 else last) for position, index in enumerate(chosen)]

    @torch.no_grad()
    def __call__(self, sample: Sequence[tuple[int, int]]) -> float:
        """Mean sparse KL of the model, as it is now, over the sampled tokens."""
        device = _input_device(self.model)
        total, tokens = 0.0, 0
        groups: dict[int, list[int]] = {}
        for index, length in sample:
            groups.setdefault(length, []).append(index)
        for length, rows in groups.items():
            for start in range(0, len(rows), self.batch_size):
                batch = rows[start : start + self.batch_size]
                teacher_idx = self.indices[batch, :length].long()
                vocab, position = torch.unique(teacher_idx, return_inverse=True)
                with restricted_vocabulary(self.model, vocab):
                    logits = self.model(self.pool[batch, :length].to(device), use_cache=False).logits.float().cpu()
                student = logits.gather(-1, position)
                teacher = self.values[batch, :length].float()
                log_p = torch.log_softmax(teacher, dim=-1)
                log_q = torch.log_softmax(student, dim=-1)
                total += float((log_p.exp() * (log_p - log_q)).sum())
                tokens += teacher.shape[0] * teacher.shape[1]
        return total / tokens


def _input_device(model: nn.Module) -> torch.device:
    return module_execution_device(model.get_input_embeddings())  # accelerate-offloaded embeddings too


# --------------------------------------------------------------------------------------------------
# The search loop
# --------------------------------------------------------------------------------------------------


def evolutionary_search(
    space: SearchSpace,
    apply: Callable[[Sequence[int]], None],
    fitness: SparseKLFitness,
    state: SearchState,
    *,
    generations: int,
    offspring: int,
    selection_tokens: Sequence[int],
    selection_survivors: Sequence[int],
    max_flips: int,
    checkpoint: Callable[[SearchState], None],
    progress: bool = True,
) -> list[int]:
    """Run (or resume) the generations of one iteration; returns the best levels.

    ``apply(levels)`` loads a candidate into the model; ``state`` holds the parent and RNG and is passed
    to ``checkpoint`` after every generation.
    """
    rng = restore_rng(state.rng) if state.rng is not None else random.Random(0)
    parent = list(state.parent)
    bar = progress_bar(total=generations, initial=state.generation, desc=f"search (iteration {state.iteration + 1})",
               unit="gen", leave=False, disable=not progress)
    try:
        while state.generation < generations:
            children: dict[tuple[int, ...], None] = {}
            attempts = 0
            while len(children) < offspring and attempts < 50 * offspring:
                child = tuple(space.mutate(parent, rng, max_flips))
                attempts += 1
                if child != tuple(parent):
                    children[child] = None
            candidates = list(children)
            if not candidates:
                logger.warning("no layer can move a level: the search space is a single allocation")
                break
            scores: dict[tuple[int, ...], float] = {}
            for stage, num_tokens in enumerate(selection_tokens):
                if stage == len(selection_tokens) - 1 and tuple(parent) not in candidates:
                    candidates.append(tuple(parent))  # elitism: the parent competes in the last stage
                sample = fitness.sample(num_tokens, rng)
                scores = {}
                for candidate in candidates:
                    apply(candidate)
                    scores[candidate] = fitness(sample)
                candidates.sort(key=scores.__getitem__)
                if stage < len(selection_survivors):
                    candidates = candidates[: selection_survivors[stage]]
            best = candidates[0]
            improved = best != tuple(parent)
            parent = list(best)
            state.generation += 1
            state.parent = parent
            state.parent_fitness = scores[best]
            state.rng = rng_state(rng)
            state.history.append({"iteration": state.iteration, "generation": state.generation,
                                  "fitness": scores[best], "improved": improved})
            checkpoint(state)
            logger.info("iteration %d generation %d: sparse KL %.5f", state.iteration + 1, state.generation,
                        scores[best])
            bar.update()
            bar.set_postfix(kl=f"{scores[best]:.4f}")
    finally:
        bar.close()
    return parent
