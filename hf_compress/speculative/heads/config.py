"""Configurations of drafting heads: Medusa (independent heads) and Amphista (heads that talk to each other).

Both are ``transformers`` configs (``config.json`` round-trips, ``push_to_hub`` works); the fields that tie
heads to a base model (``hidden_size``, ``vocab_size``, ``base_model_name_or_path``, ``base_model_identity``,
``base_weights``) are filled in by :meth:`~.modeling.DraftHeads.for_model`.
"""

from __future__ import annotations

from transformers import PreTrainedConfig

from ...utils import InvalidArgumentTypeError, check_bool, check_choice, check_float, check_int, check_str
from ...modeling.identity import check_identity_field
from ..tree import DraftTree


__all__ = ["AmphistaConfig", "DraftHeadsConfig", "MedusaConfig"]


class DraftHeadsConfig(PreTrainedConfig):
    """What every kind of drafting heads shares.

    Args:
        num_heads: Future positions drafted per step (head ``k`` guesses the token ``k + 1`` after the
            target's own next token).
        top_k: Candidates kept per position when drafting a tree.
        tree: Default candidate tree (paths of candidate ranks, see :class:`~..tree.DraftTree`); ``None``
            drafts a chain of each head's top-1 guess.
        share_lm_head: Project with the frozen base ``lm_head`` (no vocabulary weights of their own) instead
            of one trained ``Linear(hidden, vocab)`` per head.
        loss_decay: Training weight of head ``k`` is ``loss_decay ** k`` (far heads matter less).
        base_model_identity: The base model's text model type and a few entries of its input embeddings (filled
            by ``for_model``), checked before decoding so heads trained for another model of the same shape are
            refused.
        base_weights: Where the base model's weights came from when it is a reference model (a GGUF de-quantized to
            float32: ``hf_compress.hub.base_weights_of``), filled by ``for_model`` and stated on the heads' card;
            ``None`` for any other base (and in folders saved before it was recorded).
    """

    model_type = "hf_compress_draft_heads"

    num_heads: int = 4
    hidden_size: int | None = None
    vocab_size: int | None = None
    base_model_name_or_path: str | None = None
    base_model_identity: dict | None = None
    base_weights: dict | None = None
    top_k: int = 10
    tree: list | None = None
    share_lm_head: bool = False
    loss_decay: float = 1.0
    initializer_range: float = 0.02
    training: dict | None = None  # what train_heads did (data, steps, seconds, loss), for the model card

    def __post_init__(self, **kwargs):
        check_int("num_heads", self.num_heads, minimum=1)
        check_int("top_k", self.top_k, minimum=1)
        for name in ("hidden_size", "vocab_size"):
            check_int(name, getattr(self, name), minimum=1, allow_none=True,
                      hint="DraftHeads.for_model(model, config) fills it from the base model.")
        check_str("base_model_name_or_path", self.base_model_name_or_path, allow_none=True)
        check_identity_field(self.base_model_identity)
        check_bool("share_lm_head", self.share_lm_head)
        self.loss_decay = check_float("loss_decay", self.loss_decay, low=0.0, high=1.0, low_open=True)
        self.initializer_range = check_float("initializer_range", self.initializer_range, low=0.0, low_open=True)
        for name in ("training", "base_weights"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), dict):
                raise InvalidArgumentTypeError(f"{name} must be a dict or None, got {type(getattr(self, name)).__name__}.")
        if self.tree is not None:
            self.tree = self.check_tree(self.tree).to_list()
        super().__post_init__(**kwargs)

    def check_tree(self, tree) -> DraftTree:
        """``tree`` as a :class:`DraftTree`, with a clear error if these heads cannot fill it."""
        if not isinstance(tree, DraftTree):
            try:
                tree = DraftTree(tree)
            except (TypeError, ValueError) as err:  # name the argument: DraftTree's own message says "paths"
                raise type(err)(f"tree: {err}") from None
        if tree.depth > self.num_heads:
            raise ValueError(
                f"The tree is {tree.depth} tokens deep but the heads draft only {self.num_heads} positions; "
                f"use a tree of depth <= {self.num_heads} (e.g. DraftTree.chain({self.num_heads}))."
            )
        if tree.max_rank >= self.top_k:
            raise ValueError(
                f"The tree uses candidate rank {tree.max_rank} but the heads keep top_k={self.top_k} candidates per "
                "position; raise top_k or use a narrower tree."
            )
        return tree


class MedusaConfig(DraftHeadsConfig):
    """Medusa-1 heads (Cai et al. 2024): ``num_layers`` ResBlocks then a vocabulary projection, per head.

    Defaults follow the released code: own projection per head (initialised from the base ``lm_head``),
    unweighted sum of the heads' losses.

    Example:
        >>> MedusaConfig(num_heads=3).share_lm_head
        False
    """

    model_type = "hf_compress_medusa"

    num_layers: int = 1

    def __post_init__(self, **kwargs):
        check_int("num_layers", self.num_layers, minimum=1)
        super().__post_init__(**kwargs)


class AmphistaConfig(DraftHeadsConfig):
    """Amphista heads (Li et al., NAACL 2025): staged adaptation layers + a bi-directional auto-embedding block.

    Args:
        num_stages: Causal adaptation layers run over the target's feature sequence (KV-cached when
            decoding). Stage ``s`` feeds the heads ``s·K/S … (s+1)·K/S - 1`` with ``stage_feeds="staged"``
            (near heads read early stages, far heads the last), or every head reads the last stage
            (``"last"``).
        num_attention_heads / intermediate_size: Width of the adaptation and auto-embedding blocks
            (``intermediate_size`` defaults to twice the hidden size).
        bidirectional: Full attention among the drafted positions (the paper's point); ``False`` is the
            causal ablation.
        fuse_token_embedding: Fuse the embedding of the token the target just chose into the features (the
            heads then know the root of the tree they draft).

    The vocabulary projection is the frozen base ``lm_head`` shared by all heads (``share_lm_head=True``):
    no 49k-row matrices to train per head, and one pass over the projection drafts every position at once.

    Example:
        >>> AmphistaConfig(num_heads=4).loss_decay
        0.8
    """

    model_type = "hf_compress_amphista"

    share_lm_head: bool = True
    loss_decay: float = 0.8
    num_stages: int = 2
    stage_feeds: str = "staged"
    num_attention_heads: int = 4
    intermediate_size: int | None = None
    bidirectional: bool = True
    fuse_token_embedding: bool = True

    def __post_init__(self, **kwargs):
        check_int("num_stages", self.num_stages, minimum=1)
        check_choice("stage_feeds", self.stage_feeds, ("staged", "last"))
        check_int("num_attention_heads", self.num_attention_heads, minimum=1)
        check_int("intermediate_size", self.intermediate_size, minimum=1, allow_none=True,
                  hint="None uses twice the hidden size.")
        check_bool("bidirectional", self.bidirectional)
        check_bool("fuse_token_embedding", self.fuse_token_embedding)
        check_int("hidden_size", self.hidden_size, minimum=1, allow_none=True)
        self.check_widths()
        super().__post_init__(**kwargs)

    def check_widths(self) -> None:
        """The attention blocks split ``hidden_size`` evenly across ``num_attention_heads``."""
        if self.hidden_size is not None and self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}; "
                "pick num_attention_heads that divides the base model's hidden size."
            )

    def stage_of_head(self, head: int) -> int:
        """Which adaptation stage feeds drafting position ``head`` (0-based)."""
        if self.stage_feeds == "last":
            return self.num_stages - 1
        return min(self.num_stages - 1, head * self.num_stages // self.num_heads)
