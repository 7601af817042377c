"""``search_schedule``: each block's share of the target token sparsity, by an evolutionary search.

The paper searches per-block sparsities with a genetic algorithm whose fitness is the static-router model's
WinoGrande accuracy (confirmed by reviews); its settings are unpublished. Ours (stated in the benchmark):

- **Fitness**: mean next-token loss of the static-router model on the last ``loss_tail`` (0.25) of each calibration
  window, the whole window routed in one forward (calibration text is held apart from every evaluation set, so the
  search never tunes on a test set; a task's accuracy on a 135M model is too noisy). The tail is what a routed
  prompt serves (its continuation, like the paper's WinoGrande fitness scores an answer after its context); the
  loss of every token is dominated by the earliest ones, which the static rule never computes at the blocks that
  skip them (SmolLM2-135M, 30% uniform: ppl ≈ 1e46 on those tokens, 22 on the rest).
- **Genes**: each block holds an integer number of sparsity *units*; the units always add up to
  ``round(token_sparsity · L / schedule_step)`` and one unit is ``token_sparsity · L / units`` (≈ ``schedule_step``),
  so every candidate's mean sparsity is exactly the target. A block holds at most ``max_block_sparsity``.
- **Operators**: budget-preserving mutation (move one or two units between two blocks, as Týr does), uniform
  crossover repaired back to the budget, truncation selection with elitism (the better half survives).
- **Start**: the uniform schedule plus mutations of it; the exact uniform schedule is always scored, so the search can
  only return a schedule at least as good on the calibration loss.
"""

from __future__ import annotations

import random
import time
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from transformers import PreTrainedModel

from ..modeling.calibration import calibration_loss, check_token_ids
from ..modeling.layers import check_within_learned_positions, evaluation_mode, find_decoder_blocks
from ..training import TrainingSettings, broadcast_from_main
from ..utils import InvalidArgumentTypeError, get_logger, progress_bar
from .config import TokenRouterConfig
from .layer import install_routing, remove_routing, routing_mode, routing_state
from .schedule import RoutingSchedule


if TYPE_CHECKING:
    from transformers import TrainingArguments


__all__ = ["search_schedule", "static_router"]

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


def search_schedule(
    model: nn.Module,
    calibration: Any,
    config: TokenRouterConfig | None = None,
    *,
    tokenizer: Any = None,
    progress: bool = True,
    args: TrainingSettings | TrainingArguments | None = None,
) -> RoutingSchedule:
    """Search per-block skip fractions averaging ``config.token_sparsity``, scored with the static router.

    Args:
        model: a decoder-only causal LM (left unchanged: routing is removed again unless it was installed before).
        calibration: token windows ``[N, L]`` (a tensor), or texts / a ``Dataset`` with ``tokenizer``.
        config: target sparsity and search settings.
        tokenizer: needed when ``calibration`` is text.
        progress: show a progress bar over the generations.
        args: the run's ``TrainingSettings`` / ``TrainingArguments`` (those router training gets next). Under
            ``torchrun`` rank 0's schedule is shared with the other ranks through the process group ``Trainer`` will
            use, started from these (a run training on the CPU needs a CPU group, not the default GPU one).

    Example:
        >>> from hf_compress.assets import tiny_model
        >>> model, tokenizer = tiny_model("llama")
        >>> schedule = search_schedule(model, torch.randint(3, 250, (2, 16)), TokenRouterConfig(0.25, generations=1))
        >>> round(schedule.mean_sparsity, 6)
        0.25
    """
    if not isinstance(model, PreTrainedModel):
        raise InvalidArgumentTypeError(f"model must be a transformers causal LM (PreTrainedModel), got "
                                       f"{type(model).__name__}; load it first (hf_compress.assets.load_model).")
    config = config if config is not None else TokenRouterConfig()
    if not isinstance(config, TokenRouterConfig):
        raise InvalidArgumentTypeError(f"config must be a TokenRouterConfig, e.g. TokenRouterConfig(token_sparsity=0.3), "
                                       f"got {type(config).__name__}.")
    if not isinstance(calibration, torch.Tensor):  # refused before the text is tokenized
        check_within_learned_positions(model, config.search_seq_len, "search_seq_len is", "search_seq_len")
    windows = _windows(model, calibration, tokenizer, config)
    check_within_learned_positions(model, windows.shape[1], "the calibration windows have", "[N, L] windows with L")
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
    scores: dict[tuple[int, ...], float] = {}

    def fitness(genes: tuple[int, ...]) -> float:
        if genes not in scores:
            schedule = RoutingSchedule(_rates(genes, unit))
            with routing_mode(model, "static", schedule):
                scores[genes] = calibration_loss(model, windows, tail=config.loss_tail)
        return scores[genes]

    start = time.perf_counter()
    try:
        with evaluation_mode(model):
            uniform = _spread(units, num_blocks)
            population = [uniform] + [_mutate(uniform, cap, rng) for _ in range(config.population - 1)]
            history = []
            for generation in progress_bar(range(config.generations + 1), desc="schedule search", leave=False,
                                   disable=not progress):
                population = sorted(set(population), key=fitness)[: config.population]
                history.append(fitness(population[0]))
                logger.info("generation %d: best calibration loss %.4f", generation, history[-1])
                if generation == config.generations:
                    break
                parents = population[: max(2, len(population) // 2)]
                if len(parents) < 2:  # one distinct candidate (a single block: the budget fixes its schedule)
                    break
                children = []
                while len(parents) + len(children) < config.population:
                    mother, father = rng.sample(parents, 2)
                    child = _repair(_crossover(mother, father, rng), units, cap, rng)
                    children.append(_mutate(child, cap, rng))
                population = parents + children
            best = min(scores, key=scores.get)
            # The exact uniform schedule (every block r = target) need not be a whole number of units (0.22 is
            # 4.4 per block); it is scored too and wins ties: with the static rule a uniform schedule leaves no
            # token that is computed at some blocks and not others (such a token writes keys from a stale state at
            # the blocks that compute it); on SmolLM2 that costs a lot (a development check at 0.22: tail ppl
            # about 27 for a 0.20/0.25 mix vs 16 uniform; docs/architecture.md).
            with routing_mode(model, "static", RoutingSchedule.uniform(target, num_blocks)):
                uniform_loss = calibration_loss(model, windows, tail=config.loss_tail)
    finally:
        if installed_here:
            remove_routing(model)
    exact_uniform = uniform_loss <= scores[best]
    # Under torchrun every rank searched with its own losses (GPU kernels may differ in the last bits): rank 0's
    # schedule on every rank, or the ranks would train routers for different schedules.
    return broadcast_from_main(RoutingSchedule(
        [target] * num_blocks if exact_uniform else _rates(best, unit),
        search={
            "method": "evolutionary", "fitness": f"static-router calibration loss, last {config.loss_tail:g} of each window",
            "best_loss": min(uniform_loss, scores[best]), "uniform_loss": uniform_loss, "exact_uniform": exact_uniform,
            "evaluated": len(scores) + 1, "generations": config.generations,
            "population": config.population, "unit": round(unit, 12), "history": history,
            "windows": list(windows.shape), "seconds": round(time.perf_counter() - start, 2),
        },
    ), args)


def _rates(counts: tuple[int, ...], unit: float) -> list[float]:
    """Each block's skip rate, ``count`` units, rounded to 12 digits: the schedule then reads as decimals (0.15, not
    0.15000000000000002) in config.json and the card, and a rate is the decimal it prints as (``skip_count`` rounds
    half up on it); the budget stays exact to 1e-12."""
    return [round(count * unit, 12) for count in counts]


def _windows(model: nn.Module, calibration: Any, tokenizer: Any, config: TokenRouterConfig) -> torch.Tensor:
    if isinstance(calibration, torch.Tensor):
        check_token_ids(model, calibration, "calibration token windows", min_length=2)
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
