"""Fused mixture-of-experts weights, seen as one linear layer per expert and projection.

transformers 5 stores the experts of a MoE block (Mixtral, Qwen-MoE, OLMoE, DeepSeek, gpt-oss, ...) as 3-D
parameters of one ``*Experts`` module (``gate_up_proj`` ``[experts, 2·inter, hidden]``, ``down_proj``
``[experts, hidden, inter]``; transposed in some models) instead of an ``nn.Linear`` per expert. Layer discovery that
looks for ``nn.Linear`` never sees them, so a method would leave the bulk of such a model untouched without a word.

Here each expert's projection becomes an ``ExpertProjection``: a module whose ``weight`` is an ``[out, in]`` view into
the fused parameter (edits write the model's weights) and whose ``forward`` is that expert's linear map.
``find_linear_layers(..., fused_experts=True)`` returns them under names like ``mlp.experts.3.gate_up_proj``, and
``experts_through_projections`` runs each experts module through its projections while calibration statistics are
collected, so the forward hooks every calibrated method already uses see each expert's own inputs: the tokens the
router sent to it. The experts modules recognised are those transformers' ``use_experts_implementation`` prepares
(its ``has_gate`` / ``is_transposed`` / ``has_bias`` flags and gating); the first micro-batch through each one
is checked against the model's own experts forward, so a layout this reading gets wrong raises instead of
calibrating on wrong inputs.

Example:
    >>> from transformers import AutoConfig, AutoModelForCausalLM
    >>> config = AutoConfig.for_model("qwen3_moe", vocab_size=256, hidden_size=64, moe_intermediate_size=32,
    ...                               num_experts=4, num_experts_per_tok=2, num_hidden_layers=1,
    ...                               num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    >>> block = AutoModelForCausalLM.from_config(config).model.layers[0]
    >>> projections = expert_projections(block.mlp.experts, "mlp.experts")
    >>> list(projections)[:3], tuple(projections["mlp.experts.0.down_proj"].weight.shape)
    (['mlp.experts.0.gate_up_proj', 'mlp.experts.0.down_proj', 'mlp.experts.1.gate_up_proj'], (64, 32))
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Mapping

import torch
from torch import nn

from .. import _compat
from ..utils.logging import get_logger

__all__ = [
    "ExpertProjection",
    "check_fused_experts_readable",
    "experts_through_projections",
    "expert_projections",
    "fused_expert_parameters",
    "is_fused_experts",
    "warn_fused_experts_untouched",
]

logger = get_logger(__name__)

_FLAGS = ("has_gate", "has_bias", "is_transposed")  # set on every instance by use_experts_implementation
_CHECK_TOLERANCE = 1e-2  # relative error of the first micro-batch; a misread layout is off by O(1)


def is_fused_experts(module: nn.Module) -> bool:
    """Whether ``module`` is an experts module this library reads as linear layers (``use_experts_implementation``
    layout: 3-D ``gate_up_proj`` or ``up_proj``, and ``down_proj``)."""
    if not all(hasattr(module, flag) for flag in _FLAGS):
        return False
    first = getattr(module, "gate_up_proj" if module.has_gate else "up_proj", None)
    down = getattr(module, "down_proj", None)
    return all(isinstance(p, nn.Parameter) and p.dim() == 3 for p in (first, down))


class ExpertProjection(nn.Module):
    """One expert's projection inside a fused experts module, as a linear layer.

    ``weight`` is the ``[out_features, in_features]`` view of ``experts.<weight_name>[index]`` (transposed when the
    model stores ``[in, out]``): writing into it writes the model's parameter. The experts module is held as a plain
    attribute, not a submodule, so the projection owns no parameter and is never saved.

    Example:
        >>> experts = nn.Module()
        >>> experts.down_proj = nn.Parameter(torch.ones(2, 3, 5))
        >>> experts.has_gate, experts.has_bias, experts.is_transposed = True, False, False
        >>> projection = ExpertProjection(experts, "down_proj", 1)
        >>> projection.in_features, projection.out_features, tuple(projection(torch.ones(4, 5)).shape)
        (5, 3, (4, 3))
    """

    def __init__(self, experts: nn.Module, weight_name: str, index: int) -> None:
        super().__init__()
        object.__setattr__(self, "experts", experts)  # not registered: the parameter stays the experts module's
        self.weight_name = weight_name
        self.index = index

    @property
    def weight(self) -> torch.Tensor:
        stored = getattr(self.experts, self.weight_name)[self.index]
        return stored.t() if self.experts.is_transposed else stored

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.experts, f"{self.weight_name}_bias")[self.index] if self.experts.has_bias else None

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(inputs, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{self.weight_name}[{self.index}], in_features={self.in_features}, out_features={self.out_features}"


def _projection_names(experts: nn.Module) -> tuple[str, str]:
    return ("gate_up_proj" if experts.has_gate else "up_proj"), "down_proj"


def expert_projections(experts: nn.Module, name: str) -> dict[str, ExpertProjection]:
    """``{f"{name}.{e}.{projection}": ExpertProjection}`` for every expert of ``experts``, expert by expert.

    Example: see the module docstring.
    """
    first, down = _projection_names(experts)
    return {f"{name}.{index}.{weight}": ExpertProjection(experts, weight, index)
            for index in range(getattr(experts, down).shape[0]) for weight in (first, down)}


def _routed_forward(experts: nn.Module, first: list[nn.Module], down: list[nn.Module]):
    """The experts computation of transformers' eager / ``batched_mm`` implementations, each expert's projections
    called as modules (so their forward hooks see the tokens routed to that expert)."""

    def forward(hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        output = torch.zeros_like(hidden_states)
        for index in range(len(down)):
            token_index, slot = torch.where(top_k_index == index)
            if token_index.numel() == 0:  # no token for this expert: its hooks see nothing
                continue
            hidden = first[index](hidden_states[token_index])
            hidden = _compat.apply_expert_gate(experts, hidden) if experts.has_gate else experts.act_fn(hidden)
            hidden = down[index](hidden)
            if getattr(experts, "has_post_expert_norm", False):
                hidden = experts.post_expert_norm(hidden)
            hidden = hidden * top_k_weights[token_index, slot, None]
            output.index_add_(0, token_index, hidden.to(output.dtype))
        return output

    return forward


@contextlib.contextmanager
def experts_through_projections(block: nn.Module, layers: Mapping[str, nn.Module]) -> Iterator[None]:
    """Inside, every fused experts module of ``block`` with a projection in ``layers`` computes through its
    ``ExpertProjection`` modules: those in ``layers`` (the ones a method observes, with their hooks) and fresh ones for
    the experts left out (skip patterns). An experts module none of whose projections is observed runs as it is.

    The first call of each experts module also runs the model's own experts forward on the same inputs and raises
    ``NotImplementedError`` when the two differ: a layout this library does not read correctly is refused, not
    calibrated on wrong inputs. Nothing changes for a block without fused experts.
    """
    given: dict[tuple[int, str, int], nn.Module] = {
        (id(layer.experts), layer.weight_name, layer.index): layer
        for layer in layers.values() if isinstance(layer, ExpertProjection)
    }
    with contextlib.ExitStack() as patched:
        for name, module in block.named_modules():
            if not is_fused_experts(module) or not any(key[0] == id(module) for key in given):
                continue  # not experts, or none of them observed (skipped): the model's own forward, unchecked
            first_name, down_name = _projection_names(module)
            count = getattr(module, down_name).shape[0]

            def projection(weight: str, index: int, module: nn.Module = module) -> nn.Module:
                return given.get((id(module), weight, index)) or ExpertProjection(module, weight, index)

            routed = _routed_forward(module, [projection(first_name, e) for e in range(count)],
                                     [projection(down_name, e) for e in range(count)])
            # Replaced where the module's own forward runs: inside an accelerate hook's onloading, if it has one.
            own = _compat.running_forward(module)
            patched.enter_context(_compat.forward_replaced(module, _checked_once(name, module, routed, own)))
        yield


def check_fused_experts_readable(model: nn.Module) -> None:
    """Refuse (``NotImplementedError``), before any work, a model whose fused experts this module would compute wrongly:
    one experts module of each class is run on 8 random tokens both ways (its own forward, expert by expert).

    The same check runs again on the first calibration batch of every experts module (``experts_through_projections``);
    this one comes first, so a pruner refuses before it changes any block.

    Example:
        >>> from hf_compress.assets import tiny_model
        >>> check_fused_experts_readable(tiny_model("llama")[0])  # no experts: nothing to check
    """
    from .layers import onloaded  # layers imports this module

    seen: set[type] = set()
    generator = torch.Generator().manual_seed(0)
    for name, module in model.named_modules():
        if not is_fused_experts(module) or type(module) in seen:
            continue
        seen.add(type(module))
        projections = list(expert_projections(module, name).values())
        count = len(projections) // 2
        with onloaded(module), torch.no_grad():
            weight = projections[0].weight
            tokens, k = 8, min(2, count)
            hidden = torch.randn(tokens, weight.shape[1], generator=generator).to(weight.device, weight.dtype)
            index = torch.stack([torch.randperm(count, generator=generator)[:k] for _ in range(tokens)]).to(weight.device)
            weights = torch.rand(tokens, k, generator=generator).softmax(-1).to(weight.device, weight.dtype)
            routed = _routed_forward(module, projections[0::2], projections[1::2])
            _checked_once(name, module, routed, _compat.running_forward(module))(hidden, index, weights)


def _checked_once(name: str, experts: nn.Module, routed, own):
    signature = inspect.signature(own)
    checked = False

    def forward(*args, **kwargs) -> torch.Tensor:
        nonlocal checked
        try:
            hidden, index, weights = args if len(args) == 3 and not kwargs else (
                signature.bind(*args, **kwargs).arguments.values())
        except (TypeError, ValueError) as error:
            raise NotImplementedError(
                f"{name} ({type(experts).__name__}) is called with {len(args)} positional and {sorted(kwargs)} keyword "
                "arguments, not (hidden_states, top_k_index, top_k_weights); hf_compress cannot see its experts as "
                "linear layers. Skip them (skip=['*experts*'])."
            ) from error
        output = routed(hidden, index, weights)
        if not checked:
            reference = own(*args, **kwargs)
            error = float((output.float() - reference.float()).norm() / reference.float().norm().clamp_min(1e-12))
            if error > _CHECK_TOLERANCE:
                raise NotImplementedError(
                    f"{name} ({type(experts).__name__}): computed expert by expert, its output differs from the "
                    f"model's own (relative error {error:.3g}); hf_compress does not read this experts layout "
                    "correctly. Skip the experts (skip=['*experts*']) and report the model type."
                )
            checked = True
        return output

    return forward


def fused_expert_parameters(model: nn.Module, recognised_only: bool = False) -> dict[str, int]:
    """Name → element count of the stacked expert weights inside the decoder blocks, which methods working on
    ``nn.Linear`` layers do not see: the 3-D parameters of the experts modules read here (``is_fused_experts``) and,
    unless ``recognised_only``, those of other modules named like experts (Llama 4's). Convolution weights (Mamba's
    ``conv1d``) are not experts.

    Example:
        >>> from hf_compress.assets import tiny_model
        >>> fused_expert_parameters(tiny_model("llama")[0])
        {}
    """
    from .layers import find_decoder_blocks  # layers imports this module

    prefix, blocks = find_decoder_blocks(model)
    found: dict[str, int] = {}
    for index, block in enumerate(blocks):
        for name, module in block.named_modules():
            recognised = is_fused_experts(module)
            if not recognised and (recognised_only or "expert" not in name.rpartition(".")[2].lower()
                                   or isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d))):
                continue
            found.update((f"{prefix}.{index}.{name}.{key}", parameter.numel())
                         for key, parameter in module.named_parameters(recurse=False) if parameter.dim() == 3)
    return found


def warn_fused_experts_untouched(model: nn.Module, work: str) -> int:
    """Log a warning when the decoder blocks hold fused expert weights that ``work`` leaves as they are; returns
    their element count (0: none, and nothing is logged).

    Example:
        >>> from hf_compress.assets import tiny_model
        >>> warn_fused_experts_untouched(tiny_model("llama")[0], "RTN quantization")
        0
    """
    fused = fused_expert_parameters(model)
    if not fused:
        return 0
    from .layers import find_decoder_blocks

    total = sum(p.numel() for block in find_decoder_blocks(model)[1] for p in block.parameters())
    count = sum(fused.values())
    example = next(iter(fused))
    logger.warning(
        "%s works on nn.Linear layers only: the fused expert weights of this mixture-of-experts model (%d tensors "
        "such as %s, %.0f%% of the decoder blocks' parameters) are left unchanged", work, len(fused), example,
        100 * count / max(total, 1),
    )
    return count
