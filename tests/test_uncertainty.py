"""Standard errors of benchmark tables, checked against hand computations and known edge cases."""

from __future__ import annotations

import math
import random

import pytest

from hf_compress.evaluation.uncertainty import (
    average_standard_error,
    paired_difference,
    paired_task_average_difference,
    standard_error,
)


def test_standard_error_matches_the_textbook_formula_and_is_undefined_below_two_values():
    values = [0.0, 1.0, 1.0, 1.0, 0.0, 1.0]
    mean = sum(values) / len(values)
    by_hand = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) / math.sqrt(len(values))
    assert standard_error(values) == pytest.approx(by_hand)
    assert standard_error([1.0]) is None and standard_error([]) is None


def test_pairing_removes_the_shared_per_example_spread():
    # b is a plus a constant shift plus small noise: the unpaired error bars are wide, the paired one is tiny.
    rng = random.Random(0)
    a = [rng.gauss(0.0, 10.0) for _ in range(200)]
    b = [x + 0.5 + rng.gauss(0.0, 0.1) for x in a]
    mean, error = paired_difference(b, a)
    assert mean == pytest.approx(0.5, abs=0.03)
    assert error < 0.02 < standard_error(a)
    assert paired_difference(a, a) == (0.0, 0.0)
    mean, error = paired_difference([2.0], [1.0])
    assert mean == 1.0 and math.isnan(error)


def test_paired_difference_refuses_unpaired_input():
    with pytest.raises(ValueError, match="same examples"):
        paired_difference([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="at least one"):
        paired_difference([], [])


def test_task_average_weights_every_task_once_and_adds_errors_in_quadrature():
    a = {"big": [1.0, 0.0, 1.0, 1.0, 0.0, 1.0], "small": [1.0, 1.0], "ignored": [5.0, 5.0]}
    b = {"big": [0.0, 0.0, 1.0, 0.0, 0.0, 1.0], "small": [0.0, 1.0], "ignored": [0.0, 0.0]}
    big, big_error = paired_difference(a["big"], b["big"])
    small, small_error = paired_difference(a["small"], b["small"])
    mean, error = paired_task_average_difference(a, b, tasks=["big", "small"])
    assert mean == pytest.approx((big + small) / 2)  # not the pooled mean over all eight examples
    assert error == pytest.approx(math.hypot(big_error, small_error) / 2)
    assert average_standard_error([big_error, small_error]) == pytest.approx(error)
    with pytest.raises(ValueError, match="missing_task"):
        paired_task_average_difference(a, b, tasks=["big", "missing_task"])
    with pytest.raises(ValueError, match="at least one"):
        average_standard_error([])


def test_benchmark_rows_keep_the_zero_shot_standard_errors():
    from hf_compress.evaluation.suite import headline_metrics

    task = {"acc": 0.5, "acc_norm": 0.6, "score": 0.6, "n": 500, "metric": "acc_norm", "acc_stderr": 0.02,
            "acc_norm_stderr": 0.03}
    results = {"zero_shot": {"arc_easy": task, "boolq": {**task, "metric": "acc", "score": 0.5},
                             "average": {"score": 0.55, "metric": "...", "tasks": ["arc_easy", "boolq"]}}}
    row = headline_metrics(results)
    assert row["zero_shot"]["arc_easy"]["score_stderr"] == 0.03 and row["zero_shot"]["boolq"]["score_stderr"] == 0.02
    assert row["zero_shot_stderr"] == pytest.approx(average_standard_error([0.03, 0.02]))
    results["zero_shot"]["boolq"]["acc_stderr"] = None  # one example: undefined, so no average error either
    assert "zero_shot_stderr" not in headline_metrics(results)
