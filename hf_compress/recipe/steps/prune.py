"""``prune``: any registered pruner (``hf_compress.pruning.PRUNERS``), its config's fields as the step's fields.

Mask pruners (magnitude, Wanda, SparseGPT, SDS; ``permutation:`` too) leave zeros in the linear layers (fact
``sparse``); structural ones remove heads or channels (Týr, BlockPruner: fact ``slim``) or whole blocks (block
removal, SLEB: fact ``blocks``).

Example:
    >>> step = PruneStep.parse(0, {"method": "wanda", "sparsity": "2:4", "permutation": "ria"}, seed=3)
    >>> step.fields["calibration_seed"], step.produces()
    (3, {'sparse'})
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ...utils import get_logger
from ..config import RecipeError, check_keys, refused_as
from .base import BLOCKS_AFTER_ROUTE, ROUTE_STACKING, RecipeState, Step
from .training import check_lengths, check_text


logger = get_logger(__name__)

PACKED_BEFORE_PRUNE = (
    "quantize (DL-QAT/RTN) before pruning: the packed low-bit layers are not linear layers a pruner can prune, "
    "and pruning their dequantized weights would discard what the quantizer fitted; put `prune` first."
)
TWO_MASKS = (
    "two mask-pruning steps: the second would re-select the mask of an already pruned model; use one prune step "
    "with the final sparsity."
)
STRUCTURAL_AFTER_MASK = (
    "structural pruning after mask pruning: Týr re-fits the kept weights (filling in the mask's zeros) and block "
    "removal scores the blocks of a damaged model; put the structural step first."
)
TWO_STRUCTURAL = (
    "two structural steps: each plans its budget from the model it is given as if it were dense; use one "
    "structural step with the final target."
)


class PruneStep(Step):
    """``prune: {method: <pruner>, **config fields, calibration_text: wikipedia}``."""

    kind = "prune"

    @classmethod
    def parse(cls, index: int, data: dict[str, Any], seed: int) -> PruneStep:
        from ...pruning.registry import PRUNERS

        method = cls.method_of(index, data, list(PRUNERS))
        config_class = PRUNERS[method].config_class
        names = [f.name for f in dataclasses.fields(config_class)]
        where = cls.where(index, method)
        fields = check_keys(where, data, {"method", "calibration_text", *names})
        fields.pop("method")
        calibration_text = fields.pop("calibration_text", "wikipedia")
        check_text(where, "calibration_text", calibration_text)
        _check_not_sexagesimal(where, fields)
        for name in ("calibration_seed", "search_seed"):  # the recipe's seed unless the step sets its own
            if name in names:
                fields.setdefault(name, seed)
        config = _config(where, method, fields)
        resolved = {k: v for k, v in config.to_dict().items() if k != "method"}
        step = cls(index, method, {**resolved, "calibration_text": calibration_text})
        step.structural = _is_structural(method)
        return step

    def config(self) -> Any:
        fields = {k: v for k, v in self.fields.items() if k != "calibration_text"}
        return _config(self.where(self.index, self.method), self.method, fields)

    def produces(self) -> set[str]:
        if not self.structural:
            return {"sparse"}
        # Whole blocks removed: every remaining block keeps its shape (a plain checkpoint; `route` can follow).
        return {"blocks" if _removes_whole_blocks(self.method) else "slim"}

    def refused_after(self) -> dict[str, str]:
        after_route = (ROUTE_STACKING["sparse"] if not self.structural else BLOCKS_AFTER_ROUTE
                       if _removes_whole_blocks(self.method) else ROUTE_STACKING["slim"])
        refused = {**super().refused_after(), "packed": PACKED_BEFORE_PRUNE, "routed": after_route}
        if self.structural:
            refused.update(sparse=STRUCTURAL_AFTER_MASK, slim=TWO_STRUCTURAL, blocks=TWO_STRUCTURAL)
        else:
            refused["sparse"] = TWO_MASKS
        return refused

    def check_after(self, earlier: list[Step]) -> None:
        # N:M groups need every input width a multiple of M: a structural step before must keep FFN widths so.
        pattern = getattr(self.config(), "pattern", None) if not self.structural else None
        if pattern is None or not pattern.is_n_m:
            return
        m = pattern.group_size
        for step in earlier:
            multiple = step.fields.get("channel_multiple") if isinstance(step, PruneStep) else None
            if multiple is not None and multiple % m:
                raise RecipeError(
                    f"steps: {self.where(self.index, self.method)} ({pattern.kept_per_group}:{m}) after "
                    f"{step.where(step.index, step.method)}: its FFN widths must be multiples of {m}, and "
                    f"channel_multiple is {multiple}; set channel_multiple: {m} (or a multiple of {m}) on step "
                    f"{step.index + 1}."
                )

    def check_model(self, state: RecipeState) -> None:
        # The pruner checks its calibration windows only when it runs, after the earlier steps' work.
        if self._calibrates():
            check_lengths(self.where(self.index, self.method), state.model,
                          {"calibration_seq_len": self.fields.get("calibration_seq_len")})

    def _calibrates(self) -> bool:
        from ...pruning.permutation import LearnedPermutationConfig
        from ...pruning.registry import PRUNERS

        trains = isinstance(getattr(self.config(), "permutation", None), LearnedPermutationConfig)
        return PRUNERS[self.method].requires_calibration or trains

    def apply(self, state: RecipeState, progress: bool) -> dict[str, Any]:
        from ...assets import load_calibration_text
        from ...pruning.registry import PRUNERS

        pruner_class = PRUNERS[self.method]
        config = self.config()
        text = load_calibration_text(self.fields["calibration_text"]) if self._calibrates() else None
        pruner = pruner_class(state.model, state.tokenizer)
        state.model = pruner.prune(config, text, progress=progress)
        state.format_recipes["pruning"] = config.to_dict()
        report = pruner.report
        summary = report.summary() if hasattr(report, "summary") else None
        logger.info("%s: %s", self.describe(), summary)
        return {"report": summary} if summary else {}


def _check_not_sexagesimal(where: str, fields: dict[str, Any]) -> None:
    """Refuse an unquoted ``sparsity: 2:4`` with the fix: YAML 1.1 reads it as the base-60 integer 2 × 60 + 4 = 124."""
    value = fields.get("sparsity")
    if isinstance(value, bool) or not isinstance(value, int):
        return
    kept, group = divmod(value, 60)
    if 0 < kept < group:
        raise RecipeError(
            f"{where}: sparsity is {value}, which is how YAML reads an unquoted {kept}:{group} (a base-60 number); "
            f'quote it: sparsity: "{kept}:{group}".'
        )


def _config(where: str, method: str, fields: dict[str, Any]) -> Any:
    from ...pruning.config import PruningConfig

    with refused_as(where):
        return PruningConfig.from_dict({"method": method, **fields})


def _removes_whole_blocks(method: str) -> bool:
    from ...pruning.block_removal import BlockRemovalPruner
    from ...pruning.registry import PRUNERS

    return issubclass(PRUNERS[method], BlockRemovalPruner)


def _is_structural(method: str) -> bool:
    from ...pruning.registry import PRUNERS
    from ...pruning.structural import StructuralPruner

    return issubclass(PRUNERS[method], StructuralPruner)
