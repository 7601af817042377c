#!/usr/bin/env python
"""Structural pruning benchmark (Týr vs uniform vs block removal) → bench/results/<output-name>.{json,md}.

For every target (fraction of decoder-block parameters removed): prune a fresh copy of the model with
Týr (supernet + search), with the uniform allocation (the same local pruner, no search) and by block
removal (ShortGPT block influence, nearest whole number of blocks), all on the same calibration text;
save each as a checkpoint (slim format) and measure its size; then evaluate perplexity on the
Wikipedia eval split, zero-shot accuracy, prefill tokens/s (one 512-token forward, median of 3) and
greedy decode tokens/s (median over the speed prompts). The dense model is measured once, in the same run.

Usage:
    python scripts/bench_tyr.py                       # the committed table (see its footer for the command)
    python scripts/bench_tyr.py --quick               # a smoke run: tiny search, small subsets
    python scripts/bench_tyr.py --render tyr          # rebuild tyr.md from tyr.json
    python scripts/bench_tyr.py --speed-from tyr      # re-time every row's shapes, interleaved → tyr-speed.{json,md}
    python scripts/bench_tyr.py --speed-from tyr --output-name tyr-speed-epyc   # the same, named for other hardware

``--speed-from`` exists because speed on a shared CPU drifts over a 50-minute run: it rebuilds each row's
architecture from the widths (and removed blocks) recorded in the JSON (speed depends on shapes only, not on
weight values) and times them round-robin, so every ratio comes from measurements taken side by side.
"""

from __future__ import annotations

import functools
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
from hf_compress.assets.text import speed_prompts
from hf_compress.evaluation.memory import disk_bytes
from hf_compress.evaluation.report import (
    benchmark_parser,
    device_description,
    start_benchmark,
    synchronize,
    write_benchmark,
)
from hf_compress.evaluation.perplexity import evaluate_perplexity
from hf_compress.evaluation.speed import measure_generation_speed
from hf_compress.evaluation.suite import EvaluationSettings, headline_metrics
from hf_compress.evaluation.uncertainty import (
    average_standard_error,
    paired_difference,
    paired_task_average_difference,
    standard_error,
)
from hf_compress.evaluation.zero_shot import evaluate_zero_shot
from hf_compress.pruning import BlockRemovalConfig, BlockRemovalPruner, TyrConfig, TyrPruner
from hf_compress.formats.slim import save_slim
from hf_compress.modeling.structure import decoder_parameter_count


logger = logging.getLogger("bench_tyr")

TASKS = ("arc_easy", "piqa", "hellaswag")
METHODS = ("tyr", "uniform", "block_removal")


def main() -> None:
    parser = benchmark_parser(__doc__, "tyr", threads=None, devices=("cpu", "cuda"))
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--targets", nargs="+", type=float, default=[0.2, 0.3, 0.5])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--tyr-options", type=json.loads, default={},
                        help="JSON of TyrConfig fields for the Týr and uniform rows")
    parser.add_argument("--max-windows", type=int, default=32)
    parser.add_argument("--zero-shot-limit", type=int, default=50)
    parser.add_argument("--speed-prompts", type=int, default=10)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--speed-from", metavar="NAME", help="re-time the shapes of bench/results/NAME.json")
    parser.add_argument("--rounds", type=int, default=3, help="--speed-from: round-robin rounds (default 3)")
    args = parser.parse_args()

    def render(payload: dict[str, Any]) -> str:  # a re-timing run's settings name the run it re-timed
        markdown = _speed_markdown if "source" in payload["settings"] else _markdown
        return markdown(payload["settings"], payload["results"]["rows"])

    if not start_benchmark(args, render):
        return
    if args.speed_from:
        _speed_rerun(args)
        return
    if args.quick:
        args.max_windows, args.zero_shot_limit, args.speed_prompts, args.max_new_tokens = 4, 10, 2, 8
        args.tyr_options = {"num_iterations": 1, "generations": 1, "offspring": 2, "num_levels": 3,
                            "selection_tokens": [256], "selection_survivors": [], "num_calibration_sequences": 4,
                            "num_search_sequences": 2, **args.tyr_options}
    settings = EvaluationSettings(
        perplexity_sets=("wikipedia",), window=512, max_windows=args.max_windows, zero_shot_tasks=TASKS,
        zero_shot_limit=args.zero_shot_limit, batch_size=4,
    )
    calibration = load_text("wikipedia", "calibration")
    prompts = speed_prompts(args.speed_prompts)
    payload = {"evaluation": settings.to_dict(), "model": args.model, "targets": args.targets,
               "tyr_options": args.tyr_options, "speed": {"prompts": args.speed_prompts,
                                                          "max_new_tokens": args.max_new_tokens,
                                                          "prefill_tokens": 512, "threads": torch.get_num_threads()},
               "device": device_description(args.device), "calibration": "wikipedia calibration split"}
    rows: list[dict[str, Any]] = []
    model, tokenizer = load_model(args.model)
    model.to(args.device)
    rows.append(_measure(model, tokenizer, settings, prompts, args, {"method": "dense", "target": 0.0}))
    del model
    for target in args.targets:
        for method in args.methods:
            model, tokenizer = load_model(args.model)
            model.to(args.device)
            row = _prune(method, target, model, tokenizer, calibration, args)
            rows.append(_measure(model, tokenizer, settings, prompts, args, row))
            del model
            write_benchmark(args.output_name, payload, {"rows": rows}, _markdown(payload, rows))
    write_benchmark(args.output_name, payload, {"rows": rows}, _markdown(payload, rows))


def _prune(method: str, target: float, model, tokenizer, calibration, args) -> dict[str, Any]:
    logger.info("=== %s %.2f", method, target)
    start = time.perf_counter()
    if method == "block_removal":
        config = BlockRemovalConfig(target_sparsity=target, num_calibration_sequences=32)
        pruner = BlockRemovalPruner(model, tokenizer)
        pruner.prune(config, calibration, progress=False)
    else:
        fields = {"target_sparsity": target, "allocation": "search" if method == "tyr" else "uniform",
                  "num_calibration_sequences": 32, **args.tyr_options}
        config = TyrConfig(**fields)
        pruner = TyrPruner(model, tokenizer)
        pruner.prune(config, calibration, progress=False)
    seconds = time.perf_counter() - start
    report = pruner.report
    row: dict[str, Any] = {
        "method": method, "target": target, "config": config.to_dict(), "prune_seconds": seconds,
        "achieved_sparsity": report.achieved_sparsity, "stage_seconds": report.seconds,
        "layers": report.layers, "history": report.history, "extra": report.extra,
    }
    with tempfile.TemporaryDirectory() as folder:
        save_slim(model, tokenizer, Path(folder) / "model", recipe=config.to_dict())
        row["disk_MB"] = disk_bytes(Path(folder) / "model", "*.safetensors") / 2**20
    return row


def _measure(model, tokenizer, settings, prompts, args, row: dict[str, Any]) -> dict[str, Any]:
    model.eval()
    row["parameters"] = model.num_parameters()
    row["decoder_parameters"] = decoder_parameter_count(model)
    if "disk_MB" not in row:
        with tempfile.TemporaryDirectory() as folder:
            model.save_pretrained(Path(folder) / "model")
            row["disk_MB"] = disk_bytes(Path(folder) / "model", "*.safetensors") / 2**20
    row["prefill_tokens_per_second"] = _prefill_speed(model, tokenizer)
    speed = measure_generation_speed(model, tokenizer, prompts, max_new_tokens=args.max_new_tokens, progress=False)
    row["decode_tokens_per_second"] = speed["tokens_per_second"]
    return _evaluate(model, tokenizer, settings, row)


def _evaluate(model, tokenizer, settings: EvaluationSettings, row: dict[str, Any]) -> dict[str, Any]:
    """Perplexity with each window's loss and zero-shot accuracy with each example's score: every row scores the same
    windows and examples, so the table gives standard errors and paired differences."""
    perplexity = evaluate_perplexity(model, tokenizer, load_text("wikipedia", "eval"), window=settings.window,
                                     max_windows=settings.max_windows, batch_size=settings.batch_size, progress=False)
    row["perplexity"], row["window_nlls"] = perplexity["perplexity"], perplexity["window_nlls"]
    zero_shot = evaluate_zero_shot(model, tokenizer, tasks=settings.zero_shot_tasks, limit=settings.zero_shot_limit,
                                   progress=False, return_per_example=True)
    row.update(headline_metrics({"zero_shot": zero_shot}))
    row["per_example"] = {task: zero_shot[task]["per_example"] for task in settings.zero_shot_tasks}
    logger.info("%s %.2f: perplexity %.2f, zero-shot average %.4f", row["method"], row["target"], row["perplexity"],
                row["zero_shot_average"])
    return row


@functools.cache
def _prefill_ids(tokenizer, tokens: int) -> torch.Tensor:
    """The prefill input, tokenized once per tokenizer (every model and round reuses it)."""
    text = " ".join(load_text("wikipedia", "eval")["text"][:20])
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :tokens]
    if ids.shape[1] < tokens:
        raise ValueError(f"the prefill text has {ids.shape[1]} tokens, fewer than {tokens}.")
    return ids


@torch.inference_mode()
def _prefill_speed(model, tokenizer, tokens: int = 512, repeats: int = 3) -> float:
    ids = _prefill_ids(tokenizer, tokens).to(model.device)
    model(ids[:, :32])  # warm-up
    times = []
    for _ in range(repeats):
        synchronize(model.device)
        start = time.perf_counter()
        model(ids, use_cache=False)
        synchronize(model.device)
        times.append(time.perf_counter() - start)
    return ids.shape[1] / statistics.median(times)


def _speed_rerun(args) -> None:
    import json

    from hf_compress.modeling.structure import apply_layer_widths, remove_blocks

    source = json.loads(Path("bench/results", f"{args.speed_from}.json").read_text())
    rows = source["results"]["rows"]
    prompts = speed_prompts(args.speed_prompts)
    models = []
    for row in rows:
        model, tokenizer = load_model(source["settings"]["model"])
        model.to(args.device)
        if row["method"] == "block_removal":
            remove_blocks(model, row["extra"]["removed_blocks"])
        elif row["method"] != "dense":
            apply_layer_widths(model, row["layers"])  # shapes as exported; weights are irrelevant to speed
        models.append(model.eval())
    timings: list[dict[str, list[float]]] = [{"prefill": [], "decode": []} for _ in rows]
    for round_index in range(args.rounds):
        for index, model in enumerate(models):
            timings[index]["prefill"].append(_prefill_speed(model, tokenizer))
            speed = measure_generation_speed(model, tokenizer, prompts, max_new_tokens=args.max_new_tokens,
                                             progress=False)
            timings[index]["decode"].append(speed["tokens_per_second"])
            logger.info("round %d %s %s: prefill %.0f, decode %.2f", round_index + 1, rows[index]["method"],
                        rows[index]["target"], timings[index]["prefill"][-1], timings[index]["decode"][-1])
    results = [{"method": row["method"], "target": row["target"], "parameters": model.num_parameters(),
                "prefill_tokens_per_second": statistics.median(t["prefill"]), "prefill_rounds": t["prefill"],
                "decode_tokens_per_second": statistics.median(t["decode"]), "decode_rounds": t["decode"]}
               for row, model, t in zip(rows, models, timings, strict=True)]
    settings = {"source": f"bench/results/{args.speed_from}.json", "model": source["settings"]["model"],
                "rounds": args.rounds, "speed_prompts": args.speed_prompts, "max_new_tokens": args.max_new_tokens,
                "prefill_tokens": 512, "threads": torch.get_num_threads()}
    # --output-name names a re-timing on other hardware; by default it goes beside the run it re-times.
    name = args.output_name if args.output_name != "tyr" else f"{args.speed_from}-speed"
    write_benchmark(name, settings, {"rows": results}, _speed_markdown(settings, results))


def _speed_markdown(settings: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    dense = rows[0]
    lines = [
        f"# Structural pruning speed, re-timed side by side: {settings['model']}",
        "",
        f"Shapes from `{settings['source']}` (per-layer widths / removed blocks as exported). Each round times every "
        f"model once (prefill: one 512-token forward, median of 3; decode: greedy, {settings['max_new_tokens']} new "
        f"tokens, median over {settings['speed_prompts']} prompts); the table gives the median over "
        f"{settings['rounds']} rounds.",
        "",
        "| target | method | params (M) | prefill tok/s (× dense) | decode tok/s (× dense) | decode per round |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['target']:.0%} | {row['method']} | {row['parameters'] / 1e6:.1f} | "
            f"{row['prefill_tokens_per_second']:.0f} ({_ratio(row['prefill_tokens_per_second'], dense['prefill_tokens_per_second'])}) | "
            f"{row['decode_tokens_per_second']:.2f} ({_ratio(row['decode_tokens_per_second'], dense['decode_tokens_per_second'])}) | "
            + ", ".join(f"{v:.2f}" for v in row["decode_rounds"]) + " |"
        )
    half = next((r for r in rows if r["method"] == "tyr" and r["target"] == 0.5), None)
    if half:
        speedup = half["decode_tokens_per_second"] / dense["decode_tokens_per_second"]
        lines += ["", f"- 50% Týr decode {speedup:.2f}× dense (target ≥ 1.3×): "
                      f"{'**met**' if speedup >= 1.3 else '**missed**'}"]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------------


def _markdown(settings: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    evaluation = settings["evaluation"]
    dense = next((r for r in rows if r["method"] == "dense"), None)
    options = settings.get("tyr_options") or {}
    lines = [
        f"# Structural pruning: {settings['model']}, Týr vs uniform vs block removal",
        "",
        (f"Perplexity: Wikipedia eval split, {evaluation['max_windows']} × {evaluation['window']}-token windows. "
        f"Zero-shot: {', '.join(evaluation['zero_shot_tasks'])} ({evaluation['zero_shot_limit']} seeded examples "
        "each; acc_norm where defined). Prefill: one 512-token forward, median of 3. Decode: greedy "
        f"`generate`, {settings['speed']['max_new_tokens']} new tokens, median over "
        f"{settings['speed']['prompts']} prompts. Sparsity = fraction of decoder-block parameters removed. "
        f"Týr settings beyond `TyrConfig` defaults: `{options}`; calibration 32 × 256 tokens. "
        "The speed columns were taken one model after another across the whole run on a shared CPU whose speed "
        "drifts; `tyr-speed.md` re-times the same shapes side by side, round-robin, and is the one to quote."
        + (" Perplexity ± one standard error over the windows (delta method); zero-shot average ± one standard error "
           "over the examples; the targets compare rows paired over the same windows and examples."
           if any("window_nlls" in row for row in rows) else "")),
        "",
        ("| target | method | removed | ppl | zero-shot avg (× dense) | params (M) | disk MB | prefill tok/s (×) "
        "| decode tok/s (×) | prune s | KV-head groups kept per layer (min–max) | FFN channels per layer (min–max) |"),
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(_row(row, dense))
    lines += ["", "## Targets", ""] + _targets(rows, dense)
    return "\n".join(lines) + "\n"


def _ratio(value: float | None, base: float | None) -> str:
    return f"{value / base:.2f}×" if value is not None and base else ""


def _row(row: dict[str, Any], dense: dict[str, Any] | None) -> str:
    layers = row.get("layers") or []
    heads = [layer["key_value_heads"] for layer in layers]
    channels = [layer["intermediate_size"] for layer in layers]
    zs = row.get("zero_shot_average")
    base_zs = dense.get("zero_shot_average") if dense else None
    prefill, decode = row.get("prefill_tokens_per_second"), row.get("decode_tokens_per_second")
    cells = [
        f"{row['target']:.0%}" if row["method"] != "dense" else "-",
        row["method"],
        f"{row['achieved_sparsity']:.3f}" if "achieved_sparsity" in row else "0",
        f"{row['perplexity']:.2f}" + (f" ± {_perplexity_se(row):.2f}" if "window_nlls" in row else ""),
        (f"{zs:.4f}" + (f" ± {_zero_shot_se(row):.4f}" if "per_example" in row else "") + f" ({_ratio(zs, base_zs)})"
         if zs is not None else ""),
        f"{row['parameters'] / 1e6:.1f}",
        f"{row['disk_MB']:.1f}",
        f"{prefill:.0f} ({_ratio(prefill, dense and dense['prefill_tokens_per_second'])})",
        f"{decode:.1f} ({_ratio(decode, dense and dense['decode_tokens_per_second'])})",
        f"{row['prune_seconds']:.0f}" if "prune_seconds" in row else "",
        f"{min(heads)}–{max(heads)}" if heads and row["method"] != "block_removal" else
        (f"all ({len(layers)} layers left)" if layers else ""),
        f"{min(channels)}–{max(channels)}" if channels else "",
    ]
    return "| " + " | ".join(cells) + " |"


def _perplexity_se(row: dict[str, Any]) -> float:
    """One standard error of the perplexity (delta method on the mean window loss)."""
    return row["perplexity"] * (standard_error(row["window_nlls"]) or 0.0)


def _zero_shot_se(row: dict[str, Any]) -> float:
    return average_standard_error([standard_error(scores) or 0.0 for scores in row["per_example"].values()])


def _paired_perplexity(a: dict[str, Any], b: dict[str, Any]) -> tuple[float, float] | None:
    """Mean per-window loss difference ``a − b`` (nats; exp of it is the perplexity ratio) and its standard error."""
    if "window_nlls" not in a or "window_nlls" not in b:
        return None
    return paired_difference(a["window_nlls"], b["window_nlls"])


def _verdict(difference: float, stderr: float) -> str:
    """Lower is better: beyond two standard errors either way, or a tie."""
    return "lower" if difference < -2 * stderr else "higher" if difference > 2 * stderr else "a tie"


def _targets(rows: list[dict[str, Any]], dense: dict[str, Any] | None) -> list[str]:
    lines = []
    by_key = {(r["method"], r["target"]): r for r in rows}
    for target in sorted({r["target"] for r in rows if r["method"] == "tyr"}):
        tyr = by_key[("tyr", target)]
        others = {m: by_key.get((m, target)) for m in ("uniform", "block_removal")}
        beaten = [m for m, r in others.items() if r is not None and tyr["perplexity"] < r["perplexity"]]
        missing = [m for m, r in others.items() if r is not None and m not in beaten]
        verdict = "**met**" if not missing else f"**missed** (not below {', '.join(missing)})"
        shown = ", ".join(f"{m} {r['perplexity']:.2f}" for m, r in others.items() if r is not None)
        paired = {m: _paired_perplexity(tyr, r) for m, r in others.items() if r is not None}
        if any(value is not None for value in paired.values()):
            ties = [m for m, value in paired.items() if value is not None and _verdict(*value) != "lower"]
            verdict = "**met** beyond two standard errors" if not ties and not missing else (
                f"**not shown** (within two standard errors of, or above, {', '.join(ties or missing)})")
            shown += "; Týr/other perplexity, paired over the same windows: " + ", ".join(
                f"{m} {math.exp(d):.3f}× (log {d:+.3f} ± {se:.3f}, {_verdict(d, se)})"
                for m, (d, se) in paired.items())
            zero_shot = [(m, paired_task_average_difference(tyr["per_example"], r["per_example"]))
                         for m, r in others.items() if r is not None and "per_example" in r and "per_example" in tyr]
            if zero_shot:
                shown += "; zero-shot average, Týr − other (paired): " + ", ".join(
                    f"{m} {100 * d:+.1f} ± {100 * se:.1f} points" for m, (d, se) in zero_shot)
        lines.append(f"- {target:.0%}: Týr perplexity {tyr['perplexity']:.2f} vs {shown}: {verdict}")
    half = by_key.get(("tyr", 0.5))
    if half and dense:
        kept = half["zero_shot_average"] / dense["zero_shot_average"]
        spread = ""
        if "per_example" in half and "per_example" in dense:
            _, stderr = paired_task_average_difference(half["per_example"], dense["per_example"])
            spread = f" ± {stderr / dense['zero_shot_average']:.1%} (paired)"
        lines.append(f"- 50%: Týr keeps {kept:.1%}{spread} of the dense zero-shot average (target ≥ 85%): "
                     f"{'**met**' if kept >= 0.85 else '**missed**'}")
        speedup = half["decode_tokens_per_second"] / dense["decode_tokens_per_second"]
        smaller = half["parameters"] < dense["parameters"] and half["disk_MB"] < dense["disk_MB"]
        lines.append(
            f"- 50%: {half['parameters'] / dense['parameters']:.3f}× parameters, "
            f"{half['disk_MB'] / dense['disk_MB']:.3f}× disk ({'smaller' if smaller else 'NOT smaller'}); decode "
            f"{speedup:.2f}× dense as timed in this run (target ≥ 1.3×; judged on the side-by-side re-timing in "
            "`tyr-speed.md`, since these columns drift)"
        )
    searched = [r for r in rows if r["method"] == "tyr"]
    if searched:
        lines.append("- Týr search wall time: " + ", ".join(
            f"{r['target']:.0%} {r['prune_seconds'] / 60:.1f} min (supernet {r['stage_seconds'].get('supernet', 0):.0f} s, "
            f"search {r['stage_seconds'].get('search', 0):.0f} s)" for r in searched))
    return lines


if __name__ == "__main__":
    main()
