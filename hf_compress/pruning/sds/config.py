"""``SDSConfig``: the settings of Sparse-Dense-Sparse around a one-shot pruner."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from ...utils import InvalidArgumentTypeError, check_bool, check_int
from ..config import PruningConfig, check_number


__all__ = ["SDSConfig", "sds_bases"]


_SDS_TARGETS = ("reactivated", "all")


@dataclass
class SDSConfig(PruningConfig):
    """SDS (Sparse-Dense-Sparse): prune, re-dense with sparse regularisation, prune again.

    For each decoder block: (1) prune with the ``base`` one-shot pruner; (2) re-activate the pruned
    weights (they restart at zero) and train the block's dense linear weights for ``redense_epochs``
    to reproduce the *dense original* block's outputs on the same inputs, with loss
    ``‖Y − Y_dense‖² / ‖Y_dense‖² + sparse_regularization · R_sparse + anchor_regularization · R_anchor``;
    (3) prune again with the same pruner and pattern on fresh statistics. Optionally (4) tune the
    surviving weights with the mask fixed for ``final_tuning_epochs``. With ``revert_if_worse`` a block
    whose final reconstruction error is above the first prune's keeps the first prune's weights.

    Learning rates are relative: each weight matrix's AdamW rate is the given value times its RMS, so
    ``5e-3`` moves every matrix by about 0.5% of its typical weight per step, whatever its scale.

    The regularisers are normalised so their weights do not depend on the layer's scale:
    ``R_sparse = mean|W ⊙ P| / mean|W_dense|`` with ``P`` the weights pruned in step 1
    (``sparse_regularization_target="reactivated"``) or every weight (``"all"``), and
    ``R_anchor = mean((W − W_1)² ⊙ K) / mean(W_dense²)`` with ``K`` the step-1 survivors.

    The paper's exact regulariser formulas, optimiser settings and step counts are not public in the
    text we could read (see ``shared/methods/sds.md``); the defaults are this library's choices,
    measured in ``bench/results/pruning.md``.

    Args:
        base: the one-shot pruner of steps 1 and 3: any registered layer-wise pruner (``sds_bases()``:
            ``"sparsegpt"``, ``"wanda"``, ``"magnitude"``, ...).
        base_options: further fields of the base pruner's config (e.g. ``{"percdamp": 0.01}``).
        redense_epochs: passes over the calibration micro-batches in the re-dense step.
        redense_learning_rate: AdamW learning rate of the re-dense step, relative to each matrix's RMS.
        sparse_regularization: weight of ``R_sparse``.
        sparse_regularization_target: ``"reactivated"`` or ``"all"`` (see above).
        anchor_regularization: weight of ``R_anchor`` (0 disables it).
        final_tuning_epochs: mask-fixed tuning passes after the second prune (0: off).
        final_tuning_learning_rate: relative AdamW learning rate of that tuning.
        revert_if_worse: keep the first prune's weights for a block whose error SDS did not lower.

    Example:
        >>> config = SDSConfig(sparsity="2:4", base="wanda")
        >>> type(config.base_config()).__name__
        'WandaConfig'
        >>> PruningConfig.from_dict(config.to_dict()) == config
        True
    """

    method: ClassVar[str] = "sds"

    base: str = field(default="sparsegpt", metadata={"choices": lambda: sds_bases()})
    base_options: dict[str, Any] = field(default_factory=dict)
    redense_epochs: int = 2
    redense_learning_rate: float = 5e-3
    sparse_regularization: float = 0.1
    sparse_regularization_target: str = "reactivated"
    anchor_regularization: float = 0.0
    final_tuning_epochs: int = 0
    final_tuning_learning_rate: float = 5e-3
    revert_if_worse: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        bases = sds_bases()
        if not isinstance(self.base, str) or self.base not in bases:
            raise ValueError(f"SDS base must be one of {', '.join(bases)}, got {self.base!r}.")
        if not isinstance(self.sparse_regularization_target, str) or self.sparse_regularization_target not in _SDS_TARGETS:
            raise ValueError(
                f"sparse_regularization_target must be one of {', '.join(_SDS_TARGETS)}, "
                f"got {self.sparse_regularization_target!r}."
            )
        if not isinstance(self.base_options, dict) or not all(isinstance(key, str) for key in self.base_options):
            raise InvalidArgumentTypeError(
                f"base_options must be a dict of {self.base} config fields, got {self.base_options!r}."
            )
        for name in ("redense_epochs", "final_tuning_epochs"):
            setattr(self, name, check_int(name, getattr(self, name), minimum=0))
        for name in ("redense_learning_rate", "final_tuning_learning_rate"):
            check_number(self, name, positive=True)
        for name in ("sparse_regularization", "anchor_regularization"):
            check_number(self, name, positive=False)
        check_bool("revert_if_worse", self.revert_if_worse)
        self.base_config()  # invalid base_options fail now, not after the first pruned block

    def base_config(self) -> PruningConfig:
        """The config of the base pruner (steps 1 and 3): shared fields plus ``base_options``."""
        shared = {
            "sparsity": self.sparsity, "skip": list(self.skip),
            "num_calibration_sequences": self.num_calibration_sequences,
            "calibration_seq_len": self.calibration_seq_len, "calibration_seed": self.calibration_seed,
            "batch_size": self.batch_size,
        }
        clash = sorted(set(self.base_options) & (set(shared) | {"method", "permutation"}))
        if clash:
            raise ValueError(
                f"base_options may not set {', '.join(clash)}: set them on the SDSConfig itself."
            )
        return PruningConfig.from_dict({"method": self.base, **shared, **self.base_options})




def sds_bases() -> list[str]:
    """The methods SDS can wrap: every registered layer-wise mask pruner except SDS itself.

    Example:
        >>> sds_bases()
        ['magnitude', 'sparsegpt', 'wanda']
    """
    from ..mask_pruner import MaskPruner
    from ..registry import PRUNERS

    return sorted(m for m, cls in PRUNERS.items() if issubclass(cls, MaskPruner) and m != SDSConfig.method)
