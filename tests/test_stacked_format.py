"""Stacked compression: 2:4 sparse + packed low-bit weights in one checkpoint, DL-QAT with the mask fixed, and
sparse/packed saving of slim (Týr) models. Tiny random models of several architectures."""

from __future__ import annotations

import json

import pytest
import torch
from peft import get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from checkpoint_edits import edit_checkpoint
from hf_compress.assets import tiny_model
from hf_compress.formats.integrity import CheckpointIntegrityError
from hf_compress.formats.packed import save_packed
from hf_compress.formats.slim import SlimFormatConfig, attach_slim_format
from hf_compress.modeling.layers import find_decoder_blocks, find_linear_layers, weight_matrix
from hf_compress.modeling.structure import block_structure, layer_widths, shrink_block
from hf_compress.pruning import PRUNERS
from hf_compress.pruning.masks import check_pattern
from hf_compress.pruning.storage import save_pruned
from hf_compress.quantization import DLQATConfig, PackedLinear, QuantizationGrid, quantize_rtn
from hf_compress.quantization.dlqat import DLQATLinear
from hf_compress.quantization.kernels import cpu_int4
from hf_compress.quantization.packing import pack_codes, packed_columns


IDS = torch.tensor([[1, 72, 101, 108, 108, 111, 32, 119, 111, 114, 108, 100], [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]])
ARCHS = ["llama", "qwen3", "gemma3", "opt", "gpt2"]  # gpt2: Conv1D layers ([in, out] weights)
SLIM_ARCHS = ["llama", "opt"]  # slim needs separate q/k/v projections (not GPT-2's fused c_attn)


def _logits(model, ids=IDS):
    model.eval()
    with torch.no_grad():
        return model(ids).logits


def _pruned(arch="llama", seed=0, model=None, tokenizer=None):
    """A tiny model pruned to 2:4 by magnitude (every decoder linear layer)."""
    if model is None:
        model, tokenizer = tiny_model(arch, seed=seed)
    PRUNERS["magnitude"](model, tokenizer).prune("2:4", progress=False)
    return model, tokenizer


def _train(peft_model, steps=3):
    """A few AdamW steps of next-token loss (what Trainer does, without its start-up cost)."""
    peft_model.train()
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=0.05)
    for _ in range(steps):
        loss = peft_model(IDS, labels=IDS).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    peft_model.eval()


def _dlqat(model, steps=3, **fields):
    fields = {"bits": 4, "group_size": 32, "r": 2, "init_weights": False, **fields}
    peft_model = get_peft_model(model, DLQATConfig(**fields))
    _train(peft_model, steps)
    return peft_model


def _base_masks(model):
    """``[out, in]`` masks of the non-zero weights of every decoder linear layer, by qualified name."""
    prefix, blocks = find_decoder_blocks(model)
    return {f"{prefix}.{index}.{name}": weight_matrix(layer) != 0
            for index, block in enumerate(blocks) for name, layer in find_linear_layers(block).items()}


# --------------------------------------------------------------------------------------------------
# prune 2:4 → DL-QAT (mask fixed) → merge → save_packed → from_pretrained
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_pruned_dlqat_merge_save_reload_is_exact_and_stacked(arch, tmp_path):
    model, tokenizer = _pruned(arch)
    masks = _base_masks(model)
    peft_model = _dlqat(model)
    fake_quant = _logits(peft_model)
    packed = peft_model.merge_and_quantize()
    layers = {n: m for n, m in packed.named_modules() if isinstance(m, PackedLinear)}
    assert layers and all(m.is_sparse for m in layers.values())
    assert torch.allclose(_logits(packed), fake_quant, atol=1e-5, rtol=1e-5)
    for name, layer in layers.items():
        weight = layer.dequantized_weight()
        assert check_pattern(weight, "2:4"), name
        assert torch.equal(layer.mask(), masks[name]), name  # the pruned mask, unchanged by training
        assert bool((weight[~masks[name]] == 0).all()), name  # exact zeros
        # Codes only for the kept weights: half of them, packed at 4 bits.
        assert layer.kept == weight.numel() // 2
        assert layer.qweight.shape == (packed_columns(layer.kept, 4),)
        assert layer.qmask.shape == (layer.out_features, -(-layer.in_features // 8))
    before = _logits(packed)
    folder = save_packed(packed, tokenizer, tmp_path / "stacked")
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert config["format_version"] == 3 and set(config["sparse_modules"]) == set(layers)
    assert config["integrity"]["tensors"]
    stored = load_file(folder / "model.safetensors")
    for name, layer in layers.items():
        assert stored[f"{name}.qweight"].numel() == layer.in_features * layer.out_features // 2 * 4 // 8
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    assert torch.equal(_logits(loaded), before)
    loaded_layers = {n: m for n, m in loaded.named_modules() if isinstance(m, PackedLinear)}
    assert set(loaded_layers) == set(layers) and all(m.is_sparse for m in loaded_layers.values())
    for name, layer in loaded_layers.items():
        assert check_pattern(layer.dequantized_weight(), "2:4") and torch.equal(layer.mask(), masks[name])
    greedy = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
    assert torch.equal(loaded.generate(IDS[:1], **greedy), packed.generate(IDS[:1], **greedy))
    # The loaded model saves again in the stacked form, and dequantize() gives the same float model.
    again = save_packed(loaded, tokenizer, tmp_path / "again")
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(again)), before)
    assert torch.equal(_logits(loaded.dequantize()), before)


def test_stacked_bytes_are_below_the_sparse_and_packed_formats(tmp_path):
    model, tokenizer = _pruned("llama")
    sparse_folder = save_pruned(model, tokenizer, tmp_path / "sparse")
    dense_codes = quantize_rtn(_pruned("llama")[0], bits=4, group_size=32, keep_sparsity=False)  # zeros as codes
    stacked = get_peft_model(model, DLQATConfig(bits=4, group_size=32, use_lora=False, use_magnitude=False))
    stacked = stacked.merge_and_quantize()
    sizes = {
        name: sum(m.packed_bytes() for m in packed.modules() if isinstance(m, PackedLinear))
        for name, packed in (("codes", dense_codes), ("stacked", stacked))
    }
    linear = sum(m.in_features * m.out_features for m in stacked.modules() if isinstance(m, PackedLinear))
    # per weight: mask 1/8 byte + half the weights at 4 bits (1/4 byte) + fp32 scale and zero per 32 inputs
    assert sizes["stacked"] == linear * (1 / 8 + 1 / 4) + linear // 32 * 5
    assert sizes["stacked"] < sizes["codes"]
    sparse_bytes = json.loads((sparse_folder / "config.json").read_text())["quantization_config"]["storage"]
    assert sizes["stacked"] / (4 * linear) < 0.2 < sparse_bytes["ratio"]
    # RTN with the mask kept and plain RTN compute the same weights (the zero-point code is exactly 0).
    assert torch.equal(_logits(stacked), _logits(dense_codes))


def test_training_keeps_the_mask_only_when_asked():
    kept = _dlqat(_pruned("llama")[0], steps=2)
    filled = _dlqat(_pruned("llama")[0], steps=2, keep_sparsity=False)
    for model, fixed in ((kept, True), (filled, False)):
        layers = [m for m in model.modules() if isinstance(m, DLQATLinear)]
        for layer in layers:
            weight = layer.quantized_weight("default")
            pruned = weight_matrix(layer.get_base_layer()) == 0
            if fixed:
                assert bool((weight[pruned] == 0).all()) and layer.sparsity_mask("default") is not None
            else:
                assert layer.sparsity_mask("default") is None
        if not fixed:  # without the mask the random-initialised LoRA fills the zeros in: the test can fail
            assert any(bool((layer.quantized_weight("default")[weight_matrix(layer.get_base_layer()) == 0] != 0).any())
                       for layer in layers)
    # No gradient reaches a pruned weight (its code is pinned), while kept weights get one.
    for model, fixed in ((kept, True), (filled, False)):
        layer = next(m for m in model.modules() if isinstance(m, DLQATLinear))
        pruned = weight_matrix(layer.get_base_layer()) == 0
        weight = layer.quantized_weight("default")
        grad = torch.autograd.grad(weight[pruned].sum(), layer.dlqat_B["default"], allow_unused=True)[0]
        assert (grad is None or bool((grad == 0).all())) == fixed
        grad = torch.autograd.grad(layer.quantized_weight("default")[~pruned].sum(), layer.dlqat_B["default"])[0]
        assert bool((grad != 0).any())


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_rtn_of_a_pruned_model_is_stacked_unless_asked(arch, tmp_path):
    model, tokenizer = _pruned(arch)
    masks = _base_masks(model)
    packed = quantize_rtn(model, bits=4, group_size=32)
    layers = {n: m for n, m in packed.named_modules() if isinstance(m, PackedLinear)}
    assert layers.keys() == masks.keys() and all(m.is_sparse for m in layers.values())
    assert all(torch.equal(layers[name].mask(), mask) for name, mask in masks.items())
    before = _logits(packed)
    folder = save_packed(packed, tokenizer, tmp_path / "stacked")
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert set(config["sparse_modules"]) == set(masks) and config["recipe"] == {"method": "rtn"}
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    assert torch.equal(_logits(loaded), before)
    assert all(check_pattern(m.dequantized_weight(), "2:4") for m in loaded.modules() if isinstance(m, PackedLinear))
    # keep_sparsity=False stores every code (the zeros at their zero-points): the same weights, more bytes.
    dense = quantize_rtn(_pruned(arch)[0], bits=4, group_size=32, keep_sparsity=False)
    assert not any(m.is_sparse for m in dense.modules() if isinstance(m, PackedLinear))
    assert torch.equal(_logits(dense), before)
    with pytest.raises(ValueError, match="keep_sparsity must be 'auto', True or False"):
        quantize_rtn(tiny_model(arch)[0], bits=4, group_size=32, keep_sparsity="yes")


def test_keep_sparsity_detection_and_bad_values():
    dense = get_peft_model(tiny_model("llama")[0], DLQATConfig(bits=4, group_size=32, r=2))
    assert not any(m.dlqat_sparse["default"] for m in dense.modules() if isinstance(m, DLQATLinear))
    model, _ = tiny_model("qwen3")
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, :3] = 0  # 3 zeros: under the "auto" threshold
        model.model.layers[1].mlp.up_proj.weight[:, ::2] = 0  # 50%: unstructured pruning, kept by "auto"
    auto = get_peft_model(model, DLQATConfig(bits=4, group_size=32, r=2))
    sparse = {n for n, m in auto.named_modules() if isinstance(m, DLQATLinear) and m.dlqat_sparse["default"]}
    assert sparse == {"base_model.model.model.layers.1.mlp.up_proj"}
    auto.unload()
    forced = get_peft_model(model, DLQATConfig(bits=4, group_size=32, r=2, keep_sparsity=True))
    sparse = {n for n, m in forced.named_modules() if isinstance(m, DLQATLinear) and m.dlqat_sparse["default"]}
    assert sparse == {"base_model.model.model.layers.0.mlp.up_proj", "base_model.model.model.layers.1.mlp.up_proj"}
    with pytest.raises(ValueError, match="keep_sparsity must be 'auto', True or False"):
        DLQATConfig(keep_sparsity="yes")


def test_grid_of_a_sparse_weight_is_the_grid_of_its_kept_weights():
    weight = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    masked = weight * (torch.arange(64) % 4 < 2)
    for symmetric in (False, True):
        grid = QuantizationGrid.fit(masked, 4, 32, symmetric)
        # the kept weights alone, the masked ones replaced by a kept value of their row and group (no zeros)
        filled = masked.clone().view(8, 2, 32)
        filled[..., 2::4], filled[..., 3::4] = filled[..., 0::4], filled[..., 1::4]
        kept_only = QuantizationGrid.fit(filled.view(8, 64), 4, 32, symmetric)
        if not symmetric:  # the range of the kept weights contains 0 here (both signs in every group)
            assert bool(((masked.view(8, 2, 32).amin(-1) < 0) & (masked.view(8, 2, 32).amax(-1) > 0)).all())
        assert torch.equal(grid.scale, kept_only.scale) and torch.equal(grid.zero, kept_only.zero)


# --------------------------------------------------------------------------------------------------
# PackedLinear's sparse form and the kernel paths
# --------------------------------------------------------------------------------------------------


def _sparse_layer(bits, seed=0, rows=32, columns=64, group_size=32):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, columns, generator=generator)
    mask = torch.rand(rows, columns, generator=generator) > 0.5
    grid = QuantizationGrid.fit(weight * mask, bits, group_size)
    return PackedLinear.from_codes(grid.quantize(weight * mask), grid.scale, grid.zero, bits, group_size, mask=mask), mask


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_sparse_layer_masked_weights_are_exact_zeros_whatever_the_codes(bits):
    generator = torch.Generator().manual_seed(bits)
    weight = torch.randn(16, 40, generator=generator)
    mask = torch.rand(16, 40, generator=generator) > 0.3
    grid = QuantizationGrid.fit(weight, bits, 16)  # the grid of the dense weight: masked codes are not the zero-point
    codes = grid.quantize(weight)
    layer = PackedLinear.from_codes(codes, grid.scale * 1.7, grid.zero, bits, 16, mask=mask)
    dense = grid.dequantize(codes, grid.scale * 1.7)
    assert torch.equal(layer.dequantized_weight(), dense * mask)
    assert bool((layer.dequantized_weight()[~mask] == 0).all())
    # The Triton kernel reads this dense packing: the masked weights hold their group's zero-point.
    assert torch.equal(layer.dense_qweight(), pack_codes(layer.codes(), bits))
    zero_columns = layer.qzeros[:, torch.arange(40) // 16]
    assert torch.equal(layer.codes()[~mask], zero_columns[~mask])
    x = torch.randn(3, 40, generator=generator)
    assert torch.allclose(layer(x), x @ (dense * mask).T, atol=1e-5)


def test_int4_kernel_only_when_masked_weights_stay_exact():
    identity = torch.eye(64, dtype=torch.bfloat16)
    three_bit, mask = _sparse_layer(3)
    if not cpu_int4.usable(three_bit, identity):
        pytest.skip("no int4 CPU kernel in this torch")
    kernel = cpu_int4.Int4Weight.from_layer(three_bit)
    assert kernel.recentred  # ≤ 3 bits: every group re-centred on its zero-point
    seen = kernel.matmul(identity).float().T  # row j of I @ W.T is column j of the kernel's weight
    assert bool((seen[~mask] == 0).all())
    three_bit.kernel = "fast"
    three_bit(identity[:1])
    assert three_bit._int4_weight() is not None and three_bit.kernel_cache_nbytes() > 0  # the kernel ran
    four_bit, _ = _sparse_layer(4)
    assert not cpu_int4.Int4Weight.from_layer(four_bit).recentred  # min-max 4-bit codes span 0..15
    four_bit.kernel = "fast"
    x = torch.randn(1, 64, dtype=torch.bfloat16)
    assert torch.equal(four_bit(x), four_bit.reference_forward(x))  # the kernel declined: the exact path ran
    assert four_bit._int4_weight() is None and four_bit.kernel_cache_nbytes() == 0


def test_sparse_layer_refuses_a_mask_of_the_wrong_shape():
    grid = QuantizationGrid.fit(torch.randn(4, 16), 4, 8)
    with pytest.raises(ValueError, match="mask must have the codes' shape"):
        PackedLinear.from_codes(grid.quantize(torch.randn(4, 16)), grid.scale, grid.zero, 4, 8,
                                mask=torch.ones(4, 8, dtype=torch.bool))


# --------------------------------------------------------------------------------------------------
# Integrity of the stacked form
# --------------------------------------------------------------------------------------------------


def _stacked_folder(tmp_path):
    model, tokenizer = _pruned("llama")
    packed = get_peft_model(model, DLQATConfig(bits=4, group_size=32, r=2, init_weights=False)).merge_and_quantize()
    return save_packed(packed, tokenizer, tmp_path / "stacked")


LAYER = "model.layers.0.mlp.up_proj"


def test_corrupted_mask_is_refused_with_a_clear_error(tmp_path):
    folder = _stacked_folder(tmp_path)
    original = load_file(folder / "model.safetensors")[f"{LAYER}.qmask"]

    def move_kept_weights(tensors):  # a byte of a 2:4 mask has 4 bits set, and so has its complement
        tensors[f"{LAYER}.qmask"][0, 0] = 0xFF ^ original[0, 0]

    # Same number of kept weights, other positions: only the checksum can tell, and does.
    edit_checkpoint(folder, tensor_change=move_kept_weights, drop_integrity=False)
    with pytest.raises(CheckpointIntegrityError, match=rf"{LAYER}.qmask.*differ from the checksum"):
        AutoModelForCausalLM.from_pretrained(folder)

    def add_four(tensors):
        tensors[f"{LAYER}.qmask"][0, 0] = 0xFF

    # A mask keeping more weights than there are codes: refused before the checksums are read.
    edit_checkpoint(folder, tensor_change=add_four, drop_integrity=False)
    with pytest.raises(CheckpointIntegrityError, match="the mask keeps 4100 weights but codes for 4096 are stored"):
        AutoModelForCausalLM.from_pretrained(folder)


def test_corrupted_codes_and_config_are_refused(tmp_path):
    folder = _stacked_folder(tmp_path)
    truncate = lambda t: t.__setitem__(f"{LAYER}.qweight", t[f"{LAYER}.qweight"][:-4].clone())
    edit_checkpoint(folder, tensor_change=truncate)
    with pytest.raises(CheckpointIntegrityError, match=r"qweight is U8 \[2044\], expected U8 \[2048\]"):
        AutoModelForCausalLM.from_pretrained(folder)
    folder = _stacked_folder(tmp_path / "b")
    edit_checkpoint(folder, config_change=lambda q: q["sparse_modules"].__setitem__(LAYER, 4000))
    with pytest.raises(CheckpointIntegrityError, match=r"qweight is U8 \[2048\], expected U8 \[2000\]"):
        AutoModelForCausalLM.from_pretrained(folder)
    edit_checkpoint(folder, config_change=lambda q: q["sparse_modules"].pop(LAYER))
    with pytest.raises(CheckpointIntegrityError, match="stored masked packed weight.*not in quantization_config.sparse_modules"):
        AutoModelForCausalLM.from_pretrained(folder)
    folder = _stacked_folder(tmp_path / "c")
    codes = lambda t: t.__setitem__(f"{LAYER}.qweight", t[f"{LAYER}.qweight"] ^ 0xFF)
    edit_checkpoint(folder, tensor_change=codes, drop_integrity=False)
    with pytest.raises(CheckpointIntegrityError, match=rf"{LAYER}.qweight.*differ from the checksum"):
        AutoModelForCausalLM.from_pretrained(folder)


def test_dense_packed_checkpoints_keep_format_version_2(tmp_path):
    model, tokenizer = tiny_model("llama")
    folder = save_packed(quantize_rtn(model, bits=4, group_size=32), tokenizer, tmp_path / "dense")
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert config["format_version"] == 2 and config["sparse_modules"] == {} and config["slim"] is None


# --------------------------------------------------------------------------------------------------
# Slim (Týr) models saved sparse, packed, and stacked
# --------------------------------------------------------------------------------------------------


def _slim(arch, seed=0, attach=True):
    """A tiny model with mixed widths: block 0 loses a key/value group, block 1 half its FFN channels."""
    model, tokenizer = tiny_model(arch, seed=seed)
    blocks = [block_structure(block) for block in find_decoder_blocks(model)[1]]
    shrink_block(blocks[0], kept_attention=torch.tensor([1]))
    shrink_block(blocks[1], kept_ffn=torch.arange(0, blocks[1].ffn.num_units, 2))
    if attach:
        attach_slim_format(model, recipe={"method": "tyr"})
    return model, tokenizer


@pytest.mark.parametrize("arch", SLIM_ARCHS)
@pytest.mark.parametrize("attach", [True, False])  # False: a freshly pruned model, its widths measured
def test_slim_model_saved_sparse_reloads_with_its_widths(arch, attach, tmp_path):
    model, tokenizer = _slim(arch, attach=attach)
    widths = layer_widths(model)
    _pruned(model=model, tokenizer=tokenizer)
    before = _logits(model)
    folder = save_pruned(model, tokenizer, tmp_path / "sparse")
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "hf_compress_sparse" and config["slim"]["layers"] == widths
    assert config["compressed_modules"]
    if attach:  # save_pruned left the model's own slim config in place
        assert isinstance(model.config.quantization_config, SlimFormatConfig)
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    assert layer_widths(loaded) == widths and torch.equal(_logits(loaded), before)
    assert isinstance(loaded.config.quantization_config, SlimFormatConfig) and not loaded.is_quantized
    # It saves (and re-saves sparse) with its widths.
    loaded.save_pretrained(tmp_path / "plain")
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "plain")), before)
    again = save_pruned(loaded, tokenizer, tmp_path / "again")
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(again)), before)


@pytest.mark.parametrize("arch", SLIM_ARCHS)
@pytest.mark.parametrize("attach", [True, False])  # False: RTN measures the widths before packing the layers
def test_slim_model_saved_packed_reloads_with_its_widths(arch, attach, tmp_path):
    model, tokenizer = _slim(arch, attach=attach)
    widths = layer_widths(model)
    packed = quantize_rtn(model, bits=4, group_size=32)
    before = _logits(packed)
    folder = save_packed(packed, tokenizer, tmp_path / "packed")
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert config["slim"]["layers"] == widths and config["format_version"] == 3
    assert config["slim"]["recipe"] == ({"method": "tyr"} if attach else {})
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    assert torch.equal(_logits(loaded), before)
    restored = loaded.dequantize()  # a float slim model: it keeps its widths to save and load again
    assert layer_widths(restored) == widths and isinstance(restored.config.quantization_config, SlimFormatConfig)
    restored.save_pretrained(tmp_path / "float")
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "float")), before)


@pytest.mark.parametrize("attach", [True, False])
def test_slim_pruned_dlqat_stacked_save_reload(attach, tmp_path):
    model, tokenizer = _slim("llama", attach=attach)
    widths = layer_widths(model)
    _pruned(model=model, tokenizer=tokenizer)
    peft_model = _dlqat(model)
    packed = peft_model.merge_and_quantize()
    packed_layers = [m for m in packed.modules() if isinstance(m, PackedLinear)]
    assert len(packed_layers) == 14 and all(m.is_sparse for m in packed_layers)
    before = _logits(packed)
    folder = save_packed(packed, tokenizer, tmp_path / "stacked")
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert config["slim"]["layers"] == widths and len(config["sparse_modules"]) == 14
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    assert torch.equal(_logits(loaded), before)
    loaded_layers = [m for m in loaded.modules() if isinstance(m, PackedLinear)]
    assert len(loaded_layers) == 14
    for module in loaded_layers:
        assert module.is_sparse and check_pattern(module.dequantized_weight(), "2:4")


def test_slim_widths_inside_a_stacked_checkpoint_are_checked(tmp_path):
    model, tokenizer = _slim("llama")
    folder = save_packed(quantize_rtn(model, bits=4, group_size=32), tokenizer, tmp_path / "packed")
    edit_checkpoint(folder, config_change=lambda q: q["slim"]["layers"][1].__setitem__("intermediate_size", 10**6))
    with pytest.raises(CheckpointIntegrityError, match=r"intermediate_size = 1000000 is outside \[0, 128\]"):
        AutoModelForCausalLM.from_pretrained(folder)
    edit_checkpoint(folder, config_change=lambda q: q.pop("slim"))  # widths lost: the layers no longer fit, refused
    with pytest.raises(CheckpointIntegrityError, match="expected"):
        AutoModelForCausalLM.from_pretrained(folder)


def test_a_quantized_model_is_still_refused_by_save_pruned(tmp_path):
    model, tokenizer = tiny_model("llama")
    with pytest.raises(ValueError, match=r"quantized \(hf_compress_packed\)"):
        save_pruned(quantize_rtn(model, bits=4, group_size=32), tokenizer, tmp_path / "x")
