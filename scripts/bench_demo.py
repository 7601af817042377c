#!/usr/bin/env python
"""The demo's comparison table, measured with the current code → bench/results/demo-smollm2-135m.{json,md}.

Runs exactly what ``hf-compress demo`` runs (same model, methods and quick evaluation settings; ``--full``
for the full settings) into a temporary folder, and records the table with the command, the commit and
the machine, so the committed numbers can be traced to the code that produced them.

Usage:
    python scripts/bench_demo.py [--model smollm2-135m] [--full]
"""

from __future__ import annotations

import tempfile

from hf_compress.demo import FULL_SETTINGS, QUICK_SETTINGS, format_table, run_demo
from hf_compress.evaluation.report import benchmark_parser, start_benchmark, write_benchmark
from hf_compress.evaluation.suite import EvaluationSettings


def main() -> None:
    parser = benchmark_parser(__doc__, "demo-smollm2-135m", threads=None)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--full", action="store_true", help="the demo's full evaluation settings")
    args = parser.parse_args()
    if not start_benchmark(args, _markdown):
        return

    settings = FULL_SETTINGS if args.full else QUICK_SETTINGS
    if args.quick:
        settings = EvaluationSettings(perplexity_sets=("wikipedia",), max_windows=2, zero_shot_tasks=(),
                                      speed_prompts=1, max_new_tokens=8)
    with tempfile.TemporaryDirectory(prefix="hf_compress_demo_bench_") as output_dir:
        summary = run_demo(args.model, output_dir, settings=settings, overwrite=True)
    results = {"model": args.model, "rows": summary["rows"]}
    write_benchmark(args.output_name, settings.to_dict(), results,
                    _markdown({"settings": settings.to_dict(), "results": results}))


def _markdown(payload: dict) -> str:
    settings, results = payload["settings"], payload["results"]
    return "\n".join([
        f"# Demo: {results['model']}, every built-in method (what `hf-compress demo` prints)",
        "",
        f"Perplexity: {', '.join(settings['perplexity_sets'])}, up to {settings['max_windows']} windows of "
        f"{settings['window']} tokens; zero-shot: {', '.join(settings['zero_shot_tasks']) or 'none'} "
        f"(limit {settings['zero_shot_limit']}); tokens/s: greedy, batch 1, median of {settings['speed_prompts']} "
        f"prompts × {settings['max_new_tokens']} new tokens. Sizes in MiB.",
        "",
        format_table(results["rows"]),
    ])


if __name__ == "__main__":
    main()
