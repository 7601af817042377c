"""Sparsity patterns and the pruning configuration family.

A *sparsity pattern* is either an unstructured ratio (the fraction of weights set to zero) or a
semi-structured ``N:M`` pattern.

**N:M convention.** ``"N:M"`` means *at most N non-zero weights in every group of M consecutive
input columns of each output row*: N weights are kept, ``M - N`` are pruned. This is the meaning
sparse hardware gives the pattern (NVIDIA's 2:4 = at most 2 non-zeros per 4) and the one used in the
N:M literature. The Wanda and SparseGPT reference scripts instead read the first number as the count
*pruned*; for the patterns they use (2:4, 4:8) both readings coincide, they differ for e.g. ``1:4``
(here: keep 1, prune 3, 75% sparse). The fields are named ``kept_per_group`` / ``group_size`` so the
convention is visible wherever the pattern is used.

Configs are plain dataclasses with a JSON round trip and a registry keyed by ``method``, so
``PruningConfig.from_dict(d)`` returns the right subclass (a recipe stored in a model's
``config.json`` can be rebuilt without knowing its method in advance).

Example:
    >>> parse_sparsity("2:4")
    SparsityPattern('2:4')
    >>> parse_sparsity("50%").ratio
    0.5
    >>> config = SparseGPTConfig(sparsity="2:4", skip=["*down_proj"])
    >>> PruningConfig.from_dict(config.to_dict()) == config
    True
"""

# Why not ``optimum.configuration_utils.BaseConfig``: in optimum 2.3.0 it is a subclass of transformers'
# ``PretrainedConfig``, so every instance carries and serialises a model config's fields (``id2label``,
# ``return_dict``, ``output_hidden_states``, ``_attn_implementation_internal``, ...; checked: ``to_dict()``
# of a one-field subclass has 17 keys), and its ``from_pretrained`` resolves files through the Hub cache
# machinery. A pruning recipe is neither a model config nor a Hub artifact of its own (it is stored inside
# the pruned model's ``config.json``), so plain dataclasses give a cleaner, exact JSON round trip.

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from ..utils import atomic_file


__all__ = [
    "MagnitudeConfig",
    "PruningConfig",
    "SDSConfig",
    "SparseGPTConfig",
    "SparsityPattern",
    "WandaConfig",
    "parse_sparsity",
]

_SPARSITY_HELP = "sparsity must be a ratio in [0, 1) (e.g. 0.5 or '50%') or 'N:M' with 0 < N < M (e.g. '2:4')"
_N_M = re.compile(r"^\s*(-?\d+)\s*:\s*(-?\d+)\s*$")


# --------------------------------------------------------------------------------------------------
# Sparsity patterns
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SparsityPattern:
    """A parsed sparsity target: an unstructured ratio or a semi-structured N:M pattern.

    Build it with ``parse_sparsity``. Attributes:
        ratio: fraction of weights set to zero (for N:M: ``1 - kept_per_group / group_size``).
        kept_per_group: N of N:M, the most non-zero weights allowed per group (``None`` if unstructured).
        group_size: M of N:M, consecutive input columns per group (``None`` if unstructured).

    Example:
        >>> pattern = parse_sparsity("4:8")
        >>> pattern.is_n_m, pattern.kept_per_group, pattern.pruned_per_group, pattern.ratio
        (True, 4, 4, 0.5)
        >>> str(parse_sparsity(0.25))
        '0.25'
    """

    ratio: float
    kept_per_group: int | None = None
    group_size: int | None = None

    @property
    def is_n_m(self) -> bool:
        """Whether this is a semi-structured N:M pattern."""
        return self.group_size is not None

    @property
    def pruned_per_group(self) -> int | None:
        """``M - N``: weights zeroed in every group (``None`` if unstructured)."""
        if self.group_size is None or self.kept_per_group is None:
            return None
        return self.group_size - self.kept_per_group

    def to_json(self) -> float | str:
        """The canonical JSON value: ``"N:M"`` or the ratio as a float."""
        return f"{self.kept_per_group}:{self.group_size}" if self.is_n_m else self.ratio

    def __str__(self) -> str:
        return str(self.to_json())

    def __repr__(self) -> str:
        return f"SparsityPattern({self.to_json()!r})"


def parse_sparsity(value: SparsityPattern | float | int | str) -> SparsityPattern:
    """Parse a sparsity target: ``0.5``, ``"0.5"``, ``"50%"`` (unstructured) or ``"2:4"``, ``"4:8"`` (N:M).

    Ratios must lie in ``[0, 1)``; for ``"N:M"``, ``0 < N < M`` (N kept, M - N pruned per group).

    Raises:
        ValueError: anything else, with a message saying what is accepted.

    Example:
        >>> parse_sparsity(0.5), parse_sparsity("2:4").pruned_per_group
        (SparsityPattern(0.5), 2)
        >>> parse_sparsity("3:2")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: sparsity must be a ratio in [0, 1) ... or 'N:M' with 0 < N < M (e.g. '2:4'), got '3:2'.
    """
    if isinstance(value, SparsityPattern):
        return value
    error = ValueError(f"{_SPARSITY_HELP}, got {value!r}.")
    if isinstance(value, bool):  # bool is an int subclass: True would silently read as ratio 1
        raise error
    if isinstance(value, (int, float)):
        return _ratio_pattern(float(value), error)
    if not isinstance(value, str):
        raise TypeError(f"{_SPARSITY_HELP}, got an object of type {type(value).__name__}.")
    text = value.strip()
    match = _N_M.match(text)
    if match:
        kept, group = int(match.group(1)), int(match.group(2))
        if not 0 < kept < group:
            raise error
        return SparsityPattern(ratio=1.0 - kept / group, kept_per_group=kept, group_size=group)
    percent = text.endswith("%")
    try:
        number = float(text[:-1] if percent else text)
    except ValueError:
        raise error from None
    return _ratio_pattern(number / 100.0 if percent else number, error)


def _ratio_pattern(ratio: float, error: ValueError) -> SparsityPattern:
    if not math.isfinite(ratio) or not 0.0 <= ratio < 1.0:
        raise error
    return SparsityPattern(ratio=ratio)


# --------------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------------


_REGISTRY: dict[str, type[PruningConfig]] = {}


@dataclass
class PruningConfig:
    """Settings shared by every pruner. Use a method's subclass (``WandaConfig``, ...), not this class.

    Args:
        sparsity: an unstructured ratio (``0.5``, ``"50%"``) or ``"N:M"`` (N kept per M consecutive
            input weights); see ``parse_sparsity``. Stored canonically (``0.5`` or ``"2:4"``).
        skip: ``fnmatch`` patterns of linear layers to leave dense, matched against the name inside
            the decoder block (``"self_attn.*"``, ``"*down_proj"``) and the qualified name
            (``"model.layers.0.*"``). Embeddings and ``lm_head`` sit outside the decoder blocks and
            are never pruned.
        num_calibration_sequences, calibration_seq_len, calibration_seed: the calibration windows
            (``hf_compress.modeling.calibration_batches``); ignored by methods without calibration.
        batch_size: calibration sequences per forward micro-batch.

    Example:
        >>> WandaConfig(sparsity="50%").sparsity
        0.5
    """

    method: ClassVar[str] = ""
    """Registry key of the config class (and of the pruner that uses it)."""

    sparsity: float | str = 0.5
    skip: list[str] = field(default_factory=list)
    num_calibration_sequences: int = 128
    calibration_seq_len: int = 512
    calibration_seed: int = 0
    batch_size: int = 8

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.method:
            known = _REGISTRY.get(cls.method)
            # A re-imported module (autoreload) re-creates the same class: replacing it is fine.
            if known is not None and _qualified(known) != _qualified(cls):
                raise ValueError(f"a pruning config for method {cls.method!r} is already registered.")
            _REGISTRY[cls.method] = cls

    def __post_init__(self) -> None:
        self.sparsity = parse_sparsity(self.sparsity).to_json()
        if isinstance(self.skip, str):  # a lone pattern, not a list of one-character patterns
            self.skip = [self.skip]
        self.skip = list(self.skip)
        if not all(isinstance(pattern, str) for pattern in self.skip):
            raise TypeError(f"skip must be a list of fnmatch patterns (strings), got {self.skip!r}.")
        for name in ("num_calibration_sequences", "calibration_seq_len", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        if isinstance(self.calibration_seed, bool) or not isinstance(self.calibration_seed, int):
            raise ValueError(f"calibration_seed must be an integer, got {self.calibration_seed!r}.")

    @property
    def pattern(self) -> SparsityPattern:
        """The parsed ``sparsity``."""
        return parse_sparsity(self.sparsity)

    # ---------------------------------------------------------------------------------------- JSON

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: ``method`` plus every field.

        Example:
            >>> MagnitudeConfig(sparsity="2:4").to_dict()["method"]
            'magnitude'
        """
        fields = {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}
        return {"method": self.method, **fields}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PruningConfig:
        """Rebuild a config from ``to_dict()``'s output; on ``PruningConfig``, ``method`` picks the subclass.

        Raises:
            ValueError: unknown method, a method that does not match the class it is called on, or
                unknown keys.

        Example:
            >>> type(PruningConfig.from_dict({"method": "wanda", "sparsity": "2:4"})).__name__
            'WandaConfig'
        """
        data = dict(data)
        method = data.pop("method", None)
        target: type[PruningConfig] = cls
        if method is not None:
            if method not in _REGISTRY:
                raise ValueError(f"unknown pruning method {method!r}; known: {', '.join(sorted(_REGISTRY))}.")
            target = _REGISTRY[method]
            if not issubclass(target, cls):
                raise ValueError(
                    f"{cls.__name__}.from_dict got a config for method {method!r} ({target.__name__})."
                )
        elif not cls.method:
            raise ValueError(
                f"the dict has no 'method' key; pass one of {', '.join(sorted(_REGISTRY))} or call "
                "from_dict on the method's config class."
            )
        names = {f.name for f in dataclasses.fields(target)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(
                f"unknown {target.__name__} fields: {', '.join(unknown)}; expected some of {sorted(names)}."
            )
        return target(**data)

    def to_json_string(self) -> str:
        """``to_dict()`` as indented, key-sorted JSON."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def to_json_file(self, path: str | os.PathLike) -> None:
        """Write ``to_json_string()`` to ``path`` (atomically: a failed write leaves no partial file)."""
        with atomic_file(path) as handle:
            handle.write(self.to_json_string())

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> PruningConfig:
        """Read a config written by ``to_json_file``.

        Example:
            >>> WandaConfig(sparsity=0.5).to_json_file("pruning.json")  # doctest: +SKIP
            >>> PruningConfig.from_json_file("pruning.json")  # doctest: +SKIP
            WandaConfig(sparsity=0.5, skip=[], ...)
        """
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


@dataclass
class MagnitudeConfig(PruningConfig):
    """Magnitude pruning: score ``|W|``; an unstructured ratio is applied per layer (whole matrix).

    Needs no calibration data (the calibration fields are kept for a uniform recipe but unused).

    Example:
        >>> MagnitudeConfig(sparsity=0.5, skip=["mlp.*"]).skip
        ['mlp.*']
    """

    method: ClassVar[str] = "magnitude"


@dataclass
class WandaConfig(PruningConfig):
    """Wanda: score ``|W_ij| · ‖X_j‖₂``, compared within each output row (N:M groups within rows).

    Example:
        >>> WandaConfig(sparsity="4:8").pattern.kept_per_group
        4
    """

    method: ClassVar[str] = "wanda"


@dataclass
class SparseGPTConfig(PruningConfig):
    """SparseGPT: OBS weight reconstruction from the layer Hessian ``2/n Σ x xᵀ``.

    Args:
        blocksize: columns per lazy batch; the unstructured mask is chosen per block of this many
            columns. For N:M it is rounded down to a multiple of M (groups must not straddle blocks;
            the result does not depend on it otherwise).
        percdamp: damping ``λ = percdamp · mean(diag H)`` added to the Hessian's diagonal.

    Example:
        >>> SparseGPTConfig(sparsity="2:4").percdamp
        0.01
    """

    method: ClassVar[str] = "sparsegpt"

    blocksize: int = 128
    percdamp: float = 0.01

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.blocksize, bool) or not isinstance(self.blocksize, int) or self.blocksize < 1:
            raise ValueError(f"blocksize must be a positive integer, got {self.blocksize!r}.")
        _check_number(self, "percdamp", positive=True)


_SDS_BASES = ("magnitude", "wanda", "sparsegpt")
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
        base: the one-shot pruner of steps 1 and 3: ``"sparsegpt"``, ``"wanda"`` or ``"magnitude"``.
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
        >>> config.base_config() == WandaConfig(sparsity="2:4")
        True
        >>> PruningConfig.from_dict(config.to_dict()) == config
        True
    """

    method: ClassVar[str] = "sds"

    base: str = "sparsegpt"
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
        if self.base not in _SDS_BASES:
            raise ValueError(f"SDS base must be one of {', '.join(_SDS_BASES)}, got {self.base!r}.")
        if self.sparse_regularization_target not in _SDS_TARGETS:
            raise ValueError(
                f"sparse_regularization_target must be one of {', '.join(_SDS_TARGETS)}, "
                f"got {self.sparse_regularization_target!r}."
            )
        if not isinstance(self.base_options, dict):
            raise TypeError(
                f"base_options must be a dict of {self.base} config fields, got {self.base_options!r}."
            )
        for name in ("redense_epochs", "final_tuning_epochs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}.")
        for name in ("redense_learning_rate", "final_tuning_learning_rate"):
            _check_number(self, name, positive=True)
        for name in ("sparse_regularization", "anchor_regularization"):
            _check_number(self, name, positive=False)
        if not isinstance(self.revert_if_worse, bool):
            raise TypeError(f"revert_if_worse must be True or False, got {self.revert_if_worse!r}.")
        self.base_config()  # invalid base_options fail now, not after the first pruned block

    def base_config(self) -> PruningConfig:
        """The config of the base pruner (steps 1 and 3): shared fields plus ``base_options``."""
        shared = {
            "sparsity": self.sparsity, "skip": list(self.skip),
            "num_calibration_sequences": self.num_calibration_sequences,
            "calibration_seq_len": self.calibration_seq_len, "calibration_seed": self.calibration_seed,
            "batch_size": self.batch_size,
        }
        clash = sorted(set(self.base_options) & (set(shared) | {"method"}))
        if clash:
            raise ValueError(
                f"base_options may not set {', '.join(clash)}: set them on the SDSConfig itself."
            )
        return PruningConfig.from_dict({"method": self.base, **shared, **self.base_options})


def _check_number(config: PruningConfig, name: str, positive: bool) -> None:
    value = getattr(config, name)
    valid = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if not valid or (value <= 0 if positive else value < 0):
        kind = "positive" if positive else "non-negative"
        raise ValueError(f"{name} must be a {kind} number, got {value!r}.")
    setattr(config, name, float(value))
