"""Methods that write weights, on models dispatched by accelerate (CPU or disk offload); SDS on a pruned model."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_compress.assets import tiny_model
from hf_compress.assets.tiny_models import tiny_tokenizer
from hf_compress.modeling import calibration_loss, find_decoder_blocks, find_linear_layers, weight_matrix
from hf_compress.modeling.layers import check_not_disk_offloaded, disk_offloaded


CALIBRATION_TEXT = [" ".join(f"w{(i * 7919) % 251} t{i % 13}{chr(97 + i % 26)}" for i in range(600))]
IDS = torch.randint(3, 250, (2, 24), generator=torch.Generator().manual_seed(0))


def _cpu_offloaded():
    from accelerate import cpu_offload

    model, _ = tiny_model("llama")
    return cpu_offload(model, execution_device=torch.device("cpu"))


def _disk_offloaded(tmp_path):
    # How a user's device_map with a "disk" entry dispatches it: every block gets an accelerate hook.
    tiny_model("llama", save_dir=tmp_path / "base")
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                  "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    return AutoModelForCausalLM.from_pretrained(tmp_path / "base", device_map=device_map,
                                                offload_folder=tmp_path / "offload")


def test_the_shared_check_tells_disk_offload_from_cpu_offload(tmp_path) -> None:
    assert disk_offloaded(_cpu_offloaded()) is None  # its edits are written back and kept
    model = _disk_offloaded(tmp_path)
    assert disk_offloaded(model).startswith("model.layers.1.")
    with pytest.raises(ValueError, match="offloaded to disk, where accelerate keeps no edits: the codes would"):
        check_not_disk_offloaded(model, "the codes")


def test_calibration_loss_of_a_cpu_offloaded_model() -> None:
    # It sent the windows to the first parameter's device, 'meta' under offload: SLEB's and BlockPruner's searches
    # and the token router's schedule search crashed on an offloaded model.
    expected = calibration_loss(tiny_model("llama")[0], IDS)
    assert calibration_loss(_cpu_offloaded(), IDS) == pytest.approx(expected, rel=1e-5)


def test_token_routing_reaches_blocks_dispatched_by_accelerate(tmp_path) -> None:
    # accelerate's hook runs the forward saved when it was attached: the routed class was never called, so every
    # token was computed in every dispatched block (silently the dense model, its outputs unchanged).
    from hf_compress.routing import RoutingSchedule, install_routing, remove_routing

    plain, _ = tiny_model("llama")
    dispatched = _disk_offloaded(tmp_path)
    with torch.no_grad():
        dense = dispatched(IDS).logits
        for model in (plain, dispatched):
            install_routing(model, RoutingSchedule([0.3, 0.5]), mode="static")
        assert torch.allclose(dispatched(IDS).logits, plain(IDS).logits, atol=1e-5)
        assert not torch.allclose(dispatched(IDS).logits, dense, atol=1e-3)
        remove_routing(dispatched)
        assert torch.equal(dispatched(IDS).logits, dense)


def test_methods_that_read_every_weight_at_once_refuse_an_offloaded_model() -> None:
    # Each crashed deep inside (meta tensors), DL-QAT after wrapping some layers, RTN after packing some.
    from peft import get_peft_model

    from hf_compress.experts import ExpertConfig
    from hf_compress.experts.training import train_experts
    from hf_compress.quantization import DLQATConfig, quantize_rtn
    from hf_compress.routing import RoutingSchedule, train_token_router
    from hf_compress.training import causal_lm_dataset

    model = _cpu_offloaded()
    before = {name: type(module) for name, module in model.named_modules()}
    with pytest.raises(ValueError, match="DL-QAT reads and rewrites .* offloaded by accelerate"):
        get_peft_model(model, DLQATConfig(bits=4, group_size=32, r=2))
    with pytest.raises(ValueError, match="Round-to-nearest quantization .* offloaded by accelerate"):
        quantize_rtn(model, bits=4, group_size=32)
    data = causal_lm_dataset(CALIBRATION_TEXT, tiny_tokenizer(), num_sequences=2, seq_len=16)
    with pytest.raises(ValueError, match="Training the token router .* offloaded by accelerate"):
        train_token_router(model, RoutingSchedule([0.3, 0.3]), data)
    rows = [{"prompt": f"{i} + 1 = ", "completion": str(i + 1)} for i in range(4)]
    with pytest.raises(ValueError, match="Training experts .* offloaded by accelerate"):
        train_experts(model, rows, ExpertConfig(num_experts=2, r=2), tokenizer=tiny_tokenizer())
    assert {name: type(module) for name, module in model.named_modules()} == before


def test_sds_on_a_pruned_model_keeps_the_earlier_zeros() -> None:
    # Re-dense trained every weight, the earlier prune's zeros included: 2:4 SDS on a 50% magnitude-pruned model
    # brought zeros of the first prune back.
    from hf_compress.pruning import MagnitudePruner, SDSConfig, SDSPruner, check_pattern

    model, tokenizer = tiny_model("llama")
    MagnitudePruner(model, tokenizer).prune(0.5, progress=False)
    _, blocks = find_decoder_blocks(model)
    layers = {f"{i}.{name}": layer for i, block in enumerate(blocks) for name, layer in find_linear_layers(block).items()}
    first = {name: weight_matrix(layer) == 0 for name, layer in layers.items()}
    config = SDSConfig(sparsity="2:4", base="sparsegpt", num_calibration_sequences=4, calibration_seq_len=32,
                       batch_size=4, redense_epochs=2, redense_learning_rate=0.02, revert_if_worse=False)
    pruner = SDSPruner(model, tokenizer)
    pruner.prune(config, CALIBRATION_TEXT, progress=False)
    for name, layer in layers.items():
        weight = weight_matrix(layer)
        assert check_pattern(weight, "2:4"), name
        assert bool((weight[first[name]] == 0).all()), f"{name}: zeros of the earlier prune came back"
    assert pruner.report.overall_sparsity > 0.5  # the union of both masks


def test_remove_routing_of_a_routed_checkpoint_loaded_with_a_device_map(tmp_path) -> None:
    # accelerate hooks the blocks after the routed classes are in place, saving the routed class's forward: a
    # GradientCheckpointingLayer subclass's own wrapper, not RoutedLayerMixin.forward. remove_routing left it there,
    # and the next forward crashed in super() (the block no longer a RoutedLayerMixin).
    from hf_compress.routing import RoutingSchedule, install_routing, remove_routing

    model, _ = tiny_model("llama")
    with torch.no_grad():
        dense = model(IDS).logits
        install_routing(model, RoutingSchedule([0.3, 0.5]), mode="static")
        routed = model(IDS).logits
    model.save_pretrained(tmp_path / "routed")
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.norm": "cpu",
                  "model.rotary_emb": "cpu", "lm_head": "cpu", "model.token_router": "cpu"}
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "routed", device_map=device_map,
                                                  offload_folder=tmp_path / "offload")
    with torch.no_grad():
        assert torch.allclose(loaded(IDS).logits, routed, atol=1e-5)
        remove_routing(loaded)
        assert torch.allclose(loaded(IDS).logits, dense, atol=1e-5)


def test_routing_of_blocks_whose_accelerate_hooks_were_removed() -> None:
    # remove_hook_from_module leaves the saved forward as the instance's forward: a block unhooked before routing was
    # installed computed every token (silently dense), one unhooked after crashed once routing was removed.
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module, remove_hook_from_submodules

    from hf_compress.routing import RoutingSchedule, install_routing, remove_routing

    plain, _ = tiny_model("llama")
    hooked, _ = tiny_model("llama")
    for block in find_decoder_blocks(hooked)[1]:
        add_hook_to_module(block, AlignDevicesHook(execution_device=torch.device("cpu")))
    with torch.no_grad():
        dense = plain(IDS).logits
        install_routing(plain, RoutingSchedule([0.3, 0.5]), mode="static")
        routed = plain(IDS).logits
        remove_hook_from_submodules(hooked)
        install_routing(hooked, RoutingSchedule([0.3, 0.5]), mode="static")
        assert torch.allclose(hooked(IDS).logits, routed, atol=1e-5)
        for block in find_decoder_blocks(hooked)[1]:
            add_hook_to_module(block, AlignDevicesHook(execution_device=torch.device("cpu")))
        remove_hook_from_submodules(hooked)
        remove_routing(hooked)
        assert torch.equal(hooked(IDS).logits, dense)
