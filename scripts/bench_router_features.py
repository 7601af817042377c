#!/usr/bin/env python
"""What the token router's features allow: hand-set routers that mix position with one other factor →
bench/results/<name>.json.

The trained router never beat the static rule it starts from (``token_router.md``). This asks how much there was to
gain within the router's inputs at all: each hand-set router is the static rule (``TokenRouter``'s initialisation,
ranking by position) plus one hidden unit reading one more factor, ``± w · gelu(4 · factor)``:

- ``attention``: the log-bounded attention proxy (a token the last one attends to more is kept more);
- ``rank``: that score's rank within the row (subtracted, so the most attended tokens are kept more).

Each is scored by the held-out tail KL to the dense model on the windows ``train_token_router`` selects on in
``bench_token_router.py`` (the last ``validation_windows`` of the same calibration rows), then the static rule and the
best mix are compared by perplexity on the Wikipedia eval windows, which the choice never saw. The schedule is the
searched one recorded in ``bench/results/token_router.json`` at ``--sparsity`` (searched again when absent).

Usage:
    python scripts/bench_router_features.py
    python scripts/bench_router_features.py --quick --output-name router-features-smoke
    python scripts/bench_router_features.py --render router_features
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from hf_compress.assets import load_model, load_text, tiny_model
from hf_compress.evaluation.perplexity import token_windows, tokenize_stream
from hf_compress.evaluation.report import benchmark_parser, results_directory, start_benchmark, write_benchmark
from hf_compress.evaluation.uncertainty import paired_difference
from hf_compress.modeling import find_decoder_blocks
from hf_compress.routing import RoutingSchedule, TokenRouterConfig, install_routing, search_schedule
from hf_compress.routing.router import TokenRouter
from hf_compress.routing.training import KeepBestRouter
from hf_compress.training import causal_lm_dataset


sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_token_router import window_nlls  # noqa: E402  (the per-window losses of bench/results/token_router.md)


logger = logging.getLogger("bench_router_features")

# Column of router_features, and the sign that keeps the more attended tokens.
FACTORS = {"attention": (1, 1.0), "rank": (2, -1.0)}


def mixed_router(factor: str | None, weight: float, hidden_size: int = 64) -> TokenRouter:
    """The static rule plus ``sign · weight · gelu(4 · factor)`` from hidden unit 2 (``factor=None``: the rule)."""
    router = TokenRouter(hidden_size)
    if factor is not None:
        with torch.no_grad():
            router.hidden.weight[2].zero_()
            column, sign = FACTORS[factor]
            router.hidden.weight[2, column] = 4.0
            router.hidden.bias[2] = 0.0
            router.output.weight[0, 2] = sign * weight
    return router


def router_bench_parser(description: str, name: str, weights: list[float]) -> argparse.ArgumentParser:
    """The flags this bench and ``bench_router_oracle.py`` share (the held-out rows must be the same)."""
    parser = benchmark_parser(description, name)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--sparsity", type=float, default=0.3)
    parser.add_argument("--weights", type=float, nargs="+", default=weights)
    parser.add_argument("--train-steps", type=int, default=150, help="bench_token_router's, to hold out the same rows")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--ppl-windows", type=int, default=64, help="512-token Wikipedia eval windows")
    parser.add_argument("--tail", type=int, default=128)
    return parser


def router_bench_setup(args: argparse.Namespace, quick_weight: float) -> tuple[Any, Any, TokenRouterConfig,
                                                                             RoutingSchedule, list[dict[str, Any]]]:
    """Model, tokenizer, config, the recorded schedule (searched again when absent) and the held-out rows router
    training selects on in ``bench_token_router.py``. ``--quick`` swaps in a tiny model and small settings."""
    if args.quick:
        args.model, args.weights, args.train_steps, args.seq_len, args.ppl_windows, args.tail = (
            "tiny-llama", [quick_weight], 2, 32, 2, 16)
        model, tokenizer = tiny_model("llama")
    else:
        model, tokenizer = load_model(args.model)
    model.eval()
    config = TokenRouterConfig(token_sparsity=args.sparsity)
    calibration = load_text("wikipedia", "calibration")
    schedule = _recorded_schedule(args.sparsity, len(find_decoder_blocks(model)[1]))
    if schedule is None:
        schedule = search_schedule(model, calibration, config, tokenizer=tokenizer)
    data = causal_lm_dataset(calibration, tokenizer, num_sequences=args.train_steps + config.validation_windows,
                             seq_len=args.seq_len, seed=1)
    return model, tokenizer, config, schedule, list(data.select(range(args.train_steps, len(data))))


def main() -> None:
    args = router_bench_parser(__doc__, "router_features", [0.25, 0.5, 1, 2, 4, 8]).parse_args()
    if not start_benchmark(args, _markdown):
        return
    model, tokenizer, config, schedule, held_out = router_bench_setup(args, quick_weight=1.0)
    state = install_routing(model, schedule, mode="router")
    scorer = KeepBestRouter(model, held_out, config, every=1)
    rows = []
    for factor, weight in [(None, 0.0)] + [(f, w) for f in FACTORS for w in args.weights]:
        state.router.load_state_dict(mixed_router(factor, weight, config.router_hidden_size).state_dict())
        start = time.perf_counter()
        rows.append({"factor": factor or "none (static rule)", "weight": weight,
                     "validation_kl": scorer.validation_kl(), "seconds": time.perf_counter() - start})
        logger.info("%s", rows[-1])
    static, best = rows[0], min(rows, key=lambda row: row["validation_kl"])
    windows = token_windows(tokenize_stream(load_text("wikipedia", "eval"), tokenizer), 512, args.ppl_windows)
    for row, factor in ((static, None), (best, best["factor"])) if best is not static else ((static, None),):
        state.router.load_state_dict(mixed_router(factor, row["weight"], config.router_hidden_size).state_dict())
        row["eval"] = [float(nll[-args.tail:].mean()) for nll in window_nlls(model, windows)]
    settings = {k: v for k, v in vars(args).items() if k not in ("render", "supported_devices")}
    settings.update(schedule=schedule.block_sparsity, validation_windows=config.validation_windows,
                    loss_tail=config.loss_tail)
    results = {"rows": rows, "best": rows.index(best), "paired": _paired(static["eval"], best["eval"])}
    write_benchmark(args.output_name, settings, results, _markdown({"settings": settings, "results": results}))


def _recorded_schedule(sparsity: float, blocks: int) -> RoutingSchedule | None:
    path = results_directory() / "token_router.json"
    if not path.is_file():
        return None
    for row in json.loads(path.read_text(encoding="utf-8"))["results"]["rows"]:
        if row["method"] == "static, searched schedule" and row["sparsity"] == sparsity and len(row["schedule"]) == blocks:
            return RoutingSchedule(row["schedule"])
    return None


def _paired(static: list[float], best: list[float]) -> dict[str, float]:
    """Tail perplexities and the best mix's paired log-perplexity difference to the static rule (± its SE)."""
    difference, spread = paired_difference(best, static)
    return {"static_tail_ppl": math.exp(statistics.fmean(static)), "best_tail_ppl": math.exp(statistics.fmean(best)),
            "log_ppl_difference": difference, "log_ppl_difference_se": spread}


def _verdict(paired: dict[str, float]) -> str:
    difference, error = paired["log_ppl_difference"], paired["log_ppl_difference_se"]
    if abs(difference) <= 2 * error:
        return "a tie (within two standard errors)"
    return "lower than the static rule's" if difference < 0 else "higher than the static rule's"


def _markdown(payload: dict[str, Any]) -> str:
    settings, results = payload["settings"], payload["results"]
    rows, best, paired = results["rows"], results["rows"][results["best"]], results["paired"]
    static_kl = rows[0]["validation_kl"]
    lines = [
        f"# Token router: what its features allow ({settings.get('model')}, {settings.get('sparsity'):.0%} tokens "
        "skipped, searched schedule)", "",
        "Hand-set routers: the static rule (rank by position) plus `± w · gelu(4 · factor)` of one more factor. Held-out "
        f"tail KL to the dense model on the {settings.get('validation_windows')} windows router training selects on "
        f"(last {settings.get('loss_tail'):.0%} of {settings.get('seq_len')} tokens).", "",
        "| factor | w | held-out tail KL | vs static rule |", "|---|---|---|---|",
    ]
    for row in rows:
        change = row["validation_kl"] / static_kl - 1
        lines.append(f"| {row['factor']} | {row['weight']:g} | {row['validation_kl']:.5f} | {change:+.1%} |")
    lines += ["", f"Best mix: {best['factor']}, w = {best['weight']:g}. On {settings.get('ppl_windows')} Wikipedia eval "
              f"windows of 512 tokens (last {settings.get('tail')} scored), not used to choose it: tail perplexity "
              f"{paired['best_tail_ppl']:.3f} vs the static rule's {paired['static_tail_ppl']:.3f} (log-perplexity "
              f"difference {paired['log_ppl_difference']:+.4f} ± {paired['log_ppl_difference_se']:.4f}, paired over "
              f"windows): {_verdict(paired)}."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
