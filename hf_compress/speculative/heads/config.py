"""Configurations of drafting heads: Medusa (independent heads) and Amphista (heads that talk to each other).

Both are ``transformers`` configs (``config.json`` round-trips, ``push_to_hub`` works); the fields that tie
heads to a base model (``hidden_size``, ``vocab_size``, ``base_model_name_or_path``) are filled in by
:meth:`~.modeling.DraftHeads.for_model`.
"""

from __future__ import annotations

from transformers import PreTrainedConfig

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
    """

    model_type = "hf_compress_draft_heads"

    num_heads: int = 4
    hidden_size: int | None = None
    vocab_size: int | None = None
    base_model_name_or_path: str | None = None
    top_k: int = 10
    tree: list | None = None
    share_lm_head: bool = False
    loss_decay: float = 1.0
    initializer_range: float = 0.02
    training: dict | None = None  # what train_heads did (data, steps, seconds, loss), for the model card

    def __post_init__(self, **kwargs):
        if isinstance(self.num_heads, bool) or not isinstance(self.num_heads, int) or self.num_heads < 1:
            raise ValueError(f"num_heads must be an integer >= 1, got {self.num_heads!r}.")
        if self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}.")
        if not 0 < self.loss_decay <= 1:
            raise ValueError(f"loss_decay must lie in (0, 1], got {self.loss_decay}.")
        if self.tree is not None:
            self.tree = self.check_tree(self.tree).to_list()
        super().__post_init__(**kwargs)

    def check_tree(self, tree) -> DraftTree:
        """``tree`` as a :class:`DraftTree`, with a clear error if these heads cannot fill it."""
        tree = tree if isinstance(tree, DraftTree) else DraftTree(tree)
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
        if self.num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {self.num_layers}.")
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
        if self.num_stages < 1:
            raise ValueError(f"num_stages must be >= 1, got {self.num_stages}.")
        if self.stage_feeds not in ("staged", "last"):
            raise ValueError(f"stage_feeds must be 'staged' or 'last', got {self.stage_feeds!r}.")
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
