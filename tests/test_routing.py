"""Token router (FTP): exactness at sparsity 0, the static rule, the search budget, gather/scatter against a masked
reference (prefill and cached decoding, sliding windows included), save/load, batches, training, bad input."""

from __future__ import annotations

import copy
import inspect
import json
import math
import types

import pytest
import torch

import hf_compress  # noqa: F401  (registers the routed format)
from hf_compress import _compat
from hf_compress.assets import tiny_model
from hf_compress.modeling.layers import find_decoder_blocks
from hf_compress.routing import (
    RoutingSchedule,
    TokenRouterConfig,
    install_routing,
    remove_routing,
    routing_disabled,
    routing_mode,
    routing_state,
    save_routed,
    search_schedule,
    static_router,
    train_token_router,
)
from hf_compress.routing.router import (
    ROUTER_FEATURES_VERSION, TokenRouter, router_features, select_tokens, static_scores,
)
from hf_compress.routing.layer import RoutedLayerMixin
from hf_compress.routing.schedule import skip_count


ARCHITECTURES = ("llama", "qwen3", "gemma3", "mistral", "gpt2", "opt")


def _ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 250, (batch, length), generator=torch.Generator().manual_seed(seed))


def _greedy(model, ids, mask=None, new=6):
    mask = torch.ones_like(ids) if mask is None else mask
    return model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=0)


def _left_padded(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows as one left-padded batch (pad id 0) and its attention mask."""
    width = max(len(row) for row in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for index, row in enumerate(rows):
        ids[index, width - len(row):] = row
        mask[index, width - len(row):] = 1
    return ids, mask


def _randomise_router(router: TokenRouter) -> None:
    """Give the router random output weights: a fresh one reads only position and block sparsity (the static rule)."""
    with torch.no_grad():
        router.output.weight.normal_(generator=torch.Generator().manual_seed(1))


# --- sparsity 0 is the base model -------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_sparsity_zero_is_the_base_model_exactly(arch):
    model, _ = tiny_model(arch)
    ids = _ids(2, 20)
    with torch.no_grad():
        base_logits = model(ids).logits
    base_text = _greedy(model, ids)
    install_routing(model, RoutingSchedule.uniform(0.0, len(find_decoder_blocks(model)[1])), mode="router")
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base_logits)
    assert torch.equal(_greedy(model, ids), base_text)


# --- the static rule ------------------------------------------------------------------------------------------

def test_static_rule_keeps_the_first_token_then_the_most_recent():
    valid = torch.tensor([[True] * 8, [False, False, False] + [True] * 5])
    scores = static_scores(valid)
    skip = torch.tensor([skip_count(0.5, 8), skip_count(0.5, 5)])  # 4 and 3 (half up), never the first token
    keep, real = select_tokens(scores, valid, skip)
    # Row 0: real positions 1..4 skipped. Row 1 (3 pads): real positions 1..3 (indices 4..6) skipped; its first
    # real token (index 3) and most recent one (7) kept; two padding positions fill the row up to width 4.
    assert keep.tolist() == [[0, 5, 6, 7], [0, 1, 3, 7]]
    assert real.tolist() == [[True] * 4, [False, False, True, True]]
    assert scores[1, 3] == math.inf and scores[0, 0] == math.inf


def test_skip_count_is_exact_and_monotone():
    # Hand-computed: round half up, and never the first token.
    assert [skip_count(0.25, 2), skip_count(0.3, 10), skip_count(0.35, 10), skip_count(0.9, 3), skip_count(0.5, 1)] \
        == [1, 3, 4, 2, 0]
    # 0.35 · 90 = 31.5 rounds up to 32, although floating point computes 31.499999999999996.
    assert [skip_count(0.35, 90), skip_count(0.35, 170), skip_count(0.45, 10)] == [32, 60, 5]
    for r in (0.1, 0.3, 0.55, 0.9):
        skipped = [skip_count(r, n) for n in range(1, 60)]
        kept = [n - s for n, s in zip(range(1, 60), skipped)]
        assert skipped == sorted(skipped) and kept == sorted(kept)  # what left-padded batches rely on


# --- the search keeps the budget ------------------------------------------------------------------------------

def _scripted_search_loss(monkeypatch, loss_of):
    """Replace the search's calibration loss by ``loss_of(block_sparsity)``; returns every schedule it scored."""
    import hf_compress.routing.search as search

    seen: list[list[float]] = []

    def fake_loss(model, windows, tail):
        schedule = list(routing_state(model).schedule.block_sparsity)
        seen.append(schedule)
        return loss_of(schedule)

    monkeypatch.setattr(search, "calibration_loss", fake_loss)
    return seen


@pytest.mark.parametrize("target", [0.3, 0.45])
def test_search_keeps_the_exact_budget_and_returns_the_best_candidate(monkeypatch, target):
    model, _ = tiny_model("llama", num_hidden_layers=6)
    # Prefer the schedules that skip most in the last block: the search must move budget there.
    seen = _scripted_search_loss(monkeypatch, lambda schedule: -schedule[-1] + 1e-3 * sum(schedule[:-1]))
    config = TokenRouterConfig(token_sparsity=target, population=6, generations=3, max_block_sparsity=0.9)
    schedule = search_schedule(model, _ids(2, 24), config)
    assert len(seen) > 2
    for candidate in seen:  # every scored candidate, not only the winner, spends exactly the budget
        assert math.isclose(sum(candidate) / 6, target, abs_tol=1e-9) and max(candidate) <= 0.9 + 1e-9
    best = min(seen, key=lambda c: -c[-1] + 1e-3 * sum(c[:-1]))
    assert schedule.block_sparsity == pytest.approx(best) and not schedule.search["exact_uniform"]
    assert schedule.block_sparsity[-1] > target  # it did move budget to the last block
    assert schedule.search["best_loss"] < schedule.search["uniform_loss"]
    assert routing_state(model) is None  # the search leaves the model as it found it


def test_search_returns_the_exact_uniform_schedule_when_it_scores_best(monkeypatch):
    """0.22 is not a whole number of 0.05 units per block; the exact uniform schedule is still a candidate."""
    model, _ = tiny_model("llama", num_hidden_layers=4)
    seen = _scripted_search_loss(monkeypatch, lambda schedule: sum(abs(r - 0.22) for r in schedule))
    schedule = search_schedule(model, _ids(2, 24), TokenRouterConfig(token_sparsity=0.22, population=4, generations=2))
    assert [0.22] * 4 in seen and any(candidate != [0.22] * 4 for candidate in seen)
    assert schedule.block_sparsity == [0.22] * 4
    assert schedule.search["exact_uniform"] and schedule.search["best_loss"] == 0.0
    assert math.isclose(schedule.mean_sparsity, 0.22, abs_tol=1e-9)


def test_searched_rates_are_the_decimals_they_print_as(monkeypatch):
    # 0.22 over 30 blocks is 132 units of 0.22 · 30 / 132, which floating point makes 0.049999999999999996: the
    # schedule read 0.15000000000000002 and 0.049999999999999996 in config.json and the card.
    model, _ = tiny_model("llama", num_hidden_layers=30)
    _scripted_search_loss(monkeypatch, lambda schedule: -schedule[-1])
    config = TokenRouterConfig(token_sparsity=0.22, population=4, generations=1, max_block_sparsity=0.9)
    schedule = search_schedule(model, _ids(1, 8), config)
    assert schedule.search["unit"] == 0.05 and not schedule.search["exact_uniform"]
    assert all(rate == float(f"{rate:.2f}") for rate in schedule.block_sparsity), schedule.block_sparsity
    assert math.isclose(schedule.mean_sparsity, 0.22, abs_tol=1e-9)


def test_search_refuses_inputs_it_cannot_use_before_any_forward():
    """They failed inside: an AttributeError on a model name, torch's embedding errors on float or foreign ids."""
    model, tokenizer = tiny_model("llama", num_hidden_layers=2)
    config = TokenRouterConfig(0.3, generations=1, population=2)
    with pytest.raises(TypeError, match="model must be a transformers causal LM .* got str"):
        search_schedule("llama", _ids(1, 8), config)
    with pytest.raises(TypeError, match="config must be a TokenRouterConfig"):
        search_schedule(model, _ids(1, 8), 0.3)
    for ids, message in ((torch.rand(2, 8), "integer tensor"), (torch.zeros(0, 16, dtype=torch.long), "non-empty"),
                         (torch.ones(2, 1, dtype=torch.long), "seq_len >= 2"),
                         (torch.full((1, 8), 10_000), r"must lie in \[0, 256\)")):
        with pytest.raises(ValueError, match=f"calibration token windows .*{message}"):
            search_schedule(model, ids, config)


def test_router_training_and_installation_refuse_inputs_of_the_wrong_kind(tmp_path):
    """They failed inside: 'list' has no attribute 'check_blocks', vars() on a string row, torch's num_samples=0."""
    from hf_compress.routing import train_token_router
    from hf_compress.training import TrainingSettings, causal_lm_dataset

    model, tokenizer = tiny_model("llama", num_hidden_layers=2)
    schedule = RoutingSchedule.uniform(0.3, 2)
    data = causal_lm_dataset(["some text " * 40], tokenizer, num_sequences=2, seq_len=16)
    settings = TrainingSettings(max_steps=1, use_cpu=True)
    with pytest.raises(TypeError, match="schedule must be a RoutingSchedule .* got list"):
        install_routing(model, [0.3, 0.3])
    with pytest.raises(TypeError, match="schedule must be a RoutingSchedule"):
        train_token_router(model, [0.3, 0.3], data, args=settings)
    with pytest.raises(TypeError, match="config must be a TokenRouterConfig"):
        train_token_router(model, schedule, data, args=settings, config=0.3)
    with pytest.raises(TypeError, match="args must be transformers.TrainingArguments or TrainingSettings, got dict"):
        train_token_router(model, schedule, data, args={})
    for rows, what in ((["text"], "a list of str"), ([], "empty")):
        with pytest.raises(ValueError, match=f"dataset must be rows of token ids .*got {what}"):
            train_token_router(model, schedule, rows, args=settings)
    assert routing_state(model) is None  # refused before any change


def test_search_on_the_real_loss_leaves_the_model_unchanged():
    model, _ = tiny_model("llama", num_hidden_layers=4)
    ids = _ids(2, 24)
    with torch.no_grad():
        before = model(ids).logits
    schedule = search_schedule(model, ids, TokenRouterConfig(token_sparsity=0.3, population=3, generations=1))
    assert math.isclose(schedule.mean_sparsity, 0.3, abs_tol=1e-9) and routing_state(model) is None
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)


# --- gather/scatter against a masked reference ----------------------------------------------------------------

def _masked_reference(model, ids, schedule, prompt_length):
    """Every token computed at every block, with masks: a skipped token's key is hidden at that block and its
    output replaced by its input. Prompt tokens are selected by the static rule, later tokens always kept."""
    _, blocks = find_decoder_blocks(model)
    length = ids.shape[1]
    config = model.config.get_text_config()
    layer_types = getattr(config, "layer_types", None)
    handles = []
    for index, block in enumerate(blocks):
        skip = skip_count(schedule.block_sparsity[index], prompt_length) if prompt_length > 1 else 0
        kept = torch.ones(length, dtype=torch.bool)
        kept[1 : 1 + skip] = False
        positions = torch.arange(length)
        allowed = (positions[None, :] <= positions[:, None]) & (kept[None, :] | torch.eye(length, dtype=torch.bool))
        local = getattr(config, "attention_layers", None)  # GPT-Neo's local layers
        if layer_types is not None and layer_types[index] == "sliding_attention":
            allowed &= (positions[:, None] - positions[None, :]) < config.sliding_window
        elif local is not None and local[index] == "local":
            allowed &= (positions[:, None] - positions[None, :]) < config.window_size
        mask = allowed[None, None].expand(ids.shape[0], 1, length, length)
        if _compat.attention_implementation(model.config) == "eager":  # GPT-Neo adds the mask
            mask = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)

        def pre(module, args, kwargs, mask=mask):
            bound = inspect.signature(module.forward).bind(*args, **kwargs).arguments
            call = {**bound.pop("kwargs", {}), **bound}
            hidden = call.pop(next(iter(call)) if "hidden_states" not in call else "hidden_states")
            call["attention_mask"] = mask
            return (hidden,), call

        def post(module, args, kwargs, output, kept=kept):
            hidden = args[0]
            out = output[0] if isinstance(output, tuple) else output
            out = torch.where(kept[None, :, None], out, hidden)
            return (out, *output[1:]) if isinstance(output, tuple) else out

        handles.append(block.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(block.register_forward_hook(post, with_kwargs=True))
    try:
        with torch.no_grad():
            return model(ids, use_cache=False).logits
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_gather_scatter_equals_masked_reference(arch):
    model, _ = tiny_model(arch)
    plain = copy.deepcopy(model)
    schedule = RoutingSchedule([0.3, 0.6])
    static_router(model, schedule)
    ids = _ids(2, 40)  # longer than gemma3's sliding window (32); two rows without padding keep the same tokens
    with torch.no_grad():
        routed = model(ids, use_cache=False).logits
    reference = _masked_reference(plain, ids, schedule, prompt_length=40)
    torch.testing.assert_close(routed, reference, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(routed, plain(ids).logits, atol=1e-3)  # routing did change something


MORE_ROUTED = {  # beyond ARCHITECTURES: what their blocks receive differently
    "deepseek_v2": dict(moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2, first_k_dense_replace=0,
                        kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
                        n_group=1, topk_group=1),  # a complex rotary table (freqs_cis), not (cos, sin)
    "qwen3_moe": dict(moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2),  # routed tokens reach experts
    "gemma4_text": dict(vocab_size_per_layer_input=256, hidden_size_per_layer_input=16, sliding_window=16,
                        layer_types=["sliding_attention", "full_attention"], num_kv_shared_layers=0),  # per-layer inputs
}


@pytest.mark.parametrize("model_type", list(MORE_ROUTED))
def test_routing_mixture_of_experts_and_other_block_inputs_equals_the_masked_reference(model_type):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, vocab_size=256, hidden_size=64, intermediate_size=64,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, head_dim=16,
                                  **MORE_ROUTED[model_type])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    plain = copy.deepcopy(model)
    ids = _ids(2, 24)
    schedule = RoutingSchedule([0.3, 0.6])
    static_router(model, schedule)
    with torch.no_grad():
        routed = model(ids, use_cache=False).logits
    torch.testing.assert_close(routed, _masked_reference(plain, ids, schedule, prompt_length=24), atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        assert not torch.allclose(routed, plain(ids).logits, atol=1e-3)  # routing did change something
    install_routing(model, RoutingSchedule.uniform(0.0, 2), mode="router")
    with torch.no_grad():
        assert torch.equal(model(ids).logits, plain(ids).logits)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_blocks_sharing_a_sparsity_reuse_one_selection_and_equal_the_reference(arch):
    """The static rule's selection (and gathered RoPE tables) is computed once per forward per skip count and
    reused by later blocks: blocks 3-4 repeat blocks 1-2's sparsities, and Gemma3 alternates sliding and full
    RoPE tables between them."""
    extra = {"layer_types": ["sliding_attention", "full_attention"] * 2} if arch == "gemma3" else {}
    model, _ = tiny_model(arch, num_hidden_layers=4, **extra)
    plain = copy.deepcopy(model)
    schedule = RoutingSchedule([0.3, 0.6, 0.3, 0.6])
    static_router(model, schedule)
    ids = _ids(1, 40)
    with torch.no_grad():
        routed = model(ids, use_cache=False).logits
    assert len(routing_state(model).selections) == 2  # two skip counts, four blocks
    torch.testing.assert_close(routed, _masked_reference(plain, ids, schedule, prompt_length=40), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt2", "opt"])
def test_cached_decoding_equals_masked_reference(arch):
    """generate() with the KV cache: each decoded token sees exactly the prompt tokens kept at each block."""
    model, _ = tiny_model(arch)
    plain = copy.deepcopy(model)
    schedule = RoutingSchedule([0.4, 0.5])
    static_router(model, schedule)
    prompt = _ids(1, 36, seed=1)
    output = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False,
                            output_scores=True, return_dict_in_generate=True, pad_token_id=0)
    sequence = output.sequences
    for step, scores in enumerate(output.scores):
        reference = _masked_reference(plain, sequence[:, : 36 + step], schedule, prompt_length=36)[:, -1]
        torch.testing.assert_close(scores, reference, atol=1e-4, rtol=1e-4)


def _tiny_from_config(model_type, **fields):
    """A seeded tiny model of an architecture ``tiny_model`` does not build."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, vocab_size=256, pad_token_id=0, bos_token_id=1, eos_token_id=2, **fields)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def test_gpt_neo_local_layers_keep_their_window():
    """GPT-Neo's local layers attend within window_size (config.attention_layers, not layer_types/sliding_window)."""
    model = _tiny_from_config("gpt_neo", hidden_size=64, num_layers=2, num_heads=4, window_size=8,
                              attention_types=[[["local", "global"], 1]])
    plain = copy.deepcopy(model)
    schedule = RoutingSchedule([0.3, 0.5])
    static_router(model, schedule)
    ids = _ids(1, 30)
    with torch.no_grad():
        routed = model(ids, use_cache=False).logits
    torch.testing.assert_close(routed, _masked_reference(plain, ids, schedule, prompt_length=30), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("model_type", ["gpt_neox", "gpt_neo"])
def test_blocks_taking_layer_past_get_the_scattering_cache(model_type):
    """GPT-NeoX / GPT-Neo blocks take their cache as `layer_past`: it held only the kept tokens, so the cache lost
    its positions (a batch's decode step crashed)."""
    fields = dict(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, intermediate_size=128) \
        if model_type == "gpt_neox" else dict(hidden_size=64, num_heads=4, num_layers=2, window_size=8,
                                             attention_types=[[["local", "global"], 1]])
    model = _tiny_from_config(model_type, **fields)
    static_router(model, RoutingSchedule([0.3, 0.5]))
    rows = [_ids(1, 30, seed=2)[0], _ids(1, 21, seed=3)[0]]
    ids, mask = _left_padded(rows)
    batched = _greedy(model, ids, mask)
    for index, row in enumerate(rows):
        assert batched[index, ids.shape[1]:].tolist() == _greedy(model, row[None])[0, len(row):].tolist()


def test_alibi_models_are_refused_clearly():
    model = _tiny_from_config("bloom", hidden_size=64, n_layer=2, n_head=4)
    static_router(model, RoutingSchedule([0.3, 0.5]))
    with pytest.raises(NotImplementedError, match="ALiBi position biases"):
        model(_ids(1, 12))


# --- batches, padding -----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("arch", "mode"), [("llama", "static"), ("llama", "router"), ("gemma3", "router"),
                                          ("gpt2", "static")])
def test_left_padded_batch_generate_equals_per_row(arch, mode):
    model, _ = tiny_model(arch)
    state = install_routing(model, RoutingSchedule([0.3, 0.5]), mode=mode)
    if mode == "router":  # a router that reads every factor (a fresh one is the static rule), padding included
        _randomise_router(state.router)
    rows = [_ids(1, 14, seed=2)[0], _ids(1, 9, seed=3)[0], _ids(1, 5, seed=4)[0]]
    ids, mask = _left_padded(rows)
    width = ids.shape[1]
    batched = _greedy(model, ids, mask, new=6)
    for index, row in enumerate(rows):
        alone = _greedy(model, row[None], new=6)
        assert batched[index, width:].tolist() == alone[0, len(row):].tolist()


def _router_reading_position(router: TokenRouter, threshold: float, slope: float = 200.0) -> None:
    """Make the router's logit ``slope · (gelu(p) − gelu(threshold))``: compute a token iff its position share p is
    above ``threshold``."""
    with torch.no_grad():
        for parameter in router.parameters():
            parameter.zero_()
        router.hidden.weight[0, 0] = 1.0  # unit 0 reads the position factor
        router.output.weight[0, 0] = slope
        router.output.bias.fill_(-slope * float(torch.nn.functional.gelu(torch.tensor(threshold))))


def test_route_decode_lets_the_router_skip_decoded_tokens():
    model, _ = tiny_model("llama")
    prompt = _ids(1, 10)
    state = install_routing(model, RoutingSchedule([0.3, 0.5]), mode="router", route_decode=True)
    _router_reading_position(state.router, threshold=0.5)  # decoded tokens sit near p = 1: computed
    computed = model.generate(prompt, max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
    state.route_decode = False
    dense_decode = model.generate(prompt, max_new_tokens=4, do_sample=False, output_logits=True,
                                  return_dict_in_generate=True)
    assert torch.equal(computed.sequences, dense_decode.sequences)
    torch.testing.assert_close(torch.stack(computed.logits), torch.stack(dense_decode.logits), rtol=0, atol=1e-5)
    # A router that skips every decoded token (p < 1.5 always; the prompt is routed by top-k, unchanged): a decoded
    # token passes every block untouched, so its logits are the head's on its embedding.
    _router_reading_position(state.router, threshold=1.5)
    state.route_decode = True
    skipped = model.generate(prompt, max_new_tokens=4, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    fed = skipped.sequences[0, prompt.shape[1]:-1]  # the tokens fed back after the prompt
    with torch.no_grad():
        expected = model.lm_head(model.model.norm(model.model.embed_tokens(fed)))
    torch.testing.assert_close(torch.stack(skipped.logits[1:])[:, 0], expected, rtol=0, atol=1e-4)
    assert not torch.allclose(torch.stack(skipped.logits[1:]), torch.stack(dense_decode.logits[1:]))


def test_route_decode_rows_agree_batched_and_alone():
    """One row skips its decoded tokens while another computes them: the skipping row's filler writes nothing."""
    model, _ = tiny_model("llama")
    state = install_routing(model, RoutingSchedule([0.3, 0.5]), mode="router", route_decode=True)
    _router_reading_position(state.router, threshold=0.9)  # a 5-token row's decoded tokens (p ≤ 0.9) skip
    rows = [_ids(1, 14, seed=2)[0], _ids(1, 5, seed=4)[0]]
    ids, mask = _left_padded(rows)
    width = ids.shape[1]
    batched = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0,
                             output_logits=True, return_dict_in_generate=True)
    for index, row in enumerate(rows):
        alone = model.generate(row[None], max_new_tokens=6, do_sample=False, output_logits=True,
                               return_dict_in_generate=True)
        assert batched.sequences[index, width:].tolist() == alone.sequences[0, len(row):].tolist()
        torch.testing.assert_close(torch.stack(batched.logits)[:, index], torch.stack(alone.logits)[:, 0],
                                   rtol=0, atol=1e-4)
    # The short row's decoded tokens at positions 5..8 (p = 5/6 .. 8/9 ≤ 0.9) skipped both blocks: their cache slots
    # hold zeros (masked for the tokens computed after them), not the K/V of the filler computed in their place.
    cache = _compat.cache_of_output(alone)
    for layer in cache.layers:
        assert torch.count_nonzero(layer.keys[0, :, 5:9]) == 0 and torch.count_nonzero(layer.values[0, :, 5:9]) == 0
        assert torch.count_nonzero(layer.keys[0, :, 9:]) > 0


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("mode", ["static", "router"])
def test_prompt_lookup_generate_equals_greedy(arch, mode):
    """Assisted generation feeds the prompt and the first drafts in one forward; only the prompt is routed, so the
    drafts are verified as decoded tokens would be computed and the output is greedy's."""
    model, _ = tiny_model(arch)
    install_routing(model, RoutingSchedule([0.4, 0.5]), mode=mode)
    ids = _ids(1, 40, seed=2)
    ids = torch.cat([ids, ids[:, :20]], dim=1)  # a repeat, so that prompt lookup finds drafts
    settings = dict(attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False, pad_token_id=0)
    greedy = model.generate(ids, **settings)
    assert torch.equal(model.generate(ids, prompt_lookup_num_tokens=4, **settings), greedy)
    assert routing_state(model).prompt_length is None  # recorded for the call only


def test_saved_speculative_custom_generate_on_a_routed_folder_equals_greedy(tmp_path):
    """Loaded with trust_remote_code, transformers rebinds model.generate to the folder's custom_generate; that code
    still goes through the routed model's prompt-aware generate (the first forward holds the prompt and drafts)."""
    from transformers import AutoModelForCausalLM

    from hf_compress.speculative.strategies import SpeculativeDecoding, render_generate_py

    model, tokenizer = tiny_model("llama")
    install_routing(model, RoutingSchedule([0.4, 0.5]))
    save_routed(model, tokenizer, tmp_path / "routed")
    (tmp_path / "routed" / "custom_generate").mkdir()
    (tmp_path / "routed" / "custom_generate" / "generate.py").write_text(
        render_generate_py("speculative_decoding", SpeculativeDecoding(num_draft_tokens=4).to_dict()))
    ids = _ids(1, 40, seed=2)
    ids = torch.cat([ids, ids[:, :20]], dim=1)  # a repeat, so that the n-gram drafter finds drafts
    settings = dict(attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False, pad_token_id=0)
    greedy = model.generate(ids, **settings)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "routed", trust_remote_code=True)
    assert not isinstance(loaded.generate, types.MethodType)  # transformers' rebinding happened
    assert torch.equal(loaded.generate(ids, **settings), greedy)


def test_routing_a_model_built_from_a_routed_config_saves_its_own_schedule(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    model, _ = tiny_model("llama")
    install_routing(model, RoutingSchedule([0.5, 0.5]))
    model.save_pretrained(tmp_path / "a")
    config = AutoConfig.from_pretrained(tmp_path / "a")  # its quantization_config is a plain dict
    fresh = AutoModelForCausalLM.from_config(config)
    install_routing(fresh, RoutingSchedule([0.1, 0.2]))
    fresh.save_pretrained(tmp_path / "b")
    saved = json.loads((tmp_path / "b" / "config.json").read_text())["quantization_config"]
    assert saved["block_sparsity"] == [0.1, 0.2]
    remove_routing(fresh)
    assert getattr(fresh.config, "quantization_config", None) is None


def test_right_padding_is_refused():
    model, _ = tiny_model("llama")
    static_router(model, RoutingSchedule([0.3, 0.3]))
    ids = _ids(2, 8)
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
    with pytest.raises(ValueError, match="left padding"):
        model(ids, attention_mask=mask)


def test_prepared_masks_are_refused_with_the_fix():
    """Routing reads each row's padding from the 2-D mask. A 4-D mask passed by hand is refused. So is the one
    generate() prepares for a static cache, and that error names the fix."""
    model, _ = tiny_model("llama")
    static_router(model, RoutingSchedule([0.3, 0.3]))
    ids = _ids(1, 8)
    with pytest.raises(ValueError, match="2-D attention_mask.*Pass the tokenizer's attention_mask"):
        model(ids, attention_mask=torch.ones(1, 1, 8, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="cache_implementation='static'.*dynamic cache"):
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False,
                       cache_implementation="static", pad_token_id=0)


def test_an_unrouted_model_takes_prepared_masks():
    """A schedule of zeros is the base model and routing_disabled runs it: a 4-D mask (a static cache's) is theirs
    to take. Both were refused, as if routed."""
    base, _ = tiny_model("llama")
    ids = _ids(1, 8)
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False, pad_token_id=0,
                  cache_implementation="static")
    expected = base.generate(ids, **kwargs)
    dense = copy.deepcopy(base)
    install_routing(dense, RoutingSchedule([0.0, 0.0]))
    assert torch.equal(dense.generate(ids, **kwargs), expected)
    routed = copy.deepcopy(base)
    install_routing(routed, RoutingSchedule([0.5, 0.5]))
    with routing_disabled(routed):
        assert torch.equal(routed.generate(ids, **kwargs), expected)


@pytest.mark.parametrize("additive", [None, torch.finfo(torch.float32).min, -1e4])
def test_a_chunk_after_the_prompt_takes_its_own_4d_mask(additive):
    """A draft tree's verification chunk comes with an ancestor mask: root a, children b and c (both one position
    after a). c's logits under the tree mask are those of the chunk [a, c] fed alone. A routed block reading its own
    causal mask instead let c see b."""
    from transformers import DynamicCache

    model, _ = tiny_model("llama")
    install_routing(model, RoutingSchedule([0.5, 0.5]))
    prompt, chunk = _ids(1, 12), _ids(1, 3, seed=1)
    kwarg = _compat.cache_kwarg_name(model)

    def after_prompt():
        cache = DynamicCache(config=model.config)
        model(prompt, **{kwarg: cache})  # a routed prompt forward: skipped slots hold zeros
        return {kwarg: cache}

    allowed = torch.ones(3, 15, dtype=torch.bool)
    allowed[0, 13:] = False  # a sees the prompt and itself
    allowed[1, 14] = False   # b sees the prompt and a
    allowed[2, 13] = False   # c sees the prompt and a
    mask = allowed[None, None]
    if additive is not None:  # masked with the dtype's minimum, or the older -1e4 (it was read as allowed)
        mask = torch.zeros(mask.shape).masked_fill(~mask, additive)
    with torch.no_grad():
        tree = model(chunk, attention_mask=mask, position_ids=torch.tensor([[12, 13, 13]]), **after_prompt()).logits
        path = model(chunk[:, [0, 2]], attention_mask=torch.ones(1, 14, dtype=torch.long), **after_prompt()).logits
        causal = model(chunk, attention_mask=torch.ones(1, 15, dtype=torch.long), **after_prompt()).logits
    torch.testing.assert_close(tree[:, [0, 2]], path)
    assert not torch.allclose(tree[:, 2], causal[:, 2], atol=1e-3)  # the check above can tell the masks apart
    soft = torch.zeros(mask.shape).masked_fill(~allowed[None, None], -2.0)  # a soft bias is no allowed/masked mask
    with pytest.raises(ValueError, match="soft biases"), torch.no_grad():
        model(chunk, attention_mask=soft, position_ids=torch.tensor([[12, 13, 13]]), **after_prompt())


def test_amphista_tree_decoding_of_a_routed_model_equals_its_greedy_decoding():
    from hf_compress.speculative.heads import Amphista, AmphistaConfig, AmphistaHeads

    model, _ = tiny_model("llama")
    torch.manual_seed(0)
    heads = AmphistaHeads.for_model(model, AmphistaConfig(num_heads=3, num_attention_heads=2)).eval()
    install_routing(model, RoutingSchedule([0.3, 0.5]))
    ids = _ids(1, 20)
    strategy = Amphista(heads, tree=[[0], [1], [0, 0], [0, 1], [0, 0, 0]])
    assert torch.equal(_greedy(model, ids, new=12), model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False, pad_token_id=0,
        custom_generate=strategy))


def test_a_routed_model_drafts_for_another_through_assistant_model():
    """transformers' assisted generation calls the draft with the tokens the target accepted after the draft's cache;
    a routed draft refused that as a partly cached prompt from its second round on."""
    target, _ = tiny_model("llama")
    draft, _ = tiny_model("llama")
    install_routing(draft, RoutingSchedule([0.3, 0.5]))
    ids = _ids(1, 20)
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False, pad_token_id=0)
    assert torch.equal(target.generate(ids, assistant_model=draft, **kwargs), target.generate(ids, **kwargs))


# --- save / load ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_save_load_gives_equal_logits_and_generations(arch, tmp_path):
    from transformers import AutoModelForCausalLM

    model, tokenizer = tiny_model(arch)
    state = install_routing(model, RoutingSchedule([0.25, 0.5]), mode="router")
    _randomise_router(state.router)
    ids = _ids(2, 30)
    with torch.no_grad():
        expected = model(ids).logits
        with routing_mode(model, "static"):  # so a checkpoint that lost the router's weights cannot pass
            assert not torch.allclose(model(ids).logits, expected, atol=1e-4)
    save_routed(model, tokenizer, tmp_path / "routed")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "routed")
    loaded_state = routing_state(loaded)
    assert loaded_state is not None and loaded_state.mode == "router"
    assert loaded_state.schedule.block_sparsity == [0.25, 0.5]
    for name, tensor in state.router.state_dict().items():
        assert torch.equal(loaded_state.router.state_dict()[name], tensor), name
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, expected)
    assert torch.equal(_greedy(loaded, ids), _greedy(model, ids))
    card = (tmp_path / "routed" / "README.md").read_text()
    assert "token_router" in card and "0.25" in card


def test_a_routed_folder_saved_again_keeps_its_recipe(tmp_path):
    """Loaded and saved again without a recipe (a recipe adding heads to a routed base): the sparsity, router and
    training settings it was saved with stay on record, in the config and on the card."""
    import json

    from transformers import AutoModelForCausalLM

    model, tokenizer = tiny_model("llama")
    install_routing(model, RoutingSchedule([0.25, 0.5]), mode="router")
    save_routed(model, tokenizer, tmp_path / "routed", recipe={"token_sparsity": 0.375, "config": {"seed": 7}})
    save_routed(AutoModelForCausalLM.from_pretrained(tmp_path / "routed"), tokenizer, tmp_path / "again")
    recipe = json.loads((tmp_path / "again" / "config.json").read_text())["quantization_config"]["recipe"]
    assert recipe == {"method": "token_router", "token_sparsity": 0.375, "config": {"seed": 7}}
    assert "0.375" in (tmp_path / "again" / "README.md").read_text()


def test_router_saved_for_other_features_is_refused(tmp_path):
    """A router trained on another version of the input factors would load and route wrongly: refuse it."""
    import json

    from transformers import AutoModelForCausalLM

    from hf_compress.formats.integrity import CheckpointIntegrityError

    model, tokenizer = tiny_model("llama")
    install_routing(model, RoutingSchedule([0.25, 0.5]), mode="router")
    save_routed(model, tokenizer, tmp_path / "routed")
    config_path = tmp_path / "routed" / "config.json"
    config = json.loads(config_path.read_text())
    assert config["quantization_config"]["router_features"] == ROUTER_FEATURES_VERSION
    del config["quantization_config"]["router_features"]  # as written before the factors were versioned
    config_path.write_text(json.dumps(config))
    with pytest.raises(CheckpointIntegrityError, match="router features version 1"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "routed")


def test_plain_save_pretrained_writes_a_routed_checkpoint(tmp_path):
    """A routed model saved with save_pretrained must not come back as the dense model."""
    from transformers import AutoModelForCausalLM

    model, _ = tiny_model("llama")
    install_routing(model, RoutingSchedule([0.5, 0.5]), mode="static")
    model.save_pretrained(tmp_path / "plain")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "plain")
    ids = _ids(1, 16)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert routing_state(loaded).mode == "static"


# --- training -------------------------------------------------------------------------------------------------

def test_trainer_updates_only_the_router():
    from hf_compress.training import TrainingSettings, causal_lm_dataset

    model, tokenizer = tiny_model("llama")
    install_routing(model, RoutingSchedule([0.3, 0.5]), mode="router")
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    data = causal_lm_dataset(["the quick brown fox jumps over the lazy dog " * 40], tokenizer, num_sequences=4, seq_len=24)
    settings = TrainingSettings(max_steps=3, learning_rate=1e-2, per_device_batch_size=2, use_cpu=True, logging_steps=1)
    routed = train_token_router(model, routing_state(model).schedule, data, args=settings)
    changed = {name for name, p in routed.named_parameters() if not torch.equal(p, before[name])}
    assert changed and all(".token_router." in name for name in changed)
    assert routing_state(routed).mode == "router"
    assert routing_state(routed).schedule.search["training"]["steps"] == 3


def test_a_failed_router_training_hands_the_model_back_as_it_came():
    """Right-padded rows fail inside the first training forward: the model was left routed (a later save wrote a
    routed checkpoint with an untrained router) and frozen; a routed model kept its old router only partly."""
    from datasets import Dataset

    from hf_compress.training import TrainingSettings

    ids = _ids(2, 16).tolist()
    right_padded = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * 12 + [0] * 4] * 2, "labels": ids})
    settings = TrainingSettings(max_steps=2, per_device_batch_size=1, use_cpu=True)
    model, _ = tiny_model("llama")
    model.lm_head.requires_grad_(False)  # the caller's choices of what trains are restored, not reset
    trainable = {name: p.requires_grad for name, p in model.named_parameters()}
    with pytest.raises(ValueError, match="right padding is not supported"):
        train_token_router(model, RoutingSchedule([0.3, 0.5]), right_padded, args=settings)
    assert routing_state(model) is None and not hasattr(model.config, "quantization_config")
    assert {name: p.requires_grad for name, p in model.named_parameters()} == trainable
    state = install_routing(model, RoutingSchedule([0.25, 0.25]), mode="static")
    _randomise_router(state.router)
    weights = {k: v.clone() for k, v in state.router.state_dict().items()}
    with pytest.raises(ValueError, match="right padding is not supported"):
        train_token_router(model, RoutingSchedule([0.3, 0.5]), right_padded, args=settings)
    assert routing_state(model) is state and state.mode == "static" and state.schedule.block_sparsity == [0.25, 0.25]
    assert all(torch.equal(state.router.state_dict()[k], v) for k, v in weights.items())


def test_router_training_runs_the_frozen_model_without_dropout():
    """Trainer puts the training module in train mode; GPT-2's dropout (0.1) must not make the teacher and the
    student random (a loss that differs between two identical forwards)."""
    from hf_compress.routing.training import RouterTrainingModule

    model, _ = tiny_model("gpt2")
    install_routing(model, RoutingSchedule([0.3, 0.5]), mode="router")
    module = RouterTrainingModule(model, TokenRouterConfig(0.4)).train()
    assert module.training and not model.training
    ids = _ids(1, 24)
    assert torch.equal(module(ids)["loss"], module(ids)["loss"])


def test_router_training_on_a_schedule_that_skips_nothing_returns_the_base_model():
    """`hf-compress route --sparsity 0`: no block skips, so the router gets no gradient; Trainer's backward failed."""
    from hf_compress.training import TrainingSettings, causal_lm_dataset

    model, tokenizer = tiny_model("llama")
    ids = _ids(1, 24)
    with torch.no_grad():
        base = model(ids).logits
    data = causal_lm_dataset(["the quick brown fox jumps over the lazy dog " * 40], tokenizer, num_sequences=4, seq_len=24)
    routed = train_token_router(model, RoutingSchedule([0.0, 0.0]), data, args=TrainingSettings(max_steps=2, use_cpu=True))
    assert routing_state(routed).schedule.search["training"]["steps"] == 0
    with torch.no_grad():
        assert torch.equal(routed(ids).logits, base)


def test_guide_loss_decays_over_optimizer_steps(monkeypatch, tmp_path):
    """Linear from 1 to 0 over the optimizer steps: gradient accumulation and epoch-based runs included."""
    from transformers import TrainingArguments

    from hf_compress.routing import training as routing_training
    from hf_compress.training import causal_lm_dataset

    scales = []
    real = routing_training.router_losses
    monkeypatch.setattr(routing_training, "router_losses",
                        lambda collected, config, guide_scale: scales.append(guide_scale) or real(collected, config,
                                                                                                guide_scale))
    model, tokenizer = tiny_model("llama")
    data = causal_lm_dataset(["the quick brown fox jumps over the lazy dog " * 40], tokenizer, num_sequences=8,
                             seq_len=24)
    config = TokenRouterConfig(token_sparsity=0.4, validation_windows=0)
    common = dict(per_device_train_batch_size=1, report_to=[], use_cpu=True, save_strategy="no", logging_steps=1)
    accumulated = TrainingArguments(str(tmp_path / "a"), max_steps=4, gradient_accumulation_steps=2, **common)
    train_token_router(model, RoutingSchedule([0.3, 0.5]), data, config=config, args=accumulated)
    assert scales == [1.0, 1.0, 0.75, 0.75, 0.5, 0.5, 0.25, 0.25]
    scales.clear()
    by_epoch = TrainingArguments(str(tmp_path / "b"), num_train_epochs=1, **common)  # 8 rows, batch 1: 8 steps
    train_token_router(model, RoutingSchedule([0.3, 0.5]), data, config=config, args=by_epoch)
    assert scales == [1 - step / 8 for step in range(8)]


@pytest.mark.parametrize("arch", ("llama", "gemma3"))
def test_training_forward_is_the_routed_forward_and_trains_skipped_tokens(arch):
    """The training forward computes every token but must return the routed (gathered) model's values, left padding
    and sliding windows included; the router's gradient must reach tokens the blocks skipped, not only kept ones."""
    model, _ = tiny_model(arch)
    blocks = len(find_decoder_blocks(model)[1])
    state = install_routing(model, RoutingSchedule.uniform(0.4, blocks), mode="router")
    _randomise_router(state.router)  # not the static rule: the selection depends on the hidden states
    ids, mask = _ids(2, 24), torch.ones(2, 24, dtype=torch.long)
    mask[1, :5] = 0
    with torch.no_grad():
        routed = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    state.collect = []
    try:
        trained = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        collected = state.collect
    finally:
        state.collect = None
    valid = mask.bool()
    torch.testing.assert_close(trained[valid], routed[valid], rtol=1e-4, atol=1e-5)
    for logits, *_ in collected:
        logits.retain_grad()
    trained[valid].log_softmax(-1)[:, 7].sum().backward()
    first = torch.zeros_like(valid)
    first[0, 0] = first[1, 5] = True  # the always-kept first real token is not the router's choice
    assert len(collected) == blocks
    for logits, *_ in collected:
        # Every real token but the first gets a gradient: a block keeps 60% of them, so skipped ones get it too.
        assert bool((logits.grad[valid & ~first] != 0).all()) and not bool(logits.grad[~valid | first].any())


def test_router_training_keeps_the_best_router_on_held_out_windows(monkeypatch):
    from hf_compress.routing.training import KeepBestRouter
    from hf_compress.training import TrainingSettings, causal_lm_dataset

    model, tokenizer = tiny_model("llama")
    install_routing(model, RoutingSchedule([0.3, 0.5]), mode="router")
    router = routing_state(model).router
    data = causal_lm_dataset(["the quick brown fox jumps over the lazy dog " * 40], tokenizer, num_sequences=8, seq_len=24)
    # The callback alone: the router with the lowest validation KL is the one restored at the end.
    callback = KeepBestRouter(model, [data[0]], TokenRouterConfig(), every=1)
    values = iter([0.5, 0.1, 0.9])
    monkeypatch.setattr(callback, "validation_kl", lambda: next(values))
    states = []
    for step, event in enumerate(("on_train_begin", "on_step_end", "on_train_end")):
        with torch.no_grad():
            router.output.bias.fill_(float(step))
        states.append(router.output.bias.item())
        state = type("State", (), {"global_step": step, "max_steps": 5})()
        getattr(callback, event)(None, state, None)
    assert router.output.bias.item() == states[1] and callback.best[1] == 1
    monkeypatch.undo()
    # Through train_token_router: the last validation_windows rows are held out and measured at steps 0, 2 and 3.
    settings = TrainingSettings(max_steps=3, learning_rate=1e-2, per_device_batch_size=1, use_cpu=True)
    config = TokenRouterConfig(token_sparsity=0.4, validation_windows=2, validation_every=2)
    train_token_router(model, routing_state(model).schedule, data, args=settings, config=config)
    selection = routing_state(model).schedule.search["training"]["selection"]
    assert [entry["step"] for entry in selection["history"]] == [0, 2, 3]
    best = min(selection["history"], key=lambda entry: entry["validation_kl"])
    assert selection["best_step"] == best["step"]
    restored = KeepBestRouter(model, [data[6], data[7]], config, every=1).validation_kl()
    assert restored == pytest.approx(best["validation_kl"], rel=1e-5)


def test_router_training_that_keeps_the_starting_router_returns_the_static_rule(monkeypatch):
    """Nothing beat the static start: the returned model ranks by the rule itself (same tokens, no router features)."""
    from hf_compress.routing.training import KeepBestRouter
    from hf_compress.training import TrainingSettings, causal_lm_dataset

    model, tokenizer = tiny_model("llama")
    schedule = RoutingSchedule([0.3, 0.5])
    static = copy.deepcopy(model)
    install_routing(static, schedule, mode="static")
    data = causal_lm_dataset(["the quick brown fox jumps over the lazy dog " * 40], tokenizer, num_sequences=8, seq_len=24)
    values = iter([0.1, 0.5, 0.9])
    monkeypatch.setattr(KeepBestRouter, "validation_kl", lambda self: next(values))
    settings = TrainingSettings(max_steps=3, learning_rate=1e-2, per_device_batch_size=1, use_cpu=True)
    config = TokenRouterConfig(token_sparsity=0.4, validation_windows=2, validation_every=2)
    routed = train_token_router(model, schedule, data, args=settings, config=config)
    state = routing_state(routed)
    assert state.mode == "static" and state.schedule.search["training"]["selection"]["kept_static_rule"]
    ids = _ids(2, 30)
    with torch.no_grad():
        assert torch.equal(routed(ids).logits, static(ids).logits)
        state.mode = "router"  # the restored router is the fresh one: it ranks the same tokens
        assert torch.equal(routed(ids).logits, static(ids).logits)


# --- bad input ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("value", [-0.1, 1.0, 1.5, "100%", "-5%", "nan", "thirty"])
def test_sparsity_outside_range_is_refused(value):
    with pytest.raises(ValueError, match=r"token_sparsity must be a number in \[0, 1\)"):
        TokenRouterConfig(token_sparsity=value)


def test_sparsity_reads_a_percentage_as_the_pruners_do():
    assert TokenRouterConfig(token_sparsity="30%").token_sparsity == pytest.approx(0.3)
    assert TokenRouterConfig(token_sparsity=" 0.22 ").to_dict()["token_sparsity"] == 0.22  # stored as a number


def test_schedule_length_must_match_blocks():
    model, _ = tiny_model("llama")
    with pytest.raises(ValueError, match="3 entries but the model has 2 decoder blocks"):
        install_routing(model, RoutingSchedule([0.1, 0.2, 0.3]))
    install_routing(model, RoutingSchedule([0.1, 0.2]))
    with pytest.raises(ValueError, match="3 entries but the model has 2 decoder blocks"):
        with routing_mode(model, "static", RoutingSchedule([0.1, 0.2, 0.3])):
            pass
    assert routing_state(model).schedule.block_sparsity == [0.1, 0.2]


def test_encoder_decoder_is_refused():
    from transformers import AutoConfig, AutoModelForSeq2SeqLM

    config = AutoConfig.for_model("t5", vocab_size=64, d_model=16, d_ff=32, num_layers=2, num_heads=2, d_kv=8)
    model = AutoModelForSeq2SeqLM.from_config(config)
    with pytest.raises(ValueError, match="not a decoder-only causal LM"):
        install_routing(model, RoutingSchedule([0.1, 0.2]))


def test_a_refused_install_leaves_the_model_unrouted():
    model, _ = tiny_model("llama")
    ids = _ids(1, 8)
    with torch.no_grad():
        before = model(ids).logits
    model.config.quantization_config = {"quant_method": "bitsandbytes"}  # as if loaded quantized another way
    with pytest.raises(ValueError, match="already in the bitsandbytes format"):
        install_routing(model, RoutingSchedule([0.5, 0.5]))
    assert routing_state(model) is None and "generate" not in vars(model)
    assert not any(isinstance(block, RoutedLayerMixin) for block in find_decoder_blocks(model)[1])
    assert model.config.quantization_config == {"quant_method": "bitsandbytes"}
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)


def test_cli_route_saves_a_loadable_folder(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from hf_compress.cli.main import main

    target = tmp_path / "out"
    code = main(["route", "--model", "tiny-llama", "--sparsity", "30%", "--steps", "2", "--generations", "1",
                 "--population", "3", "--search-windows", "2", "--seq-len", "32", "--save-dir", str(target)])
    assert code == 0
    loaded = AutoModelForCausalLM.from_pretrained(target)
    assert math.isclose(routing_state(loaded).schedule.mean_sparsity, 0.3)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:  # refused for its value, not any usage error argparse may raise
        main(["route", "--sparsity", "1.2", "--save-dir", str(tmp_path / "other")])
    assert exit_info.value.code == 2
    assert "argument --sparsity: must be a fraction in [0, 1) such as 0.3 or 30%, got '1.2'" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a weight pattern is not a fraction of tokens
        main(["route", "--sparsity", "2:4", "--save-dir", str(tmp_path / "other")])
    assert "fraction of tokens a block skips (e.g. 0.3 or 30%), not an N:M weight pattern" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()


# --- what this session's fixes rely on --------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_fresh_router_selects_exactly_the_static_tokens(arch):
    """The router is initialised as the static rule, so training starts from the static router."""
    model, _ = tiny_model(arch)
    install_routing(model, RoutingSchedule([0.3, 0.6]), mode="static")
    ids = _ids(2, 40)
    with torch.no_grad():
        static = model(ids).logits
        routing_state(model).mode = "router"
        routed = model(ids).logits
    assert torch.equal(routed, static)


@pytest.mark.parametrize("sparsity", [0.1, 0.3, 0.6])
def test_fresh_router_is_calibrated_at_one_half(sparsity):
    """σ(logit) > 0.5 exactly on the tokens past the block's share: the decode rule agrees with top-k from the start."""
    valid = torch.ones(1, 50, dtype=torch.bool)
    features = router_features(torch.randn(1, 50, 16, generator=torch.Generator().manual_seed(0)), valid, sparsity)
    compute = torch.sigmoid(TokenRouter()(features)) > 0.5
    assert torch.equal(compute[0], features[0, :, 0] > sparsity)


def test_router_features_are_bounded_on_an_attention_sink():
    """One token holding almost all of the attention proxy must not give a factor in the hundreds (see router.py)."""
    hidden = torch.randn(1, 400, 32, generator=torch.Generator().manual_seed(0)) * 0.01
    hidden[0, 0] = hidden[0, -1] = 40 * torch.ones(32)  # the first token aligns with the last: a sink
    features = router_features(hidden, torch.ones(1, 400, dtype=torch.bool), 0.3)
    assert features.min() >= 0 and features.max() <= 1
    assert features[0, 0, 1] > 0.5 and features[0, 1:-1, 1].max() < 0.4  # raw a·n: about 100 and 2


def test_token_skipped_at_every_block_keeps_its_embedding():
    """Why whole-window perplexity explodes under the static rule: a token every block skips is predicted from its
    embedding alone (the diagnosis of issue 21); the benchmark's tail perplexity scores the tokens routing keeps."""
    model, _ = tiny_model("llama")
    static_router(model, RoutingSchedule([0.5, 0.5]))
    ids = _ids(1, 20)
    with torch.no_grad():
        logits = model(ids).logits
        embedding_only = model.lm_head(model.model.norm(model.model.embed_tokens(ids)))
    skipped = range(1, 1 + skip_count(0.5, 20))  # positions 1..10: skipped by both blocks
    for position in skipped:
        torch.testing.assert_close(logits[0, position], embedding_only[0, position])
    assert not torch.allclose(logits[0, -1], embedding_only[0, -1])


@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt2"])
def test_prefill_with_cache_equals_without_and_rows_agree(arch):
    """The prompt fast path (index_select for one row, attention on the just-projected keys) equals the cacheless
    forward and the gathered path of a batch."""
    model, _ = tiny_model(arch)
    static_router(model, RoutingSchedule([0.4, 0.2]))
    ids = _ids(1, 40)
    with torch.no_grad():
        cached = model(ids, use_cache=True).logits
        plain = model(ids, use_cache=False).logits
        batched = model(torch.cat([ids, _ids(1, 40, seed=5)]), use_cache=True).logits[:1]
    torch.testing.assert_close(cached, plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batched, plain, atol=1e-5, rtol=1e-5)


def test_calibration_loss_scores_only_the_tail():
    from hf_compress.modeling.calibration import calibration_loss

    model, _ = tiny_model("llama")
    ids = _ids(3, 17)
    with torch.no_grad():
        logits = model(ids).logits[:, :-1]
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                            reduction="none").view(3, 16)
    assert math.isclose(calibration_loss(model, ids, batch_size=2), float(nll.mean()), rel_tol=1e-5)
    assert math.isclose(calibration_loss(model, ids, tail=0.25), float(nll[:, -4:].mean()), rel_tol=1e-5)


def test_distillation_weights_the_last_real_tokens():
    from hf_compress.routing.training import _tail_weight

    mask = torch.tensor([[1] * 8, [0, 0, 0, 0, 1, 1, 1, 1]])
    weight = _tail_weight(torch.zeros_like(mask), mask, 0.25)
    assert weight.tolist() == [[0, 0, 0, 0, 0, 0, 1, 1], [0, 0, 0, 0, 0, 0, 0, 1]]
    assert _tail_weight(torch.zeros(1, 5, dtype=torch.long), None, 1.0).tolist() == [[1] * 5]


@pytest.mark.parametrize("padding", ["none", "left"])
def test_distillation_computes_logits_for_the_scored_tail_only_and_the_same_loss(padding):
    from hf_compress.routing.training import _scored_tail, _tail_kl, _tail_weight

    model, _ = tiny_model("llama")
    install_routing(model, RoutingSchedule([0.5, 0.5]), mode="static")
    ids = _ids(2, 12)
    mask = {"none": None, "left": torch.tensor([[1] * 12, [0] * 5 + [1] * 7])}[padding]
    tail, weight = _scored_tail(model, ids, mask, 0.25)
    with torch.no_grad():
        with routing_disabled(model):
            teacher = model(input_ids=ids, attention_mask=mask).logits
            teacher_tail = model(input_ids=ids, attention_mask=mask, **tail).logits
        student = model(input_ids=ids, attention_mask=mask).logits
        student_tail = model(input_ids=ids, attention_mask=mask, **tail).logits
    assert teacher_tail.shape[1] == weight.shape[1] == 3
    full = _tail_kl(teacher, student, _tail_weight(ids, mask, 0.25))
    assert full > 0 and torch.allclose(_tail_kl(teacher_tail, student_tail, weight), full, rtol=1e-4, atol=1e-6)


def test_loss_tail_is_checked():
    with pytest.raises(ValueError, match="loss_tail"):
        TokenRouterConfig(loss_tail=0.0)


# --- refused up front, or made equal (review of the token router) ----------------------------------------------

def _enable_gradient_checkpointing(model) -> None:
    # activation_checkpointing_enable is the newer name (transformers 5.25); the older one warns there.
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()


def test_router_training_refuses_gradient_checkpointing(tmp_path):
    """The checkpointed blocks are recomputed in the backward pass, after the routed forward: a checkpoint error
    (use_reentrant=False) or no gradient for the router (True); Trainer's own switch failed on the training module."""
    import dataclasses

    from transformers import TrainingArguments

    from hf_compress.routing.training import RouterTrainingModule
    from hf_compress.training import TrainingSettings, causal_lm_dataset

    model, tokenizer = tiny_model("llama")
    data = causal_lm_dataset(["the quick brown fox jumps over the lazy dog " * 40], tokenizer, num_sequences=4,
                             seq_len=24)
    settings = TrainingSettings(max_steps=1, use_cpu=True)
    _enable_gradient_checkpointing(model)
    with pytest.raises(ValueError, match=r"gradient checkpointing .*activation_checkpointing_disable\(\)"):
        train_token_router(model, RoutingSchedule([0.3, 0.5]), data, args=settings)
    assert routing_state(model) is None  # refused before any change
    state = install_routing(model, RoutingSchedule([0.3, 0.5]), mode="router")
    model.train()
    module = RouterTrainingModule(model, TokenRouterConfig(0.4))
    with pytest.raises(ValueError, match="gradient checkpointing"):
        module(_ids(1, 16))
    assert state.collect is None

    model, tokenizer = tiny_model("llama")
    names = {field.name for field in dataclasses.fields(TrainingArguments)}
    flag = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    arguments = TrainingArguments(str(tmp_path), max_steps=1, use_cpu=True, report_to=[], **{flag: True})
    for args in (arguments, TrainingSettings(max_steps=1, use_cpu=True, extra_arguments={flag: True})):
        with pytest.raises(ValueError, match=f"gradient checkpointing .*leave .*{flag}.* off in the training arguments"):
            train_token_router(model, RoutingSchedule([0.3, 0.5]), data, args=args)
    assert routing_state(model) is None


def test_chunked_prefill_is_refused():
    """generate(prefill_chunk_size=...) routed only the first chunk, as if it were the whole prompt."""
    model, _ = tiny_model("llama")
    install_routing(model, RoutingSchedule([0.4, 0.5]))
    ids = _ids(1, 40)
    with pytest.raises(ValueError, match="prefill_chunk_size=None"):
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, prefill_chunk_size=16)
    model.generation_config.prefill_chunk_size = 16
    with pytest.raises(ValueError, match="prefill_chunk_size=16"):
        _greedy(model, ids, new=2)
    short = _ids(1, 12)  # one chunk: the whole prompt, routed as usual
    chunked = _greedy(model, short)
    model.generation_config.prefill_chunk_size = None
    assert torch.equal(chunked, _greedy(model, short))


def test_a_cache_holding_part_of_the_prompt_is_refused():
    """generate(prompt, cache=<the prompt's first tokens>) routed the cached prefix as a whole prompt and computed the
    rest at every block: another output than without the cache. Continuing one token at a time stays allowed."""
    from transformers import DynamicCache

    model, _ = tiny_model("llama")
    install_routing(model, RoutingSchedule([0.5, 0.5]))
    ids = _ids(1, 24)
    prefix = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids[:, :16], **{_compat.cache_kwarg_name(model): prefix})
    kwarg = _compat.cache_kwarg_name(model)  # generate() passes it on to the model under the same name
    with pytest.raises(ValueError, match="holding 16 of this prompt's 24 tokens"):
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False, **{kwarg: prefix})
    one_more = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids[:, :23], **{_compat.cache_kwarg_name(model): one_more})
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False, **{kwarg: one_more})
    assert out.shape == (1, 26)


def _router_reading_position_and_rank(router: TokenRouter, threshold: float) -> None:
    """Compute a decoded token iff its position share is above ``threshold``, and never a token that is not the
    most attended among the tokens it is ranked with (a decoded token fed alone always is)."""
    _router_reading_position(router, threshold)
    with torch.no_grad():
        router.hidden.weight[0, 2] = -1000.0


def test_route_decode_prompt_lookup_equals_greedy():
    """Verification chunks were routed by features computed among the chunk; decoded one by one, each token is
    routed alone. Both must choose, and compute, the same."""
    model, _ = tiny_model("llama")
    state = install_routing(model, RoutingSchedule([0.4, 0.5]), mode="router", route_decode=True)
    ids = _ids(1, 40, seed=2)
    ids = torch.cat([ids, ids[:, :20]], dim=1)  # a repeat, so that prompt lookup finds drafts
    # Decoded tokens at positions 60 and 61 skip, from 62 on they are computed (threshold between 61/62 and 62/63).
    _router_reading_position_and_rank(state.router, threshold=(61 / 62 + 62 / 63) / 2)
    settings = dict(attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False, pad_token_id=0,
                    output_logits=True, return_dict_in_generate=True)
    greedy = model.generate(ids, **settings)
    forwards = []
    hook = model.model.register_forward_pre_hook(lambda *args: forwards.append(1))
    try:
        lookup = model.generate(ids, prompt_lookup_num_tokens=4, **settings)
    finally:
        hook.remove()
    assert torch.equal(lookup.sequences, greedy.sequences)
    assert len(forwards) < 12  # drafts were accepted: several tokens were verified in one forward
    state.route_decode = False  # the decode rule did skip tokens: without it the logits differ
    assert not torch.allclose(torch.stack(model.generate(ids, **settings).logits[2:]), torch.stack(greedy.logits[2:]))


def test_route_decode_without_cache_equals_cached():
    """generate(use_cache=False) feeds the whole sequence every step: the tokens past the prompt must follow the
    decode rule as when decoded with the cache, in a left-padded batch whose rows skip different tokens too."""
    model, _ = tiny_model("llama")
    state = install_routing(model, RoutingSchedule([0.3, 0.5]), mode="router", route_decode=True)
    _router_reading_position_and_rank(state.router, threshold=0.895)  # the short row skips positions 6..8
    ids, mask = _left_padded([_ids(1, 14, seed=2)[0], _ids(1, 6, seed=4)[0]])
    settings = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0, output_logits=True,
                    return_dict_in_generate=True)
    cached = model.generate(ids, **settings)
    uncached = model.generate(ids, use_cache=False, **settings)
    assert torch.equal(uncached.sequences, cached.sequences)
    torch.testing.assert_close(torch.stack(uncached.logits), torch.stack(cached.logits), rtol=0, atol=1e-4)
    state.route_decode = False
    assert not torch.allclose(torch.stack(model.generate(ids, **settings).logits[1:]), torch.stack(cached.logits[1:]))


def test_training_an_already_routed_model_checks_the_schedule_and_applies_the_config():
    from hf_compress.training import TrainingSettings, causal_lm_dataset

    model, tokenizer = tiny_model("llama")
    data = causal_lm_dataset(["the quick brown fox jumps over the lazy dog " * 40], tokenizer, num_sequences=4,
                             seq_len=24)
    settings = TrainingSettings(max_steps=1, use_cpu=True)
    static_router(model, RoutingSchedule([0.3, 0.3]))
    with pytest.raises(ValueError, match="3 entries but the model has 2 decoder blocks"):
        train_token_router(model, RoutingSchedule([0.3, 0.3, 0.3]), data, args=settings,
                           config=TokenRouterConfig(0.3, validation_windows=0))
    assert routing_state(model).schedule.block_sparsity == [0.3, 0.3] and routing_state(model).mode == "static"
    with pytest.raises(ValueError, match="router has hidden size 64 but config.router_hidden_size is 8; pass "
                                         "router_hidden_size=64"):
        train_token_router(model, RoutingSchedule([0.3, 0.3]), data, args=settings,
                           config=TokenRouterConfig(0.3, router_hidden_size=8, validation_windows=0))
    train_token_router(model, RoutingSchedule([0.2, 0.4]), data, args=settings,
                       config=TokenRouterConfig(0.3, route_decode=True, validation_windows=0))
    state = routing_state(model)
    assert state.route_decode and state.schedule.block_sparsity == [0.2, 0.4]
    assert model.config.quantization_config.to_dict()["route_decode"] is True

    # Without a config, the default one takes the installed router's size and route_decode.
    model, _ = tiny_model("llama")
    install_routing(model, RoutingSchedule([0.3, 0.3]), router_hidden_size=8, route_decode=True)
    train_token_router(model, RoutingSchedule([0.3, 0.3]), data, args=settings)
    state = routing_state(model)
    assert state.router.hidden.out_features == 8 and state.route_decode and state.mode == "router"


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_output_attentions_is_refused(arch):
    """The blocks attend among their kept tokens only: the maps were (B, H, k, k), not the model's (B, H, T, T)."""
    model, _ = tiny_model(arch)
    model.set_attn_implementation("eager")
    install_routing(model, RoutingSchedule([0.5, 0.5]))
    ids = _ids(1, 20)
    with torch.no_grad():
        with pytest.raises(ValueError, match="pass output_attentions=False"):
            model(ids, output_attentions=True)
        model.config.output_attentions = True
        with pytest.raises(ValueError, match="pass output_attentions=False"):
            model(ids)
        with pytest.raises(ValueError, match="pass output_attentions=False"):  # None: the config decides
            model(ids, output_attentions=None)
        with routing_disabled(model):
            attentions = model(ids).attentions
        model.config.output_attentions = False
        hidden = model(ids, output_hidden_states=True).hidden_states
    assert [tuple(a.shape[-2:]) for a in attentions] == [(20, 20)] * 2
    assert all(h.shape[1] == 20 for h in hidden)


def test_router_stays_float32_when_the_model_is_cast():
    """In bf16 the router's logits tie on long prompts, and top-k then keeps other tokens than in float32."""
    model, _ = tiny_model("llama")
    state = install_routing(model, RoutingSchedule([0.3, 0.3]), mode="router")
    before = {name: value.clone() for name, value in state.router.state_dict().items()}
    for cast in (lambda m: m.to(torch.bfloat16), lambda m: m.half(), lambda m: m.to("cpu", torch.bfloat16)):
        cast(model)
        assert all(torch.equal(value, before[name]) and value.dtype == torch.float32
                   for name, value in state.router.state_dict().items())
    assert next(model.model.layers.parameters()).dtype == torch.bfloat16
    ids = _ids(1, 1000)
    with torch.no_grad():
        routed = model(ids).logits  # the fresh router is the static rule: the same tokens
        with routing_mode(model, "static"):
            static = model(ids).logits
    assert torch.equal(routed, static)


def test_windows_past_the_learned_positions_are_refused(monkeypatch, capsys, tmp_path):
    """GPT-2 has 512 learned positions: an IndexError deep in the embedding before."""
    from hf_compress import assets
    from hf_compress.cli.main import main
    from hf_compress.training import TrainingSettings, causal_lm_dataset

    model, tokenizer = tiny_model("gpt2")
    message = "this model has learned positions for 512 only"
    with pytest.raises(ValueError, match=f"calibration windows have 600 tokens, but {message}"):
        search_schedule(model, _ids(1, 600), TokenRouterConfig(0.3, generations=0, population=2))
    with pytest.raises(ValueError, match=f"search_seq_len is 600 tokens, but {message}"):
        search_schedule(model, ["text " * 2000], TokenRouterConfig(0.3, search_seq_len=600), tokenizer=tokenizer)
    data = causal_lm_dataset(["the quick brown fox jumps over the lazy dog " * 200], tokenizer, num_sequences=2,
                             seq_len=600)
    with pytest.raises(ValueError, match=f"longest training row has 600 tokens, but {message}; use seq_len <= 512"):
        train_token_router(model, RoutingSchedule([0.3, 0.3]), data, args=TrainingSettings(max_steps=1, use_cpu=True))
    assert routing_state(model) is None

    monkeypatch.setattr(assets, "load_text", lambda *args: pytest.fail("the CLI loaded text before the check"))
    code = main(["route", "--model", "tiny-gpt2", "--seq-len", "600", "--static", "--save-dir", str(tmp_path / "out")])
    assert code == 2 and "use --seq-len <= 512" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_config_from_dict_refuses_unknown_keys():
    config = TokenRouterConfig(token_sparsity=0.2, route_decode=True)
    assert TokenRouterConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="no field 'route_decoding'; did you mean 'route_decode'"):
        TokenRouterConfig.from_dict({"route_decoding": True})
    with pytest.raises(ValueError, match="no field 'zzz'; valid fields: token_sparsity, "):
        TokenRouterConfig.from_dict({"zzz": 1})


# ------------------------------------------------------------------------ methods that rewrite weights refuse


@pytest.mark.parametrize("method", ["magnitude", "wanda", "tyr"])
def test_pruners_refuse_a_routed_model_before_any_work(method, tmp_path):
    from hf_compress.pruning import PRUNERS

    model, tokenizer = tiny_model("llama")
    install_routing(model, RoutingSchedule([0.5, 0.5]), mode="static")
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    pruner = PRUNERS[method](model, tokenizer)
    with pytest.raises(ValueError, match="token-routed: prune the model it was routed from"):
        pruner.prune(pruner.config_for_target(0.5), "some calibration text " * 200, save_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())


def test_quantizers_refuse_a_routed_model():
    from peft import get_peft_model

    from hf_compress.quantization import DLQATConfig, quantize_rtn

    model, _ = tiny_model("llama")
    install_routing(model, RoutingSchedule([0.5, 0.5]), mode="static")
    with pytest.raises(ValueError, match="token-routed: quantize the model it was routed from"):
        quantize_rtn(model, bits=4, group_size=32)
    with pytest.raises(ValueError, match="token-routed: quantize the model it was routed from"):
        get_peft_model(model, DLQATConfig(bits=4, group_size=32, target_modules="all-linear"))
    assert not any(type(module).__name__ == "PackedLinear" for module in model.modules())


def test_routing_a_model_narrowed_by_a_structured_prune_says_what_to_do_instead():
    # It said "token routing needs a float model" of a Týr model, which is one.
    from hf_compress.formats.slim import attach_slim_format
    from hf_compress.modeling.structure import apply_layer_widths

    model, _ = tiny_model("llama")
    apply_layer_widths(model, [{"key_value_heads": 1, "intermediate_size": 64}] * 2)
    attach_slim_format(model)
    with pytest.raises(ValueError, match="narrowed by a structured prune .* route the dense model, or remove whole"):
        install_routing(model, RoutingSchedule([0.3, 0.3]), mode="static")


def test_a_model_with_recurrent_layers_is_refused_before_routing():
    """Mamba and Qwen3-Next took a static router without a word, then failed in their first masked forward."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("mamba", vocab_size=256, hidden_size=64, state_size=8,
                                                                  num_hidden_layers=2))
    with pytest.raises(ValueError, match="MambaForCausalLM has recurrent layers .* needs a model of attention blocks"):
        install_routing(model, RoutingSchedule([0.3, 0.3]))
    assert not any("routing" in name for name, _ in model.named_modules())
