"""Corrupted checkpoints of the three formats (sparse, packed, slim): each must be refused with a clear error.

Every case starts from a fresh, sealed checkpoint of a tiny Llama, damages it one way, and loads it with
``AutoModelForCausalLM.from_pretrained``. Outcomes: ``refused`` (an error naming the file, tensor or
setting), ``unclear`` (an error that names none of them), ``loaded_same`` / ``loaded_different`` (the
logits of the loaded model against the undamaged one), and the growth of the process's peak memory.
Cases marked ``stripped`` also delete the checksums first, to test the structural checks on their own.
"""

from __future__ import annotations

import json
import resource
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from hf_compress.formats.sparse import pack_bitmask, unpack_bitmask


CLEAR_MARKERS = ("CheckpointIntegrityError", ".safetensors", "config.json", "quantization_config", "hf_compress", "tensor", "format", "size mismatch")


@dataclass
class Corruption:
    fmt: str
    name: str
    damage: Callable[[Path], None]
    stripped: bool = False  # delete the integrity record first (structural checks alone)


# ------------------------------------------------------------------------------------------- damage


def _config(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "config.json").read_text())


def _write_config(folder: Path, config: dict[str, Any]) -> None:
    (folder / "config.json").write_text(json.dumps(config))


def edit_qconfig(change: Callable[[dict[str, Any]], None]) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        config = _config(folder)
        change(config["quantization_config"])
        _write_config(folder, config)
    return damage


def strip_integrity(folder: Path) -> None:
    edit_qconfig(lambda q: q.pop("integrity", None))(folder)


def edit_tensors(change: Callable[[dict[str, torch.Tensor]], None]) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        tensors = load_file(folder / "model.safetensors")
        change(tensors)
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return damage


def edit_header(change: Callable[[dict[str, Any]], None]) -> Callable[[Path], None]:
    """Rewrite the safetensors header in place (the data bytes stay as they are)."""
    def damage(folder: Path) -> None:
        path = folder / "model.safetensors"
        raw = path.read_bytes()
        length = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8 : 8 + length])
        change(header)
        encoded = json.dumps(header).encode()
        encoded += b" " * (-len(encoded) % 8)
        path.write_bytes(len(encoded).to_bytes(8, "little") + encoded + raw[8 + length :])
    return damage


def truncate(fraction: float | None = None, size: int | None = None) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        path = folder / "model.safetensors"
        raw = path.read_bytes()
        path.write_bytes(raw[: size if size is not None else int(len(raw) * fraction)])
    return damage


def flip_data_byte(folder: Path) -> None:
    path = folder / "model.safetensors"
    raw = bytearray(path.read_bytes())
    raw[-len(raw) // 3] ^= 0x10
    path.write_bytes(bytes(raw))


def first(tensors: dict[str, torch.Tensor], suffix: str) -> str:
    return sorted(name for name in tensors if name.endswith(suffix))[0]


def _move_bit(tensors: dict[str, torch.Tensor]) -> None:
    # clear one set bit and set one clear bit in the first row: the popcount is unchanged
    _edit_first_row_bits(tensors, clear_one=True)


def _add_bit(tensors: dict[str, torch.Tensor]) -> None:
    _edit_first_row_bits(tensors, clear_one=False)


def _edit_first_row_bits(tensors: dict[str, torch.Tensor], clear_one: bool) -> None:
    name = first(tensors, ".weight_bitmask")
    bits = tensors[name].clone()
    row = unpack_bitmask(bits[:1], [1, 8 * bits.shape[1]])[0]
    on, off = int(row.nonzero()[0]), int((~row).nonzero()[0])
    row[off] = True
    if clear_one:
        row[on] = False
    bits[0] = pack_bitmask(row.unsqueeze(0))[0]
    tensors[name] = bits


def _set(name_suffix: str, make: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[dict], None]:
    def change(tensors: dict[str, torch.Tensor]) -> None:
        name = first(tensors, name_suffix)
        tensors[name] = make(tensors[name])
    return change


def _drop(name_suffix: str) -> Callable[[dict], None]:
    return lambda tensors: tensors.pop(first(tensors, name_suffix))


def _header_entry(suffix: str, change: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], None]:
    def edit(header: dict[str, Any]) -> None:
        name = sorted(n for n in header if n.endswith(suffix))[0]
        change(header[name])
    return edit


def _overlap(header: dict[str, Any]) -> None:
    names = sorted((n for n in header if n != "__metadata__"), key=lambda n: header[n]["data_offsets"][0])
    a, b = header[names[1]], header[names[2]]
    size = b["data_offsets"][1] - b["data_offsets"][0]
    if size <= a["data_offsets"][1] - a["data_offsets"][0]:
        b["data_offsets"] = [a["data_offsets"][0], a["data_offsets"][0] + size]
    else:
        a["data_offsets"] = [b["data_offsets"][0], b["data_offsets"][0] + a["data_offsets"][1] - a["data_offsets"][0]]


def _unknown_dtype(entry: dict[str, Any]) -> None:
    entry["dtype"] = "Q4"


def _relabel_dtype(entry: dict[str, Any]) -> None:
    entry["dtype"] = "I32" if entry["dtype"] == "F32" else "F32"
    if entry["dtype"] in ("F32", "I32"):
        size = entry["data_offsets"][1] - entry["data_offsets"][0]
        entry["shape"] = [size // 4]


def _reshape(entry: dict[str, Any]) -> None:
    total = 1
    for dim in entry["shape"]:
        total *= dim
    entry["shape"] = [total]


def _huge_shape(entry: dict[str, Any]) -> None:
    entry["shape"] = [2**31, 2**31]


def _negative_offsets(entry: dict[str, Any]) -> None:
    begin, end = entry["data_offsets"]
    entry["data_offsets"] = [begin - 64, end - 64]


def common(fmt: str, carrier: str) -> list[Corruption]:
    """Damage every format can suffer; ``carrier`` is a tensor suffix specific to the format."""
    return [
        Corruption(fmt, "truncated to half", truncate(0.5)),
        Corruption(fmt, "truncated to 4 bytes", truncate(size=4)),
        Corruption(fmt, "header length field huge", lambda f: (f / "model.safetensors").write_bytes(
            (2**40).to_bytes(8, "little") + (f / "model.safetensors").read_bytes()[8:])),
        Corruption(fmt, "header not JSON", lambda f: (f / "model.safetensors").write_bytes(
            (f / "model.safetensors").read_bytes()[:8] + b"\xff" * 16 + (f / "model.safetensors").read_bytes()[24:])),
        Corruption(fmt, "flipped data byte", flip_data_byte),
        Corruption(fmt, f"missing tensor {carrier}", edit_tensors(_drop(carrier))),
        Corruption(fmt, "extra tensor", edit_tensors(lambda t: t.__setitem__("model.extra.weight", torch.ones(3)))),
        Corruption(fmt, f"reshaped {carrier}", edit_header(_header_entry(carrier, _reshape))),
        Corruption(fmt, "re-labelled dtype", edit_header(_header_entry("model.norm.weight", _relabel_dtype))),
        Corruption(fmt, "unknown dtype", edit_header(_header_entry(carrier, _unknown_dtype))),
        Corruption(fmt, "huge shape in header", edit_header(_header_entry(carrier, _huge_shape))),
        Corruption(fmt, "negative offsets", edit_header(_header_entry(carrier, _negative_offsets))),
        Corruption(fmt, "overlapping tensors", edit_header(_overlap)),
        Corruption(fmt, "format_version 99", edit_qconfig(lambda q: q.__setitem__("format_version", 99))),
        Corruption(fmt, "altered checksum", edit_qconfig(lambda q: q["integrity"]["tensors"].__setitem__(
            sorted(q["integrity"]["tensors"])[0], "0" * 16))),
        Corruption(fmt, "unknown checksum algorithm", edit_qconfig(lambda q: q["integrity"].__setitem__("algorithm", "md5"))),
        Corruption(fmt, "missing norm weight (no checksums)", edit_tensors(_drop("model.norm.weight")), stripped=True),
    ]


def sparse_cases() -> list[Corruption]:
    return common("sparse", ".weight_bitmask") + [
        Corruption("sparse", "moved bitmask bit", edit_tensors(_move_bit)),
        Corruption("sparse", "extra bitmask bit (no checksums)", edit_tensors(_add_bit), stripped=True),
        Corruption("sparse", "huge stored shape (no checksums)",
                   edit_tensors(_set(".weight_shape", lambda s: torch.tensor([2**30, 2**30]))), stripped=True),
        Corruption("sparse", "negative stored shape (no checksums)",
                   edit_tensors(_set(".weight_shape", lambda s: -s)), stripped=True),
        Corruption("sparse", "padding bits set (no checksums)",
                   edit_tensors(_set(".weight_bitmask", lambda b: torch.cat([b, torch.full((b.shape[0], 1), 128, dtype=torch.uint8)], 1))),
                   stripped=True),
        Corruption("sparse", "module missing from compressed_modules",
                   edit_qconfig(lambda q: q["compressed_modules"].pop(0))),
        Corruption("sparse", "unknown module in compressed_modules",
                   edit_qconfig(lambda q: q["compressed_modules"].append("model.layers.0.mlp.nope"))),
        Corruption("sparse", "values truncated (no checksums)",
                   edit_tensors(_set("mlp.up_proj.weight", lambda v: v[:-1])), stripped=True),
    ]


def packed_cases() -> list[Corruption]:
    return common("packed", ".qzeros") + [
        Corruption("packed", "empty modules list", edit_qconfig(lambda q: q.__setitem__("modules", []))),
        Corruption("packed", "one module missing from the list", edit_qconfig(lambda q: q["modules"].pop(0))),
        Corruption("packed", "qzeros out of range (no checksums)",
                   edit_tensors(_set(".qzeros", lambda z: z + 16)), stripped=True),
        Corruption("packed", "bits changed in config", edit_qconfig(lambda q: q.__setitem__("bits", 3))),
        Corruption("packed", "group_size changed in config", edit_qconfig(lambda q: q.__setitem__("group_size", 16))),
        Corruption("packed", "marker removed (no checksums)", edit_tensors(_drop("mlp.up_proj.weight")), stripped=True),
        Corruption("packed", "scales shape wrong (no checksums)",
                   edit_tensors(_set(".scales", lambda s: s[:, :1].contiguous())), stripped=True),
        Corruption("packed", "stray bias (no checksums)",
                   edit_tensors(lambda t: t.__setitem__("model.layers.0.mlp.up_proj.bias", torch.zeros(128))), stripped=True),
    ]


def slim_cases() -> list[Corruption]:
    return common("slim", "mlp.up_proj.weight") + [
        Corruption("slim", "one block too few", edit_qconfig(lambda q: q["layers"].pop())),
        Corruption("slim", "negative width", edit_qconfig(lambda q: q["layers"][0].__setitem__("intermediate_size", -1))),
        Corruption("slim", "width above the architecture",
                   edit_qconfig(lambda q: q["layers"][0].__setitem__("intermediate_size", 10**6))),
        Corruption("slim", "width as a string", edit_qconfig(lambda q: q["layers"][0].__setitem__("key_value_heads", "2"))),
        Corruption("slim", "width key missing", edit_qconfig(lambda q: q["layers"][0].pop("key_value_heads"))),
        Corruption("slim", "width disagrees with the weights (no checksums)",
                   edit_qconfig(lambda q: q["layers"][1].__setitem__("intermediate_size", 16)), stripped=True),
    ]


# ------------------------------------------------------------------------------------------- builds


def build_checkpoints(workdir: Path) -> dict[str, Path]:
    """A sealed checkpoint of each format from tiny Llamas."""
    from hf_compress.assets import tiny_model
    from hf_compress.formats.integrity import seal_checkpoint
    from hf_compress.formats.slim import save_slim
    from hf_compress.modeling.structure import block_structure, shrink_block
    from hf_compress.pruning.storage import save_pruned
    from hf_compress.quantization import quantize_rtn

    folders = {}
    model, tokenizer = tiny_model("llama")
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "proj" in name:
                parameter.mul_(torch.rand_like(parameter) > 0.5)
    folders["sparse"] = save_pruned(model, tokenizer, workdir / "sparse")
    model, tokenizer = tiny_model("llama")
    packed = quantize_rtn(model, bits=4, group_size=32)
    packed.save_pretrained(workdir / "packed")
    seal_checkpoint(workdir / "packed")
    folders["packed"] = workdir / "packed"
    model, tokenizer = tiny_model("llama")
    shrink_block(block_structure(model.model.layers[1]), kept_ffn=torch.arange(32))
    folders["slim"] = save_slim(model, tokenizer, workdir / "slim")
    return folders


def _logits(folder: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        return model(torch.arange(1, 17).unsqueeze(0)).logits


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_case(case: Corruption, good: Path, reference: torch.Tensor, workdir: Path, model_bytes: int) -> dict[str, Any]:
    folder = workdir / f"{case.fmt}-{len(list(workdir.iterdir()))}"
    shutil.copytree(good, folder)
    if case.stripped:
        strip_integrity(folder)
    case.damage(folder)
    row: dict[str, Any] = {"format": case.fmt, "case": case.name}
    before = _peak_rss()
    try:
        logits = _logits(folder)
    except Exception as err:  # noqa: BLE001 - classifying is the point
        message = str(err).splitlines()[0] if str(err) else ""
        clear = any(marker in f"{type(err).__name__}: {err}" for marker in CLEAR_MARKERS)
        row["outcome"] = "refused" if clear else "unclear"
        row["error"] = f"{type(err).__name__}: {message}"[:240]
    else:
        same = logits.shape == reference.shape and torch.equal(logits, reference)
        row["outcome"] = "loaded_same" if same else "loaded_different"
    row["peak_memory_growth_bytes"] = max(0, _peak_rss() - before)
    row["over_2x_model"] = row["peak_memory_growth_bytes"] > 2 * model_bytes + 64 * 2**20  # + interpreter slack
    shutil.rmtree(folder, ignore_errors=True)
    return row


def without_import(fmt: str, folder: Path) -> dict[str, Any]:
    """Stock transformers (no ``import hf_compress``) must refuse the checkpoint, not fill it randomly."""
    code = "import sys; from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained(sys.argv[1])"
    done = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True, timeout=300)
    tail = (done.stderr.strip().splitlines() or [""])[-1]
    names_format = f"hf_compress_{fmt}" in done.stderr
    return {
        "format": fmt, "case": "loaded without import hf_compress",
        "outcome": "refused" if done.returncode != 0 and names_format else ("unclear" if done.returncode else "loaded_different"),
        "error": tail[:240], "peak_memory_growth_bytes": 0, "over_2x_model": False,
    }


def run(workdir: Path) -> list[dict[str, Any]]:
    """Every corruption of every format, plus a stock-transformers load of each format."""
    workdir.mkdir(parents=True, exist_ok=True)
    folders = build_checkpoints(workdir / "good")
    rows = []
    cases = {"sparse": sparse_cases(), "packed": packed_cases(), "slim": slim_cases()}
    scratch = workdir / "cases"
    scratch.mkdir(exist_ok=True)
    for fmt, folder in folders.items():
        reference = _logits(folder)
        model_bytes = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
        for case in cases[fmt]:
            rows.append(run_case(case, folder, reference, scratch, model_bytes))
        rows.append(without_import(fmt, folder))
    return rows
