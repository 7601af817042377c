"""``-q`` on the commands that train through ``Trainer``: no progress bar, no per-step log dicts, results still
printed; without ``-q`` Trainer's output is unchanged."""

from __future__ import annotations

import json
import re

import pytest
from transformers.utils import logging as transformers_logging

from hf_compress.cli.main import main


pytestmark = pytest.mark.usefixtures("one_torch_thread")

# What Trainer writes: a dict per logging step and a summary dict (stdout), and a bar with no description (stderr).
LOG_DICT = re.compile(r"\{'(loss|train_runtime)'")
TRAINER_BAR = re.compile(r"(^|[\r\n])\s*\d+%\|")
ANY_BAR = re.compile(r"\d+%\|")

TRAINING_COMMANDS = {
    "route": (["route", "--model", "tiny-llama", "--generations", "1", "--population", "2", "--search-windows", "1",
               "--seq-len", "32", "--steps", "3"], "saved the routed model to"),
    "quantize dlqat": (["quantize", "dlqat", "--model", "tiny-llama", "--group-size", "32", "--rank", "2",
                        "--steps", "3", "--batch-size", "2", "--seq-len", "32"], "dlqat 4-bit (group 32)"),
    "experts train": (["experts", "train", "--base", "tiny-llama", "--data", "boolq,piqa", "--per-task", "4",
                       "--holdout", "0", "--num-experts", "1", "--steps", "3", "--batch-size", "2", "--seq-len", "32",
                       "--rank", "2", "--device", "cpu"], "trained 1 experts"),
}


@pytest.mark.parametrize("name", TRAINING_COMMANDS)
def test_quiet_training_prints_no_progress_bar_or_log_dicts(name, tmp_path, capsys):
    argv, result = TRAINING_COMMANDS[name]
    verbosity = transformers_logging.get_verbosity()
    assert main(["-q", *argv, "--save-dir", str(tmp_path / "out")]) == 0
    captured = capsys.readouterr()
    assert not LOG_DICT.search(captured.out), captured.out
    assert not ANY_BAR.search(captured.err), captured.err  # Trainer's, and the command's own (schedule search)
    assert result in captured.out  # the command's own results still reach stdout
    assert transformers_logging.get_verbosity() == verbosity


def test_without_quiet_trainer_output_is_unchanged(tmp_path, capsys):
    argv, result = TRAINING_COMMANDS["quantize dlqat"]
    assert main([*argv, "--save-dir", str(tmp_path / "out")]) == 0
    captured = capsys.readouterr()
    assert LOG_DICT.search(captured.out) and TRAINER_BAR.search(captured.err)
    assert result in captured.out


def test_quiet_learned_permutation_trains_without_bar_or_log_dicts(tmp_path, capsys):
    learned = {"permutation": {"kind": "learned", "groups": 2, "epochs": 0.5}}
    assert main(["-q", "prune", "wanda", "--model", "tiny-llama", "--sparsity", "2:4", "--options", json.dumps(learned),
                 "--calibration-sequences", "2", "--seq-len", "32", "--save-dir", str(tmp_path / "out")]) == 0
    captured = capsys.readouterr()
    assert not LOG_DICT.search(captured.out), captured.out
    assert not TRAINER_BAR.search(captured.err), captured.err
    assert "saved to" in captured.out


def test_progress_field_keeps_the_positional_order_of_the_earlier_fields():
    """``progress`` came after ``extra_arguments``: a caller passing every field positionally keeps its
    ``extra_arguments`` (inserted before it, the dict would silently become ``progress`` and be dropped)."""
    from hf_compress.training import TrainingSettings

    settings = TrainingSettings(10, 1e-3, 2, 1, 0, 0.0, "linear", 5, 0, True, {"report_to": ["tensorboard"]})
    assert settings.extra_arguments == {"report_to": ["tensorboard"]} and settings.progress is True
