"""One evaluation run over the standard hf_compress measurements, shared by the CLI, demo and benchmarks."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..utils import InvalidArgumentTypeError, check_bool, check_choice, check_int, check_str_list, get_logger
from ..modeling.layers import check_within_learned_positions
from .memory import measure_kv_cache_bytes, parameter_bytes
from .perplexity import check_score_last, evaluate_perplexity, perplexity_record
from .results import MetricRecord
from .speed import measure_generation_speed
from .uncertainty import average_standard_error


logger = get_logger(__name__)

# name -> (loader arguments, dataset_type, human-readable dataset name, split) for model cards.
PERPLEXITY_SETS: dict[str, tuple[tuple[str, str], str, str, str | None]] = {
    "wikipedia": (("wikipedia", "eval"), "wikipedia", "English Wikipedia excerpt (gensim 4.4.0 test data)", "eval"),
    "news": (("news", "eval"), "lee-news", "Lee news corpus (gensim 4.4.0 test data)", None),
}


@dataclass
class EvaluationSettings:
    """What :func:`run_evaluation` measures, and on how much data.

    ``max_windows`` / ``zero_shot_limit`` select fixed, documented subsets (see
    :func:`~hf_compress.evaluation.token_windows` and the zero-shot loader); ``None`` means the full set.
    ``zero_shot_per_example`` keeps each task's per-example scores, which paired comparisons of two models need.

    Example:
        >>> quick = EvaluationSettings(max_windows=32, zero_shot_tasks=("arc_easy",), zero_shot_limit=200)
    """

    perplexity_sets: tuple[str, ...] = ("wikipedia", "news")
    window: int = 512
    max_windows: int | None = None
    score_last: int | None = None
    zero_shot_tasks: tuple[str, ...] = ("arc_easy",)
    zero_shot_limit: int | dict[str, int | None] | None = None
    zero_shot_per_example: bool = False
    speed_prompts: int = 0
    max_new_tokens: int = 64
    kv_seq_len: int | None = None
    batch_size: int = 4
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from ..assets.zero_shot import ZERO_SHOT_TASKS

        for name, choices in (("perplexity_sets", tuple(PERPLEXITY_SETS)), ("zero_shot_tasks", ZERO_SHOT_TASKS)):
            value = getattr(self, name)
            value = (value,) if isinstance(value, str) else value
            items = check_str_list(name, value)
            for item in items:
                check_choice(name, item, choices)
            setattr(self, name, tuple(items))
        check_int("window", self.window, minimum=2, hint="It is the perplexity window in tokens (e.g. 512).")
        check_int("max_windows", self.max_windows, minimum=1, allow_none=True, hint="None scores every window.")
        check_score_last(self.score_last, self.window)
        limits = self.zero_shot_limit.values() if isinstance(self.zero_shot_limit, dict) else (self.zero_shot_limit,)
        for value in limits:
            check_int("zero_shot_limit", value, minimum=1, allow_none=True,
                      hint="Pass None (full split), an int, or a {task: int | None} dict; zero_shot_tasks=() skips them.")
        if isinstance(self.zero_shot_limit, dict) and set(self.zero_shot_limit) - set(self.zero_shot_tasks):
            raise ValueError(
                f"zero_shot_limit names {sorted(set(self.zero_shot_limit) - set(self.zero_shot_tasks))}, not in "
                f"zero_shot_tasks {list(self.zero_shot_tasks)}: add them to zero_shot_tasks or drop them from "
                "zero_shot_limit (a task the mapping leaves out is scored on its full split)."
            )
        check_bool("zero_shot_per_example", self.zero_shot_per_example)
        check_int("speed_prompts", self.speed_prompts, minimum=0)
        check_int("max_new_tokens", self.max_new_tokens, minimum=1)
        check_int("kv_seq_len", self.kv_seq_len, minimum=1, allow_none=True)
        check_int("batch_size", self.batch_size, minimum=1)
        if not isinstance(self.extra, dict):
            raise InvalidArgumentTypeError(f"extra must be a dict, got {type(self.extra).__name__}.")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def run_evaluation(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, settings: EvaluationSettings | None = None,
    progress: bool = True,
) -> tuple[dict[str, Any], list[MetricRecord]]:
    """Run the measurements ``settings`` asks for; return (JSON-ready results, model-card records).

    Example:
        >>> results, records = run_evaluation(model, tokenizer, EvaluationSettings(max_windows=8))  # doctest: +SKIP
        >>> results["perplexity"]["wikipedia"]["perplexity"]  # doctest: +SKIP
        21.07
    """
    from ..assets.text import load_text, speed_prompts

    settings = settings or EvaluationSettings()
    if settings.kv_seq_len:  # checked before any measurement, not after all the others
        check_within_learned_positions(model, settings.kv_seq_len, "kv_seq_len is", "kv_seq_len")
    prompts = speed_prompts(settings.speed_prompts) if settings.speed_prompts else []  # too many: refused now
    results: dict[str, Any] = {"settings": settings.to_dict()}
    records: list[MetricRecord] = []
    start = time.perf_counter()
    results["memory"] = parameter_bytes(model)
    if settings.perplexity_sets and settings.score_last is None:
        from ..routing.layer import routing_state

        if routing_state(model) is not None:
            logger.warning(
                "this model routes tokens: the earliest tokens of each window skip blocks by design, so perplexity "
                "over every token says little about the continuation routing keeps. Score a tail for the comparable "
                "number: score_last=128 (hf-compress eval --score-last 128)."
            )
    for name in settings.perplexity_sets:
        if name not in PERPLEXITY_SETS:
            raise ValueError(f"Unknown perplexity set {name!r}; choose from {', '.join(PERPLEXITY_SETS)}.")
        (text_name, split), dataset_type, dataset_name, card_split = PERPLEXITY_SETS[name]
        result = evaluate_perplexity(
            model, tokenizer, load_text(text_name, split), window=settings.window,
            max_windows=settings.max_windows, batch_size=settings.batch_size, progress=progress,
            score_last=settings.score_last,
        )
        results.setdefault("perplexity", {})[name] = result
        records.append(perplexity_record(result, dataset_type, dataset_name, card_split))
    if settings.zero_shot_tasks:
        from .zero_shot import evaluate_zero_shot, zero_shot_records

        zero_shot = evaluate_zero_shot(
            model, tokenizer, tasks=settings.zero_shot_tasks, limit=settings.zero_shot_limit, progress=progress,
            return_per_example=settings.zero_shot_per_example,
        )
        results["zero_shot"] = zero_shot
        records.extend(zero_shot_records(zero_shot))
    if settings.speed_prompts:
        # Exactly max_new_tokens per prompt: a model that stops early (EOS) would spread the prefill over fewer
        # tokens and look slower, and models compared in one table (dense vs. pruned) would time different work.
        speed = measure_generation_speed(
            model, tokenizer, prompts, max_new_tokens=settings.max_new_tokens,
            progress=progress, force_length=True,
        )
        speed.pop("outputs")
        speed["force_length"] = True
        results["generation"] = speed
    if settings.kv_seq_len:
        results["memory"]["kv_cache"] = measure_kv_cache_bytes(model, settings.kv_seq_len)
    results["seconds"] = time.perf_counter() - start
    return results, records


def headline_metrics(results: dict[str, Any], perplexity_set: str = "wikipedia") -> dict[str, Any]:
    """The numbers a benchmark row keeps from ``run_evaluation``'s results: one perplexity and the zero-shot
    average with its per-task scores and standard errors (absent keys when that part was not run).

    Example:
        >>> headline_metrics({"perplexity": {"wikipedia": {"perplexity": 20.1}}})
        {'perplexity': 20.1}
    """
    row: dict[str, Any] = {}
    if perplexity_set in results.get("perplexity", {}):
        row["perplexity"] = results["perplexity"][perplexity_set]["perplexity"]
    zero_shot = results.get("zero_shot")
    if zero_shot:
        tasks = zero_shot["average"]["tasks"]
        row["zero_shot_average"] = zero_shot["average"]["score"]
        row["zero_shot_metric"] = zero_shot["average"]["metric"]
        row["zero_shot"] = {t: {k: zero_shot[t][k] for k in ("acc", "acc_norm", "score", "n")} for t in tasks}
        errors = [zero_shot[t].get(f"{zero_shot[t]['metric']}_stderr") for t in tasks]
        if tasks and all(error is not None for error in errors):
            for task, error in zip(tasks, errors):
                row["zero_shot"][task]["score_stderr"] = error
            row["zero_shot_stderr"] = average_standard_error(errors)
        if all("per_example" in zero_shot[t] for t in tasks):  # EvaluationSettings(zero_shot_per_example=True)
            row["per_example"] = {t: [float(x) for x in zero_shot[t]["per_example"]] for t in tasks}
    return row


def evaluate_row(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, settings: EvaluationSettings, row: dict[str, Any],
    label: str = "",
) -> dict[str, Any]:
    """Run ``run_evaluation`` and merge its :func:`headline_metrics` into a benchmark ``row`` (logged with ``label``).

    Example:
        >>> evaluate_row(model, tokenizer, settings, {"method": "wanda"}, "wanda 2:4")  # doctest: +SKIP
        {'method': 'wanda', 'perplexity': 27.9, ...}
    """
    results, _ = run_evaluation(model, tokenizer, settings, progress=False)
    row.update(headline_metrics(results))
    logger.info("%s: perplexity %s, zero-shot average %s", label, row.get("perplexity"), row.get("zero_shot_average"))
    return row
