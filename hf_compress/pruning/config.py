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
``config.json`` can be rebuilt without knowing its method in advance). Each method's config lives in
its own folder (``wanda/config.py``, ...) and registers itself by defining ``method``. Fields may carry
``metadata={"cli": [...]}`` (extra flag spellings of ``hf-compress prune``) or ``{"cli": None}`` (no flag).

Example:
    >>> parse_sparsity("2:4")
    SparsityPattern('2:4')
    >>> parse_sparsity("50%").ratio
    0.5
    >>> config = PruningConfig.from_dict({"method": "sparsegpt", "sparsity": "2:4", "skip": ["*down_proj"]})
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

from ..utils import atomic_file, check_float, check_int, check_seed, check_str_list
from .permutation.config import PERMUTATION_CHOICES, parse_permutation


__all__ = [
    "PruningConfig",
    "SparsityPattern",
    "StructuralPruningConfig",
    "check_number",
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

CALIBRATION_DATA_KEY = "calibration_data"
"""The key a recorded recipe (``model.config.hf_compress["pruning"]``) gives the calibration text's description."""

CALIBRATION_FIELDS = ("num_calibration_sequences", "calibration_seq_len", "calibration_seed", "batch_size")
"""The ``PruningConfig`` fields that only shape calibration: a recipe recorded by a prune that read no calibration
text (magnitude) leaves them out rather than state settings nothing used."""


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
        num_calibration_sequences: how many calibration windows are drawn from the calibration text
            (``hf_compress.modeling.calibration_batches``); ignored by methods without calibration.
        calibration_seq_len: tokens per calibration window.
        calibration_seed: seed of the windows' start positions in the calibration text.
        batch_size: calibration sequences per forward micro-batch.
        permutation: reorder input channels before an N:M prune (absorbed into the neighbouring
            weights, so the checkpoint stays an ordinary N:M one): none, ria (heuristic channel
            reallocation), swap (RIA refined by greedy channel swaps), learned (the learned permutation's
            defaults), permllm (PermLLM-style block-diagonal), or a SwapPermutationConfig /
            LearnedPermutationConfig (in JSON, e.g. the CLI's --options: {"permutation": {"kind": "swap" |
            "learned", ...}}).

    Example:
        >>> PruningConfig.from_dict({"method": "wanda", "sparsity": "50%"}).sparsity
        0.5
    """

    method: ClassVar[str] = ""
    """Registry key of the config class (and of the pruner that uses it)."""

    sparsity: float | str = 0.5
    skip: list[str] = field(default_factory=list)
    num_calibration_sequences: int = field(default=128, metadata={"cli": ["--calibration-sequences"]})
    calibration_seq_len: int = field(default=512, metadata={"cli": ["--seq-len"]})
    calibration_seed: int = 0
    batch_size: int = 8
    permutation: Any = field(default=None, metadata={"type": str, "choices": PERMUTATION_CHOICES})

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
        # A lone pattern is a list of one, not a list of one-character patterns.
        self.skip = check_str_list("skip", self.skip, hint="skip holds fnmatch patterns such as 'mlp.*'.")
        for name in ("num_calibration_sequences", "calibration_seq_len", "batch_size"):
            setattr(self, name, check_int(name, getattr(self, name), minimum=1))
        self.calibration_seed = check_seed("calibration_seed", self.calibration_seed)
        self.permutation = parse_permutation(self.permutation)
        if self.permutation is not None and not self.pattern.is_n_m:
            raise ValueError(
                f"permutation={self.permutation if isinstance(self.permutation, str) else self.permutation.kind} needs an N:M "
                f"sparsity such as '2:4' (N:M groups are what the permutation reorders), got {self.sparsity}; "
                "use permutation=None for unstructured sparsity."
            )

    @property
    def pattern(self) -> SparsityPattern:
        """The parsed ``sparsity``."""
        return parse_sparsity(self.sparsity)

    # ---------------------------------------------------------------------------------------- JSON

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: ``method`` plus every field.

        Example:
            >>> PruningConfig.from_dict({"method": "magnitude", "sparsity": "2:4"}).to_dict()["method"]
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
        data.pop(CALIBRATION_DATA_KEY, None)  # a recorded recipe says what the text was; no setting of the method
        target: type[PruningConfig] = cls
        if method is not None:
            if method not in _REGISTRY:
                from .registry import discover_configs

                discover_configs()  # method folders register their configs when imported
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
            >>> config.to_json_file("pruning.json")  # doctest: +SKIP
            >>> PruningConfig.from_json_file("pruning.json")  # doctest: +SKIP
            WandaConfig(sparsity=0.5, skip=[], ...)
        """
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _plain(value: Any) -> Any:
    if hasattr(value, "to_dict"):  # a permutation config
        return value.to_dict()
    return list(value) if isinstance(value, tuple) else value


def check_number(config: Any, name: str, positive: bool, high: float | None = None) -> None:
    """Check the field ``name`` of ``config``: a finite number, ``> 0`` (``positive``) or ``>= 0``, at most ``high``;
    store it as a ``float``.

    Example:
        >>> from hf_compress.pruning import SparseGPTConfig
        >>> SparseGPTConfig(percdamp=0)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: percdamp must be a positive number..., got 0.
    """
    value = check_float(name, getattr(config, name), low=0.0, low_open=positive, high=high)
    setattr(config, name, value)


def _ratio_or_none(value: Any) -> float | None:
    """``value`` read as an unstructured ratio, or None when it is not one."""
    try:
        pattern = parse_sparsity(value)
    except (TypeError, ValueError):
        return None
    return None if pattern.is_n_m else pattern.ratio


@dataclass
class StructuralPruningConfig(PruningConfig):
    """Shared by the structural pruners: ``target_sparsity`` (the fraction of decoder-block parameters to
    remove; ``sparsity`` mirrors it for reports) and CPU-sized calibration defaults. ``skip`` is refused:
    the budget is global and whole heads, channels or blocks go.

    Args:
        target_sparsity: the fraction of decoder-block parameters to remove, in (0, 1): ``0.3`` or ``"30%"``.
    """

    target_sparsity: float = field(default=0.3, metadata={"cli": ["--sparsity"], "type": str})
    num_calibration_sequences: int = field(default=64, metadata={"cli": ["--calibration-sequences"]})
    calibration_seq_len: int = field(default=256, metadata={"cli": ["--seq-len"]})
    sparsity: float | str | None = field(default=None, metadata={"cli": None})
    skip: list[str] = field(default_factory=list, metadata={"cli": None})
    permutation: Any = field(default=None, metadata={"cli": None})

    def __post_init__(self) -> None:
        if parse_permutation(self.permutation) is not None:
            raise ValueError(
                f"{type(self).__name__} removes whole heads, channels or blocks; a channel permutation only serves "
                "N:M sparsity. Leave permutation=None."
            )
        target = self.target_sparsity
        if isinstance(target, str):  # from the command line: "0.3", "30%"; N:M is refused below
            pattern = parse_sparsity(target)
            if pattern.is_n_m:
                raise ValueError(
                    f"{type(self).__name__} removes a fraction of the decoder parameters; pass a ratio, not {pattern}."
                )
            target = pattern.ratio
        self.target_sparsity = check_float(
            "target_sparsity", target, low=0.0, high=1.0, low_open=True, high_open=True,
            hint="It is the fraction of decoder-block parameters to remove (e.g. 0.3 or '30%').",
        )
        if self.sparsity is not None and not math.isclose(_ratio_or_none(self.sparsity) or -1.0, self.target_sparsity):
            # `sparsity` is the mask pruners' key; here it only mirrors target_sparsity (a saved config holds both).
            raise ValueError(
                f"{type(self).__name__} removes target_sparsity={self.target_sparsity:g} of the decoder parameters, "
                f"but sparsity={self.sparsity!r} was given: pass the fraction as target_sparsity (the --sparsity flag); "
                "sparsity only mirrors it."
            )
        self.sparsity = self.target_sparsity
        super().__post_init__()
        if self.skip:
            raise ValueError(
                f"{type(self).__name__} prunes whole heads, channels or blocks under a global budget; skip "
                f"patterns ({self.skip}) are not supported."
            )
