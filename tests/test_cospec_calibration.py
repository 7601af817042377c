"""A safe CoSpec arbiter: threshold calibration on held-out prompts, cheap oracle forks, label statistics."""

from __future__ import annotations

import logging

import pytest
import torch

from hf_compress.assets import tiny_model
from hf_compress.speculative.calibration import sweep_settings
from hf_compress.speculative.cospec import (
    ArbiterConfig,
    CoSpec,
    CoSpecArbiter,
    OracleLabels,
    calibrate_arbiter,
    collect_oracle_labels,
    fit_warm_start,
    oracle_label,
    quantile_thresholds,
    task_examples,
    train_arbiter,
)
from hf_compress.speculative.cospec.training import _cropped
from hf_compress.speculative.task_answers import generate_answer, prefix_cache

from test_cospec import PROMPTS, one_thread, pair, quick_settings  # noqa: F401  (fixtures: one thread, tiny pair)


# ------------------------------------------------------------------------------------ the sweep (pure)
class Recorder:
    """A fake held-out run: score and target forwards per threshold, remembering what was evaluated."""

    def __init__(self, scores: dict[float, float]):
        self.scores, self.calls = scores, []

    def __call__(self, threshold: float) -> dict[str, float]:
        self.calls.append(threshold)
        return {"score": self.scores[threshold], "target_forwards": int(100 * threshold)}


STRICT = {"score": 0.5, "target_forwards": 100}


def test_sweep_picks_the_loosest_qualifying_threshold_and_stops_at_the_first_miss():
    run = Recorder({0.9: 0.5, 0.7: 0.6, 0.5: 0.496, 0.3: 0.2, 0.1: 0.9})
    chosen, tried = sweep_settings(run, [[0.9, 0.7, 0.5, 0.3, 0.1]], STRICT, 0.99, describe=lambda t: {"threshold": t})
    assert chosen["loose"] and chosen["threshold"] == 0.5 and chosen["kept"] == pytest.approx(0.992)
    assert run.calls == [0.9, 0.7, 0.5, 0.3]  # 0.3 misses (40%): the looser 0.1 is never tried
    assert [r["loose"] for r in tried] == [False, True, True, True, True]


def test_sweep_falls_back_to_strict_when_nothing_qualifies():
    run = Recorder({0.9: 0.49, 0.5: 0.6})
    chosen, tried = sweep_settings(run, [[0.9, 0.5]], STRICT, 0.99)
    assert not chosen["loose"] and chosen["score"] == 0.5 and run.calls == [0.9] and len(tried) == 2
    # A qualifying setting that needs no fewer target forwards than strict is no gain: strict again.
    same_cost = lambda t: {"score": 0.5, "target_forwards": 100}
    assert not sweep_settings(same_cost, [[0.9]], STRICT, 0.99)[0]["loose"]
    with pytest.raises(ValueError, match="scores 0"):
        sweep_settings(run, [[0.9]], {"score": 0.0, "target_forwards": 10}, 0.99)


def test_sweep_with_confidence_needs_the_lower_bound_to_clear_the_target():
    """20 prompts: a setting that wins 2 and loses 1 (mean 104% of strict) qualifies on its mean, not on its 90%
    lower bound; one that changes no score has no spread and qualifies either way."""
    strict = {"score": 0.5, "scores": [1.0] * 10 + [0.0] * 10, "target_forwards": 100}
    noisy = [0.0] + [1.0] * 9 + [1.0, 1.0] + [0.0] * 8  # 11/20 = 0.55
    same = list(strict["scores"])
    results = {0.9: {"score": 0.5, "scores": same, "target_forwards": 90},
               0.5: {"score": 0.55, "scores": noisy, "target_forwards": 80}}
    run = lambda t: results[t]
    chosen, _ = sweep_settings(run, [[0.9, 0.5]], strict, 0.99)
    assert chosen["setting"] == 0.5
    chosen, tried = sweep_settings(run, [[0.9, 0.5]], strict, 0.99, confidence=0.9)
    assert chosen["setting"] == 0.9 and tried[1]["lower_bound"] == pytest.approx(0.5)
    difference, error = 0.05, (sum((d - 0.05) ** 2 for d in (-1.0, 1.0, 1.0) + (0.0,) * 17) / 19 / 20) ** 0.5
    assert tried[2]["lower_bound"] == pytest.approx(0.5 + difference - 1.2815516 * error)
    assert tried[2]["lower_bound"] < 0.99 * 0.5


def test_quantile_thresholds_keep_the_requested_shares():
    probabilities = torch.linspace(0.01, 0.99, 100)
    for share, threshold in zip((0.1, 0.5, 0.9), quantile_thresholds(probabilities, (0.1, 0.5, 0.9))):
        assert float((probabilities > threshold).float().mean()) == pytest.approx(share)
    assert quantile_thresholds(torch.zeros(0), (0.5,)) == []
    with pytest.raises(ValueError, match="keep_shares"):
        quantile_thresholds(probabilities, (0.0,))


# ------------------------------------------------------------------------------------ calibrate_arbiter
def warm_arbiter(model, tok) -> CoSpecArbiter:
    """An arbiter whose P(DRAFT) spreads over (0, 1), so quantile thresholds differ."""
    arbiter = CoSpecArbiter.for_model(model, ArbiterConfig(use_hidden_states=False), tok)
    features = torch.randn(64, arbiter.config.num_features, generator=torch.Generator().manual_seed(0))
    labels = (features[:, 0] > 0).float()
    fit_warm_start(arbiter, OracleLabels(features, labels), quick_settings(warm_start_steps=30))
    return arbiter


COMMON = dict(max_new_tokens=12, stop_at_newline=False, num_draft_tokens=4)


def test_calibrate_arbiter_refuses_no_candidates(pair):
    """An empty keep_shares left the arbiter strict (threshold 1.0) in silence."""
    model, tok, draft = pair
    arbiter = CoSpecArbiter.for_model(model, ArbiterConfig(use_hidden_states=False), tok)
    for kwargs in (dict(keep_shares=[]), dict(thresholds=()), dict(keep_shares=0.5)):
        with pytest.raises(ValueError, match="must be a non-empty list of candidates"):
            calibrate_arbiter(arbiter, model, draft, PROMPTS, 0.99, tokenizer=tok, **kwargs, **COMMON)
    with pytest.raises(TypeError, match="config must be an ArbiterConfig"):
        train_arbiter(model, "ngram", [{"prompt": "p", "answers": ["a"]}], tokenizer=tok, config={"threshold": 0.5})


def test_calibrate_arbiter_keeps_a_loose_threshold_when_the_score_allows(pair, tmp_path):
    model, tok, draft = pair
    arbiter = warm_arbiter(model, tok)
    held_out = [{"prompt": p, "answers": ["x"]} for p in PROMPTS]
    # Every answer scores 1: the loosest candidate (0.0 keeps every draft token) needs the fewest forwards.
    arbiter.calibrate(model, draft, held_out, 0.99, tokenizer=tok, reward=lambda text, answers: 1.0,
                      thresholds=(0.8, 0.0), **COMMON)
    report = arbiter.config.calibration
    assert arbiter.config.threshold == 0.0 and report["chosen"]["loose"] and report["chosen"]["threshold"] == 0.0
    assert report["chosen"]["target_forwards"] < report["tried"][0]["target_forwards"]  # fewer than strict
    assert [r["threshold"] for r in report["tried"]] == [1.0, 0.8, 0.0] and report["prompts"] == len(PROMPTS)
    # Saved and reloaded, the arbiter keeps its calibrated threshold and the record of the calibration.
    arbiter.save_pretrained(tmp_path / "arb")
    reloaded = CoSpecArbiter.from_pretrained(tmp_path / "arb")
    assert reloaded.config.threshold == 0.0 and reloaded.config.calibration == report
    features = torch.randn(16, arbiter.config.num_features, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(reloaded(features), arbiter(features))  # at threshold 0 generate ignores the weights
    ids = tok(PROMPTS[0], return_tensors="pt").input_ids
    assert torch.equal(model.generate(ids, max_new_tokens=12, do_sample=False, custom_generate=CoSpec(reloaded, draft)),
                       model.generate(ids, max_new_tokens=12, do_sample=False, custom_generate=CoSpec(arbiter, draft)))
    card = (tmp_path / "arb" / "README.md").read_text()
    assert "calibration" in card and "target_keep" in card


def test_calibrate_arbiter_falls_back_to_strict_and_then_decodes_greedily(pair, tmp_path):
    model, tok, draft = pair
    arbiter = warm_arbiter(model, tok)
    # Agreement with strict answers: keeping every random draft token changes the texts, so nothing qualifies.
    calibrate_arbiter(arbiter, model, draft, PROMPTS, 0.99, tokenizer=tok, thresholds=(0.0,), **COMMON)
    report = arbiter.config.calibration
    assert report["score"] == "agreement with strict" and report["tried"][1]["kept"] < 0.99
    assert arbiter.config.threshold == 1.0 and not report["chosen"]["loose"] and report["chosen"]["threshold"] == 1.0
    arbiter.save_pretrained(tmp_path / "strict")
    reloaded = CoSpecArbiter.from_pretrained(tmp_path / "strict")
    assert reloaded.config.threshold == 1.0
    for prompt in PROMPTS:  # threshold 1.0 is strict verification: the target's greedy output, token for token
        ids = tok(prompt, return_tensors="pt").input_ids
        assert torch.equal(model.generate(ids, max_new_tokens=12, do_sample=False, custom_generate=CoSpec(reloaded, draft)),
                           model.generate(ids, max_new_tokens=12, do_sample=False))


def test_default_candidates_come_from_the_held_out_mismatches(pair):
    model, tok, draft = pair
    arbiter = warm_arbiter(model, tok)
    held_out = [{"prompt": p, "answers": ["x"]} for p in PROMPTS]
    calibrate_arbiter(arbiter, model, draft, held_out, 0.99, tokenizer=tok, reward=lambda text, answers: 1.0,
                      keep_shares=(0.25, 0.75), **COMMON)
    report = arbiter.config.calibration
    thresholds = [r["threshold"] for r in report["tried"][1:]]
    assert report["mismatches_met"] > 0 and len(thresholds) == 2 and thresholds[0] > thresholds[1]
    assert arbiter.config.threshold == thresholds[-1]  # every answer passes: the loosest wins


def test_calibration_drafts_as_the_arbiter_was_trained_by_default(pair):
    """Without num_draft_tokens, the threshold is chosen for the arbiter's own drafting (what its saved folder runs),
    not CoSpec's default of 8."""
    model, tok, draft = pair
    arbiter = warm_arbiter(model, tok)
    arbiter.config.num_draft_tokens, arbiter.config.min_ngram_size = 2, 2
    held_out = [{"prompt": p, "answers": ["x"]} for p in PROMPTS[:2]]
    calibrate_arbiter(arbiter, model, draft, held_out, 0.99, tokenizer=tok, reward=lambda text, answers: 1.0,
                      thresholds=(0.0,), max_new_tokens=12, stop_at_newline=False)
    report = arbiter.config.calibration
    forwards = 0
    for prompt in PROMPTS[:2]:  # threshold 0.0 keeps every draft: forwards depend on how many are drafted
        strategy = CoSpec(arbiter, draft, threshold=0.0, num_draft_tokens=2)
        model.generate(tok(prompt, return_tensors="pt").input_ids, max_new_tokens=12, do_sample=False,
                       custom_generate=strategy)
        forwards += strategy.last_metrics.target_forwards
    assert report["tried"][1]["target_forwards"] == forwards
    assert report["num_draft_tokens"] == 2 and report["use_ngram"] is False and report["min_ngram_size"] == 2


def test_calibrate_arbiter_bad_input(pair):
    model, tok, draft = pair
    arbiter = warm_arbiter(model, tok)
    with pytest.raises(ValueError, match="target_keep"):
        calibrate_arbiter(arbiter, model, draft, PROMPTS, 1.5, tokenizer=tok)
    with pytest.raises(ValueError, match="thresholds"):
        calibrate_arbiter(arbiter, model, draft, PROMPTS, tokenizer=tok, thresholds=(1.0,), **COMMON)
    with pytest.raises(ValueError, match="confidence"):
        calibrate_arbiter(arbiter, model, draft, PROMPTS, tokenizer=tok, confidence=1.0, **COMMON)
    with pytest.raises(TypeError, match="CoSpecArbiter"):
        calibrate_arbiter(object(), model, draft, PROMPTS, tokenizer=tok)
    other, _ = tiny_model("llama", vocab_size=300)
    with pytest.raises(ValueError, match="hidden size 64 and 256 tokens"):
        calibrate_arbiter(arbiter, other, None, PROMPTS, tokenizer=tok)


# ------------------------------------------------------------------------------------ oracle labels
def test_forks_from_the_shared_prefix_cache_equal_forks_from_scratch(pair):
    model, tok, _ = pair
    ids = tok(PROMPTS[0], return_tensors="pt").input_ids
    sequence = generate_answer(model, ids, tok, max_new_tokens=10, stop_ids=[])
    cache = prefix_cache(model, sequence)
    for position in range(ids.shape[1], sequence.shape[0]):
        branch = torch.cat([sequence[:position], torch.tensor([7])]).unsqueeze(0)
        fork = _cropped(cache, position)
        assert fork is not None and fork.get_seq_length() == position
        assert torch.equal(generate_answer(model, branch, tok, max_new_tokens=6, stop_ids=[], cache=fork),
                           generate_answer(model, branch, tok, max_new_tokens=6, stop_ids=[]))
    assert cache.get_seq_length() == sequence.shape[0] - 1  # the shared cache itself is never cropped


def test_label_rules_and_harmless_statistics(pair):
    assert oracle_label(0.5, 0.5, False) == 0 and oracle_label(0.5, 0.5, False, rule="score") == 1
    assert oracle_label(0.0, 0.0, False, rule="score") == 0  # a tie at 0 says nothing about harm
    with pytest.raises(ValueError, match="rule"):
        oracle_label(0.5, 0.5, False, rule="bleu")
    model, tok, draft = pair
    arbiter = CoSpecArbiter.for_model(model, tokenizer=tok)
    examples = task_examples([{"prompt": p, "answers": ["x"]} for p in PROMPTS], tok)
    # A constant reward: every fork is harmless to the score, but (rule "answer") only same answers are DRAFT.
    data = collect_oracle_labels(model, CoSpec(arbiter, draft), examples, tok, lambda text, answers: 1.0, quick_settings())
    stats = data.statistics()
    assert stats["labels"] == len(data) > 0 and stats["harmless_share"] == 1.0
    assert stats["labels_where_target_scores"] == len(data) and stats["harmless_share_where_target_scores"] == 1.0
    assert stats["draft_share"] < 1.0
    scored = collect_oracle_labels(model, CoSpec(arbiter, draft), examples, tok, lambda text, answers: 1.0,
                                   quick_settings(label_rule="score"))
    assert scored.labels.tolist() == [1.0] * len(scored)


def test_train_arbiter_with_held_out_prompts_returns_a_calibrated_arbiter(pair):
    model, tok, draft = pair
    train = [{"prompt": p, "answers": ["x"]} for p in PROMPTS[:2]]
    held_out = [{"prompt": p, "answers": ["x"]} for p in PROMPTS[2:]]
    settings = quick_settings(max_new_tokens=8, max_forks_per_prompt=1, rl_steps=0, warm_start_steps=5)
    with pytest.raises(ValueError, match="target_keep"):
        train_arbiter(model, draft, train, tokenizer=tok, held_out=held_out, target_keep=0.0)
    # Malformed held-out prompts are refused before training starts (the reward would score its first answer).
    mixed = [held_out[0], {"prompt": PROMPTS[3], "answers": []}]
    untouched = lambda text, answers: pytest.fail("train_arbiter trained before checking held_out")
    with pytest.raises(ValueError, match="mixes items with reference answers and 1 without"):
        train_arbiter(model, draft, train, reward=untouched, tokenizer=tok, settings=settings, held_out=mixed)
    arbiter = train_arbiter(model, draft, train, reward=lambda text, answers: 1.0, tokenizer=tok, settings=settings,
                            config=ArbiterConfig(use_hidden_states=False), num_draft_tokens=4, held_out=held_out)
    report = arbiter.config.calibration
    assert report is not None and report["prompts"] == 2 and report["target_keep"] == 0.99
    assert arbiter.config.threshold == report["chosen"]["threshold"]



def test_a_failed_calibration_keeps_the_trained_arbiter(pair, caplog):
    """Calibration runs after the whole training: if it fails, the trained arbiter is returned (uncalibrated, with a
    warning saying why, which threshold it holds and how to calibrate later), not lost with the exception."""
    model, tok, draft = pair
    train = [{"prompt": p, "answers": ["x"]} for p in PROMPTS[:2]]
    held_out = [{"prompt": p, "answers": ["x"]} for p in PROMPTS[2:]]
    settings = quick_settings(max_new_tokens=6, max_forks_per_prompt=1, rl_steps=0, warm_start_steps=5)
    with caplog.at_level(logging.WARNING, logger="hf_compress"):
        arbiter = train_arbiter(model, draft, train, reward=lambda text, answers: 0.0, tokenizer=tok, settings=settings,
                                config=ArbiterConfig(use_hidden_states=False, threshold=0.7), num_draft_tokens=4,
                                held_out=held_out)  # the target scores 0 on held_out: nothing to calibrate against
    assert isinstance(arbiter, CoSpecArbiter) and arbiter.config.training["oracle_labels"] > 0  # the training is kept
    assert arbiter.config.calibration is None and arbiter.config.threshold == 0.7  # uncalibrated, as configured
    assert "scores 0" in arbiter.config.training["calibration_error"]
    assert "calibration on held_out failed" in caplog.text and "scores 0" in caplog.text
    assert "threshold 0.7" in caplog.text and "calibrate_arbiter" in caplog.text
    # Calibrating it later, on prompts the target answers, works on the returned arbiter.
    arbiter.calibrate(model, draft, held_out, 0.99, tokenizer=tok, reward=lambda text, answers: 1.0, max_new_tokens=6,
                      stop_at_newline=False)
    assert arbiter.config.calibration is not None and "calibration_error" not in arbiter.config.training
    # Training it again drops the calibration of its previous weights.
    again = train_arbiter(model, draft, train, reward=lambda text, answers: 0.0, tokenizer=tok, settings=settings,
                          arbiter=arbiter, num_draft_tokens=4)
    assert again.config.calibration is None


# ------------------------------------------------------------------------------------ devices
def journey_cospec_calibrate_and_label(device, tmp_path) -> None:
    """Oracle labels from the shared prefix cache, then a calibrated threshold, with every tensor on ``device``."""
    model, tok = tiny_model("llama")
    draft, _ = tiny_model("llama", seed=1)
    model.to(device), draft.to(device)
    arbiter = CoSpecArbiter.for_model(model, ArbiterConfig(use_hidden_states=True), tok)
    examples = task_examples([{"prompt": p, "answers": ["x"]} for p in PROMPTS[:2]], tok)
    data = collect_oracle_labels(model, CoSpec(arbiter, draft, num_draft_tokens=4), examples, tok,
                                 lambda text, answers: float(len(text) > 3), quick_settings(max_new_tokens=8))
    fit_warm_start(arbiter, data, quick_settings(warm_start_steps=5))
    assert arbiter.feature_mean.device.type == torch.device(device).type
    calibrate_arbiter(arbiter, model, draft, [{"prompt": p, "answers": ["x"]} for p in PROMPTS[2:]], tokenizer=tok,
                      reward=lambda text, answers: 1.0, keep_shares=(0.5,), **COMMON)
    assert arbiter.config.calibration["mismatches_met"] > 0 and arbiter.feature_mean.device.type == torch.device(device).type


def test_calibration_journey_creates_every_tensor_on_its_inputs_device(tmp_path):
    from test_device_guard import run_guarded  # the CPU-side guard of test_cuda.py's journeys

    run_guarded(journey_cospec_calibrate_and_label, tmp_path)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_calibration_journey_on_cuda(tmp_path):
    journey_cospec_calibrate_and_label("cuda", tmp_path)
