#!/usr/bin/env python
"""Cost of `import hf_compress` against `import transformers` → bench/results/import_time.{json,md}.

Each statement runs in a fresh interpreter (`python -X importtime` is not used: the wall clock of the
whole process start is what a user waits for), alternating the two so that load on the machine hits both
alike; the median of `--runs` runs is reported. Target (issue 17): hf_compress costs at most 0.5 s more.

Usage:
    python scripts/bench_import_time.py [--runs 5]
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time

from hf_compress.evaluation.report import benchmark_parser, start_benchmark, write_benchmark


STATEMENTS = {
    "python": "pass",
    "transformers": "import transformers",
    "hf_compress": "import hf_compress",
    "hf_compress + AutoModelForCausalLM": "import hf_compress; from transformers import AutoModelForCausalLM",
}
TARGET_S = 0.5


def _time(statement: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", statement], check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = benchmark_parser(__doc__, "import_time", threads=None)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    if not start_benchmark(args, lambda payload: _markdown(payload["settings"]["runs"], payload["results"])):
        return
    if args.quick:
        args.runs = 1
    for statement in STATEMENTS.values():  # warm the file cache once
        _time(statement)
    samples = {name: [] for name in STATEMENTS}
    for _ in range(args.runs):
        for name, statement in STATEMENTS.items():
            samples[name].append(_time(statement))
    medians = {name: statistics.median(values) for name, values in samples.items()}
    overhead = medians["hf_compress"] - medians["transformers"]
    results = {
        "median_s": medians,
        "samples_s": samples,
        "hf_compress_minus_transformers_s": overhead,
        "target_s": TARGET_S,
        "met": overhead <= TARGET_S,
    }
    table = _markdown(args.runs, results)
    write_benchmark(args.output_name, {"runs": args.runs, "statements": STATEMENTS}, results, table)
    print(table)


def _markdown(runs: int, results: dict) -> str:
    overhead = results["hf_compress_minus_transformers_s"]
    lines = [
        f"# Import time (fresh interpreter per run, median of {runs} runs)",
        "",
        "| statement | median (s) |",
        "|---|---|",
        *(f"| `{STATEMENTS[name]}` | {value:.3f} |" for name, value in results["median_s"].items()),
        "",
        f"`import hf_compress` − `import transformers`: **{overhead:+.3f} s** "
        f"(target ≤ {TARGET_S} s: {'met' if overhead <= TARGET_S else 'MISSED'}).",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
