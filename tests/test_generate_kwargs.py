"""Common ``generate()`` keywords through hf_compress's decoding strategies, caches and routed/expert models.

Each combination either behaves as plain ``generate()`` would or is refused before any decoding with a message
that says what to do.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from transformers import GenerationConfig
from transformers.generation.streamers import BaseStreamer

from hf_compress.assets import tiny_model
from hf_compress.speculative.heads import Amphista, AmphistaConfig, AmphistaHeads


sys.path.insert(0, str(Path(__file__).parent))


class _Recorder(BaseStreamer):
    def __init__(self):
        self.chunks = []

    def put(self, value):
        self.chunks.append(value.reshape(-1).tolist())

    def end(self):
        pass


# ------------------------------------------------------------------------------------ drafting heads
def test_amphista_tree_refuses_batches_up_front_and_names_the_chain():
    model, tok = tiny_model("llama")
    tok.padding_side = "left"
    torch.manual_seed(0)
    heads = AmphistaHeads.for_model(model, AmphistaConfig(num_heads=3, num_attention_heads=2)).eval()
    tree = [[0], [1], [0, 0], [0, 1], [0, 0, 0]]
    batch = tok(["abcabc hello", "xy"], return_tensors="pt", padding=True)
    single = tok(["abcabc hello"], return_tensors="pt").input_ids
    calls = []
    handle = model.register_forward_pre_hook(lambda *args: calls.append(1))
    try:
        cases = [
            dict(**batch, max_new_tokens=6, do_sample=False),  # a batch
            dict(input_ids=single, max_new_tokens=6, do_sample=True, num_return_sequences=2),  # copies of one prompt
        ]
        for kwargs in cases:
            recorder = _Recorder()
            with pytest.raises(ValueError, match="tree='chain'"):
                model.generate(**kwargs, streamer=recorder, custom_generate=Amphista(heads, tree=tree))
            assert not calls  # refused before any forward
            assert len(recorder.chunks) == 1  # only the prompt, which generate() streams before the strategy runs
    finally:
        handle.remove()
    # The chain it names runs that batch, equal to greedy generate().
    out = model.generate(**batch, max_new_tokens=6, do_sample=False, custom_generate=Amphista(heads, tree="chain"))
    assert torch.equal(out, model.generate(**batch, max_new_tokens=6, do_sample=False))
    # One prompt with its tree still runs; beams are still refused by the common check.
    out = model.generate(single, max_new_tokens=6, do_sample=False, custom_generate=Amphista(heads, tree=tree))
    assert torch.equal(out, model.generate(single, max_new_tokens=6, do_sample=False))
    with pytest.raises(ValueError, match="beam search"):
        model.generate(single, max_new_tokens=6, num_beams=2, custom_generate=Amphista(heads, tree=tree))
    # A static cache cannot roll back either: the refusal does not send the user to the chain, which it refuses too.
    with pytest.raises(ValueError, match=r"a static cache cannot do\. Use the default dynamic cache"):
        model.generate(single, max_new_tokens=6, do_sample=False, cache_implementation="static",
                       custom_generate=Amphista(heads, tree=tree))
    with pytest.raises(ValueError, match=r"a static cache cannot do\. Use the default dynamic cache"):
        model.generate(single, max_new_tokens=6, do_sample=False, cache_implementation="static",
                       custom_generate=Amphista(heads, tree="chain"))


# ------------------------------------------------------------------------------------ expert router
@pytest.fixture(scope="module")
def expert_router():
    from test_experts import _two_adapter_router

    router, tokenizer = _two_adapter_router()
    tokenizer.padding_side = "left"
    return router, tokenizer


def _each_row_alone(router, batch, experts, **kwargs):
    rows = []
    try:
        for row, expert in enumerate(experts):
            router.model.set_adapter(router.adapter_names[expert])
            rows.append(router.model.generate(input_ids=batch.input_ids[row:row + 1],
                                              attention_mask=batch.attention_mask[row:row + 1], **kwargs))
    finally:
        router.model.set_adapter(router.adapter_names[0])
    return torch.cat(rows)


@pytest.mark.parametrize("path", ["stacked", "peft"])
def test_expert_router_takes_beams_from_a_generation_config(expert_router, path):
    router, tokenizer = expert_router
    batch = tokenizer(["3 + 4 = ", "Spell ABCDE: "], return_tensors="pt", padding=True)
    experts = [0, 1]
    config = GenerationConfig(max_new_tokens=5, num_beams=2, num_return_sequences=2, pad_token_id=0, eos_token_id=2)
    router.mixed_batch = path
    try:
        out = router.generate(**batch, experts=experts, generation_config=config)
    finally:
        router.mixed_batch = "stacked"
    assert torch.equal(out, _each_row_alone(router, batch, experts, generation_config=config))


def test_expert_router_takes_a_positional_generation_config(expert_router):
    router, tokenizer = expert_router
    batch = tokenizer(["3 + 4 = ", "Spell ABCDE: "], return_tensors="pt", padding=True)
    config = GenerationConfig(max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=2)
    # As model.generate(inputs, generation_config): the mask is then inferred from the padding.
    out = router.generate(batch.input_ids, config, experts=[0, 1])
    assert torch.equal(out, router.generate(**batch, experts=[0, 1], generation_config=config))
    with pytest.raises(TypeError, match="must be a tensor"):
        router.generate(batch.input_ids, {"max_new_tokens": 4}, experts=[0, 1])


def test_expert_router_sampled_copies_from_a_config_add_no_deprecated_keyword(expert_router):
    """transformers deprecates generation keywords next to a generation_config (logged once per process, so the
    keywords PeftModel.generate receives are checked instead)."""
    router, tokenizer = expert_router
    batch = tokenizer(["3 + 4 = ", "Spell ABCDE: "], return_tensors="pt", padding=True)
    config = GenerationConfig(do_sample=True, num_return_sequences=2, max_new_tokens=4, pad_token_id=0, eos_token_id=2)
    received, generate = [], router.model.generate

    def recording(*args, **kwargs):
        received.append(kwargs)
        return generate(*args, **kwargs)

    outputs = {}
    router.model.generate = recording
    try:
        for path in ("peft", "stacked"):
            router.mixed_batch = path
            torch.manual_seed(0)
            outputs[path] = router.generate(**batch, experts=[0, 1], generation_config=config)
    finally:
        del router.model.generate
        router.mixed_batch = "stacked"
    for kwargs in received:
        generation_keywords = set(kwargs) - {"input_ids", "attention_mask", "adapter_names", "generation_config"}
        assert not generation_keywords, generation_keywords
    assert outputs["peft"].shape[0] == 4 and torch.equal(outputs["peft"], outputs["stacked"])
    assert config.num_return_sequences == 2  # the caller's config is left as it was


# ------------------------------------------------------------------------------------ sharded models
@pytest.mark.parametrize("how", ["given", "zero3"])
def test_synced_gpus_given_or_set_by_generate_for_sharding_is_refused(how, monkeypatch):
    """Under DeepSpeed ZeRO-3 / FSDP over several processes generate() turns synced_gpus on by itself, but does not
    pass it to a custom_generate callable: the strategy must refuse (decoding on its own, the ranks would hang)."""
    import transformers.integrations.deepspeed as deepspeed

    from hf_compress.speculative import SpeculativeDecoding

    model, tok = tiny_model("llama")
    ids = tok(["abcabc"], return_tensors="pt").input_ids
    kwargs = {}
    if how == "given":
        kwargs["synced_gpus"] = True
    else:
        monkeypatch.setattr(deepspeed, "is_deepspeed_zero3_enabled", lambda: True)
        monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
        monkeypatch.setattr(torch.distributed, "get_world_size", lambda *args: 2)
    with pytest.raises(ValueError, match=r"synced_gpus=True \(given, or set by generate\(\) for DeepSpeed ZeRO-3"):
        model.generate(ids, max_new_tokens=4, do_sample=False, custom_generate=SpeculativeDecoding(), **kwargs)
