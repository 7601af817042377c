"""DL-QAT used the way peft users use LoRA: the corners where it silently did something else."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model, inject_adapter_in_model
from transformers import AutoModelForCausalLM

from hf_compress.assets import tiny_model
from hf_compress.quantization import DLQATConfig, DLQATLinear, QuantizationGrid


IDS = torch.tensor([[1, 72, 101, 108, 108, 111, 32, 119, 111, 114, 108, 100]])


def _logits(model):
    model.eval()
    with torch.no_grad():
        return model(IDS).logits


def _config(**fields):
    return DLQATConfig(**{"bits": 3, "group_size": 16, "r": 2, "init_weights": False, **fields})


def _adapted(model):
    return [name.removeprefix("base_model.model.") for name, m in model.named_modules() if isinstance(m, DLQATLinear)]


def test_adapter_added_while_another_is_merged_fits_its_grid_on_the_base_weight():
    merged = get_peft_model(tiny_model("llama", seed=1)[0], _config())
    merged.merge_adapter()
    torch.manual_seed(0)
    merged.add_adapter("other", _config(bits=4))  # the layers hold W_hat of "default" right now
    merged.unmerge_adapter()
    plain = get_peft_model(tiny_model("llama", seed=1)[0], _config())
    torch.manual_seed(0)
    plain.add_adapter("other", _config(bits=4))
    for model in (merged, plain):
        model.set_adapter("other")
    layer = merged.base_model.model.model.layers[0].mlp.up_proj
    expected = QuantizationGrid.fit(layer.get_base_layer().weight, 4, 16)
    assert torch.equal(layer.dlqat_scale["other"], expected.scale)
    assert torch.equal(_logits(merged), _logits(plain))


@pytest.mark.parametrize("fields", [{}, {"target_modules": "all-linear"}])
def test_layers_to_transform_applies_to_the_default_all_linear_targets(fields):
    model = get_peft_model(tiny_model("llama")[0], _config(layers_to_transform=[1], **fields))
    adapted = _adapted(model)
    assert len(adapted) == 7 and all(name.startswith("model.layers.1.") for name in adapted), adapted
    model.add_adapter("zero", _config(layers_to_transform=0, **fields))
    zero = [n for n, m in model.named_modules() if isinstance(m, DLQATLinear) and "zero" in m.dlqat_settings]
    assert len(zero) == 7 and all(".layers.0." in name for name in zero), zero


def test_layers_to_transform_with_a_regex_is_refused():
    with pytest.raises(ValueError, match="layers_to_transform cannot be used with a regex"):
        DLQATConfig(target_modules=r".*q_proj", layers_to_transform=[1])


def test_dlqat_on_a_layer_carrying_another_method_is_refused():
    base = inject_adapter_in_model(LoraConfig(r=2, target_modules=["q_proj"]), tiny_model("llama")[0])
    with pytest.raises(ValueError, match="another PEFT method.*merge_and_unload"):
        get_peft_model(base, _config())


@pytest.mark.parametrize("arch", ["gpt2", "gemma3"])
def test_adapter_on_a_tied_head_merges_without_quantizing_the_embedding(arch, tmp_path):
    model = get_peft_model(tiny_model(arch, seed=1)[0], _config(target_modules=["lm_head"]))
    fake_quant = _logits(model)
    embedding = model.get_input_embeddings().weight.detach().clone()
    with pytest.raises(ValueError, match="shares its weight with the input embedding"):
        model.merge_adapter()
    assert torch.equal(_logits(model), fake_quant)
    merged = model.merge_and_unload()
    assert torch.equal(merged.get_input_embeddings().weight, embedding)
    assert torch.equal(_logits(merged), fake_quant)
    merged.save_pretrained(tmp_path)
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(tmp_path)), fake_quant)


def test_model_cast_after_wrapping_reloads_to_the_same_logits(tmp_path):
    model = get_peft_model(tiny_model("qwen3", seed=1)[0], _config()).to(torch.bfloat16)
    expected = _logits(model)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_model("qwen3", seed=1)[0].to(torch.bfloat16), tmp_path)
    assert torch.equal(_logits(loaded), expected)


def test_model_cast_while_merged_merges_again_on_the_refitted_grid():
    # The cast refits the grid on the cast W0, but a merged layer kept W_hat of the old grid: merge_and_unload then
    # exported other weights than the unmerged (or saved and reloaded) adapter computes.
    torch.manual_seed(0)
    merged = get_peft_model(tiny_model("qwen3", seed=1)[0], _config())
    torch.manual_seed(0)
    plain = get_peft_model(tiny_model("qwen3", seed=1)[0], _config()).to(torch.bfloat16)
    merged.merge_adapter()
    merged.to(torch.bfloat16)
    assert torch.equal(_logits(merged), _logits(plain))
    merged.unmerge_adapter()
    assert torch.equal(_logits(merged), _logits(plain))


def test_per_row_adapter_names_are_refused_instead_of_ignored():
    # PEFT strips adapter_names= unless the tuner handles it: every row silently ran the active adapter.
    model = get_peft_model(tiny_model("llama")[0], _config())
    model.add_adapter("other", _config(bits=4, r=1))
    model.eval()
    batch = IDS.repeat(2, 1)
    with torch.no_grad(), pytest.raises(ValueError, match="one adapter per forward, not one per row"):
        model(batch, adapter_names=["default", "other"])
    with pytest.raises(ValueError, match="one adapter per forward"):
        model.generate(batch, adapter_names=["default", "other"], max_new_tokens=2)
    with torch.no_grad():
        assert torch.equal(model(batch).logits, model(batch, adapter_names=None).logits)


def test_a_target_that_is_not_linear_is_named_with_the_fix():
    with pytest.raises(TypeError, match=r"model\.embed_tokens \(Embedding\) is neither: remove it from target_modules"):
        get_peft_model(tiny_model("llama")[0], _config(target_modules=["embed_tokens"]))


def test_expert_target_modules_given_as_one_string_stay_a_regex():
    from hf_compress.experts import ExpertConfig

    assert ExpertConfig(target_modules=r".*\.q_proj").target_modules == r".*\.q_proj"  # PEFT's regex, not one name
    assert ExpertConfig(target_modules=["q_proj", "v_proj"]).target_modules == ["q_proj", "v_proj"]
    lora = ExpertConfig(target_modules=r".*\.q_proj").lora_config(tiny_model("llama")[0])
    adapted = get_peft_model(tiny_model("llama")[0], lora)
    assert sorted(n for n, m in adapted.named_modules() if n.endswith("q_proj.lora_A")) == [
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A", "base_model.model.model.layers.1.self_attn.q_proj.lora_A"]
