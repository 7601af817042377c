#!/usr/bin/env python
"""Pruning benchmark → bench/results/<output-name>.{json,md}.

For every sparsity pattern and method: prune a fresh copy of the model with the same calibration
windows (Wikipedia calibration split, 128 × 512 tokens, seed 0 by default), time the pruning, save the
checkpoint sparse and measure its size, then evaluate perplexity on the Wikipedia eval split (all
512-token windows) and zero-shot accuracy on ARC-Easy (full validation set), PIQA and HellaSwag (fixed
seeded subsets). The dense model is evaluated once with the same settings.

Methods: magnitude, wanda, sparsegpt, sds-wanda, sds-sparsegpt (SDS with its defaults on that base),
and sds-<base>+tune (SDS plus its optional mask-fixed tuning step). ``--sds-options`` overrides SDS
fields for every SDS method (JSON).

Usage:
    python scripts/bench_pruning.py                                  # the full table
    python scripts/bench_pruning.py --methods sparsegpt --patterns 2:4 --device cpu --output-name pruning-cpu
    python scripts/bench_pruning.py --quick                          # a smoke run on small subsets
    python scripts/bench_pruning.py --render pruning                 # rebuild pruning.md from pruning.json
"""

from __future__ import annotations

import json
import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from hf_compress.assets import load_model, load_text
from hf_compress.evaluation.memory import disk_bytes
from hf_compress.evaluation.report import benchmark_parser, start_benchmark, synchronize, write_benchmark
from hf_compress.evaluation.suite import EvaluationSettings, evaluate_row
from hf_compress.evaluation.uncertainty import paired_task_average_difference
from hf_compress.modeling import calibration_batches
from hf_compress.pruning import PRUNERS, MaskPruner, PruningConfig
from hf_compress.pruning.sds import sds_bases
from hf_compress.pruning.storage import save_pruned


logger = logging.getLogger("bench_pruning")

TASKS = ("arc_easy", "piqa", "hellaswag")
LIMITS = {"arc_easy": None, "piqa": 1000, "hellaswag": 1000}


def _methods() -> dict[str, tuple[str, dict[str, Any]]]:
    """Every registered layer-wise pruner, and SDS around each of its bases (± mask-fixed tuning)."""
    methods: dict[str, tuple[str, dict[str, Any]]] = {
        method: (method, {}) for method, cls in PRUNERS.items() if issubclass(cls, MaskPruner) and method != "sds"
    }
    for base in sds_bases():
        methods[f"sds-{base}"] = ("sds", {"base": base})
        methods[f"sds-{base}+tune"] = ("sds", {"base": base, "final_tuning_epochs": 2})
    return methods


METHODS = _methods()
DEFAULT_METHODS = ("magnitude", "wanda", "sparsegpt", "sds-wanda", "sds-sparsegpt")


def main() -> None:
    parser = benchmark_parser(__doc__, "pruning", threads=None, devices=("cpu", "cuda"))
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=sorted(METHODS))
    parser.add_argument("--patterns", nargs="+", default=["0.5", "2:4", "4:8"])
    parser.add_argument("--calibration-sequences", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--sds-options", type=json.loads, action="append", default=None,
                        help="JSON of SDSConfig fields for every SDS method; repeat to compare variants "
                             "(rows sds-<base>[k] for the k-th)")
    parser.add_argument("--perplexity-only", action="store_true", help="skip the zero-shot tasks")
    parser.add_argument("--max-windows", type=int, default=None,
                        help="evenly spaced 512-token eval windows (default: all)")
    parser.add_argument("--zero-shot-limit", type=int, default=None,
                        help="fixed seeded subset size per zero-shot task (default: ARC-E full, PIQA/HellaSwag 1000)")
    parser.add_argument("--no-dense", action="store_true", help="skip the dense row")
    args = parser.parse_args()
    if not start_benchmark(args, lambda payload: _markdown(payload["settings"], payload["results"]["rows"])):
        return
    args.sds_options = args.sds_options or [{}]

    settings = EvaluationSettings(
        perplexity_sets=("wikipedia",), window=512, max_windows=8 if args.quick else args.max_windows,
        zero_shot_tasks=() if args.perplexity_only else TASKS,
        zero_shot_limit=_limits(40 if args.quick else args.zero_shot_limit), zero_shot_per_example=True,
        batch_size=16 if args.device != "cpu" else 4,
    )
    model, tokenizer = load_model(args.model)
    calibration = calibration_batches(
        load_text("wikipedia", "calibration"), tokenizer, num_sequences=args.calibration_sequences,
        seq_len=args.seq_len, seed=0,
    )
    common = {"num_calibration_sequences": args.calibration_sequences, "calibration_seq_len": args.seq_len}
    rows: list[dict[str, Any]] = []
    if not args.no_dense:
        rows.append(evaluate_row(model.to(args.device), tokenizer, settings, {"method": "dense", "pattern": "-"}, "dense"))
    del model
    for pattern in args.patterns:
        for name in args.methods:
            method, options = METHODS[name]
            variants = args.sds_options if method == "sds" else [{}]
            for index, variant in enumerate(variants):
                label = f"{name}[{index}]" if len(variants) > 1 else name
                fields = {"method": method, "sparsity": pattern, **common, **options, **variant}
                config = PruningConfig.from_dict(fields)
                model, tokenizer = load_model(args.model)
                rows.append(_prune_and_evaluate(label, config, model.to(args.device), tokenizer, calibration,
                                                settings))
                del model
                _write(args, settings, rows)  # keep what is measured so far if a later run fails
    _write(args, settings, rows)


def _limits(limit: int | None) -> dict[str, int | None]:
    return dict(LIMITS) if limit is None else {task: limit for task in TASKS}


def _prune_and_evaluate(name, config, model, tokenizer, calibration, settings) -> dict[str, Any]:
    logger.info("=== %s %s", name, config.sparsity)
    pruner = PRUNERS[config.method](model, tokenizer)
    synchronize(model.device)  # a no-op when the bench runs on the CPU, even with a GPU present
    start = time.perf_counter()
    pruner.prune(config, calibration if pruner.requires_calibration else None, progress=False)
    synchronize(model.device)
    seconds = time.perf_counter() - start
    row: dict[str, Any] = {"method": name, "pattern": str(config.sparsity), "config": config.to_dict(),
                           "prune_seconds": seconds, "overall_sparsity": pruner.report.overall_sparsity}
    if pruner.report.blocks:
        row["sds_blocks"] = _summarise_blocks(pruner.report.blocks)
    with tempfile.TemporaryDirectory() as folder:
        save_pruned(model, tokenizer, Path(folder) / "model", recipe=config)
        saved = json.loads((Path(folder) / "model" / "config.json").read_text())
        row["storage"] = saved["quantization_config"]["storage"]
        row["disk_MB"] = disk_bytes(Path(folder) / "model", "*.safetensors") / 2**20
    return evaluate_row(model, tokenizer, settings, row, f"{row['method']} {row['pattern']}")


def _summarise_blocks(blocks: list[dict[str, Any]]) -> dict[str, Any]:
    keys = [k for k in blocks[0] if k.startswith("error_") or k == "reselected_fraction"]
    return {f"median_{k}": statistics.median(b[k] for b in blocks) for k in keys} | {"blocks": blocks}


def _write(args, settings, rows) -> None:
    payload = {"evaluation": settings.to_dict(), "model": args.model, "device": args.device,
               "calibration": {"sequences": args.calibration_sequences, "seq_len": args.seq_len,
                               "text": "wikipedia calibration split", "seed": 0},
               "sds_options": args.sds_options}
    write_benchmark(args.output_name, payload, {"rows": rows}, _markdown(payload, rows))


def _markdown(settings: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    evaluation, calibration = settings["evaluation"], settings["calibration"]
    windows, tasks, limits = (evaluation[k] for k in ("max_windows", "zero_shot_tasks", "zero_shot_limit"))
    dense = next((r for r in rows if r["method"] == "dense"), None)
    lines = [
        f"# Pruning: {settings['model']}, {calibration['sequences']} × {calibration['seq_len']} calibration "
        f"tokens, on {settings['device']}",
        "",
        f"Perplexity: Wikipedia eval split, {'all' if windows is None else windows} 512-token windows"
        + ("." if not tasks else ". Zero-shot (0-shot, fixed seeded subsets where a size is given): "
           + ", ".join(f"{t} ({'full' if limits[t] is None else limits[t]})" for t in tasks)
           + "; the average uses acc_norm where the task defines it."),
        "",
        "| pattern | method | ppl | Δppl vs base | zero-shot avg | Δ vs base | prune s | linear bytes (× dense) "
        "| disk MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    if dense:
        lines.append(f"| dense | - | {dense['perplexity']:.2f} | | {_zs(dense)} | | | 1.000 | |")
    for row in rows:
        if row["method"] == "dense":
            continue
        base = _base_row(row, rows)
        d_ppl = f"{100 * (row['perplexity'] / base['perplexity'] - 1):+.1f}%" if base else ""
        d_zs = _zero_shot_difference(row, base) if base else ""
        lines.append(
            f"| {row['pattern']} | {row['method']} | {row['perplexity']:.2f} | {d_ppl} | "
            f"{_zs(row)} | {d_zs} | {row['prune_seconds']:.1f} | "
            f"{row['storage']['ratio']:.3f} | {row['disk_MB']:.1f} |"
        )
    variants = settings["sds_options"]
    if len(variants) > 1 or variants[0]:
        lines += ["", "SDS options (on top of `SDSConfig` defaults): "
                  + "; ".join(f"[{k}] `{json.dumps(v)}`" for k, v in enumerate(variants))]
    lines += ["", "## Targets", ""] + _targets(rows, settings)
    sds_rows = [r for r in rows if "sds_blocks" in r]
    if sds_rows:
        lines += ["", "## SDS diagnostics (median over blocks of the relative block reconstruction error)", "",
                  "| pattern | method | after 1st prune | re-densed | after 2nd prune | tuned "
                  "| 1st zeros re-selected | blocks reverted |",
                  "|---|---|---|---|---|---|---|---|"]
        for row in sds_rows:
            b = row["sds_blocks"]
            tuned = b.get("median_error_after_final_tuning")
            reverted = sum(bool(block.get("reverted")) for block in b["blocks"])
            lines.append(
                f"| {row['pattern']} | {row['method']} | {b['median_error_after_first_prune']:.4f} | "
                f"{b['median_error_after_redense']:.4f} | {b['median_error_after_second_prune']:.4f} | "
                f"{'' if tuned is None else f'{tuned:.4f}'} | {100 * b['median_reselected_fraction']:.1f}% | "
                f"{reverted} of {len(b['blocks'])} |"
            )
    return "\n".join(lines)


def _zs(row: dict[str, Any]) -> str:
    if "zero_shot_average" not in row:
        return "n/a"
    error = row.get("zero_shot_stderr")  # absent from runs before standard errors were kept
    return f"{row['zero_shot_average']:.4f}" + (f" ± {error:.4f}" if error is not None else "")


def _paired(row: dict[str, Any], base: dict[str, Any]) -> tuple[float, float] | None:
    """The zero-shot average of ``row`` minus ``base``'s, paired per example, and its standard error."""
    if "per_example" not in row or "per_example" not in base:
        return None
    return paired_task_average_difference(row["per_example"], base["per_example"], list(row["per_example"]))


def _zero_shot_difference(row: dict[str, Any], base: dict[str, Any]) -> str:
    if "zero_shot_average" not in row or "zero_shot_average" not in base:
        return ""
    paired = _paired(row, base)
    if paired is None:
        return f"{row['zero_shot_average'] - base['zero_shot_average']:+.4f}"
    return f"{paired[0]:+.4f} ± {paired[1]:.4f}"


def _base_row(row: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    if not row["method"].startswith("sds-"):
        return None
    base = row["method"].split("-", 1)[1].split("+")[0].split("[")[0]
    return next((r for r in rows if r["method"] == base and r["pattern"] == row["pattern"]), None)


def _targets(rows: list[dict[str, Any]], settings: dict[str, Any]) -> list[str]:
    device, calibration = settings["device"], settings["calibration"]
    target_settings = device == "cpu" and (calibration["sequences"], calibration["seq_len"]) == (128, 512)
    lines = []
    for row in rows:
        base = _base_row(row, rows)
        if base is None:
            continue
        reduction = 1 - row["perplexity"] / base["perplexity"]
        goal = 0.10 if row["pattern"] == "2:4" else 0.0
        met = reduction >= goal
        text = (f"- {row['method']} at {row['pattern']}: perplexity {100 * reduction:.1f}% lower than "
                f"{base['method']} (target ≥ {100 * goal:.0f}%{' at 2:4' if goal else ', same direction'})")
        paired = _paired(row, base)
        verdict = None
        if paired is not None:  # no loss beyond the noise: a difference within two standard errors is a tie
            difference, error = paired
            met = met and difference >= -2 * error
            relation = "a tie within two standard errors" if abs(difference) <= 2 * error else (
                "higher" if difference > 0 else "lower")
            text += (f", zero-shot average {difference:+.4f} ± {error:.4f} paired, {relation} (target: no loss, "
                     "≥ 0 within the noise)")
        elif "zero_shot_average" in row and "zero_shot_average" in base:  # runs without per-example scores
            zero_shot = row["zero_shot_average"] - base["zero_shot_average"]
            text += (f", zero-shot average {zero_shot:+.4f} (target ≥ 0; not judged: this run kept no per-example "
                     "scores, so its noise is unknown)")
            verdict = f"{'met' if met else 'missed'} on perplexity; zero-shot not judged"
        lines.append(f"{text}: **{verdict or ('met' if met else 'missed')}**")
    for row in rows:
        if row["method"] == "sparsegpt":
            text = (f"- SparseGPT {row['pattern']} pruning time: {row['prune_seconds']:.0f} s on {device} with "
                    f"{calibration['sequences']} × {calibration['seq_len']} calibration tokens")
            if target_settings:
                text += f" (target ≤ 300 s): **{'met' if row['prune_seconds'] <= 300 else 'missed'}**"
            else:
                text += " (the ≤ 5 min target is for 128 × 512 tokens on 2 CPU cores: not judged here)"
            lines.append(text)
        if row["pattern"] == "2:4" and row["method"] != "dense":
            ratio = row["storage"]["ratio"]
            if row["method"] == "magnitude":
                lines.append(f"- 2:4 linear weights on disk: {ratio:.3f}× dense (target ≤ 0.6×): "
                             f"**{'met' if ratio <= 0.6 else 'missed'}**")
    return lines


if __name__ == "__main__":
    main()
