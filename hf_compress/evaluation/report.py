"""Benchmark reports and the skeleton every ``scripts/bench_*.py`` shares.

Every script builds its parser with :func:`benchmark_parser` (``--quick``, ``--output-name``, ``--render``,
``--threads``, ``--device``), starts with :func:`start_benchmark` (logging, threads, the device; ``--render``
rebuilds the Markdown table from the stored JSON and exits) and writes ``bench/results/<name>.json`` and
``<name>.md`` through :func:`write_benchmark`, so each committed number carries how and where it was measured.
A run on a GPU (``--device cuda``, or ``auto`` where CUDA is present) writes to ``bench/results/gpu/`` instead,
beside the CPU tables, and names the GPU; :func:`synchronize` makes timings on CUDA wait for the kernels.

Example:
    >>> parser = benchmark_parser("demo benchmark", output_name="demo")
    >>> args = parser.parse_args(["--quick", "--device", "cpu"])
    >>> (args.quick, args.output_name, args.device)
    (True, 'demo', 'cpu')
"""

from __future__ import annotations

import argparse
import datetime as _dt
import functools
import importlib.metadata as metadata
import logging
import json
import os
import platform
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..utils import atomic_file


GPU_RESULTS_SUBDIR = "gpu"
# The device start_benchmark resolved for this run; write_benchmark files the results by it.
_run_device: torch.device | None = None

_PACKAGES = ("hf-compress", "torch", "transformers", "peft", "optimum", "accelerate", "datasets", "lm-eval")


def machine_info() -> dict[str, Any]:
    """CPU, core count, torch threads, GPU (if any) and package versions of this run.

    Example:
        >>> sorted(machine_info())[:3]
        ['cpu', 'cpu_count', 'gpu']
    """
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "packages": versions,
    }


@functools.cache
def source_commit() -> str | None:
    """The git commit of the code that ran (``<sha>+dirty`` when tracked files other than ``bench/results/`` differ
    from it, or files under ``hf_compress/`` or ``scripts/`` are not committed yet); ``None`` outside git. Results
    are outputs, not code: one benchmark's fresh table does not make the next benchmark's code "dirty".

    Recorded with every benchmark so a table says which code produced it. Read once per process (the first call:
    :func:`start_benchmark` makes it at the start), so a long run that saves results after later commits still
    names the code it loaded. A copy of the tree without its history (a lent GPU machine) names the commit it was
    copied from in ``$HF_COMPRESS_SOURCE_COMMIT`` (``scripts/gpu_session.sh`` sets it).

    Example:
        >>> source_commit()  # doctest: +SKIP
        '9b3fc25e1c0d…'
    """
    if os.environ.get("HF_COMPRESS_SOURCE_COMMIT"):
        return os.environ["HF_COMPRESS_SOURCE_COMMIT"]
    return _git_commit(Path(__file__).resolve().parents[2])


UNCOMMITTED_CODE = ("hf_compress/", "scripts/")
"""Folders whose files not yet committed make a run's commit ``+dirty`` (tracked changes anywhere outside
``bench/results/`` do)."""


def _git_commit(root: Path) -> str | None:
    import subprocess

    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--", ".", ":!bench/results"],
                                cwd=root, capture_output=True, text=True, check=True).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return None
    # A file not committed yet under the code's folders (a new module or benchmark script) ran too; other
    # untracked files (notes, logs) say nothing about the code. Ignored files are not listed at all.
    dirty = [line for line in status if not line.startswith("??") or line[3:].startswith(UNCOMMITTED_CODE)]
    return sha + ("+dirty" if dirty else "")


def benchmark_parser(
    description: str | None, output_name: str, threads: int | None = 2, devices: tuple[str, ...] = ("cpu",)
) -> argparse.ArgumentParser:
    """An ``ArgumentParser`` with the flags every benchmark takes; add the benchmark's own after it.

    ``threads=None`` leaves torch's thread count alone by default (``--threads`` still sets it). ``devices``
    are the device types the script runs on end to end; another one given to ``--device`` is refused.
    """
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.set_defaults(supported_devices=devices)
    parser.add_argument("--quick", action="store_true", help="tiny settings, to check the script runs")
    parser.add_argument("--output-name", default=output_name, help=f"bench/results/NAME.{{json,md}} (default {output_name})")
    parser.add_argument("--render", metavar="NAME", help="only rebuild bench/results/NAME.md from NAME.json")
    parser.add_argument("--threads", type=int, default=threads, help="torch CPU threads")
    parser.add_argument("--device", default="auto",
                        help=f"auto (CUDA when present and supported), or one of: {', '.join(devices)} (cuda:1, ... too)")
    return parser


def start_benchmark(args: argparse.Namespace, render: Callable[[dict[str, Any]], str]) -> bool:
    """Set up logging, threads and ``args.device``; with ``--render``, rebuild the table and return ``False``.

    Example:
        >>> if not start_benchmark(args, markdown):  # doctest: +SKIP
        ...     return
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.render:
        print(rewrite_markdown(args.render, render))
        return False
    source_commit()  # the code as it is now, before the run: what write_benchmark records
    if args.threads:
        torch.set_num_threads(args.threads)
    supported = args.supported_devices
    if "cpu" not in supported and not torch.cuda.is_available():
        raise SystemExit(f"{Path(sys.argv[0]).name} runs on CUDA only and no CUDA GPU is available here; run it "
                         "on a GPU machine (see `make bench-gpu`).")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() and "cuda" in supported else "cpu"
    if torch.device(args.device).type not in supported:
        raise SystemExit(f"{Path(sys.argv[0]).name}: --device {args.device} is not supported by this benchmark yet "
                         f"(it runs on: {', '.join(supported)}).")
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"{Path(sys.argv[0]).name}: --device {args.device}: no CUDA GPU is available here; "
                         "pass --device cpu (or auto).")
    global _run_device
    _run_device = torch.device(args.device)
    return True


def results_directory(device: str | torch.device | None = None, base: str | os.PathLike | None = None) -> Path:
    """Where a run's tables go: ``base`` for the CPU, ``base/gpu`` for CUDA (default: this run's device).

    ``base`` defaults to ``$HF_COMPRESS_BENCH_RESULTS`` or ``bench/results`` (a rehearsal points the variable
    elsewhere so it never overwrites the committed tables).

    Example:
        >>> str(results_directory("cuda")), str(results_directory("cpu"))
        ('bench/results/gpu', 'bench/results')
    """
    device = torch.device(device) if device is not None else _run_device
    base = base if base is not None else os.environ.get("HF_COMPRESS_BENCH_RESULTS", "bench/results")
    return Path(base) / GPU_RESULTS_SUBDIR if device is not None and device.type == "cuda" else Path(base)


def device_description(device: str | torch.device) -> str:
    """``"cpu"`` or ``"cuda (NVIDIA H200)"``: the device with the GPU's name, for tables.

    Example:
        >>> device_description("cpu")
        'cpu'
    """
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def synchronize(device: str | torch.device) -> None:
    """Wait for ``device``'s queued kernels (CUDA), so a ``perf_counter`` interval covers the work; no-op on CPU.

    Example:
        >>> synchronize("cpu")
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def write_benchmark(
    name: str, settings: dict[str, Any], results: dict[str, Any], markdown: str,
    results_dir: str | os.PathLike | None = None,
) -> tuple[Path, Path]:
    """Write ``<results_dir>/<name>.json`` (machine, command, device, settings, results) and ``<name>.md``.

    The Markdown file is ``markdown`` followed by the command, machine and date, so the table is never
    separated from how it was produced. ``results_dir`` defaults to :func:`results_directory` of the device
    :func:`start_benchmark` resolved: ``bench/results`` on the CPU, ``bench/results/gpu`` on CUDA.

    Example:
        >>> write_benchmark("reference", {"window": 512}, {"ppl": 21.1}, "| ppl |\\n|---|\\n| 21.1 |")  # doctest: +SKIP
    """
    directory = Path(results_dir) if results_dir is not None else results_directory()
    directory.mkdir(parents=True, exist_ok=True)
    command = " ".join(shlex.quote(arg) for arg in [Path(sys.executable).name, *sys.argv])
    when = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    machine = machine_info()
    device = device_description(_run_device) if _run_device is not None else None
    payload = {"name": name, "command": command, "date": when, "commit": source_commit(), "machine": machine,
               "device": device, "settings": settings, "results": results}
    json_path, md_path = directory / f"{name}.json", directory / f"{name}.md"
    with atomic_file(json_path) as handle:
        json.dump(payload, handle, indent=2, default=str)
    with atomic_file(md_path) as handle:
        handle.write(markdown.rstrip() + _footer(payload))
    return json_path, md_path


def rewrite_markdown(
    name: str, render: Callable[[dict[str, Any]], str], results_dir: str | os.PathLike | None = None
) -> Path:
    """Rewrite ``<name>.md`` from the run stored in ``<name>.json`` (e.g. after changing how a table is laid out).

    ``render`` turns the stored payload (``settings``, ``results``, ...) into the table; the footer keeps
    that run's command, date and machine, and says the table was rebuilt.

    Example:
        >>> rewrite_markdown("pruning", lambda payload: markdown(payload))  # doctest: +SKIP
    """
    # Default: where this run's tables go, $HF_COMPRESS_BENCH_RESULTS included (a rehearsal's --render stays there).
    directory = Path(results_dir) if results_dir is not None else results_directory("cpu")
    if not (directory / f"{name}.json").exists() and (directory / GPU_RESULTS_SUBDIR / f"{name}.json").exists():
        directory = directory / GPU_RESULTS_SUBDIR  # a GPU run's table
    payload = json.loads((directory / f"{name}.json").read_text(encoding="utf-8"))
    rebuilt = " ".join(shlex.quote(arg) for arg in [Path(sys.executable).name, *sys.argv])
    md_path = directory / f"{name}.md"
    with atomic_file(md_path) as handle:
        handle.write(render(payload).rstrip() + _footer(payload) + f"Table rebuilt from {name}.json by `{rebuilt}`.\n")
    return md_path


def _footer(payload: dict[str, Any]) -> str:
    machine = payload["machine"]
    return (
        f"\n\nCommand: `{payload['command']}`  \nDate: {payload['date']}  \n"
        + (f"Commit: {payload['commit']}  \n" if payload.get("commit") else "")
        + (f"Commit note: {payload['commit_note']}  \n" if payload.get("commit_note") else "")
        + (f"Device: {payload['device']}  \n" if payload.get("device") else "")
        + f"Machine: {machine['cpu']}, {machine['cpu_count']} cores, torch threads {machine['torch_threads']}"
        f"{', GPU ' + machine['gpu'] if machine['gpu'] else ', no GPU'}; "
        + ", ".join(f"{k} {v}" for k, v in machine["packages"].items() if v)
        + "  \n"
    )
