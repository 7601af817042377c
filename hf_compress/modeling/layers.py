"""Generic model introspection: decoder blocks, their linear layers, and a uniform weight view.

Compression methods never hard-code module names. They ask for the repeated decoder blocks
(``find_decoder_blocks``), for the linear layers inside one block (``find_linear_layers``), and read
or write every weight as an ``[out_features, in_features]`` matrix (``weight_matrix`` /
``set_weight_matrix``), whatever the layer's own layout: ``nn.Linear`` stores ``[out, in]``,
GPT-2's ``transformers.pytorch_utils.Conv1D`` stores ``[in, out]``.

Embeddings and ``lm_head`` live outside the decoder blocks, so block-level discovery never returns
them.

Example:
    >>> from hf_compress.assets import tiny_model
    >>> model, _ = tiny_model("gpt2")
    >>> name, blocks = find_decoder_blocks(model)
    >>> name, len(blocks)
    ('transformer.h', 2)
    >>> {n: tuple(weight_matrix(m).shape) for n, m in find_linear_layers(blocks[0]).items()}
    {'attn.c_attn': (192, 64), 'attn.c_proj': (64, 64), 'mlp.c_fc': (256, 64), 'mlp.c_proj': (64, 256)}
"""

from __future__ import annotations

import contextlib
import fnmatch
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .. import _compat
from ..utils.logging import get_logger
from .fused_experts import ExpertProjection, expert_projections, is_fused_experts


__all__ = [
    "LINEAR_TYPES",
    "find_decoder_blocks",
    "check_not_disk_offloaded",
    "check_not_offloaded",
    "check_skip_patterns",
    "skipped_layer_names",
    "check_within_learned_positions",
    "computes_linear",
    "learned_position_limit",
    "position_limit",
    "find_linear_layers",
    "in_features",
    "is_linear",
    "matches_any",
    "missing_weights",
    "module_execution_device",
    "disk_offloaded",
    "built_on_meta",
    "evaluation_mode",
    "has_recurrent_layers",
    "has_recurrent_state",
    "is_offloaded",
    "keeps_recurrent_state",
    "onloaded",
    "out_features",
    "replace_module",
    "router_layers",
    "set_weight_matrix",
    "weight_matrix",
]

logger = get_logger(__name__)

LINEAR_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, Conv1D)
"""Module types treated as linear layers (``Conv1D`` is GPT-2's transposed linear layer)."""
# One expert's projection in fused MoE weights: a linear layer for the weight view, never a module of the model.
_VIEW_TYPES: tuple[type[nn.Module], ...] = (*LINEAR_TYPES, ExpertProjection)


# --------------------------------------------------------------------------------------------------
# Decoder blocks
# --------------------------------------------------------------------------------------------------


def find_decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The qualified name and ``nn.ModuleList`` of a model's repeated decoder blocks.

    Discovery is generic: among all ``nn.ModuleList``s whose children are all of one class, keep those
    whose length equals ``num_hidden_layers`` of the (text) config, and return the one holding the
    most parameters. Without a config giving ``num_hidden_layers`` every homogeneous list of at least
    two modules that contains linear layers is a candidate. Works for Llama-style models
    (``model.layers``), GPT-2 (``transformer.h``), OPT (``model.decoder.layers``) and PEFT-wrapped
    models (``base_model.model.model.layers``).

    Raises:
        ValueError: no such list exists (e.g. not a transformer decoder).

    Example:
        >>> from hf_compress.assets import tiny_model
        >>> find_decoder_blocks(tiny_model("opt")[0])[0]
        'model.decoder.layers'
    """
    expected = _num_hidden_layers(model)
    candidates: list[tuple[int, str, nn.ModuleList]] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        classes = {type(child) for child in module}
        if len(classes) != 1:
            continue
        if expected is not None:
            if len(module) != expected:
                continue
        elif len(module) < 2 or not any(isinstance(m, LINEAR_TYPES) for m in module[0].modules()):
            continue
        size = sum(p.numel() for p in module.parameters())
        candidates.append((size, name, module))
    if not candidates:
        wanted = f"of length num_hidden_layers={expected}" if expected is not None else "of repeated blocks"
        raise ValueError(
            f"no decoder blocks found; {type(model).__name__} has no nn.ModuleList {wanted} whose children "
            "all share one class. hf_compress expects a transformers decoder (e.g. LlamaForCausalLM, "
            "GPT2LMHeadModel)."
        )
    _, name, blocks = max(candidates, key=lambda item: item[0])
    return name, blocks


def _num_hidden_layers(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    if config is None and hasattr(model, "get_base_model"):  # PEFT models without a config attribute
        config = getattr(model.get_base_model(), "config", None)
    if config is None:
        return None
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    value = getattr(config, "num_hidden_layers", None)
    return value if isinstance(value, int) else None


# --------------------------------------------------------------------------------------------------
# Linear layers
# --------------------------------------------------------------------------------------------------


def built_on_meta(model_class: type, config: Any) -> nn.Module:
    """``model_class`` built from a copy of ``config`` on the ``meta`` device (no memory), with eager attention: the
    modules the architecture makes, whatever attention implementation the config names (some have a class of their
    own), and nothing fetched from the Hub for one.

    Example:
        >>> from hf_compress.assets import tiny_model
        >>> model = tiny_model("llama")[0]
        >>> next(built_on_meta(type(model), model.config).parameters()).device
        device(type='meta')
    """
    import copy

    config = copy.deepcopy(config)
    _compat.set_attention_implementation(config, "eager")
    with torch.device("meta"):
        return model_class(config)


def keeps_recurrent_state(cache_layer: object) -> bool:
    """Whether a cache layer keeps a recurrent state (Mamba, linear attention, short convolutions): a state that runs
    through every token in order, rather than one key/value entry per token."""
    return hasattr(cache_layer, "update_recurrent_state") or hasattr(cache_layer, "update_conv_state")


def has_recurrent_layers(model: nn.Module) -> bool:
    """Whether the model has layers with a recurrent state, as the cache transformers builds for its config says.

    Example:
        >>> from hf_compress.assets import tiny_model
        >>> has_recurrent_layers(tiny_model("llama")[0])
        False
    """
    from transformers import DynamicCache

    config = getattr(model, "config", None)
    if config is None:
        return False
    try:
        cache = DynamicCache(config=config)
    except Exception:  # noqa: BLE001 - a config transformers builds no cache from has no layers to tell of
        return False
    return has_recurrent_state(cache)


def has_recurrent_state(cache: object) -> bool:
    """Whether a cache has layers that keep a recurrent state (:func:`keeps_recurrent_state`), which go back only as
    many tokens as they recorded."""
    return any(keeps_recurrent_state(layer) for layer in getattr(cache, "layers", ()))


def is_linear(module: nn.Module) -> bool:
    """Whether ``module`` is an ``nn.Linear`` (or subclass), a transformers ``Conv1D`` or one expert's projection in
    fused MoE weights (``fused_experts.ExpertProjection``)."""
    return isinstance(module, _VIEW_TYPES)


def computes_linear(layer: nn.Module) -> bool:
    """Whether calling ``layer`` returns its linear map, so a quantized layer may stand in for it: true for
    ``nn.Linear`` and ``Conv1D``, and for subclasses whose own ``forward`` still returns one ``[..., out_features]``
    tensor (Falcon's); false for subclasses that compute something else from the weight (Phi-MoE's and Llama 4's
    routers return routing weights and expert indices). A subclass is probed once with a zero input row.

    Example:
        >>> computes_linear(nn.Linear(3, 5)), computes_linear(Conv1D(5, 3))
        (True, True)
    """
    if type(layer).forward in (nn.Linear.forward, Conv1D.forward):
        return True
    weight = weight_matrix(layer)
    probe = torch.zeros(1, weight.shape[1], dtype=weight.dtype, device=weight.device)
    try:
        with torch.no_grad():
            output = layer(probe)
    except Exception:  # noqa: BLE001 - any failure means the layer is not a plain linear map
        return False
    return isinstance(output, torch.Tensor) and tuple(output.shape) == (1, weight.shape[0])


def matches_any(name: str, patterns: Sequence[str]) -> bool:
    """Whether ``name`` matches one of the shell-style ``fnmatch`` patterns (``*`` also spans dots).

    Example:
        >>> matches_any("self_attn.q_proj", ["*q_proj", "mlp.*"])
        True
    """
    if isinstance(patterns, str):  # a lone string would otherwise be matched character by character
        patterns = [patterns]
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def check_skip_patterns(model: nn.Module, skip: Sequence[str]) -> None:
    """Refuse ``skip`` patterns of which none matches a linear layer of the decoder blocks, as peft refuses
    ``target_modules`` that match nothing: a typo would otherwise compress the layers it meant to keep. A list
    where some patterns match (one written for several architectures) only logs the others.

    Example:
        >>> from hf_compress.assets import tiny_model
        >>> check_skip_patterns(tiny_model("llama")[0], ["*down_proj"])
    """
    if isinstance(skip, str):
        skip = [skip]
    if not skip:
        return
    prefix, blocks = find_decoder_blocks(model)

    def kept(patterns: Sequence[str]) -> list[str]:  # matched as the compression methods match them
        # fused MoE experts too: the pruners take them, so "*experts*" is a pattern that matches
        return [f"{prefix}.{index}.{name}" for index, block in enumerate(blocks)
                for name in find_linear_layers(block, patterns, qualified_prefix=f"{prefix}.{index}",
                                               fused_experts=True)]

    every = kept(())
    # MoE routers are left as they are anyway (router_layers): a pattern naming one is not a typo
    routers = [(name, f"{prefix}.{index}.{name}") for index, block in enumerate(blocks) for name in router_layers(block)]
    unused = [pattern for pattern in skip if len(kept([pattern])) == len(every)
              and not any(matches_any(name, [pattern]) or matches_any(qualified, [pattern]) for name, qualified in routers)]
    if not unused:
        return
    example = f"{every[0].removeprefix(f'{prefix}.0.')!r} (or {every[0]!r})" if every else "none"
    if len(unused) == len(skip):
        raise ValueError(f"skip={list(skip)} matches no linear layer of the decoder blocks, whose names look like "
                         f"{example}; fix the pattern(s) (`*` also spans dots, e.g. '*down_proj').")
    logger.warning("skip patterns %s match no linear layer of this model (names look like %s)", unused, example)


def skipped_layer_names(model: nn.Module, skip: Sequence[str]) -> list[str]:
    """Qualified names of the decoder blocks' linear layers that ``skip`` patterns match, as the compression methods
    match them (block-relative or qualified names): for a library that takes module names instead (PEFT's
    ``exclude_modules``).

    Example:
        >>> from hf_compress.assets import tiny_model
        >>> skipped_layer_names(tiny_model("llama")[0], ["*down_proj"])
        ['model.layers.0.mlp.down_proj', 'model.layers.1.mlp.down_proj']
    """
    prefix, blocks = find_decoder_blocks(model)
    names = []
    for index, block in enumerate(blocks):
        qualified = f"{prefix}.{index}"
        kept = find_linear_layers(block, skip, qualified_prefix=qualified)
        names += [f"{qualified}.{name}" for name in find_linear_layers(block, qualified_prefix=qualified)
                  if name not in kept]
    return names


def find_linear_layers(
    module: nn.Module, skip: Sequence[str] = (), qualified_prefix: str | None = None, *, fused_experts: bool = False
) -> dict[str, nn.Module]:
    """Every ``nn.Linear`` / ``Conv1D`` inside ``module``, by name relative to ``module``, in module order.

    ``skip`` holds shell-style ``fnmatch`` patterns matched against those relative names (``*`` matches
    any characters including dots): ``["self_attn.*"]`` skips attention, ``["*down_proj"]`` one layer.
    With ``qualified_prefix`` (the module's name in the model, e.g. ``"model.layers.0"``) the patterns
    are also matched against the qualified names, so ``["model.layers.0.*"]`` skips a whole block.

    A PEFT adapter layer (e.g. LoRA's ``lora.Linear``) is reported as its frozen base layer under the
    wrapper's name; the adapter's own small ``lora_A``/``lora_B`` layers are not compression targets.

    ``fused_experts``: also report each expert's projections of a mixture-of-experts block stored as 3-D
    parameters (``fused_experts.ExpertProjection``, named like ``mlp.experts.3.gate_up_proj``), for methods
    that only read and write weights in place and calibrate through ``experts_through_projections``.

    The linear layers that route tokens to such experts (``router_layers``) are never reported: no method
    compresses them, as no method compresses the routers that are not ``nn.Linear`` (most families').

    Example:
        >>> from hf_compress.assets import tiny_model
        >>> block = tiny_model("llama")[0].model.layers[0]
        >>> list(find_linear_layers(block, skip=["mlp.*"]))
        ['self_attn.q_proj', 'self_attn.k_proj', 'self_attn.v_proj', 'self_attn.o_proj']
    """
    found: dict[str, nn.Module] = {}
    routers = router_layers(module)

    def skipped(name: str) -> bool:
        return name in routers or matches_any(name, skip) or (
            qualified_prefix is not None and matches_any(f"{qualified_prefix}.{name}", skip)
        )

    # Depth first, in module order, with a stack of child iterators rather than a recursive closure: a closure that
    # calls itself is a reference cycle, which kept ``found`` (and the float layers a caller such as quantize_rtn
    # replaces) alive after the caller dropped it, until the next garbage collection.
    pending = [("", iter(module.named_children()))]
    while pending:
        prefix, children = pending[-1]
        entry = next(children, None)
        if entry is None:
            pending.pop()
            continue
        child_name, child = entry
        name = f"{prefix}{child_name}"
        base = _peft_base_layer(child)
        if base is not None:
            if is_linear(base) and not skipped(name):
                found[name] = base
            continue  # do not descend into the adapter's own layers
        if is_linear(child):
            if not skipped(name):
                found[name] = child
            continue
        if fused_experts and is_fused_experts(child):
            found.update((key, projection) for key, projection in expert_projections(child, name).items()
                         if not skipped(key))
            continue
        pending.append((f"{name}.", iter(child.named_children())))
    return found


def router_layers(module: nn.Module) -> set[str]:
    """Names (relative to ``module``) of the linear layers that route tokens to the experts of a fused experts
    module: inside the experts' parent (the MoE block) but not among the experts, with one output per expert
    (Phi-MoE's ``mlp.router``, Hunyuan's ``mlp.gate.wg``, AFMoE's ``mlp.router.gate``) or a single one (Qwen2-MoE's
    ``shared_expert_gate``). Pruning or quantizing them would change which experts a token reaches.

    Example:
        >>> from hf_compress.assets import tiny_model
        >>> router_layers(tiny_model("llama")[0].model.layers[0])
        set()
    """
    found: set[str] = set()
    for name, experts in module.named_modules():
        if not is_fused_experts(experts):
            continue
        parent = name.rpartition(".")[0]
        outputs = (1, experts.down_proj.shape[0])  # one gate value, or one score per expert
        for child_name, child in module.get_submodule(parent).named_modules():
            qualified = f"{parent}.{child_name}" if parent else child_name
            layer = _peft_base_layer(child) or child
            if is_linear(layer) and not qualified.startswith(f"{name}.") and out_features(layer) in outputs:
                found.add(qualified)
    return found


def _peft_base_layer(module: nn.Module) -> nn.Module | None:
    # PEFT tuner layers expose ``get_base_layer()`` (recursive through nested adapters); duck-typed so
    # that peft need not be imported.
    if hasattr(module, "base_layer") and callable(getattr(module, "get_base_layer", None)):
        return module.get_base_layer()
    return None


# --------------------------------------------------------------------------------------------------
# Uniform [out, in] weight view
# --------------------------------------------------------------------------------------------------


def _check_linear(layer: nn.Module) -> None:
    if not is_linear(layer):
        raise TypeError(f"expected nn.Linear or transformers Conv1D, got {type(layer).__name__}.")


def in_features(layer: nn.Module) -> int:
    """Number of input features of a linear layer (``Conv1D`` included).

    Example:
        >>> in_features(nn.Linear(3, 5)), in_features(Conv1D(5, 3))
        (3, 3)
    """
    _check_linear(layer)
    return layer.weight.shape[0] if isinstance(layer, Conv1D) else layer.weight.shape[1]


def out_features(layer: nn.Module) -> int:
    """Number of output features of a linear layer (``Conv1D`` included).

    Example:
        >>> out_features(nn.Linear(3, 5)), out_features(Conv1D(5, 3))
        (5, 5)
    """
    _check_linear(layer)
    return layer.weight.shape[1] if isinstance(layer, Conv1D) else layer.weight.shape[0]


def weight_matrix(layer: nn.Module) -> torch.Tensor:
    """The layer's weight as an ``[out_features, in_features]`` tensor sharing its storage.

    The result is detached from autograd and, for ``Conv1D``, a transposed view: in-place edits
    (``weight_matrix(layer)[mask] = 0``) change the layer. Use ``set_weight_matrix`` to write a new
    tensor. For a layer whose weights accelerate has offloaded, read it inside ``onloaded(layer)``.

    Example:
        >>> layer = Conv1D(5, 3)  # 3 inputs, 5 outputs, stored [3, 5]
        >>> tuple(weight_matrix(layer).shape)
        (5, 3)
    """
    _check_linear(layer)
    weight = layer.weight.detach()
    return weight.t() if isinstance(layer, Conv1D) else weight


def set_weight_matrix(layer: nn.Module, new: torch.Tensor) -> None:
    """Write an ``[out_features, in_features]`` matrix into the layer, in the layer's own layout.

    The copy is in place (dtype and device of the existing weight are kept, the Parameter object is
    unchanged), so optimizers, tied references and hooks that hold the parameter stay valid.

    Example:
        >>> layer = Conv1D(5, 3)
        >>> set_weight_matrix(layer, torch.ones(5, 3))
        >>> bool((layer.weight == 1).all()), tuple(layer.weight.shape)
        (True, (3, 5))
    """
    _check_linear(layer)
    expected = (out_features(layer), in_features(layer))
    if tuple(new.shape) != expected:
        raise ValueError(
            f"weight matrix must have shape [out_features, in_features] = {list(expected)}, "
            f"got {list(new.shape)}."
        )
    with torch.no_grad():
        weight_matrix(layer).copy_(new)


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` in place of the submodule with the qualified ``name`` (e.g. ``"model.layers.0.mlp.up_proj"``).

    Example:
        >>> model = nn.Sequential(nn.Linear(2, 2))
        >>> replace_module(model, "0", nn.Identity())
        >>> type(model[0]).__name__
        'Identity'
    """
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


# --------------------------------------------------------------------------------------------------
# Devices and accelerate offloading
# --------------------------------------------------------------------------------------------------


def module_execution_device(module: nn.Module) -> torch.device:
    """The device ``module`` computes on.

    An accelerate hook's ``execution_device`` wins (dispatched or offloaded models keep weights on
    ``meta``/CPU and move them at forward); otherwise the device of the first parameter or buffer
    that is not on ``meta``; CPU when there is none.

    Example:
        >>> module_execution_device(nn.Linear(2, 2))
        device(type='cpu')
    """
    for sub in module.modules():
        device = getattr(_compat.accelerate_hook(sub), "execution_device", None)
        if device is not None:
            return torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
    for tensor in _tensors(module):
        if tensor.device.type != "meta":
            return tensor.device
    return torch.device("cpu")


def _tensors(module: nn.Module) -> Iterator[torch.Tensor]:
    yield from module.parameters()
    yield from module.buffers()


@contextlib.contextmanager
def onloaded(module: nn.Module) -> Iterator[nn.Module]:
    """Materialise accelerate-offloaded weights of ``module`` (and its children) for reading and editing.

    Inside the block every submodule whose weights accelerate keeps offloaded (``cpu_offload``,
    ``device_map`` with ``"cpu"``) holds real tensors on its execution device, and forwards run inside
    the block use them as they are; on exit, the (possibly edited) values are written back to the
    offload store and the module is offloaded again. For modules without offloading this does nothing.

    Disk offload keeps no edits (each read is a fresh copy of a memory map): a method that edits weights refuses
    such models first (``check_not_disk_offloaded``).

    Example:
        >>> with onloaded(block):  # doctest: +SKIP
        ...     weight_matrix(block.self_attn.q_proj)[:, :8] = 0
    """
    offloaded = [sub for sub in module.modules() if is_offloaded(sub)]
    entered: list[nn.Module] = []
    try:
        for sub in offloaded:
            hook = _compat.accelerate_hook(sub)
            hook.pre_forward(sub)
            # While onloaded, forwards run inside the block (e.g. a method re-running the block) must neither
            # reload the stored weights over edits nor offload them to ``meta``: pause the hook's offloading.
            hook.offload = False
            entered.append(sub)
        yield module
        for sub in entered:
            _write_back(sub)
    finally:
        for sub in reversed(entered):
            hook = _compat.accelerate_hook(sub)
            hook.offload = True
            hook.post_forward(sub, None)


@contextlib.contextmanager
def evaluation_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model.eval()`` inside the block, the caller's training mode restored after it: a measurement of a model left
    in training mode (after ``Trainer.train()``, say) would otherwise run with random dropout.

    Example:
        >>> from hf_compress.assets import tiny_model
        >>> model = tiny_model("llama")[0].train()
        >>> with evaluation_mode(model):
        ...     model.training
        False
        >>> model.training
        True
    """
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@contextlib.contextmanager
def kept_trainability(model: nn.Module) -> Iterator[None]:
    """Which of ``model``'s parameters require grad, restored on leaving the block (also on an error): for work that
    freezes the model, or that peft makes trainable as a side effect (``set_adapter`` and leaving
    ``disable_adapter()`` mark adapters trainable, which on a model loaded for inference would build autograd graphs).

    Example:
        >>> from hf_compress.assets import tiny_model
        >>> model = tiny_model("llama")[0]
        >>> with kept_trainability(model):
        ...     _ = model.requires_grad_(False)
        >>> all(p.requires_grad for p in model.parameters())
        True
    """
    flags = [(parameter, parameter.requires_grad) for parameter in model.parameters()]
    try:
        yield
    finally:
        for parameter, flag in flags:
            parameter.requires_grad_(flag)


# ``does`` for work that trains through ``hf_compress.training`` (Trainer places the whole model on one device).
TRAINS_ON_ONE_DEVICE = "runs through Trainer, which moves the model to one device"


def check_not_offloaded(
    model: nn.Module, work: str, instead: str = "", does: str = "reads and rewrites many layers at once"
) -> None:
    """Refuse a model whose weights accelerate keeps offloaded (on the meta device), CPU or disk, for ``work`` that
    ``does`` what offloading cannot serve (``instead``: another way to say, e.g. "or use permutation=None").
    Work that only edits weights in place, block by block, needs ``check_not_disk_offloaded`` alone.

    Example:
        >>> from hf_compress.assets import tiny_model
        >>> check_not_offloaded(tiny_model("llama")[0], "A channel permutation")
    """
    offloaded = next((name for name, p in model.named_parameters() if p.device.type == "meta"), None)
    if offloaded is not None:
        raise ValueError(f"{work} {does}, but {offloaded} (and maybe more) is "
                         f"offloaded by accelerate. Load the model without offloading (on one device){instead}.")


def disk_offloaded(model: nn.Module) -> str | None:
    """The name of a parameter whose accelerate offload store keeps no edits (``None`` when there is none).

    accelerate's disk offload (``device_map`` entries ``"disk"``, ``disk_offload``) reads each weight from a read-only
    memory map, a fresh copy at every read: a value written back there (``onloaded``, ``.weight.data``) is dropped
    without a word. CPU offload (``cpu_offload``, ``device_map`` entries ``"cpu"`` beside a GPU) keeps its tensors,
    so edits written back stay. One tensor per store tells.

    Example:
        >>> from hf_compress.assets import tiny_model
        >>> disk_offloaded(tiny_model("llama")[0]) is None
        True
    """
    for prefix, module in model.named_modules():
        if not is_offloaded(module):
            continue
        hook = _compat.accelerate_hook(module)
        recurse = bool(getattr(hook, "place_submodules", False))
        for name, _ in module.named_parameters(recurse=recurse):
            try:
                first, second = hook.weights_map[name], hook.weights_map[name]
            except KeyError:
                continue
            if first.data_ptr() != second.data_ptr():
                return f"{prefix}.{name}" if prefix else name
            break
    return None


def missing_weights(model: nn.Module) -> list[str]:
    """Names of the parameters and buffers on the ``meta`` device that no accelerate offload hook holds a value for:
    weights the model was built without (``init_empty_weights``, ``torch.device("meta")``), never loaded.

    Example:
        >>> from hf_compress.assets import tiny_model
        >>> missing_weights(tiny_model("llama")[0])
        []
    """
    held: set[int] = set()  # tensors whose values an offload hook keeps
    for module in model.modules():
        if is_offloaded(module):
            recurse = bool(getattr(_compat.accelerate_hook(module), "place_submodules", False))
            held.update(id(t) for t in (*module.parameters(recurse=recurse), *module.buffers(recurse=recurse)))
    return [name for name, tensor in (*model.named_parameters(), *model.named_buffers())
            if tensor.is_meta and id(tensor) not in held]


def check_not_disk_offloaded(model: nn.Module, work: str, instead: str = "") -> None:
    """Refuse a model with disk-offloaded weights for ``work`` that writes weights in place (``work`` names what would be
    lost, e.g. "the pruned weights"); CPU-offloaded models pass (``onloaded`` writes their edits back).

    Example:
        >>> from hf_compress.assets import tiny_model
        >>> check_not_disk_offloaded(tiny_model("llama")[0], "the pruned weights")
    """
    name = disk_offloaded(model)
    if name is not None:
        raise ValueError(
            f"{name} is offloaded to disk, where accelerate keeps no edits: {work} would be silently dropped. Load "
            f"the model with device_map entries 'cpu' or a GPU instead of 'disk' (or on one device){instead}."
        )


def is_offloaded(module: nn.Module) -> bool:
    """Whether an accelerate offload hook keeps this module's weights elsewhere (CPU or disk) between forwards."""
    hook = _compat.accelerate_hook(module)
    # ``offload`` and ``weights_map`` are AlignDevicesHook attributes, read duck-typed so accelerate need not
    # be imported; hooks without them (e.g. a SequentialHook) are skipped.
    return bool(getattr(hook, "offload", False)) and getattr(hook, "weights_map", None) is not None


def _write_back(module: nn.Module) -> None:
    hook = _compat.accelerate_hook(module)
    recurse = bool(getattr(hook, "place_submodules", False))
    with torch.no_grad():
        tensors = [*module.named_parameters(recurse=recurse), *module.named_buffers(recurse=recurse)]
        for name, tensor in tensors:
            try:
                stored = hook.weights_map[name]
            except KeyError:
                continue
            if stored.data_ptr() != tensor.data_ptr():  # on a CPU execution device they share storage already
                stored.copy_(tensor.to(stored.device, stored.dtype))


def position_limit(model: nn.Module) -> int | None:
    """The positions a model's (text) config states (``n_positions``, ``max_position_embeddings`` or ``n_ctx``, as
    lm-eval reads them), or ``None`` when it states none.

    Example:
        >>> from hf_compress.assets import tiny_model
        >>> position_limit(tiny_model("llama")[0])
        512
    """
    config = model.config.get_text_config()
    for name in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def learned_position_limit(model: nn.Module) -> int | None:
    """How many positions a model with *learned* position embeddings (GPT-2, OPT) has; ``None`` for rotary or other
    computed positions, which have no table to run off (only a trained length to extrapolate past).

    Example:
        >>> from hf_compress.assets import tiny_model
        >>> learned_position_limit(tiny_model("gpt2")[0]), learned_position_limit(tiny_model("llama")[0])
        (512, None)
    """
    limit = position_limit(model)
    if limit is None:
        return None
    tokens = model.get_input_embeddings()  # a second embedding table sized like the positions: learned ones
    learned = any(isinstance(m, nn.Embedding) and m is not tokens and limit <= m.num_embeddings <= limit + 2
                  for m in model.modules())  # (OPT offsets its positions by 2)
    return int(limit) if learned else None


def check_within_learned_positions(model: nn.Module, length: int, what: str, setting: str) -> None:
    """Refuse ``length`` tokens where a learned position table is shorter (an ``IndexError`` deep in the model
    otherwise); ``what`` names the length in the message and ``setting`` the argument that fixes it.

    Example:
        >>> from hf_compress.assets import tiny_model
        >>> check_within_learned_positions(tiny_model("gpt2")[0], 600, "window is", "window")
        Traceback (most recent call last):
        ValueError: window is 600 tokens, but this model has learned positions for 512 only; use window <= 512.
    """
    limit = learned_position_limit(model)
    if limit is not None and length > limit:
        raise ValueError(f"{what} {length} tokens, but this model has learned positions for {limit} only; "
                         f"use {setting} <= {limit}.")

