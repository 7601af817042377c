"""SparKCache / StructuredChannelCache: exactness at ratio 0, compact byte accounting, recovery, cache API."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from transformers import DynamicCache

from hf_compress.assets import tiny_model
from hf_compress.cache import ChannelPrunedLayer, SparKCache, StructuredChannelCache, cache_kwargs
from hf_compress.cache.channels import PerTokenChannels, pack_bits, unpack_bits
from hf_compress.speculative import SpeculativeDecoding


def _prompt(batch: int = 2, length: int = 60, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 250, (batch, length), generator=torch.Generator().manual_seed(seed))


def _greedy(model, ids, cache, **kwargs) -> torch.Tensor:
    return model.generate(ids, **cache_kwargs(model, cache), max_new_tokens=8, do_sample=False, **kwargs)


@pytest.mark.compat_smoke
@pytest.mark.parametrize("arch", ["llama", "qwen3", "mistral", "gemma3"])
def test_ratio_zero_equals_dynamic_cache_with_padding(arch):
    model, _ = tiny_model(arch)
    ids = _prompt()
    mask = torch.ones_like(ids)
    mask[1, :7] = 0  # left padding on the second row
    expected = _greedy(model, ids, DynamicCache(config=model.config), attention_mask=mask)
    cache = SparKCache(model.config, channel_ratio=0.0, recent_window=4)
    assert torch.equal(_greedy(model, ids, cache, attention_mask=mask), expected)
    assert model.config._attn_implementation.startswith("hf_compress_queries|")


def test_pruning_changes_outputs_but_keeps_shapes():
    model, _ = tiny_model("qwen2")
    ids = _prompt(batch=1, length=80)
    expected = model(ids).logits
    cache = SparKCache(model.config, channel_ratio=0.8, recent_window=0)
    model(ids[:, :-1], **cache_kwargs(model, cache))
    last = model(ids[:, -1:], **cache_kwargs(model, cache)).logits
    assert not torch.allclose(last[:, -1], expected[:, -1], atol=1e-4), "80% of key channels pruned must matter"
    assert cache.get_seq_length() == 80


def test_recovery_rule_on_a_hand_built_token():
    keys = torch.tensor([3.0, -1.0, 0.5, -2.0]).view(1, 1, 1, 4)
    qbar = torch.tensor([1.0, 2.0, 1.0, 1.0]).view(1, 1, 4)
    # saliency K^2 * qbar = [9, 2, 0.25, 4]: channels 0 and 3 kept; pruned mean saliency (2 + 0.25) / 2
    store = PerTokenChannels.compress_keys(keys, qbar, keep=2)
    assert store.kept.flatten().tolist() == [3.0, -2.0]
    rebuilt = store.densify_keys(qbar).flatten()
    mean_pruned = (2 + 0.25) / 2
    expected = [3.0, -math.sqrt(mean_pruned / 2.0), math.sqrt(mean_pruned / 1.0), -2.0]
    assert rebuilt.tolist() == pytest.approx(expected)
    # the pruned channels keep exactly their total saliency
    assert float((qbar.flatten()[1:3] * rebuilt[1:3] ** 2).sum()) == pytest.approx(2 + 0.25)
    assert store.densify_keys(None).flatten().tolist() == [3.0, 0.0, 0.0, -2.0]


def test_bitmask_round_trip_any_length():
    flags = torch.rand(3, 2, 13) > 0.5
    packed = pack_bits(flags)
    assert packed.shape == (3, 2, 2) and packed.dtype == torch.uint8
    assert torch.equal(unpack_bits(packed, 13), flags)


def test_byte_accounting_is_exact():
    model, _ = tiny_model("llama")  # 2 layers, 2 KV heads, head_dim 16, fp32
    tokens, recent, batch = 50, 8, 2
    cache = SparKCache(model.config, channel_ratio=0.5, value_channel_ratio=0.25, recent_window=recent)
    model(_prompt(batch, tokens), **cache_kwargs(model, cache))
    heads, dim, item = 2, 16, 4
    old = tokens - recent
    key_bytes = old * (8 * item + 2 + 1 + item)  # 8 kept, 16-bit mask, 8 pruned signs, fill
    value_bytes = old * (12 * item + 2 + item)  # 12 kept, mask, fill
    recent_bytes = recent * 2 * dim * item
    per_layer = batch * heads * (key_bytes + value_bytes + recent_bytes + dim * 4)  # + qbar (float32)
    footprint = cache.memory_footprint()
    assert footprint["held"] == 2 * per_layer
    dense = DynamicCache(config=model.config)
    model(_prompt(batch, tokens), **cache_kwargs(model, dense))
    assert footprint["dense_equivalent"] == sum(l.keys.nbytes + l.values.nbytes for l in dense.layers)
    assert footprint["ratio"] == pytest.approx(footprint["held"] / footprint["dense_equivalent"]) and footprint["ratio"] < 0.8


def _filled_layer(batch: int = 2) -> tuple[SparKCache, ChannelPrunedLayer]:
    model, _ = tiny_model("llama")
    cache = SparKCache(model.config, channel_ratio=0.5, value_channel_ratio=0.5, recent_window=6)
    model(_prompt(batch, 30), **cache_kwargs(model, cache))
    model(_prompt(batch, 3, seed=1), **cache_kwargs(model, cache))  # decoding-time tokens are compressed too
    return cache, cache.layers[0]


def test_crop_reorder_select_repeat_on_a_filled_cache():
    cache, layer = _filled_layer()
    keys, values = layer._full_keys(), layer._full_values()
    assert layer.old_keys.num_tokens == 27 and layer.keys.shape[2] == 6
    cache.crop(-10)  # reaches into the compressed part
    assert cache.get_seq_length() == 23
    assert torch.equal(layer._full_keys(), keys[:, :, :23]) and torch.equal(layer._full_values(), values[:, :, :23])
    cache.reorder_cache(torch.tensor([1, 0]))
    assert torch.equal(layer._full_keys(), keys[[1, 0], :, :23])
    cache.batch_repeat_interleave(2)
    assert layer._full_keys().shape[0] == 4 and layer.qbar.shape[0] == 4
    cache.batch_select_indices(torch.tensor([0, 3]))
    assert torch.equal(layer._full_keys(), keys[[1, 0], :, :23])
    with pytest.raises(ValueError, match="negative"):
        cache.crop(3)
    cache.reset()
    assert cache.get_seq_length() == 0 and layer.qbar is None


@pytest.mark.compat_smoke
def test_speculative_rollback_and_beam_search():
    model, _ = tiny_model("llama")
    ids = _prompt(batch=1, length=40)
    # Lossless speculative decoding with rejected drafts cropped out of a pruned cache equals plain greedy
    # decoding with the same cache settings (recent_window=0 compresses every token independently).
    settings = {"channel_ratio": 0.5, "recent_window": 0}
    plain = _greedy(model, ids, SparKCache(model.config, **settings))
    cache = SparKCache(model.config, **settings)
    speculative = model.generate(
        ids, **cache_kwargs(model, cache), custom_generate=SpeculativeDecoding(), max_new_tokens=8, do_sample=False
    )
    assert torch.equal(speculative, plain)
    assert cache.get_seq_length() == speculative.shape[1] - 1
    beams = {"num_beams": 3, "max_new_tokens": 6, "do_sample": False}
    expected = model.generate(ids, **cache_kwargs(model, DynamicCache(config=model.config)), **beams)
    assert torch.equal(model.generate(ids, **cache_kwargs(model, SparKCache(model.config, channel_ratio=0.0)), **beams), expected)


def test_token_budget_evicts_prompt_tokens():
    model, _ = tiny_model("qwen2")
    cache = SparKCache(model.config, channel_ratio=0.5, token_budget=40, recent_window=4)
    out = _greedy(model, _prompt(batch=1, length=70), cache)
    layer = cache.layers[0]
    assert layer.held_tokens == 40 + 8 - 1 and cache.get_seq_length() == out.shape[1] - 1
    mask = torch.ones(2, 70, dtype=torch.long)
    mask[0, :5] = 0
    with pytest.raises(ValueError, match="unpadded"):
        _greedy(model, _prompt(length=70), SparKCache(model.config, token_budget=40), attention_mask=mask)


def test_structured_baseline_keeps_one_channel_set_per_head():
    model, _ = tiny_model("llama")
    cache = StructuredChannelCache(model.config, channel_ratio=0.5, recent_window=0)
    model(_prompt(1, 20), **cache_kwargs(model, cache))
    keys = cache.layers[0]._full_keys()
    zero_channels = (keys == 0).all(dim=2)  # (batch, heads, dim): pruned for every token
    assert zero_channels.sum(-1).tolist() == [[8, 8]]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"channel_ratio": 1.0}, "channel_ratio"), ({"channel_ratio": -0.1}, r"\[0, 1\)"),
     ({"value_channel_ratio": 1.5}, "value_channel_ratio"), ({"token_budget": 16}, "observation_window")],
)
def test_bad_settings_raise(kwargs, match):
    model, _ = tiny_model("llama")
    with pytest.raises(ValueError, match=match):
        SparKCache(model.config, **kwargs)


def test_unservable_or_mismatched_configs_raise():
    model, _ = tiny_model("llama")
    hybrid = copy.deepcopy(model.config)
    hybrid.layer_types = ["full_attention", "linear_attention"]
    with pytest.raises(ValueError, match="attention layers only"):
        SparKCache(hybrid)
    other, _ = tiny_model("llama", num_key_value_heads=1)
    with pytest.raises(ValueError, match="own config"):
        model(_prompt(1, 10), **cache_kwargs(model, SparKCache(other.config)))
    fresh, _ = tiny_model("qwen2")
    detached = SparKCache(copy.deepcopy(fresh.config))  # capture installed on a copy, not on the model
    fresh(_prompt(1, 10), **cache_kwargs(fresh, detached))
    with pytest.raises(RuntimeError, match="never handed its queries"):
        fresh(_prompt(1, 1), **cache_kwargs(fresh, detached))
