"""Block-by-block calibration: the one mechanism every pruner and quantizer uses to see activations.

The procedure (the sequential convention of SparseGPT and Wanda):

1. ``capture_block_inputs`` runs the calibration token ids through the model up to the first decoder
   block (a pre-hook stops the forward there) and keeps, in micro-batches, the hidden states that
   enter it. One extra forward of a single sequence records the *other* arguments each block
   receives (attention mask, rotary ``position_embeddings``, ``position_ids``, ...) exactly as the
   model passes them, one set per block. This is what makes the mechanism generic: Gemma 3 gives its
   sliding-window layers a different mask and rotary table than its full-attention layers, GPT-2
   passes the mask positionally, OPT passes ``position_ids``; none of it is re-derived here.
2. ``for_each_block`` then visits the blocks in order. For block *i* it runs the stored hidden states
   through the block with forward hooks on the chosen linear layers feeding statistic *collectors*
   (``InputNormCollector`` for Wanda, ``HessianCollector`` for SparseGPT), hands a ``BlockContext``
   to the method's callback (which edits the weights), and finally re-runs the **modified** block to
   produce the inputs of block *i + 1*. With ``keep_dense_outputs=True`` the outputs of the block
   before the callback touched it are kept as well (teacher targets for SDS re-densing or Týr).
   Otherwise the statistics pass stops each forward once the last observed layer has been fed
   (a Llama block's ``down_proj`` and residual add only make outputs nobody reads); the collectors
   see exactly the same inputs either way.

Only one block's activations (``N x seq x hidden``, plus the dense outputs when asked) and its
statistics are held at a time. Everything runs under ``torch.no_grad()``; a callback that trains
(SDS) opens ``torch.enable_grad()`` itself and calls ``BlockContext.forward``.

The extra block arguments are recorded with a batch of one sequence and broadcast over each
micro-batch: calibration windows are full (no padding), so masks and rotary tables are the same for
every sequence. A block that accepts them for one sequence but not for two (Bloom's ALiBi biases and
XGLM's masks carry the batch's size) is run one sequence at a time (``BlockCall.rows_per_call``).

Example:
    >>> from hf_compress.assets import tiny_model
    >>> model, tokenizer = tiny_model("llama")
    >>> ids = calibration_batches(["some calibration text " * 40], tokenizer, num_sequences=4, seq_len=64)
    >>> def report(ctx):
    ...     hessian = ctx.stats["mlp.down_proj"][0].hessian
    ...     print(ctx.index, tuple(hessian.shape))
    >>> _ = for_each_block(
    ...     model, ids, report, progress=False,
    ...     collectors_for=lambda name, layer: [HessianCollector()] if name == "mlp.down_proj" else [],
    ... )
    0 (128, 128)
    1 (128, 128)
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
from torch import nn

from .. import _compat
from ..utils import get_logger, progress_bar
from .fused_experts import experts_through_projections
from .layers import evaluation_mode, find_decoder_blocks, find_linear_layers, module_execution_device, onloaded


if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase


__all__ = [
    "BlockCall",
    "BlockContext",
    "BlockInputs",
    "Collector",
    "HessianCollector",
    "InputNormCollector",
    "calibration_batches",
    "check_token_ids",
    "calibration_loss",
    "capture_block_inputs",
    "for_each_block",
    "forward_from_block",
]

logger = get_logger(__name__)


# --------------------------------------------------------------------------------------------------
# Statistic collectors
# --------------------------------------------------------------------------------------------------


@runtime_checkable
class Collector(Protocol):
    """Anything that accumulates statistics from a linear layer's inputs.

    ``add_batch`` receives the layer input as the layer saw it (``[..., in_features]``, any leading
    shape, the model's dtype); it is called once per calibration micro-batch.
    """

    def add_batch(self, inputs: torch.Tensor) -> None: ...


class InputNormCollector:
    """Per-input-feature squared norms over all calibration tokens (Wanda's activation statistic).

    After the batches, ``sum_squares[j] = Σ_t x_tj²`` (fp32), ``norms[j] = ‖X[:, j]‖₂`` and
    ``num_tokens`` is the number of tokens seen. Wanda scores weight ``W_ij`` as ``|W_ij| · norms[j]``.

    Example:
        >>> collector = InputNormCollector()
        >>> collector.add_batch(torch.tensor([[3.0, 0.0], [4.0, 1.0]]))
        >>> collector.norms.tolist(), collector.num_tokens
        ([5.0, 1.0], 2)
    """

    def __init__(self) -> None:
        self.sum_squares: torch.Tensor | None = None
        self.num_tokens = 0

    def add_batch(self, inputs: torch.Tensor) -> None:
        x = inputs.detach().reshape(-1, inputs.shape[-1]).float()
        squares = x.pow(2).sum(dim=0)
        self.sum_squares = squares if self.sum_squares is None else self.sum_squares + squares
        self.num_tokens += x.shape[0]

    @property
    def norms(self) -> torch.Tensor:
        """``‖X[:, j]‖₂`` for every input feature ``j`` (fp32)."""
        return self._require().sqrt()

    @property
    def mean_squares(self) -> torch.Tensor:
        """``Σ_t x_tj² / num_tokens``: the ranking of ``norms`` on a scale independent of the token count."""
        return self._require() / self.num_tokens

    def _require(self) -> torch.Tensor:
        if self.sum_squares is None:
            raise RuntimeError("InputNormCollector has not seen any batch.")
        return self.sum_squares


class HessianCollector:
    """The layer-wise Hessian proxy ``H = 2/n Σ_t x_t x_tᵀ`` (fp32, ``[in_features, in_features]``).

    ``n = num_tokens`` (every calibration token of every sequence). The running update rescales the
    previous average instead of summing, so large token counts do not overflow fp32 precision. The
    scale of ``H`` does not change SparseGPT's or Týr's solutions (damping is relative to its mean
    diagonal); ``H * num_tokens / 2`` recovers the plain sum ``Σ x xᵀ``.

    Example:
        >>> collector = HessianCollector()
        >>> collector.add_batch(torch.tensor([[1.0, 2.0]]))
        >>> collector.hessian.tolist()
        [[2.0, 4.0], [4.0, 8.0]]
    """

    def __init__(self) -> None:
        self.hessian: torch.Tensor | None = None
        self.num_tokens = 0

    def add_batch(self, inputs: torch.Tensor) -> None:
        x = inputs.detach().reshape(-1, inputs.shape[-1]).float()
        count = x.shape[0]
        if count == 0:
            return
        total = self.num_tokens + count
        if self.hessian is None:
            self.hessian = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float32, device=x.device)
        else:
            self.hessian.mul_(self.num_tokens / total)
        self.hessian.addmm_(x.t(), x, alpha=2.0 / total)
        self.num_tokens = total


CollectorsFor = Callable[[str, nn.Module], "Sequence[Collector] | Collector | None"]


# --------------------------------------------------------------------------------------------------
# Captured block inputs
# --------------------------------------------------------------------------------------------------


@dataclass
class BlockCall:
    """How the model calls one block, minus the hidden states: extra positional and keyword arguments.

    ``hidden_states_keyword`` is set when the model passes the hidden states by keyword (``None``: as
    the first positional argument, the transformers convention). ``rows_per_call`` is set (to 1) for
    blocks that take these arguments for one sequence only: longer batches are run piece by piece.
    """

    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    hidden_states_keyword: str | None = None
    rows_per_call: int | None = None

    def __call__(
        self, block: nn.Module, hidden_states: torch.Tensor, device: torch.device | None = None
    ) -> torch.Tensor:
        """Run ``block`` on ``hidden_states`` with these arguments, moved to ``device``."""
        return _hidden_states_of(self.output(block, hidden_states, device))

    def pieces(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``hidden_states`` in the row counts the block takes these arguments for (itself, for most blocks)."""
        if self.rows_per_call is None or hidden_states.shape[0] <= self.rows_per_call:
            return (hidden_states,)
        return hidden_states.split(self.rows_per_call)

    def output(self, block: nn.Module, hidden_states: torch.Tensor, device: torch.device | None = None) -> Any:
        """What ``block`` returns, as the model's own loop receives it (a tensor, or a tuple from older blocks).

        A batch run piece by piece (``rows_per_call``) returns its hidden states only, as a one-item tuple
        when the block returns tuples: the other items (attention weights, caches) are per piece.
        """
        pieces = self.pieces(hidden_states)
        if len(pieces) > 1:
            outputs = [self.output(block, piece, device) for piece in pieces]
            hidden = torch.cat([_hidden_states_of(output) for output in outputs])
            return hidden if torch.is_tensor(outputs[0]) else (hidden,)
        args, kwargs = self.args, self.kwargs
        if device is not None:
            args, kwargs = _to_device((args, kwargs), device)
            hidden_states = hidden_states.to(device)
        if self.hidden_states_keyword is None:
            return block(hidden_states, *args, **kwargs)
        return block(*args, **{**kwargs, self.hidden_states_keyword: hidden_states})

    def on(self, device: torch.device, dtype: torch.dtype | None = None) -> BlockCall:
        """A copy whose tensors live on ``device`` (a no-op copy when they already do).

        With ``dtype``, floating-point tensors (masks, rotary tables) are cast too, e.g. to run a
        half-precision model's block in float32.
        """
        args, kwargs = _to_device((self.args, self.kwargs), device, dtype)
        return replace(self, args=args, kwargs=kwargs)


@dataclass
class BlockInputs:
    """Calibration activations entering a block, plus the arguments the model gives every block.

    ``hidden_states`` is a list of micro-batches ``[batch, seq, hidden]``; ``calls[i]`` holds the
    extra arguments of block ``i``.
    """

    hidden_states: list[torch.Tensor]
    calls: list[BlockCall]

    @property
    def num_sequences(self) -> int:
        return sum(h.shape[0] for h in self.hidden_states)


class _StopForward(Exception):
    """Raised by a pre-hook to end a model forward once the wanted inputs are recorded."""


def capture_block_inputs(
    model: nn.Module,
    calibration_ids: torch.Tensor,
    *,
    batch_size: int = 8,
    storage_device: torch.device | str | None = None,
) -> BlockInputs:
    """Hidden states entering the first decoder block, and every block's other arguments.

    The hidden states are captured per micro-batch of ``batch_size`` sequences by stopping the
    forward at the first block; the other arguments are recorded on every block during one forward
    of the first sequence alone (stopped before the last block runs). A block that takes them for
    one sequence only gets its micro-batches sequence by sequence (``BlockCall.rows_per_call``).
    ``storage_device`` is where the hidden states are kept (default: where the first block receives them).

    Example:
        >>> from hf_compress.assets import tiny_model
        >>> model, _ = tiny_model("gemma3")
        >>> captured = capture_block_inputs(model, torch.randint(0, 256, (3, 40)), batch_size=2)
        >>> [tuple(h.shape) for h in captured.hidden_states], len(captured.calls)
        ([(2, 40, 64), (1, 40, 64)], 2)
    """
    ids = _check_ids(calibration_ids)
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
    with evaluation_mode(model), torch.no_grad():
        return _capture(model, ids, batch_size, storage_device)


def _capture(
    model: nn.Module, ids: torch.Tensor, batch_size: int, storage_device: torch.device | str | None
) -> BlockInputs:
    _, blocks = find_decoder_blocks(model)
    input_device = _input_device(model)
    storage = torch.device(storage_device) if storage_device is not None else None

    # 1) Every block's arguments, from one forward of a single sequence, replayed for every sequence: refused when
    # they depend on the sequence's tokens (Gemma 3n/4's per-layer inputs, DeepSeek-V4's token ids for its hash
    # routing), as a second sequence tells.
    first = ids[:1]
    second = ids[1:2] if len(ids) > 1 and not torch.equal(ids[1:2], first) else first.roll(1, dims=-1)
    calls = _record_calls(model, blocks, first.to(input_device))
    positional = [name for name in inspect.signature(blocks[0].forward).parameters][1:]  # after the hidden states
    differing = _differing_arguments(calls, _record_calls(model, blocks, second.to(input_device)), positional)
    if differing:
        raise NotImplementedError(
            f"{type(blocks[0]).__name__} receives inputs that depend on the sequence's tokens besides the hidden "
            f"states ({', '.join(differing)}); hf_compress replays one sequence's block arguments for every "
            "calibration sequence, which would be wrong here, so it cannot calibrate this model. Methods without "
            "calibration (magnitude pruning, RTN) work on it."
        )

    # 2) The first block's hidden states, micro-batch by micro-batch.
    hidden_states: list[torch.Tensor] = []

    def grab(module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden, _ = _hidden_from(args, kwargs)
        hidden_states.append(hidden.detach() if storage is None else hidden.detach().to(storage))
        raise _StopForward

    handle = blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for start in range(0, ids.shape[0], batch_size):
            _forward_until_stop(model, ids[start : start + batch_size].to(input_device))
    finally:
        handle.remove()
    first_two = torch.cat([hidden[:2] for hidden in hidden_states[:2]])[:2]  # across micro-batches of one
    if _takes_one_sequence_only(blocks[0], calls[0], first_two):
        logger.info("%s takes the recorded block arguments for one sequence at a time (its masks or position biases "
                    "carry the batch's size): calibration runs its blocks sequence by sequence", type(blocks[0]).__name__)
        calls = [replace(call, rows_per_call=1) for call in calls]
    return BlockInputs(hidden_states=hidden_states, calls=calls)  # type: ignore[arg-type]


def _takes_one_sequence_only(block: nn.Module, call: BlockCall, hidden: torch.Tensor) -> bool:
    """True for a block that takes the recorded (one-sequence) arguments for one sequence but not for two: Bloom's
    ALiBi biases and XGLM's masks must have the batch's size."""
    if hidden.shape[0] < 2:
        return False  # one calibration sequence: no batch will have two
    device = module_execution_device(block)
    with torch.no_grad():
        try:
            call(block, hidden[:2], device)
            return False
        except (RuntimeError, ValueError):
            try:
                call(block, hidden[:1], device)
            except (RuntimeError, ValueError):
                return False  # fails for one sequence too: the block's own error, raised where it is used
    return True


def _record_calls(model: nn.Module, blocks: Sequence[nn.Module], ids: torch.Tensor) -> list[BlockCall]:
    """Every block's arguments (minus the hidden states) in one forward of ``ids``, stopped at the last block."""
    calls: list[BlockCall | None] = [None] * len(blocks)

    def record(index: int) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            calls[index] = _split_call(args, kwargs)
            if index == len(blocks) - 1:
                raise _StopForward

        return hook

    handles = [block.register_forward_pre_hook(record(i), with_kwargs=True) for i, block in enumerate(blocks)]
    try:
        _forward_until_stop(model, ids)
    finally:
        for handle in handles:
            handle.remove()
    missing = [i for i, call in enumerate(calls) if call is None]
    if missing:
        raise RuntimeError(
            f"decoder blocks {missing} were not called during the model's forward; hf_compress cannot "
            "calibrate a model that skips blocks."
        )
    return calls  # type: ignore[return-value]


def _differing_arguments(calls: list[BlockCall], others: list[BlockCall], positional: Sequence[str] = ()) -> list[str]:
    """Names of the block arguments whose tensors differ between two recordings (in first-seen order); ``positional``
    names the positional ones after the hidden states."""
    differing: dict[str, None] = {}

    def compare(name: str, value: Any, other: Any) -> None:
        if torch.is_tensor(value):
            if not (torch.is_tensor(other) and value.shape == other.shape and torch.equal(value, other)):
                differing[name] = None
        elif isinstance(value, (tuple, list)) and isinstance(other, (tuple, list)) and len(value) == len(other):
            for item, other_item in zip(value, other):
                compare(name, item, other_item)
        elif isinstance(value, dict) and isinstance(other, dict):
            for key in value:
                compare(name, value[key], other.get(key))

    for call, other in zip(calls, others):
        for position, (value, other_value) in enumerate(zip(call.args, other.args)):
            compare(positional[position] if position < len(positional) else f"argument {position + 1}", value,
                    other_value)
        for key, value in call.kwargs.items():
            compare(key, value, other.kwargs.get(key))
    return list(differing)


def _forward_until_stop(model: nn.Module, ids: torch.Tensor) -> None:
    try:
        model(input_ids=ids, use_cache=False)
    except _StopForward:
        return
    raise RuntimeError("the model's forward finished without calling its decoder blocks.")


def _split_call(args: tuple, kwargs: dict) -> BlockCall:
    hidden, keyword = _hidden_from(args, kwargs)
    if keyword is None:
        return BlockCall(args=tuple(args[1:]), kwargs=dict(kwargs))
    rest = {k: v for k, v in kwargs.items() if k != keyword}
    return BlockCall(args=tuple(args), kwargs=rest, hidden_states_keyword=keyword)


def _hidden_from(args: tuple, kwargs: dict) -> tuple[torch.Tensor, str | None]:
    if args and torch.is_tensor(args[0]):
        return args[0], None
    for keyword in ("hidden_states", "hidden_state", "x"):
        if torch.is_tensor(kwargs.get(keyword)):
            return kwargs[keyword], keyword
    raise RuntimeError("could not find the hidden states among the decoder block's arguments.")


def _hidden_states_of(output: Any) -> torch.Tensor:
    # transformers 5 blocks return a tensor; older or custom ones return a tuple whose first item it is.
    if torch.is_tensor(output):
        return output
    if isinstance(output, (tuple, list)) and output and torch.is_tensor(output[0]):
        return output[0]
    if hasattr(output, "to_tuple"):
        return output.to_tuple()[0]
    raise TypeError(f"unexpected decoder block output of type {type(output).__name__}.")


def _to_device(obj: Any, device: torch.device, dtype: torch.dtype | None = None) -> Any:
    if torch.is_tensor(obj):
        if dtype is not None and obj.is_floating_point():
            return obj.to(device, dtype)
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to_device(item, device, dtype) for item in obj)
    if isinstance(obj, list):
        return [_to_device(item, device, dtype) for item in obj]
    if isinstance(obj, dict):
        return {key: _to_device(value, device, dtype) for key, value in obj.items()}
    return obj


def _input_device(model: nn.Module) -> torch.device:
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return module_execution_device(embeddings if embeddings is not None else model)


def _check_ids(calibration_ids: torch.Tensor) -> torch.Tensor:
    if not torch.is_tensor(calibration_ids) or calibration_ids.ndim != 2:
        raise ValueError(
            "calibration_ids must be a [num_sequences, seq_len] tensor of token ids; build one from text "
            "with calibration_batches(texts, tokenizer, ...)."
        )
    if calibration_ids.shape[0] == 0 or calibration_ids.shape[1] == 0:
        raise ValueError(f"calibration_ids is empty (shape {list(calibration_ids.shape)}).")
    if calibration_ids.is_floating_point():
        raise ValueError("calibration_ids must hold integer token ids.")
    return calibration_ids.long()


# --------------------------------------------------------------------------------------------------
# Block-by-block iteration
# --------------------------------------------------------------------------------------------------


@dataclass
class BlockContext:
    """What a method's callback receives for one decoder block.

    Attributes:
        index: position of the block (0-based); ``num_blocks`` is the total.
        name: qualified name of the block in the model (``"model.layers.3"``).
        block: the block module; edit its weights in place (``set_weight_matrix``).
        linear_layers: the block's linear layers after ``skip``, by name relative to the block.
        stats: collectors filled with this block's calibration inputs, by linear layer name
            (only the layers for which ``collectors_for`` returned some).
        inputs: micro-batches of hidden states entering the block (outputs of the already processed,
            possibly modified, previous blocks).
        dense_outputs: with ``keep_dense_outputs=True``, the block's outputs on ``inputs`` before the
            callback ran, micro-batch by micro-batch; otherwise ``None``.
        call: the extra arguments the model gives this block (already on the block's device).
        device: the device the block computes on.
    """

    index: int
    num_blocks: int
    name: str
    block: nn.Module
    linear_layers: dict[str, nn.Module]
    stats: dict[str, list[Collector]]
    inputs: list[torch.Tensor]
    dense_outputs: list[torch.Tensor] | None
    call: BlockCall
    device: torch.device

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Run the block, as it is now, on one micro-batch of hidden states (grad mode is the caller's).

        Example:
            >>> with torch.enable_grad():  # doctest: +SKIP
            ...     loss = (ctx.forward(ctx.inputs[0]) - ctx.dense_outputs[0]).pow(2).mean()
        """
        return self.call(self.block, hidden_states, self.device)

    def outputs(self) -> list[torch.Tensor]:
        """The block's current outputs on all ``inputs`` (no grad)."""
        with torch.no_grad():
            return [self.forward(hidden) for hidden in self.inputs]

    def collect(
        self, collectors_for: CollectorsFor, names: Sequence[str] | None = None
    ) -> dict[str, list[Collector]]:
        """Fresh statistics from running ``inputs`` through the block as it is now.

        For methods that update a block in stages ("true sequential" SparseGPT: attention first,
        then re-collect the MLP statistics from the pruned attention).

        Example:
            >>> fresh = ctx.collect(lambda *_: HessianCollector(), names=["mlp.down_proj"])  # doctest: +SKIP
        """
        layers = {n: layer for n, layer in self.linear_layers.items() if names is None or n in names}
        stats = _make_collectors(layers, collectors_for)
        with torch.no_grad(), _StatisticsPass(layers, stats, stop_early=True, block=self.block) as stats_pass:
            for hidden in self.inputs:
                stats_pass.run(self.forward, hidden)
        return stats


BlockCallback = Callable[[BlockContext], None]


def for_each_block(
    model: nn.Module,
    calibration_ids: torch.Tensor | BlockInputs,
    callback: BlockCallback | None = None,
    *,
    collectors_for: CollectorsFor | None = None,
    skip: Sequence[str] = (),
    batch_size: int = 8,
    keep_dense_outputs: bool = False,
    progress: bool = True,
    storage_device: torch.device | str | None = None,
    return_outputs: bool = True,
    fused_experts: bool = False,
) -> list[torch.Tensor]:
    """Visit the decoder blocks in order with their calibration activations (sequential convention).

    For each block: run its inputs through it while ``collectors_for(name, layer)`` collectors
    gather statistics of the selected linear layers, call ``callback(ctx)`` with a ``BlockContext``,
    then re-run the (possibly modified) block to produce the next block's inputs.

    Args:
        model: a transformers decoder (or PEFT-wrapped one); switched to eval mode while running.
        calibration_ids: ``[num_sequences, seq_len]`` token ids (see ``calibration_batches``), or
            inputs already captured with ``capture_block_inputs`` (consumed: the list is reused).
        callback: called once per block; edits weights in place. Runs under ``torch.no_grad()``
            and, for accelerate-offloaded blocks, inside ``onloaded(block)``.
        collectors_for: ``(name relative to block, layer) -> collectors`` (a list, one collector or
            ``None``) for each linear layer; ``None`` collects nothing.
        skip: ``fnmatch`` patterns of linear layers to leave out, matched against the name relative
            to the block (``"self_attn.*"``) and the qualified one (``"model.layers.0.*"``).
        batch_size: sequences per forward micro-batch.
        keep_dense_outputs: keep the block's outputs from before the callback in ``ctx.dense_outputs``.
        progress: show a tqdm bar over blocks.
        storage_device: where activations are kept between blocks (default: the device they come
            out on); e.g. ``"cpu"`` to save accelerator memory.
        return_outputs: ``False`` skips re-running the last block after its callback (one block
            forward less, for callers that only edit weights); an empty list is returned.
        fused_experts: also observe each expert of a mixture-of-experts block stored as 3-D parameters, as
            ``ExpertProjection`` layers (``find_linear_layers(..., fused_experts=True)``) fed the tokens routed to
            that expert; for callbacks that edit weights in place through ``weight_matrix`` / ``set_weight_matrix``.

    Returns:
        The outputs of the last block (the input of the final norm), micro-batch by micro-batch
        (empty with ``return_outputs=False``).

    Example:
        >>> from hf_compress.modeling import set_weight_matrix, weight_matrix
        >>> def wanda_half(ctx):  # doctest: +SKIP
        ...     for name, layer in ctx.linear_layers.items():
        ...         score = weight_matrix(layer).abs() * ctx.stats[name][0].norms
        ...         drop = score.argsort(dim=1)[:, : score.shape[1] // 2]
        ...         set_weight_matrix(layer, weight_matrix(layer).scatter(1, drop, 0.0))
        >>> norms = lambda name, layer: InputNormCollector()
        >>> for_each_block(model, ids, wanda_half, collectors_for=norms)  # doctest: +SKIP
    """
    block_name, blocks = find_decoder_blocks(model)
    storage = torch.device(storage_device) if storage_device is not None else None
    with evaluation_mode(model):  # dropout off: deterministic statistics and activations
        with torch.no_grad():
            if isinstance(calibration_ids, BlockInputs):
                captured = calibration_ids
            else:
                ids = _check_ids(calibration_ids)
                logger.info(
                    "calibrating %d sequences x %d tokens through %d blocks (%s), micro-batches of %d",
                    ids.shape[0], ids.shape[1], len(blocks), block_name, batch_size,
                )
                captured = capture_block_inputs(model, ids, batch_size=batch_size, storage_device=storage)
            if len(captured.calls) != len(blocks):
                raise ValueError(
                    f"the captured inputs are for {len(captured.calls)} blocks, the model has {len(blocks)}."
                )
            hidden = captured.hidden_states
            bar = progress_bar(total=len(blocks), disable=not progress, unit="block", leave=False)
            try:
                for index, block in enumerate(blocks):
                    bar.set_description(f"calibrating block {index + 1}/{len(blocks)}")
                    hidden = _process_block(
                        index, f"{block_name}.{index}", block, captured.calls[index], hidden, len(blocks),
                        callback=callback, collectors_for=collectors_for, skip=skip,
                        keep_dense_outputs=keep_dense_outputs, storage=storage,
                        propagate=return_outputs or index + 1 < len(blocks), fused_experts=fused_experts,
                    )
                    captured.hidden_states = hidden
                    bar.update()
            finally:
                bar.close()
        return hidden


def _process_block(
    index: int,
    name: str,
    block: nn.Module,
    call: BlockCall,
    inputs: list[torch.Tensor],
    num_blocks: int,
    *,
    callback: BlockCallback | None,
    collectors_for: CollectorsFor | None,
    skip: Sequence[str],
    keep_dense_outputs: bool,
    storage: torch.device | None,
    propagate: bool = True,
    fused_experts: bool = False,
) -> list[torch.Tensor]:
    device = module_execution_device(block)
    call = call.on(device)  # move masks / rotary tables once per block, not once per micro-batch
    layers = find_linear_layers(block, skip, qualified_prefix=name, fused_experts=fused_experts)
    stats = _make_collectors(layers, collectors_for) if collectors_for is not None else {}
    # Fused experts compute through their projection modules while observed, so the hooks see each expert's tokens.
    routed = experts_through_projections(block, layers) if fused_experts else contextlib.nullcontext()

    dense: list[torch.Tensor] | None = None
    if keep_dense_outputs or callback is None:  # the block's outputs are wanted: full forwards
        dense = []
        with routed, _StatisticsPass(layers, stats, stop_early=False, block=block) as stats_pass:
            for hidden in inputs:
                outs = [stats_pass.run(call, block, piece, device) for piece in call.pieces(hidden)]
                out = outs[0] if len(outs) == 1 else torch.cat(outs)
                dense.append(out if storage is None else out.to(storage))
    elif stats:  # only the statistics are wanted: each forward may end at the last observed layer
        with routed, _StatisticsPass(layers, stats, stop_early=True, block=block) as stats_pass:
            for hidden in inputs:
                for piece in call.pieces(hidden):  # each piece's forward may stop early on its own
                    stats_pass.run(call, block, piece, device)
    if callback is None:
        return dense  # nothing can have changed the block  # type: ignore[return-value]

    context = BlockContext(
        index=index, num_blocks=num_blocks, name=name, block=block, linear_layers=layers, stats=stats,
        inputs=inputs, dense_outputs=dense if keep_dense_outputs else None, call=call, device=device,
    )
    del dense  # held only through the context when asked for
    with onloaded(block):
        callback(context)
    del context, stats
    logger.debug("block %d/%d (%s) done", index + 1, num_blocks, name)
    if not propagate:
        inputs.clear()
        return inputs
    # The next block sees the modified block's outputs. Each micro-batch replaces its input in place, so
    # activations are not held twice.
    for position, hidden in enumerate(inputs):
        out = call(block, hidden, device)
        inputs[position] = out if storage is None else out.to(storage)
    return inputs


def _make_collectors(
    layers: dict[str, nn.Module], collectors_for: CollectorsFor
) -> dict[str, list[Collector]]:
    stats: dict[str, list[Collector]] = {}
    for layer_name, layer in layers.items():
        made = collectors_for(layer_name, layer)
        if made is None:
            continue
        made = [made] if isinstance(made, Collector) else list(made)
        if made:
            stats[layer_name] = made
    return stats


class _StatisticsPass:
    """Forward pre-hooks feeding each observed layer's input to its collectors, one micro-batch per ``run``.

    With ``stop_early``, once a micro-batch has shown that every observed layer runs exactly once per
    block forward, a later forward is ended (``_StopForward``) as soon as the last of them has been fed
    and every other one was fed before it: the rest of the block (a Llama block's ``down_proj`` and
    residual add, about a tenth of a calibration pass) would only produce outputs nobody reads. The
    collectors see the same inputs in the same order either way. Blocks with accelerate hooks always
    run to the end (an interrupted forward would skip the hook's offloading).
    """

    def __init__(
        self, layers: dict[str, nn.Module], stats: dict[str, list[Collector]], *, stop_early: bool,
        block: nn.Module,
    ) -> None:
        self._stats = stats
        self._stop_early = stop_early and not any(
            _compat.accelerate_hook(module) is not None for module in block.modules()
        )
        self._fed: list[str] = []
        self._last: str | None = None  # the layer after which forwards may stop, once known
        self._handles = [layers[name].register_forward_pre_hook(self._feeder(name)) for name in stats]

    def _feeder(self, name: str) -> Callable:
        collectors = self._stats[name]

        def hook(module: nn.Module, args: tuple) -> None:
            for collector in collectors:
                collector.add_batch(args[0])
            self._fed.append(name)
            if name == self._last and len(set(self._fed)) == len(self._stats):
                raise _StopForward

        return hook

    def run(self, forward: Callable[..., torch.Tensor], *args: Any) -> torch.Tensor | None:
        """One micro-batch: ``forward(*args)``'s output, or ``None`` when the forward was stopped early."""
        self._fed = []
        try:
            output = forward(*args)
        except _StopForward:
            return None
        once_each = len(self._fed) == len(self._stats) == len(set(self._fed))
        if self._stop_early and self._last is None and self._fed and once_each:
            self._last = self._fed[-1]
        return output

    def __enter__(self) -> _StatisticsPass:
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()


# --------------------------------------------------------------------------------------------------
# Calibration token windows
# --------------------------------------------------------------------------------------------------


def check_token_ids(model: nn.Module, ids: Any, what: str = "calibration token ids", min_length: int = 1) -> None:
    """Refuse token ids the model cannot read: not a non-empty ``[N, L]`` integer tensor (``L >= min_length``), or
    ids outside its vocabulary (another tokenizer's). Raised before any forward, which would fail on them inside
    the embedding (an ``IndexError``, or a dtype error for floats).

    Example:
        >>> from hf_compress.assets import tiny_model
        >>> check_token_ids(tiny_model("llama")[0], torch.tensor([[1, 2, 9999]]))
        Traceback (most recent call last):
        ...
        ValueError: calibration token ids must lie in [0, 256) (the model's vocabulary), got values in [1, 9999]; tokenize with this model's tokenizer.
    """
    if (not torch.is_tensor(ids) or ids.ndim != 2 or ids.numel() == 0 or ids.is_floating_point()
            or ids.is_complex() or ids.dtype == torch.bool or ids.shape[1] < min_length):
        shape = f"shape {list(ids.shape)} ({ids.dtype})" if torch.is_tensor(ids) else type(ids).__name__
        length = f" with seq_len >= {min_length}" if min_length > 1 else ""
        raise ValueError(f"{what} must be a non-empty [num_sequences, seq_len] integer tensor{length}, got {shape}.")
    vocab = model.get_input_embeddings().num_embeddings
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= vocab:
        raise ValueError(f"{what} must lie in [0, {vocab}) (the model's vocabulary), got values in [{low}, {high}]; "
                         "tokenize with this model's tokenizer.")


def calibration_batches(
    texts_or_dataset: str | Sequence[str] | Dataset,
    tokenizer: PreTrainedTokenizerBase,
    num_sequences: int = 128,
    seq_len: int = 512,
    seed: int = 0,
) -> torch.Tensor:
    """``[num_sequences, seq_len]`` token windows sampled deterministically from calibration text.

    The documents (a ``datasets.Dataset`` with a ``text`` column, a list of strings, or one string)
    are joined with a blank line and tokenized once without special tokens, as for perplexity; then
    ``num_sequences`` window starts are drawn uniformly with a ``torch.Generator`` seeded with
    ``seed`` (windows may overlap, as Wanda/SparseGPT's random C4 windows may). Same text, tokenizer
    and seed give the same windows. A tokenizer that starts every text with BOS (Llama, Mistral, Gemma 3) gets
    windows of BOS + ``seq_len - 1`` text tokens, as perplexity windows do: such models see a BOS in training
    and behave differently without one (Gemma 3's perplexity is inflated), so the statistics and losses
    calibration feeds a method come from the inputs the model will serve.

    Raises:
        ValueError: the text has fewer than ``seq_len`` tokens.

    Example:
        >>> from hf_compress.assets import tiny_tokenizer
        >>> calibration_batches(["abcdefgh"], tiny_tokenizer(), num_sequences=2, seq_len=4, seed=0).shape
        torch.Size([2, 4])
    """
    if num_sequences < 1 or seq_len < 1:
        raise ValueError(f"num_sequences and seq_len must be positive, got {num_sequences} and {seq_len}.")
    # lazy: evaluation is not needed to import modeling
    from ..evaluation.perplexity import tokenize_stream, window_bos

    bos = window_bos(tokenizer)
    if bos is not None and seq_len < 2:
        raise ValueError(f"seq_len must be at least 2 for a tokenizer that starts each window with BOS, got {seq_len}.")
    texts = [texts_or_dataset] if isinstance(texts_or_dataset, str) else texts_or_dataset
    stream = tokenize_stream(texts, tokenizer)
    length = seq_len if bos is None else seq_len - 1
    if stream.numel() < length:
        raise ValueError(
            f"the calibration text has {stream.numel()} tokens, fewer than seq_len={seq_len}; "
            "pass more text or a smaller seq_len."
        )
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, stream.numel() - length + 1, (num_sequences,), generator=generator)
    windows = torch.stack([stream[start : start + length] for start in starts.tolist()])
    if bos is not None:
        windows = torch.cat([windows.new_full((num_sequences, 1), bos), windows], dim=1)
    return windows


@torch.no_grad()
def calibration_loss(model: nn.Module, windows: torch.Tensor, batch_size: int = 4, tail: float = 1.0) -> float:
    """Mean next-token cross-entropy (nats) of ``model`` on ``windows`` (``[N, L]`` token ids), over the last ``tail``
    of each window's predicted tokens (1.0 = all of them; the whole window is always the forward's input).

    What the searches that score a changed model on calibration text compare: the token router's schedule search,
    SLEB's and BlockPruner's greedy removal.

    Example:
        >>> from hf_compress.assets import tiny_model
        >>> ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
        >>> calibration_loss(tiny_model("llama")[0], ids) > 0
        True
    """
    device = _input_device(model)  # not a parameter's: an accelerate-offloaded one is on 'meta'
    scored = max(1, round(tail * (windows.shape[1] - 1)))
    # logits_to_keep only when it saves work: the whole-window reading runs on models without that argument too
    keep = {"logits_to_keep": scored + 1} if tail < 1.0 else {}
    total, count = 0.0, 0
    for start in range(0, len(windows), batch_size):
        batch = windows[start : start + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False, **keep).logits
        targets = batch[:, -scored:]
        # Window by window: the float copy and log-softmax of one window's logits, not of the batch's (each as large
        # as the logits the forward holds); and those are dropped before the next forward makes its own.
        for row in range(targets.shape[0]):
            loss = nn.functional.cross_entropy(logits[row, -scored - 1 : -1].float(), targets[row], reduction="sum")
            total += float(loss)
        count += targets.numel()
        del logits
    return total / count


@contextlib.contextmanager
def forward_from_block(
    model: nn.Module, index: int, hidden_states: Sequence[torch.Tensor], *, tuple_outputs: bool = False
) -> Iterator[None]:
    """Inside, the model's own forward starts at decoder block ``index``: the blocks before it pass their input
    through unchanged, and block ``index`` receives ``hidden_states[k]`` on the k-th forward instead.

    For searches that change only blocks ``index`` and later: the hidden states entering block ``index``, computed
    once (``capture_block_inputs`` and ``BlockCall``), stand in for the unchanged blocks before it, and the model's
    own code runs the rest (later blocks, final norm, head, soft-capping). The forwards must come in the order and
    micro-batch sizes of ``hidden_states``; a forward whose shape differs, or one more than there are saved
    micro-batches, raises instead of computing a wrong result. ``tuple_outputs``: the blocks return tuples (older
    transformers blocks) rather than a tensor, so the pass-through does too.

    Example:
        >>> from hf_compress.assets import tiny_model
        >>> model, _ = tiny_model("llama")
        >>> ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
        >>> captured = capture_block_inputs(model, ids)
        >>> entering_1 = [captured.calls[0](model.model.layers[0], h) for h in captured.hidden_states]
        >>> with torch.no_grad(), forward_from_block(model, 1, entering_1):
        ...     resumed = model(ids).logits
        >>> torch.allclose(resumed, model(ids).logits)
        True
    """
    _, blocks = find_decoder_blocks(model)
    if not 0 <= index < len(blocks):
        raise ValueError(f"block index {index} is outside the model's {len(blocks)} decoder blocks.")
    saved = iter(hidden_states)

    def passthrough(*args: Any, **kwargs: Any) -> Any:
        hidden, _ = _hidden_from(args, kwargs)
        return (hidden,) if tuple_outputs else hidden

    def substitute(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        arriving, keyword = _hidden_from(args, kwargs)
        replacement = next(saved, None)
        if replacement is None or replacement.shape != arriving.shape:
            raise RuntimeError(
                f"forward_from_block: block {index} received hidden states of shape {tuple(arriving.shape)} but the "
                f"saved micro-batch is {None if replacement is None else tuple(replacement.shape)}; run the forwards "
                "in the order and sizes the hidden states were saved in."
            )
        replacement = replacement.to(arriving.device, arriving.dtype)
        if keyword is None:
            return (replacement, *args[1:]), kwargs
        return args, {**kwargs, keyword: replacement}

    # An instance attribute shadows the class's forward; accelerate's offload hooks set one too, so restore it.
    previous = [block.__dict__.get("forward") for block in blocks[:index]]
    for block in blocks[:index]:
        block.forward = passthrough
    handle = blocks[index].register_forward_pre_hook(substitute, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
        for block, forward in zip(blocks[:index], previous):
            if forward is None:
                del block.forward
            else:
                block.forward = forward
