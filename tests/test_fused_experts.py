"""Mixture-of-experts models whose experts transformers stores fused (3-D parameters): the pruners prune every expert,
calibrated on the tokens routed to it; saved sparse, they load with equal logits; methods that work on nn.Linear only
say what they leave unchanged."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from checkpoint_edits import edit_checkpoint
from hf_compress import _compat
from hf_compress.modeling import find_decoder_blocks, find_linear_layers, set_weight_matrix, weight_matrix
from hf_compress.modeling.fused_experts import (
    ExpertProjection,
    experts_through_projections,
    fused_expert_parameters,
)
from hf_compress.pruning import (
    MagnitudeConfig,
    MagnitudePruner,
    SDSConfig,
    SDSPruner,
    SparseGPTConfig,
    SparseGPTPruner,
    WandaConfig,
    WandaPruner,
)
from hf_compress.pruning.masks import pattern_mask
from hf_compress.pruning.storage import save_pruned
from hf_compress.pruning.wanda import wanda_scores

_COMMON = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               head_dim=16)
MOE_CONFIGS = {
    # concatenated [gate; up], [out, in] storage; saved one tensor per expert (merged on load)
    "qwen3_moe": dict(intermediate_size=128, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2),
    # transposed [in, out] storage, interleaved gate/up, biases, a clamped gate; saved fused
    "gpt_oss": dict(intermediate_size=32, num_local_experts=4, num_experts_per_tok=2,
                    layer_types=["sliding_attention", "full_attention"]),
    # saved under other names (block_sparse_moe, w1/w2/w3) as well as one tensor per expert
    "mixtral": dict(intermediate_size=32, num_local_experts=4, num_experts_per_tok=2),
    # an nn.Linear router whose weight, but not its bitmask, saving renames (router.weight -> gate.weight)
    "phimoe": dict(intermediate_size=32, num_local_experts=4, num_experts_per_tok=2),
}


def moe_model(kind: str, **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    config = AutoConfig.for_model(kind, **{**_COMMON, **MOE_CONFIGS[kind], **overrides})
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # the random init of some experts is zeros or tiny: give every weight a scale
        for parameter in model.parameters():
            if parameter.dim() > 1:
                parameter.normal_(std=0.05)
    return model


def ids(rows: int = 4, length: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 256, (rows, length), generator=torch.Generator().manual_seed(seed))


def fused(model) -> dict[str, torch.Tensor]:
    parameters = dict(model.named_parameters())
    return {name: parameters[name] for name in fused_expert_parameters(model)}


def n_m_holds(weight: torch.Tensor, kept: int = 2, group: int = 4) -> bool:
    return bool(((weight.reshape(weight.shape[0], -1, group) != 0).sum(-1) <= kept).all())


@pytest.mark.parametrize("kind", ["qwen3_moe", "gpt_oss"])
def test_each_expert_projection_is_an_out_by_in_view_of_the_fused_weight(kind):
    model = moe_model(kind)
    block = find_decoder_blocks(model)[1][0]
    layers = find_linear_layers(block, fused_experts=True)
    experts = block.mlp.experts
    assert [name for name in layers if "experts" in name][:2] == ["mlp.experts.0.gate_up_proj", "mlp.experts.0.down_proj"]
    assert sum(isinstance(layer, ExpertProjection) for layer in layers.values()) == 2 * 4
    assert not any(isinstance(layer, ExpertProjection) for layer in find_linear_layers(block).values())
    down = layers["mlp.experts.2.down_proj"]
    assert tuple(weight_matrix(down).shape) == (64, 32)  # [hidden, inter] as a linear layer, in both storages
    set_weight_matrix(down, torch.zeros(64, 32))
    assert bool((experts.down_proj[2] == 0).all()) and bool((experts.down_proj[1] != 0).any())
    assert "mlp.experts.1.down_proj" not in find_linear_layers(block, skip=["*experts.1.*"], fused_experts=True)


@pytest.mark.parametrize("kind", list(MOE_CONFIGS))
def test_experts_computed_through_their_projections_equal_the_model_and_see_each_routed_token(kind):
    model = moe_model(kind)
    tokens = ids(2, 16)
    with torch.no_grad():
        expected = model(tokens).logits
        block = find_decoder_blocks(model)[1][0]
        layers = find_linear_layers(block, fused_experts=True)
        first = [layer for layer in layers.values() if isinstance(layer, ExpertProjection)
                 and layer.weight_name in ("gate_up_proj", "up_proj")]
        seen = {id(layer): 0 for layer in first}
        handles = [layer.register_forward_pre_hook(
            lambda module, args: seen.__setitem__(id(module), seen[id(module)] + args[0].shape[0])) for layer in first]
        with experts_through_projections(block, layers):
            routed = model(tokens).logits
        for handle in handles:
            handle.remove()
    torch.testing.assert_close(routed, expected, rtol=1e-4, atol=1e-5)
    assert sum(seen.values()) == tokens.numel() * model.config.num_experts_per_tok  # each token to k experts
    assert "forward" not in block.mlp.experts.__dict__  # the model's own forward is back


def test_an_experts_layout_read_wrongly_is_refused_not_calibrated():
    model = moe_model("qwen3_moe")
    block = find_decoder_blocks(model)[1][0]
    experts = block.mlp.experts

    class ScaledExperts(type(experts)):  # an experts class that computes something the layout flags do not say
        def forward(self, hidden_states, top_k_index, top_k_weights):
            return 2 * super().forward(hidden_states, top_k_index, top_k_weights)

    experts.__class__ = ScaledExperts
    with pytest.raises(NotImplementedError, match="differs from the model's own"):
        with torch.no_grad(), experts_through_projections(block, find_linear_layers(block, fused_experts=True)):
            model(ids(1, 8))


@pytest.mark.parametrize("kind", ["qwen3_moe", "gpt_oss", "mixtral"])
@pytest.mark.parametrize("pruner, config", [
    (MagnitudePruner, MagnitudeConfig(sparsity="2:4")),
    (WandaPruner, WandaConfig(sparsity="2:4", batch_size=2)),
    (SparseGPTPruner, SparseGPTConfig(sparsity="2:4", batch_size=2)),
], ids=["magnitude", "wanda", "sparsegpt"])
def test_pruners_prune_every_fused_expert_to_the_pattern(kind, pruner, config):
    model = moe_model(kind)
    instance = pruner(model)
    instance.prune(config, None if pruner is MagnitudePruner else ids(), progress=False)
    block = find_decoder_blocks(model)[1][0]
    for layer in find_linear_layers(block, fused_experts=True).values():
        assert n_m_holds(weight_matrix(layer)), layer
    for name, parameter in fused(model).items():
        assert float((parameter == 0).float().mean()) == 0.5, name
    pruned = {report.name for report in instance.report.layers}
    assert "model.layers.1.mlp.experts.3.down_proj" in pruned
    assert instance.report.overall_sparsity == 0.5


def test_wanda_scores_each_expert_by_the_inputs_routed_to_it():
    """The mask of expert e equals Wanda's mask computed by hand from the tokens the router sent to e."""
    model = moe_model("qwen3_moe", num_hidden_layers=1)
    experts = model.model.layers[0].mlp.experts
    captured = []
    handle = experts.register_forward_hook(lambda module, args, output: captured.append(args))
    tokens = ids()
    with torch.no_grad():
        model(tokens)
    handle.remove()
    hidden, index, _ = captured[0]
    dense_gate_up, dense_down = experts.gate_up_proj.detach().clone(), experts.down_proj.detach().clone()
    WandaPruner(model).prune(WandaConfig(sparsity="2:4", batch_size=len(tokens)), tokens, progress=False)
    for expert in range(4):
        x = hidden[(index == expert).any(dim=-1)]
        gate, up = (x @ dense_gate_up[expert].T).chunk(2, dim=-1)
        inner = experts.act_fn(gate) * up
        for dense, inputs, pruned in ((dense_gate_up[expert], x, experts.gate_up_proj[expert]),
                                      (dense_down[expert], inner, experts.down_proj[expert])):
            expected = pattern_mask(wanda_scores(dense, inputs.float().norm(dim=0)), "2:4", per_row=True)
            assert torch.equal(pruned == 0, expected | (dense == 0))


def test_an_expert_the_calibration_never_reaches_is_pruned_by_magnitude(caplog):
    model = moe_model("qwen3_moe", num_hidden_layers=1, num_experts=8, num_experts_per_tok=1)
    experts = model.model.layers[0].mlp.experts
    dense = experts.down_proj.detach().clone()
    with caplog.at_level(logging.WARNING, logger="hf_compress"):
        WandaPruner(model).prune(WandaConfig(sparsity="2:4", batch_size=1), ids(1, 3), progress=False)
    assert "received no calibration token and were pruned by weight magnitude" in caplog.text
    unreached = [e for e in range(8) if torch.equal(experts.down_proj[e] == 0,
                                                    pattern_mask(dense[e].abs(), "2:4", per_row=True))]
    assert len(unreached) >= 5  # 3 tokens reach at most 3 of the 8 experts
    assert float((experts.down_proj == 0).float().mean()) == 0.5


@pytest.mark.parametrize("kind", list(MOE_CONFIGS))
def test_a_pruned_moe_model_saved_sparse_loads_with_equal_logits(kind, tmp_path):
    model = moe_model(kind)
    WandaPruner(model).prune(WandaConfig(sparsity="2:4", batch_size=2), ids(), progress=False)
    folder = save_pruned(model, None, tmp_path / "pruned")
    reloaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokens = ids(2, 12, seed=1)
    with torch.no_grad():
        assert torch.equal(reloaded(tokens).logits, model(tokens).logits)
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert sorted(config["compressed_experts"]) == sorted(fused(model)) and config["format_version"] == 2
    with safe_open(folder / "model.safetensors", "pt") as stored:
        # Mixtral and Phi-MoE save `mlp.experts` as `block_sparse_moe.experts`
        experts = {name: stored.get_tensor(key) for name, key in
                   _compat.model_names_of_checkpoint_keys(model, list(stored.keys())).items() if "experts" in key}
    # every expert weight stored encoded, in the model's fused layout: values, a bitmask row per expert, the shape
    for name, parameter in fused(model).items():
        assert name not in experts and experts[name + "_values"].numel() == parameter.numel() // 2
        assert experts[name + "_bitmask"].shape[0] == parameter.shape[0]
        assert experts[name + "_shape"].tolist() == list(parameter.shape)
    # 2:4 in fp32 everywhere: (0.5 * 4 + 1/8) / 4 bytes per weight, plus the shapes
    assert config["storage"]["ratio"] == pytest.approx(0.53125, abs=2e-3)


@pytest.mark.parametrize("work", ["sds", "rtn"])
def test_methods_that_leave_fused_experts_unchanged_say_so(work, caplog):
    model = moe_model("qwen3_moe")
    before = {name: p.detach().clone() for name, p in fused(model).items()}
    with caplog.at_level(logging.WARNING, logger="hf_compress"):
        if work == "sds":
            SDSPruner(model).prune(SDSConfig(sparsity="2:4", batch_size=2, num_calibration_sequences=2,
                                             calibration_seq_len=16), ids(2, 16), progress=False)
        else:
            from hf_compress.quantization.rtn import quantize_rtn

            quantize_rtn(model, bits=4, group_size=16)
    assert "fused expert weights of this mixture-of-experts model" in caplog.text
    assert "left unchanged" in caplog.text
    assert all(torch.equal(p, before[name]) for name, p in fused(model).items())


def test_skipping_the_experts_leaves_them_dense_and_prunes_the_rest():
    model = moe_model("qwen3_moe")
    before = {name: p.detach().clone() for name, p in fused(model).items()}
    pruner = WandaPruner(model)
    pruner.prune(WandaConfig(sparsity="2:4", batch_size=2, skip=["*experts*"]), ids(), progress=False)
    assert all(torch.equal(p, before[name]) for name, p in fused(model).items())
    assert pruner.report.overall_sparsity == 0.5 and not any("experts" in r.name for r in pruner.report.layers)


def test_computes_linear_tells_a_router_from_a_linear_layer():
    from transformers.pytorch_utils import Conv1D

    from hf_compress.modeling.layers import computes_linear

    class FalconLikeLinear(torch.nn.Linear):  # its own forward, still x·Wᵀ + b
        def forward(self, inputs):
            return inputs @ self.weight.T + self.bias

    router = moe_model("phimoe").model.layers[0].mlp.router  # an nn.Linear returning routing tuples
    assert isinstance(router, torch.nn.Linear) and not computes_linear(router)
    assert computes_linear(torch.nn.Linear(4, 3)) and computes_linear(Conv1D(3, 4)) and computes_linear(FalconLikeLinear(4, 3))


def test_rtn_keeps_a_linear_subclass_router_and_the_packed_checkpoint_loads_with_equal_logits(tmp_path):
    """Phi-MoE's router subclasses nn.Linear but returns routing decisions; a PackedLinear in its place broke every
    forward. Its checkpoint also stores the router's marker under a renamed key (gate.weight)."""
    from hf_compress.formats.packed import save_packed
    from hf_compress.quantization.rtn import quantize_rtn

    model = quantize_rtn(moe_model("phimoe"), bits=4, group_size=16)
    assert type(model.model.layers[0].mlp.router).__name__ == "PhimoeTopKRouter"
    reloaded = AutoModelForCausalLM.from_pretrained(save_packed(model, None, tmp_path / "packed")).eval()
    tokens = ids(2, 8)
    with torch.no_grad():
        assert torch.equal(reloaded(tokens).logits, model(tokens).logits)


def test_rtn_keeps_a_linear_subclass_that_computes_something_else(caplog):
    """Not only MoE routers: any nn.Linear subclass whose forward returns something else than the linear map stays."""
    from hf_compress.assets import tiny_model
    from hf_compress.quantization.rtn import quantize_rtn

    class Scoring(torch.nn.Linear):  # returns scores and indices, as a router elsewhere than in an MoE block would
        def forward(self, inputs):
            return super().forward(inputs).topk(2, dim=-1)

    model, _ = tiny_model("llama")
    old = model.model.layers[0].mlp.down_proj
    model.model.layers[0].mlp.down_proj = Scoring(old.in_features, old.out_features, bias=False)
    with caplog.at_level(logging.WARNING, logger="hf_compress"):
        quantize_rtn(model, bits=4, group_size=16)
    assert "computing something other than a linear map (e.g. model.layers.0.mlp.down_proj, a Scoring)" in caplog.text
    assert type(model.model.layers[0].mlp.down_proj) is Scoring


def test_dlqat_leaves_a_linear_subclass_router_unadapted():
    from peft import get_peft_model

    from hf_compress.quantization.dlqat import DLQATConfig

    model = get_peft_model(moe_model("phimoe"), DLQATConfig(bits=4))
    assert type(model.base_model.model.model.layers[0].mlp.router).__name__ == "PhimoeTopKRouter"
    assert type(model.base_model.model.model.layers[0].self_attn.q_proj).__name__ == "DLQATLinear"
    with torch.no_grad():
        assert model(ids(1, 8)).logits.shape == (1, 8, 256)


def test_a_cpu_offloaded_moe_model_is_pruned_as_the_same_model_in_memory():
    """accelerate runs an offloaded module's forward inside its hook (which loads the weights): the experts are
    computed through their projections there, and the hook is left as it was."""
    from accelerate import cpu_offload

    from hf_compress.modeling.layers import is_offloaded, onloaded

    reference = moe_model("qwen3_moe")
    WandaPruner(reference).prune(WandaConfig(sparsity="2:4", batch_size=2), ids(), progress=False)
    model = cpu_offload(moe_model("qwen3_moe"), execution_device=torch.device("cpu"))
    WandaPruner(model).prune(WandaConfig(sparsity="2:4", batch_size=2), ids(), progress=False)
    experts = model.model.layers[0].mlp.experts
    assert is_offloaded(experts) and "forward" in experts.__dict__  # accelerate's wrapper is still there
    with onloaded(model):
        pruned = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    assert all(torch.equal(pruned[name], tensor) for name, tensor in reference.state_dict().items())
    with torch.no_grad():
        assert torch.equal(model(ids(1, 8)).logits, reference(ids(1, 8)).logits)


def test_skipped_experts_run_as_the_model_runs_them_even_in_a_layout_not_read():
    """skip=['*experts*'] is what the refusal of an unread layout suggests: it must then get past that layout."""
    model = moe_model("qwen3_moe")
    for block in find_decoder_blocks(model)[1]:
        experts = block.mlp.experts

        class ScaledExperts(type(experts)):
            def forward(self, hidden_states, top_k_index, top_k_weights):
                return 2 * super().forward(hidden_states, top_k_index, top_k_weights)

        experts.__class__ = ScaledExperts
    pruner = WandaPruner(model)
    pruner.prune(WandaConfig(sparsity="2:4", batch_size=2, skip=["*experts*"]), ids(), progress=False)
    assert pruner.report.overall_sparsity == 0.5
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with pytest.raises(NotImplementedError, match="differs from the model's own"):  # refused before any block changes
        MagnitudePruner(model).prune(MagnitudeConfig(sparsity=0.75), progress=False)
    assert all(torch.equal(tensor, before[name]) for name, tensor in model.state_dict().items())


def test_a_checkpoint_whose_loading_splits_a_stored_tensor_loads(tmp_path):
    """Sarvam-MoE stores attention as one query_key_value tensor that loading splits into q/k/v: no expert index."""
    if "sarvam_moe" not in CONFIG_MAPPING:
        pytest.skip("Sarvam-MoE came with transformers 5.24")
    torch.manual_seed(0)
    config = AutoConfig.for_model("sarvam_moe", **_COMMON, intermediate_size=128, moe_intermediate_size=32,
                                  num_experts=4, num_experts_per_tok=2, first_k_dense_replace=0)
    model = AutoModelForCausalLM.from_config(config).eval()
    WandaPruner(model).prune(WandaConfig(sparsity="2:4", batch_size=2), ids(), progress=False)
    reloaded = AutoModelForCausalLM.from_pretrained(save_pruned(model, None, tmp_path / "pruned")).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(ids(2, 8)).logits, model(ids(2, 8)).logits)


def test_convolution_weights_are_not_experts(caplog):
    """Falcon-H1's Mamba conv1d weights are 3-D too: no MoE warning, and not counted as linear bytes."""
    from hf_compress.pruning.storage import sparse_state_dict
    from hf_compress.quantization.rtn import quantize_rtn

    config = AutoConfig.for_model("falcon_h1", **_COMMON, intermediate_size=128)
    model = AutoModelForCausalLM.from_config(config).eval()
    assert any(p.dim() == 3 for p in model.parameters()) and fused_expert_parameters(model) == {}
    linear = sum(weight_matrix(layer).numel() * 4 for block in find_decoder_blocks(model)[1]
                 for layer in find_linear_layers(block).values())
    assert sparse_state_dict(model)[2]["dense_linear_bytes"] == linear
    with caplog.at_level(logging.WARNING, logger="hf_compress"):
        quantize_rtn(model, bits=4, group_size=16)
    assert "mixture-of-experts" not in caplog.text


def _saved_pruned_moe(tmp_path):
    model = moe_model("qwen3_moe")
    WandaPruner(model).prune(WandaConfig(sparsity="2:4", batch_size=2), ids(), progress=False)
    return model, save_pruned(model, None, tmp_path / "pruned")


EXPERT = "model.layers.1.mlp.experts.down_proj"
BROKEN_EXPERTS = {
    "bitmask missing": (None, lambda t: t.pop(EXPERT + "_bitmask"), "have no sparse expert weights"),
    "not listed": (lambda q: q["compressed_experts"].remove(EXPERT), None,
                   "stored sparse expert weight.* not in quantization_config.compressed_experts"),
    "values missing": (None, lambda t: t.pop(EXPERT + "_values"), "_values' is missing"),
    "a value too few": (None, lambda t: t.update({EXPERT + "_values": t[EXPERT + "_values"][1:].clone()}),
                        "bitmask marks .* non-zeros but .* values are stored"),
    "other shape": (None, lambda t: t.update({EXPERT + "_shape": torch.tensor([4, 64, 16])}),
                    r"stored shape \[4, 64, 16\] but the model's weight is \[4, 64, 32\]"),
}


@pytest.mark.parametrize("damage", list(BROKEN_EXPERTS))
def test_a_damaged_sparse_expert_weight_is_refused_before_loading(tmp_path, damage):
    from hf_compress.formats.integrity import CheckpointIntegrityError

    _, folder = _saved_pruned_moe(tmp_path)
    config_change, tensor_change, message = BROKEN_EXPERTS[damage]
    edit_checkpoint(folder, config_change, tensor_change)
    with pytest.raises(CheckpointIntegrityError, match=message):
        AutoModelForCausalLM.from_pretrained(folder)


def test_only_a_checkpoint_with_encoded_experts_needs_format_version_2(tmp_path, monkeypatch):
    """A hf_compress that reads version 1 only refuses encoded experts with an upgrade hint; a checkpoint whose
    experts stay dense (not sparse enough) is still version 1, for it."""
    from hf_compress.formats.sparse import SparseStorageConfig

    _, folder = _saved_pruned_moe(tmp_path)
    dense = save_pruned(moe_model("qwen3_moe"), None, tmp_path / "dense")
    config = json.loads((dense / "config.json").read_text())["quantization_config"]
    assert config["format_version"] == 1 and "compressed_experts" not in config
    monkeypatch.setattr(SparseStorageConfig, "FORMAT_VERSION", 1)
    with pytest.raises(ValueError, match="format version 2.*upgrade hf_compress"):
        AutoModelForCausalLM.from_pretrained(folder)
    AutoModelForCausalLM.from_pretrained(dense)


ROUTER_CONFIGS = {  # family: (config overrides, its nn.Linear layers that route tokens to the experts)
    "phimoe": ({}, ["mlp.router"]),  # a linear subclass returning routing weights and indices
    "qwen2_moe": (dict(intermediate_size=128, moe_intermediate_size=32, shared_expert_intermediate_size=48,
                       num_experts=4, num_experts_per_tok=2), ["mlp.shared_expert_gate"]),  # one gate value
    "hunyuan_v1_moe": (dict(intermediate_size=32, num_experts=4, moe_topk=2), ["mlp.gate.wg"]),  # under a gate module
}


@pytest.mark.parametrize("kind", list(ROUTER_CONFIGS))
def test_the_linear_layers_that_route_tokens_to_experts_are_left_as_they_are(kind):
    from hf_compress.modeling.layers import router_layers
    from hf_compress.quantization.rtn import quantize_rtn

    overrides, routers = ROUTER_CONFIGS[kind]
    torch.manual_seed(0)
    config = AutoConfig.for_model(kind, **{**_COMMON, **MOE_CONFIGS.get(kind, {}), **overrides})
    model = AutoModelForCausalLM.from_config(config).eval()
    block = find_decoder_blocks(model)[1][0]
    assert sorted(router_layers(block)) == routers
    assert not set(routers) & set(find_linear_layers(block, fused_experts=True))
    before = {name: block.get_submodule(name).weight.detach().clone() for name in routers}
    types = {name: type(block.get_submodule(name)) for name in routers}
    # a skip pattern naming a router is not refused as a typo: it asks for what happens anyway
    WandaPruner(model).prune(WandaConfig(sparsity="2:4", batch_size=2, skip=[f"*{routers[0]}"]), ids(), progress=False)
    assert all(torch.equal(block.get_submodule(name).weight, weight) for name, weight in before.items())
    assert float((block.mlp.experts.down_proj == 0).float().mean()) == 0.5  # the rest is pruned
    quantize_rtn(model, bits=4, group_size=16)
    assert {name: type(block.get_submodule(name)) for name in routers} == types


def test_sleb_scores_and_removes_blocks_of_a_model_whose_blocks_unpack_their_mlp_output(tmp_path, caplog):
    """gpt-oss's decoder layer unpacks (hidden states, router scores) from its MLP: the module that stands in for a
    switched-off MLP while SLEB scores a removal must return both."""
    from hf_compress.modeling.sublayers import sublayers_switched_off
    from hf_compress.pruning import SLEBConfig, SLEBPruner

    model = moe_model("gpt_oss", num_hidden_layers=3, layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    with sublayers_switched_off(model.model.layers, [(1, "mlp")]), torch.no_grad():
        assert model(ids(1, 8)).logits.shape == (1, 8, 256)
    with caplog.at_level(logging.WARNING, logger="hf_compress"):
        SLEBPruner(model).prune(SLEBConfig(target_sparsity=0.3, num_calibration_sequences=2, calibration_seq_len=32,
                                           protected_blocks=0), ids(), progress=False)
    assert "scoring every candidate with whole forwards instead" not in caplog.text  # the shortcut held
    assert model.config.num_hidden_layers == 2
    reloaded = AutoModelForCausalLM.from_pretrained(save_pruned(model, None, tmp_path / "sleb")).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(ids(2, 8)).logits, model(ids(2, 8)).logits)
