"""Mask pruners on models in unusual states: pruned before, offloaded by accelerate, never loaded (meta)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_compress.assets import tiny_model
from hf_compress.assets.tiny_models import tiny_config, tiny_tokenizer
from hf_compress.modeling import find_decoder_blocks, find_linear_layers, weight_matrix
from hf_compress.pruning import MagnitudeConfig, MagnitudePruner, SparseGPTConfig, SparseGPTPruner, check_pattern
from hf_compress.pruning.storage import save_pruned


CALIBRATION_TEXT = [" ".join(f"w{(i * 7919) % 251} t{i % 13}{chr(97 + i % 26)}" for i in range(600))]
SMALL = dict(num_calibration_sequences=4, calibration_seq_len=48, batch_size=4)


def _layers(model) -> dict:
    block_name, blocks = find_decoder_blocks(model)
    return {f"{block_name}.{i}.{name}": layer for i, block in enumerate(blocks)
            for name, layer in find_linear_layers(block).items()}


def test_sparsegpt_second_prune_keeps_the_first_prunes_zeros() -> None:
    # SparseGPT's OBS updates spread each pruned weight's error over the columns to its right, zeros included:
    # a 2:4 prune of a 50% unstructured model brought back ~10% of the first prune's zeros.
    model, tokenizer = tiny_model("llama")
    pruner = SparseGPTPruner(model, tokenizer)
    pruner.prune(SparseGPTConfig(sparsity=0.5, **SMALL), CALIBRATION_TEXT, progress=False)
    first = {name: weight_matrix(layer) == 0 for name, layer in _layers(model).items()}
    pruner.prune(SparseGPTConfig(sparsity="2:4", **SMALL), CALIBRATION_TEXT, progress=False)
    for name, layer in _layers(model).items():
        weight = weight_matrix(layer)
        assert check_pattern(weight, "2:4"), name
        assert bool((weight[first[name]] == 0).all()), f"{name}: zeros of the first prune came back"
    assert pruner.report.overall_sparsity > 0.5  # the union of both masks


def test_offloaded_model_is_pruned_and_saved_like_a_loaded_one(tmp_path) -> None:
    from accelerate import cpu_offload

    reference, tokenizer = tiny_model("gpt2")
    MagnitudePruner(reference, tokenizer).prune("2:4", progress=False)
    model, _ = tiny_model("gpt2")
    cpu_offload(model, execution_device=torch.device("cpu"))
    # the state dict of an offloaded model holds meta tensors: the save failed after all the work
    MagnitudePruner(model, tokenizer).prune("2:4", save_dir=tmp_path / "out", progress=False)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    expected = dict(reference.named_parameters())
    for name, parameter in loaded.named_parameters():
        assert torch.equal(parameter, expected[name]), name


def test_disk_offloaded_model_is_refused_before_any_work(tmp_path) -> None:
    # accelerate reads disk-offloaded weights from a read-only memory map, a fresh copy each time: the pruned
    # weights written back were dropped, the layers stayed dense while the report said 50%.
    tiny_model("llama", save_dir=tmp_path / "base")
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                  "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base", device_map=device_map,
                                                 offload_folder=tmp_path / "offload")
    with pytest.raises(ValueError, match="offloaded to disk"):
        MagnitudePruner(model, tiny_tokenizer()).prune("2:4", save_dir=tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_model_without_weights_is_refused_clearly(tmp_path) -> None:
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(tiny_config("llama"))
    for pruner in (MagnitudePruner(model, tiny_tokenizer()), SparseGPTPruner(model, tiny_tokenizer())):
        with pytest.raises(ValueError, match="'meta' device with no offloaded copy"):
            pruner.prune(SparseGPTConfig(sparsity="2:4", **SMALL) if isinstance(pruner, SparseGPTPruner) else "2:4",
                         CALIBRATION_TEXT if isinstance(pruner, SparseGPTPruner) else None, progress=False)
    with pytest.raises(ValueError, match="'meta' device"):
        save_pruned(model, None, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_second_prune_keeps_the_first_in_the_recorded_recipe():
    # config.json's record named only the last prune ("0.3" on a model that was 50% sparse).
    model, tokenizer = tiny_model("llama")
    MagnitudePruner(model, tokenizer).prune(0.5, progress=False)
    MagnitudePruner(model, tokenizer).prune(0.3, progress=False)
    record = model.config.hf_compress
    assert record["pruning"]["sparsity"] == 0.3
    assert [earlier["sparsity"] for earlier in record["earlier_pruning"]] == [0.5]


def test_skip_patterns_that_match_nothing_are_refused_before_any_change(caplog):
    # A typo ('*down-proj') would otherwise prune or quantize the very layers it meant to keep, without a word.
    from hf_compress.quantization import quantize_rtn

    model, tokenizer = tiny_model("llama")
    before = {name: parameter.clone() for name, parameter in model.named_parameters()}
    with pytest.raises(ValueError, match=r"skip=\['\*down-proj'\] matches no linear layer.*'self_attn\.q_proj'"):
        MagnitudePruner(model, tokenizer).prune(MagnitudeConfig(sparsity="2:4", skip=["*down-proj"]), progress=False)
    with pytest.raises(ValueError, match=r"skip=\['\*down-proj'\] matches no linear layer"):
        quantize_rtn(model, bits=4, group_size=32, skip=["*down-proj"])
    assert all(torch.equal(parameter, before[name]) for name, parameter in model.named_parameters())
    # One list for several architectures: the patterns that match do their work, the others are only logged.
    with caplog.at_level("WARNING", logger="hf_compress.modeling.layers"):
        MagnitudePruner(model, tokenizer).prune(MagnitudeConfig(sparsity="2:4", skip=["*down_proj", "*c_fc"]),
                                                progress=False)
    assert "['*c_fc'] match no linear layer" in caplog.text
    assert not torch.equal(model.model.layers[0].mlp.up_proj.weight, before["model.layers.0.mlp.up_proj.weight"])
    assert torch.equal(model.model.layers[0].mlp.down_proj.weight, before["model.layers.0.mlp.down_proj.weight"])


def test_a_pruner_given_a_dict_or_another_methods_config_says_what_to_pass():
    from hf_compress.pruning import SparseGPTConfig, WandaPruner

    pruner = WandaPruner.from_pretrained("tiny-llama")
    with pytest.raises(TypeError, match=r"got dict\. Build one from the dict: WandaConfig\.from_dict\(config\)"):
        pruner.prune({"sparsity": "2:4"})
    with pytest.raises(TypeError, match="got SparseGPTConfig. Prune with SparseGPTPruner for a SparseGPTConfig"):
        pruner.prune(SparseGPTConfig(sparsity="2:4"))
