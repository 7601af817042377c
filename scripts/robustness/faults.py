"""Faults in the middle of every save path: SIGINT, SIGKILL and a full disk at many points of each save.

Each save path overwrites an existing artifact (version 1) with a new one (version 2) in a folder that also
holds a user's file. A forked child runs the save and is interrupted at the k-th Python function call of
the save (``sys.setprofile``), for ``points`` values of k spread over the whole call count of an
uninterrupted save: SIGINT (``KeyboardInterrupt``: the cleanup code runs) and SIGKILL (nothing runs). A
full disk is a tmpfs mounted with room for version 1 plus a fraction of version 2 (needs root; skipped
otherwise). After each fault: the folder must be bit-identical to version 1 (and load), the user's file
must be there, no staging entry may be left except a SIGKILLed writer's, and the next successful save
must sweep that one.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


STAGING = re.compile(r"^\..+\.(tmp|old)-\d+-")
SavePath = Callable[[Path, int], None]  # (target, version) -> writes that version, overwrite=True


def save_paths() -> dict[str, tuple[SavePath, Callable[[Path], Any] | None]]:
    """Every writer of the library: name -> (save(target, version), load(target) or None)."""
    from transformers import AutoModelForCausalLM

    from hf_compress.assets import tiny_model
    from hf_compress.evaluation.report import write_benchmark
    from hf_compress.formats.packed import save_packed
    from hf_compress.formats.slim import save_slim
    from hf_compress.hub import build_model_card, write_model_card
    from hf_compress.modeling.structure import block_structure, shrink_block
    from hf_compress.pruning.storage import save_pruned
    from hf_compress.quantization import quantize_rtn
    from hf_compress.speculative import FLy

    models = {}
    for version in (1, 2):
        torch.manual_seed(version)
        model, tokenizer = tiny_model("llama")
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                parameter.add_(torch.randn_like(parameter) * 0.01)
                if "proj" in name:
                    parameter.mul_(torch.rand_like(parameter) > 0.5)
        slim, _ = tiny_model("llama")
        shrink_block(block_structure(slim.model.layers[1]), kept_ffn=torch.arange(16 * version))
        models[version] = (model, tokenizer, quantize_rtn(tiny_model("llama")[0], bits=2 + version, group_size=32), slim)

    def load(target: Path) -> Any:
        return AutoModelForCausalLM.from_pretrained(target)

    def card(target: Path, version: int) -> None:
        write_model_card(target, build_model_card(base_model=None, model_name=f"v{version}", recipe={"method": "magnitude", "version": version}))

    def card_in_folder(target: Path, version: int) -> None:
        target.mkdir(exist_ok=True)
        card(target, version)

    return {
        "sparse (save_pruned)": (lambda t, v: save_pruned(models[v][0], models[v][1], t, overwrite=True), load),
        "packed (save_packed)": (lambda t, v: save_packed(models[v][2], models[v][1], t, overwrite=True), load),
        "slim (save_slim)": (lambda t, v: save_slim(models[v][3], models[v][1], t, overwrite=True), load),
        "strategy folder (FLy.save_pretrained)": (
            lambda t, v: FLy(entropy_threshold=0.1 * v).save_pretrained(t, overwrite=True), None),
        "benchmark output (write_benchmark)": (
            lambda t, v: write_benchmark("bench", {"v": v}, {"x": list(range(1000 * v))}, f"| v |\n|---|\n| {v} |", t), None),
        "model card (write_model_card)": (card_in_folder, None),
    }


def snapshot(folder: Path) -> dict[str, str]:
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*")) if path.is_file() and not STAGING.match(path.name)
    }


def leftovers(parent: Path, target: Path) -> list[str]:
    """Staging or aside entries next to the target, or (for file writers) inside it."""
    places = [parent] + ([target] if target.is_dir() else [])
    return sorted(str(p.relative_to(parent)) for place in places for p in place.iterdir() if STAGING.match(p.name))


def _interrupt_at(at_call: int, fault: str) -> None:
    """Deliver ``fault`` to this process at its ``at_call``-th Python function call from now."""
    calls = 0

    def profile(frame, event, arg):  # noqa: ANN001
        nonlocal calls
        if event == "call":
            calls += 1
            if calls == at_call:
                sys.setprofile(None)
                os.kill(os.getpid(), signal.SIGKILL if fault == "SIGKILL" else signal.SIGINT)

    sys.setprofile(profile)


def _count_calls(save: SavePath, target: Path) -> int:
    calls = 0

    def profile(frame, event, arg):  # noqa: ANN001
        nonlocal calls
        calls += event == "call"

    sys.setprofile(profile)
    try:
        save(target, 2)
    finally:
        sys.setprofile(None)
    return calls


def worker(name: str, target: Path, at_call: int) -> None:
    """In a fresh process (forking a process that holds thread pools can deadlock): save version 2 into
    ``target`` and SIGKILL this process at call ``at_call`` (0: count the calls and print the count)."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    save, _ = save_paths()[name]
    scratch = Path(tempfile.mkdtemp())
    save(scratch / "warm-up", 1)  # first-call imports and caches, so that call k means the same in every process
    shutil.rmtree(scratch)
    if at_call == 0:
        print(_count_calls(save, target), flush=True)
        return
    _interrupt_at(at_call, "SIGKILL")
    save(target, 2)
    sys.setprofile(None)


def _spawn(name: str, target: Path, at_call: int) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, __file__, name, str(target), str(at_call)], capture_output=True, text=True, timeout=600,
    )


def _prepare(save: SavePath, parent: Path) -> tuple[Path, dict[str, str]]:
    if parent.exists():
        shutil.rmtree(parent)
    parent.mkdir(parents=True)
    target = parent / "artifact"
    save(target, 1)
    if target.is_dir():
        (target / "my-notes.txt").write_text("the user's file")
    return target, snapshot(target) if target.is_dir() else {}


def check(row: dict[str, Any], target: Path, before: dict[str, str], load: Callable[[Path], Any] | None,
          after: dict[str, str] | None = None) -> None:
    now = snapshot(target)
    row["previous_intact"] = now == before
    # Writers of several independent files (a benchmark's JSON and table) replace each file atomically:
    # none may be torn, i.e. each is wholly the old or wholly the new version.
    row["no_torn_file"] = all(digest in (before.get(name), (after or {}).get(name)) for name, digest in now.items())
    row["user_file_kept"] = (target / "my-notes.txt").is_file()
    if load is not None and row["previous_intact"]:
        try:
            load(target)
            row["previous_loads"] = True
        except Exception as err:  # noqa: BLE001
            row["previous_loads"] = f"{type(err).__name__}: {err}"[:200]


def _after_fault(row: dict[str, Any], save: SavePath, load, parent: Path, target: Path, before: dict[str, str],
                 fault: str, finished: bool, after: dict[str, str]) -> dict[str, Any]:
    row["save_finished_anyway"] = finished  # the signal landed after the new artifact was in place
    if finished:
        row["previous_intact"] = row["previous_loads"] = row["no_torn_file"] = True  # a complete version 2
        row["user_file_kept"] = (target / "my-notes.txt").is_file()
    else:
        check(row, target, before, load, after)
    stray = leftovers(parent, target)
    row["stray_after_fault"] = stray
    save(target, 2)  # the next save sweeps what a killed writer left
    row["stray_after_next_save"] = leftovers(parent, target)
    intact = row["no_torn_file"] if row["save_path"] in SEVERAL_FILES else row["previous_intact"]
    row["ok"] = (
        intact and row["user_file_kept"] and row.get("previous_loads", True) is True
        and not row["stray_after_next_save"] and (fault == "SIGKILL" or not stray)
    )
    return row


SEVERAL_FILES = {"benchmark output (write_benchmark)"}


def _version_two(save: SavePath, workdir: Path) -> dict[str, str]:
    target, _ = _prepare(save, workdir / "v2")
    save(target, 2)
    return snapshot(target)


def run_signals(name: str, save: SavePath, load, workdir: Path, points: int, rng: random.Random) -> list[dict[str, Any]]:
    parent = workdir / "signals"
    target, _ = _prepare(save, parent)
    total = int(_spawn(name, workdir / "count", 0).stdout.split()[-1])
    after = _version_two(save, workdir)
    rows = []
    # SIGINT: KeyboardInterrupt and the cleanup run in this process.
    _count_calls(save, workdir / "warm")
    for k in sorted(rng.sample(range(1, total + 1), min(points, total))):
        target, before = _prepare(save, parent)
        finished = True
        _interrupt_at(k, "SIGINT")
        try:
            save(target, 2)
        except KeyboardInterrupt:
            finished = False
        finally:
            sys.setprofile(None)
        row = {"save_path": name, "fault": "SIGINT", "at_call": k, "of_calls": total}
        rows.append(_after_fault(row, save, load, parent, target, before, "SIGINT", finished, after))
    # SIGKILL: a fresh process per point; nothing of it runs after the signal.
    for k in sorted(rng.sample(range(1, total + 1), min(points, total))):
        target, before = _prepare(save, parent)
        done = _spawn(name, target, k)
        finished = done.returncode == 0
        if not finished and done.returncode != -signal.SIGKILL:
            raise RuntimeError(f"fault worker failed: {done.stderr[-2000:]}")
        row = {"save_path": name, "fault": "SIGKILL", "at_call": k, "of_calls": total}
        rows.append(_after_fault(row, save, load, parent, target, before, "SIGKILL", finished, after))
    return rows


def _mount_tmpfs(path: Path, size: int) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    return done.returncode == 0


def run_disk_full(name: str, save: SavePath, load, workdir: Path, points: int) -> list[dict[str, Any]]:
    probe = workdir / "probe"
    target, _ = _prepare(save, probe)
    used = sum(p.stat().st_size for p in probe.rglob("*") if p.is_file())
    save(target, 2)
    after = snapshot(target)
    rows = []
    mount = workdir / "disk"
    for index in range(points):
        fraction = (index + 0.5) / points
        size = 64 * 1024 + used + int(fraction * used)  # room for version 1 and part of version 2
        if not _mount_tmpfs(mount, size):
            return [{"save_path": name, "fault": "disk full", "skipped": "cannot mount a tmpfs (needs root)"}]
        try:
            target, before = _prepare(save, mount / "parent")
            row = {"save_path": name, "fault": "disk full", "free_fraction_of_new": round(fraction, 2)}
            try:
                save(target, 2)
                row["save_finished_anyway"] = True
                row["previous_intact"] = row["user_file_kept"] = True
            except Exception as err:  # noqa: BLE001 - OSError, or safetensors' own error wrapping ENOSPC
                row["save_finished_anyway"] = False
                row["error"] = f"{type(err).__name__}: {err}"[:160]
                check(row, target, before, load, after)
            row["stray_after_fault"] = leftovers(mount / "parent", target)
            intact = row.get("no_torn_file", True) if name in SEVERAL_FILES else row["previous_intact"]
            row["ok"] = intact and row["user_file_kept"] and row.get("previous_loads", True) is True \
                and not row["stray_after_fault"]
            rows.append(row)
        finally:
            subprocess.run(["umount", str(mount)], capture_output=True)
    return rows


def run(workdir: Path, points: int = 10, seed: int = 0) -> list[dict[str, Any]]:
    """The whole fault matrix: every save path x (SIGINT, SIGKILL, disk full) x ``points`` points."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    rng = random.Random(seed)
    rows = []
    for name, (save, load) in save_paths().items():
        scratch = Path(tempfile.mkdtemp(dir=workdir))
        rows += run_signals(name, save, load, scratch, points, rng)
        rows += run_disk_full(name, save, load, scratch, points)
        shutil.rmtree(scratch, ignore_errors=True)
    return rows


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    worker(sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]))
