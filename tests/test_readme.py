"""The README's code runs as written (on tiny models), so it cannot drift from the library.

Every fenced block of README.md is run, top to bottom, in one temporary working directory, so files flow
between journeys as they would for a reader following the README (``out/`` from the pruning journey is
evaluated and pushed later, ``q/`` from DL-QAT is evaluated by ``hf-compress eval``):

- ```` ```python ```` blocks: each in a fresh namespace (a reader may copy any one block; it must bring its own
  imports and variables), compiled with README line numbers so a traceback points at the README line;
- ```` ```bash ```` blocks: ``hf-compress …`` and ``optimum-cli hf-compress …`` lines are run through
  ``hf_compress.cli.main.main(argv)``; ``make TARGET`` lines must name a target of the Makefile;
- inline ``hf-compress …`` commands in the prose are parsed by the real argument parser (not run), so a
  renamed or removed flag fails here.

Before running, :data:`REPLACEMENTS` swaps the reference model for a seeded tiny one and shrinks step counts
and data sizes; each entry must still match the README (a stale entry fails the test). Hub ids (``me/...``)
go to the in-process fake Hub of ``tests/conftest.py``, where ``me/draft`` (a draft model the README assumes
its reader owns) is created first.
"""

from __future__ import annotations

import re
import shlex
import time
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

# (README text, what the test runs instead, why). Applied to every block and command, in this order.
REPLACEMENTS: list[tuple[str, str, str]] = [
    ('"smollm2-135m"', '"tiny-llama"', "a seeded tiny Llama instead of the 135M reference model"),
    ("examples/recipes/smollm2-135m-sds24-dlqat4.yaml", str(ROOT / "examples/recipes/tiny-llama-magnitude24-dlqat4-fly.yaml"),
     "the same shape of recipe on the tiny model, a few seconds"),
    ("--model smollm2-135m", "--model tiny-llama --max-windows 2 --limit 4", "tiny model, quick subsets"),
    ("--limit 500 --speed-prompts 10", "--limit 4 --speed-prompts 1 --max-windows 2", "quick subsets"),
    ("--max-windows 4", "--max-windows 2 --limit 4", "quick subsets"),
    # Týr: a search small enough for a test (the tiny model has 2 layers of 2 KV-head groups).
    ("num_iterations=2, generations=3, offspring=8, num_levels=5, selection_tokens=(512, 2048),",
     "num_iterations=1, generations=1, offspring=2, num_levels=3, selection_tokens=(64, 128),", "tiny search"),
    ("num_search_sequences=16, num_calibration_sequences=32)",
     "num_search_sequences=2, num_calibration_sequences=4, calibration_seq_len=64, ffn_update_rounds=1)",
     "tiny search"),
    ("selection_survivors=(2,)", "selection_survivors=(1,)", "tiny search"),
    ("BlockRemovalConfig(target_sparsity=0.3)", "BlockRemovalConfig(target_sparsity=0.3, num_calibration_sequences=4)",
     "fewer calibration windows"),
    ('["text"][:1000]', '["text"][:300]', "a prompt that fits the tiny model's 512 positions (bytes are tokens)"),
    ("max_new_tokens=256", "max_new_tokens=8", "fewer new tokens"),
    ("max_new_tokens=64", "max_new_tokens=8", "fewer new tokens"),
    # drafting heads: a handful of sequences and steps
    ("num_sequences=384, seq_len=32", "num_sequences=8, seq_len=8", "fewer self-distillation prompts"),
    ("max_new_tokens=96", "max_new_tokens=8", "shorter self-distilled continuations"),
    ("max_steps=1000", "max_steps=2", "two training steps"),
    ("max_train_seconds=600", "max_train_seconds=30", "a short budget"),
    # DL-QAT: the tiny model's layers are 64 wide
    ("num_sequences=160, seq_len=256", "num_sequences=4, seq_len=32", "a tiny training set"),
    ("group_size=128, r=16", "group_size=32, r=2", "groups that fit 64-wide layers"),
    ("max_steps=40", "max_steps=2", "two training steps"),
    # evaluation
    ("max_windows=32, zero_shot_limit=200", "max_windows=2, zero_shot_limit=4", "quick subsets"),
    ('window=512)', 'window=512, max_windows=2)', "quick subset"),
    ('limit={"hellaswag": 1000}', 'limit={"hellaswag": 4}', "quick subsets (arc_easy, left out, in full)"),
]

# A closing fence is bare: GitHub (CommonMark) reads "``` # text" as a line of the block, not its end.
_FENCE = re.compile(r"^```(\w*)\n(.*?)^```[ \t]*$", re.DOTALL | re.MULTILINE)
_INLINE_COMMAND = re.compile(r"(?<!`)`((?:optimum-cli )?hf-compress [^`]+)`")


def _blocks(text: str) -> list[tuple[str, str, int]]:
    """``(language, code, first line number)`` of every fenced block."""
    return [(m.group(1), m.group(2), text.count("\n", 0, m.start(2)) + 1) for m in _FENCE.finditer(text)]


def _substitute(code: str) -> str:
    for old, new, _ in REPLACEMENTS:
        code = code.replace(old, new)
    return code


def _argv(line: str) -> list[str] | None:
    """The ``hf-compress`` arguments of a shell line (``None`` for other commands)."""
    words = shlex.split(line, comments=True)
    if words[:2] == ["optimum-cli", "hf-compress"]:
        words = words[1:]
    return words[1:] if words[:1] == ["hf-compress"] else None


def test_every_replacement_matches_the_readme():
    text = README.read_text(encoding="utf-8")
    stale = [old for old, _, _ in REPLACEMENTS if old not in text]
    assert not stale, f"README no longer contains {stale}: update REPLACEMENTS in {Path(__file__).name}"


def test_inline_commands_parse():
    from hf_compress.cli.main import build_parser

    text = README.read_text(encoding="utf-8")
    commands = [" ".join(found.split()) for found in _INLINE_COMMAND.findall(text)]
    assert len(commands) >= 5
    parser = build_parser()
    for command in commands:
        argv = _argv(command)
        if argv is None or "--help" in argv or any(word.isupper() for word in argv):  # `prune METHOD --help`
            continue
        try:
            parser.parse_args(argv)
        except SystemExit:  # argparse already printed why
            pytest.fail(f"README command does not parse: {command}")


def test_readme_code_runs(tmp_path, monkeypatch, fake_hub):
    import torch

    from hf_compress.assets import tiny_model
    from hf_compress.cli.main import main
    from hf_compress.hub import push_to_hub

    started = time.perf_counter()
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    tiny_model("llama", seed=1, save_dir=tmp_path / "draft-source")
    push_to_hub(tmp_path / "draft-source", "me/draft", allow_missing_card=True)

    text = README.read_text(encoding="utf-8")
    make_targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.MULTILINE))
    ran = {"python": 0, "bash": 0}
    for language, code, line in _blocks(text):
        if language == "python":
            source = "\n" * (line - 1) + _substitute(code)
            exec(compile(source, str(README), "exec"), {"__name__": "readme"})  # noqa: S102
            ran["python"] += 1
        elif language == "bash":
            for offset, shell_line in enumerate(code.splitlines()):
                if not shell_line.strip():
                    continue
                words = shlex.split(shell_line, comments=True)
                if words[0] == "make":
                    assert words[1] in make_targets, f"README.md:{line + offset}: no Makefile target {words[1]!r}"
                    continue
                argv = _argv(_substitute(shell_line))
                assert argv is not None, f"README.md:{line + offset}: the test does not know how to run {shell_line!r}"
                assert main(argv) == 0, f"README.md:{line + offset}: {shell_line!r} failed"
                ran["bash"] += 1
        else:
            pytest.fail(f"README.md:{line}: a code block without a known language ({language!r})")
    assert ran["python"] >= 8 and ran["bash"] >= 3, ran
    # A guard against a block that runs a real job (a new block without its REPLACEMENTS entry), not a speed claim:
    # every block together takes 1-2 min on 2 CPU cores, about twice that while a benchmark shares them.
    elapsed = time.perf_counter() - started
    assert elapsed < 360, f"README blocks took {elapsed:.0f} s: a slow new block needs a replacement"
