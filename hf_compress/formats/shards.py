"""Write safetensors files one tensor at a time, and index a folder's weight files as one sharded checkpoint.

safetensors' own writers take every tensor of a file at once, so a file of tensors made on the fly (the sparse
format's encodings) would hold them all in memory. The layout is simple (8-byte little-endian header length, a JSON
header, the tensors back to back), and the size of each tensor is known before it is made, so the header goes first
and each tensor is made, written and dropped in turn. Tensors are laid out by decreasing item size after a header
padded to 8 bytes, so every tensor starts at a multiple of its item size (as safetensors itself aligns them).

Example:
    >>> import torch
    >>> spec = TensorSpec.of("w", torch.zeros(2, 3))
    >>> write_safetensors("w.safetensors", [spec])  # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import torch

from .integrity import TensorEntry, read_header


__all__ = ["TensorSpec", "index_weight_files", "write_safetensors", "write_tensor"]

_DTYPE_NAME = {
    torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16", torch.float16: "F16",
    torch.bfloat16: "BF16", torch.int32: "I32", torch.float32: "F32", torch.int64: "I64", torch.float64: "F64",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2", torch.uint16: "U16", torch.uint32: "U32",
    torch.uint64: "U64",
}
_DTYPE_OF_NAME = {name: dtype for dtype, name in _DTYPE_NAME.items()}
_COPY_CHUNK = 64 * 2**20  # bytes copied at a time from an existing file


class TensorSpec(NamedTuple):
    """One tensor of a file to write: its name, dtype, shape, and a function that writes its bytes to a handle."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    write: Callable[[BinaryIO], None]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    @classmethod
    def of(cls, name: str, tensor: torch.Tensor) -> TensorSpec:
        """A tensor already in memory."""
        return cls(name, tensor.dtype, tuple(tensor.shape), lambda handle: write_tensor(handle, tensor))

    @classmethod
    def copied_from(cls, name: str, entry: TensorEntry) -> TensorSpec:
        """A tensor of an existing safetensors file, copied byte for byte in chunks."""
        dtype = _DTYPE_OF_NAME[entry.dtype]  # every dtype read_header accepts

        def copy(handle: BinaryIO) -> None:
            with open(entry.file, "rb") as source:
                source.seek(entry.begin)
                left = entry.end - entry.begin
                while left:
                    chunk = source.read(min(left, _COPY_CHUNK))
                    if not chunk:
                        raise OSError(f"{entry.file} ended before tensor {name!r} did")
                    handle.write(chunk)
                    left -= len(chunk)

        return cls(name, dtype, entry.shape, copy)


def write_tensor(handle: BinaryIO, tensor: torch.Tensor) -> None:
    """Write ``tensor``'s bytes (row-major, little-endian as the host stores them); a contiguous CPU tensor is
    written from its own memory, anything else from one contiguous CPU copy."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    if flat.numel():
        handle.write(memoryview(flat.view(torch.uint8).numpy()))


def write_safetensors(path: str | os.PathLike, specs: Iterable[TensorSpec],
                      metadata: Mapping[str, str] | None = None) -> None:
    """Write a safetensors file of ``specs``, holding one tensor at a time.

    Raises:
        ValueError: a dtype safetensors cannot store, or two tensors of one name.
        RuntimeError: a spec wrote another number of bytes than its dtype and shape take (the file is then
            incomplete: write inside a staging folder, ``utils.atomic_directory``).
    """
    specs = sorted(specs, key=lambda spec: (-spec.dtype.itemsize, spec.name))
    header: dict[str, Any] = {}
    offset = 0
    for spec in specs:
        if spec.dtype not in _DTYPE_NAME:
            raise ValueError(f"safetensors cannot store {spec.name!r} of dtype {spec.dtype}.")
        if spec.name in header:
            raise ValueError(f"two tensors are named {spec.name!r}.")
        header[spec.name] = {"dtype": _DTYPE_NAME[spec.dtype], "shape": list(spec.shape),
                             "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    if metadata:
        header["__metadata__"] = dict(metadata)
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)  # tensors start 8-byte aligned
    with open(path, "wb") as handle:
        handle.write(len(encoded).to_bytes(8, "little"))
        handle.write(encoded)
        for spec in specs:
            start = handle.tell()
            spec.write(handle)
            if handle.tell() - start != spec.nbytes:
                raise RuntimeError(f"tensor {spec.name!r} wrote {handle.tell() - start} bytes; its dtype and shape "
                                   f"take {spec.nbytes}.")


def index_weight_files(folder: str | os.PathLike, added: Mapping[str, list[str]], total_parameters: int) -> None:
    """Name the weight files of ``folder`` as one sharded checkpoint (``model-0000i-of-0000N.safetensors``) with one
    ``model.safetensors.index.json``: those ``save_pretrained`` wrote (one file, or shards with their index) and
    ``added`` (file name -> the tensors it holds), written beside them.

    ``total_parameters``: recorded in the index as transformers records it (when it wrote no index itself).
    """
    from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

    if not added:
        return
    folder = Path(folder)
    index_path = folder / SAFE_WEIGHTS_INDEX_NAME
    if index_path.exists():
        index = json.loads(index_path.read_text(encoding="utf-8"))
        weight_map: dict[str, str] = dict(index["weight_map"])
        metadata = dict(index.get("metadata", {}))
    else:
        weight_map = dict.fromkeys(read_header(folder / SAFE_WEIGHTS_NAME), SAFE_WEIGHTS_NAME)
        metadata = {"total_parameters": total_parameters, "total_size": _tensor_bytes(folder / SAFE_WEIGHTS_NAME)}
    files = sorted(set(weight_map.values()))
    for filename, names in added.items():
        metadata["total_size"] = metadata.get("total_size", 0) + _tensor_bytes(folder / filename)
        weight_map.update(dict.fromkeys(names, filename))
        files.append(filename)
    renamed = {old: f"model-{number:05d}-of-{len(files):05d}.safetensors" for number, old in enumerate(files, 1)}
    for old, new in renamed.items():  # "-of-N" grew (added is not empty), so no new name is an old one
        if old != new:
            shutil.move(folder / old, folder / new)
    index = {"metadata": metadata, "weight_map": {name: renamed[file] for name, file in weight_map.items()}}
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _tensor_bytes(path: Path) -> int:
    return sum(entry.end - entry.begin for entry in read_header(path).values())
