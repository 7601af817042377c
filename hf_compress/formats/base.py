"""The shared base of hf_compress's checkpoint formats, loaded with a plain ``from_pretrained``.

transformers rebuilds a quantized checkpoint from the ``quantization_config`` entry of its
``config.json``: ``quant_method`` names a config class and an ``HfQuantizer`` in two registries
(``transformers.quantizers.register_quantization_config`` / ``register_quantizer``). hf_compress
stores its compressed formats (sparse bitmask checkpoints of pruned models, packed low-bit ones, slim
structurally pruned ones) the same way, so a user only needs ``import hf_compress`` before
``AutoModelForCausalLM.from_pretrained(folder)``; nothing else changes.

This module is the shared mechanism:

- ``CompressedFormatConfig``: base of the ``quantization_config`` of every hf_compress format
  (``quant_method`` + ``format_version``, any other field round-trips through JSON unchanged).
- ``CompressedFormatQuantizer``: base ``HfQuantizer``. A format declares how its stored tensors turn
  back into the model's parameters as transformers v5 ``WeightConverter``\\ s
  (``weight_converters()``); the loader runs them while it reads the checkpoint. After loading the
  quantizer detaches itself, so the result is an ordinary model: ``generate``, ``Trainer`` (full
  fine-tuning included), ``.to(dtype)`` and ``save_pretrained`` (which then writes a plain dense
  checkpoint) behave as for any model.
- ``register_format``: a small registry from ``quant_method`` to the classes above, which also
  registers them with transformers (idempotent, so a module reload does not fail).

Each format module (``sparse.py``, ``packed.py``, ``slim.py``) registers itself when imported;
``import hf_compress`` arranges that through :mod:`hf_compress.formats` without importing them.

Example:
    >>> import hf_compress  # formats register when transformers' quantizer registry loads  # doctest: +SKIP
    >>> from transformers import AutoModelForCausalLM
    >>> model = AutoModelForCausalLM.from_pretrained("pruned-2-4")  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import importlib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from .. import _compat
from ..utils import get_logger
from .integrity import (
    CheckpointIntegrityError,
    CheckpointReader,
    check_tensors_match_model,
    config_overrides,
    explain_overrides,
    verify_config_digest,
)


if TYPE_CHECKING:
    from transformers import PreTrainedModel
    from transformers.core_model_loading import WeightTransform


__all__ = [
    "CompressedFormatConfig",
    "CompressedFormatQuantizer",
    "quant_method_of",
    "register_format",
    "registered_formats",
]

logger = get_logger(__name__)

_FORMATS: dict[str, type[CompressedFormatQuantizer]] = {}


def quant_method_of(quantization_config: Any) -> str | None:
    """The ``quant_method`` of a ``config.quantization_config``: a config object, or the plain dict a config read
    with ``AutoConfig`` holds; ``None`` without one.

    Example:
        >>> quant_method_of({"quant_method": "bitsandbytes"}), quant_method_of(None)
        ('bitsandbytes', None)
    """
    if isinstance(quantization_config, Mapping):
        return quantization_config.get("quant_method")
    return getattr(quantization_config, "quant_method", None)


class CompressedFormatConfig(QuantizationConfigMixin):
    """Base ``quantization_config`` of an hf_compress checkpoint format.

    Subclasses set ``QUANT_METHOD`` (the ``quant_method`` name in ``config.json``) and
    ``FORMAT_VERSION`` (the newest on-disk layout this code reads and writes, bumped on incompatible
    changes). Instances carry ``quant_method`` and the checkpoint's ``format_version``; every other
    keyword is stored as an attribute and written back by ``to_dict``, so fields this version does
    not know survive a load/save round trip.

    Example:
        >>> class MyConfig(CompressedFormatConfig):
        ...     QUANT_METHOD = "my_format"
        >>> MyConfig(block_size=4).to_dict()
        {'block_size': 4, 'quant_method': 'my_format', 'format_version': 1}
    """

    QUANT_METHOD: ClassVar[str] = ""
    FORMAT_VERSION: ClassVar[int] = 1

    def __init__(self, **kwargs: Any) -> None:
        stored_method = kwargs.pop("quant_method", None)
        if stored_method is not None and stored_method != self.QUANT_METHOD:
            raise ValueError(
                f"{type(self).__name__} reads quant_method {self.QUANT_METHOD!r}, got {stored_method!r}."
            )
        version = kwargs.pop("format_version", self.FORMAT_VERSION)
        for key, value in kwargs.items():
            setattr(self, key, value)
        # Instance attributes, so that ``to_dict`` (a copy of ``__dict__``) writes them to config.json.
        self.quant_method: str = self.QUANT_METHOD
        self.format_version: int = int(version)

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready dict stored as ``quantization_config`` in ``config.json``."""
        return copy.deepcopy(self.__dict__)


class CompressedFormatQuantizer(HfQuantizer):
    """Base ``HfQuantizer`` for hf_compress checkpoint formats: decode at load, then step aside.

    A subclass sets ``config_class`` and implements ``weight_converters()``: transformers v5
    ``WeightConverter``\\ s that gather a parameter's stored tensors (e.g. ``weight``,
    ``weight_bitmask``, ``weight_shape``) and return the dense parameter. They are appended after the
    model's own conversions (``update_weight_conversions``), so renamings and architecture-specific
    converters still apply first, and the loader materialises, converts and places each parameter
    as it streams through the checkpoint.

    These formats are storage formats, not compute formats: once loaded, the weights are ordinary
    dense tensors, so the quantizer removes itself from the model (``postprocess_model``). The model
    is then indistinguishable from one loaded from a dense checkpoint. A *compute* format, whose layers
    stay compressed in memory (``hf_compress_packed``), overrides this: it rebuilds its layers in
    ``_process_model_before_weight_loading`` and keeps the quantizer attached.
    """

    config_class: ClassVar[type[CompressedFormatConfig]]
    requires_calibration = False  # checked in ``validate_environment`` with a clearer message

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        method = self.quantization_config.quant_method
        if not self.pre_quantized:
            raise ValueError(
                f"{method!r} is a checkpoint format written by hf_compress, not an on-the-fly quantization: "
                "load a checkpoint saved in that format instead of passing its config to from_pretrained."
            )
        version = getattr(self.quantization_config, "format_version", 1)
        supported = self.config_class.FORMAT_VERSION
        if version > supported:
            raise ValueError(
                f"This checkpoint uses {method!r} format version {version}, but the installed hf_compress "
                f"reads versions up to {supported}; upgrade hf_compress (pip install -U hf-compress)."
            )

    def _process_model_before_weight_loading(self, model: PreTrainedModel, **kwargs: Any) -> PreTrainedModel:
        # Check the whole checkpoint before a single weight is loaded: a corrupted one must not load at all.
        files = _compat.checkpoint_files_of_preprocess(kwargs)
        if not files:
            logger.warning("%s: no checkpoint files to check (loading from a state dict)", self.quantization_config.quant_method)
            return self.prepare_model(model)
        with CheckpointReader(files) as reader:
            with _overrides_named(model, files, reader):
                self.check_checkpoint(model, reader)
            # Damaged bytes or an edited quantization_config: no override explains those.
            integrity = getattr(self.quantization_config, "integrity", None)
            reader.verify_digests(integrity)
            verify_config_digest(integrity, self.quantization_config.to_dict())
            with _overrides_named(model, files, reader):
                model = self.prepare_model(model)
                check_tensors_match_model(model, reader, stored_differently=self.stored_differently())
        return model

    def stored_differently(self) -> set[str]:
        """Checkpoint keys whose stored shape differs from the model's tensor by design (e.g. sparse values)."""
        return set()

    def check_checkpoint(self, model: PreTrainedModel, reader: CheckpointReader) -> None:
        """Refuse a checkpoint that does not match its ``quantization_config`` (``CheckpointIntegrityError``).

        ``model`` is the freshly built architecture (on the meta device); ``reader`` has the safetensors
        headers and reads single small tensors. After this the base class verifies the checksums, calls
        ``prepare_model`` and checks that every tensor of the prepared model is stored with its shape.
        """

    def prepare_model(self, model: PreTrainedModel) -> PreTrainedModel:
        """Change the freshly built architecture before the weights stream in (e.g. swap or shrink layers)."""
        return model

    def forget_integrity_record(self) -> None:
        """Drop the checksums from the loaded config: a later save writes other bytes (or none of ours)."""
        self.quantization_config.__dict__.pop("integrity", None)

    def weight_converters(self) -> list[WeightTransform]:
        """The converters turning the stored tensors into the model's dense parameters."""
        raise NotImplementedError

    def update_weight_conversions(self, weight_conversions: list, model: PreTrainedModel) -> list:
        # transformers applies renamings first, then at most one converter per key, in list order: ours
        # come last so the model's own converters keep precedence for the keys they handle.
        self._format_conversions = self.weight_converters()
        return list(weight_conversions) + self._format_conversions

    def postprocess_model(self, model: PreTrainedModel, **kwargs: Any) -> PreTrainedModel:
        # The decoded weights are plain tensors: detach the quantizer and the quantization_config so the
        # model is an ordinary one (Trainer, .to(dtype), save_pretrained treat it as unquantized) ...
        self.remove_quantization_config(model)
        # ... and forget our converters: transformers keeps the conversions used at load and reverts them
        # in save_pretrained, which must write dense tensors.
        ours = {id(conversion) for conversion in getattr(self, "_format_conversions", ())}
        _compat.set_model_conversions(model, [c for c in _compat.model_conversions(model) if id(c) not in ours])
        return self._process_model_after_weight_loading(model, **kwargs)

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True


@contextmanager
def _overrides_named(model: PreTrainedModel, files: list[str], reader: CheckpointReader) -> Iterator[None]:
    """A failed structure check on a config overridden at load (``from_pretrained(folder, num_hidden_layers=1)``
    builds another architecture than the one saved) names the overridden fields, rather than blame the files."""
    try:
        yield
    except CheckpointIntegrityError as error:
        overrides = config_overrides(model, Path(files[0]).parent, reader.entries)
        if overrides:
            raise explain_overrides(error, overrides) from error
        raise


def register_format(quantizer_cls: type[CompressedFormatQuantizer]) -> type[CompressedFormatQuantizer]:
    """Register a format's quantizer and its ``config_class`` with transformers under ``QUANT_METHOD``.

    Usable as a class decorator. Registering the same class again (or a reloaded copy of the same
    class) replaces the earlier entry; a different class under a name that is already taken raises.

    Example:
        >>> @register_format  # doctest: +SKIP
        ... class MyQuantizer(CompressedFormatQuantizer):
        ...     config_class = MyConfig
    """
    config_cls = quantizer_cls.config_class
    name = config_cls.QUANT_METHOD
    if not name:
        raise ValueError(f"{config_cls.__name__} must set QUANT_METHOD.")
    _compat.register_quantization_format(name, config_cls, quantizer_cls)
    _FORMATS[name] = quantizer_cls
    logger.debug("registered checkpoint format %r with transformers", name)
    return quantizer_cls


def registered_formats() -> dict[str, type[CompressedFormatQuantizer]]:
    """The hf_compress formats registered with transformers, by ``quant_method`` (imports every format module).

    Example:
        >>> "hf_compress_sparse" in registered_formats()
        True
    """
    from . import FORMAT_MODULES

    for module in FORMAT_MODULES.values():
        importlib.import_module(module)
    return dict(_FORMATS)
