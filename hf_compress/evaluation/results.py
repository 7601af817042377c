"""One measured number, in the shape a model card's ``model-index`` needs.

Every evaluation function returns plain dicts for JSON; alongside, ``metric_records`` turns a results
dict into :class:`MetricRecord` rows, which :mod:`hf_compress.hub` writes into model cards. Only
records built from measured results ever reach a card.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class MetricRecord:
    """A single measured metric (mirrors ``huggingface_hub.EvalResult``'s required fields).

    Example:
        >>> MetricRecord("text-generation", "wikipedia", "English Wikipedia excerpt (eval split)",
        ...              "perplexity", 21.3, dataset_split="eval")
        MetricRecord(task_type='text-generation', dataset_type='wikipedia', ...)
    """

    task_type: str
    dataset_type: str
    dataset_name: str
    metric_type: str
    metric_value: float
    dataset_split: str | None = None
    metric_config: str | None = None
    metric_name: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MetricRecord":
        return cls(**data)
