"""Token router (FTP) on SmolLM2-135M against its baselines, at one or more token sparsities.

Methods (same model, same calibration text; layer removal at the nearest matching fraction of decoder FLOPs):
dense; static router + uniform schedule; static router + searched schedule; random token selection + searched
schedule; trained router + searched schedule; ShortGPT block removal (``BlockRemovalPruner``). BlockPruner and SLEB
are not implemented in hf_compress yet and are not in this table.

Measured: perplexity (Wikipedia eval split, 512-token windows, each window one routed prompt forward), zero-shot
accuracy (ARC-E, PIQA, HellaSwag, Winogrande, BoolQ; each question one left-padded forward, ``share_context=False``
so the whole sequence is routed), prefill time of one 2k-token prompt (median of round-robin rounds, every method
timed in the same rounds), router parameters, search and training seconds.

Example:
    python scripts/bench_router.py                     # the settings in the table's footer
    python scripts/bench_router.py --quick             # a tiny model, to check the script runs
"""

from __future__ import annotations

import copy
import statistics
import time
from typing import Any

import torch

from hf_compress.assets import load_model, load_text
from hf_compress.evaluation.perplexity import evaluate_perplexity
from hf_compress.evaluation.report import benchmark_parser, start_benchmark, write_benchmark
from hf_compress.evaluation.zero_shot import evaluate_zero_shot
from hf_compress.routing import (
    RoutingSchedule, TokenRouterConfig, install_routing, routing_mode, search_schedule, train_token_router,
)
from hf_compress.training import TrainingSettings, causal_lm_dataset


TASKS = ("arc_easy", "piqa", "hellaswag", "winogrande", "boolq")


def main() -> None:
    parser = benchmark_parser(__doc__, "router")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.3])
    parser.add_argument("--ppl-windows", type=int, default=16, help="512-token Wikipedia eval windows (issue: 512)")
    parser.add_argument("--limit", type=int, default=100, help="examples per zero-shot task (issue: >= 500; 0 skips)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per search / training window")
    parser.add_argument("--search-windows", type=int, default=4, help="calibration windows per schedule score")
    parser.add_argument("--removal-sequences", type=int, default=8, help="ShortGPT calibration windows")
    parser.add_argument("--train-steps", type=int, default=100)
    parser.add_argument("--generations", type=int, default=4)
    parser.add_argument("--population", type=int, default=8)
    parser.add_argument("--prefill-tokens", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if not start_benchmark(args, _markdown):
        return
    if args.quick:
        args.model, args.ppl_windows, args.limit, args.train_steps = "tiny-llama", 2, 4, 2
        args.generations, args.population, args.prefill_tokens, args.rounds = 1, 3, 128, 1
    model, tokenizer = load_model(args.model)
    model.eval()
    tokenizer.padding_side = "left"
    calibration = load_text("wikipedia", "calibration")
    evaluation = load_text("wikipedia", "eval")
    parameters = sum(p.numel() for p in model.parameters())

    def measure(candidate) -> dict[str, Any]:
        ppl = evaluate_perplexity(candidate, tokenizer, evaluation, window=512, max_windows=args.ppl_windows, progress=False)
        if not args.limit:
            return {"perplexity": ppl["perplexity"]}
        zero = evaluate_zero_shot(candidate, tokenizer, TASKS, limit=args.limit, share_context=False, progress=False,
                                  batch_size=8)
        scores = {task: zero[task]["score"] for task in TASKS}  # lm-eval's metric of record per task
        return {"perplexity": ppl["perplexity"], "zero_shot": scores, "zero_shot_avg": statistics.mean(scores.values())}

    rows: list[dict[str, Any]] = []
    dense = {"method": "dense", "sparsity": 0.0, **measure(model)}
    rows.append(dense)
    prompt = torch.randint(3, min(1000, model.config.vocab_size), (1, args.prefill_tokens), generator=torch.Generator().manual_seed(0))
    timed: dict[str, Any] = {"dense": model}
    for sparsity in args.sparsities:
        config = TokenRouterConfig(token_sparsity=sparsity, generations=args.generations, population=args.population,
                                   search_windows=args.search_windows, search_seq_len=args.seq_len)
        start = time.perf_counter()
        schedule = search_schedule(model, calibration, config, tokenizer=tokenizer)
        search_seconds = time.perf_counter() - start
        num_blocks = len(schedule.block_sparsity)
        routed = copy.deepcopy(model)
        install_routing(routed, schedule, mode="static")
        for label, mode, plan in (("static, uniform schedule", "static", RoutingSchedule.uniform(sparsity, num_blocks)),
                                  ("static, searched schedule", "static", schedule),
                                  ("random tokens, searched schedule", "random", schedule)):
            with routing_mode(routed, mode, plan):
                rows.append({"method": label, "sparsity": sparsity, "search_seconds": search_seconds, **measure(routed)})
        data = causal_lm_dataset(calibration, tokenizer, num_sequences=args.train_steps, seq_len=args.seq_len, seed=1)
        settings = TrainingSettings(max_steps=args.train_steps, learning_rate=1e-3, per_device_batch_size=1,
                                    logging_steps=max(1, args.train_steps // 5), use_cpu=True)
        train_token_router(routed, schedule, data, args=settings, config=config)
        training = schedule.search["training"]
        rows.append({"method": "trained router, searched schedule", "sparsity": sparsity, "search_seconds": search_seconds,
                     "train_seconds": training["seconds"], "router_parameters": training["router_parameters"],
                     "router_share": training["router_parameters"] / parameters, **measure(routed)})
        timed[f"router {sparsity}"] = routed
        from hf_compress.pruning import BlockRemovalConfig, BlockRemovalPruner

        pruned = copy.deepcopy(model)
        removal = BlockRemovalConfig(target_sparsity=sparsity, num_calibration_sequences=args.removal_sequences,
                                     calibration_seq_len=args.seq_len)
        BlockRemovalPruner(pruned, tokenizer).prune(removal, calibration)
        rows.append({"method": "ShortGPT block removal", "sparsity": sparsity,
                     "blocks_removed": num_blocks - pruned.config.num_hidden_layers, **measure(pruned)})
        timed[f"shortgpt {sparsity}"] = pruned
    prefill = _prefill_times(timed, prompt, args.rounds)
    for row in rows:
        key = "dense" if row["method"] == "dense" else (
            f"router {row['sparsity']}" if row["method"].startswith("trained") else
            f"shortgpt {row['sparsity']}" if row["method"].startswith("ShortGPT") else None)
        if key in prefill:
            row["prefill_seconds"] = prefill[key]
            row["prefill_speedup"] = prefill["dense"] / prefill[key]
        if "zero_shot_avg" in row:
            row["zero_shot_retention"] = row["zero_shot_avg"] / dense["zero_shot_avg"]
    settings = {k: v for k, v in vars(args).items() if k not in ("render", "supported_devices")}
    settings["parameters"] = parameters
    write_benchmark(args.output_name, settings, {"rows": rows}, _markdown({"settings": settings, "rows": rows}))


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
    return {name: statistics.median(values) for name, values in times.items()}


def _markdown(payload: dict[str, Any]) -> str:
    rows = payload["rows"] if "rows" in payload else payload.get("results", {}).get("rows", [])
    lines = [
        "# Token router (FTP) on SmolLM2-135M", "",
        "| method | token sparsity | perplexity | zero-shot avg | retention | " + " | ".join(TASKS)
        + " | prefill s | prefill speed-up | router params | search s | train s |",
        "|---|---|---|---|---|" + "---|" * len(TASKS) + "---|---|---|---|---|",
    ]
    for row in rows:
        tasks = " | ".join(_fmt(row.get("zero_shot", {}).get(task), ".3f") for task in TASKS)
        lines.append(
            f"| {row['method']} | {row['sparsity']:.2f} | {row['perplexity']:.2f} | {_fmt(row.get('zero_shot_avg'), '.4f')} | "
            f"{_fmt(row.get('zero_shot_retention'), '.3f')} | {tasks} | {_fmt(row.get('prefill_seconds'), '.3f')} | "
            f"{_fmt(row.get('prefill_speedup'), '.2f')} | {_fmt(row.get('router_parameters'), 'd')} | "
            f"{_fmt(row.get('search_seconds'), '.0f')} | {_fmt(row.get('train_seconds'), '.0f')} |"
        )
    return "\n".join(lines) + "\n"


def _fmt(value: Any, spec: str) -> str:
    return "—" if value is None else format(value, spec)


if __name__ == "__main__":
    main()
