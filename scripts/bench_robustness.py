#!/usr/bin/env python
"""The fault and bad-input matrix of issue 19 → bench/results/robustness.{json,md}.

Four parts, each in ``scripts/robustness/``:

- ``bad_inputs``: distinct bad inputs to every public API and the CLI; each must raise a clear error
  (expected exception type, message naming the argument) or be valid;
- ``corruptions``: damaged checkpoints of the sparse, packed and slim formats; each must be refused with a
  clear error, none may load with different logits or grow peak memory by more than 2x the checkpoint;
- ``faults``: SIGINT, SIGKILL and a full disk at many points of every save path; the previous artifact must
  stay bit-identical and loadable, the user's file kept, and no staging entry may survive the next save;
- ``push``: a folder with secrets, pickles and caches pushed to a fake Hub uploads only allow-listed files.

Usage:
    python scripts/bench_robustness.py [--points 10] [--parts bad_inputs corruptions faults push]
    (rerunning some parts keeps the stored results of the others, and says so in the settings)
"""

from __future__ import annotations

import collections
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from hf_compress.evaluation.report import benchmark_parser, start_benchmark, write_benchmark


sys.path.insert(0, str(Path(__file__).resolve().parent))

PARTS = ("bad_inputs", "corruptions", "faults", "push")


def run_bad_inputs(workdir: Path) -> dict[str, Any]:
    from robustness.bad_inputs import cases
    from robustness.common import run_cases

    rows = run_cases(cases(workdir))
    return {"rows": rows, "outcomes": dict(collections.Counter(row["outcome"] for row in rows))}


def run_corruptions(workdir: Path) -> dict[str, Any]:
    from robustness.corruptions import run

    rows = run(workdir)
    return {
        "rows": rows,
        "outcomes": dict(collections.Counter(row["outcome"] for row in rows)),
        "by_format": {fmt: sum(row["format"] == fmt for row in rows) for fmt in ("sparse", "packed", "slim")},
        "over_2x_model": sum(bool(row["over_2x_model"]) for row in rows),
    }


def run_faults(workdir: Path, points: int) -> dict[str, Any]:
    from robustness.faults import run

    rows = run(workdir, points=points)
    table = collections.defaultdict(lambda: {"points": 0, "ok": 0})
    for row in rows:
        if "skipped" in row:
            continue
        cell = table[(row["save_path"], row["fault"])]
        cell["points"] += 1
        cell["ok"] += bool(row["ok"])
    return {
        "rows": rows,
        "summary": [{"save_path": k[0], "fault": k[1], **v} for k, v in table.items()],
        "skipped": [row for row in rows if "skipped" in row],
    }


def run_push(workdir: Path) -> dict[str, Any]:
    from robustness.push import run

    return run(workdir)


def _markdown(results: dict[str, Any]) -> str:
    lines = ["# Robustness: bad inputs, corrupted checkpoints, faults during saves, pushes (issue 19)", ""]
    if "bad_inputs" in results:
        part = results["bad_inputs"]
        total = len(part["rows"])
        lines += [
            "## Bad inputs", "",
            f"{total} distinct inputs across the public APIs and the CLI.", "",
            "| outcome | count |", "|---|---|",
            *[f"| {name} | {part['outcomes'].get(name, 0)} |" for name in
              ("clear_error", "valid", "silently_accepted", "unclear", "crash")],
            "",
        ]
        groups = collections.Counter(row["group"] for row in part["rows"])
        lines += ["| API | inputs |", "|---|---|", *[f"| {g} | {n} |" for g, n in sorted(groups.items())], ""]
        bad = [row for row in part["rows"] if row["outcome"] not in ("clear_error", "valid")]
        if bad:
            lines += ["Findings:", "", *[f"- {r['group']} / {r['case']}: {r['outcome']} ({r.get('error', '')})" for r in bad], ""]
    if "corruptions" in results:
        part = results["corruptions"]
        lines += [
            "## Corrupted checkpoints", "",
            f"{len(part['rows'])} corruptions ({', '.join(f'{f} {n}' for f, n in part['by_format'].items())}); "
            f"{part['over_2x_model']} grew peak memory by more than 2x the checkpoint.", "",
            "| format | corruption | outcome | error |", "|---|---|---|---|",
            *[f"| {r['format']} | {r['case']} | {r['outcome']} | {r.get('error', '').replace('|', '/')[:140]} |"
              for r in part["rows"]],
            "",
        ]
    if "faults" in results:
        part = results["faults"]
        lines += [
            "## Faults during saves", "",
            "Each point: overwrite version 1 with version 2, interrupted at the k-th Python call of the save "
            "(SIGINT, SIGKILL) or with a disk that has room for only part of version 2. ok = version 1 "
            "bit-identical and loadable, the user's file kept, no staging entry left after the next save "
            "(after SIGINT and disk full: none even before).", "",
            "| save path | fault | points | ok |", "|---|---|---|---|",
            *[f"| {c['save_path']} | {c['fault']} | {c['points']} | {c['ok']} |" for c in part["summary"]],
            "",
        ]
        for row in part["skipped"]:
            lines.append(f"- {row['save_path']}: disk full skipped ({row['skipped']})")
    if "push" in results:
        part = results["push"]
        lines += ["## Push of a folder with secrets, pickles and caches (fake Hub)", ""]
        for key, value in part.items():
            lines.append(f"- {key}: {value}")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = benchmark_parser(__doc__, "robustness", threads=2)
    parser.add_argument("--points", type=int, default=10, help="fault points per save path and fault kind")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    args = parser.parse_args()
    if not start_benchmark(args, lambda payload: _markdown(payload["results"])):
        return
    points = 2 if args.quick else args.points
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for part in args.parts:
            (workdir / part).mkdir()
            if part == "bad_inputs":
                results[part] = run_bad_inputs(workdir / part)
            elif part == "corruptions":
                results[part] = run_corruptions(workdir / part)
            elif part == "faults":
                results[part] = run_faults(workdir / part, points)
            else:
                results[part] = run_push(workdir / part)
    stored = Path("bench/results") / f"{args.output_name}.json"
    if set(args.parts) != set(PARTS) and stored.is_file():  # rerunning some parts keeps the others' results
        previous = json.loads(stored.read_text())
        results = {**{k: v for k, v in previous["results"].items() if k not in results}, **results}
        args.parts = sorted(set(args.parts) | set(previous["settings"]["parts"]))
    results = {part: results[part] for part in PARTS if part in results}
    table = _markdown(results)
    write_benchmark(args.output_name, {"points": points, "parts": args.parts}, results, table)
    print(table)


if __name__ == "__main__":
    main()
