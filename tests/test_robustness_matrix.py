"""The bad-input matrix of ``scripts/bench_robustness.py`` as a test: no input silently accepted, none unclear,
no crash. (The corruption and fault matrices run in the benchmark; tests/test_integrity.py and
tests/test_utils.py hold one case of each kind.)"""

from __future__ import annotations

import collections
import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from robustness.bad_inputs import cases  # noqa: E402
from robustness.common import run_cases  # noqa: E402


def test_every_bad_input_gets_a_clear_error(tmp_path):
    rows = run_cases(cases(tmp_path))
    outcomes = collections.Counter(row["outcome"] for row in rows)
    findings = [row for row in rows if row["outcome"] not in ("clear_error", "valid")]
    assert not findings, findings
    assert outcomes["clear_error"] >= 100 and outcomes["valid"] >= 10
