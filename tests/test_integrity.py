"""Checkpoint integrity of the sparse, packed and slim formats: damaged checkpoints never load.

The full matrix (76 corruptions) is ``scripts/bench_robustness.py``; these are one of each kind, fast.
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from hf_compress.assets import tiny_model
from hf_compress.formats.integrity import DIGEST_ALGORITHM, CheckpointIntegrityError, CheckpointReader, read_header
from hf_compress.formats.packed import save_packed
from hf_compress.formats.slim import save_slim
from hf_compress.modeling.structure import block_structure, shrink_block
from hf_compress.modeling.sublayers import remove_sublayers
from hf_compress.pruning.storage import save_pruned
from hf_compress.quantization import quantize_rtn


INPUT = torch.arange(1, 17).unsqueeze(0)


def _removed(model) -> None:
    """Whole sub-blocks removed (BlockPruner, SLEB): widths of 0, whose weights are simply absent."""
    remove_sublayers(model.model.layers[0], mlp=True)
    remove_sublayers(model.model.layers[1], attention=True)


def _sparse(tmp_path, removed: bool = False):
    model, tokenizer = tiny_model("llama")
    if removed:
        _removed(model)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "proj" in name:
                parameter.mul_(torch.rand_like(parameter) > 0.5)
    return model, save_pruned(model, tokenizer, tmp_path / "sparse")


def _packed(tmp_path, removed: bool = False):
    model, tokenizer = tiny_model("llama")
    if removed:
        _removed(model)
    packed = quantize_rtn(model, bits=4, group_size=32)
    return packed, save_packed(packed, tokenizer, tmp_path / "packed")


def _slim(tmp_path):
    model, tokenizer = tiny_model("llama")
    shrink_block(block_structure(model.model.layers[1]), kept_ffn=torch.arange(32))
    return model, save_slim(model, tokenizer, tmp_path / "slim")


def _slim_removed(tmp_path):
    model, tokenizer = tiny_model("llama")
    _removed(model)
    return model, save_slim(model, tokenizer, tmp_path / "slim")


BUILDERS = {"sparse": _sparse, "packed": _packed, "slim": _slim, "slim-removed": _slim_removed,
            "sparse-removed": functools.partial(_sparse, removed=True),
            "packed-removed": functools.partial(_packed, removed=True)}


@pytest.mark.parametrize("fmt", [name for name in sorted(BUILDERS) if name.endswith("-removed")])
def test_removed_sublayers_save_their_markers_again_after_a_reload(tmp_path, fmt):
    """The markers that make stock transformers refuse the checkpoint are skipped while loading and written again by
    the loaded model's own save_pretrained (every format's post-processing); the logits stay equal throughout."""
    model, folder = BUILDERS[fmt](tmp_path)
    markers = {"model.layers.0.mlp.gate_proj.weight", "model.layers.1.self_attn.q_proj.weight"}
    assert markers <= set(read_header(folder / "model.safetensors"))
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    loaded.save_pretrained(tmp_path / "again")
    assert markers <= set(read_header(tmp_path / "again" / "model.safetensors"))
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "again")
    with torch.no_grad():
        expected = model(INPUT).logits
        assert torch.equal(loaded(INPUT).logits, expected) and torch.equal(again(INPUT).logits, expected)


def test_widths_applied_by_hand_keep_the_markers_of_the_removed_sublayers(tmp_path):
    """apply_layer_widths is public: a skeleton rebuilt with it saves its markers (only loaders switch them off)."""
    from hf_compress.modeling.structure import apply_layer_widths, layer_widths

    pruned, _ = _slim_removed(tmp_path)
    rebuilt, tokenizer = tiny_model("llama")
    apply_layer_widths(rebuilt, layer_widths(pruned))
    rebuilt.load_state_dict(pruned.state_dict())
    folder = save_slim(rebuilt, tokenizer, tmp_path / "rebuilt")
    assert "model.layers.1.self_attn.q_proj.weight" in read_header(folder / "model.safetensors")


def _edit_config(folder, change):
    config = json.loads((folder / "config.json").read_text())
    change(config["quantization_config"])
    (folder / "config.json").write_text(json.dumps(config))


def _edit_tensors(folder, change):
    tensors = load_file(folder / "model.safetensors")
    change(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize("fmt", sorted(BUILDERS))
def test_sealed_checkpoint_loads_equal_and_any_changed_byte_is_refused(tmp_path, fmt):
    model, folder = BUILDERS[fmt](tmp_path)
    integrity = json.loads((folder / "config.json").read_text())["quantization_config"]["integrity"]
    assert integrity["algorithm"] == DIGEST_ALGORITHM
    assert set(integrity["tensors"]) == set(read_header(folder / "model.safetensors"))
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    assert torch.equal(loaded(INPUT).logits, model(INPUT).logits)

    raw = bytearray((folder / "model.safetensors").read_bytes())
    raw[read_header(folder / "model.safetensors")["model.norm.weight"].begin] ^= 1  # one bit of a float
    (folder / "model.safetensors").write_bytes(bytes(raw))
    with pytest.raises(CheckpointIntegrityError, match="differ from the checksum recorded at save.*re-download"):
        AutoModelForCausalLM.from_pretrained(folder)


def test_an_edited_grid_field_is_refused_but_the_recipe_may_change(tmp_path):
    # 64 and 128 columns make 3 and 6 groups of 24 or of 22: the tensors fit either, only the seal can tell.
    model, tokenizer = tiny_model("llama")
    packed = quantize_rtn(model, bits=4, group_size=24)
    folder = save_packed(packed, tokenizer, tmp_path / "packed")
    for field, value in (("group_size", 22), ("symmetric", True)):
        original = json.loads((folder / "config.json").read_text())
        _edit_config(folder, lambda q: q.update({field: value}))
        with pytest.raises(CheckpointIntegrityError, match="quantization_config differs from the one saved"):
            AutoModelForCausalLM.from_pretrained(folder)
        (folder / "config.json").write_text(json.dumps(original))
    _edit_config(folder, lambda q: q["recipe"].update({"note": "edited by hand"}))  # describes, reads nothing
    assert torch.equal(AutoModelForCausalLM.from_pretrained(folder)(INPUT).logits, packed(INPUT).logits)
    _edit_config(folder, lambda q: q["integrity"].pop("config"))  # a record sealed before config digests
    assert torch.equal(AutoModelForCausalLM.from_pretrained(folder)(INPUT).logits, packed(INPUT).logits)


def test_a_plain_resave_of_a_loaded_model_carries_no_stale_checksums(tmp_path):
    packed, folder = _packed(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    loaded.model.norm.weight.data.mul_(2)  # other bytes than the sealed ones
    loaded.save_pretrained(tmp_path / "again")
    assert "integrity" not in json.loads((tmp_path / "again" / "config.json").read_text())["quantization_config"]
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "again")
    assert torch.equal(again(INPUT).logits, loaded(INPUT).logits)


def test_sparse_structure_is_checked_without_checksums(tmp_path):
    _, folder = _sparse(tmp_path)
    _edit_config(folder, lambda q: q.pop("integrity"))

    def extra_bit(tensors):
        name = sorted(n for n in tensors if n.endswith("weight_bitmask"))[0]
        bits = tensors[name].clone()
        bits[0, 0] = 255
        tensors[name] = bits

    _edit_tensors(folder, extra_bit)
    with pytest.raises(CheckpointIntegrityError, match="bitmask marks .* non-zeros but .* values are stored"):
        AutoModelForCausalLM.from_pretrained(folder)


def test_packed_structure_is_checked_without_checksums(tmp_path):
    _, folder = _packed(tmp_path)
    _edit_config(folder, lambda q: q.pop("integrity"))
    _edit_tensors(folder, lambda t: t.__setitem__(
        "model.layers.0.mlp.up_proj.qzeros", t["model.layers.0.mlp.up_proj.qzeros"] + 16))
    with pytest.raises(CheckpointIntegrityError, match=r"zero-point .* outside \[0, 16\)"):
        AutoModelForCausalLM.from_pretrained(folder)
    _edit_config(folder, lambda q: q.__setitem__("modules", []))
    with pytest.raises(CheckpointIntegrityError, match="14 stored packed weight.*not in quantization_config.modules"):
        AutoModelForCausalLM.from_pretrained(folder)


def test_slim_widths_and_missing_tensors_are_checked(tmp_path):
    _, folder = _slim(tmp_path)
    _edit_config(folder, lambda q: q.pop("integrity"))
    _edit_tensors(folder, lambda t: t.pop("model.norm.weight"))
    with pytest.raises(CheckpointIntegrityError, match="not stored, e.g. 'model.norm.weight'"):
        AutoModelForCausalLM.from_pretrained(folder)
    _edit_config(folder, lambda q: q["layers"][0].__setitem__("intermediate_size", 10**6))
    with pytest.raises(CheckpointIntegrityError, match=r"intermediate_size = 1000000 is outside \[0, 128\]"):
        AutoModelForCausalLM.from_pretrained(folder)


def test_truncated_file_names_the_file(tmp_path):
    _, folder = _sparse(tmp_path)
    raw = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointIntegrityError, match="model.safetensors.*truncated"):
        AutoModelForCausalLM.from_pretrained(folder)


# Each folder is loaded in turn by one fresh interpreter (one interpreter start, not one per format). A load's
# output (transformers' loading report, then the traceback) goes to stderr after a line naming the folder; the
# interpreter fails if a folder loads or hf_compress was imported along the way.
_LOAD_EACH = """
import sys, traceback
from transformers import AutoModelForCausalLM
for folder in sys.argv[1:]:
    print("=== loading", folder, file=sys.stderr, flush=True)
    try:
        AutoModelForCausalLM.from_pretrained(folder)
    except Exception:
        traceback.print_exc()
        sys.stderr.flush()
    else:
        sys.exit(f"{folder} loaded")
assert not any(name.startswith("hf_compress") for name in sys.modules), "hf_compress was imported"
"""


def test_stock_transformers_refuses_every_format(tmp_path):
    """Without ``import hf_compress`` the checkpoint must fail to load, and the output must name the format."""
    folders = {fmt: str(BUILDERS[fmt](tmp_path / fmt)[1]) for fmt in sorted(BUILDERS)}
    done = subprocess.run([sys.executable, "-c", _LOAD_EACH, *folders.values()], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    outputs = dict(part.split("\n", 1) for part in done.stderr.split("=== loading ")[1:])
    assert sorted(outputs) == sorted(folders.values())
    for fmt, folder in folders.items():
        assert f"hf_compress_{fmt.split('-')[0]}" in outputs[folder] and "mismatch" in outputs[folder], outputs[folder]


def test_mismatched_tensors_names_the_missing_the_extra_and_the_changed(tmp_path):
    tensors = {"a": torch.arange(4.0), "b": torch.ones(2, 3), "c": torch.zeros(5, dtype=torch.int8)}
    save_file(tensors, tmp_path / "w.safetensors")
    with CheckpointReader([tmp_path / "w.safetensors"]) as reader:
        recorded = reader.digests()
        assert reader.mismatched_tensors(recorded) == ([], [], [])
        edited = {**recorded, "a": recorded["b"], "z": recorded["c"]}  # "a" has another digest, "z" is not stored
        del edited["c"]  # "c" is stored but not recorded
        assert reader.mismatched_tensors(edited) == (["z"], ["c"], ["a"])
    # The same bytes under another shape are another tensor.
    save_file({**tensors, "b": torch.ones(3, 2)}, tmp_path / "reshaped.safetensors")
    with CheckpointReader([tmp_path / "reshaped.safetensors"]) as reader:
        assert reader.mismatched_tensors(recorded) == ([], [], ["b"])
