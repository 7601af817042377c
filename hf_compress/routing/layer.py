"""Routed decoder layers: gather the tokens a block computes, run the block on them only, scatter back.

``install_routing(model, schedule)`` turns every decoder block into a routed block in place (the block's class
is swapped for a subclass, so parameter names, ``save_pretrained`` and the model's own forward are unchanged) and
attaches one shared :class:`~hf_compress.routing.router.TokenRouter` to the decoder as ``token_router``.

What a skipped token means (the contract the tests check):

- **Hidden state.** A token skipped at block ℓ leaves it unchanged: ``h_{ℓ+1,t} = h_{ℓ,t}`` (residual pass-through).
  It is not computed at all: no q/k/v projection, no attention row, no MLP.
- **Attention at that block.** A skipped token writes no key/value at block ℓ: later tokens (and itself) do not
  attend to it *at that block*. Kept tokens attend to the kept tokens at or before their own position, with their
  original positions (RoPE and the sliding window use real positions, not gathered indices). The alternative —
  skipped tokens still write K/V from their un-updated hidden state — would need the block's q/k/v code split out
  of every architecture, and computes the projections the routing is meant to save. It is also worse: measured on
  SmolLM2-135M with a masked reference (30% uniform static schedule, perplexity of the last 64 of 256 tokens),
  no K/V gives 14.3 (dense 11.2), un-updated K/V 9e4 — the earliest tokens are skipped at every block, so their
  un-updated state is their embedding, and exposing it to later tokens breaks them.
- **KV cache.** So that every layer's cache stays aligned with positions (crop, beam reorder, batch select and
  sliding windows keep working unchanged), a skipped token's slot at block ℓ is written with zeros and masked out
  for every later query: at each routed block the mask hides the cached keys that are exactly zero. A computed key
  is never exactly the zero vector in practice; padding slots are masked by the padding mask as usual.
- **Decoding.** Routing applies to the prompt forward (the first forward of a sequence). Tokens fed afterwards
  (decoding, speculative verification chunks) are computed at every block and see the prompt's kept tokens only
  — unless ``route_decode`` (the paper's decode variant: skip when the router's probability is below 0.5; the
  router reads a token's position in the whole sequence, and the attention and rank factors of a token fed alone,
  1 and 0, since earlier tokens' states are not kept: tokens fed together are routed as if fed one by one). A
  decoded token skipped at a block leaves a zero cache slot there, like a skipped prompt token; a row that skips
  while another row computes is filled up with its own token, whose output is dropped and whose K/V is zeroed
  before it reaches the cache.
  Assisted generation feeds the prompt and the first draft tokens in one forward, and ``generate(use_cache=False)``
  the prompt and every token generated so far: during ``generate()`` the routed model knows its prompt's length,
  and the tokens past it are treated as decoded tokens (computed at every block, or routed by the decode rule), so
  assisted, prompt-lookup and cacheless decoding stay equal to greedy decoding. A prompt fed in chunks
  (``prefill_chunk_size``) would be routed chunk by chunk, and is refused; so is ``generate()`` given a cache that
  holds part of the prompt with more than one prompt token after it (a prefilled shared prefix), whose cached part
  was routed as a whole prompt and whose rest would be computed as decoded tokens. The exception is a routed model
  drafting for another (``assistant_model=``): transformers calls it with the tokens the target accepted after its
  cache, and those are decoded tokens. Tokens fed after a cached prompt may come with their own 4-D mask (a draft
  tree's ancestor mask), which the routed blocks narrow to the keys they hold; a prompt forward needs the 2-D mask.
- **Outputs.** ``output_attentions`` is refused: a block attends among its kept tokens only.
- **Batches.** Each row selects among its own non-padding tokens (left padding: positions count from the row's
  first real token), so a row gets the same selection alone and in a batch (in float32: in bf16 a padded batch's
  hidden states round differently, which can flip a near-tie of the trained router's scores). Rows that keep
  fewer tokens than the longest are filled up with padding positions (computed, then dropped and masked) so the
  gathered batch is rectangular. Right padding is refused during a routed prompt forward.
- **Sparsity 0.** A block whose schedule entry is 0 runs the original forward untouched, so a schedule of zeros
  is the base model exactly.

Example:
    >>> from hf_compress.assets import tiny_model
    >>> from hf_compress.routing.schedule import RoutingSchedule
    >>> model, _ = tiny_model("llama")
    >>> state = install_routing(model, RoutingSchedule.uniform(0.5, 2))
    >>> state.mode
    'static'
"""

from __future__ import annotations

import contextlib
import inspect
import math
import types
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .. import _compat
from ..modeling.generation import generation_setting
from ..modeling.layers import find_decoder_blocks, has_recurrent_layers, module_execution_device
from .router import TokenRouter, decoded_token_features, router_features, select_tokens, static_scores
from .schedule import RoutingSchedule, check_schedule, skip_count


__all__ = [
    "ROUTING_MODES",
    "RoutedLayerMixin",
    "RoutingState",
    "check_not_routed",
    "install_routing",
    "remove_routing",
    "routing_disabled",
    "routing_mode",
    "routing_state",
]

ROUTING_MODES = ("static", "router", "random")
"""How tokens are ranked: the static positional rule, the trained router, or at random (a baseline)."""

_ROUTED_CLASSES: dict[type, type] = {}


class RoutingState:
    """What the routed blocks of one model share: schedule, router, mode, and the current forward's padding.

    Training sets ``collect`` to a list; each routed block then appends ``(logits, valid, static_keep, r)`` for the
    losses and runs its training forward (``_training_forward``: every token's update gated by the router's
    probability, straight-through) so gradients reach the router.
    """

    def __init__(self, schedule: RoutingSchedule, router: TokenRouter, mode: str, route_decode: bool = False) -> None:
        self.schedule = schedule
        self.router = router
        self.mode = mode
        self.route_decode = route_decode
        self.enabled = True
        self.collect: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]] | None = None
        self.generator = torch.Generator().manual_seed(0)
        self.valid: torch.Tensor | None = None  # (B, past + T) non-padding mask of the current forward
        self.past_length = 0
        self.query_length = 0
        # A routed prompt forward's padding, read once rather than at every block (reading a device tensor's value
        # waits for the device); only prompt forwards use them:
        self.counts: list[int] = []  # each row's non-padding tokens
        self.no_padding = True
        self.prompt_length: int | None = None  # inside generate(): the prompt's length (set by the model's generate)
        self.tail = 0  # tokens of a first forward past the prompt (assisted generation's drafts): computed by all
        # Per forward: the static rule's selection per skip counts (blocks with the same sparsity keep the same
        # tokens), with the rotary tables gathered for it.
        self.selections: dict[Any, Any] = {}
        self.attention: str | None = None  # the blocks' attention implementation, read once per forward
        self.prepared_mask: torch.Tensor | None = None  # a chunk's own 4-D mask (see _takes_prepared_mask)


def routing_state(model: nn.Module) -> RoutingState | None:
    """The routing state of a model with routing installed (``None`` otherwise)."""
    _, blocks = find_decoder_blocks(model)
    return getattr(blocks[0], "_routing_state", None) if len(blocks) else None


def check_not_routed(model: nn.Module, hint: str) -> None:
    """Refuse a token-routed model before a method that rewrites its weights does any work.

    Pruning or quantizing would change the weights the router's schedule was searched and trained on, and save the
    model in that method's format, which has no place for the router (the routed format stores float weights, every
    one dense). ``hint``: what to do instead.

    Example:
        >>> from hf_compress.assets import tiny_model
        >>> model = tiny_model("llama")[0]
        >>> _ = install_routing(model, RoutingSchedule([0.5, 0.5]), mode="static")
        >>> check_not_routed(model, "prune the model before routing it")
        Traceback (most recent call last):
        ...
        ValueError: The model is token-routed: prune the model before routing it.
    """
    if any(isinstance(module, RoutedLayerMixin) for module in model.modules()):
        raise ValueError(f"The model is token-routed: {hint}.")


def install_routing(
    model: nn.Module,
    schedule: RoutingSchedule,
    router: TokenRouter | None = None,
    *,
    mode: str | None = None,
    router_hidden_size: int = 64,
    route_decode: bool = False,
) -> RoutingState:
    """Route ``model``'s decoder blocks by ``schedule``, in place; returns the shared state. Routing the model
    already had is replaced (its router, mode and recorded recipe are dropped; pass ``router=`` to keep a router).

    ``mode`` defaults to ``"router"`` when a router is given, else ``"static"`` (a fresh router is still attached so
    the model can be trained and saved).

    Raises:
        ValueError: an encoder-decoder or bidirectional model, or a schedule whose length is not the block count.
    """
    from ..assets.resolve import check_causal_lm_config

    config = model.config
    check_causal_lm_config(config, type(model).__name__)
    if getattr(config, "use_bidirectional_attention", False):
        raise ValueError(f"{type(model).__name__} uses bidirectional attention; token routing needs a causal LM.")
    if has_recurrent_layers(model):
        # A skipped token would leave a hole in a state that runs through every token in order (and the models mask
        # their padding with the full-length mask, which no longer fits the gathered tokens).
        raise ValueError(f"{type(model).__name__} has recurrent layers (Mamba, linear attention or convolutions), whose "
                         "state runs through every token in order; token routing skips tokens, so it needs a model "
                         "of attention blocks only.")
    prefix, blocks = find_decoder_blocks(model)
    check_schedule(schedule).check_blocks(len(blocks))
    mode = mode or ("router" if router is not None else "static")
    if mode not in ROUTING_MODES:
        raise ValueError(f"mode must be one of {', '.join(ROUTING_MODES)}, got {mode!r}.")
    decoder = model.get_submodule(prefix.rsplit(".", 1)[0]) if "." in prefix else model
    existing = routing_state(model)
    if existing is not None:
        remove_routing(model)
    if router is None:
        device = next(model.parameters()).device  # 'meta' while a routed checkpoint loads: the router loads too
        if device.type == "meta" and any(_compat.accelerate_hook(m) is not None for m in model.modules()):
            device = module_execution_device(model.get_input_embeddings())  # offloaded: where hidden states start
        router = TokenRouter(router_hidden_size).to(device=device, dtype=torch.float32)
    decoder.token_router = router
    state = RoutingState(schedule, router, mode, route_decode)
    layer_types = getattr(config.get_text_config(), "layer_types", None)
    window = getattr(config.get_text_config(), "sliding_window", None)
    local = getattr(config.get_text_config(), "attention_layers", None)
    if layer_types is None and local is not None:  # GPT-Neo: "local" layers attend within window_size
        layer_types = ["sliding_attention" if kind == "local" else "full_attention" for kind in local]
        window = getattr(config.get_text_config(), "window_size", None)
    for index, block in enumerate(blocks):
        base = type(block)
        block.__class__ = _routed_class(base)
        # A block dispatched by accelerate (device_map over several devices, offload) runs the forward its hook saved:
        # without this it would compute every token, silently. The routed class's own forward, not the mixin's:
        # transformers wraps each GradientCheckpointingLayer subclass's forward (checkpointing, outermost only).
        _compat.accelerate_repoint_forward(block, base.forward, type(block).forward)
        block._routing_state = state
        block._routing_index = index
        slides = layer_types[index] == "sliding_attention" if layer_types is not None else window is not None
        block._routing_window = int(window) if slides and window is not None else None
        block._routing_config = config
    hook = decoder.register_forward_pre_hook(_begin_forward, with_kwargs=True)
    decoder._routing_hook = hook
    decoder._routing_state = state
    # An instance attribute, not a class swap: save_pretrained records the class name, and copy.deepcopy rebinds a
    # bound method to the copy. Also under PROMPT_AWARE_GENERATE, which survives transformers rebinding
    # model.generate to a folder's custom_generate (trust_remote_code); that code calls it (speculative/strategies.py).
    model.generate = types.MethodType(_generate_knowing_the_prompt, model)
    setattr(model, PROMPT_AWARE_GENERATE, model.generate)
    if not _being_loaded(model):
        # Recorded on the config at once, so that a plain save_pretrained writes a routed checkpoint (which loads
        # routed after `import hf_compress`) instead of a folder that would always load as the dense model.
        from .format import attach_routed_format

        try:
            attach_routed_format(model)
        except BaseException:
            remove_routing(model)  # refused (e.g. a model already quantized another way): leave it as it came
            raise
    return state


def _being_loaded(model: nn.Module) -> bool:
    """True while the routed format's quantizer prepares this model (it records the config itself)."""
    config = getattr(model.config, "quantization_config", None)
    # The quantizer holds a config object; a plain dict (a config read with AutoConfig, then from_config) is not it.
    return (not isinstance(config, dict) and getattr(config, "quant_method", None) == "hf_compress_routed"
            and "_state" not in getattr(config, "__dict__", {}))


def remove_routing(model: nn.Module) -> None:
    """Undo :func:`install_routing`: original block classes, no hook, no router."""
    prefix, blocks = find_decoder_blocks(model)
    decoder = model.get_submodule(prefix.rsplit(".", 1)[0]) if "." in prefix else model
    for block in blocks:
        if isinstance(block, RoutedLayerMixin):
            routed, base = type(block), block._routing_base
            block.__class__ = base
            _compat.accelerate_repoint_forward(block, routed.forward, base.forward)
            for name in ("_routing_state", "_routing_index", "_routing_window", "_routing_config"):
                block.__dict__.pop(name, None)
    model.__dict__.pop("generate", None)
    model.__dict__.pop(PROMPT_AWARE_GENERATE, None)
    hook = decoder.__dict__.pop("_routing_hook", None)
    if hook is not None:
        hook.remove()
    decoder.__dict__.pop("_routing_state", None)
    if "token_router" in decoder._modules:
        del decoder._modules["token_router"]
    from ..formats.base import quant_method_of

    if quant_method_of(getattr(model.config, "quantization_config", None)) == "hf_compress_routed":
        del model.config.quantization_config


@contextlib.contextmanager
def routing_disabled(model: nn.Module) -> Iterator[None]:
    """Run the dense base model (every token at every block) inside the block, e.g. for a teacher forward."""
    state = routing_state(model)
    previous = state.enabled if state is not None else None
    if state is not None:
        state.enabled = False
    try:
        yield
    finally:
        if state is not None:
            state.enabled = previous


@contextlib.contextmanager
def routing_mode(model: nn.Module, mode: str, schedule: RoutingSchedule | None = None) -> Iterator[RoutingState]:
    """Temporarily rank tokens by ``mode`` (and/or follow another ``schedule``), e.g. while searching."""
    state = routing_state(model)
    if state is None:
        raise ValueError("the model has no token routing installed; call install_routing first.")
    if mode not in ROUTING_MODES:
        raise ValueError(f"mode must be one of {', '.join(ROUTING_MODES)}, got {mode!r}.")
    if schedule is not None:
        schedule.check_blocks(len(state.schedule.block_sparsity))  # one entry per routed block
    saved = (state.mode, state.schedule)
    state.mode = mode
    if schedule is not None:
        state.schedule = schedule
    try:
        yield state
    finally:
        state.mode, state.schedule = saved


PROMPT_AWARE_GENERATE = "_hf_compress_generate"
"""Instance attribute holding a model's own ``generate`` when hf_compress wrapped it (a routed model records its
prompt's length); a saved ``custom_generate/generate.py`` calls it instead of the class's ``generate``."""


def _generate_knowing_the_prompt(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """The model's own ``generate()``, with the prompt's length recorded for the routed blocks: assisted generation's
    first forward holds the prompt and the first drafts, and only the prompt is routed."""
    state = routing_state(self)
    inputs = next((kwargs[name] for name in ("input_ids", "inputs", "inputs_embeds") if kwargs.get(name) is not None),
                  args[0] if args else None)
    previous = state.prompt_length if state is not None else None
    if state is not None and isinstance(inputs, torch.Tensor) and inputs.dim() >= 2:
        chunk = generation_setting(self, "prefill_chunk_size", kwargs, args)
        if chunk is not None and inputs.shape[1] > chunk and state.enabled and not state.schedule.is_dense:
            # Later chunks would be fed as decoded tokens (computed at every block) and the first routed as if it
            # were the whole prompt: another output than the one-forward prefill, silently.
            raise ValueError(
                f"generate(prefill_chunk_size={chunk}) would feed this {inputs.shape[1]}-token prompt in chunks, and a "
                "routed model routes a prompt in one forward (its tokens are ranked among the whole prompt); pass "
                "prefill_chunk_size=None (and leave it unset in the generation config)."
            )
        cache = _compat.cache_from_model_kwargs(kwargs)
        cached = int(cache.get_seq_length()) if hasattr(cache, "get_seq_length") else 0
        # transformers' assisted generation calls its draft model with the tokens the target accepted after the
        # draft's cache: they are decoded tokens, not a prompt (and a draft's choices never change the output).
        drafting = bool(generation_setting(self, "is_assistant", kwargs, args))
        if cached and inputs.shape[1] - cached > 1 and state.enabled and not state.schedule.is_dense and not drafting:
            # The cached part was ranked as if it were the whole prompt, and the rest would be fed as decoded tokens
            # (computed at every block): another output than the same prompt generated without the cache, silently.
            raise ValueError(
                f"generate() was given a cache holding {cached} of this prompt's {inputs.shape[1]} tokens, and a routed "
                "model routes a prompt in one forward (its tokens are ranked among the whole prompt): the other "
                f"{inputs.shape[1] - cached} would be computed at every block as decoded tokens. Pass the whole prompt "
                "without the cache, or continue from a cache one new token at a time."
            )
        state.prompt_length = inputs.shape[1]
    try:
        return type(self).generate(self, *args, **kwargs)
    finally:
        if state is not None:
            state.prompt_length = previous


def _begin_forward(module: nn.Module, args: tuple, kwargs: dict) -> None:
    """Decoder pre-hook: record the padding mask and the past length the blocks of this forward will see."""
    state: RoutingState = module._routing_state
    arguments = _forward_signature(type(module)).bind_partial(module, *args, **kwargs).arguments
    arguments.update(arguments.pop("kwargs", {}) or {})
    tokens = arguments.get("input_ids")
    if tokens is None:
        tokens = arguments.get("inputs_embeds")
    if tokens is None:
        raise ValueError("token routing needs input_ids or inputs_embeds in the forward call.")
    query_length = tokens.shape[1]
    mask = arguments.get("attention_mask")
    cache = next((arguments[name] for name in _compat.CACHE_KWARGS if arguments.get(name) is not None), None)
    routed = state.enabled and not state.schedule.is_dense
    state.prepared_mask = None
    if routed and mask is not None and not (isinstance(mask, torch.Tensor) and mask.dim() == 2):
        if _takes_prepared_mask(state, mask, cache):
            # A chunk fed after the prompt under its own 4-D mask (a draft tree's ancestor mask): every token is
            # computed, so the routed block only narrows that mask to the keys its cache really holds.
            state.prepared_mask = mask
            mask = None
        else:
            # generate() prepares such masks itself for a static (compileable) cache.
            fix = ("generate(cache_implementation='static') prepares one: use the default dynamic cache with a "
                   "routed model." if getattr(cache, "is_compileable", False)
                   else "Pass the tokenizer's attention_mask.")
            raise ValueError(
                "token routing needs the 2-D attention_mask (batch, length) of ones and zeros to route a prompt (a "
                "4-D mask is taken only for tokens fed after a cached prompt, without route_decode); got a prepared "
                f"{type(mask).__name__} mask. {fix}"
            )
    attentions = arguments.get("output_attentions")
    if attentions is None:  # not passed, or passed as None: the config decides, as in transformers
        attentions = getattr(getattr(module, "config", None), "output_attentions", False)
    if routed and attentions:
        raise ValueError(
            "a routed model's blocks attend among the tokens they compute only, so it has no full-size attention maps "
            "to return; pass output_attentions=False (for the dense model's maps, call it inside "
            "routing_disabled(model))."
        )
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        valid = mask.bool()
        past = valid.shape[1] - query_length
    else:  # no mask, or a prepared one the blocks run with unrouted (or read as state.prepared_mask)
        valid = None
        past = cache.get_seq_length() if cache is not None else 0
    if valid is not None and past == 0 and query_length > 1 and routed:
        current = valid[:, past:]
        # A row is left-padded when its non-padding tokens form a suffix: once real, real until the end.
        if bool((current[:, :-1] & ~current[:, 1:]).any()):
            raise ValueError(
                "token routing needs left padding (a row has padding after its tokens: right padding is not "
                "supported); set tokenizer.padding_side = 'left'."
            )
    state.valid = valid
    state.past_length = past
    state.query_length = query_length
    state.selections = {}
    state.attention = None
    prompt = min(state.prompt_length, query_length) if past == 0 and state.prompt_length is not None else query_length
    state.tail = query_length - prompt
    state.no_padding, state.counts = True, [prompt] * tokens.shape[0]
    if valid is not None and past == 0 and query_length > 1 and routed:
        # Each row's prompt tokens and all its tokens: a routed prompt's only device read (later forwards need none).
        state.counts, totals = torch.stack([valid[:, :prompt].sum(-1), valid.sum(-1)]).tolist()
        state.no_padding = all(count == query_length for count in totals)


def _takes_prepared_mask(state: RoutingState, mask: Any, cache: Any) -> bool:
    """Whether a forward's 4-D mask can stand in for the 2-D one: tokens fed after a cached prompt (decoded or
    verified, never routed: ``route_decode`` ranks them by a padding mask it would not have), one mask for every
    head."""
    past = int(cache.get_seq_length()) if hasattr(cache, "get_seq_length") else 0
    routes_decoded = state.route_decode and state.mode == "router"
    return (isinstance(mask, torch.Tensor) and mask.dim() == 4 and mask.shape[1] == 1 and past > 0
            and not getattr(cache, "is_compileable", False) and not routes_decoded)


class RoutedLayerMixin:
    """Mixed in front of a decoder block's class: the routed forward, falling back to the block's own."""

    _routing_base: type

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        state: RoutingState | None = self.__dict__.get("_routing_state")
        if state is None or not state.enabled:
            return super().forward(*args, **kwargs)
        sparsity = state.schedule.block_sparsity[self._routing_index]
        if sparsity == 0.0:
            return super().forward(*args, **kwargs)  # never skips, so its cache holds no skipped slot either
        return _routed_forward(self, state, sparsity, args, kwargs)


def _routed_class(base: type) -> type:
    if issubclass(base, RoutedLayerMixin):
        return base
    if base not in _ROUTED_CLASSES:
        _ROUTED_CLASSES[base] = type(f"Routed{base.__name__}", (RoutedLayerMixin, base), {"_routing_base": base})
    return _ROUTED_CLASSES[base]


_FORWARD_SIGNATURES: dict[type, inspect.Signature] = {}


def _forward_signature(base: type) -> inspect.Signature:
    """``inspect.signature(base.forward)``, computed once per class (it costs more than a small block's kernels).

    A plain dict, not ``functools.cache``: torch.compile (2.14) traces through a cache wrapper with a warning of
    possible silent incorrectness, which every compiled routed forward printed.
    """
    signature = _FORWARD_SIGNATURES.get(base)
    if signature is None:
        signature = _FORWARD_SIGNATURES[base] = inspect.signature(base.forward)
    return signature


def _call_arguments(block: nn.Module, args: tuple, kwargs: dict) -> tuple[torch.Tensor, dict[str, Any]]:
    """The block call as ``(hidden states, {other argument: value})``, ``**kwargs`` flattened."""
    signature = _forward_signature(block._routing_base)
    hidden_name = list(signature.parameters)[1]
    if len(args) == 1 and hidden_name not in kwargs:
        # How transformers' decoders call their layers: the hidden states, then keywords. Binding them to the
        # signature would give the same dict and costs more than a small block's kernel launches on a GPU.
        return args[0], dict(kwargs)
    bound = signature.bind(block, *args, **kwargs).arguments
    bound.pop(next(iter(signature.parameters)))  # self
    call: dict[str, Any] = {}
    for name, value in bound.items():
        kind = signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            call.update(value)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            if value:
                raise TypeError(f"{type(block).__name__}: token routing cannot route extra positional arguments.")
        else:
            call[name] = value
    return call.pop(hidden_name), call


def _token_scores(block: nn.Module, state: RoutingState, hidden: torch.Tensor, valid: torch.Tensor, sparsity: float):
    """Scores ``(B, T)`` of a prompt's tokens (higher = compute) and, for the trained router, its logits."""
    if state.mode == "static":
        return static_scores(valid), None
    if state.mode == "random":
        noise = torch.rand(valid.shape, generator=state.generator).to(valid.device)
        scores = torch.where(static_scores(valid) == math.inf, math.inf, noise)
        return scores.masked_fill(~valid, -math.inf), None
    logits = state.router(router_features(hidden, valid, sparsity))
    scores = torch.where(static_scores(valid) == math.inf, math.inf, logits.detach().float())
    return scores.masked_fill(~valid, -math.inf), logits


def _decode_rule(state: RoutingState, valid: torch.Tensor, sparsity: float,
                 offset: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's decode rule on tokens fed after the prompt: scores ``(B, T)`` and which real tokens skip (the
    router's compute probability below 0.5). ``offset`` ``(B,)``: real tokens before them; the sequence's first
    token is not among these, so no token is kept unconditionally and the router alone decides."""
    scores = state.router(decoded_token_features(valid, sparsity, offset)).detach().float()
    return scores.masked_fill(~valid, -math.inf), valid & (torch.sigmoid(scores) < 0.5)


def _routed_forward(block: nn.Module, state: RoutingState, sparsity: float, args: tuple, kwargs: dict) -> Any:
    hidden, call = _call_arguments(block, args, kwargs)
    cache_name = next((name for name in _compat.BLOCK_CACHE_KWARGS if call.get(name) is not None), None)
    cache = call[cache_name] if cache_name else None
    batch, length = hidden.shape[:2]
    if length != state.query_length:
        raise RuntimeError("a routed block was called outside its model's forward; call the model, not the block.")
    past = state.past_length
    valid_all = state.valid
    prompt = past == 0 and length > 1
    routes_decoded = state.route_decode and state.mode == "router"
    decode_routing = past > 0 and routes_decoded
    # Tokens of a first forward past the prompt (assisted generation's drafts, generate(use_cache=False)) are the
    # decoded tokens of that generation: with route_decode they follow the decode rule, as when decoded one by one.
    tail_routing = prompt and state.tail > 0 and routes_decoded
    if not prompt and not decode_routing and (cache is None or past == 0):
        return super(RoutedLayerMixin, block).forward(*args, **kwargs)
    biased = next((name for name in ("alibi", "position_bias") if isinstance(call.get(name), torch.Tensor)), None)
    if biased is not None:  # (batch·heads, 1, length) biases the gather would leave at full length
        raise NotImplementedError(
            f"{type(block).__name__} adds ALiBi position biases ({biased!r}), which token routing does not gather; "
            "route a model with rotary or learned positions (Llama, Qwen, Gemma, GPT-2, OPT, GPT-NeoX, ...)."
        )

    logits = None
    shared: torch.Tensor | None = None  # the positions every row keeps, when all rows keep the same ones
    selection: dict[Any, Any] = {}  # what this block derives from its tokens; shared with same-selection blocks
    if prompt:
        skips = tuple(skip_count(sparsity, n) for n in state.counts)
        # Known here, with no wait for the device; the tokens past the prompt are all computed (with tail_routing
        # some are not: the width is then counted from the decode rule's choices).
        width = max(n - skipped for n, skipped in zip(state.counts, skips)) + state.tail
    if prompt and state.mode == "static" and state.collect is None:
        # The static rule ranks by position only: every block with the same skip counts keeps the same tokens.
        if skips not in state.selections:
            if state.no_padding:  # every row keeps the same positions: taken with one index_select
                tokens = _static_selection(batch, length, width, hidden.device)
                shared = tokens[0][0]
            else:
                valid = _current_validity(state, hidden)
                tokens = select_tokens(static_scores(valid), valid, _row_counts(skips, hidden.device), width)
                shared = tokens[0][0] if batch == 1 else None
            state.selections[skips] = {"tokens": tokens, "shared": shared}
        selection = state.selections[skips]
        keep, real = selection["tokens"]
        shared = selection["shared"]
    elif prompt:
        valid = _current_validity(state, hidden)
        ranked = length - state.tail  # the prompt's tokens; those past it are not ranked among them
        scores, logits = _token_scores(block, state, hidden[:, :ranked], valid[:, :ranked], sparsity)
        skip = _row_counts(skips, hidden.device)
        if tail_routing:
            _, tail_skipped = _decode_rule(state, valid[:, ranked:], sparsity, valid[:, :ranked].sum(-1))
            tail_computed = valid[:, ranked:] & ~tail_skipped
            # Above every prompt token when computed, below all of them when skipped: top-k then keeps the prompt's
            # own selection plus the computed tail tokens.
            scores = torch.cat([scores, torch.where(tail_computed, math.inf, -math.inf)], dim=1)
            skip = skip + tail_skipped.sum(-1)
            width = int((valid.sum(-1) - skip).max())
        elif ranked < length:  # always computed, as decoded tokens are without route_decode
            scores = torch.cat([scores, scores.new_full((batch, length - ranked), math.inf)], dim=1)
        keep, real = select_tokens(scores, valid, skip, width)
        if state.collect is not None and logits is not None:
            static_keep, _ = select_tokens(static_scores(valid), valid, skip, width)
            labels = torch.zeros_like(valid).scatter(1, static_keep, True) & valid
            state.collect.append((logits, valid, labels, sparsity))
            if cache is not None:
                raise ValueError("router training runs its forwards without a cache; pass use_cache=False.")
            return _training_forward(block, hidden, call, valid, keep, real, scores, logits)
    elif decode_routing:
        valid = _current_validity(state, hidden)
        offset = state.valid[:, :past].sum(-1) if state.valid is not None else valid.new_full((batch,), past,
                                                                                                dtype=torch.long)
        scores, skipped = _decode_rule(state, valid, sparsity, offset)
        skip = skipped.sum(-1)
        # At least one (filler) column: the block must still write this step's slots (zeros) to the cache.
        width = max(1, int((valid.sum(-1) - skip).max()))
        keep, real = select_tokens(scores, valid, skip, width)
    else:
        keep = torch.arange(length, device=hidden.device).expand(batch, length)
        real = torch.ones(batch, length, dtype=torch.bool, device=hidden.device)
    if keep.shape[1] == 0:
        return _like_output(block, hidden, args, kwargs)

    width = keep.shape[1]
    if shared is None and batch == 1:
        shared = keep[0]  # one row (the prefill case that matters for speed): index_select, not gather
    hidden_kept = _take(hidden, keep, shared)
    # Every block of a forward gets the same position tensors (per layer type: Gemma3's sliding and full RoPE
    # tables differ), so blocks sharing a selection gather them once.
    for name in ("position_ids", "cache_position"):
        value = call.get(name)
        if isinstance(value, torch.Tensor) and value.shape[-1] == length:
            key = (name, id(value))
            if key not in selection:
                selection[key] = value.expand(batch, length).gather(1, keep) if value.dim() == 2 else value[keep[0]]
            call[name] = selection[key]
    embeddings = call.get("position_embeddings")
    # (cos, sin), or one complex table (DeepSeek-V2's freqs_cis): [1 or batch, length, dim] each
    tables = (embeddings,) if isinstance(embeddings, torch.Tensor) else embeddings
    if isinstance(tables, (tuple, list)):
        key = ("position_embeddings", *map(id, tables))
        if key not in selection:
            taken = tuple(
                _take(table.expand(batch, length, table.shape[-1]), keep, shared if table.shape[0] == 1 else None)
                for table in tables
            )
            selection[key] = taken[0] if tables is not embeddings else taken
        call["position_embeddings"] = selection[key]
    # Any other input with one vector per token (Gemma 4's per-layer inputs, [batch or 1, length, dim]) follows its
    # tokens, as the hidden states do.
    for name, value in list(call.items()):
        if (name != "position_embeddings" and isinstance(value, torch.Tensor) and value.dim() == 3
                and value.shape[1] == length and value.shape[0] in (1, batch)):
            call[name] = _take(value.expand(batch, length, value.shape[-1]), keep,
                               shared if value.shape[0] == 1 else None)

    query_positions = keep if past == 0 else past + keep  # cache positions of the computed tokens
    if cache is not None and past > 0:
        kv_length, kv_offset = _compat.cache_mask_sizes(cache, length, _layer_index(block))
        key_positions = (kv_offset + torch.arange(kv_length, device=hidden.device)).expand(batch, kv_length)
    else:  # a prompt forward attends among its computed tokens only (the cache still gets every slot)
        key_positions = query_positions
    window = block._routing_window
    if state.attention is None:
        state.attention = _implementation(block)
    # Without padding there are no fillers (unless rows skip different numbers of tail tokens): in gathered order the
    # mask of a prompt is plain causal (positions are sorted), so sdpa's is_causal kernel runs, as for the dense
    # model. A sliding window matters beyond its length.
    no_fillers = state.no_padding and past == 0 and not tail_routing
    if no_fillers and (window is None or length <= window) and state.attention == "sdpa":
        mask = None
    else:
        visible = None
        if valid_all is not None:
            visible = valid_all.gather(1, key_positions.clamp(max=valid_all.shape[1] - 1))
        if past == 0:
            visible = real if visible is None else visible & real  # fillers are invisible
        allowed = _allowed_keys(query_positions, key_positions, window, visible)
        if state.prepared_mask is not None:
            allowed = allowed & _allowed_by(state.prepared_mask, allowed.shape[-1])
        mask = _mask_for(block, allowed[:, None], hidden.dtype)
    call["attention_mask"] = mask
    if cache is not None:
        # A decode chunk has no padding to fill rows up with: a row's fillers are its own skipped tokens, whose K/V
        # must not reach the cache (zeros there are masked for every later query, as for any skipped slot).
        fillers = real if decode_routing or tail_routing else None
        call[cache_name] = _ScatteringCache(cache, keep, shared, length, mask, gather=past == 0, real=fillers)

    output = super(RoutedLayerMixin, block).forward(hidden_kept, **call)
    computed = output[0] if isinstance(output, tuple) else output
    if not no_fillers:
        computed = torch.where(real[..., None], computed, hidden_kept)
    if shared is not None:
        result = hidden.index_copy(1, shared, computed)
    else:
        result = hidden.scatter(1, keep[..., None].expand(-1, width, hidden.shape[-1]), computed)
    return (result, *output[1:]) if isinstance(output, tuple) else result


def _training_forward(block: nn.Module, hidden: torch.Tensor, call: dict[str, Any], valid: torch.Tensor,
                      keep: torch.Tensor, real: torch.Tensor, scores: torch.Tensor, logits: torch.Tensor) -> Any:
    """The router-training forward of a prompt: every token is computed, the forward value is the routed one.

    Each token attends to the kept tokens at or before it and to itself, so a kept token's update is exactly the
    gathered forward's, and a skipped token's update ``Δ_t`` is what computing it would have added. The output is
    ``h + g_t · Δ_t`` with ``g_t = keep_t + σ(s_t) − stop_grad(σ(s_t))``: 1 on kept tokens and 0 on skipped ones in
    the forward (the routed model's value), while the router's gradient ``σ'(s_t) ⟨Δ_t, ∂L/∂h_t⟩`` reaches skipped
    tokens too. With the gradient from kept tokens only (gathered forward, Mixture-of-Depths style) training could
    only push kept tokens' scores up or down, never learn that a skipped token was worth computing, and on
    SmolLM2-135M it drifted away from the static rule it started at (held-out tail KL 0.028 → 0.091 in 150 steps).
    What the gate does not see is a skipped token's value as a key for later tokens at that block. Gating the keys
    too (a skipped key kept at a 1e-6 attention weight, so its gradient is the first-order effect of unmasking it)
    was tried: training then drifted faster, not slower (issue 21, note of 2026-12-03), so the keys stay ungated.
    """
    kept = torch.zeros_like(valid).scatter(1, keep, real)
    positions = torch.arange(hidden.shape[1], device=hidden.device)[None]
    allowed = _allowed_keys(positions, positions, block._routing_window, kept)
    call["attention_mask"] = _mask_for(block, allowed[:, None], hidden.dtype)
    output = super(RoutedLayerMixin, block).forward(hidden, **call)
    computed = output[0] if isinstance(output, tuple) else output
    probability = torch.sigmoid(logits)
    # The always-kept first token is not the router's choice; its (often huge) update must not train it. Nor do
    # padding positions.
    trained = valid & (scores != math.inf)
    probability = torch.where(trained, probability, probability.detach())
    gate = kept.to(probability.dtype) + probability - probability.detach()
    result = hidden + gate[..., None].to(computed.dtype) * (computed - hidden)
    return (result, *output[1:]) if isinstance(output, tuple) else result


def _current_validity(state: RoutingState, hidden: torch.Tensor) -> torch.Tensor:
    """``(B, T)`` bool: which of this forward's tokens are not padding."""
    if state.valid is None:
        return hidden.new_ones(hidden.shape[:2], dtype=torch.bool)
    return state.valid[:, state.past_length :]


def _static_selection(batch: int, length: int, width: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """What ``select_tokens`` returns for the static rule on rows without padding, in two kernels instead of a dozen:
    the first token and the last ``width − 1``."""
    positions = torch.arange(length - width, length, device=device)
    positions[:1].zero_()  # not `positions[0] = 0`: that copies the 0 from the host and waits for the device
    return positions.expand(batch, width), torch.ones(1, 1, dtype=torch.bool, device=device).expand(batch, width)


def _row_counts(values: tuple[int, ...] | list[int], device: torch.device) -> torch.Tensor:
    """``values`` as a ``(B,)`` long tensor on ``device``; equal values (one row, or rows of one length) are filled
    on the device, with no copy from the host, so a CUDA graph can capture the routed forward."""
    if len(set(values)) == 1:
        return torch.full((len(values),), values[0], dtype=torch.long, device=device)
    return torch.tensor(values, device=device)


def _allowed_keys(query_positions: torch.Tensor, key_positions: torch.Tensor, window: int | None,
                  visible: torch.Tensor | None) -> torch.Tensor:
    """``(B, Q, K)`` bool: a query attends to the ``visible`` keys at or before its position (within the sliding
    ``window``), and always to its own. Positions are ``(B or 1, Q)`` / ``(B or 1, K)``, ``visible`` ``(B, K)``."""
    allowed = key_positions[:, None, :] <= query_positions[:, :, None]
    if window is not None:
        allowed = allowed & ((query_positions[:, :, None] - key_positions[:, None, :]) < window)
    if visible is not None:
        allowed = allowed & visible[:, None, :]
    return allowed | (key_positions[:, None, :] == query_positions[:, :, None])


MASKED_AT_MOST = -1e4
"""An additive mask's value at or below which a key counts as masked (``finfo.min``, ``-inf`` and the older -1e4)."""


def _allowed_by(mask: torch.Tensor, kv_length: int) -> torch.Tensor:
    """``(B, Q, K)`` bool: the keys a prepared ``(B, 1, Q, K)`` mask lets each query read: bool, or additive with 0
    where allowed and ``MASKED_AT_MOST`` or less where masked (a soft bias between the two is refused: the routed
    blocks build their own masks of allowed keys)."""
    if mask.shape[-1] != kv_length:
        raise ValueError(f"the 4-D attention_mask covers {mask.shape[-1]} keys, and this layer's cache holds "
                         f"{kv_length} with the new tokens (a sliding-window layer keeps only its last window): build "
                         "it over the keys every layer holds, or feed these tokens with the 2-D mask.")
    if mask.dtype == torch.bool:
        return mask[:, 0]
    masked = mask <= MASKED_AT_MOST
    if not bool((masked | (mask == 0)).all()):
        raise ValueError("a routed model reads a 4-D attention_mask as allowed (0) or masked (-1e4 or less, e.g. the "
                         "dtype's minimum or -inf); this one carries other values (soft biases). Pass a bool mask or "
                         "one of those two values.")
    return ~masked[:, 0]


def _take(states: torch.Tensor, keep: torch.Tensor, shared: torch.Tensor | None) -> torch.Tensor:
    """Rows ``keep`` (B, K) of ``states`` (B, T, H): ``index_select`` when every row keeps ``shared``, else gather."""
    if shared is not None:
        return states.index_select(1, shared)
    return states.gather(1, keep[..., None].expand(-1, -1, states.shape[-1]))


def _like_output(block: nn.Module, hidden: torch.Tensor, args: tuple, kwargs: dict) -> Any:
    return hidden


def _layer_index(block: nn.Module) -> int:
    for module in block.modules():
        index = getattr(module, "layer_idx", None)
        if isinstance(index, int):
            return index
    return block._routing_index


def _implementation(block: nn.Module) -> str:
    implementation = _compat.attention_implementation(block._routing_config) or "eager"
    return implementation.split("|")[-1] if isinstance(implementation, str) else "sdpa"


def _mask_for(block: nn.Module, allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The block's attention mask in the form its attention implementation reads: bool, or additive for eager."""
    name = _implementation(block)
    implementation = _compat.attention_implementation(block._routing_config)
    if name == "eager":
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)
    if name != "sdpa":
        raise NotImplementedError(
            f"token routing builds its own attention masks for 'sdpa' and 'eager' attention, not {implementation!r}; "
            "load the model with attn_implementation='sdpa'."
        )
    return allowed


class _ScatteringCache:
    """The block's view of the cache: kept tokens' K/V go to their own positions, skipped slots get zeros.

    In a prompt forward (``gather``) attention then reads the computed tokens' keys only. Afterwards the mask
    (built before the call, the same object the attention reads) is narrowed to the keys that are not exactly
    zero, which hides every slot a token skipped at this block. Everything else is the real cache's.
    """

    def __init__(self, cache: Any, keep: torch.Tensor, shared: torch.Tensor | None, length: int,
                 mask: torch.Tensor | None, gather: bool, real: torch.Tensor | None = None) -> None:
        self._cache = cache
        self._real = real  # (B, K) bool: which gathered tokens are not fillers; None = all are real
        self._keep = keep
        self._shared = shared
        self._length = length
        self._mask = mask
        self._gather = gather

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any):
        keys, values = self._cache.update(self._scatter(key_states), self._scatter(value_states), layer_idx, *args, **kwargs)
        if self._gather:
            # A prompt forward (the cache held nothing before): attention reads exactly the computed tokens' own
            # keys, which are the ones just projected; a sliding layer's cache may keep only its window of them.
            return key_states, value_states
        visible = keys.ne(0).any(-1).any(1)  # (B, kv_length)
        if visible.shape[-1] != self._mask.shape[-1]:
            raise RuntimeError(
                f"layer {layer_idx}: the cache returned {visible.shape[-1]} keys but announced {self._mask.shape[-1]}; "
                "token routing supports DynamicCache and StaticCache."
            )
        if self._mask.dtype == torch.bool:
            self._mask.logical_and_(visible[:, None, None, :])
        else:
            self._mask.masked_fill_(~visible[:, None, None, :], torch.finfo(self._mask.dtype).min)
        return keys, values

    def _scatter(self, states: torch.Tensor) -> torch.Tensor:
        batch, heads, width, dim = states.shape
        if self._real is not None:
            states = states * self._real[:, None, :, None].to(states.dtype)
        full = states.new_zeros(batch, heads, self._length, dim)
        if self._shared is not None:
            return full.index_copy_(2, self._shared, states)
        return full.scatter_(2, self._keep[:, None, :, None].expand(batch, heads, width, dim), states)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cache, name)
