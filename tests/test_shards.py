"""Writing safetensors one tensor at a time and indexing weight files (hf_compress.formats.shards)."""

from __future__ import annotations

import gc
import json
import weakref

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from hf_compress.formats.integrity import read_header
from hf_compress.formats.shards import TensorSpec, index_weight_files, write_safetensors, write_tensor


def _made_when_written(name, dtype, shape, make) -> TensorSpec:
    """A tensor made only when its turn to be written comes, as the sparse save's encodings are."""
    return TensorSpec(name, dtype, shape, lambda handle: write_tensor(handle, make()))


def test_written_file_reads_back_with_safetensors_aligned_and_with_metadata(tmp_path):
    tensors = {"a": torch.randn(3, 5), "b": torch.randn(7).to(torch.bfloat16), "mask": torch.tensor([[1, 2, 3]], dtype=torch.uint8),
               "shape": torch.tensor([3, 5]), "empty": torch.zeros(0, 4), "half": torch.randn(2, 3).half()}
    write_safetensors(tmp_path / "x.safetensors", [TensorSpec.of(k, v) for k, v in tensors.items()], {"format": "pt"})
    loaded = load_file(tmp_path / "x.safetensors")
    assert loaded.keys() == tensors.keys()
    assert all(torch.equal(loaded[k], v) and loaded[k].dtype == v.dtype for k, v in tensors.items())
    with safe_open(tmp_path / "x.safetensors", "pt") as handle:
        assert handle.metadata() == {"format": "pt"}
    for entry in read_header(tmp_path / "x.safetensors").values():  # each tensor starts at a multiple of its item size
        assert entry.begin % {"F32": 4, "BF16": 2, "F16": 2, "U8": 1, "I64": 8}[entry.dtype] == 0


def test_tensors_are_made_one_at_a_time(tmp_path):
    alive: list[weakref.ref] = []

    def maker(value: float):
        def make() -> torch.Tensor:
            gc.collect()
            assert all(ref() is None for ref in alive), "an earlier tensor is still held"
            tensor = torch.full((64,), value)
            alive.append(weakref.ref(tensor))
            return tensor
        return make

    specs = [_made_when_written(f"t{i}", torch.float32, (64,), maker(float(i))) for i in range(4)]
    write_safetensors(tmp_path / "x.safetensors", specs)
    assert len(alive) == 4
    loaded = load_file(tmp_path / "x.safetensors")
    assert [float(loaded[f"t{i}"][0]) for i in range(4)] == [0.0, 1.0, 2.0, 3.0]


def test_a_tensor_of_the_wrong_size_and_bad_specs_are_refused(tmp_path):
    wrong = _made_when_written("w", torch.float32, (4,), lambda: torch.zeros(3))
    with pytest.raises(RuntimeError, match="wrote 12 bytes; its dtype and shape take 16"):
        write_safetensors(tmp_path / "x.safetensors", [wrong])
    with pytest.raises(ValueError, match="two tensors are named"):
        write_safetensors(tmp_path / "y.safetensors", [TensorSpec.of("w", torch.zeros(1))] * 2)
    with pytest.raises(ValueError, match="cannot store"):
        write_safetensors(tmp_path / "z.safetensors", [TensorSpec.of("c", torch.zeros(1, dtype=torch.complex64))])


def test_copied_tensors_equal_their_source(tmp_path):
    source = {"x": torch.randn(100, 10), "y": torch.arange(9)}
    save_file(source, tmp_path / "a.safetensors")
    entries = read_header(tmp_path / "a.safetensors")
    write_safetensors(tmp_path / "b.safetensors", [TensorSpec.copied_from(k, e) for k, e in entries.items()])
    copied = load_file(tmp_path / "b.safetensors")
    assert all(torch.equal(copied[k], v) for k, v in source.items())


@pytest.mark.parametrize("dense_sharded", [False, True])
def test_index_names_every_file_as_one_sharded_checkpoint(tmp_path, dense_sharded):
    if dense_sharded:
        save_file({"a": torch.zeros(2)}, tmp_path / "model-00001-of-00002.safetensors", {"format": "pt"})
        save_file({"b": torch.zeros(3)}, tmp_path / "model-00002-of-00002.safetensors", {"format": "pt"})
        index = {"metadata": {"total_parameters": 5, "total_size": 20},
                 "weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
        (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    else:
        save_file({"a": torch.zeros(2), "b": torch.zeros(3)}, tmp_path / "model.safetensors", {"format": "pt"})
    save_file({"c": torch.zeros(4, dtype=torch.uint8)}, tmp_path / "sparse.safetensors")
    index_weight_files(tmp_path, {"sparse.safetensors": ["c"]}, total_parameters=5)
    count = 3 if dense_sharded else 2
    names = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert names == [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"] == {"total_parameters": 5, "total_size": 24}
    assert set(index["weight_map"]) == {"a", "b", "c"}
    for name, file in index["weight_map"].items():
        with safe_open(tmp_path / file, "pt") as handle:
            assert name in handle.keys()
