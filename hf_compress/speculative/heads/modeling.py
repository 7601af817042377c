"""Drafting heads on top of a frozen causal LM: Medusa (independent) and Amphista (bi-directional).

Heads read the base model's final hidden states (after its last norm) and return, for every position
``t``, ``num_heads`` feature vectors; projecting feature ``k`` on the vocabulary guesses the token at
``t + 2 + k`` (the base ``lm_head`` itself gives ``t + 1``). The projection is the frozen base ``lm_head``
(``share_lm_head``) or one trained ``Linear`` per head, so the base's output and input embeddings are
passed in (:class:`BaseParts`) rather than stored: a heads checkpoint holds only what was trained.

Example:
    >>> from hf_compress.assets import tiny_model
    >>> model, _ = tiny_model("llama")
    >>> heads = AmphistaHeads.for_model(model, AmphistaConfig(num_heads=3))
    >>> hidden = torch.randn(1, 5, model.config.hidden_size)
    >>> heads(hidden, torch.tensor([[1, 2, 3, 4, 5]]), BaseParts.of(model)).shape
    torch.Size([1, 5, 3, 256])
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from ...assets.resolve import check_folder_exists
from ...hub import base_weights_of
from ...utils import get_logger
from ...modeling.identity import base_model_identity, check_base_model
from ...utils.model_types import hub_download_kwargs
from .config import AmphistaConfig, DraftHeadsConfig, MedusaConfig


if TYPE_CHECKING:
    from ...evaluation.results import MetricRecord


__all__ = ["AmphistaHeads", "AutoEmbeddingBlock", "BaseParts", "DraftHeads", "MedusaHeads", "ResBlock", "load_heads"]

logger = get_logger(__name__)

# Past keys/values of Amphista's adaptation stages: one (keys, values) pair per stage.
StagePast = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass
class BaseParts:
    """The frozen pieces of the base model the heads use: its ``lm_head`` and input embeddings."""

    lm_head: nn.Module
    embeddings: nn.Module

    @classmethod
    def of(cls, model: PreTrainedModel) -> BaseParts:
        return cls(model.get_output_embeddings(), model.get_input_embeddings())


def _warn_if_projections_outweigh(model: PreTrainedModel, config: DraftHeadsConfig) -> None:
    """Warn when heads with vocabulary projections of their own would be bigger than the model they draft for.

    With a large vocabulary (Gemma's 262k tokens) each own projection is as big as the embedding: four of them can
    outweigh the base model, and Adam's state doubles that again while training.
    """
    if config.share_lm_head:
        return
    own = config.num_heads * config.vocab_size * config.hidden_size
    base = model.num_parameters()
    if own > base:
        logger.warning(
            "%d heads with their own vocabulary projections hold %.0fM parameters (%d x %d x %d), %.1fx the base "
            "model's %.0fM; share_lm_head=True (or AmphistaConfig) projects with the base lm_head instead.",
            config.num_heads, own / 1e6, config.num_heads, config.vocab_size, config.hidden_size, own / base,
            base / 1e6,
        )


class DraftHeads(PreTrainedModel):
    """Base class: building for a model, checking compatibility, projecting, loading by ``model_type``."""

    config_class = DraftHeadsConfig
    base_model_prefix = "heads"
    main_input_name = "hidden_states"
    _no_split_modules: list[str] = []
    uses_context = False  # True when drafting needs every position's features (stateful heads)

    def __init__(self, config: DraftHeadsConfig):
        super().__init__(config)
        if config.hidden_size is None or config.vocab_size is None:
            raise ValueError("Build heads with `for_model(model, config)`, which reads hidden_size and vocab_size.")
        self.projections = None
        if not config.share_lm_head:
            self.projections = nn.ModuleList(
                nn.Linear(config.hidden_size, config.vocab_size, bias=False) for _ in range(config.num_heads)
            )

    # ------------------------------------------------------------------ building and loading
    @classmethod
    def for_model(cls, model: PreTrainedModel, config: DraftHeadsConfig) -> DraftHeads:
        """Fresh heads for ``model`` (the class follows the config: Medusa or Amphista), on its device/dtype."""
        heads_class = _HEADS_CLASSES.get(type(config))
        if heads_class is None:
            raise TypeError(f"No drafting heads for {type(config).__name__}; pass a MedusaConfig or an AmphistaConfig.")
        config = type(config).from_dict(config.to_dict())  # never mutate the caller's config
        config.hidden_size = model.get_output_embeddings().in_features
        config.vocab_size = model.get_output_embeddings().out_features
        config.base_model_name_or_path = model.config.name_or_path or None
        config.base_model_identity = base_model_identity(model)
        config.base_weights = base_weights_of(model.config)  # a reference model's GGUF origin, for the heads' card
        if isinstance(config, AmphistaConfig):
            config.check_widths()  # now that hidden_size is known
        _warn_if_projections_outweigh(model, config)
        heads = heads_class(config)
        heads.initialise_from(model)
        head_weight = model.get_output_embeddings().weight
        return heads.to(head_weight.device, head_weight.dtype)

    @torch.no_grad()
    def initialise_from(self, model: PreTrainedModel) -> None:
        """Start as "repeat the next token": own projections copy the base ``lm_head`` (as Medusa does)."""
        if self.projections is not None:
            for projection in self.projections:
                projection.weight.copy_(model.get_output_embeddings().weight)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *args, **kwargs) -> DraftHeads:
        """Load heads; ``DraftHeads``/``AmphistaHeads.from_pretrained`` return whichever kind the folder holds.

        A folder missing some of the heads' weights (or holding others) is refused: transformers would fill the
        gaps with fresh values and only warn, and such heads draft badly without any error.
        """
        from transformers.utils import cached_file

        check_folder_exists(pretrained_model_name_or_path, "a folder saved by AmphistaHeads.save_pretrained / "
                                                           "MedusaHeads.save_pretrained or a Hub id (owner/name)")
        config_file = cached_file(pretrained_model_name_or_path, "config.json", **hub_download_kwargs(kwargs))
        model_type = json.loads(Path(config_file).read_text()).get("model_type")
        heads_class = _CLASS_BY_MODEL_TYPE.get(model_type)
        if heads_class is None:
            raise ValueError(
                f"{pretrained_model_name_or_path} holds {model_type!r}, not drafting heads ({sorted(_CLASS_BY_MODEL_TYPE)})."
            )
        if cls not in (DraftHeads, AmphistaHeads, heads_class):
            raise ValueError(f"{pretrained_model_name_or_path} holds {heads_class.__name__}, not {cls.__name__}.")
        want_info = kwargs.pop("output_loading_info", False)
        heads, info = super(DraftHeads, heads_class).from_pretrained(pretrained_model_name_or_path, *args,
                                                                     output_loading_info=True, **kwargs)
        missing = sorted(info.get("missing_keys") or ())
        unexpected = sorted(info.get("unexpected_keys") or ())
        mismatched = sorted(str(entry[0]) if isinstance(entry, tuple) else str(entry)
                            for entry in info.get("mismatched_keys") or ())
        if missing or unexpected or mismatched:
            what = "; ".join(f"{label} [{', '.join(names[:5])}{', ...' if len(names) > 5 else ''}]" for label, names in (
                ("missing", missing), ("unexpected", unexpected), ("wrong shapes for", mismatched)) if names)
            raise ValueError(f"{pretrained_model_name_or_path} does not hold complete {heads_class.__name__}: {what}. "
                             "Load a folder saved by DraftHeads.save_pretrained (re-save or re-download it if it was "
                             "cut short).")
        return (heads, info) if want_info else heads

    def check_compatible(self, model: PreTrainedModel) -> None:
        """Raise a clear error if these heads were trained for a model of another width, vocabulary or weights."""
        head = model.get_output_embeddings()
        hidden, vocab = head.in_features, head.out_features
        if (hidden, vocab) != (self.config.hidden_size, self.config.vocab_size):
            raise ValueError(
                f"These heads were trained for a model with hidden size {self.config.hidden_size} and "
                f"{self.config.vocab_size} tokens ({self.config.base_model_name_or_path or 'unknown base'}), "
                f"but this model has hidden size {hidden} and {vocab} tokens. Train heads for this model "
                "(`DraftHeads.for_model(model, config)` + `train_heads`)."
            )
        check_base_model(self.config, model, "these heads", "Train heads for this model (`DraftHeads.for_model(model, "
                         "config)` + `train_heads`), or load the model they were trained for.")

    @property
    def num_heads(self) -> int:
        return self.config.num_heads

    # ------------------------------------------------------------------ computing
    def features(
        self, hidden_states: torch.Tensor, next_tokens: torch.LongTensor, base: BaseParts,
        past: StagePast | None = None, draft_positions: slice = slice(None), attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, StagePast | None]:
        """``(B, T', K, d)`` features of the ``draft_positions`` of ``(B, T, d)`` hidden states, and the new past.

        ``next_tokens[:, t]`` is the token that follows position ``t`` (the base's choice, for the last one).
        ``attention_mask`` ``(B, past + T)``: 0 at left padding, which heads reading context then ignore.
        """
        raise NotImplementedError

    def project(self, features: torch.Tensor, base: BaseParts, head: int | None = None) -> torch.Tensor:
        """Logits of the first heads' ``features`` ``(..., k, d)`` → ``(..., k, V)``, or of one head's ``(..., d)``."""
        if self.projections is None:
            # The shared base lm_head may be in another dtype than the heads (fp32 heads on a bf16 base).
            weight = getattr(base.lm_head, "weight", None)
            cast = weight is not None and weight.is_floating_point()  # a quantized head takes its own input dtype
            return base.lm_head(features.to(weight.dtype) if cast else features)
        if head is not None:
            return self.projections[head](features)
        return torch.stack([self.projections[k](features[..., k, :]) for k in range(features.shape[-2])], dim=-2)

    def forward(self, hidden_states: torch.Tensor, next_tokens: torch.LongTensor, base: BaseParts) -> torch.Tensor:
        """Logits ``(B, T, K, V)`` of every head at every position."""
        features, _ = self.features(hidden_states, next_tokens, base)
        return self.project(features, base)

    # ------------------------------------------------------------------ sharing
    def save_pretrained(
        self, save_directory: str | os.PathLike, *, overwrite: bool = False, heads_source: str | None = None,
        repo_id: str | None = None, metrics: Sequence[MetricRecord] = (), **kwargs
    ) -> Path:
        """Config + safetensors + model card + ``custom_generate/`` in one atomic write.

        ``custom_generate/generate.py`` loads the heads from ``heads_source`` (default ``"."``: the folder or
        repo that ``custom_generate=`` names, so no local path is recorded and a pushed copy of the folder
        works; :meth:`push_to_hub` records the repo id), so ``generate(custom_generate=<folder or repo>,
        trust_remote_code=True)`` decodes with them. ``repo_id``: the repo the card's code loads (``None``: the
        folder's name); ``metrics``: measured results for the card. Other ``kwargs`` go to
        ``PreTrainedModel.save_pretrained``.

        Example:
            >>> heads.save_pretrained("heads/")  # doctest: +SKIP
            >>> hf_compress.hub.push_to_hub("heads/", "me/heads")  # doctest: +SKIP
        """
        from .strategy import Amphista

        strategy = Amphista(heads=self)
        return strategy.save_pretrained(save_directory, overwrite=overwrite, heads_source=heads_source, repo_id=repo_id,
                                        metrics=metrics, save_heads_kwargs=kwargs)

    def push_to_hub(self, repo_id: str, **push_kwargs):
        """Save (recording ``repo_id`` as where ``custom_generate`` finds the heads, and in the card's code) and
        upload."""
        from .strategy import Amphista

        return Amphista(heads=self).push_to_hub(repo_id, **push_kwargs)


# ---------------------------------------------------------------------------------------------- Medusa
class ResBlock(nn.Module):
    """``x + SiLU(W x + b)`` with ``W`` zero-initialised, so a fresh block is the identity (Medusa)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, hidden_size)
        nn.init.zeros_(self.linear.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.silu(self.linear(x))


class MedusaHeads(DraftHeads):
    """Medusa-1: each head is ``ResBlock^L`` on the last hidden state; the heads never see each other.

    Example:
        >>> from hf_compress.assets import tiny_model
        >>> model, _ = tiny_model("llama")
        >>> heads = MedusaHeads.for_model(model, MedusaConfig(num_heads=2))
        >>> sum(p.numel() for p in heads.parameters()) == 2 * (64 * 64 + 64 + 64 * 256)
        True
    """

    config_class = MedusaConfig

    def __init__(self, config: MedusaConfig):
        super().__init__(config)
        self.blocks = nn.ModuleList(
            nn.Sequential(*(ResBlock(config.hidden_size) for _ in range(config.num_layers))) for _ in range(config.num_heads)
        )
        self.post_init()

    def _init_weights(self, module):
        if isinstance(module, ResBlock):
            nn.init.zeros_(module.linear.weight)

    def features(self, hidden_states, next_tokens, base, past=None, draft_positions=slice(None), attention_mask=None):
        hidden = hidden_states[:, draft_positions]
        return torch.stack([block(hidden) for block in self.blocks], dim=-2), None


# ---------------------------------------------------------------------------------------------- Amphista
class _SelfAttentionBlock(nn.Module):
    """Pre-norm multi-head self-attention + MLP (no positional encoding: order comes from the mask)."""

    def __init__(self, hidden_size: int, num_heads: int, intermediate_size: int):
        super().__init__()
        self.num_heads = num_heads
        self.attention_norm = nn.RMSNorm(hidden_size)
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size, bias=False)
        self.out = nn.Linear(hidden_size, hidden_size, bias=False)
        self.mlp_norm = nn.RMSNorm(hidden_size)
        self.mlp = nn.Sequential(
            nn.Linear(hidden_size, intermediate_size), nn.SiLU(), nn.Linear(intermediate_size, hidden_size)
        )

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, self.num_heads, -1).transpose(1, 2)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, past=None):
        q, k, v = self.qkv(self.attention_norm(x)).chunk(3, dim=-1)
        q, k, v = self._split(q), self._split(k), self._split(v)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + self.out(attended.transpose(1, 2).reshape(x.shape))
        return x + self.mlp(self.mlp_norm(x)), (k, v)


class AdaptationLayer(_SelfAttentionBlock):
    """One staged adaptation layer: causal attention over the target's feature sequence, KV-cached.

    ``attention_mask`` ``(B, past + T)`` hides left padding from the real positions, so a padded row attends to
    what it would alone; a padding position still sees itself (a row with nothing to attend to would be NaN).
    """

    def forward(self, x: torch.Tensor, past=None, attention_mask: torch.Tensor | None = None):
        past_length = 0 if past is None else past[0].shape[2]
        length = x.shape[1]
        mask = torch.ones(length, past_length + length, dtype=torch.bool, device=x.device).tril(past_length)
        if attention_mask is not None:
            itself = torch.zeros_like(mask)
            itself[:, past_length:] = torch.eye(length, dtype=torch.bool, device=x.device)
            mask = (mask & attention_mask.to(x.device, torch.bool)[:, None, None, :]) | itself  # (B, 1, T, past + T)
        return super().forward(x, mask, past)


class AutoEmbeddingBlock(_SelfAttentionBlock):
    """Amphista's auto-embedding block: attention *among the K drafted positions* of one context position.

    Bi-directional (every position sees all others, near heads learn from far ones and back) unless
    ``bidirectional=False`` (causal among heads, the ablation).

    Example:
        >>> block = AutoEmbeddingBlock(16, 2, 32, bidirectional=True)
        >>> block(torch.randn(5, 4, 16)).shape
        torch.Size([5, 4, 16])
        >>> block.attention_mask(3, "cpu").tolist()
        [[True, True, True], [True, True, True], [True, True, True]]
    """

    def __init__(self, hidden_size: int, num_heads: int, intermediate_size: int, bidirectional: bool = True):
        super().__init__(hidden_size, num_heads, intermediate_size)
        self.bidirectional = bidirectional

    def attention_mask(self, num_positions: int, device) -> torch.Tensor:
        full = torch.ones(num_positions, num_positions, dtype=torch.bool, device=device)
        return full if self.bidirectional else full.tril()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, K, d)
        return super().forward(x, self.attention_mask(x.shape[1], x.device))[0]


class AmphistaHeads(DraftHeads):
    """Amphista: staged adaptation layers, then the auto-embedding block across the K drafted positions.

    For context position ``t``: ``z_t = W[h_t ; norm(E(x_{t+1}))]`` fuses the target's feature with the
    embedding of the token it chose next; ``num_stages`` causal adaptation layers turn the sequence ``z``
    into features fit for drafting several positions; position ``k`` starts from its stage's output plus a
    learned offset embedding ``e_k``; the auto-embedding block lets the K positions attend to each other;
    a zero-initialised output projection adds the result to ``h_t``, so fresh heads repeat the base's
    next-token guess, as fresh Medusa heads do. Details beyond "staged adaptation + bi-directional block"
    are not published; they are choices of this implementation.
    """

    config_class = AmphistaConfig
    uses_context = True

    def __init__(self, config: AmphistaConfig):
        super().__init__(config)
        d = config.hidden_size
        inner = config.intermediate_size or 2 * d
        self.embedding_norm = nn.RMSNorm(d)
        self.fuse = nn.Linear(2 * d, d, bias=False) if config.fuse_token_embedding else None
        self.stages = nn.ModuleList(AdaptationLayer(d, config.num_attention_heads, inner) for _ in range(config.num_stages))
        self.offset_embeddings = nn.Parameter(torch.zeros(config.num_heads, d))
        self.auto_embedding = AutoEmbeddingBlock(d, config.num_attention_heads, inner, config.bidirectional)
        self.output = nn.Linear(d, d, bias=False)
        self.post_init()

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        if module is self:
            nn.init.normal_(self.offset_embeddings, std=std)
            nn.init.zeros_(self.output.weight)

    @torch.no_grad()
    def initialise_from(self, model):
        super().initialise_from(model)
        self._init_weights(self)

    def features(self, hidden_states, next_tokens, base, past=None, draft_positions=slice(None), attention_mask=None):
        fused = hidden_states
        if self.fuse is not None:
            token_embeddings = self.embedding_norm(base.embeddings(next_tokens).to(hidden_states.dtype))
            fused = self.fuse(torch.cat([hidden_states, token_embeddings], dim=-1))
        stage_outputs, new_past = [], []
        x = fused
        for i, stage in enumerate(self.stages):
            x, stage_past = stage(x, None if past is None else past[i], attention_mask)
            stage_outputs.append(x[:, draft_positions])
            new_past.append(stage_past)
        queries = torch.stack(
            [stage_outputs[self.config.stage_of_head(k)] for k in range(self.config.num_heads)], dim=-2
        ) + self.offset_embeddings  # (B, T', K, d)
        batch, length, heads, width = queries.shape
        mixed = self.auto_embedding(queries.reshape(batch * length, heads, width)).view(batch, length, heads, width)
        return hidden_states[:, draft_positions].unsqueeze(-2) + self.output(mixed), new_past


_HEADS_CLASSES: dict[type, type[DraftHeads]] = {MedusaConfig: MedusaHeads, AmphistaConfig: AmphistaHeads}
_CLASS_BY_MODEL_TYPE = {config.model_type: heads for config, heads in _HEADS_CLASSES.items()}


def load_heads(source: str | os.PathLike | DraftHeads, **kwargs) -> DraftHeads:
    """Heads object, folder or Hub id → loaded heads (of whichever kind the config says)."""
    if isinstance(source, DraftHeads):
        return source
    return DraftHeads.from_pretrained(source, **kwargs)
