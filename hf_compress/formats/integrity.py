"""Checkpoint integrity for hf_compress's formats: read the safetensors headers, check, verify checksums.

A compressed checkpoint that loads *wrong* is worse than one that does not load: a moved bitmask bit or an
out-of-range zero-point gives a model that runs and answers differently. So before any weight is loaded,
every format checks its checkpoint against its ``quantization_config`` (:class:`CheckpointReader` gives it
the headers and, on request, single small tensors), and every tensor's bytes are checked against the
digest recorded when the checkpoint was written (:func:`seal_checkpoint`). All of it is one pass over the
files through a memory map: nothing is loaded twice and nothing is allocated from a size the file claims
before that size is checked against the file.

The digests live in ``config.json`` (``quantization_config.integrity``: algorithm and one 64-bit digest per
tensor) because ``config.json`` is the one file every loader reads, locally or from the Hub. The record also
holds a digest of the ``quantization_config`` fields that say how the tensors are read (not ``recipe``, ``storage``):
an edited ``group_size`` or ``symmetric`` would otherwise load wrong weights from intact tensors. A checkpoint
without a record (written by a plain ``save_pretrained`` of a loaded model) still gets every structural check.

Example:
    >>> seal_checkpoint("llama-2-4")  # doctest: +SKIP
    >>> with CheckpointReader(["llama-2-4/model.safetensors"]) as reader:  # doctest: +SKIP
    ...     reader.verify_digests(json.load(open("llama-2-4/config.json"))["quantization_config"]["integrity"])
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import mmap
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


__all__ = [
    "DIGEST_ALGORITHM",
    "CheckpointIntegrityError",
    "CheckpointReader",
    "TensorEntry",
    "check_module_lists",
    "check_tensors_match_model",
    "config_overrides",
    "explain_overrides",
    "read_header",
    "seal_checkpoint",
    "verify_config_digest",
]

DIGEST_ALGORITHM = "sha256/64"
"""The first 64 bits of SHA-256 of a tensor's dtype, shape and stored bytes: catches corruption, fast (about 1 GB/s)."""

_ITEMSIZE = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
    "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8,
}
_TORCH_DTYPE = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "F16": torch.float16,
    "BF16": torch.bfloat16, "I32": torch.int32, "F32": torch.float32, "I64": torch.int64, "F64": torch.float64,
}
# Fields that describe how a checkpoint was made or what it measured, not how its tensors are read: editing them
# changes no weight (the sparse format's ``storage`` sizes and ``min_sparsity`` threshold are read by nothing at load).
_UNSEALED_CONFIG_FIELDS = frozenset({"integrity", "recipe", "storage", "min_sparsity"})
_MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit
_SMALL_TENSOR_BYTES = 256 * 2**20  # the most ``CheckpointReader.read`` copies into memory at once


class CheckpointIntegrityError(ValueError):
    """A checkpoint does not match its ``config.json`` or its recorded checksums: it is not loaded.

    The message names the file or tensor and says what to do (re-download or re-save; added if missing).
    """

    def __init__(self, message: str) -> None:
        hints = ("re-download", "re-save", "upgrade", "save it again", "Save the model", "without overriding")
        if not any(hint in message for hint in hints):
            message = f"{message} The checkpoint is corrupted or was edited; re-download it (or save it again)."
        super().__init__(message)


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors header: its file, dtype name, shape and absolute byte range."""

    file: Path
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


_NOT_ARCHITECTURE = frozenset({"architectures", "auto_map", "dtype", "quantization_config", "torch_dtype",
                                "transformers_version"})
"""config.json fields that differ between a saved and a loaded config without changing the model's shapes."""

_CORRUPT_SENTENCE = re.compile(r"[;.]?\s*the checkpoint is corrupted or (?:was edited|incomplete)[^.]*\.", re.IGNORECASE)


def config_overrides(model: torch.nn.Module, folder: str | os.PathLike, stored: Iterable[str]) -> dict[str, tuple[Any, Any]]:
    """Fields of ``model.config`` (the config a model is being built from) that differ from ``folder/config.json``,
    ``{name: (saved, loaded)}`` (``text_config.num_hidden_layers`` for a nested one), when they change the shape or
    number of tensors the checkpoint stores (``stored``: its keys), as ``from_pretrained(folder,
    num_hidden_layers=1)`` or ``config=`` can; ``{}`` when they do not (``use_cache=False``, a new head's
    ``num_labels``).

    Example:
        >>> config_overrides(model, "sparse-folder/", reader.entries)  # doctest: +SKIP
        {'num_hidden_layers': (2, 1)}
    """
    config = model.config
    try:
        saved_config = type(config).from_dict(json.loads((Path(folder) / "config.json").read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError):
        return {}
    loaded = config.to_dict()
    changed = dict(_differences(saved_config.to_dict(), loaded))
    if not changed:
        return {}
    prefix = getattr(model, "base_model_prefix", "") or ""
    # Modules the checkpoint stores something for (an encoded weight is stored under other keys of its module).
    modules = {key.rsplit(".", 1)[0] for key in stored}

    def is_stored(name: str) -> bool:
        module = name.rsplit(".", 1)[0]
        return any(candidate in modules for candidate in (module, f"{prefix}.{module}", module.removeprefix(f"{prefix}.")))

    shapes = [_meta_shapes(type(model), built) for built in (saved_config, type(config).from_dict(loaded))]
    if None in shapes:  # an architecture that cannot be built this way: say nothing rather than guess
        return {}
    saved_shapes, loaded_shapes = ({name: shape for name, shape in built.items() if is_stored(name)} for built in shapes)
    return changed if saved_shapes != loaded_shapes else {}


def _meta_shapes(model_class: type, config: Any) -> dict[str, tuple[int, ...]] | None:
    """The state-dict shapes of ``model_class(config)``, built on the meta device (no memory); ``None`` when that
    class cannot be built from this config."""
    try:
        with torch.device("meta"):
            return {name: tuple(tensor.shape) for name, tensor in model_class(config).state_dict().items()}
    except Exception:  # whatever the class's constructor raises
        return None


def _differences(saved: Mapping[str, Any], loaded: Mapping[str, Any], path: str = "") -> Iterable[tuple[str, tuple[Any, Any]]]:
    """``(dotted name, (saved, loaded))`` of the fields that differ, nested configs field by field."""
    for name, value in sorted(saved.items()):
        if name not in loaded or name in _NOT_ARCHITECTURE or name.startswith("_") or loaded[name] == value:
            continue
        if isinstance(value, Mapping) and isinstance(loaded[name], Mapping):
            yield from _differences(value, loaded[name], f"{path}{name}.")
        else:
            yield f"{path}{name}", (value, loaded[name])


def explain_overrides(error: CheckpointIntegrityError, overrides: Mapping[str, tuple[Any, Any]]) -> CheckpointIntegrityError:
    """``error`` restated for a config overridden at load: the fields, not the file, are what to change."""
    changes = ", ".join(f"{name}={loaded!r} (saved: {saved!r})" for name, (saved, loaded) in overrides.items())
    found = _CORRUPT_SENTENCE.sub(".", str(error)).rstrip(". ")
    return CheckpointIntegrityError(
        f"This compressed checkpoint was loaded with a config that differs from its config.json: {changes} "
        "(a from_pretrained keyword argument or config= sets them). Its weights fit only the architecture "
        f"config.json describes; load it without overriding those fields. The check found: {found}."
    )


def _corrupt(where: str, what: str) -> CheckpointIntegrityError:
    return CheckpointIntegrityError(
        f"{where}: {what}. The checkpoint is corrupted or incomplete; re-download it (or save it again)."
    )


def read_header(path: str | os.PathLike) -> dict[str, TensorEntry]:
    """The tensors of a safetensors file, each checked against the file: known dtype, non-negative shape,
    a byte range of exactly ``numel * itemsize`` bytes inside the file, ranges not overlapping.

    Raises:
        CheckpointIntegrityError: truncated file, malformed header or inconsistent entries.

    Example:
        >>> read_header("model.safetensors")["lm_head.weight"].shape  # doctest: +SKIP
        (49152, 576)
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise _corrupt(path.name, f"the file is truncated ({size} bytes, no safetensors header)")
        length = int.from_bytes(prefix, "little")
        if length > min(size - 8, _MAX_HEADER_BYTES):
            raise _corrupt(path.name, f"the header claims {length} bytes but the file has {size - 8} after its size field")
        try:
            header = json.loads(handle.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise _corrupt(path.name, f"the safetensors header is not valid JSON ({err})") from None
    if not isinstance(header, dict):
        raise _corrupt(path.name, "the safetensors header is not a JSON object")
    start = 8 + length
    entries: dict[str, TensorEntry] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        where = f"{path.name}, tensor {name!r}"
        if not isinstance(info, dict):
            raise _corrupt(where, "the header entry is not an object")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in _ITEMSIZE:
            raise _corrupt(where, f"unknown dtype {dtype!r}")
        if not (isinstance(shape, list) and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)):
            raise _corrupt(where, f"invalid shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise _corrupt(where, f"invalid data_offsets {offsets!r}")
        begin, end = offsets
        expected = math.prod(shape) * _ITEMSIZE[dtype]
        if begin < 0 or end - begin != expected:
            raise _corrupt(where, f"shape {shape} ({dtype}) needs {expected} bytes but the header gives {end - begin}")
        if start + end > size:
            raise _corrupt(where, f"the file is truncated: the tensor ends at byte {start + end}, the file has {size}")
        entries[name] = TensorEntry(path, dtype, tuple(shape), start + begin, start + end)
    spans = sorted((e.begin, e.end, n) for n, e in entries.items() if e.end > e.begin)
    for (_, first_end, first), (second_begin, _, second) in zip(spans, spans[1:]):
        if second_begin < first_end:
            raise _corrupt(path.name, f"tensors {first!r} and {second!r} overlap")
    return entries


class CheckpointReader:
    """The headers of a checkpoint's safetensors files, plus memory-mapped access to single tensors.

    Use as a context manager (the memory maps close at the end).

    Example:
        >>> with CheckpointReader(["model.safetensors"]) as reader:  # doctest: +SKIP
        ...     reader.read("model.layers.0.mlp.up_proj.qzeros").max()
    """

    def __init__(self, files: Iterable[str | os.PathLike]) -> None:
        self.entries: dict[str, TensorEntry] = {}
        self._maps: dict[Path, mmap.mmap] = {}
        self._keys_as_loaded: dict[str, str] | None = None
        for file in files:
            path = Path(file)
            if path.suffix != ".safetensors":
                raise CheckpointIntegrityError(
                    f"{path.name}: hf_compress checkpoints are stored as safetensors; this file is not. "
                    "Save the model again with hf_compress."
                )
            for name, entry in read_header(path).items():
                if name in self.entries:
                    raise _corrupt(path.name, f"tensor {name!r} is also stored in {self.entries[name].file.name}")
                self.entries[name] = entry

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: Any) -> None:
        for view in self._maps.values():
            view.close()
        self._maps.clear()

    def keys_as_loaded(self, model: torch.nn.Module) -> dict[str, str]:
        """Each stored key under the name loading gives it (``model``'s architecture renamings applied; save_pretrained
        reverts them) → the stored key; computed once per reader, for the format's checks and the tensors' check alike.
        """
        if self._keys_as_loaded is None:
            from .. import _compat

            self._keys_as_loaded = (_compat.model_names_of_checkpoint_keys(model, list(self.entries))
                                    if hasattr(model, "config") else {key: key for key in self.entries})
        return self._keys_as_loaded

    def _bytes(self, entry: TensorEntry) -> memoryview:
        view = self._maps.get(entry.file)
        if view is None:
            with open(entry.file, "rb") as handle:
                view = self._maps[entry.file] = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        return memoryview(view)[entry.begin:entry.end]

    def read(self, name: str) -> torch.Tensor:
        """A copy of tensor ``name`` (only for small tensors: bitmasks, zero-points, shapes)."""
        entry = self.entries[name]
        if entry.end - entry.begin > _SMALL_TENSOR_BYTES:
            raise ValueError(f"{name} is {entry.end - entry.begin} bytes; read() is for small tensors.")
        if entry.dtype not in _TORCH_DTYPE:
            raise _corrupt(name, f"dtype {entry.dtype} is not one hf_compress writes here")
        data = bytearray(self._bytes(entry))
        return torch.frombuffer(data, dtype=_TORCH_DTYPE[entry.dtype]).reshape(entry.shape) if data else (
            torch.empty(entry.shape, dtype=_TORCH_DTYPE[entry.dtype])
        )

    def digest(self, name: str) -> str:
        """``DIGEST_ALGORITHM`` of tensor ``name``'s stored bytes (hex)."""
        entry = self.entries[name]
        view = self._bytes(entry)
        try:
            # dtype and shape are hashed too: the same bytes re-labelled or reshaped are a different tensor
            digest = hashlib.sha256(f"{entry.dtype}{list(entry.shape)}".encode())
            digest.update(view)
            return digest.hexdigest()[:16]
        finally:
            view.release()

    def digests(self) -> dict[str, str]:
        """Every tensor's digest, by name."""
        return {name: self.digest(name) for name in sorted(self.entries)}

    def mismatched_tensors(self, recorded: Mapping[str, str]) -> tuple[list[str], list[str], list[str]]:
        """Names, each list sorted: tensors ``recorded`` (name → digest) lists that are not stored here, tensors
        stored here that it does not list, and tensors whose digest differs from the recorded one.

        Example:
            >>> with CheckpointReader(["model.safetensors"]) as reader:  # doctest: +SKIP
            ...     missing, extra, changed = reader.mismatched_tensors(integrity["tensors"])
        """
        missing = sorted(set(recorded) - set(self.entries))
        extra = sorted(set(self.entries) - set(recorded))
        changed = [name for name in sorted(recorded) if name in self.entries and self.digest(name) != recorded[name]]
        return missing, extra, changed

    def verify_digests(self, integrity: Mapping[str, Any] | None) -> None:
        """Compare the tensors with the ``integrity`` record of ``config.json`` (nothing to do without one).

        Raises:
            CheckpointIntegrityError: a tensor is missing, extra, or its bytes changed.
        """
        if not integrity:
            return
        if not isinstance(integrity, Mapping) or not isinstance(integrity.get("tensors"), Mapping):
            raise _corrupt("config.json", "quantization_config.integrity is malformed")
        if integrity.get("algorithm") != DIGEST_ALGORITHM:
            raise CheckpointIntegrityError(
                f"config.json: checksums use {integrity.get('algorithm')!r}, this hf_compress knows "
                f"{DIGEST_ALGORITHM!r}; upgrade hf_compress (pip install -U hf-compress)."
            )
        missing, extra, changed = self.mismatched_tensors(integrity["tensors"])
        if missing:
            raise _corrupt("checkpoint", f"{len(missing)} recorded tensor(s) are missing, e.g. {missing[0]!r}")
        if extra:
            raise _corrupt("checkpoint", f"{len(extra)} tensor(s) were not in the saved checkpoint, e.g. {extra[0]!r}")
        if changed:
            name = changed[0]
            raise _corrupt(f"{self.entries[name].file.name}, tensor {name!r}", "its bytes differ from the checksum recorded at save")


def check_module_lists(listed: set[str], stored: set[str], field: str, kind: str) -> None:
    """Refuse a checkpoint whose ``quantization_config.<field>`` and stored ``kind`` weights name different modules.

    Example:
        >>> check_module_lists({"a"}, {"a"}, "modules", "packed")
    """
    if listed == stored:
        return
    only_listed, only_stored = sorted(listed - stored), sorted(stored - listed)
    parts = []
    if only_listed:
        parts.append(f"{len(only_listed)} module(s) in quantization_config.{field} have no {kind} weights (e.g. {only_listed[0]!r})")
    if only_stored:
        parts.append(f"{len(only_stored)} stored {kind} weight(s) are not in quantization_config.{field} (e.g. {only_stored[0]!r})")
    raise _corrupt("config.json and the weights disagree", "; ".join(parts))


def _saved_class_keys(model: torch.nn.Module) -> set[str] | None:
    """The state-dict keys of the class the checkpoint was saved from (``config.architectures``), built from
    ``model.config`` on the meta device; ``None`` when ``model`` is of that class, or that class is unknown here."""
    import transformers

    config = getattr(model, "config", None)
    saved = (getattr(config, "architectures", None) or [None])[0]
    if not isinstance(saved, str) or type(model).__name__ == saved:
        return None
    saved_class = getattr(transformers, saved, None)
    if not isinstance(saved_class, type) or isinstance(model, saved_class):  # a subclass keeps the whole check
        return None
    shapes = _meta_shapes(saved_class, config)  # None: a class this config cannot build keeps every tensor required
    return None if shapes is None else set(shapes)


def check_tensors_match_model(model: torch.nn.Module, reader: CheckpointReader, stored_differently: set[str] = frozenset()) -> None:
    """Every parameter and persistent buffer of ``model`` (tied ones once) is stored, with its shape; a head the
    saved class did not have (``model`` is of another class than ``config.architectures`` names) may be missing.

    transformers would initialise a missing tensor and carry on; a compressed checkpoint missing one is
    corrupted, so it is refused here. ``stored_differently`` names keys a format stores in another shape, or under
    other keys (a sparse fused expert parameter's ``_values``): the format's own check has found those.
    """
    from .. import _compat

    state_keys = set(model.state_dict(keep_vars=True))
    tied = _compat.tied_weight_keys(model)  # filled from their source after loading
    required = [(name, tensor) for name, tensor in model.named_parameters() if name not in tied]
    required += [(name, tensor) for name, tensor in model.named_buffers() if name in state_keys]
    prefix = getattr(model, "base_model_prefix", "") or ""

    def variants(name: str) -> tuple[str, str, str]:
        # A head model's checkpoint loads into its base model and the other way round: "model." comes and goes.
        return name, f"{prefix}.{name}", name.removeprefix(f"{prefix}.")

    def stored_name(name: str) -> str | None:
        for candidate in variants(name):
            if candidate in reader.entries:
                return candidate
        renamed = reader.keys_as_loaded(model)  # keys transformers renames at load (a multimodal model's legacy names)
        return next((renamed[candidate] for candidate in variants(name) if candidate in renamed), None)

    starred: set[str] | None = None

    def merged(name: str) -> bool:
        # A tensor that loading makes from other stored ones (MoE experts saved one per expert and merged, a fused
        # qkv split): stored when its sources are; their shapes are the conversion's business, not checked here.
        nonlocal starred
        pattern = _compat.merged_checkpoint_key(model, name) if hasattr(model, "config") else None
        if pattern is None:
            return False
        renamed = reader.keys_as_loaded(model)
        if starred is None:  # every stored key, renamed as loading renames it, with a number (expert index) as "*"
            starred = {".".join(parts[:i] + ["*"] + parts[i + 1:])
                       for parts in (key.split(".") for key in renamed)
                       for i, part in enumerate(parts) if part.isdigit()}
        # A pattern with an expert index matches a starred key; one without (a fused qkv that loading splits) a key.
        return any(candidate in starred or candidate in renamed for candidate in variants(pattern))

    def encoded(name: str) -> bool:
        return any(candidate in stored_differently for candidate in variants(name))

    @functools.cache
    def saved_keys() -> set[str] | None:  # built only once a tensor is found missing
        return _saved_class_keys(model)

    def new_head(name: str) -> bool:
        # A checkpoint loaded into another head class than it was saved from (a causal LM's into
        # AutoModelForSequenceClassification, a common start for fine-tuning) lacks that head by design: transformers
        # initialises it and reports it. Only tensors the saved class does not have qualify.
        keys = saved_keys()
        return keys is not None and not any(candidate in keys for candidate in variants(name))

    stored = {name: stored_name(name) for name, _ in required}
    stored = {name: key for name, key in stored.items()
              if key is not None or not (encoded(name) or merged(name) or new_head(name))}
    missing = [name for name, key in stored.items() if key is None]
    if missing:
        raise _corrupt("checkpoint", f"{len(missing)} tensor(s) of the model are not stored, e.g. {missing[0]!r}")
    for name, tensor in required:
        if name not in stored:
            continue
        entry = reader.entries[stored[name]]
        differently = name in stored_differently or stored[name] in stored_differently  # model or stored name
        if not differently and entry.shape != tuple(tensor.shape):
            raise _corrupt(
                f"{entry.file.name}, tensor {name!r}",
                f"stored shape {list(entry.shape)} but the model (as config.json describes it) needs {list(tensor.shape)}",
            )


def seal_checkpoint(folder: str | os.PathLike) -> dict[str, Any]:
    """Record every tensor's digest in ``folder/config.json`` (``quantization_config.integrity``).

    Called by every hf_compress writer of a compressed checkpoint after ``save_pretrained`` (inside its
    staging folder, so the record and the tensors land together). Returns the record.

    Example:
        >>> seal_checkpoint("staging")["algorithm"]  # doctest: +SKIP
        'sha256/64'
    """
    folder = Path(folder)
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if not isinstance(config.get("quantization_config"), dict):
        raise ValueError(f"{config_path} has no quantization_config; only compressed checkpoints are sealed.")
    with CheckpointReader(sorted(folder.glob("*.safetensors"))) as reader:
        record = {"algorithm": DIGEST_ALGORITHM, "tensors": reader.digests()}
    fields = sorted(set(config["quantization_config"]) - _UNSEALED_CONFIG_FIELDS)
    record["config"] = {"fields": fields, "digest": _config_digest(config["quantization_config"], fields)}
    config["quantization_config"]["integrity"] = record
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return record


def verify_config_digest(integrity: Mapping[str, Any] | None, quantization_config: Mapping[str, Any]) -> None:
    """Compare the ``quantization_config`` a checkpoint loads with (``to_dict()``) with the digest sealed at save.

    Nothing to do without a record, or with one from before config digests were recorded.

    Example:
        >>> verify_config_digest(None, {"bits": 4})

    Raises:
        CheckpointIntegrityError: a sealed field was edited or removed.
    """
    sealed = (integrity or {}).get("config") if isinstance(integrity, Mapping) else None
    if sealed is None:
        return
    fields = sealed.get("fields") if isinstance(sealed, Mapping) else None
    if not isinstance(fields, list) or not all(isinstance(name, str) for name in fields):
        raise _corrupt("config.json", "quantization_config.integrity.config is malformed")
    missing = [name for name in fields if name not in quantization_config]
    if missing or _config_digest(quantization_config, fields) != sealed.get("digest"):
        detail = f"its field {missing[0]!r} is missing" if missing else f"one of its fields {', '.join(fields)} was changed"
        raise _corrupt("config.json", f"quantization_config differs from the one saved with these weights ({detail})")


def _config_digest(quantization_config: Mapping[str, Any], fields: Iterable[str]) -> str:
    text = json.dumps({name: quantization_config.get(name) for name in fields}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
