"""Token router (FTP) on SmolLM2-135M against its baselines, at one or more token sparsities.

Methods (same model, same calibration text): dense; static router + uniform schedule; static router + searched
schedule; random token selection + searched schedule; trained router + searched schedule; ShortGPT block removal
(``BlockRemovalPruner``) removing the number of blocks nearest to the *same fraction of decoder FLOPs* the routed
model saves on an eval window (linear layers ∝ kept tokens, attention ∝ kept tokens²). BlockPruner and SLEB are not
implemented in hf_compress yet and are not in this table.

Measured:

- perplexity, two readings of the same forward (Wikipedia eval split, 512-token windows, each window one routed
  prompt forward): **tail** = the last 128 tokens of each window given the 384 before (what a routed prompt serves:
  the static rule keeps the most recent tokens), and **all tokens** = every token of the window (the standard
  reading; it includes the earliest tokens, which the static rule never computes at the blocks that skip them);
- zero-shot accuracy (ARC-E, PIQA, HellaSwag, Winogrande, BoolQ; lm-eval's metric of record; each choice one
  left-padded forward, ``share_context=False``, so the whole sequence is routed) with the standard error;
- prefill time of one 2k-token prompt (median of round-robin rounds, every model timed in the same rounds);
- router parameters, search and training seconds.

Example:
    python scripts/bench_router.py                     # the settings in the table's footer
    python scripts/bench_router.py --quick             # a tiny model, to check the script runs
"""

from __future__ import annotations

import copy
import logging
import math
import statistics
import time
from typing import Any

import torch

from hf_compress.assets import load_model, load_text
from hf_compress.evaluation.perplexity import token_windows, tokenize_stream
from hf_compress.evaluation.report import benchmark_parser, start_benchmark, write_benchmark
from hf_compress.evaluation.zero_shot import evaluate_zero_shot
from hf_compress.modeling.layers import find_decoder_blocks
from hf_compress.routing import (
    RoutingSchedule, TokenRouterConfig, install_routing, routing_mode, routing_state, search_schedule,
    train_token_router,
)
from hf_compress.training import TrainingSettings, causal_lm_dataset


TASKS = ("arc_easy", "piqa", "hellaswag", "winogrande", "boolq")
logger = logging.getLogger("bench_router")


def main() -> None:
    parser = benchmark_parser(__doc__, "router")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.22, 0.3])
    parser.add_argument("--ppl-windows", type=int, default=4, help="512-token Wikipedia eval windows (issue: 512)")
    parser.add_argument("--tail", type=int, default=128, help="tokens at the end of each window the tail ppl scores")
    parser.add_argument("--limit", type=int, default=3, help="examples per zero-shot task (issue: >= 500; 0 skips)")
    parser.add_argument("--zero-shot-sparsities", type=float, nargs="*", default=[0.3],
                        help="sparsities whose rows get zero-shot (and the baselines' uniform/random rows)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per search / training window")
    parser.add_argument("--search-windows", type=int, default=2, help="calibration windows per schedule score")
    parser.add_argument("--removal-sequences", type=int, default=4, help="ShortGPT calibration windows")
    parser.add_argument("--train-steps", type=int, default=10)
    parser.add_argument("--generations", type=int, default=2)
    parser.add_argument("--population", type=int, default=4)
    parser.add_argument("--prefill-tokens", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    if not start_benchmark(args, _markdown):
        return
    if args.quick:
        args.model, args.ppl_windows, args.limit, args.train_steps, args.tail = "tiny-llama", 2, 2, 2, 32
        args.generations, args.population, args.prefill_tokens, args.rounds, args.seq_len = 1, 3, 128, 1, 64
        args.sparsities, args.zero_shot_sparsities = [0.3], [0.3]
    model, tokenizer = load_model(args.model)
    model.eval()
    tokenizer.padding_side = "left"
    calibration = load_text("wikipedia", "calibration")
    windows = token_windows(tokenize_stream(load_text("wikipedia", "eval"), tokenizer), 512, args.ppl_windows)
    parameters = sum(p.numel() for p in model.parameters())
    num_blocks = len(find_decoder_blocks(model)[1])
    started = time.perf_counter()

    def measure(candidate, label: str, zero_shot: bool = True) -> dict[str, Any]:
        start = time.perf_counter()
        row = _perplexities(candidate, windows, args.tail)
        if zero_shot and args.limit:
            results = evaluate_zero_shot(candidate, tokenizer, TASKS, limit=args.limit, share_context=False,
                                         progress=False, batch_size=8)
            row["zero_shot"] = {task: results[task]["score"] for task in TASKS}
            row["zero_shot_stderr"] = {task: results[task][f"{results[task]['metric']}_stderr"] for task in TASKS}
            row["zero_shot_n"] = {task: results[task]["n"] for task in TASKS}
            row["zero_shot_avg"] = statistics.mean(row["zero_shot"].values())
            row["zero_shot_avg_stderr"] = math.sqrt(sum(se**2 for se in row["zero_shot_stderr"].values())) / len(TASKS)
        logger.info("%s: %s (%.0fs; %.0fs so far)", label, {k: v for k, v in row.items() if not isinstance(v, dict)},
                    time.perf_counter() - start, time.perf_counter() - started)
        return row

    rows: list[dict[str, Any]] = []
    dense = {"method": "dense", "sparsity": 0.0, "flop_fraction": 0.0, **measure(model, "dense")}
    rows.append(dense)
    prompt = torch.randint(3, min(1000, model.config.vocab_size), (1, args.prefill_tokens),
                           generator=torch.Generator().manual_seed(0))
    timed: dict[str, Any] = {"dense": model}
    for sparsity in args.sparsities:
        config = TokenRouterConfig(token_sparsity=sparsity, generations=args.generations, population=args.population,
                                   search_windows=args.search_windows, search_seq_len=args.seq_len)
        start = time.perf_counter()
        schedule = search_schedule(model, calibration, config, tokenizer=tokenizer)
        search_seconds = time.perf_counter() - start
        logger.info("searched schedule %s in %.0fs", [round(r, 3) for r in schedule.block_sparsity], search_seconds)
        flops = _flop_fraction(model, schedule, 512)
        routed = copy.deepcopy(model)
        install_routing(routed, schedule, mode="static")
        common = {"sparsity": sparsity, "search_seconds": search_seconds}
        full = sparsity in args.zero_shot_sparsities
        variants = [("static, uniform schedule", "static", RoutingSchedule.uniform(sparsity, num_blocks), False),
                    ("static, searched schedule", "static", schedule, full),
                    ("random tokens, searched schedule", "random", schedule, False)]
        for label, mode, plan, zero_shot in variants if full else variants[1:2]:
            with routing_mode(routed, mode, plan):
                rows.append({"method": label, **common, "flop_fraction": _flop_fraction(model, plan, 512),
                             **measure(routed, f"{label} {sparsity}", zero_shot=zero_shot)})
        data = causal_lm_dataset(calibration, tokenizer, num_sequences=args.train_steps, seq_len=args.seq_len, seed=1)
        settings = TrainingSettings(max_steps=args.train_steps, learning_rate=1e-3, per_device_batch_size=1,
                                    logging_steps=max(1, args.train_steps // 4), use_cpu=True)
        trained = copy.deepcopy(model)
        train_token_router(trained, copy.deepcopy(schedule), data, args=settings, config=config)
        record = routing_state(trained).schedule.search["training"]
        rows.append({"method": "trained router, searched schedule", **common, "flop_fraction": flops,
                     "train_seconds": record["seconds"], "router_parameters": record["router_parameters"],
                     "router_share": record["router_parameters"] / parameters,
                     **measure(trained, f"trained {sparsity}", zero_shot=full)})
        timed[f"router {sparsity}"] = trained
        from hf_compress.pruning import BlockRemovalConfig, BlockRemovalPruner

        pruned = copy.deepcopy(model)
        removal = BlockRemovalConfig(target_sparsity=flops, num_calibration_sequences=args.removal_sequences,
                                     calibration_seq_len=args.seq_len)
        BlockRemovalPruner(pruned, tokenizer).prune(removal, calibration)
        removed = num_blocks - pruned.config.num_hidden_layers
        rows.append({"method": f"ShortGPT block removal ({removed} blocks)", "sparsity": sparsity,
                     "blocks_removed": removed, "flop_fraction": removed / num_blocks,
                     **measure(pruned, f"shortgpt {sparsity}", zero_shot=full)})
        timed[f"shortgpt {sparsity}"] = pruned
        if sparsity != max(args.sparsities):  # prefill is timed at the highest sparsity only (the issue's 30%)
            for name in (f"router {sparsity}", f"shortgpt {sparsity}"):
                timed.pop(name)
    prefill = _prefill_times(timed, prompt, args.rounds)
    for row in rows:
        method = row["method"]
        key = "dense" if method == "dense" else (
            f"router {row['sparsity']}" if method.startswith("trained") else
            f"shortgpt {row['sparsity']}" if method.startswith("ShortGPT") else None)
        if key in prefill:
            row["prefill_seconds"] = prefill[key]
            row["prefill_speedup"] = prefill["dense"] / prefill[key]
        if "zero_shot_avg" in row:
            row["zero_shot_retention"] = row["zero_shot_avg"] / dense["zero_shot_avg"]
    settings = {k: v for k, v in vars(args).items() if k not in ("render", "supported_devices")}
    settings["parameters"] = parameters
    settings["total_seconds"] = round(time.perf_counter() - started)
    write_benchmark(args.output_name, settings, {"rows": rows}, _markdown({"settings": settings, "rows": rows}))


@torch.no_grad()
def _perplexities(model, windows: torch.Tensor, tail: int) -> dict[str, float]:
    """Whole-window and tail perplexity from one forward per window (each window one routed prompt)."""
    total, tail_total, count, tail_count = 0.0, 0.0, 0, 0
    for window in windows:
        ids = window[None].to(next(model.parameters()).device)
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits[0, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")
        total, count = total + float(nll.sum()), count + nll.numel()
        tail_total, tail_count = tail_total + float(nll[-tail:].sum()), tail_count + tail
    return {"perplexity": math.exp(total / count), "tail_perplexity": math.exp(tail_total / tail_count)}


def _flop_fraction(model, schedule: RoutingSchedule, length: int) -> float:
    """Fraction of decoder-block multiply-adds a schedule saves on a ``length``-token prompt (causal attention)."""
    config = model.config.get_text_config()
    hidden = config.hidden_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    _, blocks = find_decoder_blocks(model)
    linear = sum(p.numel() for p in blocks[0].parameters() if p.dim() == 2)  # per token
    attention = heads * head_dim * (length + 1)  # QKᵀ and AV per token, averaged over causal positions
    dense = len(blocks) * (linear + attention)
    kept = sum((1 - r) * linear + (1 - r) ** 2 * attention for r in schedule.block_sparsity)
    return 1 - kept / dense


@torch.no_grad()
def _prefill_times(models: dict[str, Any], prompt: torch.Tensor, rounds: int) -> dict[str, float]:
    """Median seconds of one prompt forward (use_cache=True, as generate's prefill), round-robin over the models."""
    times: dict[str, list[float]] = {name: [] for name in models}
    for name, model in models.items():  # warm-up
        model(prompt[:, :64], use_cache=True)
    for _ in range(rounds):
        for name, model in models.items():
            start = time.perf_counter()
            model(prompt, attention_mask=torch.ones_like(prompt), use_cache=True, logits_to_keep=1)
            times[name].append(time.perf_counter() - start)
    logger.info("prefill rounds: %s", times)
    return {name: statistics.median(values) for name, values in times.items()}


def _markdown(payload: dict[str, Any]) -> str:
    rows = payload["rows"] if "rows" in payload else payload.get("results", {}).get("rows", [])
    lines = [
        "# Token router (FTP) on SmolLM2-135M", "",
        "| method | token sparsity | decoder FLOPs saved | tail ppl | all-token ppl | zero-shot avg ± se | retention | "
        + " | ".join(TASKS) + " | prefill s | prefill speed-up | router params | search s | train s |",
        "|---|---|---|---|---|---|---|" + "---|" * len(TASKS) + "---|---|---|---|---|",
    ]
    for row in rows:
        tasks = " | ".join(_fmt(row.get("zero_shot", {}).get(task), ".3f") for task in TASKS)
        average = "—" if row.get("zero_shot_avg") is None else f"{row['zero_shot_avg']:.3f} ± {row['zero_shot_avg_stderr']:.3f}"
        lines.append(
            f"| {row['method']} | {row['sparsity']:.2f} | {_fmt(row.get('flop_fraction'), '.3f')} | "
            f"{row['tail_perplexity']:.2f} | {row['perplexity']:.4g} | {average} | "
            f"{_fmt(row.get('zero_shot_retention'), '.3f')} | {tasks} | {_fmt(row.get('prefill_seconds'), '.3f')} | "
            f"{_fmt(row.get('prefill_speedup'), '.2f')} | {_fmt(row.get('router_parameters'), 'd')} | "
            f"{_fmt(row.get('search_seconds'), '.0f')} | {_fmt(row.get('train_seconds'), '.0f')} |"
        )
    settings = payload.get("settings", {})
    lines += ["", "## Targets (computed from the rows above)", ""] + _targets(rows, settings)
    if settings:
        lines += ["", f"Zero-shot: {settings.get('limit')} examples per task (seeded subset), the average's standard "
                  "error is sqrt(Σ se²)/5; differences smaller than about two standard errors are ties. "
                  f"Perplexity: {settings.get('ppl_windows')} windows of 512 tokens, tail = last "
                  f"{settings.get('tail')} tokens. Prefill: one {settings.get('prefill_tokens')}-token prompt, median of "
                  f"{settings.get('rounds')} round-robin rounds on a shared, heavily loaded 2-core CPU (ratios side by "
                  "side, absolute seconds are not meaningful)."]
    return "\n".join(lines) + "\n"


def _targets(rows: list[dict[str, Any]], settings: dict[str, Any]) -> list[str]:
    """The issue's targets, met or missed, from the measured rows (zero-shot gaps within 2 standard errors are ties)."""
    lines = []
    dense = next(row for row in rows if row["method"] == "dense")
    parameters_share = next((row["router_share"] for row in rows if "router_share" in row), None)
    for sparsity in sorted({row["sparsity"] for row in rows if row["sparsity"]}):
        at = {row["method"].split(" (")[0]: row for row in rows if row["sparsity"] == sparsity}
        trained, static = at.get("trained router, searched schedule"), at.get("static, searched schedule")
        removal = at.get("ShortGPT block removal")
        if trained is None or static is None or removal is None:
            continue
        for name, key in (("tail", "tail_perplexity"), ("all-token", "perplexity")):
            verdict = "met" if trained[key] <= removal[key] else "missed"
            lines.append(f"- {sparsity:.2f}: trained router {name} ppl {trained[key]:.4g} vs ShortGPT {removal[key]:.4g} "
                         f"(dense {dense[key]:.4g}): {verdict}")
        verdict = "met" if trained["tail_perplexity"] < static["tail_perplexity"] else "missed"
        lines.append(f"- {sparsity:.2f}: trained router better than static (tail ppl {trained['tail_perplexity']:.2f} vs "
                     f"{static['tail_perplexity']:.2f}): {verdict}")
        if "zero_shot_avg" in trained:
            for other, label in ((static, "static"), (removal, "ShortGPT")):
                gap = trained["zero_shot_avg"] - other["zero_shot_avg"]
                noise = 2 * math.hypot(trained["zero_shot_avg_stderr"], other["zero_shot_avg_stderr"])
                verdict = "met" if gap >= 0.03 and gap > noise else ("tie within noise" if abs(gap) <= noise else "missed")
                lines.append(f"- {sparsity:.2f}: zero-shot trained − {label} = {100 * gap:+.1f} points (2 se = "
                             f"{100 * noise:.1f}; target ≥ +3): {verdict}")
        else:
            lines.append(f"- {sparsity:.2f}: zero-shot retention not measured at this sparsity")
        if "prefill_speedup" in trained:
            judged = settings.get("prefill_tokens", 0) >= 2048 and settings.get("rounds", 0) >= 2
            verdict = ("met" if trained["prefill_speedup"] >= 1.2 else "missed") if judged else (
                f"not judged ({settings.get('prefill_tokens')} tokens, {settings.get('rounds')} round: the issue asks "
                "for 2k tokens, and one round on this CPU is noise)")
            lines.append(f"- {sparsity:.2f}: prefill speed-up {trained['prefill_speedup']:.2f}× (target ≥ 1.2×): {verdict}")
    if parameters_share is not None:
        verdict = "met" if parameters_share <= 0.001 else "missed"
        lines.append(f"- router parameters {100 * parameters_share:.4f}% of the model (target ≤ 0.1%): {verdict}")
    return lines


def _fmt(value: Any, spec: str) -> str:
    return "—" if value is None else format(value, spec)


if __name__ == "__main__":
    main()
