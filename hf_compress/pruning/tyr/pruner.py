"""``TyrPruner``: Týr-the-Pruner end to end, exported as a physically smaller model.

1. Plan the budget: the parameters to remove (``target_sparsity`` of the decoder blocks), split into
   attention groups and FFN channels, spread evenly (the centre allocation, also the ``uniform``
   baseline).
2. For each coarse-to-fine iteration: build the supernet around the current centres
   (``supernet.build_supernet``), search the levels (``search.evolutionary_search``), re-centre, halve the
   step.
3. Slice every block to its final allocation, with the local pruner's re-fitted output projections
   (``modeling.structure.shrink_block``), and save it in the slim format.

Everything a long run needs to resume lives in ``work_dir`` (dense output projections, teacher top-k,
supernet block folders, the search state after every generation).

Example:
    >>> from hf_compress.pruning import TyrConfig, TyrPruner
    >>> pruner = TyrPruner.from_pretrained("tiny-llama")
    >>> config = TyrConfig(target_sparsity=0.3, num_iterations=1, generations=1, offspring=2, min_ffn_step=8,
    ...                    selection_tokens=(32,), selection_survivors=(), num_calibration_sequences=4,
    ...                    calibration_seq_len=32, num_search_sequences=2)
    >>> model = pruner.prune(config, ["some calibration text " * 50], progress=False)
    >>> round(pruner.report.achieved_sparsity, 2)
    0.3
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from torch import nn

from ...formats.shards import TensorSpec, write_safetensors
from ...modeling import calibration_batches, find_decoder_blocks
from ...modeling.layers import check_not_offloaded
from ...modeling.structure import (
    BlockStructure,
    block_structure,
    check_units_removable,
    decoder_parameter_count,
    shrink_block,
)
from ...utils import atomic_path, check_path, file_lock, folders_overlap, get_logger, is_main_process
from ..config import PruningConfig
from ..structural import StructuralPruner
from .config import TyrConfig
from .search import SearchSpace, SearchState, SparseKLFitness, evolutionary_search, rng_state
from .supernet import UNIT_TYPES, LevelGrid, Supernet, build_supernet, zero_filled


if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


__all__ = ["BudgetPlan", "TyrPruner"]

logger = get_logger(__name__)

STATE_FILE = "search_state.json"


@dataclass
class BudgetPlan:
    """The centre allocation: units removed per layer and type, with their parameter cost.

    Attention removes ``round(target · all groups)`` groups, then FFN channels make up the rest of the
    parameter budget (to within one channel, or one ``channel_multiple``); both are spread as evenly as integers
    allow.
    """

    centres: dict[str, list[int]]
    max_removable: dict[str, list[int]]
    unit_parameters: dict[str, int]
    num_units: dict[str, int]

    @classmethod
    def from_target(
        cls, structures: Sequence[BlockStructure], decoder_parameters: int, target: float, channel_multiple: int = 1,
    ) -> BudgetPlan:
        layers = len(structures)
        num_units = {"attention": structures[0].attention.num_units, "ffn": structures[0].ffn.num_units}
        unit_parameters = {"attention": structures[0].attention.unit_parameters(),
                           "ffn": structures[0].ffn.unit_parameters()}
        for index, structure in enumerate(structures):
            found = {"attention": structure.attention.num_units, "ffn": structure.ffn.num_units}
            if found != num_units:
                raise ValueError(
                    f"block {index} has {found} units, block 0 has {num_units}: Týr's level steps need blocks of "
                    "equal widths (prune a model that has not been structurally pruned already)."
                )
        multiple = channel_multiple
        if num_units["ffn"] % multiple:
            raise ValueError(
                f"channel_multiple={multiple} does not divide the FFN width {num_units['ffn']}: the kept widths could "
                "not all be multiples of it; pick a divisor of the FFN width (e.g. 4 or 8)."
            )
        # FFN channels are planned in chunks of `multiple` channels, so every centre and level is a multiple of it.
        max_removable = {"attention": [num_units["attention"] - 1] * layers,
                         "ffn": [num_units["ffn"] - multiple] * layers}
        goal = round(target * decoder_parameters)
        attention = min(round(target * layers * num_units["attention"]), sum(max_removable["attention"]))
        rest = goal - attention * unit_parameters["attention"]
        ffn = round(rest / (unit_parameters["ffn"] * multiple))
        if not 0 <= ffn * multiple <= sum(max_removable["ffn"]):
            raise ValueError(
                f"target_sparsity {target} cannot be reached by removing attention groups and FFN channels while "
                "every layer keeps at least one of each; choose a smaller target."
            )
        ffn_centres = [chunks * multiple for chunks in _spread(ffn, layers)]
        return cls({"attention": _spread(attention, layers), "ffn": ffn_centres}, max_removable, unit_parameters,
                   num_units)

    def removed_parameters(self, removed: dict[str, Sequence[int]]) -> int:
        return sum(sum(removed[t]) * self.unit_parameters[t] for t in UNIT_TYPES)


@dataclass
class _Evidence:
    """What Týr's calibration stage hands the search: windows, pool, resumable state, teacher."""

    calibration_ids: torch.Tensor
    pool: torch.Tensor
    state: SearchState
    state_path: Path
    fitness: SparseKLFitness | None = None
    seconds: dict[str, float] = field(default_factory=dict)


@dataclass
class _Decision:
    """The chosen level per (layer, unit type) and the supernet that holds each level's weights."""

    structures: list[BlockStructure]
    supernet: Supernet
    levels: list[int]
    history: list[dict[str, Any]]
    seconds: dict[str, float]
    centres: dict[str, list[int]]


def _spread(total: int, layers: int) -> list[int]:
    """``total`` split into ``layers`` integers differing by at most one, extras spread out."""
    return [(index + 1) * total // layers - index * total // layers for index in range(layers)]


class TyrPruner(StructuralPruner):
    """Týr-the-Pruner (``TyrConfig``): global structural pruning by supernet and search.

    ``prune`` returns the model sliced in place (smaller ``nn.Linear`` layers, per-layer widths on its
    config) and, with ``save_dir``, saves it so that ``AutoModelForCausalLM.from_pretrained`` (after
    ``import hf_compress``) rebuilds it. ``pruner.report`` is a ``StructuredPruningReport``.

    Example:
        >>> pruner = TyrPruner.from_pretrained("smollm2-135m")  # doctest: +SKIP
        >>> pruner.prune(TyrConfig(target_sparsity=0.3), load_text("wikipedia", "calibration"),
        ...              save_dir="smollm2-tyr-30", work_dir="tyr-work")  # doctest: +SKIP
    """

    config_class = TyrConfig

    def prune(
        self,
        config: PruningConfig | float | str | None = None,
        calibration_dataset: str | Sequence[str] | Dataset | torch.Tensor | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        save_dir: str | os.PathLike | None = None,
        overwrite: bool = False,
        progress: bool = True,
        work_dir: str | os.PathLike | None = None,
    ) -> PreTrainedModel:
        """Prune to ``config.target_sparsity`` of the decoder parameters; returns the smaller model.

        Args:
            config: a ``TyrConfig`` (or just a target fraction).
            calibration_dataset: calibration text (or ``[n, seq_len]`` token ids, used for both the Hessians
                and the search pool).
            tokenizer: overrides the pruner's tokenizer.
            save_dir: where to save the slim checkpoint, tokenizer and model card.
            overwrite: replace a model already in ``save_dir``.
            progress: progress bars over blocks, levels and generations.
            work_dir: where the supernet and the search state live. A run given the ``work_dir`` of an
                interrupted run with the same config and model resumes it; without one, a temporary
                folder is used and removed at the end.

        Raises:
            ValueError: the architecture has no separable heads/channels (GPT-2's fused ``c_attn``),
                blocks of unequal widths, an unreachable target, missing calibration data, or a
                ``work_dir`` holding another run's state.
        """
        # The search pool is a second draw from the calibration text, and the work folder spans the stages.
        check_path("work_dir", work_dir, allow_none=True)
        _check_work_dir(work_dir, save_dir)
        self._calibration_dataset = calibration_dataset
        # Under torchrun every rank searches alike and rank 0 saves: the others keep their state in a folder of their
        # own (one shared work_dir would be locked by one rank, and written by two).
        temporary = work_dir is None or not is_main_process()
        self._work = Path(tempfile.mkdtemp(prefix="tyr-")) if temporary else Path(work_dir)
        try:
            # One run per work folder at a time: a second one sharing it would overwrite the first's files.
            busy = f"work_dir {self._work} is in use by another Týr run; wait for it to finish or pass another work_dir."
            with file_lock(self._work / ".tyr.lock", timeout=0, busy_message=busy):
                return super().prune(config, calibration_dataset, tokenizer, save_dir, overwrite, progress)
        finally:
            if temporary:
                shutil.rmtree(self._work, ignore_errors=True)
            self._calibration_dataset = None

    @classmethod
    def add_cli_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--work-dir", default=None,
                            help="keep the supernet and search state here; rerun with it to resume")

    @classmethod
    def prune_kwargs_from_cli(cls, args: argparse.Namespace) -> dict[str, Any]:
        return {"work_dir": args.work_dir}

    # ---------------------------------------------------------------------------------------- stages

    def plan(self, config: TyrConfig) -> tuple[list[BlockStructure], BudgetPlan]:
        """The blocks' structures and the centre allocation (refuses fused attention, unequal blocks, an
        unreachable target)."""
        _, blocks = find_decoder_blocks(self.model)
        try:
            structures = [block_structure(block) for block in blocks]
        except ValueError as error:
            raise ValueError(f"Týr removes key/value-head groups and FFN channels: {error} Remove whole blocks "
                             "instead (BlockRemovalPruner, SLEBPruner), or prune inside the layers (WandaPruner, "
                             "SparseGPTPruner).") from None
        check_not_offloaded(self.model, "Týr's search")
        check_units_removable(self.model, structures)
        return structures, BudgetPlan.from_target(structures, decoder_parameter_count(self.model), config.target_sparsity,
                                                  config.channel_multiple)

    def calibrate(self, config: TyrConfig, plan: tuple[list[BlockStructure], BudgetPlan],
                  calibration_ids: torch.Tensor | None, progress: bool) -> _Evidence:
        """The search pool, the resumable search state, the dense output projections and the teacher."""
        structures, budget = plan
        dataset = self._calibration_dataset
        pool = calibration_ids if torch.is_tensor(dataset) else calibration_batches(
            dataset, self.tokenizer, num_sequences=config.num_search_sequences,
            seq_len=config.calibration_seq_len, seed=config.search_seed + 1_000_003,
        )
        if config.allocation == "search" and pool.numel() < config.selection_tokens[-1]:
            raise ValueError(
                f"the search pool holds {pool.numel()} tokens but the last selection stage needs "
                f"{config.selection_tokens[-1]}; pass more calibration token ids or lower selection_tokens."
            )
        work = self._work
        work.mkdir(parents=True, exist_ok=True)
        fingerprint = self._fingerprint(config, calibration_ids, pool)
        state_path = work / STATE_FILE
        if state_path.exists():
            state = SearchState.load(state_path)
            if state.fingerprint != fingerprint:
                raise ValueError(
                    f"{work} holds the state of another Týr run (different config, model weights or calibration "
                    "text, or written by an older hf_compress); pass an empty "
                    "work_dir, or the one of the run to resume with the same config."
                )
            logger.info("resuming Týr from %s: iteration %d, generation %d", work, state.iteration + 1,
                        state.generation)
        else:
            state = SearchState(centres={t: list(budget.centres[t]) for t in UNIT_TYPES}, fingerprint=fingerprint)
            state.save(state_path)  # claims the folder: another config cannot pick up these supernet files
        self._store_dense_outputs(structures, work / "dense_outputs.safetensors")
        evidence = _Evidence(calibration_ids, pool, state, state_path)
        if config.allocation == "search":
            begin = time.perf_counter()
            evidence.fitness = self._teacher(pool, config, work / "teacher.safetensors", progress)
            evidence.seconds["teacher"] = time.perf_counter() - begin
        return evidence

    def decide(self, config: TyrConfig, plan: tuple[list[BlockStructure], BudgetPlan], evidence: _Evidence,
               progress: bool) -> _Decision:
        """Coarse-to-fine iterations of supernet + evolutionary search (one supernet for ``uniform``)."""
        structures, budget = plan
        state, work = evidence.state, self._work
        search = config.allocation == "search"
        iterations = config.num_iterations if search else 1
        seconds = {"supernet": 0.0, "search": 0.0}
        best: list[int] = []
        supernet = None
        while state.iteration < iterations:
            grids = self._grids(config, budget, state, state.iteration)
            supernet = Supernet(work / f"iteration_{state.iteration}", grids)
            begin = time.perf_counter()
            self._restore_dense_outputs(structures, work / "dense_outputs.safetensors")
            build_supernet(
                self.model, evidence.calibration_ids, structures, supernet,
                update_rounds={"attention": config.attention_update_rounds, "ffn": config.ffn_update_rounds},
                damping=config.damping, propagation=config.propagation, batch_size=config.batch_size,
                progress=progress,
            )
            seconds["supernet"] += time.perf_counter() - begin
            space = _search_space(grids, len(structures))
            if not search:
                best = [0] * len(space.bounds)
                break
            if not state.parent:
                state.parent = [0] * len(space.bounds)
                state.rng = state.rng or rng_state(random.Random(config.search_seed + state.iteration))
            begin = time.perf_counter()
            best = evolutionary_search(
                space, _applier(self.model, structures, supernet), evidence.fitness, state,  # type: ignore[arg-type]
                generations=config.generations, offspring=config.offspring,
                selection_tokens=config.selection_tokens, selection_survivors=config.selection_survivors,
                max_flips=config.max_flips, checkpoint=lambda s: s.save(evidence.state_path), progress=progress,
            )
            seconds["search"] += time.perf_counter() - begin
            if state.iteration == iterations - 1:
                break
            for position, unit_type in enumerate(UNIT_TYPES):  # re-centre on the best allocation
                levels = best[position::2]
                state.centres[unit_type] = [grids[unit_type].removed(i, level) for i, level in enumerate(levels)]
            state.iteration += 1
            state.generation = 0
            state.parent = []
            state.rng = None
            state.save(evidence.state_path)
        return _Decision(structures, supernet, best, list(state.history), {**evidence.seconds, **seconds},
                         budget.centres)

    def shrink(self, decision: _Decision) -> None:
        """Slice every block to its chosen level, with the local pruner's re-fitted output projections."""
        with torch.no_grad():
            for index, structure in enumerate(decision.structures):
                attention = decision.supernet.variant(index, "attention", decision.levels[2 * index])
                ffn = decision.supernet.variant(index, "ffn", decision.levels[2 * index + 1])
                shrink_block(structure, kept_attention=attention[0], kept_ffn=ffn[0],
                             attention_output_weight=attention[1], ffn_output_weight=ffn[1])

    def describe(self, decision: _Decision) -> dict[str, Any]:
        return {"history": decision.history, "seconds": decision.seconds,
                "extra": {"centre_allocation": decision.centres, "final_levels": decision.levels}}

    # ---------------------------------------------------------------------------------------- helpers

    def _grids(self, config: TyrConfig, plan: BudgetPlan, state: SearchState, iteration: int) -> dict[str, LevelGrid]:
        # The uniform baseline only ever uses the centre level: build nothing else.
        half = config.num_levels // 2 if config.allocation == "search" else 0
        grids = {}
        for unit_type in UNIT_TYPES:
            units = plan.num_units[unit_type]
            step = round(config.initial_step * units / 2**iteration)
            if unit_type == "attention":
                step = min(max(1, step), max(units - 1, 1))
            else:  # a multiple of channel_multiple, so every level keeps a multiple of it
                multiple = config.channel_multiple
                step = -(-max(config.min_ffn_step, step) // multiple) * multiple
                step = min(step, max(units - multiple, multiple))
            grids[unit_type] = LevelGrid(list(state.centres[unit_type]), step, plan.max_removable[unit_type], half)
        return grids

    def _teacher(self, pool: torch.Tensor, config: TyrConfig, path: Path, progress: bool) -> SparseKLFitness:
        if path.exists():
            return SparseKLFitness.load(path, self.model, config.batch_size)
        fitness = SparseKLFitness(self.model, pool, config.kl_topk, config.batch_size, progress)
        fitness.save(path)
        return fitness

    def _store_dense_outputs(self, structures: list[BlockStructure], path: Path) -> None:
        if path.exists():
            return
        # Written one tensor at a time (a CPU copy of each in turn for a model on a GPU): together they are about a
        # third of the model.
        specs = []
        for index, structure in enumerate(structures):
            specs.append(TensorSpec.of(f"{index}.attention", structure.attention.output.weight.detach()))
            specs.append(TensorSpec.of(f"{index}.ffn", structure.ffn.output.weight.detach()))
        with atomic_path(path) as partial:
            write_safetensors(partial, specs)

    def _restore_dense_outputs(self, structures: list[BlockStructure], path: Path) -> None:
        # One tensor at a time: all blocks' output projections together are about a third of the model.
        with torch.no_grad(), safe_open(path, framework="pt") as stored:
            for index, structure in enumerate(structures):
                structure.attention.output.weight.copy_(stored.get_tensor(f"{index}.attention"))
                structure.ffn.output.weight.copy_(stored.get_tensor(f"{index}.ffn"))

    def _fingerprint(self, config: TyrConfig, calibration_ids: torch.Tensor | None, pool: torch.Tensor) -> str:
        """What the work_dir's supernet and teacher depend on: the config, the text and the weights (sampled: an
        in-memory model has no name, and a folder can be overwritten with other weights)."""
        digest = hashlib.sha256()
        for name, parameter in self.model.named_parameters():
            flat = parameter.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // 4096)].to("cpu", torch.float32)
            digest.update(name.encode() + str(tuple(parameter.shape)).encode() + sample.numpy().tobytes())
        for ids in (calibration_ids, pool):
            if ids is not None:
                digest.update(str(tuple(ids.shape)).encode() + ids.to("cpu", torch.int64).numpy().tobytes())
        identity = {
            "config": config.to_dict(),
            "model": getattr(getattr(self.model, "config", None), "name_or_path", ""),
            "parameters": decoder_parameter_count(self.model),
            "weights_and_text": digest.hexdigest(),
        }
        return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _check_work_dir(work_dir: str | os.PathLike | None, save_dir: str | os.PathLike | None) -> None:
    """Refuse, before anything is written, a work_dir that is a file, or that is save_dir or nested with it: the save
    replaces save_dir whole and refuses a folder that holds anything (the work files, the run's lock)."""
    if work_dir is None:
        return
    if Path(work_dir).exists() and not Path(work_dir).is_dir():
        raise ValueError(f"work_dir {work_dir} is a file; pass a folder (it is created if missing).")
    if save_dir is not None and folders_overlap(work_dir, save_dir):
        raise ValueError(f"work_dir {work_dir} and save_dir {save_dir} are the same folder or one holds the other; "
                         "keep the work folder apart (e.g. tyr-work/ beside the saved model).")


def _search_space(grids: dict[str, LevelGrid], layers: int) -> SearchSpace:
    bounds, types = [], []
    for index in range(layers):
        for unit_type in UNIT_TYPES:
            bounds.append(grids[unit_type].bounds(index))
            types.append(unit_type)
    return SearchSpace(bounds, types)


def _applier(model: nn.Module, structures: list[BlockStructure], supernet: Supernet):
    """``apply(levels)``: load a candidate's variants (zero-filled) into the output projections that change."""
    applied: dict[int, int] = {}

    def apply(levels: Sequence[int]) -> None:
        with torch.no_grad():
            for position, level in enumerate(levels):
                if applied.get(position) == level:
                    continue
                index, unit_type = divmod(position, 2)
                structure = structures[index]
                layer = structure.attention.output if unit_type == 0 else structure.ffn.output
                unit_size = structure.attention.unit_size if unit_type == 0 else 1
                kept, weight = supernet.variant(index, UNIT_TYPES[unit_type], level)
                layer.weight.copy_(zero_filled(kept, weight, layer.weight, unit_size))
                applied[position] = level

    return apply

