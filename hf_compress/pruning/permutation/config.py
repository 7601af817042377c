"""``LearnedPermutationConfig`` and ``parse_permutation``: what a pruner's ``permutation=`` field accepts.

A pruning config's ``permutation`` is ``None`` (no permutation), ``"ria"`` (the heuristic channel
reallocation, ``ria.py``), a ``SwapPermutationConfig`` (RIA refined by greedy channel swaps, ``swap.py``;
the string ``"swap"`` gives the defaults) or a ``LearnedPermutationConfig`` (the learned permutation,
``learned.py``).
The strings ``"none"``, ``"learned"`` (the spec's defaults) and ``"permllm"`` (PermLLM-style
block-diagonal baseline) and a dict (``{"kind": "learned", ...}``, the JSON form) are accepted too, so
the command line's ``--permutation learned`` and a recipe read back from ``config.json`` give the same
object.

Example:
    >>> parse_permutation("learned").groups
    16
    >>> parse_permutation("permllm").block_size
    64
    >>> parse_permutation(LearnedPermutationConfig(groups=4).to_dict()) == LearnedPermutationConfig(groups=4)
    True
    >>> parse_permutation("none") is None
    True
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from ...utils import check_bool, check_choice, check_float, check_int

__all__ = [
    "PERMUTATION_CHOICES", "LearnedPermutationConfig", "SwapPermutationConfig", "parse_permutation",
    "permutation_to_json",
]

PERMUTATION_CHOICES = ("none", "ria", "swap", "learned", "permllm")
_OBJECTIVES = ("block", "ce_distill", "cosine")


class _PermutationConfigJSON:
    """The JSON form shared by the permutation configs: their fields under ``{"kind": <kind>}``."""

    kind: ClassVar[str]

    def to_dict(self) -> dict[str, Any]:
        """JSON form: ``{"kind": <kind>, field: value, ...}``."""
        return {"kind": self.kind, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Any:
        """Rebuild from ``to_dict()`` (unknown keys raise)."""
        data = {key: value for key, value in data.items() if key != "kind"}
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields {unknown}; known: {sorted(names)}.")
        return cls(**data)


@dataclass
class LearnedPermutationConfig(_PermutationConfigJSON):
    """A learned channel permutation (arXiv 2601.22980): cost matrices trained through the pruned network.

    Every permutation site (the residual stream, each key/value head's ``head_dim`` channels, each
    FFN's intermediate channels; see ``sites.py``) is cut into contiguous groups; each group owns a
    learnable cost matrix ``C`` (``C[j, i]``: cost of putting channel ``i`` at position ``j``). During
    training the soft permutation is ``Sinkhorn(−C / τ)`` (log domain), with ``τ`` annealed linearly
    from ``temperature_start`` to ``temperature_end``; the network's weights are permuted, N:M-masked
    with the Wanda metric, permuted back and run frozen, so only ``C`` trains. At export ``C`` is
    decoded with the Hungarian algorithm into a true permutation.

    Args:
        groups: G, the number of groups per site (the paper's default is 4; 16 is the CPU-sized
            default here: cost parameters shrink as 1/G). Must divide every site's width.
        block_size: channels per group instead of ``groups`` (PermLLM's block-diagonal 64). Must divide
            every site's width.
        epochs: passes over the training windows (the calibration windows unless
            ``num_training_sequences`` is set).
        num_training_sequences: training windows (of the calibration length); ``None``: the calibration ones.
        batch_size: windows per optimiser step (on each process, when several train together).
        learning_rate: AdamW learning rate of the cost matrices (cosine schedule).
        sinkhorn_iterations: log-domain Sinkhorn iterations per step.
        temperature_start, temperature_end: the linear annealing of ``τ`` (relative to the cost
            matrices, which start as ``−identity_margin · P_init`` plus small noise; the defaults keep
            ``identity_margin / τ ≳ 8`` so the soft permutation starts close to ``P_init`` and the loss
            is that of a network pruned as it will be exported, not of a blurred one).
        init: where the costs start, absorbed first so the learned groups refine it (a labelled choice of this
            library): ``"swap"`` (default: RIA's permutation refined by the channel-swap search of
            ``SwapPermutationConfig``, the best permutation measured here; with
            keep-best the result is never worse than it on the selection score), ``"ria"`` or ``"identity"``.
        swap_seconds: an optional wall-time cap on the swap search with ``init="swap"`` (``None``: run it to
            convergence, the same permutation on any machine; see ``SwapPermutationConfig.max_seconds``).
        identity_margin: the initial cost advantage of the starting position of each channel.
        hard_forward: run the Hungarian permutation in the forward pass and the Sinkhorn one in the
            backward (straight-through; PermLLM's choice) instead of the soft permutation throughout.
        soft_mask: let the gradient see the N:M mask move with the permutation (straight-through: the
            forward keeps the hard top-N mask, the backward uses a sigmoid of each permuted channel's
            Wanda score against its M-group's N-th/(N+1)-th threshold, PermLLM's soft mask in spirit).
            Without it the mask is a constant for the gradient, which then only sees weights carried
            with fixed masks, not the re-masking a move causes.
        mask_temperature: the sigmoid's temperature, relative to the mean score of the M-group.
        objective: ``"block"`` (default: each decoder block, fed the dense model's captured inputs, must
            reproduce its dense outputs — relative squared error summed over blocks; a labelled,
            CPU-sized stand-in for the paper's loss, see ``blockwise.py``), ``"ce_distill"`` (next-token
            CE + ``distillation_weight`` · Smooth-L1 between every decoder layer's dense and pruned hidden
            states, through the whole model; the paper) or ``"cosine"`` (1 − cosine of the final hidden
            states; PermLLM).
        distillation_weight: α of the distillation term (the paper: 1e-5).
        max_train_seconds: stop training after this wall time (``None``: no limit). The temperature then anneals
            over whichever ends first, the steps or this budget, so a budget-cut run still ends sharp; the
            learning-rate schedule stays over the steps.
        eval_every: every this many steps the Hungarian permutations are scored (``selection``) on the
            ``eval_sequences`` windows and the best so far is kept; the starting point is scored first, so
            the result is never worse than its initialisation on that score.
        selection: what keep-best compares (``selection.py``), on the ``eval_sequences`` windows:
            ``"sequential_ce"`` (the next-token loss of the model with the permutations absorbed and pruned by
            Wanda block by block, as the pruner will; a model copy per score), ``"pruned_ce"`` (the same loss with
            masks from the dense model's statistics in one pass: cheaper, less faithful) or ``"objective"`` (the
            training objective; a lower block objective has been measured with a higher perplexity).
        selection_margin: a candidate is kept only if its mean score beats the starting point's by more than
            this many paired standard errors over the windows (0: any lower mean).
        eval_sequences: windows the keep-best score uses: the last ones, held out from training, when
            there are at least twice as many windows (else the first training windows).
        blocks_per_step: with ``objective="block"``, how many decoder blocks (drawn at random) one step
            trains on (``None``: all of them).
        seed: initial noise of the cost matrices and the training order.

    Example:
        >>> config = LearnedPermutationConfig(groups=4, epochs=2)
        >>> LearnedPermutationConfig.from_dict(config.to_dict()) == config
        True
    """

    kind: ClassVar[str] = "learned"

    groups: int | None = None  # 16 unless block_size is set (None here so that an explicit 16 is seen)
    block_size: int | None = None
    epochs: float = 1.0
    num_training_sequences: int | None = None
    batch_size: int = 1
    learning_rate: float = 5e-2
    sinkhorn_iterations: int = 5
    temperature_start: float = 0.06
    temperature_end: float = 0.01
    init: str = "swap"
    swap_seconds: float | None = None
    identity_margin: float = 0.5
    hard_forward: bool = False
    soft_mask: bool = False
    mask_temperature: float = 0.25
    objective: str = "block"
    distillation_weight: float = 1e-5
    max_train_seconds: float | None = None
    eval_every: int = 10
    selection: str = "sequential_ce"
    selection_margin: float = 2.0
    eval_sequences: int = 4
    blocks_per_step: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.block_size is not None:
            self.block_size = check_int("block_size", self.block_size, minimum=2)
            if self.groups is not None:
                raise ValueError("set either groups or block_size of LearnedPermutationConfig, not both.")
        else:
            self.groups = check_int("groups", 16 if self.groups is None else self.groups, minimum=1,
                                    hint="It is the number of groups per site (or set block_size).")
        self.epochs = check_float("epochs", self.epochs, low=0.0, low_open=True)
        self.num_training_sequences = check_int("num_training_sequences", self.num_training_sequences,
                                                minimum=1, allow_none=True)
        self.batch_size = check_int("batch_size", self.batch_size, minimum=1)
        self.sinkhorn_iterations = check_int("sinkhorn_iterations", self.sinkhorn_iterations, minimum=1)
        for name in ("learning_rate", "temperature_start", "temperature_end", "mask_temperature"):
            setattr(self, name, check_float(name, getattr(self, name), low=0.0, low_open=True))
        if self.temperature_end > self.temperature_start:
            raise ValueError(
                f"temperature_end ({self.temperature_end}) must not exceed temperature_start "
                f"({self.temperature_start}): the annealing sharpens the permutation."
            )
        self.identity_margin = check_float("identity_margin", self.identity_margin, low=0.0)
        self.distillation_weight = check_float("distillation_weight", self.distillation_weight, low=0.0)
        self.max_train_seconds = check_float("max_train_seconds", self.max_train_seconds, low=0.0,
                                             low_open=True, allow_none=True)
        self.eval_every = check_int("eval_every", self.eval_every, minimum=1)
        self.eval_sequences = check_int("eval_sequences", self.eval_sequences, minimum=1)
        self.blocks_per_step = check_int("blocks_per_step", self.blocks_per_step, minimum=1, allow_none=True)
        check_bool("hard_forward", self.hard_forward)
        check_bool("soft_mask", self.soft_mask)
        check_choice("objective", self.objective, _OBJECTIVES)
        check_choice("init", self.init, ("ria", "swap", "identity"))
        check_choice("selection", self.selection, ("sequential_ce", "pruned_ce", "objective"))
        self.swap_seconds = check_float("swap_seconds", self.swap_seconds, low=0.0, low_open=True, allow_none=True)
        self.selection_margin = check_float("selection_margin", self.selection_margin, low=0.0)
        self.seed = check_int("seed", self.seed)

    def group_width(self, width: int, site: str, m: int = 1) -> int:
        """Channels per group of a site of ``width`` channels; a clear error when they do not divide it.

        A group no wider than one N:M group (``m`` channels; e.g. a 64-wide head cut in 16) could only
        reorder channels inside that N:M group, which changes nothing, so the site is then one group.
        """
        if self.block_size is not None:
            if width % self.block_size:
                # Suggest only sizes the config accepts here: at least 2, and whole N:M groups of m channels.
                fits = [d for d in range(min(self.block_size, width), 1, -1) if width % d == 0 and d % m == 0][:2]
                fits = fits or [width]  # the whole width is one group
                hint = f"e.g. {' or '.join(map(str, fits))}"
                raise ValueError(
                    f"permutation block_size {self.block_size} does not divide the width {width} of {site}; "
                    f"pick a divisor ({hint})."
                )
            size = self.block_size
        else:
            assert self.groups is not None
            if width % self.groups:
                raise ValueError(
                    f"permutation groups={self.groups} does not divide the width {width} of {site}; pick a divisor."
                )
            size = width // self.groups
        if size <= m:
            return width
        if size % m:
            raise ValueError(f"permutation groups of {size} channels in {site} are not a multiple of M={m}: N:M groups "
                             "would straddle them. Pick groups (or block_size) so that each holds a multiple of M.")
        return size

    @classmethod
    def permllm(cls, **overrides: Any) -> LearnedPermutationConfig:
        """The PermLLM-style baseline: 64-wide blocks, Hungarian forward / Sinkhorn backward, cosine loss."""
        return cls(**{"block_size": 64, "groups": None, "hard_forward": True, "objective": "cosine",
                      "temperature_start": 1.0, "temperature_end": 0.1, **overrides})



@dataclass
class SwapPermutationConfig(_PermutationConfigJSON):
    """RIA's permutation refined by greedy channel swaps between N:M groups (``swap.py``; Pool & Yu, 2021).

    Each pass scores every exchange of two channels in different groups on the Wanda-metric kept score and
    applies the best disjoint ones that raise it; it never lowers the score. No training: statistics only.

    Args:
        max_seconds: an optional wall-time cap on the whole search, shared out over the sites as it goes. The
            default (``None``) runs every site until no exchange gains or ``max_passes``, so the permutation is
            the same on any machine; a cap that stops a site early makes it depend on the machine's speed (logged,
            and counted in ``PermutationReport.swap_search``).
        max_passes: passes per site at most (a site stops earlier when no swap helps).
        max_rows: score rows sampled to propose a pass's swaps (every row judges them).

    Example:
        >>> parse_permutation("swap") == SwapPermutationConfig()
        True
        >>> parse_permutation({"kind": "swap", "max_seconds": 60}).max_seconds
        60.0
    """

    kind: ClassVar[str] = "swap"

    max_seconds: float | None = None
    max_passes: int = 100
    max_rows: int = 8192

    def __post_init__(self) -> None:
        self.max_seconds = check_float("max_seconds", self.max_seconds, low=0.0, low_open=True, allow_none=True)
        self.max_passes = check_int("max_passes", self.max_passes, minimum=1)
        self.max_rows = check_int("max_rows", self.max_rows, minimum=1)


def parse_permutation(value: Any) -> str | SwapPermutationConfig | LearnedPermutationConfig | None:
    """Normalise a ``permutation=`` value: ``None``, ``"ria"``, a ``SwapPermutationConfig`` or a
    ``LearnedPermutationConfig``.

    Raises:
        ValueError: an unknown name or dict.
    """
    if value is None or isinstance(value, _PermutationConfigJSON):
        return value
    if isinstance(value, str):
        name = value.strip().lower()
        if name not in PERMUTATION_CHOICES:
            raise ValueError(f"permutation must be one of {', '.join(PERMUTATION_CHOICES)} or a "
                             f"LearnedPermutationConfig, got {value!r}.")
        return {"none": None, "ria": "ria", "swap": SwapPermutationConfig(), "learned": LearnedPermutationConfig(),
                "permllm": LearnedPermutationConfig.permllm()}[name]
    if isinstance(value, dict):
        kind = value.get("kind", "learned")
        if kind == "ria" and len(value) == 1:
            return "ria"
        if kind == "swap":
            return SwapPermutationConfig.from_dict(value)
        if kind != "learned":
            raise ValueError(f"a permutation dict needs kind 'learned' or 'swap' (or is {{'kind': 'ria'}}), "
                             f"got {value!r}.")
        return LearnedPermutationConfig.from_dict(value)
    raise TypeError(
        f"permutation must be None, 'ria', 'swap', 'learned' or a LearnedPermutationConfig / SwapPermutationConfig, "
        f"got {type(value).__name__}."
    )


def permutation_to_json(value: str | SwapPermutationConfig | LearnedPermutationConfig | None) -> Any:
    """The JSON value stored in a recipe (``None``, ``"ria"`` or the config's dict)."""
    return value.to_dict() if isinstance(value, _PermutationConfigJSON) else value
