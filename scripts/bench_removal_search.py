#!/usr/bin/env python
"""Greedy removal search (SLEB, BlockPruner): resumed forwards against whole forwards → bench/results/<name>.json.

Every round of ``pruning.removal_search.greedy_removal`` scores each remaining candidate by the calibration loss of
the model without it. Removing a candidate changes nothing before its first block, so the search resumes each
candidate's forward at that block from saved hidden states (``reuse_prefix=True``, the default) instead of running
the whole model (``reuse_prefix=False``). This script times both on the same model and calibration windows and
checks that they choose the same candidates:

- ``sleb``: whole blocks (the first and last protected, as ``SLEBConfig`` does);
- ``block_pruner``: every attention and MLP sub-block (BlockPruner's candidates).

Each search runs ``--rounds`` rounds (unit costs, budget = rounds), the two settings back to back, in alternating
order over ``--repeats`` repeats; the table gives the median seconds per setting and their ratio.

Usage:
    python scripts/bench_removal_search.py
    python scripts/bench_removal_search.py --quick --output-name removal-search-smoke
    python scripts/bench_removal_search.py --render removal_search
"""

from __future__ import annotations

import logging
import statistics
import time
from typing import Any

from hf_compress.assets import load_model, load_text, tiny_model
from hf_compress.evaluation.report import benchmark_parser, start_benchmark, write_benchmark
from hf_compress.modeling import calibration_batches, find_decoder_blocks
from hf_compress.pruning.removal_search import greedy_removal


logger = logging.getLogger("bench_removal_search")


def candidates_of(search: str, num_blocks: int) -> list[list[tuple[int, str]]]:
    """The candidate sets of SLEB (whole blocks, ends protected) and BlockPruner (every sub-block)."""
    if search == "sleb":
        return [[(index, "attention"), (index, "mlp")] for index in range(1, num_blocks - 1)]
    return [[(index, kind)] for index in range(num_blocks) for kind in ("attention", "mlp")]


def main() -> None:
    parser = benchmark_parser(__doc__, "removal_search", devices=("cpu", "cuda"))
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--searches", nargs="+", choices=("sleb", "block_pruner"), default=["sleb", "block_pruner"])
    parser.add_argument("--sequences", type=int, default=4, help="calibration windows (bench_token_router's setting)")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3, help="candidates removed per search")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    if not start_benchmark(args, _markdown):
        return
    if args.quick:
        args.sequences, args.seq_len, args.rounds, args.model = 2, 32, 1, "tiny-llama"
        model, tokenizer = tiny_model("llama", num_hidden_layers=4)
    else:
        model, tokenizer = load_model(args.model)
    model.to(args.device).eval()
    ids = calibration_batches(load_text("wikipedia", "calibration"), tokenizer, num_sequences=args.sequences,
                              seq_len=args.seq_len)
    num_blocks = len(find_decoder_blocks(model)[1])
    rows = []
    for search in args.searches:
        candidates = candidates_of(search, num_blocks)
        seconds: dict[str, list[float]] = {"resumed": [], "whole": []}
        results: dict[str, Any] = {}
        for repeat in range(args.repeats):
            order = ("resumed", "whole") if repeat % 2 == 0 else ("whole", "resumed")
            for setting in order:
                start = time.perf_counter()
                results[setting] = greedy_removal(model, ids, candidates, [1.0] * len(candidates), args.rounds,
                                                  batch_size=args.batch_size, progress=False,
                                                  reuse_prefix=setting == "resumed")
                seconds[setting].append(time.perf_counter() - start)
                logger.info("%s, %s forwards: %.1f s, removed %s", search, setting, seconds[setting][-1],
                            results[setting].removed)
        losses = {setting: [step["loss"] for step in result.history] for setting, result in results.items()}
        rows.append({
            "search": search, "candidates": len(candidates), "rounds": args.rounds,
            "seconds": seconds, "median_seconds": {k: statistics.median(v) for k, v in seconds.items()},
            "speedup": statistics.median(seconds["whole"]) / statistics.median(seconds["resumed"]),
            "same_choices": results["resumed"].removed == results["whole"].removed,
            "removed": results["resumed"].removed, "losses": losses,
            "max_loss_difference": max(abs(a - b) for a, b in zip(losses["resumed"], losses["whole"])),
        })
    settings = {k: v for k, v in vars(args).items() if k not in ("render", "supported_devices")}
    settings["num_blocks"] = num_blocks
    write_benchmark(args.output_name, settings, {"rows": rows}, _markdown({"settings": settings, "rows": rows}))


def _markdown(payload: dict[str, Any]) -> str:
    settings = payload.get("settings", {})
    rows = payload["rows"] if "rows" in payload else payload.get("results", {}).get("rows", [])
    lines = [
        f"# Greedy removal search: resumed vs whole forwards ({settings.get('model')}, {settings.get('device')})", "",
        f"{settings.get('sequences')} calibration windows of {settings.get('seq_len')} tokens, "
        f"{settings.get('num_blocks')} decoder blocks; each search removes {settings.get('rounds')} candidates "
        f"(unit costs); median of {settings.get('repeats')} repeat(s), the two settings back to back in alternating "
        "order.", "",
        "| search | candidates | rounds | whole forwards s | resumed s | speed-up | same choices | "
        "max loss difference |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(f"| {row['search']} | {row['candidates']} | {row['rounds']} | "
                     f"{row['median_seconds']['whole']:.1f} | {row['median_seconds']['resumed']:.1f} | "
                     f"{row['speedup']:.2f}× | {'yes' if row['same_choices'] else 'NO'} | "
                     f"{row['max_loss_difference']:.1e} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
