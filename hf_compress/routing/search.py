"""``search_schedule``: each block's share of the target token sparsity, by an evolutionary search.

The paper searches per-block sparsities with a genetic algorithm whose fitness is the static-router model's
WinoGrande accuracy (confirmed by reviews); its settings are unpublished. Ours (stated in the benchmark):

- **Fitness**: mean next-token loss of the static-router model on calibration windows (held apart from every
  evaluation set, so the search never tunes on a test set; a task's accuracy on a 135M model is too noisy).
- **Genes**: each block holds an integer number of sparsity *units*; the units always add up to
  ``round(token_sparsity · L / schedule_step)`` and one unit is ``token_sparsity · L / units`` (≈ ``schedule_step``),
  so every candidate's mean sparsity is exactly the target. A block holds at most ``max_block_sparsity``.
- **Operators**: budget-preserving mutation (move one or two units between two blocks, as Týr does), uniform
  crossover repaired back to the budget, truncation selection with elitism (the better half survives).
- **Start**: the uniform schedule plus mutations of it; the uniform schedule is always scored, so the search can
  only return a schedule at least as good on the calibration loss.
"""

from __future__ import annotations

import random
import time
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..modeling.layers import find_decoder_blocks
from ..utils import get_logger
from .config import TokenRouterConfig
from .layer import install_routing, remove_routing, routing_mode, routing_state
from .schedule import RoutingSchedule


__all__ = ["calibration_loss", "search_schedule", "static_router"]

logger = get_logger(__name__)


def static_router(model: nn.Module, schedule: RoutingSchedule) -> nn.Module:
    """Route ``model`` in place with the static positional rule and ``schedule``; returns the model.

    Example:
        >>> from hf_compress.assets import tiny_model
        >>> model = static_router(tiny_model("llama")[0], RoutingSchedule([0.2, 0.4]))
        >>> routing_state(model).mode
        'static'
    """
    install_routing(model, schedule, mode="static")
    return model


@torch.no_grad()
def calibration_loss(model: nn.Module, windows: torch.Tensor, batch_size: int = 4) -> float:
    """Mean next-token cross-entropy of ``model`` on ``windows`` (``[N, L]`` token ids)."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(windows), batch_size):
        batch = windows[start : start + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
        total += float(loss)
        count += batch[:, 1:].numel()
    return total / count


def search_schedule(
    model: nn.Module,
    calibration: Any,
    config: TokenRouterConfig | None = None,
    *,
    tokenizer: Any = None,
) -> RoutingSchedule:
    """Search per-block skip fractions averaging ``config.token_sparsity``, scored with the static router.

    Args:
        model: a decoder-only causal LM (left unchanged: routing is removed again unless it was installed before).
        calibration: token windows ``[N, L]`` (a tensor), or texts / a ``Dataset`` with ``tokenizer``.
        config: target sparsity and search settings.
        tokenizer: needed when ``calibration`` is text.

    Example:
        >>> from hf_compress.assets import tiny_model
        >>> model, tokenizer = tiny_model("llama")
        >>> schedule = search_schedule(model, torch.randint(3, 250, (2, 16)), TokenRouterConfig(0.25, generations=1))
        >>> round(schedule.mean_sparsity, 6)
        0.25
    """
    config = config or TokenRouterConfig()
    windows = _windows(calibration, tokenizer, config)
    _, blocks = find_decoder_blocks(model)
    num_blocks = len(blocks)
    target = config.token_sparsity
    units = round(target * num_blocks / config.schedule_step)
    if units == 0:
        return RoutingSchedule([target] * num_blocks, search={"method": "uniform", "reason": "budget below one step"})
    unit = target * num_blocks / units
    cap = min(units, int(config.max_block_sparsity / unit + 1e-9))
    if cap * num_blocks < units:
        raise ValueError(
            f"token_sparsity {target} needs more than max_block_sparsity {config.max_block_sparsity} in some block; "
            "raise max_block_sparsity."
        )
    rng = random.Random(config.seed)
    installed_here = routing_state(model) is None
    if installed_here:
        install_routing(model, RoutingSchedule.uniform(target, num_blocks), mode="static")
    was_training = model.training
    model.eval()
    scores: dict[tuple[int, ...], float] = {}

    def fitness(genes: tuple[int, ...]) -> float:
        if genes not in scores:
            schedule = RoutingSchedule([count * unit for count in genes])
            with routing_mode(model, "static", schedule):
                scores[genes] = calibration_loss(model, windows)
        return scores[genes]

    start = time.perf_counter()
    try:
        uniform = _spread(units, num_blocks)
        population = [uniform] + [_mutate(uniform, cap, rng) for _ in range(config.population - 1)]
        history = []
        for generation in tqdm(range(config.generations + 1), desc="schedule search", leave=False):
            population = sorted(set(population), key=fitness)[: config.population]
            history.append(fitness(population[0]))
            logger.info("generation %d: best calibration loss %.4f", generation, history[-1])
            if generation == config.generations:
                break
            parents = population[: max(2, len(population) // 2)]
            children = []
            while len(parents) + len(children) < config.population:
                mother, father = rng.sample(parents, 2)
                child = _repair(_crossover(mother, father, rng), units, cap, rng)
                children.append(_mutate(child, cap, rng))
            population = parents + children
        best = min(scores, key=scores.get)
    finally:
        if installed_here:
            remove_routing(model)
        model.train(was_training)
    return RoutingSchedule(
        [count * unit for count in best],
        search={
            "method": "evolutionary", "fitness": "static-router calibration loss", "best_loss": scores[best],
            "uniform_loss": scores[uniform], "evaluated": len(scores), "generations": config.generations,
            "population": config.population, "unit": unit, "history": history,
            "windows": list(windows.shape), "seconds": round(time.perf_counter() - start, 2),
        },
    )


def _windows(calibration: Any, tokenizer: Any, config: TokenRouterConfig) -> torch.Tensor:
    if isinstance(calibration, torch.Tensor):
        if calibration.dim() != 2 or calibration.shape[1] < 2:
            raise ValueError(f"calibration token windows must be [N, L] with L >= 2, got shape {tuple(calibration.shape)}.")
        return calibration[: config.search_windows]
    if tokenizer is None:
        raise ValueError("calibration is text: pass tokenizer= (or pass token windows as an [N, L] tensor).")
    from ..modeling.calibration import calibration_batches

    return calibration_batches(
        calibration, tokenizer, num_sequences=config.search_windows, seq_len=config.search_seq_len, seed=config.seed
    )


def _spread(units: int, blocks: int) -> tuple[int, ...]:
    """The budget spread as evenly as integers allow (the uniform schedule)."""
    return tuple(units // blocks + (1 if index < units % blocks else 0) for index in range(blocks))


def _mutate(genes: tuple[int, ...], cap: int, rng: random.Random) -> tuple[int, ...]:
    values = list(genes)
    for _ in range(rng.choice((1, 2))):
        donors = [i for i, v in enumerate(values) if v > 0]
        takers = [i for i, v in enumerate(values) if v < cap]
        if not donors or not takers:
            break
        donor, taker = rng.choice(donors), rng.choice(takers)
        if donor != taker:
            values[donor] -= 1
            values[taker] += 1
    return tuple(values)


def _crossover(mother: tuple[int, ...], father: tuple[int, ...], rng: random.Random) -> list[int]:
    return [m if rng.random() < 0.5 else f for m, f in zip(mother, father)]


def _repair(values: list[int], units: int, cap: int, rng: random.Random) -> tuple[int, ...]:
    """Add or remove single units at random blocks until the budget is met exactly."""
    while sum(values) > units:
        values[rng.choice([i for i, v in enumerate(values) if v > 0])] -= 1
    while sum(values) < units:
        values[rng.choice([i for i, v in enumerate(values) if v < cap])] += 1
    return tuple(values)
