"""Model introspection and block-by-block calibration (hf_compress.modeling) on every tiny architecture."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from hf_compress.assets import TINY_ARCHITECTURES, tiny_model, tiny_tokenizer
from hf_compress.modeling import (
    BlockContext,
    HessianCollector,
    InputNormCollector,
    calibration_batches,
    capture_block_inputs,
    find_decoder_blocks,
    find_linear_layers,
    for_each_block,
    in_features,
    out_features,
    set_weight_matrix,
    weight_matrix,
)


LLAMA_LINEARS = [
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
]
EXPECTED = {
    "llama": ("model.layers", LLAMA_LINEARS),
    "mistral": ("model.layers", LLAMA_LINEARS),
    "qwen2": ("model.layers", LLAMA_LINEARS),
    "qwen3": ("model.layers", LLAMA_LINEARS),
    "gemma3": ("model.layers", LLAMA_LINEARS),
    "gpt2": ("transformer.h", ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]),
    "opt": (
        "model.decoder.layers",
        ["self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj", "self_attn.out_proj", "fc1", "fc2"],
    ),
}
SEQ_LEN = 48  # longer than gemma3's sliding window (32), so sliding and full layers differ


def _ids(num: int = 5, seq_len: int = SEQ_LEN, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 256, (num, seq_len), generator=torch.Generator().manual_seed(seed))


def _reference_run(model: nn.Module, ids: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """The model's own per-block inputs (``output_hidden_states``) and its last block's output."""
    _, blocks = find_decoder_blocks(model)
    last = []
    handle = blocks[-1].register_forward_hook(lambda module, args, output: last.append(output))
    try:
        with torch.no_grad():
            hidden_states = model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
    finally:
        handle.remove()
    # hidden_states[i] (i < L) is the input of block i; the last entry is after the final norm.
    assert len(hidden_states) == len(blocks) + 1
    return hidden_states, last[0]


# ------------------------------------------------------------------------------------------------ layers


def test_every_tiny_architecture_is_covered() -> None:
    assert set(EXPECTED) == set(TINY_ARCHITECTURES)


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_blocks_and_linear_layers_are_discovered(arch: str) -> None:
    model, _ = tiny_model(arch)
    name, blocks = find_decoder_blocks(model)
    expected_name, expected_linears = EXPECTED[arch]
    assert name == expected_name
    assert blocks is model.get_submodule(name) and len(blocks) == model.config.num_hidden_layers
    for block in blocks:
        linears = find_linear_layers(block)
        assert list(linears) == expected_linears
        for layer_name, layer in linears.items():
            assert layer is block.get_submodule(layer_name)
            w = weight_matrix(layer)
            assert tuple(w.shape) == (out_features(layer), in_features(layer))
    # embeddings and lm_head are not inside a block
    block_modules = {id(m) for m in blocks.modules()}
    assert id(model.get_output_embeddings()) not in block_modules
    assert id(model.get_input_embeddings()) not in block_modules


def test_skip_patterns_are_fnmatch_on_relative_names() -> None:
    block = tiny_model("llama")[0].model.layers[0]
    assert list(find_linear_layers(block, skip=["mlp.*"])) == LLAMA_LINEARS[:4]
    assert list(find_linear_layers(block, skip=["*_proj"])) == []
    kept = find_linear_layers(block, skip=["*q_proj", "self_attn.[kv]_proj"])
    assert list(kept) == ["self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    assert list(find_linear_layers(block, skip="mlp.*")) == LLAMA_LINEARS[:4]  # a lone string is one pattern


def test_conv1d_weight_matrix_is_out_by_in_and_round_trips() -> None:
    model, _ = tiny_model("gpt2")
    c_attn = model.transformer.h[0].attn.c_attn
    assert isinstance(c_attn, Conv1D) and tuple(c_attn.weight.shape) == (64, 192)  # stored [in, out]
    w = weight_matrix(c_attn)
    assert tuple(w.shape) == (192, 64) == (out_features(c_attn), in_features(c_attn))
    assert torch.equal(w, c_attn.weight.t())

    x = torch.randn(3, 64)
    new = torch.randn(192, 64)
    parameter = c_attn.weight
    set_weight_matrix(c_attn, new)
    assert c_attn.weight is parameter  # written in place
    assert torch.equal(weight_matrix(c_attn), new)
    torch.testing.assert_close(c_attn(x), x @ new.t() + c_attn.bias)

    # the view shares storage: an in-place edit reaches the layer
    weight_matrix(c_attn)[5] = 0
    assert torch.all(c_attn.weight[:, 5] == 0)

    with pytest.raises(ValueError, match=r"\[out_features, in_features\] = \[192, 64\]"):
        set_weight_matrix(c_attn, torch.zeros(64, 192))


def test_linear_weight_matrix_round_trips() -> None:
    layer = nn.Linear(4, 3)
    new = torch.arange(12.0).view(3, 4)
    set_weight_matrix(layer, new)
    assert torch.equal(layer.weight, new) and torch.equal(weight_matrix(layer), new)
    assert not weight_matrix(layer).requires_grad
    with pytest.raises(TypeError, match="nn.Linear or transformers Conv1D"):
        weight_matrix(nn.LayerNorm(4))


def test_model_without_decoder_blocks_is_rejected() -> None:
    with pytest.raises(ValueError, match="no decoder blocks found"):
        find_decoder_blocks(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4)))
    model, _ = tiny_model("llama")
    with pytest.raises(ValueError, match="no decoder blocks found"):
        for_each_block(model.model.layers[0], _ids(), progress=False)


# ------------------------------------------------------------------------------------------------ calibration


@pytest.mark.parametrize(
    "arch, attn",
    [(arch, "sdpa") for arch in TINY_ARCHITECTURES] + [("gemma3", "eager"), ("gpt2", "eager")],
)
def test_block_by_block_propagation_matches_the_model(arch: str, attn: str) -> None:
    model, _ = tiny_model(arch)
    model.set_attn_implementation(attn)
    ids = _ids()
    hidden_states, last_output = _reference_run(model, ids)

    seen: list[torch.Tensor] = []
    final = for_each_block(
        model, ids, lambda ctx: seen.append(torch.cat(ctx.inputs)), batch_size=2, progress=False
    )  # 5 sequences in micro-batches of 2, 2, 1
    assert [h.shape[0] for h in final] == [2, 2, 1]
    assert len(seen) == model.config.num_hidden_layers
    for index, inputs in enumerate(seen):
        torch.testing.assert_close(inputs, hidden_states[index], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat(final), last_output, rtol=1e-5, atol=1e-5)


def test_gemma3_sliding_and_full_layers_receive_their_own_arguments() -> None:
    model, _ = tiny_model("gemma3")
    assert model.config.layer_types == ["sliding_attention", "full_attention"]
    captured = capture_block_inputs(model, _ids(3), batch_size=2)
    assert [h.shape[0] for h in captured.hidden_states] == [2, 1]
    sliding, full = captured.calls
    assert sliding.kwargs["attention_mask"] is not None  # the window cuts a causal mask over 48 tokens
    assert not torch.equal(sliding.kwargs["position_embeddings"][0], full.kwargs["position_embeddings"][0])
    # Feeding block 1 the arguments of block 0 would change its output: the per-block capture matters.
    _, blocks = find_decoder_blocks(model)
    with torch.no_grad():
        h1 = sliding(blocks[0], captured.hidden_states[0])
        assert not torch.allclose(full(blocks[1], h1), sliding(blocks[1], h1))


def test_collectors_match_hand_computation_across_micro_batches() -> None:
    x = torch.randn(7, 5, 16, generator=torch.Generator().manual_seed(1))
    flat = x.reshape(-1, 16)
    whole_h, whole_n = HessianCollector(), InputNormCollector()
    whole_h.add_batch(x)
    whole_n.add_batch(x)
    split_h, split_n = HessianCollector(), InputNormCollector()
    for part in (x[:1], x[1:4], x[4:]):
        split_h.add_batch(part)
        split_n.add_batch(part)
    expected_h = 2.0 / flat.shape[0] * flat.t() @ flat
    for collector in (whole_h, split_h):
        assert collector.num_tokens == 35 and collector.hessian.dtype == torch.float32
        torch.testing.assert_close(collector.hessian, expected_h, rtol=1e-5, atol=1e-5)
    for collector in (whole_n, split_n):
        assert collector.num_tokens == 35
        torch.testing.assert_close(collector.norms, flat.norm(dim=0), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(collector.mean_squares, flat.pow(2).mean(dim=0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch, layer_name", [("llama", "mlp.down_proj"), ("gpt2", "attn.c_attn")])
def test_collected_statistics_are_the_layer_inputs(arch: str, layer_name: str) -> None:
    model, _ = tiny_model(arch)
    ids = _ids()
    _, blocks = find_decoder_blocks(model)
    inputs = []
    handle = blocks[1].get_submodule(layer_name).register_forward_hook(lambda m, a, o: inputs.append(a[0]))
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    handle.remove()
    x = inputs[0].reshape(-1, inputs[0].shape[-1])

    results = {}
    for batch_size in (2, 5):
        stats = {}
        for_each_block(
            model, ids, lambda ctx: stats.update({ctx.index: ctx.stats}),
            batch_size=batch_size, progress=False,
            collectors_for=lambda name, layer: (
                [HessianCollector(), InputNormCollector()] if name == layer_name else None
            ),
        )
        assert set(stats[1]) == {layer_name}
        hessian, norms = stats[1][layer_name]
        torch.testing.assert_close(hessian.hessian, 2.0 / x.shape[0] * x.t() @ x, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(norms.norms, x.norm(dim=0), rtol=1e-5, atol=1e-5)
        results[batch_size] = hessian.hessian
    torch.testing.assert_close(results[2], results[5], rtol=1e-5, atol=1e-6)


def test_next_block_sees_the_modified_block_and_dense_outputs_are_kept() -> None:
    model, _ = tiny_model("llama")
    model.train()  # for_each_block runs in eval mode and restores the caller's mode
    ids = _ids()
    dense_hidden, _ = _reference_run(model, ids)
    contexts: dict[int, BlockContext] = {}
    inputs_seen: dict[int, torch.Tensor] = {}

    def zero_first_block(ctx: BlockContext) -> None:
        contexts[ctx.index] = ctx
        inputs_seen[ctx.index] = torch.cat(ctx.inputs)
        assert ctx.num_blocks == 2 and ctx.name == f"model.layers.{ctx.index}"
        if ctx.index == 0:
            for layer in ctx.linear_layers.values():
                set_weight_matrix(layer, torch.zeros_like(weight_matrix(layer)))

    for_each_block(model, ids, zero_first_block, keep_dense_outputs=True, batch_size=3, progress=False)
    assert model.training
    # Llama blocks are residual: with o_proj and down_proj zero, block 0 is the identity.
    assert torch.equal(inputs_seen[1], inputs_seen[0])
    torch.testing.assert_close(inputs_seen[0], dense_hidden[0])
    assert not torch.allclose(inputs_seen[1], dense_hidden[1])
    # The dense outputs are those of block 0 before the callback zeroed it.
    torch.testing.assert_close(torch.cat(contexts[0].dense_outputs), dense_hidden[1], rtol=1e-5, atol=1e-5)
    assert all(torch.all(weight_matrix(layer) == 0) for layer in contexts[0].linear_layers.values())


def test_context_forward_supports_training_and_fresh_statistics() -> None:
    model, _ = tiny_model("qwen3")
    checked = []

    def train_a_step(ctx: BlockContext) -> None:
        assert not torch.is_grad_enabled()  # callbacks run under no_grad by default
        layer = ctx.linear_layers["mlp.down_proj"]
        with torch.enable_grad():
            loss = ctx.forward(ctx.inputs[0]).pow(2).mean()
            loss.backward()
        assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
        layer.weight.grad = None
        before = ctx.collect(lambda name, l: HessianCollector(), names=["mlp.down_proj"])["mlp.down_proj"][0]
        set_weight_matrix(ctx.linear_layers["mlp.up_proj"], torch.zeros(128, 64))
        after = ctx.collect(lambda name, l: HessianCollector(), names=["mlp.down_proj"])["mlp.down_proj"][0]
        assert before.hessian.abs().sum() > 0 and torch.all(after.hessian == 0)  # up_proj zero => no input
        checked.append(ctx.index)

    for_each_block(model, _ids(2), train_a_step, progress=False)
    assert checked == [0, 1]


def test_offloaded_model_is_calibrated_and_edits_persist() -> None:
    accelerate = pytest.importorskip("accelerate")
    reference, _ = tiny_model("llama")
    model, _ = tiny_model("llama")
    # A float64 offload store forces accelerate to copy weights at onload (as with a GPU execution device),
    # so edits only persist if they are written back.
    store = {key: value.double() for key, value in model.state_dict().items()}
    accelerate.cpu_offload(model, execution_device="cpu", state_dict=store)
    assert model.model.layers[0].self_attn.q_proj.weight.device.type == "meta"
    ids = _ids(3)

    def halve_gate(ctx: BlockContext) -> None:
        layer = ctx.linear_layers["mlp.gate_proj"]
        set_weight_matrix(layer, weight_matrix(layer) * 0.5)
        ctx.outputs()  # a forward inside the callback must not discard the edit

    expected = for_each_block(reference, ids, halve_gate, progress=False)
    got = for_each_block(
        model, ids, halve_gate, collectors_for=lambda name, layer: InputNormCollector(), progress=False
    )
    torch.testing.assert_close(torch.cat(got), torch.cat(expected))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits)


def test_peft_wrapped_model() -> None:
    peft = pytest.importorskip("peft")
    model, _ = tiny_model("llama")
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj", "down_proj"]))
    name, blocks = find_decoder_blocks(wrapped)
    assert name == "base_model.model.model.layers"
    linears = find_linear_layers(blocks[0])
    assert list(linears) == LLAMA_LINEARS  # base layers, not lora_A / lora_B
    assert all(type(layer) is nn.Linear for layer in linears.values())


# ------------------------------------------------------------------------------------------------ data


@pytest.mark.parametrize("model_type, overrides, argument", [
    # Gemma 4's per-layer inputs (from the token ids, passed positionally), DeepSeek-V4's token ids for hash routing
    ("gemma4_text", dict(vocab_size_per_layer_input=256, hidden_size_per_layer_input=16, sliding_window=16,
                         layer_types=["sliding_attention", "full_attention"], num_kv_shared_layers=0),
     "per_layer_input"),
    ("deepseek_v4", dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32), "input_ids"),
])
def test_blocks_that_receive_per_sequence_inputs_are_not_calibrated_with_another_sequences(
        model_type, overrides, argument) -> None:
    """Block arguments are recorded from one sequence and replayed for all: Gemma 4 ran Wanda silently with the first
    sequence's per-layer inputs for every sequence. Such a model is refused; magnitude pruning still works."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from hf_compress.pruning import MagnitudeConfig, MagnitudePruner, WandaConfig, WandaPruner

    config = AutoConfig.for_model(model_type, vocab_size=256, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, **overrides)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(3, 250, (4, 32), generator=torch.Generator().manual_seed(0))
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with pytest.raises(NotImplementedError, match=f"depend on the sequence's tokens.*\\({argument}\\)"):
        WandaPruner(model).prune(WandaConfig(sparsity="2:4", batch_size=2), ids, progress=False)
    assert all(torch.equal(tensor, before[name]) for name, tensor in model.state_dict().items())  # untouched
    MagnitudePruner(model).prune(MagnitudeConfig(sparsity="2:4"), progress=False)


@pytest.mark.parametrize("model_type", ["bloom", "xglm"])
def test_blocks_that_take_one_sequences_arguments_for_one_sequence_only_are_calibrated_sequence_by_sequence(
        model_type) -> None:
    """Bloom's ALiBi biases and XGLM's masks must have the micro-batch's size, which the one-sequence recording does
    not: their micro-batches run sequence by sequence, so any batch_size gives batch_size=1's weights exactly."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from hf_compress.pruning import SparseGPTConfig, SparseGPTPruner, WandaConfig, WandaPruner

    config = AutoConfig.for_model(model_type, vocab_size=256, hidden_size=64, d_model=64, n_layer=2, num_layers=2,
                                  n_head=4, attention_heads=4, ffn_dim=128)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(3, 250, (4, 32), generator=torch.Generator().manual_seed(0))
    captured = capture_block_inputs(model, ids, batch_size=3)
    assert [call.rows_per_call for call in captured.calls] == [1, 1]
    block, call = find_decoder_blocks(model)[1][0], captured.calls[0]
    with torch.no_grad():
        one_by_one = torch.cat([call(block, row) for row in captured.hidden_states[0].split(1)])
        assert torch.equal(call(block, captured.hidden_states[0]), one_by_one)
    for pruner_class, config_class in ((WandaPruner, WandaConfig), (SparseGPTPruner, SparseGPTConfig)):
        weights = []
        for batch_size in (1, 3):  # micro-batches of 3 and 1
            pruned = copy.deepcopy(model)
            pruner = pruner_class(pruned)
            pruner.prune(config_class(sparsity="2:4", batch_size=batch_size), ids, progress=False)
            assert pruner.report.overall_sparsity == 0.5
            weights.append(pruned.state_dict())
        assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0]), pruner_class.__name__
    assert capture_block_inputs(tiny_model("llama")[0], ids, batch_size=2).calls[0].rows_per_call is None


def test_calibration_batches_are_deterministic_windows() -> None:
    datasets = pytest.importorskip("datasets")
    tokenizer = tiny_tokenizer()
    texts = ["The first calibration article. " * 20, "A second one, somewhat different. " * 20]
    stream = torch.tensor(tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"])
    ids = calibration_batches(texts, tokenizer, num_sequences=6, seq_len=32, seed=0)
    assert ids.shape == (6, 32) and ids.dtype == torch.long
    for window in ids:  # every row is a contiguous window of the joined text
        starts = [s for s in range(stream.numel() - 31) if torch.equal(stream[s : s + 32], window)]
        assert starts
    dataset = datasets.Dataset.from_dict({"text": texts})
    assert torch.equal(calibration_batches(dataset, tokenizer, num_sequences=6, seq_len=32, seed=0), ids)
    assert not torch.equal(calibration_batches(texts, tokenizer, num_sequences=6, seq_len=32, seed=1), ids)


def test_too_short_or_malformed_calibration_data_is_rejected() -> None:
    tokenizer = tiny_tokenizer()
    message = r"has 5 tokens, fewer than seq_len=64; pass more text or a smaller seq_len"
    with pytest.raises(ValueError, match=message):
        calibration_batches(["short"], tokenizer, seq_len=64)
    with pytest.raises(ValueError, match="has 0 tokens"):
        calibration_batches([], tokenizer, seq_len=8)
    model, _ = tiny_model("llama")
    with pytest.raises(ValueError, match=r"\[num_sequences, seq_len\]"):
        for_each_block(model, torch.arange(10), progress=False)


def test_calibration_loss_holds_one_batch_of_logits(monkeypatch) -> None:
    # [batch, seq, vocab] logits are the largest tensor of a search's forward (4 GiB for 8 x 2048 tokens of a 32k
    # vocabulary): the loss takes a float copy and a log-softmax of one window's at a time, and a batch's logits are
    # gone before the next batch's forward.
    import weakref

    from hf_compress.modeling import calibration_loss

    model, _ = tiny_model("llama")
    ids = _ids(4, 16)
    with torch.no_grad():
        logits = model(ids).logits[:, :-1]
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    previous: list[weakref.ref] = []
    alive_at_forward = []
    model.register_forward_pre_hook(lambda *_: alive_at_forward.append(any(r() is not None for r in previous)))
    model.register_forward_hook(lambda module, args, output: previous.append(weakref.ref(output.logits)))
    scored_rows = []
    cross_entropy = torch.nn.functional.cross_entropy
    monkeypatch.setattr(torch.nn.functional, "cross_entropy",
                        lambda inputs, *args, **kwargs: scored_rows.append(inputs.numel() // inputs.shape[-1])
                        or cross_entropy(inputs, *args, **kwargs))
    assert calibration_loss(model, ids, batch_size=2) == pytest.approx(float(expected), rel=1e-5)
    assert max(scored_rows) == 15  # one window's predicted tokens, not the batch's 30
    assert alive_at_forward == [False, False]


# ------------------------------------------------------------------------------------- removing whole blocks


def _reloaded_logits(model, ids, folder):
    model.save_pretrained(folder)
    reloaded = type(model).from_pretrained(folder).eval()
    with torch.no_grad():
        return reloaded(input_ids=ids).logits


def test_removing_blocks_of_a_multimodal_model_edits_its_text_config(tmp_path):
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    from hf_compress.modeling.structure import remove_blocks

    config = Gemma3Config(
        text_config=dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, sliding_window=8,
                         layer_types=["sliding_attention", "full_attention"] * 2),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=28, patch_size=14),
        mm_tokens_per_image=4, image_token_index=299, boi_token_index=297, eoi_token_index=298)
    torch.manual_seed(0)
    model = Gemma3ForConditionalGeneration(config).eval()
    remove_blocks(model, [1])
    text = model.config.text_config
    assert text.num_hidden_layers == 3 and text.layer_types == ["sliding_attention", "sliding_attention", "full_attention"]
    assert len(find_decoder_blocks(model)[1]) == 3  # discovery reads the config it edited
    ids = torch.randint(3, 290, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    assert torch.equal(_reloaded_logits(model, ids, tmp_path / "m"), expected)


@pytest.mark.parametrize("placement", [{"decoder_sparse_step": 2}, {"mlp_only_layers": [2]}])
def test_removing_blocks_of_a_moe_model_keeps_each_block_its_kind(tmp_path, placement):
    """Qwen-MoE picks a block's kind by its index (decoder_sparse_step, mlp_only_layers): after a removal the stale
    fields rebuilt an MLP where a mixture of experts was, whose weights from_pretrained then initialised at random."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from hf_compress.modeling.structure import remove_blocks

    config = AutoConfig.for_model("qwen3_moe", vocab_size=256, hidden_size=64, intermediate_size=128,
                                  moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2, num_hidden_layers=4,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, pad_token_id=0,
                                  bos_token_id=1, eos_token_id=2, **placement)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    drop = 1 if "decoder_sparse_step" in placement else 0
    kinds = [type(layer.mlp).__name__ for i, layer in enumerate(model.model.layers) if i != drop]
    assert len(set(kinds)) == 2  # both kinds remain, in an order the old fields would not rebuild
    remove_blocks(model, [drop])
    ids = torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids).logits
    model.save_pretrained(tmp_path / "moe")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "moe").eval()
    assert [type(layer.mlp).__name__ for layer in reloaded.model.layers] == kinds
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, expected)


@pytest.mark.parametrize("kind, field", [("glm4_moe", "first_k_dense_replace"), ("afmoe", "num_dense_layers")])
def test_removing_a_first_dense_block_keeps_the_others_mixtures_of_experts(tmp_path, kind, field):
    """DeepSeek-style models make the first k blocks dense: with block 0 removed, block 1 (now 0) stays an MoE."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from hf_compress.modeling.structure import remove_blocks

    config = AutoConfig.for_model(kind, vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                                  num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                  n_routed_experts=4, num_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
                                  **{field: 2})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    kinds = [type(layer.mlp).__name__ for layer in model.model.layers]
    assert kinds[0] == kinds[1] != kinds[2]  # dense, dense, MoE
    remove_blocks(model, [0])
    assert getattr(model.config, field) == 1
    ids = torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids).logits
    model.save_pretrained(tmp_path / "moe")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "moe").eval()
    assert [type(layer.mlp).__name__ for layer in reloaded.model.layers] == kinds[1:]
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, expected)


def test_removing_blocks_refuses_moe_placement_by_index_arithmetic():
    """ERNIE-4.5-MoE / DeepSeek-V2 place MoE blocks by start index or frequency, with no per-layer override."""
    from hf_compress.modeling.structure import remove_blocks

    model, _ = tiny_model("llama")
    model.config.moe_layer_start_index = 1
    with pytest.raises(ValueError, match=r"by index \(moe_layer_start_index=1\)"):
        remove_blocks(model, [0])
    assert len(model.model.layers) == 2 and model.config.num_hidden_layers == 2  # refused before any change


def test_removing_blocks_slices_every_per_layer_list_and_refuses_moving_gpt2_scaled_blocks(tmp_path):
    from transformers import AutoModelForCausalLM, GPT2Config, SmolLM3Config

    from hf_compress.modeling.structure import remove_blocks

    config = SmolLM3Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                           no_rope_layer_interval=4, pad_token_id=0, bos_token_id=1, eos_token_id=2)  # block 3: no RoPE
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    remove_blocks(model, [0])
    assert model.config.no_rope_layers == [1, 1, 0]
    ids = torch.randint(3, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids).logits
    assert torch.equal(_reloaded_logits(model, ids, tmp_path / "smollm3"), expected)

    gpt2 = AutoModelForCausalLM.from_config(GPT2Config(vocab_size=256, n_embd=32, n_layer=3, n_head=2,
                                                       scale_attn_by_inverse_layer_idx=True))
    with pytest.raises(ValueError, match="scale_attn_by_inverse_layer_idx.*from the end only"):
        remove_blocks(gpt2, [0])
    assert len(gpt2.transformer.h) == 3  # refused before any change
    remove_blocks(gpt2, [2])  # the last block: no index moves
    assert gpt2.config.n_layer == 2


def test_removing_blocks_refuses_blocks_built_from_their_position():
    """DiffLlama fixes each attention's lambda_init from its index when built, RecurrentGemma picks a block's kind from a
    cycle of block_types: a moved block kept the old one in memory and reloaded as the new one (a recurrent block's
    weights initialised at random, with only transformers' load report). Refused, and nothing changes."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from hf_compress.modeling.structure import remove_blocks

    diffllama = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "diffllama", vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2))
    with pytest.raises(ValueError, match=r"block 2's self_attn.lambda_init would be .* at index 1.*from the end only"):
        remove_blocks(diffllama, [1])
    assert len(diffllama.model.layers) == 4 and diffllama.config.num_hidden_layers == 4
    remove_blocks(diffllama, [3])  # the last block: no index moves
    assert diffllama.config.num_hidden_layers == 3

    recurrent = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "recurrent_gemma", vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, lru_width=64, attention_window_size=16))
    with pytest.raises(ValueError, match="block 3 would reload as RecurrentGemmaDecoderLayer at index 2 .*Recurrent"):
        remove_blocks(recurrent, [2])
    assert len(recurrent.model.layers) == 4


def test_removing_blocks_renumbers_an_index_a_block_keeps_under_another_name(tmp_path):
    """GPT-Neo's attention writes to the cache under its own layer_id: left as it was, generate() indexed past the
    shortened cache."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from hf_compress.modeling.structure import remove_blocks

    def config():
        return AutoConfig.for_model("gpt_neo", vocab_size=256, hidden_size=64, num_layers=4, num_heads=4,
                                    attention_types=[[["global", "local"], 2]], max_position_embeddings=64,
                                    window_size=4)

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config()).eval()
    remove_blocks(model, [1])
    assert [block.attn.attention.layer_id for block in model.transformer.h] == [0, 1, 2]
    ids = torch.randint(3, 256, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids, use_cache=False).logits
    assert torch.equal(_reloaded_logits(model, ids, tmp_path / "neo"), expected)
    generated = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    from peft import LoraConfig, get_peft_model  # under PEFT too: the check builds the base model's class

    wrapped = get_peft_model(AutoModelForCausalLM.from_config(config()), LoraConfig(target_modules=["q_proj"]))
    remove_blocks(wrapped, [0])
    assert [block.attn.attention.layer_id for block in wrapped.get_base_model().transformer.h] == [0, 1, 2]
    stepwise = ids
    with torch.no_grad():
        for _ in range(4):
            stepwise = torch.cat([stepwise, model(stepwise, use_cache=False).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(generated, stepwise)
