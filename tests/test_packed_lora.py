"""LoRA over packed low-bit layers (``hf_compress.quantization.packed_lora``): peft and Trainer on a packed checkpoint."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

import hf_compress  # noqa: F401  (registers the formats and the packed LoRA layer)
from hf_compress.assets import tiny_model
from hf_compress.quantization import PackedLinear, quantize_rtn
from hf_compress.quantization.packed_lora import PackedLoraLinear


def _packed_folder(tmp_path, arch: str = "llama"):
    model, _ = tiny_model(arch, seed=0)
    folder = tmp_path / f"packed-{arch}"
    quantize_rtn(model, bits=4, group_size=32).save_pretrained(folder)
    return folder


def _ids(rows: int = 2, length: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 100, (rows, length), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids) -> torch.Tensor:
    model.eval()  # Trainer leaves the model in training mode (GPT-2's dropout)
    with torch.no_grad():
        return model(ids).logits


def _train(model, tmp_path, steps: int = 3) -> None:
    dataset = [{"input_ids": row, "labels": row} for row in _ids(4, 16, seed=1)]
    args = TrainingArguments(output_dir=str(tmp_path / "train"), max_steps=steps, per_device_train_batch_size=2,
                             report_to=[], learning_rate=5e-2, use_cpu=True, save_strategy="no")
    Trainer(model=model, args=args, train_dataset=dataset).train()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # gpt2: packed layers standing for Conv1D
def test_trainer_trains_lora_on_a_packed_checkpoint_and_the_adapter_reloads(tmp_path, arch):
    folder = _packed_folder(tmp_path, arch)
    base = AutoModelForCausalLM.from_pretrained(folder)
    packed_names = {name for name, module in base.named_modules() if isinstance(module, PackedLinear)}
    ids = _ids()
    before = _logits(base, ids)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    assert set(model.peft_config["default"].target_modules) == packed_names  # all-linear counts packed layers
    assert torch.equal(_logits(model, ids), before)  # lora_B starts at zero
    codes = {name: buffer.clone() for name, buffer in model.named_buffers() if name.endswith("qweight")}
    _train(model, tmp_path)
    trained = _logits(model, ids)
    assert not torch.allclose(trained, before)
    assert all(torch.equal(buffer, codes[name]) for name, buffer in model.named_buffers() if name in codes)
    model.save_pretrained(tmp_path / "adapter")
    again = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder), tmp_path / "adapter")
    assert isinstance(again.base_model.model.get_submodule(sorted(packed_names)[0]), PackedLoraLinear)
    assert torch.equal(_logits(again, ids), trained)


def test_the_adapter_moves_between_the_packed_and_the_float_model(tmp_path):
    folder = _packed_folder(tmp_path)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(folder), LoraConfig(r=4, target_modules="all-linear"))
    _train(model, tmp_path, steps=2)
    model.save_pretrained(tmp_path / "adapter")
    ids = _ids()
    float_base = AutoModelForCausalLM.from_pretrained(folder).dequantize()  # the weights the codes stand for
    assert not any(isinstance(module, PackedLinear) for module in float_base.modules())
    on_float = PeftModel.from_pretrained(float_base, tmp_path / "adapter")
    torch.testing.assert_close(_logits(on_float, ids), _logits(model, ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merging_refuses_packed_codes_and_works_after_dequantize(tmp_path, arch):
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(_packed_folder(tmp_path, arch)),
                           LoraConfig(r=4, target_modules="all-linear", fan_in_fan_out=arch == "gpt2"))
    _train(model, tmp_path, steps=2)
    ids = _ids()
    expected = _logits(model, ids)
    with pytest.raises(ValueError, match=r"re-quantizing.*model\.dequantize\(\)"):
        model.merge_and_unload()
    assert torch.equal(_logits(model, ids), expected)  # nothing merged half-way
    model.dequantize()
    merged = model.merge_and_unload()
    assert not any(isinstance(module, (PackedLinear, PackedLoraLinear)) for module in merged.modules())
    torch.testing.assert_close(_logits(merged, ids), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("options", "message"), [
    ({"use_dora": True}, r"plain LoRA and aLoRA only.*DoraLinearVariant"),
    ({"init_lora_weights": "pissa"}, r"init_lora_weights in .*got 'pissa'"),
    ({"init_lora_weights": "olora"}, r"init_lora_weights in .*got 'olora'"),
])
def test_options_that_need_a_float_base_weight_are_refused_before_any_layer_changes(options, message):
    # Layer 0 stays float and the embeddings are targeted too: peft would adapt them before reaching a packed layer.
    model = quantize_rtn(tiny_model("llama", seed=0)[0], bits=4, group_size=32, skip=["model.layers.0.*"])
    targets = ["embed_tokens", "q_proj", "v_proj"]
    with pytest.raises(ValueError, match=message):
        get_peft_model(model, LoraConfig(r=4, target_modules=targets, **options))
    assert not any("lora_" in name for name, _ in model.named_parameters())
    retried = get_peft_model(model, LoraConfig(r=4, target_modules=targets))  # as the message says
    fresh = get_peft_model(quantize_rtn(tiny_model("llama", seed=0)[0], bits=4, group_size=32,
                                        skip=["model.layers.0.*"]), LoraConfig(r=4, target_modules=targets))
    trainable = lambda peft_model: sorted(n for n, p in peft_model.named_parameters() if p.requires_grad)  # noqa: E731
    assert trainable(retried) == trainable(fresh)
    assert all(not layer.lora_variant for layer in retried.modules() if hasattr(layer, "lora_variant"))


def test_a_second_adapter_is_checked_before_any_layer_changes(tmp_path):
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(_packed_folder(tmp_path)),
                           LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"]))
    with pytest.raises(ValueError, match="plain LoRA and aLoRA only"):
        model.add_adapter("dora", LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"], use_dora=True))
    assert not any(".dora" in name for name, _ in model.named_parameters())


@pytest.mark.parametrize("init", ["gaussian", "Gaussian", "orthogonal", "eva", False])
def test_initialisations_that_leave_the_base_alone_are_taken(init):
    model = quantize_rtn(tiny_model("llama", seed=0)[0], bits=4, group_size=32)
    codes = {name: buffer.clone() for name, buffer in model.named_buffers()}
    ids = _ids()
    before = _logits(model, ids)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=init))
    assert all(torch.equal(buffer, codes[name.removeprefix("base_model.model.").replace(".base_layer", "")])
               for name, buffer in peft_model.named_buffers() if name.endswith(("qweight", "scales", "qzeros")))
    if init in ("gaussian", "Gaussian", "eva"):  # lora_B starts at zero; orthogonal starts at B·A = 0 up to rounding
        assert torch.equal(_logits(peft_model, ids), before)


@pytest.mark.parametrize("targets", ["all-linear", ["q_proj", "v_proj"]])  # the untargeted layers too
def test_dequantize_keeps_the_adapters_base_frozen(tmp_path, targets):
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(_packed_folder(tmp_path)),
                           LoraConfig(r=4, target_modules=targets))
    trainable = sorted(name for name, p in model.named_parameters() if p.requires_grad)
    model.dequantize()
    assert not any(isinstance(module, PackedLinear) for module in model.modules())
    assert sorted(name for name, p in model.named_parameters() if p.requires_grad) == trainable


def test_dequantize_without_adapters_gives_a_trainable_float_model(tmp_path):
    model = AutoModelForCausalLM.from_pretrained(_packed_folder(tmp_path)).dequantize()
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_config_without_target_modules_takes_peft_defaults_and_is_checked(tmp_path, arch):
    folder = _packed_folder(tmp_path, arch)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(folder), LoraConfig(r=4))
    assert {name.rpartition(".")[2] for name, module in model.named_modules()
            if isinstance(module, PackedLoraLinear)} == {"llama": {"q_proj", "v_proj"}, "gpt2": {"c_attn"}}[arch]
    with pytest.raises(ValueError, match="DoraLinearVariant"):  # the default targets are packed: refused up front
        get_peft_model(AutoModelForCausalLM.from_pretrained(folder), LoraConfig(r=4, use_dora=True))


def test_modules_to_save_naming_a_packed_layer_is_refused_both_ways(tmp_path):
    folder = _packed_folder(tmp_path)
    with pytest.raises(ValueError, match=r"modules_to_save names packed low-bit layers .*down_proj"):
        get_peft_model(AutoModelForCausalLM.from_pretrained(folder),
                       LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["down_proj"]))
    float_model = AutoModelForCausalLM.from_pretrained(folder).dequantize()
    get_peft_model(float_model, LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["down_proj"])
                   ).save_pretrained(tmp_path / "adapter")
    packed = AutoModelForCausalLM.from_pretrained(folder)
    with pytest.raises(ValueError, match="modules_to_save names packed"):
        PeftModel.from_pretrained(packed, tmp_path / "adapter")
    assert not any("lora_" in name for name, _ in packed.named_parameters())
    # A float layer (lm_head, never packed) is saved as usual.
    get_peft_model(packed, LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]))


def test_the_config_check_leaves_the_seed_to_the_adapters(tmp_path):
    folder = _packed_folder(tmp_path)
    initial = {}
    for name, model in (("packed", AutoModelForCausalLM.from_pretrained(folder)),
                        ("float", AutoModelForCausalLM.from_pretrained(folder).dequantize())):
        torch.manual_seed(0)
        peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"]))
        initial[name] = {k: v for k, v in peft_model.state_dict().items() if "lora_A" in k}
    assert initial["packed"].keys() == initial["float"].keys()
    assert all(torch.equal(initial["packed"][k], initial["float"][k]) for k in initial["packed"])


def test_dora_added_after_dequantize_equals_dora_on_the_float_model(tmp_path):
    """GPT-2: dequantize() rebuilds Conv1D ([in, out]); the LoRA layer over it must transpose again (DoRA's norm)."""
    folder = _packed_folder(tmp_path, "gpt2")
    ids = _ids()
    logits = {}
    for name in ("packed", "float"):
        base = AutoModelForCausalLM.from_pretrained(folder)
        if name == "float":
            base = base.dequantize()
        model = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear", fan_in_fan_out=True))
        if name == "packed":
            model.dequantize()
        model.add_adapter("dora", LoraConfig(r=4, target_modules="all-linear", use_dora=True, fan_in_fan_out=True))
        model.set_adapter("dora")
        with torch.no_grad():
            for parameter_name, parameter in sorted(model.named_parameters()):
                if ".dora" in parameter_name and "lora_magnitude" not in parameter_name:  # the same A and B in both
                    parameter.copy_(torch.randn(parameter.shape, generator=torch.Generator().manual_seed(1)))
        logits[name] = _logits(model, ids)
    torch.testing.assert_close(logits["packed"], logits["float"], rtol=1e-5, atol=1e-5)


def test_alora_reads_no_base_weight_and_is_taken(tmp_path):
    folder = _packed_folder(tmp_path)
    ids = _ids()
    config = dict(r=4, target_modules=["q_proj", "v_proj"], alora_invocation_tokens=[int(ids[0, 5]), int(ids[0, 6])],
                  init_lora_weights=False)
    outputs = {}
    for name in ("packed", "float"):
        base = AutoModelForCausalLM.from_pretrained(folder)
        torch.manual_seed(0)
        model = get_peft_model(base.dequantize() if name == "float" else base, LoraConfig(**config))
        outputs[name] = _logits(model, ids)
    torch.testing.assert_close(outputs["packed"], outputs["float"], rtol=1e-5, atol=1e-5)


def test_per_sample_gradients_with_torch_func_reach_the_adapters():
    model = get_peft_model(quantize_rtn(tiny_model("llama", seed=0)[0], bits=4, group_size=32),
                           LoraConfig(r=4, target_modules="all-linear"))
    params = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    ids = _ids(2)

    def loss(values, row):
        return torch.func.functional_call(model, values, (row[None],), {"labels": row[None]}).loss

    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, ids)
    first = torch.func.grad(loss)(params, ids[0])
    for name in params:
        torch.testing.assert_close(per_sample[name][0], first[name], rtol=1e-4, atol=1e-6)
    assert any(bool(grad.abs().sum() > 0) for grad in first.values())


def test_trainer_still_refuses_a_packed_model_without_an_adapter(tmp_path):
    base = AutoModelForCausalLM.from_pretrained(_packed_folder(tmp_path))
    args = TrainingArguments(output_dir=str(tmp_path / "train"), max_steps=1, report_to=[], use_cpu=True)
    with pytest.raises(ValueError, match="purely quantized"):
        Trainer(model=base, args=args, train_dataset=[{"input_ids": _ids(1)[0], "labels": _ids(1)[0]}])


def test_the_backward_pass_keeps_the_codes_not_a_float_weight():
    torch.manual_seed(0)
    weight = torch.randn(64, 96)
    from hf_compress.quantization import QuantizationGrid

    grid = QuantizationGrid.fit(weight, bits=4, group_size=32)
    layer = PackedLinear.from_codes(grid.quantize(weight), grid.scale, grid.zero, bits=4, group_size=32)
    x = torch.randn(5, 96, requires_grad=True)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x)
    assert all(t.numel() < weight.numel() for t in saved)  # no (64, 96) float weight held for the backward
    y.square().sum().backward()
    reference = x.detach().clone().requires_grad_(True)
    torch.nn.functional.linear(reference, layer.dequantized_weight()).square().sum().backward()
    torch.testing.assert_close(x.grad, reference.grad)

    y = layer(x)
    with torch.no_grad():
        layer.scales.mul_(2)  # the codes change between the passes: the gradient would be through other weights
    with pytest.raises(RuntimeError, match="changed between the forward and the backward"):
        y.sum().backward()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_on_a_packed_model_trains_on_cuda_as_on_the_cpu(dtype):
    """The adapters follow the packed layers' device and dtype; the gradients match the CPU's (same codes)."""
    def adapted(device):
        model = quantize_rtn(tiny_model("llama", seed=0)[0].to(dtype), bits=4, group_size=32).to(device)
        torch.manual_seed(0)  # the same lora_A on both devices
        return get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights="gaussian"))

    ids = _ids()
    grads = []
    for device in ("cpu", "cuda"):
        model = adapted(device)
        layer = model.base_model.model.model.layers[0].self_attn.q_proj
        assert layer.lora_A["default"].weight.device.type == device
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "lora_B" in name:
                    parameter.fill_(0.01)  # a non-zero update, so lora_A's gradient is not zero
        model(ids.to(device), labels=ids.to(device)).loss.backward()
        grads.append({name: p.grad.float().cpu() for name, p in model.named_parameters() if p.requires_grad})
    tolerance = 1e-4 if dtype == torch.float32 else 5e-2
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=tolerance, atol=tolerance)


def test_parameter_counts_include_the_packed_weights(tmp_path):
    folder = _packed_folder(tmp_path)
    float_model = AutoModelForCausalLM.from_pretrained(folder).dequantize()
    packed = AutoModelForCausalLM.from_pretrained(folder)
    assert packed.num_parameters() == float_model.num_parameters()  # the codes stand for every weight
    config = LoraConfig(r=4, target_modules="all-linear")
    assert (get_peft_model(packed, config).get_nb_trainable_parameters()
            == get_peft_model(float_model, LoraConfig(r=4, target_modules="all-linear")).get_nb_trainable_parameters())
