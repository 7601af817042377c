#!/usr/bin/env python
"""Channel permutation for N:M sparsity → bench/results/<output-name>.{json,md}.

For every permutation (none; RIA's heuristic reallocation; RIA refined by greedy channel swaps, "swap";
the learned permutation of arXiv 2601.22980, here block by block from RIA's start; optionally the
PermLLM-style block-diagonal one) the dense model
is permuted once (``permute_for_pruning``: statistics, choice or training, absorption into the
weights), then every pruner (Wanda, SparseGPT, SDS — in that order, so a run cut short still has the
first pruners complete) prunes a fresh copy of each permuted dense model with the same calibration
windows, exactly what ``Config(permutation=...)`` does inside ``prune()`` (the permutation is learned
once per variant and shared by the pruners, so each variant trains once). Each pruned model is saved
sparse (size on disk: the permuted checkpoint is an ordinary N:M one), scored on the Wikipedia eval
split with per-window standard errors (differences to "none" are paired over the same windows) and,
with ``--zero-shot-limit``, on zero-shot tasks (average of lm-eval's metric of record, ± its standard
error over examples).

Usage:
    python scripts/bench_permutation.py                          # the CPU-sized run (about 60 min on 2 quiet cores)
    python scripts/bench_permutation.py --calibration-sequences 128 --seq-len 512 --max-windows 64 \\
        --train-seconds 2700 --patterns 2:4 4:8 --zero-shot-limit 500   # the issue's full setting
    python scripts/bench_permutation.py --pruners wanda --permutations none ria swap --calibration-sequences 128 \\
        --seq-len 512 --max-windows 64 --zero-shot-tasks arc_easy piqa hellaswag \\
        --zero-shot-limit 500 --output-name permutation-wanda-full   # Wanda at the issue's protocol (~1 h)
    python scripts/bench_permutation.py --pruners sparsegpt --permutations none swap --calibration-sequences 128 \\
        --seq-len 512 --max-windows 64 --output-name permutation-sparsegpt-full   # (~35 min)
    python scripts/bench_permutation.py --pruners wanda --permutations none ria swap --calibration-sequences 128 \
        --seq-len 512 --max-windows 64 --eval-text news --output-name permutation-wanda-news   # other text (~40 min)
    python scripts/bench_permutation.py --quick                  # tiny model, smoke run
    python scripts/bench_permutation.py --render permutation     # rebuild permutation.md from permutation.json
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from hf_compress.assets import load_model, load_text
from hf_compress.evaluation.memory import disk_bytes
from hf_compress.evaluation.perplexity import token_windows, tokenize_stream
from hf_compress.evaluation.report import benchmark_parser, start_benchmark, write_benchmark
from hf_compress.evaluation.uncertainty import average_standard_error, paired_difference, standard_error
from hf_compress.evaluation.zero_shot import evaluate_zero_shot
from hf_compress.modeling import calibration_batches
from hf_compress.pruning import PRUNERS, LearnedPermutationConfig, PruningConfig, SwapPermutationConfig
from hf_compress.pruning.permutation import (
    check_permutation,
    parse_permutation,
    permutation_to_json,
    permute_for_pruning,
)
from hf_compress.pruning.permutation.selection import window_losses
from hf_compress.pruning.storage import save_pruned

logger = logging.getLogger("bench_permutation")

PRUNER_OPTIONS = {"wanda": ("wanda", {}), "sparsegpt": ("sparsegpt", {}),
                  "sds": ("sds", {"base": "wanda", "redense_epochs": 1})}


def main() -> None:
    parser = benchmark_parser(__doc__, "permutation", threads=2, devices=("cpu", "cuda"))
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--pruners", nargs="+", default=list(PRUNER_OPTIONS), choices=sorted(PRUNER_OPTIONS))
    parser.add_argument("--permutations", nargs="+", default=["none", "ria", "swap", "learned"],
                        choices=["none", "ria", "swap", "permllm", "learned"])
    parser.add_argument("--patterns", nargs="+", default=["2:4"])
    parser.add_argument("--calibration-sequences", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--max-windows", type=int, default=16, help="evenly spaced 512-token eval windows")
    parser.add_argument("--eval-text", choices=["wikipedia", "news"], default="wikipedia",
                        help="perplexity text: the Wikipedia eval split, or the news text (another source than "
                             "the Wikipedia calibration)")
    parser.add_argument("--train-seconds", type=float, default=600.0, help="wall-time budget per learned variant")
    parser.add_argument("--swap-seconds", type=float, default=None,
                        help="optional wall-time cap on the swap search (default: none, run to convergence, so the "
                             "permutation does not depend on this machine's speed)")
    parser.add_argument("--zero-shot-tasks", nargs="+", default=["arc_easy", "piqa", "hellaswag"])
    parser.add_argument("--zero-shot-limit", type=int, default=0, help="seeded examples per task (0: no zero-shot)")
    parser.add_argument("--learned-options", type=json.loads, default={},
                        help="LearnedPermutationConfig fields of the 'learned' variant (JSON)")
    parser.add_argument("--permllm-options", type=json.loads, default={},
                        help="LearnedPermutationConfig fields of the 'permllm' variant (JSON)")
    args = parser.parse_args()
    if not start_benchmark(args, lambda payload: _markdown(payload["settings"], payload["results"])):
        return
    if args.quick:
        args.model, args.calibration_sequences, args.seq_len, args.max_windows = "tiny-llama", 4, 64, 2
        args.train_seconds = args.swap_seconds = 10.0
        args.zero_shot_limit = min(args.zero_shot_limit, 8)
        args.learned_options = {"groups": 2, **args.learned_options}
        args.permllm_options = {"block_size": 16, **args.permllm_options}

    model, tokenizer = load_model(args.model)
    calibration = calibration_batches(load_text("wikipedia", "calibration"), tokenizer,
                                      num_sequences=args.calibration_sequences, seq_len=args.seq_len, seed=0)
    eval_text = load_text("wikipedia", "eval") if args.eval_text == "wikipedia" else load_text("news")
    windows = token_windows(tokenize_stream(eval_text, tokenizer), 512, args.max_windows)
    settings = {"model": args.model, "device": args.device, "pruners": args.pruners,
                "pruner_options": {p: PRUNER_OPTIONS[p][1] for p in args.pruners},
                "calibration": {"sequences": args.calibration_sequences, "seq_len": args.seq_len,
                                "text": "wikipedia calibration split", "seed": 0},
                "evaluation": {"windows": int(windows.shape[0]), "window": 512,
                               "text": "wikipedia eval split" if args.eval_text == "wikipedia" else "news",
                               "zero_shot_tasks": args.zero_shot_tasks if args.zero_shot_limit else [],
                               "zero_shot_limit": args.zero_shot_limit},
                "train_seconds": args.train_seconds, "swap_seconds": args.swap_seconds}
    model.to(args.device)
    results: dict[str, Any] = {"dense": {**_perplexity(model, windows), **_zero_shot(args, model, tokenizer)},
                               "permutations": {}, "rows": []}
    logger.info("dense perplexity %.2f", results["dense"]["perplexity"])
    del model

    with tempfile.TemporaryDirectory(prefix="bench_permutation_") as states:
        for pattern in args.patterns:
            for kind in args.permutations:  # each permutation once, its permuted dense weights kept on disk
                permutation = _permutation(kind, args)
                info = _permuted_dense(args, pattern, permutation, calibration, Path(states) / f"{pattern}-{kind}.pt")
                results["permutations"][f"{pattern} {kind}"] = {"config": _json(permutation), **info}
                _write(args, settings, results)
            for pruner_name, kind in itertools.product(args.pruners, args.permutations):
                method, options = PRUNER_OPTIONS[pruner_name]
                config = PruningConfig.from_dict({
                    "method": method, "sparsity": pattern,
                    "num_calibration_sequences": args.calibration_sequences,
                    "calibration_seq_len": args.seq_len, **options})
                row = _prune_and_evaluate(args, config, Path(states) / f"{pattern}-{kind}.pt", calibration,
                                          windows)
                info = results["permutations"][f"{pattern} {kind}"]
                row.update({"pattern": pattern, "pruner": pruner_name, "permutation": kind,
                            "permutation_seconds": info.get("seconds", 0.0)})
                results["rows"].append(row)
                _write(args, settings, results)
    _write(args, settings, results)


def _permutation(kind: str, args) -> Any:
    if kind == "learned":
        return LearnedPermutationConfig(**{"max_train_seconds": args.train_seconds, "swap_seconds": args.swap_seconds,
                                           **args.learned_options})
    if kind == "permllm":
        return LearnedPermutationConfig.permllm(**{"max_train_seconds": args.train_seconds, **args.permllm_options})
    if kind == "swap":
        return SwapPermutationConfig(max_seconds=args.swap_seconds)
    return parse_permutation(kind)


def _json(permutation: Any) -> Any:
    return permutation_to_json(permutation)


def _permuted_dense(args, pattern: str, permutation: Any, calibration: torch.Tensor, path: Path) -> dict[str, Any]:
    """Save the dense model's state dict after the permutation step (as ``prune()`` runs it); return the step's report."""
    model, _ = load_model(args.model)
    model.to(args.device)
    if permutation is None:
        torch.save(model.state_dict(), path)
        return {}
    config = PruningConfig.from_dict({"method": "wanda", "sparsity": pattern, "permutation": _json(permutation),
                                      "num_calibration_sequences": args.calibration_sequences,
                                      "calibration_seq_len": args.seq_len})
    logger.info("=== permutation %s %s", pattern, _json(permutation))
    sites = check_permutation(model, config)
    # progress: a converged swap search runs for many minutes (its bar counts the sites done)
    report = permute_for_pruning(model, config, sites, calibration, progress=True)
    torch.save(model.state_dict(), path)
    return report.to_dict()


def _prune_and_evaluate(args, config, state_path: Path, calibration, windows) -> dict[str, Any]:
    model, tokenizer = load_model(args.model)
    model.load_state_dict(torch.load(state_path))
    model.to(args.device)
    pruner = PRUNERS[config.method](model, tokenizer)
    logger.info("=== prune %s %s", config.method, config.sparsity)
    start = time.perf_counter()
    pruner.prune(config, calibration, progress=False)
    seconds = time.perf_counter() - start
    row: dict[str, Any] = {"config": config.to_dict(), "prune_seconds": seconds,
                           "overall_sparsity": pruner.report.overall_sparsity}
    with tempfile.TemporaryDirectory() as folder:
        save_pruned(model, tokenizer, Path(folder) / "model", recipe=config)
        saved = json.loads((Path(folder) / "model" / "config.json").read_text())
        row["storage_ratio"] = saved["quantization_config"]["storage"]["ratio"]
        row["disk_bytes"] = disk_bytes(Path(folder) / "model", "*.safetensors")
    row.update(_perplexity(model, windows))
    row.update(_zero_shot(args, model, tokenizer))
    logger.info("%s: perplexity %.2f", config.method, row["perplexity"])
    return row


def _zero_shot(args, model, tokenizer) -> dict[str, Any]:
    """Zero-shot average (lm-eval's metric of record per task) ± its standard error; empty without a limit."""
    if not args.zero_shot_limit:
        return {}
    start = time.perf_counter()
    scores = evaluate_zero_shot(model, tokenizer, tuple(args.zero_shot_tasks), limit=args.zero_shot_limit,
                                batch_size=16, progress=False)
    tasks = args.zero_shot_tasks
    errors = [scores[t][f"{scores[t]['metric']}_stderr"] or 0.0 for t in tasks]
    return {"zero_shot": {t: {"score": scores[t]["score"], "stderr": errors[i], "n": scores[t]["n"],
                              "metric": scores[t]["metric"]} for i, t in enumerate(tasks)},
            "zero_shot_average": scores["average"]["score"],
            "zero_shot_stderr": average_standard_error(errors),
            "zero_shot_seconds": time.perf_counter() - start}


@torch.no_grad()
def _perplexity(model, windows: torch.Tensor) -> dict[str, Any]:
    """Perplexity over equal-length windows with the per-window mean NLLs (for standard errors and pairing)."""
    start = time.perf_counter()
    model.eval()
    per_window = window_losses(model, windows, batch_size=1).tolist()  # one window at a time: its logits are 100 MB
    mean = statistics.fmean(per_window)
    stderr = standard_error(per_window) or 0.0
    return {"perplexity": math.exp(mean), "perplexity_stderr": math.exp(mean) * stderr,
            "window_nll": per_window, "eval_seconds": time.perf_counter() - start}


def _paired(row: dict[str, Any], base: dict[str, Any]) -> tuple[float, float]:
    """Relative perplexity change vs ``base`` and its standard error, paired over the same windows."""
    mean, stderr = paired_difference(row["window_nll"], base["window_nll"])
    return math.exp(mean) - 1.0, math.exp(mean) * stderr


def _write(args, settings, results) -> None:
    write_benchmark(args.output_name, settings, results, _markdown(settings, results))


_TEXT_NAMES = {"wikipedia eval split": "Wikipedia eval split",
               "news": "news text (another source than the Wikipedia calibration)"}


def _markdown(settings: dict[str, Any], results: dict[str, Any]) -> str:
    calibration, evaluation = settings["calibration"], settings["evaluation"]
    dense = results["dense"]
    lines = [
        f"# Channel permutation for N:M sparsity: {settings['model']} on {settings['device']}",
        "",
        f"Calibration {calibration['sequences']} × {calibration['seq_len']} tokens (Wikipedia calibration split, "
        f"seed 0); perplexity on {evaluation['windows']} evenly spaced 512-token windows of the "
        f"{_TEXT_NAMES.get(evaluation['text'], evaluation['text'])} (± standard error over windows); Δ vs none is "
        f"paired over the same windows (± its standard "
        f"error). Dense: {dense['perplexity']:.2f} ± {dense['perplexity_stderr']:.2f}. Pruners: "
        f"{', '.join(settings['pruners'])}{' (SDS on Wanda, 1 re-dense epoch)' if 'sds' in settings['pruners'] else ''}. "
        + (f"Each learned variant trains once (≤ {settings['train_seconds']:.0f} s wall time, Wanda mask generator) "
         "and is shared by the pruners. " if any(key.split()[-1] in ("learned", "permllm") for key in results["permutations"])
         else "") + _zero_shot_setting(settings, dense),
        "",
        "| pattern | pruner | permutation | ppl | Δ vs none | zero-shot avg | Δ zero-shot vs none "
        "| kept score (vs identity) | perm. s | prune s | linear bytes (× dense) | disk MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        base = _sibling_row(row, results["rows"], "none")
        delta = ""
        if base is not None and base is not row:
            change, stderr = _paired(row, base)
            delta = f"{100 * change:+.1f}% ± {100 * stderr:.1f}"
        info = results["permutations"].get(f"{row['pattern']} {row['permutation']}", {})
        kept = (f"{info['kept_score']:.2f} ({info['kept_score'] - info['kept_score_identity']:+.2f})"
                if "kept_score" in info else "")
        zero_shot, zero_shot_delta = _zero_shot_cells(row, base)
        lines.append(
            f"| {row['pattern']} | {row['pruner']} | {row['permutation']} | {row['perplexity']:.2f} ± "
            f"{row['perplexity_stderr']:.2f} | {delta} | {zero_shot} | {zero_shot_delta} | {kept} | "
            f"{row['permutation_seconds']:.0f} | {row['prune_seconds']:.0f} | {row['storage_ratio']:.3f} | "
            f"{row['disk_bytes'] / 2**20:.1f} |"
        )
    searches = {k: v["swap_search"] for k, v in results["permutations"].items() if v.get("swap_search")}
    if searches:
        lines += [""] + [
            f"Channel-swap search ({name}): {search['passes']} passes over the sites in {search['seconds']:.0f} s; "
            + ("converged on every site (no exchange left to gain), so the permutation does not depend on the "
               "machine's speed." if not search["unconverged_sites"] else
               f"{search['unconverged_sites']} sites stopped by the budget while an exchange still gained (the "
               "permutation depends on this machine's speed).")
            for name, search in searches.items()]
    learned = {k: v for k, v in results["permutations"].items() if v.get("training")}
    if learned:
        lines += ["", "## Training of the learned permutations", "",
                  "Objective: the learner's loss of the Hungarian permutations on fixed windows (block: mean relative "
                  "reconstruction error of the decoder blocks on dense inputs), scored at the start (the `init` "
                  "permutation) and every few steps; the best by `selection` is kept (below). Kept score: the "
                  "Wanda-metric score the N:M mask keeps (see the table above).", "",
                  "| pattern / variant | objective | steps | train s | s / step | cost parameters | objective start → "
                  "best (step) | kept score start → final | loss first → last | loss curve (step: loss) |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for name, info in learned.items():
            training = info["training"]
            curve = training["loss_curve"] or [[0, float("nan")]]
            shown = ", ".join(f"{step}: {loss:.3g}" for step, loss in curve[:: max(1, len(curve) // 8)])
            where = ", held-out windows" if training.get("selection_windows") == "held-out" else ""
            objective = (f"{training['objective_initial']:.5f} → {training['objective_best']:.5f} "
                         f"({training['best_step']}{where})" if "objective_best" in training else "")
            kept = (f"{training['kept_score_initial']:.2f} → {info['kept_score']:.2f}"
                    if "kept_score_initial" in training else "")
            lines.append(f"| {name} | {training.get('objective', '')} | {training['steps']} | "
                         f"{training['train_seconds']:.0f} | {training['train_seconds'] / max(1, training['steps']):.1f} | "
                         f"{training['cost_parameters']:,} | {objective} | {kept} | "
                         f"{curve[0][1]:.3g} → {curve[-1][1]:.3g} | {shown} |")
        for name, info in learned.items():  # the keep-best scores: did the hard permutation move, and where to?
            training = info["training"]
            selection_curve = "selection_curve" if "selection_curve" in training else "pruned_ce_curve"  # older runs
            for key, label in (("objective_curve", "Objective"),
                               (selection_curve, f"Selection score ({training.get('selection', 'pruned_ce')})")):
                points = training.get(key) or []
                if len(points) > 1:
                    shown = ", ".join(f"{step}: {value:.5f}" for step, value in points[:: max(1, len(points) // 12)])
                    lines += ["", f"{label} of the Hungarian permutations, {name} (step: value): {shown}."]
            if "selection_margin" in training:
                lead = (f"it leads the start by {training['selection_lead']:.5f} ± {training['selection_lead_stderr']:.5f}"
                        if training["best_step"] else "nothing beat the start")
                lines += ["", f"Kept: the permutation of step {training['best_step']} by {training['selection']} on "
                          f"{training.get('selection_windows', '')} windows ({lead}; a candidate must lead by more than "
                          f"{training['selection_margin']:g} paired standard errors; {training['selection_rejected']} "
                          "lower means inside that were rejected)."]
            elif training.get("selection"):
                lines += ["", f"Kept: the permutation of step {training['best_step']}, the lowest "
                          f"{training['selection']} (`selection`)."]
    lines += ["", "## Targets (issue 22)", ""] + _targets(results["rows"], results["permutations"])
    return "\n".join(lines)


def _zero_shot_setting(settings: dict[str, Any], dense: dict[str, Any]) -> str:
    evaluation = settings["evaluation"]
    if not evaluation.get("zero_shot_limit"):
        return "Zero-shot: not run."
    return (f"Zero-shot: {', '.join(evaluation['zero_shot_tasks'])}, the first {evaluation['zero_shot_limit']} "
            "seeded examples of each (lm-eval prompts, acc_norm), averaged; ± standard error over examples; Δ's "
            "error is unpaired (√(SE₁² + SE₂²)). Dense: "
            f"{100 * dense['zero_shot_average']:.1f} ± {100 * dense['zero_shot_stderr']:.1f}.")


def _zero_shot_cells(row: dict[str, Any], base: dict[str, Any] | None) -> tuple[str, str]:
    if "zero_shot_average" not in row:
        return "", ""
    cell = f"{100 * row['zero_shot_average']:.1f} ± {100 * row['zero_shot_stderr']:.1f}"
    if base is None or base is row:
        return cell, ""
    diff, error = _zero_shot_delta(row, base)
    return cell, f"{100 * diff:+.1f} ± {100 * error:.1f}"


def _zero_shot_delta(row: dict[str, Any], base: dict[str, Any]) -> tuple[float, float]:
    return (row["zero_shot_average"] - base["zero_shot_average"],
            math.hypot(row["zero_shot_stderr"], base["zero_shot_stderr"]))


def _sibling_row(row: dict[str, Any], rows: list[dict[str, Any]], permutation: str) -> dict[str, Any] | None:
    """The row of the same pattern and pruner with ``permutation`` (``None`` when it was not run)."""
    return next((r for r in rows if r["pattern"] == row["pattern"] and r["pruner"] == row["pruner"]
                 and r["permutation"] == permutation), None)


def _targets(rows: list[dict[str, Any]], permutations: dict[str, Any]) -> list[str]:
    lines = []
    for row in rows:
        base = _sibling_row(row, rows, "none")
        if base is None or row["permutation"] == "none":
            continue
        change, stderr = _paired(row, base)
        goal = -0.20 if row["pruner"] == "wanda" else -0.05
        verdict = ("met" if change <= goal else "missed") if row["permutation"] == "learned" else "reference"
        training = (permutations.get(f"{row['pattern']} {row['permutation']}") or {}).get("training") or {}
        start = (" — all of it from its start: keep-best kept step 0, the learning added nothing"
                 if row["permutation"] == "learned" and training.get("best_step") == 0 else "")
        lines.append(f"- {row['permutation']} + {row['pruner']} {row['pattern']}: perplexity {100 * change:+.1f}% ± "
                     f"{100 * stderr:.1f} vs none (target for learned ≤ {100 * goal:.0f}%): **{verdict}**{start}")
        if "zero_shot_average" in row and "zero_shot_average" in base:
            diff, error = _zero_shot_delta(row, base)
            verdict = "met" if diff >= 0 else "tie (within 2 SE)" if -diff <= 2 * error else "missed"
            lines.append(f"  - zero-shot average {100 * diff:+.1f} ± {100 * error:.1f} points vs none "
                         f"(target: not lower): **{verdict}**")
        if row["permutation"] not in ("learned", "swap"):
            continue
        ria, swap = _sibling_row(row, rows, "ria"), _sibling_row(row, rows, "swap")
        if row["permutation"] == "learned" and swap is not None:  # with init="swap": what the learning itself added
            versus, versus_err = _paired(row, swap)
            tie = abs(versus) <= 2 * versus_err
            lines.append(f"- learned + {row['pruner']} {row['pattern']} vs swap + {row['pruner']}: {100 * versus:+.1f}% "
                         f"± {100 * versus_err:.1f}: **{'tie' if tie else 'lower' if versus < 0 else 'higher'}**")
        if ria is not None:
            versus, versus_err = _paired(row, ria)
            tie = abs(versus) <= 2 * versus_err
            lines.append(f"- {row['permutation']} + {row['pruner']} {row['pattern']} vs RIA + {row['pruner']}: "
                         f"{100 * versus:+.1f}% ± {100 * versus_err:.1f} (target for learned + wanda: lower): "
                         f"**{'tie' if tie else 'lower' if versus < 0 else 'higher'}**")
    sizes = {(r["pattern"], r["pruner"]): set() for r in rows}
    for row in rows:
        sizes[(row["pattern"], row["pruner"])].add(row["storage_ratio"])
    # Sparse storage keeps the non-zeros: a weight that is exactly 0.0 in the dense model and kept by the mask
    # costs nothing, so the byte count can move by a few such weights when the mask moves.
    spread = max((max(ratios) - min(ratios) for ratios in sizes.values()), default=0.0)
    same = spread <= 1e-4
    lines.append(f"- checkpoint format and size equal to the unpermuted one (stored linear bytes within {spread:.1e} "
                 f"of dense per pruner; exactly-zero dense weights the mask keeps are not stored): "
                 f"**{'met' if same else 'missed'}**; no runtime op remains (the permutation is absorbed)")
    if not any("zero_shot_average" in row for row in rows):
        lines.append("- zero-shot average: not measured in this run")
    for name, info in permutations.items():
        training = info.get("training")
        if training:
            minutes = training["train_seconds"] / 60
            total = info.get("seconds", training["train_seconds"]) / 60
            lines.append(f"- training time ({name}): {training['steps']} steps in {minutes:.1f} min on this CPU; the "
                         f"whole permutation step (statistics, start, training, selection, absorption) {total:.1f} min "
                         f"(target ≤ 45 min on 2 cores): **{'met' if total <= 45 else 'missed'}**")
    return lines


if __name__ == "__main__":
    main()
