"""What every recipe step shares: its registry, the run state it acts on, and order checks as data.

A step kind is one class (``prune.py``, ``quantize.py``, ...) that registers itself by defining ``kind``. Each
step says what it *produces* (facts such as ``"sparse"``, ``"packed"``, ``"heads"``), which earlier facts it
*refuses* (with the reason) and which it *requires*; :func:`check_order` walks the steps with these sets only,
so a new rule is a line in a step's table, not a branch here.

Example:
    >>> from hf_compress.recipe import Recipe
    >>> Recipe.from_dict({"name": "x", "base_model": "tiny-llama", "steps": [
    ...     {"quantize": {"method": "rtn", "bits": 4}}, {"prune": {"method": "magnitude", "sparsity": "2:4"}}]})
    ... # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    hf_compress.recipe.config.RecipeError: steps: step 2 (prune magnitude) cannot follow step 1 (quantize rtn): ...
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from ...utils.validation import did_you_mean
from ..config import RecipeError


if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


__all__ = ["STEP_KINDS", "RecipeState", "Step", "check_order", "model_facts", "parse_step"]

STEP_KINDS: dict[str, type[Step]] = {}
"""Step class by kind (``prune``, ``quantize``, ``route``, ``heads``, ``generation``), filled by the classes."""

# Reasons shared by several steps' tables.
GENERATION_LAST = (
    "`generation` must be the last step: it records how the final model generates; move it to the end."
)
HEADS_AFTER_WEIGHTS = (
    "drafting heads are trained on the final weights and this step changes them; put `heads` after every "
    "prune/quantize/route step."
)
BLOCKS_AFTER_ROUTE = (
    "`route` searches and learns one schedule entry per decoder block, so whole-block removal after it (block_removal, "
    "sleb) would leave entries for blocks that are gone; move the prune step before `route`."
)
ROUTE_STACKING = {
    "sparse": "`route` cannot stack with mask pruning today: the routed checkpoint format (hf_compress_routed) "
              "stores every weight dense, so the sparse storage would be lost; build them as separate artifacts.",
    "slim": "`route` cannot stack with structural pruning that changes widths (tyr, block_pruner) today: the routed "
            "and the slim formats both live in config.quantization_config and a checkpoint loads through one format; "
            "build them as separate artifacts (whole-block removal, block_removal or sleb, can precede `route`).",
    "packed": "`route` cannot stack with `quantize` today: the routed format needs float weights (save_routed "
              "refuses a packed model); build them as separate artifacts.",
}


@dataclass
class RecipeState:
    """What the steps hand on to each other, in memory: the model and what the final folder will record."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    device: torch.device
    seed: int
    facts: set[str] = field(default_factory=set)
    heads: Any = None
    """Trained ``DraftHeads`` (a ``heads`` step)."""
    strategy: Any = None
    """The decoding strategy the final folder saves as ``custom_generate`` (a ``generation`` step)."""
    cache: dict[str, Any] | None = None
    """``{"method": "spark", **settings}`` documented in the card (a ``generation`` step with a cache)."""
    format_recipes: dict[str, Any] = field(default_factory=dict)
    """Per step kind, the recipe dict the final saver records (e.g. the pruning config)."""


class Step:
    """One step of a recipe: ``{kind: {method: ..., **fields}}``, checked when parsed, applied to a ``RecipeState``.

    Subclasses set ``kind`` and implement :meth:`parse` (check the fields, fill defaults), :meth:`apply`,
    :meth:`to_dict` and the order tables (:meth:`produces`, :meth:`refused_after`, :meth:`requires`).
    """

    kind: ClassVar[str] = ""
    changes_weights: ClassVar[bool] = True
    """Whether the step changes the model's weights (heads must come after every such step)."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.kind:
            STEP_KINDS[cls.kind] = cls

    def __init__(self, index: int, method: str, fields: dict[str, Any]) -> None:
        self.index = index
        self.method = method
        self.fields = fields
        self.given: tuple[str, ...] = tuple(fields)
        """The fields the recipe set (the others are defaults): what the card's step table shows."""

    # ------------------------------------------------------------------------------------------ parsing

    @classmethod
    def parse(cls, index: int, data: dict[str, Any], seed: int) -> Step:
        """Check ``data`` (the step's mapping) and return the step with its defaults filled in."""
        raise NotImplementedError

    @classmethod
    def where(cls, index: int, method: str | None = None) -> str:
        """``step 2 (quantize dlqat)``: how messages name a step."""
        return f"step {index + 1} ({cls.kind}{' ' + method if method else ''})"

    @classmethod
    def method_of(cls, index: int, data: dict[str, Any], methods: list[str]) -> str:
        """The step's ``method``, refused (the valid ones listed) when missing or unknown."""
        method = data.get("method")
        if method is None:
            raise RecipeError(f"{cls.where(index)}: missing 'method'; one of {', '.join(methods)}.")
        if method not in methods:
            raise RecipeError(f"{cls.where(index)}: unknown method {method!r}{did_you_mean(str(method), methods)}; "
                              f"valid methods: {', '.join(methods)}.")
        return method

    def given_settings(self) -> dict[str, Any]:
        """The settings the recipe wrote for this step, defaults left out."""
        values = self.to_dict()
        return {k: values[k] for k in self.given if k in values}

    def describe(self) -> str:
        return f"{self.kind} {self.method}" if self.method else self.kind

    def to_dict(self) -> dict[str, Any]:
        """The step's mapping, defaults filled in (written to the final folder's ``recipe.yaml``)."""
        return {"method": self.method, **self.fields}

    # ------------------------------------------------------------------------------------------ order

    def produces(self) -> set[str]:
        """Facts true of the model after this step (``sparse``, ``slim``, ``packed``, ``routed``, ``heads``, ...)."""
        return set()

    def refused_after(self) -> dict[str, str]:
        """Earlier facts this step cannot follow, each with the reason given to the user."""
        refused = {"generation": GENERATION_LAST}
        if self.changes_weights:
            refused["heads"] = HEADS_AFTER_WEIGHTS
        return refused

    def requires(self) -> dict[str, str]:
        """Facts an earlier step must have produced, each with what to add when it did not."""
        return {}

    def check_after(self, earlier: list[Step]) -> None:
        """Refuse (``RecipeError``) settings of this step that the earlier steps' settings rule out."""

    # ------------------------------------------------------------------------------------------ running

    def check_model(self, state: RecipeState) -> None:
        """Cheap checks against the loaded model, run for every step before the first one starts."""

    def apply(self, state: RecipeState, progress: bool) -> dict[str, Any]:
        """Run the step on ``state`` (in place); return what it reports (losses, counts) for the step record."""
        raise NotImplementedError


def parse_step(index: int, raw: Any, seed: int) -> Step:
    """One entry of ``steps:`` (``{kind: {method: ..., **fields}}``) as a checked :class:`Step`."""
    _load_step_kinds()
    kinds = ", ".join(STEP_KINDS)
    if not isinstance(raw, Mapping) or len(raw) != 1:
        raise RecipeError(f"step {index + 1}: each step is a one-key mapping {{kind: {{...}}}} with kind one of {kinds}; "
                          f"got {raw!r}.")
    (kind, data), = raw.items()
    if kind not in STEP_KINDS:
        raise RecipeError(f"step {index + 1}: unknown step kind {kind!r}{did_you_mean(str(kind), STEP_KINDS)}; "
                          f"valid kinds: {kinds}.")
    data = {} if data is None else data
    if not isinstance(data, Mapping):
        raise RecipeError(f"step {index + 1} ({kind}): expected a mapping such as {{method: ...}}, got {data!r}.")
    step = STEP_KINDS[kind].parse(index, dict(data), seed)
    step.given = tuple(key for key in data if key != "method")
    return step


def check_order(steps: list[Step], base_facts: Mapping[str, str] | None = None) -> None:
    """Refuse an impossible order, naming both steps and saying why; nothing else is looked at.

    ``base_facts`` (:func:`model_facts`) are the facts the loaded base model already holds when ``base_model`` is
    an hf_compress checkpoint (``{"packed": "quantized (packed low-bit layers)"}``): a step refused after such a
    fact is refused after the base model too, as if an earlier step had produced it.
    """
    base_facts = dict(base_facts or {})
    seen: dict[str, Step] = {}
    for position, step in enumerate(steps):
        for fact, reason in step.requires().items():
            if fact not in seen and fact not in base_facts:
                raise RecipeError(f"steps: {step.where(step.index, step.method)}: {reason}")
        for fact, reason in step.refused_after().items():
            if fact in seen:
                earlier = seen[fact]
                raise RecipeError(
                    f"steps: {step.where(step.index, step.method)} cannot follow "
                    f"{earlier.where(earlier.index, earlier.method)}: {reason}"
                )
            if fact in base_facts:
                raise RecipeError(
                    f"steps: {step.where(step.index, step.method)} cannot follow the base model, which is already "
                    f"{base_facts[fact]}, as if by an earlier step: {reason}"
                )
        step.check_after(steps[:position])
        for fact in step.produces():
            seen.setdefault(fact, step)


def model_facts(model: PreTrainedModel) -> dict[str, str]:
    """The facts a loaded base model already holds, each with what it means: ``base_model`` may be a folder (or
    repo) an earlier hf_compress run saved, which loads packed, routed, slim or with pruned (zero) weights.

    The run checks the steps' order against them (:func:`check_order`) and starts from them, so the final folder is
    saved in the format the model is in (a pruned base stays sparse on disk, as its measured bytes say).

    Example:
        >>> from hf_compress.assets import tiny_model
        >>> model_facts(tiny_model("llama")[0])
        {}
    """
    from ...formats.slim import slim_record
    from ...pruning.storage import plan_sparse_storage
    from ...quantization.packed_linear import PackedLinear
    from ...routing.layer import routing_state

    facts: dict[str, str] = {}
    if any(isinstance(module, PackedLinear) for module in model.modules()):
        facts["packed"] = "quantized (packed low-bit layers)"
    if routing_state(model) is not None:
        facts["routed"] = "token-routed"
    if slim_record(model) is not None:
        facts["slim"] = "structurally pruned (its blocks have widths of their own)"
    if "packed" not in facts and plan_sparse_storage(model).weights:  # what save_pruned (and the measured bytes) store sparse
        facts["sparse"] = "mask-pruned (decoder weights with many zeros, stored sparse)"
    return facts


def _load_step_kinds() -> None:
    from . import generation, heads, prune, quantize, route  # noqa: F401  (each registers its kind)
