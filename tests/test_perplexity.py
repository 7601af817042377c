"""Perplexity, speed and memory measurements on tiny models, checked against hand computations."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from hf_compress.assets import tiny_model
from hf_compress.evaluation import (
    evaluate_perplexity,
    measure_generation_speed,
    measure_kv_cache_bytes,
    parameter_bytes,
    perplexity_record,
    token_windows,
    tokenize_stream,
)


DOCS = ["The quick brown fox jumps over the lazy dog. " * 6, "Pack my box with five dozen liquor jugs! " * 5]


def _hand_perplexity(model, ids: torch.Tensor, window: int) -> float:
    # One window at a time, one position at a time: the most literal reading of the definition.
    total, count = 0.0, 0
    for start in range(0, ids.numel() - window + 1, window):
        chunk = ids[start : start + window]
        with torch.no_grad():
            log_probs = torch.log_softmax(model(input_ids=chunk[None]).logits[0].double(), dim=-1)
        for position in range(window - 1):
            total -= log_probs[position, chunk[position + 1]].item()
            count += 1
    return math.exp(total / count)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_perplexity_equals_hand_computation(arch):
    model, tokenizer = tiny_model(arch)
    ids = torch.tensor(tokenizer("\n\n".join(DOCS), add_special_tokens=False)["input_ids"])
    result = evaluate_perplexity(model, tokenizer, DOCS, window=64, batch_size=3, progress=False)
    assert result["windows"] == ids.numel() // 64
    assert result["tokens"] == result["windows"] * 63
    assert result["perplexity"] == pytest.approx(_hand_perplexity(model, ids, 64), rel=1e-5)
    # Each window's own mean loss, in window order: the first one by hand, and their mean is the overall one.
    assert len(result["window_nlls"]) == result["windows"]
    assert result["window_nlls"][0] == pytest.approx(math.log(_hand_perplexity(model, ids[:64], 64)), rel=1e-5)
    assert sum(result["window_nlls"]) / result["windows"] == pytest.approx(result["nll"], rel=1e-9)


def test_score_last_scores_only_the_tail_of_each_window():
    model, tokenizer = tiny_model("llama")
    ids = torch.tensor(tokenizer("\n\n".join(DOCS), add_special_tokens=False)["input_ids"])
    full = evaluate_perplexity(model, tokenizer, DOCS, window=32, progress=False)
    assert evaluate_perplexity(model, tokenizer, DOCS, window=32, score_last=31, progress=False)["perplexity"] == \
        pytest.approx(full["perplexity"], rel=1e-6)
    tail = evaluate_perplexity(model, tokenizer, DOCS, window=32, score_last=8, batch_size=2, progress=False)
    assert tail["tokens"] == tail["windows"] * 8 and tail["score_last"] == 8
    total, count = 0.0, 0  # by hand: the last 8 predictions of each window, the whole window as input
    for start in range(0, ids.numel() - 31, 32):
        chunk = ids[start:start + 32]
        with torch.no_grad():
            log_probs = torch.log_softmax(model(input_ids=chunk[None]).logits[0].double(), dim=-1)
        for position in range(23, 31):
            total -= log_probs[position, chunk[position + 1]].item()
            count += 1
    assert tail["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)
    assert "last 8 tokens" in perplexity_record(tail, "wikipedia", "Wikipedia", "eval").metric_name
    with pytest.raises(ValueError, match="score_last=32 exceeds the 31 predicted tokens"):
        evaluate_perplexity(model, tokenizer, DOCS, window=32, score_last=32, progress=False)


def test_batch_size_does_not_change_perplexity():
    model, tokenizer = tiny_model("qwen2")
    one = evaluate_perplexity(model, tokenizer, DOCS, window=32, batch_size=1, progress=False)
    many = evaluate_perplexity(model, tokenizer, DOCS, window=32, batch_size=5, progress=False)
    assert many["perplexity"] == pytest.approx(one["perplexity"], rel=1e-5)
    assert many["window_nlls"] == pytest.approx(one["window_nlls"], rel=1e-5)


def test_token_windows_subset_is_even_and_fixed():
    stream = torch.arange(100)
    assert token_windows(stream, 10).shape == (10, 10)
    subset = token_windows(stream, 10, max_windows=3)
    assert subset[:, 0].tolist() == [0, 40, 90]  # first, middle, last window
    with pytest.raises(ValueError, match="fewer than one window"):
        token_windows(torch.arange(5), 10)
    with pytest.raises(ValueError, match="at least 2"):
        token_windows(stream, 1)


def test_tokenize_stream_caches_and_rejects_a_bare_string():
    _, tokenizer = tiny_model("llama")
    assert tokenize_stream(DOCS, tokenizer) is tokenize_stream(list(DOCS), tokenizer)
    with pytest.raises(TypeError, match="list of documents"):
        tokenize_stream("just one string", tokenizer)
    # The element type is named (the message said "got list" to a list of bytes or of dicts).
    with pytest.raises(TypeError, match=r"got a list holding bytes \(decode bytes first"):
        tokenize_stream([b"raw text"], tokenizer)
    with pytest.raises(TypeError, match="got a list holding NoneType"):
        tokenize_stream(["fine", None], tokenizer)


def test_the_token_cache_tells_tokenizers_with_one_vocabulary_apart():
    from tokenizers import normalizers

    _, tokenizer = tiny_model("llama")
    lowering = copy.deepcopy(tokenizer)
    lowering.backend_tokenizer.normalizer = normalizers.Lowercase()  # same vocabulary, other ids for "Hello"
    docs = ["Hello World, again."]
    assert tokenize_stream(docs, tokenizer).tolist() == tokenizer("Hello World, again.", add_special_tokens=False).input_ids
    assert tokenize_stream(docs, lowering).tolist() == lowering("Hello World, again.", add_special_tokens=False).input_ids
    assert tokenize_stream(docs, lowering).tolist() != tokenize_stream(docs, tokenizer).tolist()


def test_a_window_past_learned_positions_is_refused():
    model, tokenizer = tiny_model("gpt2")
    with pytest.raises(ValueError, match="learned positions for 512 only"):
        evaluate_perplexity(model, tokenizer, DOCS, window=600)


def test_perplexity_record_shape():
    record = perplexity_record(
        {"perplexity": 12.3456789, "window": 64, "windows": 3, "tokens": 189, "max_windows": None},
        "wikipedia", "English Wikipedia excerpt", "eval",
    )
    assert record.metric_type == "perplexity" and record.metric_value == 12.3457
    assert record.settings["tokens"] == 189


def test_parameter_bytes_counts_tied_weights_once():
    tied, _ = tiny_model("llama", tie_word_embeddings=True)
    untied, _ = tiny_model("llama", tie_word_embeddings=False)
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    assert untied.lm_head.weight is not untied.model.embed_tokens.weight
    embedding_bytes = tied.model.embed_tokens.weight.numel() * 4
    assert parameter_bytes(tied)["parameters"] == parameter_bytes(untied)["parameters"] - embedding_bytes


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_kv_cache_bytes_match_config(arch):
    model, _ = tiny_model(arch)
    config = model.config
    result = measure_kv_cache_bytes(model, seq_len=48)
    layers = config.num_hidden_layers
    per_token_layer = 2 * config.num_key_value_heads * config.head_dim * 4  # keys + values, fp32
    if arch == "gemma3":
        # The sliding layer keeps only the last `sliding_window - 1` tokens: the next query completes its window.
        expected = per_token_layer * (48 + config.sliding_window - 1)
    else:
        expected = per_token_layer * 48 * layers
    assert result["kv_bytes"] == expected


def test_a_batch_passed_as_one_prompt_is_refused():
    model, tokenizer = tiny_model("llama")
    with pytest.raises(ValueError, match=r"one sequence of token ids.*got shape \[2, 4\]"):
        measure_generation_speed(model, tokenizer, [torch.ones(2, 4, dtype=torch.long)], max_new_tokens=2, warmup=0,
                                 progress=False)


def test_generation_speed_reports_median_and_outputs(monkeypatch):
    from hf_compress.evaluation import speed

    class ScriptedClock:  # each prompt's clock ticks at its own pace: 1 s, 2 s, then 10 s per reading
        ticks = iter([1.0] * 7 + [2.0] * 7 + [10.0] * 7)  # 7 readings per call: start, 5 tokens, end
        now = 0.0

        @classmethod
        def perf_counter(cls):
            cls.now += next(cls.ticks)
            return cls.now

    model, tokenizer = tiny_model("llama")
    monkeypatch.setattr(speed, "time", ScriptedClock)
    prompts = ["abc", "hello", "the cat"]
    result = measure_generation_speed(model, tokenizer, prompts, max_new_tokens=5, warmup=0, progress=False,
                                      force_length=True)
    monkeypatch.undo()
    assert result["prompts"] == 3 and result["new_tokens"] == [5, 5, 5] and all(len(o) == 5 for o in result["outputs"])
    assert result["seconds"] == [6.0, 12.0, 60.0]
    assert result["per_prompt"] == [5 / 6, 5 / 12, 5 / 60] and result["tokens_per_second"] == 5 / 12  # the median
    # After the first token: 4 tokens between the first and the last token's timestamps.
    assert result["decode_per_prompt"] == [4 / 4, 4 / 8, 4 / 40] and result["decode_tokens_per_second"] == 0.5
    checked = measure_generation_speed(model, tokenizer, prompts[:2], max_new_tokens=5, warmup=0, progress=False,
                                       force_length=True, reference=[result["outputs"][0], [0] * 5])
    assert checked["equal_to_reference"] == [True, False] and not checked["all_equal_to_reference"]
    with pytest.raises(ValueError, match="prompts is empty"):
        measure_generation_speed(model, tokenizer, [])


def test_compare_generation_speed_times_variants_side_by_side(monkeypatch):
    from hf_compress.evaluation import compare_generation_speed
    from hf_compress.utils import InvalidArgumentTypeError

    model, tokenizer = tiny_model("llama")
    prompts = ["abc", "hello", "the cat"]
    alone = measure_generation_speed(model, tokenizer, prompts, max_new_tokens=4, warmup=0, progress=False,
                                     repetition_penalty=1.3)
    calls = []
    original = model.generate

    def recording(*args, **kwargs):
        calls.append("penalised" if kwargs.get("repetition_penalty") else "plain")
        return original(*args, **kwargs)

    monkeypatch.setattr(model, "generate", recording)
    both = compare_generation_speed(model, tokenizer, prompts, {"plain": {}, "penalised": {"repetition_penalty": 1.3}},
                                    max_new_tokens=4, warmup=1, progress=False)
    # Warm-up on the first prompt, then every prompt through both variants, the first one rotating.
    assert calls == ["plain", "penalised", "plain", "penalised", "penalised", "plain", "plain", "penalised"]
    assert both["penalised"]["outputs"] == alone["outputs"]  # each variant keeps its own settings
    assert both["plain"]["outputs"] != both["penalised"]["outputs"]
    assert all(len(r["seconds"]) == 3 and r["prompts"] == 3 for r in both.values())
    with pytest.raises(InvalidArgumentTypeError, match="non-empty mapping"):
        compare_generation_speed(model, tokenizer, prompts, {})
    with pytest.raises(InvalidArgumentTypeError, match=r"variants\['x'\] must be a mapping"):
        compare_generation_speed(model, tokenizer, prompts, {"x": 1})


def test_benchmark_files_and_rebuilt_table_keep_the_run_footer(tmp_path):
    from hf_compress.evaluation.report import rewrite_markdown, write_benchmark

    json_path, md_path = write_benchmark("demo", {"window": 512}, {"ppl": 21.1}, "| ppl |\n|---|\n| 21.1 |",
                                         results_dir=tmp_path)
    payload = json.loads(json_path.read_text())
    assert payload["results"] == {"ppl": 21.1} and payload["settings"] == {"window": 512}
    first = md_path.read_text()
    assert first.startswith("| ppl |") and f"Command: `{payload['command']}`" in first
    rewrite_markdown("demo", lambda stored: f"| perplexity |\n|---|\n| {stored['results']['ppl']} |", results_dir=tmp_path)
    rebuilt = md_path.read_text()
    assert rebuilt.startswith("| perplexity |") and f"Date: {payload['date']}" in rebuilt
    assert "Table rebuilt from demo.json" in rebuilt
    with pytest.raises(FileNotFoundError):
        rewrite_markdown("missing", lambda stored: "x", results_dir=tmp_path)


def test_a_copy_without_history_names_its_commit_and_a_note_reaches_the_table(tmp_path, monkeypatch):
    from hf_compress.evaluation.report import rewrite_markdown, source_commit, write_benchmark

    monkeypatch.setenv("HF_COMPRESS_SOURCE_COMMIT", "0123abc")
    assert source_commit.__wrapped__() == "0123abc"  # the cached value of this process is left alone
    json_path, _ = write_benchmark("demo", {}, {"ppl": 1.0}, "| ppl |", results_dir=tmp_path)
    payload = json.loads(json_path.read_text())
    payload["commit_note"] = "set from the staged commit"
    json_path.write_text(json.dumps(payload))
    rebuilt = rewrite_markdown("demo", lambda stored: "| ppl |", results_dir=tmp_path).read_text()
    assert "Commit note: set from the staged commit" in rebuilt


def test_a_fresh_results_table_does_not_make_the_code_dirty(tmp_path):
    """One benchmark's new table (a tracked file under bench/results/) must not mark the next benchmark's code dirty."""
    import subprocess

    from hf_compress.evaluation.report import _git_commit

    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)

    (tmp_path / "bench" / "results").mkdir(parents=True)
    (tmp_path / "bench" / "results" / "a.md").write_text("old table")
    (tmp_path / "code.py").write_text("x = 1")
    git("init", "-q")
    git("add", ".")
    git("commit", "-q", "-m", "start")
    sha = _git_commit(tmp_path)
    assert sha is not None and not sha.endswith("+dirty")
    (tmp_path / "bench" / "results" / "a.md").write_text("new table")
    assert _git_commit(tmp_path) == sha
    (tmp_path / "notes.txt").write_text("an untracked note says nothing about the code")
    (tmp_path / "bench" / "results" / "b.md").write_text("a new table, not committed yet")
    assert _git_commit(tmp_path) == sha
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "bench_new.py").write_text("print(1)")  # a new benchmark script ran, uncommitted
    assert _git_commit(tmp_path) == sha + "+dirty"
    (tmp_path / "scripts" / "bench_new.py").unlink()
    (tmp_path / "code.py").write_text("x = 2")
    assert _git_commit(tmp_path) == sha + "+dirty"


def test_speed_ratio_pairs_rounds_and_falls_back_to_medians_for_a_cut_run():
    from hf_compress.evaluation import speed_ratio

    # The machine speeds up over the run; per round the variant is always half as fast.
    assert speed_ratio([4.0, 6.0, 9.0], [8.0, 12.0, 18.0]) == 0.5
    # Ratio of the medians there would be 6 / 12 too, but not when the reference's middle round is an outlier:
    assert speed_ratio([4.0, 6.0, 9.0], [8.0, 30.0, 18.0]) == 0.5
    assert speed_ratio([4.0, 6.0], [8.0, 30.0, 18.0]) == 5.0 / 18.0  # counts differ: medians
    with pytest.raises(ValueError, match="at least one round"):
        speed_ratio([], [1.0])
