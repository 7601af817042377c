"""DL-QAT: the grid, packing, the PEFT method, export to packed weights, loading, training, bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from peft import PeftModel, get_peft_model
from peft.utils import PeftType
from transformers import AutoModelForCausalLM

from hf_compress.assets import tiny_model, tiny_tokenizer
from hf_compress.assets.tiny_models import TINY_ARCHITECTURES
from hf_compress.quantization import (
    DLQATConfig,
    DLQATLinear,
    PackedFormatConfig,
    PackedLinear,
    QuantizationGrid,
    packed_size,
    quantize_rtn,
    round_clamp_ste,
)
from hf_compress.quantization.grid import group_index
from hf_compress.quantization.packing import pack_codes, packed_columns, unpack_codes
from hf_compress.training import TrainingSettings, causal_lm_dataset, train_with_trainer


IDS = torch.tensor([[1, 72, 101, 108, 108, 111, 32, 119, 111, 114, 108, 100], [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]])
TEXT = "The quick brown fox jumps over the lazy dog while the cat sleeps. " * 30


def _logits(model, ids=IDS):
    model.eval()
    with torch.no_grad():
        return model(ids).logits


def _dlqat(arch="llama", seed=0, **fields):
    fields = {"bits": 3, "group_size": 24, "r": 2, **fields}
    base, _ = tiny_model(arch, seed=seed)
    return get_peft_model(base, DLQATConfig(**fields))


# --------------------------------------------------------------------------------------------------
# Grid and straight-through estimator
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("group_size", [16, 24, -1])  # 24 does not divide 64: a shorter last group
def test_grid_round_trips_exactly_on_grid_values(bits, symmetric, group_size):
    weight = torch.randn(6, 64, generator=torch.Generator().manual_seed(bits))
    grid = QuantizationGrid.fit(weight, bits, group_size, symmetric)
    codes = grid.quantize(weight)
    assert codes.min() >= 0 and codes.max() <= 2**bits - 1 and torch.equal(codes, codes.round())
    on_grid = grid.dequantize(codes)
    assert torch.equal(grid.quantize(on_grid), codes)  # values already on the grid come back unchanged
    assert torch.allclose(grid.dequantize(grid.quantize(on_grid)), on_grid, atol=0)
    # Round-to-nearest: every weight inside its group's range is within half a step.
    step = grid.columns(grid.scale)
    inside = (weight >= on_grid.min()) & (weight <= on_grid.max())
    assert ((weight - on_grid).abs()[inside] <= step[inside] / 2 + 1e-6).all()


def test_grid_shapes_and_last_group():
    grid = QuantizationGrid.fit(torch.randn(3, 576), bits=3, group_size=128)
    assert tuple(grid.scale.shape) == (3, 5) and grid.num_groups == 5  # 4 × 128 + 64
    assert QuantizationGrid.fit(torch.randn(3, 100), bits=4, group_size=-1).num_groups == 1
    assert QuantizationGrid.fit(torch.randn(3, 100), bits=4, group_size=512).num_groups == 1
    # the short last group gets its own grid, equal to fitting those columns alone
    weight = torch.randn(4, 40)
    alone = QuantizationGrid.fit(weight[:, 32:], bits=3, group_size=-1)
    assert torch.equal(QuantizationGrid.fit(weight, bits=3, group_size=16).scale[:, 2:], alone.scale)
    zero_group = QuantizationGrid.fit(torch.zeros(2, 8), bits=4, group_size=4)
    assert torch.equal(zero_group.dequantize(zero_group.quantize(torch.zeros(2, 8))), torch.zeros(2, 8))


def test_round_clamp_ste_gradient():
    values = torch.tensor([0.4, 2.6, -3.0, 9.0], requires_grad=True)
    codes = round_clamp_ste(values, torch.full((4,), 1.0), 7)
    assert codes.tolist() == [1.0, 4.0, 0.0, 7.0]
    (codes * torch.tensor([1.0, 2.0, 3.0, 4.0])).sum().backward()
    assert values.grad.tolist() == [1.0, 2.0, 0.0, 0.0]  # identity inside the range, zero where clamped


# --------------------------------------------------------------------------------------------------
# Packing and the packed layer
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("columns", [8, 13, 64])
def test_pack_unpack_round_trip(bits, columns):
    codes = torch.randint(0, 2**bits, (5, columns), generator=torch.Generator().manual_seed(columns), dtype=torch.int32)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (5, packed_columns(columns, bits))
    assert packed.shape[1] == -(-columns // 8) * bits  # exactly `bits` bits per code, padded to 8 codes
    assert torch.equal(unpack_codes(packed, bits, columns).int(), codes)


def test_pack_rejects_out_of_range_codes():
    with pytest.raises(ValueError, match=r"\[0, 7\]"):
        pack_codes(torch.tensor([[8]]), 3)
    with pytest.raises(ValueError, match="bytes"):
        unpack_codes(torch.zeros(1, 4, dtype=torch.uint8), 3, 8)


@pytest.mark.parametrize("zero", [16.0, -1.0])
def test_packed_linear_rejects_zero_points_outside_the_code_range(zero):
    codes, scales = torch.zeros(2, 8), torch.ones(2, 1)
    with pytest.raises(ValueError, match=r"zero-points must lie in \[0, 16\)"):
        PackedLinear.from_codes(codes, scales, torch.full((2, 1), zero), bits=4, group_size=8)


@pytest.mark.parametrize("bits,group_size,scale_dtype", [(3, 128, torch.bfloat16), (2, 128, torch.bfloat16),
                                                         (4, -1, torch.bfloat16), (3, 128, torch.float32)])
def test_packed_bytes_within_target(bits, group_size, scale_dtype):
    # SmolLM2's layer shapes; the target is bits/16 + 10% of the bf16 bytes.
    for in_features, out_features in [(576, 576), (576, 1536), (1536, 576), (576, 192)]:
        layer = PackedLinear(in_features, out_features, bits, group_size, dtype=scale_dtype)
        ratio = layer.packed_bytes() / (2 * in_features * out_features)
        assert bits / 16 <= ratio <= bits / 16 + 0.10


def test_packed_linear_matches_dequantized_matmul_and_keeps_bias():
    weight, bias = torch.randn(12, 40), torch.randn(12)
    grid = QuantizationGrid.fit(weight, 5, 16)
    layer = PackedLinear.from_codes(grid.quantize(weight), grid.scale, grid.zero, 5, 16, bias=bias)
    x = torch.randn(3, 40)
    expected = x @ grid.dequantize(grid.quantize(weight)).T + bias
    assert torch.allclose(layer(x), expected, atol=1e-5)
    assert torch.equal(layer.codes().float(), grid.quantize(weight))
    with pytest.raises(ValueError, match="shape"):
        PackedLinear.from_codes(grid.quantize(weight), grid.scale[:, :2], grid.zero, 5, 16)


# --------------------------------------------------------------------------------------------------
# The PEFT method
# --------------------------------------------------------------------------------------------------


def test_peft_type_is_registered():
    assert PeftType("DLQAT") is PeftType.DLQAT and "DLQAT" in list(PeftType)
    config = DLQATConfig()
    assert config.peft_type == "DLQAT" and config.to_dict()["peft_type"] == "DLQAT"


def test_initial_adapter_is_exactly_rtn_and_disable_gives_base():
    model = _dlqat(bits=4, group_size=32)
    base, _ = tiny_model("llama", seed=0)
    rtn = quantize_rtn(tiny_model("llama", seed=0)[0], bits=4, group_size=32)
    assert torch.allclose(_logits(model), _logits(rtn), atol=1e-5)
    with model.disable_adapter():
        assert torch.equal(_logits(model), _logits(base))
    assert not torch.allclose(_logits(model), _logits(base), atol=1e-3)  # quantization does change the output


def test_trainable_parts_and_ablations():
    full = _dlqat(r=2)
    names = {n.split(".")[-2] for n, p in full.named_parameters() if p.requires_grad}
    assert names == {"dlqat_A", "dlqat_B", "dlqat_magnitude"}
    assert {n.split(".")[-2] for n, p in _dlqat(use_lora=False).named_parameters() if p.requires_grad} == {
        "dlqat_magnitude"}
    assert {n.split(".")[-2] for n, p in _dlqat(use_magnitude=False).named_parameters() if p.requires_grad} == {
        "dlqat_A", "dlqat_B"}
    rtn = _dlqat(use_lora=False, use_magnitude=False)
    assert not any(p.requires_grad for p in rtn.parameters())
    # every linear of the decoder blocks is adapted, the output head is not
    layers = [n for n, m in full.named_modules() if isinstance(m, DLQATLinear)]
    assert len(layers) == 2 * 7 and not any("lm_head" in n for n in layers)


def test_gradients_reach_a_b_and_magnitudes():
    model = _dlqat(init_weights=False)
    model(IDS, labels=IDS).loss.backward()
    layer = model.base_model.model.model.layers[0].mlp.down_proj
    for part in (layer.dlqat_A, layer.dlqat_B, layer.dlqat_magnitude):
        assert part["default"].grad is not None and part["default"].grad.abs().sum() > 0
    assert layer.base_layer.weight.grad is None  # W0 is frozen
    # At the standard initialisation B = 0, so A gets no gradient until B moves, but B and alpha do.
    fresh = _dlqat()
    fresh(IDS, labels=IDS).loss.backward()
    layer = fresh.base_model.model.model.layers[0].mlp.down_proj
    assert layer.dlqat_B["default"].grad.abs().sum() > 0 and layer.dlqat_magnitude["default"].grad.abs().sum() > 0


def test_training_keeps_no_weight_sized_tensor_per_layer_and_the_same_gradients(monkeypatch):
    def gradients(model):
        model(IDS, labels=IDS).loss.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}

    model = _dlqat(init_weights=False)
    weight_shapes = {tuple(m.base_layer.weight.shape) for m in model.modules() if isinstance(m, DLQATLinear)}
    saved = []

    def pack(tensor):
        saved.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        recomputed = gradients(model)
    assert saved and not weight_shapes & set(saved)  # the fake-quantized weights are recomputed in the backward pass
    model.zero_grad()
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda function, *args, use_reentrant: function(*args))
    kept = gradients(model)
    assert recomputed.keys() == kept.keys() and all(torch.equal(recomputed[k], kept[k]) for k in kept)


@pytest.mark.parametrize("lora_space", ["quantization", "weight"])
def test_lora_space_changes_the_update(lora_space):
    model = _dlqat(init_weights=False, lora_space=lora_space, use_magnitude=False)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    w0 = layer.base_layer.weight.float()
    columns = group_index(64, 24)  # the tiny model's hidden size, in groups of 24
    scale = layer.dlqat_scale["default"][:, columns]
    zero = layer.dlqat_zero["default"][:, columns]
    delta = layer.dlqat_settings["default"].scaling * (layer.dlqat_B["default"] @ layer.dlqat_A["default"])
    inner = w0 / scale + delta if lora_space == "quantization" else (w0 + delta) / scale
    expected = scale * ((torch.round(inner) + zero).clamp(0, 7) - zero)
    assert torch.allclose(layer.quantized_weight("default"), expected, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# Export: merge → pack → save → plain from_pretrained
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_merge_pack_save_load_equal_logits(arch, tmp_path):
    model = _dlqat(arch, init_weights=False, bits=3, group_size=24)
    fake_quant = _logits(model)
    packed = model.merge_and_quantize()
    packed_layers = [m for m in packed.modules() if isinstance(m, PackedLinear)]
    assert packed_layers and not any(isinstance(m, DLQATLinear) for m in packed.modules())
    assert torch.allclose(_logits(packed), fake_quant, atol=1e-5, rtol=1e-5)
    packed.save_pretrained(tmp_path / "q")
    config = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "hf_compress_packed" and config["bits"] == 3
    assert config["recipe"]["method"] == "dlqat" and len(config["modules"]) == len(packed_layers)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    loaded_layers = [m for m in loaded.modules() if isinstance(m, PackedLinear)]
    assert len(loaded_layers) == len(packed_layers) and loaded_layers[0].qweight.dtype == torch.uint8
    assert torch.equal(_logits(loaded), _logits(packed))
    assert loaded.is_quantized and loaded.hf_quantizer.quantization_config.bits == 3
    greedy = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    assert torch.equal(loaded.generate(IDS[:1], **greedy), packed.generate(IDS[:1], **greedy))


def test_trained_head_from_modules_to_save_reaches_the_packed_checkpoint(tmp_path):
    model = _dlqat(init_weights=False, modules_to_save=["lm_head"])
    with torch.no_grad():
        model.base_model.model.lm_head.modules_to_save["default"].weight.mul_(3.0)  # what training changed
    fake_quant = _logits(model)
    packed = model.merge_and_quantize()
    assert type(packed.lm_head) is torch.nn.Linear  # peft's wrapper is gone, the trained copy kept
    assert packed.lm_head.weight.data_ptr() != packed.get_input_embeddings().weight.data_ptr()
    assert not packed.config.tie_word_embeddings
    packed.save_pretrained(tmp_path / "q")
    assert torch.allclose(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "q")), fake_quant, atol=1e-5)


@pytest.mark.parametrize("arch", ["gemma3", "gpt2"])  # tied input and output embeddings
def test_packed_tied_head_loads(arch, tmp_path):
    model = _dlqat(arch, init_weights=False, target_modules=["lm_head", "q_proj", "c_attn"])
    assert model.config.tie_word_embeddings
    fake_quant = _logits(model)
    packed = model.merge_and_quantize()
    assert isinstance(packed.lm_head, PackedLinear) and not packed.config.get_text_config().tie_word_embeddings
    packed.save_pretrained(tmp_path / "q")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert isinstance(loaded.lm_head, PackedLinear)
    assert torch.allclose(_logits(loaded), fake_quant, atol=1e-5)


def test_packed_model_is_small_in_memory_and_dequantizes():
    model, _ = tiny_model("llama")
    dense = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    packed = quantize_rtn(model, bits=4, group_size=32)
    size = packed_size(packed)
    assert size["layers"] == 14 and size["packed"] / size["bf16"] <= 4 / 16 + 0.10
    assert not any(isinstance(m, torch.nn.Linear) and n in dense and "lm_head" not in n
                   for n, m in packed.named_modules())  # no float copy of the quantized weights stays resident
    logits = _logits(packed)
    with pytest.raises(ValueError, match="already holds 14 packed layers"):
        quantize_rtn(packed, bits=4, group_size=32)  # its config would list only the new layers
    restored = packed.dequantize()
    assert not any(isinstance(m, PackedLinear) for m in restored.modules())
    assert torch.equal(_logits(restored), logits) and not restored.is_quantized


def _replaced_layers_alive(monkeypatch, module) -> list[int]:
    """After each ``replace_module`` call of ``module``: how many of the layers replaced so far are still alive."""
    import weakref

    replaced, alive = [], []
    original = module.replace_module

    def replace(model, name, new):
        replaced.append(weakref.ref(model.get_submodule(name)))
        original(model, name, new)
        alive.append(sum(ref() is not None for ref in replaced))

    monkeypatch.setattr(module, "replace_module", replace)
    return alive


def test_packing_and_dequantizing_free_each_replaced_layer(monkeypatch):
    # Layer by layer: a 7B model must never hold the float weights and the packed codes of every layer at once.
    from hf_compress.formats import packed as packed_format
    from hf_compress.quantization import rtn
    from hf_compress.quantization.dlqat import model as dlqat_model

    alive = _replaced_layers_alive(monkeypatch, rtn)
    packed = quantize_rtn(tiny_model("llama")[0], bits=4, group_size=32)
    assert len(alive) == 14 and max(alive) <= 1  # the one being replaced
    alive = _replaced_layers_alive(monkeypatch, packed_format)
    packed.dequantize()
    assert len(alive) == 14 and max(alive) <= 1
    alive = _replaced_layers_alive(monkeypatch, dlqat_model)
    get_peft_model(tiny_model("llama")[0], DLQATConfig(bits=4, group_size=32, r=2)).merge_and_quantize()
    assert len(alive) == 14 and max(alive) <= 1


def test_rtn_skipping_every_layer_is_refused():
    model, _ = tiny_model("llama")
    with pytest.raises(ValueError, match=r"no layers to quantize.*skip=\['\*'\]"):
        quantize_rtn(model, bits=4, group_size=32, skip=["*"])  # would be marked packed with 0 packed layers
    assert not getattr(model, "is_quantized", False) and getattr(model.config, "quantization_config", None) is None


def test_non_finite_weights_are_refused_before_anything_is_packed():
    # A diverged adapter (or a broken base) would otherwise export NaN scales that load and answer garbage.
    model = get_peft_model(tiny_model("llama")[0], DLQATConfig(bits=4, group_size=32, r=2))
    layers = [m for m in model.modules() if isinstance(m, DLQATLinear)]
    with torch.no_grad():
        layers[3].dlqat_B["default"].fill_(float("nan"))
    with pytest.raises(ValueError, match=r"o_proj\.dlqat_B\.default is not finite.*lower learning rate"):
        model.merge_and_quantize()
    assert sum(isinstance(m, DLQATLinear) for m in model.modules()) == len(layers)  # nothing packed
    plain, _ = tiny_model("llama")
    with torch.no_grad():
        plain.model.layers[1].mlp.up_proj.weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"layers\.1\.mlp\.up_proj holds non-finite weights"):
        quantize_rtn(plain, bits=4, group_size=32)
    assert not any(isinstance(m, PackedLinear) for m in plain.modules())  # refused before the first layer
    with pytest.raises(ValueError, match="scales or zero-points are not finite"):
        PackedLinear.from_codes(torch.zeros(4, 32), torch.full((4, 1), float("nan")), torch.zeros(4, 1), 4, 32)


def test_dlqat_on_an_already_packed_model_is_refused_before_training_and_before_packing(monkeypatch):
    # Only the float head could take the adapter, and exporting it would write a config listing that one layer of 15:
    # refused when the adapter is added, before any training, ...
    packed = quantize_rtn(tiny_model("llama")[0], bits=4, group_size=32)
    config = DLQATConfig(bits=3, group_size=32, r=2, target_modules=["lm_head"])
    with pytest.raises(ValueError, match="already holds 14 packed layers.*dequantize"):
        get_peft_model(packed, config)
    # ... and again at export, for an adapter that got there another way.
    from hf_compress.quantization.dlqat import model as dlqat_model

    monkeypatch.setattr(dlqat_model, "check_not_packed", lambda *args: None)
    model = get_peft_model(packed, config)
    monkeypatch.undo()
    with pytest.raises(ValueError, match="already holds 14 packed layers.*dequantize"):
        model.merge_and_quantize()
    assert isinstance(model.base_model.model.lm_head, DLQATLinear)  # refused before any layer was packed


@pytest.mark.parametrize("arch", ["gpt2", "llama"])  # GPT-2's Conv1D stores its weight [in, out]
def test_dequantized_model_saves_and_reloads(arch, tmp_path):
    packed = quantize_rtn(tiny_model(arch)[0], bits=3, group_size=24)
    packed.save_pretrained(tmp_path / "q")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    for name, model in (("in-memory", packed), ("loaded", loaded)):
        logits = _logits(model)
        restored = model.dequantize()
        restored.save_pretrained(tmp_path / name)
        assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / name)), logits)


def test_dequantize_after_casting_follows_the_model_dtype(tmp_path):
    # config.dtype stays float32 through model.to(dtype): the float layers must take the model's dtype, not that.
    packed = quantize_rtn(tiny_model("gpt2")[0], bits=4, group_size=32)
    packed.save_pretrained(tmp_path / "q")
    for model in (packed, AutoModelForCausalLM.from_pretrained(tmp_path / "q")):
        model.to(torch.bfloat16)
        logits = _logits(model)
        restored = model.dequantize()
        assert {p.dtype for p in restored.parameters()} == {torch.bfloat16}
        assert torch.allclose(_logits(restored).float(), logits.float(), atol=0.05)


def test_merge_and_unload_gives_float_model_on_the_grid():
    model = _dlqat(init_weights=False)
    fake_quant = _logits(model)
    merged = model.merge_and_unload()
    assert not any(isinstance(m, DLQATLinear) for m in merged.modules())
    assert torch.allclose(_logits(merged), fake_quant, atol=1e-5)


def test_merge_unmerge_restores_base_weights():
    model = _dlqat(init_weights=False)
    layer = model.base_model.model.model.layers[1].mlp.up_proj
    before = layer.base_layer.weight.detach().clone()
    fake_quant = _logits(model)
    model.merge_adapter()
    assert torch.allclose(_logits(model), fake_quant, atol=1e-5)
    model.unmerge_adapter()
    assert torch.equal(layer.base_layer.weight, before)


# --------------------------------------------------------------------------------------------------
# Saving and loading adapters
# --------------------------------------------------------------------------------------------------


@pytest.mark.compat_smoke
def test_save_load_adapter_equal_logits_in_a_fresh_process(tmp_path):
    base, _ = tiny_model("qwen3", seed=3)
    base.save_pretrained(tmp_path / "base")
    model = get_peft_model(base, DLQATConfig(bits=3, group_size=16, r=4, init_weights=False))
    model.save_pretrained(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "DLQAT" and saved["bits"] == 3
    torch.save(_logits(model), tmp_path / "expected.pt")
    script = f"""
import torch, hf_compress
from peft import PeftModel
from transformers import AutoModelForCausalLM
base = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'base')!r})
model = PeftModel.from_pretrained(base, {str(tmp_path / 'adapter')!r}).eval()
ids = torch.tensor({IDS.tolist()})
with torch.no_grad():
    assert torch.equal(model(ids).logits, torch.load({str(tmp_path / 'expected.pt')!r})), "logits differ"
print("ok", type(model.peft_config["default"]).__name__)
"""
    result = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "ok DLQATConfig" in result.stdout


def test_multiple_adapters_switch_and_refuse_to_stack(tmp_path):
    model = _dlqat(init_weights=False, bits=3)
    model.save_pretrained(tmp_path / "three")
    three = _logits(model)
    model.add_adapter("four", DLQATConfig(bits=4, group_size=24, r=2, init_weights=False))
    model.set_adapter("four")
    four = _logits(model)
    assert not torch.allclose(three, four)
    model.set_adapter("default")
    assert torch.equal(_logits(model), three)
    model.base_model.set_adapter(["default", "four"])
    with pytest.raises(ValueError, match="only one can be active"):
        _logits(model)
    model.set_adapter("four")
    model.load_adapter(tmp_path / "three", adapter_name="reloaded")
    model.set_adapter("reloaded")
    assert torch.equal(_logits(model), three)
    packed = model.merge_and_quantize("four")
    assert torch.allclose(_logits(packed), four, atol=1e-5)


def test_push_adapter_to_fake_hub(fake_hub):
    model = _dlqat("mistral", init_weights=False)
    expected = _logits(model)
    model.push_to_hub("user/dlqat-tiny")
    assert "adapter_config.json" in fake_hub.files("user/dlqat-tiny")
    loaded = PeftModel.from_pretrained(tiny_model("mistral", seed=0)[0], "user/dlqat-tiny")
    assert torch.equal(_logits(loaded), expected)


# --------------------------------------------------------------------------------------------------
# Training through Trainer, one process and two (DDP)
# --------------------------------------------------------------------------------------------------


@pytest.mark.compat_smoke
def test_trainer_trains_the_adapter_and_export_matches(tmp_path):
    model = _dlqat(bits=3, group_size=16, r=2)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    data = causal_lm_dataset([TEXT], tiny_tokenizer(), num_sequences=8, seq_len=32)
    result = train_with_trainer(model, data, str(tmp_path / "run"), TrainingSettings(
        max_steps=4, learning_rate=1e-2, per_device_batch_size=2, logging_steps=1, use_cpu=True))
    assert result["train_seconds"] > 0 and len([h for h in result["log_history"] if "loss" in h]) == 4
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert len(changed) == len(before)
    fake_quant = _logits(model)
    assert torch.allclose(_logits(model.merge_and_quantize()), fake_quant, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fields,message", [
    ({"bits": 1}, "bits must be an integer from 2 to 8"),
    ({"bits": 9}, "bits must be an integer from 2 to 8"),
    ({"bits": 3.5}, "bits must be an integer"),
    ({"group_size": 0}, "group_size must be a positive integer"),
    ({"group_size": -2}, "group_size must be a positive integer"),
    ({"r": 0}, "r must be a positive integer"),
    ({"lora_space": "output"}, "lora_space must be one of"),
])
def test_config_rejects_bad_values(fields, message):
    with pytest.raises(ValueError, match=message):
        DLQATConfig(**fields)


def test_target_modules_matching_nothing_is_an_error():
    with pytest.raises(ValueError, match="Target modules"):
        get_peft_model(tiny_model("llama")[0], DLQATConfig(target_modules=["no_such_proj"]))


def test_adapter_onto_a_different_base_is_refused(tmp_path):
    model = _dlqat("llama", seed=0, init_weights=False)
    model.save_pretrained(tmp_path / "adapter")
    with pytest.raises(ValueError, match="trained on a different base model"):
        PeftModel.from_pretrained(tiny_model("llama", seed=1)[0], tmp_path / "adapter")
    # the same base in bf16 is the same model: accepted
    same = tiny_model("llama", seed=0)[0].to(torch.bfloat16)
    PeftModel.from_pretrained(same, tmp_path / "adapter")
    # transformers' own adapter loading (model.load_adapter, from_pretrained of an adapter folder) writes the weights
    # itself: the adapter is refused at its first use instead of quantizing another model's weights silently
    other = tiny_model("llama", seed=1)[0]
    other.load_adapter(str(tmp_path / "adapter"))
    with pytest.raises(ValueError, match=r"\('default'\) was trained on a different base model"):
        _logits(other)
    same = tiny_model("llama", seed=0)[0]
    same.load_adapter(str(tmp_path / "adapter"))
    assert torch.allclose(_logits(same), _logits(model), atol=1e-5)


def test_packed_checkpoint_from_another_model_is_refused(tmp_path):
    packed = quantize_rtn(tiny_model("llama")[0], bits=4, group_size=32)
    packed.save_pretrained(tmp_path / "q")
    config_path = tmp_path / "q" / "config.json"
    config = json.loads(config_path.read_text())
    config["quantization_config"]["modules"].append("model.layers.7.mlp.up_proj")
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="disagree: 1 module.*layers.7"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    with pytest.raises(ValueError, match="bits must be"):
        PackedFormatConfig(bits=12)


def test_packed_checkpoint_into_the_base_model_class_is_explained(tmp_path):
    from transformers import AutoModel

    quantize_rtn(tiny_model("llama")[0], bits=4, group_size=32).save_pretrained(tmp_path / "q")
    with pytest.raises(ValueError, match="LlamaModel is the base model without one.*AutoModelForCausalLM"):
        AutoModel.from_pretrained(tmp_path / "q")


def test_merge_and_quantize_unknown_adapter():
    with pytest.raises(ValueError, match="No adapter named 'other'"):
        _dlqat().merge_and_quantize("other")


def test_bf16_base_keeps_a_float32_grid_and_exports_bf16_scales(tmp_path):
    base = tiny_model("qwen2", seed=0)[0].to(torch.bfloat16)
    model = get_peft_model(base, DLQATConfig(bits=4, group_size=16, r=2, init_weights=False))
    layer = model.base_model.model.model.layers[0].mlp.up_proj
    assert layer.dlqat_scale["default"].dtype == torch.float32  # not rounded to the base's bf16
    assert layer.dlqat_A["default"].dtype == torch.float32  # trainable parts in fp32 (PEFT's autocast)
    expected = QuantizationGrid.fit(layer.base_layer.weight, 4, 16).scale
    assert torch.equal(layer.dlqat_scale["default"], expected)
    fake_quant = _logits(model)
    assert fake_quant.dtype == torch.bfloat16
    trained = {name.removeprefix("base_model.model."): module.export_codes("default")
               for name, module in model.named_modules() if isinstance(module, DLQATLinear)}
    packed = model.merge_and_quantize()
    assert packed.model.layers[0].mlp.up_proj.scales.dtype == torch.bfloat16
    # Every exported layer holds the trained codes with alpha * s rounded to bf16 once (the logit check below is
    # too loose on a tiny model to catch a dropped alpha or an unquantized weight).
    exported = {name: module for name, module in packed.named_modules() if isinstance(module, PackedLinear)}
    assert exported.keys() == trained.keys()
    for name, (codes, scales, zeros) in trained.items():
        expand = lambda t: t.to(torch.bfloat16).repeat_interleave(16, dim=1)  # noqa: E731  (group size 16)
        expected = (codes.to(torch.bfloat16) - expand(zeros)) * expand(scales)
        assert torch.equal(exported[name].dequantized_weight(), expected), name
    # the exported bf16 scales round alpha * s once: logits agree to bf16 precision
    assert torch.allclose(_logits(packed).float(), fake_quant.float(), atol=0.1, rtol=0.05)


def test_casting_the_model_keeps_the_grid_in_float32():
    model = _dlqat()
    layer = next(m for m in model.modules() if isinstance(m, DLQATLinear))
    model.to(torch.bfloat16)
    assert layer.get_base_layer().weight.dtype == torch.bfloat16  # the model is cast ...
    assert layer.dlqat_scale["default"].dtype == layer.dlqat_zero["default"].dtype == torch.float32  # ... its grid not,
    expected = QuantizationGrid.fit(layer.get_base_layer().weight, 3, 24)  # which is refitted on the cast W0 (as a load
    assert torch.equal(layer.dlqat_scale["default"], expected.scale)  # onto a bf16 base fits it), never bf16-rounded
    assert torch.equal(layer.dlqat_zero["default"], expected.zero)


@pytest.mark.parametrize("arch", ["gpt2", "gemma3"])
def test_casting_refits_the_grid_of_a_head_tied_to_the_embedding(arch, tmp_path):
    """The embedding's own cast reaches the tied head's weight first: the head's grid is refitted all the same, so the
    cast adapter equals the same adapter loaded onto a base of that dtype."""
    base, _ = tiny_model(arch)
    model = get_peft_model(base, DLQATConfig(bits=3, group_size=32, r=2, target_modules=["lm_head"], init_weights=False))
    model.save_pretrained(tmp_path / "adapter")
    model.to(torch.bfloat16)
    loaded = PeftModel.from_pretrained(tiny_model(arch)[0].to(torch.bfloat16), tmp_path / "adapter")
    head, reference = (next(m for m in x.modules() if isinstance(m, DLQATLinear)) for x in (model, loaded))
    assert torch.equal(head.dlqat_scale["default"], reference.dlqat_scale["default"])
    assert torch.equal(head.dlqat_zero["default"], reference.dlqat_zero["default"])


def test_layer_zero_is_a_layer_to_transform():
    config = DLQATConfig(layers_to_transform=0, layers_pattern="layers", target_modules=["q_proj"])
    model = get_peft_model(tiny_model("llama")[0], config)
    assert [n for n, m in model.named_modules() if isinstance(m, DLQATLinear)] == [
        "base_model.model.model.layers.0.self_attn.q_proj"]


def test_an_adapter_on_a_packed_model_is_refused_as_packed():
    packed = quantize_rtn(tiny_model("llama")[0], bits=4, group_size=32)
    with pytest.raises(ValueError, match="already holds 14 packed layers: put the DL-QAT adapter on the float model"):
        get_peft_model(packed, DLQATConfig())


def test_a_packed_model_made_under_inference_mode_runs_outside_it():
    with torch.inference_mode():
        packed = quantize_rtn(tiny_model("llama")[0].to(torch.bfloat16), bits=4, group_size=32)
        inside = packed(IDS).logits
    with torch.no_grad():
        assert torch.equal(packed(IDS).logits, inside)  # the CPU int4 kernel's cache key read a version they lack


def test_group_size_not_dividing_in_features_is_explained(caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="hf_compress"):
        model = _dlqat(bits=3, group_size=24)  # hidden 64 = 2 x 24 + 16, intermediate 128 = 5 x 24 + 8
    assert "does not divide in_features [64, 128]" in caplog.text
    layer = model.base_model.model.model.layers[0].mlp.down_proj
    assert tuple(layer.dlqat_scale["default"].shape) == (64, 6)


def test_merge_and_quantize_keeps_a_float64_models_dtype_in_its_scales():
    """The scales were float32 under a float64 label (quantize_rtn keeps float64)."""
    model = get_peft_model(tiny_model("llama")[0].double(), DLQATConfig(bits=4, group_size=16, r=2))
    packed = model.merge_and_quantize()
    assert {module.scales.dtype for module in packed.modules() if hasattr(module, "scales")} == {torch.float64}
