"""SparKCache / StructuredChannelCache: exactness at ratio 0, compact byte accounting, recovery, cache API."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
from transformers import DynamicCache

from hf_compress.assets import tiny_model
from hf_compress.cache import ChannelPrunedLayer, SparKCache, StructuredChannelCache, cache_kwargs, triton_read
from hf_compress.cache.channels import PerTokenChannels, append_tokens, pack_bits, unpack_bits
from hf_compress.cache import read as read_module
from hf_compress.cache.read import ReadScratch, _tables, read_keys, read_values
from hf_compress.speculative import SpeculativeDecoding


def _prompt(batch: int = 2, length: int = 60, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 250, (batch, length), generator=torch.Generator().manual_seed(seed))


def _greedy(model, ids, cache, **kwargs) -> torch.Tensor:
    return model.generate(ids, **cache_kwargs(model, cache), **{"max_new_tokens": 8, "do_sample": False, **kwargs})


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


@pytest.mark.parametrize("cache_class", [SparKCache, StructuredChannelCache])
def test_a_left_padded_row_is_compressed_as_the_same_prompt_alone(cache_class):
    model, _ = tiny_model("qwen2")  # pad id 2: an embedding that is not zero, so pad positions have real queries
    long, short = _prompt(1, 40, seed=0), _prompt(1, 20, seed=1)
    batch = torch.cat([long, torch.cat([torch.full((1, 20), 2), short], dim=1)])
    mask = torch.ones_like(batch)
    mask[1, :20] = 0
    settings = dict(channel_ratio=0.5, value_channel_ratio=0.5, recent_window=0, observation_window=32)
    padded, alone = cache_class(model.config, **settings), cache_class(model.config, **settings)
    with torch.no_grad():
        model(batch, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0), **cache_kwargs(model, padded))
        model(short, **cache_kwargs(model, alone))
    for p, a in zip(padded.layers, alone.layers):
        assert torch.allclose(p.qbar[1], a.qbar[0], atol=1e-5)
        if cache_class is StructuredChannelCache:
            assert torch.equal(p.key_channels[1], a.key_channels[0]) and torch.equal(p.value_channels[1], a.value_channels[0])
        else:
            assert torch.equal(p.old_keys.kept_bits[1, :, 20:], a.old_keys.kept_bits[0])


@pytest.mark.parametrize("arch", ["gpt2", "opt", "gemma3"])
def test_ratio_zero_equals_dynamic_cache_under_eager_attention(arch):
    # No "eager" entry exists in transformers' registry: the wrapper must call the model's own eager attention
    # (GPT-2 and OPT have no grouped-query heads; Gemma's applies its own scaling), not Llama's.
    model, _ = tiny_model(arch)
    model.set_attn_implementation("eager")
    ids = _prompt(batch=1, length=30)
    expected = _greedy(model, ids, DynamicCache(config=model.config))
    assert torch.equal(_greedy(model, ids, SparKCache(model.config, channel_ratio=0.0, recent_window=4)), expected)
    assert model.config._attn_implementation == "hf_compress_queries|eager"


def test_layers_with_their_own_head_size_are_sized_per_layer():
    import transformers

    if not hasattr(transformers, "Gemma4TextConfig"):
        pytest.skip("this transformers has no Gemma 4 (heterogeneous per-layer configs)")
    config = transformers.Gemma4TextConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, global_head_dim=32, sliding_window=8, pad_token_id=0,
        layer_types=["sliding_attention", "full_attention"], vocab_size_per_layer_input=256, hidden_size_per_layer_input=8)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    ids = _prompt(batch=1, length=30)
    expected = _greedy(model, ids, DynamicCache(config=model.config))
    assert torch.equal(_greedy(model, ids, SparKCache(model.config, channel_ratio=0.0, recent_window=4)), expected)
    cache = SparKCache(model.config, channel_ratio=0.5, recent_window=4)
    assert cache.layers[1].head_dim == 32 and cache.layers[1].keep_keys == 16  # the full-attention layer's own size
    assert _greedy(model, ids, cache).shape == expected.shape


@pytest.mark.parametrize("cache_class", [SparKCache, StructuredChannelCache])
def test_blocks_a_structured_prune_narrowed_are_sized_by_the_recorded_widths(cache_class, tmp_path):
    # A Týr model keeps fewer key/value heads in some blocks: the cache was sized from num_key_value_heads and refused
    # it, telling the user to build it from the config they had passed.
    from transformers import AutoModelForCausalLM

    from hf_compress.formats.slim import attach_slim_format
    from hf_compress.modeling.structure import apply_layer_widths

    model, _ = tiny_model("llama")
    full = model.config.num_key_value_heads
    apply_layer_widths(model, [{"key_value_heads": full - 1, "intermediate_size": 64},
                               {"key_value_heads": full, "intermediate_size": 128}])
    attach_slim_format(model)
    model.save_pretrained(tmp_path / "slim")
    ids = _prompt(batch=1, length=30)
    for candidate in (model, AutoModelForCausalLM.from_pretrained(tmp_path / "slim").eval()):
        expected = _greedy(candidate, ids, DynamicCache(config=candidate.config))
        lossless = cache_class(candidate.config, channel_ratio=0.0, recent_window=4)
        assert torch.equal(_greedy(candidate, ids, lossless), expected)
        assert [layer.num_kv_heads for layer in lossless.layers] == [full - 1, full]
        assert _greedy(candidate, ids, cache_class(candidate.config, channel_ratio=0.5, recent_window=4)).shape \
            == expected.shape


@pytest.mark.parametrize("channel_ratio", [0.0, 0.5])
def test_backward_through_several_cached_forwards(channel_ratio):
    model, _ = tiny_model("llama")
    ids = _prompt(batch=1, length=20)

    def gradients(cache):
        model.zero_grad()
        loss = sum(model(chunk, **cache_kwargs(model, cache)).logits.square().mean() for chunk in (ids, ids[:, :1], ids[:, 1:2]))
        loss.backward()  # the second and third forwards read keys and values the earlier ones stored
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    spark = gradients(SparKCache(model.config, channel_ratio=channel_ratio, recent_window=4))
    if channel_ratio == 0.0:  # nothing pruned: the same gradients as transformers' cache
        dense = gradients(DynamicCache(config=model.config))
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(spark, dense))
    assert all(torch.isfinite(g).all() for g in spark)


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
    cache = SparKCache(model.config, channel_ratio=0.5, value_channel_ratio=0.5, recent_window=6, compression_interval=1)
    model(_prompt(batch, 30), **cache_kwargs(model, cache))
    model(_prompt(batch, 3, seed=1), **cache_kwargs(model, cache))  # decoding-time tokens are compressed too
    return cache, cache.layers[0]


def _random_store(head_dim: int, keep: int, dtype: torch.dtype, seed: int = 0, device: str = "cpu"):
    generator = torch.Generator().manual_seed(seed)
    states = torch.randn(2, 3, 37, head_dim, generator=generator).to(device=device, dtype=dtype)
    qbar = torch.rand(2, 3, head_dim, generator=generator).to(device) + 0.05
    qbar[0, 1, : head_dim // 3] = 0.0  # channels no query uses: recovery divides by the floor
    return states, qbar


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("head_dim", "keep"), [(64, 32), (64, 13), (20, 10), (12, 11), (16, 1), (128, 64), (256, 128)])
def test_fast_read_is_bit_identical_to_the_reference(dtype, head_dim, keep):
    states, qbar = _random_store(head_dim, keep, dtype, seed=head_dim + keep)
    keys = PerTokenChannels.compress_keys(states, qbar, keep)
    values = PerTokenChannels.compress_values(states, keep)
    assert torch.equal(read_keys(keys, qbar), keys.densify_keys(qbar))
    assert torch.equal(read_keys(keys, None), keys.densify_keys(None))
    assert torch.equal(read_values(values), values.densify_values())
    # into a slice of a larger tensor (what the layer does: the recent window goes after it)
    full = torch.full((2, 3, 40, head_dim), 7.0, dtype=dtype)
    read_keys(keys, qbar, out=full[:, :, :37])
    assert torch.equal(full[:, :, :37], keys.densify_keys(qbar)) and bool((full[:, :, 37:] == 7).all())
    # reusing one scratch across stores of different shapes and dtypes (a cache's layers share one)
    scratch = ReadScratch()
    shorter = PerTokenChannels.compress_keys(states[:, :, :5], qbar, keep)
    for store, reference in ((keys, keys.densify_keys(qbar)), (shorter, shorter.densify_keys(qbar))):
        assert torch.equal(read_keys(store, qbar, scratch=scratch), reference)
        assert torch.equal(read_values(values, scratch=scratch), values.densify_values())


def test_float16_recovery_of_a_channel_no_query_uses_stays_finite_in_every_reader():
    """Recovery divides a token's fill by sqrt(qbar[i]): with large keys and a channel the queries never use
    (qbar at the floor), the quotient passes float16's range. Every reader clamps it to 65504 (no inf, so no nan in
    attention) and they stay bit-identical; bfloat16 and float32 need no clamp."""
    states, qbar = _random_store(64, 32, torch.float32, seed=3)
    states = (states * 1000).to(torch.float16)  # fills of hundreds: divided by sqrt(1e-6), far past 65504
    keys = PerTokenChannels.compress_keys(states, qbar, 32)
    reference = keys.densify_keys(qbar)
    assert bool(torch.isfinite(reference).all()) and reference.abs().max().item() == 65504.0
    assert torch.equal(read_keys(keys, qbar), reference)
    keys.fill.requires_grad_(True)  # the differentiable path
    assert torch.equal(read_keys(keys, qbar).detach(), reference)


def test_long_reads_go_in_token_chunks_with_bounded_scratch(monkeypatch):
    states, qbar = _random_store(16, 6, torch.float32)
    keys = PerTokenChannels.compress_keys(states, qbar, 6)
    values = PerTokenChannels.compress_values(states, 6)
    monkeypatch.setattr(read_module, "_MAX_POSITIONS_PER_READ", 2 * 3 * 16 * 5)  # 5 tokens a chunk (37 held)
    scratch = ReadScratch()
    assert torch.equal(read_keys(keys, qbar, scratch=scratch), keys.densify_keys(qbar))
    assert torch.equal(read_keys(keys, None, scratch=scratch), keys.densify_keys(None))
    assert torch.equal(read_values(values, scratch=scratch), values.densify_values())
    # int64 positions + float32 source rows + float32 divisors of one chunk, with the buffers' headroom
    assert scratch.nbytes <= 1.1 * (2 * 3 * 16 * 5) * (8 + 4 + 4) + 3 * 64 * 8


def test_a_read_one_token_wide_past_the_limit_is_not_chunked_further(monkeypatch):
    """A batch wider than the limit on its own (a 7B model's 32 KV heads x 128 channels, > 1,024 rows) is read one
    token at a time: a one-token chunk is read whole instead of chunked again (unbounded recursion)."""
    states, qbar = _random_store(16, 6, torch.float32)
    keys = PerTokenChannels.compress_keys(states, qbar, 6)
    values = PerTokenChannels.compress_values(states, 6)
    monkeypatch.setattr(read_module, "_MAX_POSITIONS_PER_READ", 32)  # less than one token's positions
    assert torch.equal(read_keys(keys, qbar, scratch=ReadScratch()), keys.densify_keys(qbar))
    assert torch.equal(read_values(values, scratch=ReadScratch()), values.densify_values())


def test_read_tables_one_lookup_or_two():
    # (256, 128) is past the one-lookup table's size limit: keys take the two-lookup path (tested above)
    assert _tables(64, 32, torch.device("cpu")).key is not None
    assert _tables(256, 128, torch.device("cpu")).key is None


def test_fast_read_is_differentiable():
    states, qbar = _random_store(16, 6, torch.float32)
    keys = PerTokenChannels.compress_keys(states, qbar, 6)
    values = PerTokenChannels.compress_values(states, 6)
    for store in (keys, values):
        store.kept.requires_grad_(True)
        store.fill.requires_grad_(True)
    rebuilt_keys, rebuilt_values = read_keys(keys, qbar), read_values(values)
    assert torch.equal(rebuilt_keys.detach(), keys.densify_keys(qbar).detach())
    assert torch.equal(rebuilt_values.detach(), values.densify_values().detach())
    (rebuilt_keys.sum() + rebuilt_values.sum()).backward()
    # every kept value reaches exactly one channel; a fill reaches each pruned channel once (with its sign
    # and divisor for keys, plainly for values)
    assert torch.equal(keys.kept.grad, torch.ones_like(keys.kept)) and torch.equal(values.kept.grad, torch.ones_like(values.kept))
    assert torch.equal(values.fill.grad, torch.full_like(values.fill, 10.0))
    expected = (keys.densify_keys(qbar).detach() / keys.fill.detach().unsqueeze(-1)).masked_fill(
        unpack_bits(keys.kept_bits, 16), 0.0).sum(-1)
    torch.testing.assert_close(keys.fill.grad, expected)


def test_compression_interval_batches_decoding_compression():
    model, _ = tiny_model("llama")
    ids = _prompt(batch=2, length=30)
    settings = {"channel_ratio": 0.5, "value_channel_ratio": 0.5, "recent_window": 4}
    batched, single = SparKCache(model.config, **settings, compression_interval=5), SparKCache(model.config, **settings, compression_interval=1)
    with torch.inference_mode():
        for cache in (batched, single):
            out = model(ids, **cache_kwargs(model, cache))  # the prompt: everything past the window at once
        assert batched.layers[0].keys.shape[2] == 4 and batched.layers[0].old_keys.num_tokens == 26
        windows = []
        for step in range(12):
            token = out.logits[:, -1:].argmax(-1)
            out = model(token, **cache_kwargs(model, batched))
            model(token, **cache_kwargs(model, single))
            windows.append(batched.layers[0].keys.shape[2])
    assert windows == [5, 6, 7, 8, 4, 5, 6, 7, 8, 4, 5, 6]  # the 5th token past the window releases all 5
    layer, reference = batched.layers[0], single.layers[0]
    held = layer.old_keys.num_tokens
    # a token's compressed form does not depend on when it was compressed
    assert torch.equal(layer._full_keys()[:, :, :held], reference._full_keys()[:, :, :held])
    assert torch.equal(layer._full_values()[:, :, :held], reference._full_values()[:, :, :held])
    assert batched.memory_footprint()["read_scratch"] > 0
    with pytest.raises(ValueError, match="compression_interval"):
        SparKCache(model.config, compression_interval=0)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_fast_read_decodes_exactly_like_the_reference_read(arch, monkeypatch):
    model, _ = tiny_model(arch)
    ids = _prompt(batch=2, length=50)
    settings = {"channel_ratio": 0.5, "recent_window": 4}

    def run(reference: bool) -> tuple[torch.Tensor, torch.Tensor]:
        monkeypatch.setattr(ChannelPrunedLayer, "reference_read", reference)
        outputs = []
        for extra in ({}, {"value_channel_ratio": 0.5}, {"recovery": False}):
            cache = SparKCache(model.config, **settings, **extra)
            out = model.generate(ids, **cache_kwargs(model, cache), max_new_tokens=12, do_sample=False,
                                 output_scores=True, return_dict_in_generate=True)
            outputs.append((out.sequences, torch.stack(out.scores)))
        return outputs

    for (fast_ids, fast_scores), (ref_ids, ref_scores) in zip(run(False), run(True), strict=True):
        assert torch.equal(fast_ids, ref_ids)
        assert torch.equal(fast_scores, ref_scores)  # bit-identical in float32


def test_appends_write_in_place_with_bounded_headroom():
    model, _ = tiny_model("llama")
    cache = SparKCache(model.config, channel_ratio=0.5, recent_window=4, compression_interval=1)
    ids = _prompt(batch=1, length=300)
    with torch.inference_mode():
        out = model(ids, **cache_kwargs(model, cache))
        exact = cache.memory_footprint()["held"]
        layer = cache.layers[0]
        pointers = set()
        for _ in range(10):
            out = model(out.logits[:, -1:].argmax(-1), **cache_kwargs(model, cache))
            pointers.add((layer.old_keys.kept.data_ptr(), layer.values.data_ptr()))
    assert len(pointers) == 1, "decoding steps must append in place, not reallocate the stores"
    footprint = cache.memory_footprint()
    per_token = exact / 300
    assert footprint["held"] <= per_token * (310 + 16 + 4), "headroom is at most 16 tokens at this length"
    assert footprint["held"] >= per_token * 310
    view, buffer = append_tokens(torch.zeros(1, 1, 2, 3), torch.ones(1, 1, 1, 3), None)
    again, same = append_tokens(view[:, :, :1], torch.full((1, 1, 1, 3), 2.0), buffer)  # after a crop
    assert same is buffer and again.tolist() == [[[[0.0] * 3, [2.0] * 3]]]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_triton_float16_recovery_is_clamped_like_the_reference_on_cuda():
    pytest.importorskip("triton")
    states, qbar = _random_store(64, 32, torch.float32, seed=3, device="cuda")
    keys = PerTokenChannels.compress_keys((states * 1000).to(torch.float16), qbar, 32)
    assert triton_read.usable(keys.kept)
    with torch.inference_mode():
        fast = read_keys(keys, qbar, out=torch.empty(2, 3, 37, 64, dtype=torch.float16, device="cuda"))
        reference = keys.densify_keys(qbar)
    assert bool(torch.isfinite(fast).all()) and fast.abs().max().item() == 65504.0
    torch.testing.assert_close(fast, reference, rtol=1e-3, atol=0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("head_dim", "keep"), [(64, 32), (128, 26), (20, 10)])
def test_triton_read_matches_the_reference_on_cuda(dtype, head_dim, keep, monkeypatch):
    pytest.importorskip("triton")
    states, qbar = _random_store(head_dim, keep, dtype, device="cuda")
    keys = PerTokenChannels.compress_keys(states, qbar, keep)
    values = PerTokenChannels.compress_values(states, keep)
    assert triton_read.usable(keys.kept)
    full = torch.zeros(2, 3, 40, head_dim, dtype=dtype, device="cuda")
    with torch.inference_mode():
        fast = read_keys(keys, qbar, out=full[:, :, :37])
        # float32 rounding of the division at most (bit-identical where Triton has div_rn)
        torch.testing.assert_close(fast, keys.densify_keys(qbar), rtol=2e-7 if dtype == torch.float32 else 8e-3, atol=0)
        assert torch.equal(read_keys(keys, None, out=full[:, :, :37]), keys.densify_keys(None))
        assert torch.equal(read_values(values, out=full[:, :, :37]), values.densify_values())
    model, _ = tiny_model("llama")
    model.to("cuda")
    ids = _prompt(batch=2, length=50).cuda()
    settings = {"channel_ratio": 0.5, "value_channel_ratio": 0.5, "recent_window": 4}
    fused = _greedy(model, ids, SparKCache(model.config, **settings))
    monkeypatch.setattr(ChannelPrunedLayer, "reference_read", True)
    assert torch.equal(fused, _greedy(model, ids, SparKCache(model.config, **settings)))


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
    cache.batch_select_indices(torch.tensor([False, True]))  # a row mask, as DynamicCache takes it
    assert torch.equal(layer._full_keys(), keys[[0], :, :23]) and torch.equal(layer._full_values(), values[[0], :, :23])
    with pytest.raises(ValueError, match="negative"):
        cache.crop(3)
    cache.reset()
    assert cache.get_seq_length() == 0 and layer.qbar is None


@pytest.mark.compat_smoke
def test_speculative_rollback_and_beam_search():
    model, _ = tiny_model("llama")
    ids = _prompt(batch=1, length=40)
    # Lossless speculative decoding with rejected drafts cropped out of a pruned cache equals plain greedy
    # decoding with the same cache settings (recent_window=0 and compression_interval=1 compress every token as
    # soon as it is stored, so what attention reads does not depend on how many tokens a forward appends). The
    # query statistic is the one difference: the first forward also holds the first round's drafts, so it reads
    # a window shifted by them (see SparKCache); on this model and prompt that changes no greedy token.
    settings = {"channel_ratio": 0.5, "recent_window": 0, "compression_interval": 1}
    plain = _greedy(model, ids, SparKCache(model.config, **settings), max_new_tokens=12)
    draft = copy.deepcopy(model)  # agrees with the target often but not always: accepted and rejected drafts
    with torch.no_grad():
        generator = torch.Generator().manual_seed(0)
        for parameter in draft.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05 * parameter.std())
    cache, strategy = SparKCache(model.config, **settings), SpeculativeDecoding(draft, draft_confidence_threshold=None, num_draft_tokens=4)
    speculative = model.generate(ids, **cache_kwargs(model, cache), custom_generate=strategy, max_new_tokens=12,
                                 do_sample=False)
    assert torch.equal(speculative, plain)
    metrics = strategy.last_metrics  # the first round drafts too, so its forward appends prompt and drafts
    assert 0 < metrics.draft_tokens_accepted < metrics.draft_tokens_proposed, metrics
    assert cache.get_seq_length() == speculative.shape[1] - 1
    beams = {"num_beams": 3, "max_new_tokens": 6, "do_sample": False}
    expected = model.generate(ids, **cache_kwargs(model, DynamicCache(config=model.config)), **beams)
    assert torch.equal(model.generate(ids, **cache_kwargs(model, SparKCache(model.config, channel_ratio=0.0)), **beams), expected)


def test_a_cache_cropped_to_empty_takes_the_next_prompts_statistics():
    model, _ = tiny_model("qwen2")
    first, second = _prompt(1, 30, seed=0), _prompt(1, 30, seed=1)
    reused, fresh = SparKCache(model.config, channel_ratio=0.5), SparKCache(model.config, channel_ratio=0.5)
    with torch.no_grad():
        model(first, **cache_kwargs(model, reused))
        reused.crop(-reused.get_seq_length())
        assert reused.get_seq_length() == 0
        model(second, **cache_kwargs(model, reused))
        model(second, **cache_kwargs(model, fresh))
    assert all(torch.equal(r.qbar, f.qbar) for r, f in zip(reused.layers, fresh.layers))


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


def test_crop_after_eviction_stays_within_the_tail_it_knows():
    """After SnapKV eviction each head holds other earlier tokens: a crop is exact within the kept observation window
    and what came after it, and refused past it (it would cut kept prompt tokens and leave rejected drafts)."""
    model, _ = tiny_model("llama")
    ids = _prompt(batch=1, length=80)
    cache = SparKCache(model.config, channel_ratio=0.0, recent_window=100, observation_window=8, token_budget=24)
    model(ids, **cache_kwargs(model, cache))
    reference = DynamicCache()
    model(ids[:, :76], **cache_kwargs(model, reference))
    cache.crop(-4)  # inside the kept window: the held tail is still the last positions
    held = cache.layers[0].keys
    assert torch.equal(held[:, :, -4:], reference.layers[0].keys[:, :, -4:]) and cache.get_seq_length() == 76
    with pytest.raises(ValueError, match=r"cannot crop 20 tokens: token eviction .*last 4 held tokens.*"
                                         r"observation_window \(8\)"):
        cache.crop(-20)
    model(ids[:, 76:], **cache_kwargs(model, cache))  # tokens appended after the eviction are croppable too
    cache.crop(-8)
    assert cache.get_seq_length() == 72


def test_a_cache_filled_under_inference_mode_can_be_reused_outside_it():
    model, _ = tiny_model("llama")
    ids = _prompt(batch=1, length=60)
    for ratio in (0.0, 0.5):
        cache, reference = SparKCache(model.config, channel_ratio=ratio), SparKCache(model.config, channel_ratio=ratio)
        with torch.inference_mode():
            out = _greedy(model, ids, cache, max_new_tokens=20)
        follow = torch.cat([out, _prompt(batch=1, length=5, seed=1)], dim=1)
        continued = _greedy(model, follow, cache, max_new_tokens=8)  # wrote into inference tensors: RuntimeError
        _greedy(model, ids, reference, max_new_tokens=20)
        assert torch.equal(continued, _greedy(model, follow, reference, max_new_tokens=8))


def test_ratio_zero_prefill_holds_no_more_than_the_dense_cache():
    """With nothing pruned the compressed part is a copy, not a view pinning the whole prefill beside the window."""
    model, _ = tiny_model("llama")
    cache = SparKCache(model.config, channel_ratio=0.0)
    model(_prompt(batch=1, length=200), **cache_kwargs(model, cache))
    footprint = cache.layers[0].memory_footprint()
    assert footprint["held"] <= 1.02 * footprint["dense_equivalent"], footprint


def test_structured_baseline_keeps_one_channel_set_per_head():
    model, _ = tiny_model("llama")
    cache = StructuredChannelCache(model.config, channel_ratio=0.5, recent_window=0)
    model(_prompt(1, 20), **cache_kwargs(model, cache))
    keys = cache.layers[0]._full_keys()
    zero_channels = (keys == 0).all(dim=2)  # (batch, heads, dim): pruned for every token
    assert zero_channels.sum(-1).tolist() == [[8, 8]]
    values_only = StructuredChannelCache(model.config, channel_ratio=0.0, value_channel_ratio=0.5, recent_window=0)
    model(_prompt(1, 20), **cache_kwargs(model, values_only))
    layer = values_only.layers[0]
    assert ((layer._full_values() == 0).all(dim=2).sum(-1).tolist() == [[8, 8]]
            and not (layer._full_keys() == 0).all(dim=2).any())


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
    with pytest.raises(RuntimeError, match="never handed its queries"):  # a prefill alone: its footprint is asked
        detached.layers[0].memory_footprint()
    with pytest.raises(RuntimeError, match="never handed its queries"):
        fresh(_prompt(1, 1), **cache_kwargs(fresh, detached))


def _storage_bytes(tensors) -> int:
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors if t is not None}
    return sum(storages.values())


def test_memory_footprint_counts_everything_a_prefill_leaves_alive():
    model, _ = tiny_model("gemma3")  # a dense sliding-window layer beside the pruned full-attention one
    cache = SparKCache(model.config, channel_ratio=0.5, value_channel_ratio=0.5, recent_window=8)
    with torch.no_grad():
        model(_prompt(1, 300), **cache_kwargs(model, cache))
    pruned = cache.layers[1]
    # the dense recent window is its own tensor, not a view keeping the whole prompt's dense keys/values alive
    assert pruned.keys.untyped_storage().nbytes() == pruned.keys.nbytes
    assert pruned.values.untyped_storage().nbytes() == pruned.values.nbytes
    alive = [pruned.keys, pruned.values, pruned.qbar]
    for store in (pruned.old_keys, pruned.old_values):
        alive += [getattr(store, f.name) for f in dataclasses.fields(store) if isinstance(getattr(store, f.name), torch.Tensor)]
    # the dense sliding-window layer counts the window it keeps, as measure_kv_cache_bytes does in a DynamicCache
    window = cache.layers[0].keys.nbytes + cache.layers[0].values.nbytes
    assert cache.memory_footprint()["held"] == _storage_bytes(alive) + window


def test_a_filled_cache_refuses_a_new_batch_clearly():
    for arch in ("llama", "gemma3"):  # gemma3's first layer is a sliding-window one
        model, _ = tiny_model(arch)
        cache = SparKCache(model.config, channel_ratio=0.5, recent_window=4)
        _greedy(model, _prompt(2, 30), cache)
        with pytest.raises(ValueError, match="holds 2 sequence.*batch of 1.*new cache"):
            _greedy(model, _prompt(1, 40, seed=1), cache)
        cache.reset()
        assert _greedy(model, _prompt(1, 40, seed=1), cache).shape == (1, 48)


def test_structured_cache_takes_its_settings_by_name_and_has_no_recovery():
    from hf_compress.recipe.steps.generation import _parse_cache

    model, _ = tiny_model("llama")
    cache = StructuredChannelCache(model.config, channel_ratio=0.5, recent_window=8, compression_interval=4)
    assert cache.settings["recent_window"] == 8 and cache.settings["recovery"] is False
    assert _parse_cache("step", {"method": "structured", "recent_window": 8})["recent_window"] == 8
    with pytest.raises(TypeError, match="recovery"):  # it was silently ignored: shared channels read as zeros
        StructuredChannelCache(model.config, recovery=True)


def test_footprint_counts_a_sliding_window_layer_as_measure_kv_cache_bytes_does():
    # A dense sliding-window layer (Gemma 3's local layers) is the same transformers layer in a SparKCache and in a
    # DynamicCache, so both measures must count it alike: after a prefill longer than the window it keeps the last
    # window - 1 tokens (a view of the prefill's states, until the next update). SparK counted the whole prompt there
    # and measure_kv_cache_bytes the window, so on Gemma-3-270M at 1024 tokens SparK at 50% read 1.65x dense.
    from hf_compress.evaluation import measure_kv_cache_bytes

    model, _ = tiny_model("gemma3")  # layer 0 slides over 32 tokens, layer 1 is pruned
    tokens = 4 * model.config.sliding_window
    dense = measure_kv_cache_bytes(model, tokens)["kv_bytes"]
    spark = SparKCache(model.config, channel_ratio=0.5, value_channel_ratio=0.5, recent_window=8)
    held = measure_kv_cache_bytes(model, tokens, cache=spark)["kv_bytes"]
    footprint = spark.memory_footprint()
    assert footprint["held"] == held
    assert footprint["dense_equivalent"] == dense  # what a DynamicCache holds for the same tokens, as measured
    assert held < dense  # half the full-attention layer's channels pruned: less than dense, whatever the window
    sliding = spark.layers[0]
    assert sliding.keys.shape[-2] == model.config.sliding_window - 1
    window_bytes = sliding.keys.nbytes + sliding.values.nbytes
    pruned = spark.layers[1].memory_footprint()
    assert footprint["held"] == pruned["held"] + window_bytes


def test_footprint_of_an_evicting_cache_compares_with_the_dense_cache_of_the_whole_prompt():
    # With SnapKV eviction (token_budget), dense_equivalent is what a DynamicCache holds for the same prompt: every
    # token seen. It counted the tokens left after eviction, so the ratio hid the eviction (0.99 on Gemma-3-270M at
    # 600 tokens with token_budget=128, when the cache held 0.84x the dense one).
    from hf_compress.evaluation import measure_kv_cache_bytes

    model, _ = tiny_model("gemma3")
    tokens = 100
    dense = measure_kv_cache_bytes(model, tokens)["kv_bytes"]
    spark = SparKCache(model.config, channel_ratio=0.5, token_budget=40, recent_window=4)
    held = measure_kv_cache_bytes(model, tokens, cache=spark)["kv_bytes"]
    assert spark.layers[1].held_tokens < tokens  # the full-attention layer evicted
    footprint = spark.memory_footprint()
    assert footprint["dense_equivalent"] == dense
    assert footprint["ratio"] == pytest.approx(held / dense)
