"""Standard errors for measured tables: of a mean, of an average over tasks, of a paired difference.

Two methods scored on the same examples differ far less from example to example than either varies on its
own, so their difference is judged by the spread of the per-example differences (a paired standard error),
not by the two unpaired error bars. Every benchmark table quotes its ``± s.e.`` from here.

Example:
    >>> from hf_compress.evaluation.uncertainty import paired_difference, standard_error
    >>> round(standard_error([1.0, 0.0, 1.0, 0.0]), 3)
    0.289
    >>> [round(x, 4) for x in paired_difference([0.9, 0.8, 0.7], [0.8, 0.8, 0.6])]
    [0.0667, 0.0333]
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence


__all__ = ["average_standard_error", "paired_difference", "paired_task_average_difference", "standard_error"]


def standard_error(values: Sequence[float]) -> float | None:
    """Standard error of the mean: sample standard deviation (n − 1) over √n, as lm-eval reports it.

    ``None`` below two values, where it is undefined.

    Example:
        >>> standard_error([2.0, 4.0])
        1.0
        >>> standard_error([3.0]) is None
        True
    """
    if len(values) < 2:
        return None
    return statistics.stdev(values) / math.sqrt(len(values))


def average_standard_error(standard_errors: Sequence[float]) -> float:
    """Standard error of an unweighted mean of independent estimates (e.g. a zero-shot average over tasks).

    Example:
        >>> average_standard_error([0.03, 0.04])
        0.025
    """
    if not standard_errors:
        raise ValueError("average_standard_error needs at least one standard error.")
    return math.sqrt(sum(error * error for error in standard_errors)) / len(standard_errors)


def paired_difference(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """Mean of ``a[i] − b[i]`` over the same examples and its standard error (NaN below two examples).

    Example:
        >>> [round(x, 4) for x in paired_difference([1.0, 1.0, 0.0], [0.0, 1.0, 0.0])]
        [0.3333, 0.3333]
    """
    if len(a) != len(b):
        raise ValueError(f"paired_difference needs scores of the same examples; got {len(a)} and {len(b)} values.")
    if not a:
        raise ValueError("paired_difference needs at least one example.")
    differences = [x - y for x, y in zip(a, b)]
    error = standard_error(differences)
    return statistics.fmean(differences), math.nan if error is None else error


def paired_task_average_difference(
    a: Mapping[str, Sequence[float]], b: Mapping[str, Sequence[float]], tasks: Sequence[str] | None = None
) -> tuple[float, float]:
    """Difference of two unweighted task averages, paired per example within each task, and its standard error.

    ``a`` and ``b`` map a task to per-example scores in the same order; ``tasks`` picks which tasks are averaged
    (default: all of ``a``'s). Each task's paired mean difference counts once, however many examples it has;
    a task with a single example adds its difference but no spread (its own standard error is undefined).

    Example:
        >>> [round(x, 4) for x in paired_task_average_difference({"x": [1.0, 0.0], "y": [1.0, 1.0]},
        ...                                                      {"x": [0.0, 0.0], "y": [1.0, 0.0]})]
        [0.5, 0.3536]
    """
    tasks = list(a) if tasks is None else list(tasks)
    missing = [task for task in tasks if task not in a or task not in b]
    if missing:
        raise ValueError(f"paired_task_average_difference: no per-example scores for {missing} on both sides.")
    per_task = [paired_difference(a[task], b[task]) for task in tasks]
    errors = [0.0 if math.isnan(error) else error for _, error in per_task]
    return statistics.fmean(mean for mean, _ in per_task), average_standard_error(errors)
