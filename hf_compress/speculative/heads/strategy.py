"""``Amphista``: decode with drafting heads (Amphista or Medusa) through ``generate(custom_generate=...)``."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transformers import PreTrainedModel
from transformers.cache_utils import DynamicLayer

from ... import _compat
from ...hub import hub_model_id
from ...utils import InvalidArgumentTypeError, get_logger
from ..acceptance import AcceptanceRule, StrictGreedy, TypicalAcceptance
from ..engine import check_rollback_cache
from ..strategies import HERE, SpeculativeDecoding, portable_name, register_strategy, usage_snippet
from ..tree import DraftTree
from .drafter import HeadsDrafter
from .modeling import DraftHeads, MedusaHeads, load_heads


if TYPE_CHECKING:
    from ...evaluation.results import MetricRecord


__all__ = ["Amphista"]

logger = get_logger(__name__)


@register_strategy
class Amphista(SpeculativeDecoding):
    """Tree speculative decoding with drafting heads: ``generate(custom_generate=Amphista(heads))``.

    Works with any :class:`~.modeling.DraftHeads` (Amphista or the Medusa baseline). Greedy calls are
    verified exactly: the output is token-for-token greedy ``generate()`` in float32 (in reduced precision,
    up to the numerics of multi-token verification; see :class:`~..acceptance.StrictGreedy`). Sampling calls use Medusa's
    typical acceptance (``posterior_threshold`` ε = 0.09, ``posterior_alpha`` δ = 0.3), which is faster
    but not distribution-exact. Trees are verified one sequence at a time; a chain (``tree="chain"``)
    also runs left-padded batches. On a model with sliding-window attention (Gemma 3) the tree's top-1 chain is
    verified instead once the sequence reaches the window.

    Args:
        heads: Trained heads, or a folder / Hub id to load them from (on the model's device and dtype).
        tree: ``None`` uses the heads' saved tree (``config.tree``) or, without one, the chain of every
            head's top-1; ``"chain"``; or a :class:`~..tree.DraftTree` / list of paths. Its depth must not
            exceed the number of heads, nor its ranks the heads' ``top_k``.

    Example:
        >>> out = model.generate(**inputs, custom_generate=Amphista("user/smollm2-amphista"))  # doctest: +SKIP
    """

    method = "amphista"

    def __init__(
        self,
        heads: DraftHeads | str | os.PathLike | None = None,
        *,
        tree: DraftTree | list | str | None = None,
        posterior_threshold: float = 0.09,
        posterior_alpha: float = 0.3,
    ):
        super().__init__(None)
        if heads is None:
            raise ValueError("Amphista drafts with trained heads: pass `heads=` (a DraftHeads, folder or Hub id).")
        if not isinstance(heads, (DraftHeads, str, os.PathLike)):
            raise InvalidArgumentTypeError(
                f"heads must be trained DraftHeads, a folder or a Hub id, got {type(heads).__name__}."
            )
        if isinstance(tree, str) and tree != "chain":
            raise ValueError(f"tree must be None, 'chain', a DraftTree or a list of paths; got {tree!r}.")
        if tree is not None and not isinstance(tree, (str, DraftTree)):
            try:
                DraftTree(tree)  # its shape now; its fit to the heads when they are known
            except (TypeError, ValueError) as err:
                raise type(err)(f"tree: {err}") from None
        TypicalAcceptance(posterior_threshold, posterior_alpha)  # validates now, not mid-generate
        self.heads = heads
        self.tree = tree.to_list() if isinstance(tree, DraftTree) else tree
        self.posterior_threshold = posterior_threshold
        self.posterior_alpha = posterior_alpha
        self._heads_source: str | None = None
        self._beside_model: str | None = None
        if isinstance(heads, DraftHeads):
            self.num_draft_tokens = self.draft_tree(heads).depth

    def draft_tree(self, heads: DraftHeads) -> DraftTree:
        """The tree this strategy drafts with these heads (checked against them)."""
        if self.tree == "chain" or (self.tree is None and heads.config.tree is None):
            return DraftTree.chain(heads.num_heads)
        return heads.config.check_tree(self.tree if self.tree is not None else heads.config.tree)

    def __call__(self, model, input_ids, logits_processor=None, stopping_criteria=None, generation_config=None,
                 synced_gpus: bool = False, **model_kwargs):
        # Refused before any forward (the engine would only find out at the first tree verification, mid-call).
        config = generation_config if generation_config is not None else model.generation_config
        rows = input_ids.shape[0]
        mask = model_kwargs.get("attention_mask")
        padded = mask is not None and not bool(mask.all())
        beams = (config.num_beams or 1) > 1  # refused by the checks every strategy makes
        verifies_tree = not beams and not self.drafter_for(model).tree.is_chain
        if (rows > 1 or padded) and verifies_tree:
            what = f"{rows} rows (a batch, or num_return_sequences)" if rows > 1 else "a left-padded row"
            raise ValueError(
                f"Amphista verifies a tree of drafts one sequence at a time (batch size 1, no padding), and this call "
                f"has {what}. Pass tree='chain' (Amphista(heads, tree='chain') verifies left-padded batches), or "
                "generate one prompt at a time."
            )
        cache = model_kwargs.get(_compat.cache_kwarg_name(model))
        layers = [layer for layer in getattr(cache, "layers", ()) if not isinstance(layer, DynamicLayer)]
        if layers and verifies_tree:
            check_rollback_cache(cache)  # a cache no strategy can roll back (static) is refused as such, not sent to the chain
            raise ValueError(
                f"Amphista's tree verification keeps the accepted branch by moving cache entries, which a "
                f"{type(layers[0]).__name__} cache layer ({type(cache).__name__}) cannot do. Pass tree='chain' "
                "(verified with any cache that can roll back), or leave the cache to generate()."
            )
        return super().__call__(model, input_ids, logits_processor, stopping_criteria, generation_config,
                                synced_gpus, **model_kwargs)

    def acceptance_rule(self, generation_config) -> AcceptanceRule:
        if generation_config.do_sample:
            return TypicalAcceptance(self.posterior_threshold, self.posterior_alpha)
        return StrictGreedy()

    def drafter_for(self, model: PreTrainedModel) -> HeadsDrafter:
        if not isinstance(self.heads, DraftHeads):
            logger.info("Loading drafting heads %s", self.heads)
            self.heads = load_heads(self.heads).to(model.device, model.dtype)
            self.heads.eval()
        self.heads.check_compatible(model)
        if next(self.heads.parameters()).device != model.device:
            raise ValueError(f"The heads are on {next(self.heads.parameters()).device} but the model is on {model.device}; move them first.")
        if self._drafter is None or self._drafter_target is not model:
            tree = self.draft_tree(self.heads)
            self.num_draft_tokens = tree.depth
            self._drafter = HeadsDrafter(self.heads, model, tree)
            self._drafter_target = model
        return self._drafter

    # ------------------------------------------------------------------ serialisation
    def settings(self) -> dict[str, Any]:
        return {"tree": self.tree, "posterior_threshold": self.posterior_threshold, "posterior_alpha": self.posterior_alpha}

    def to_dict(self) -> dict[str, Any]:
        heads = self._heads_source or (str(self.heads) if not isinstance(self.heads, DraftHeads) else self.heads.name_or_path)
        return {"method": self.method, **self.settings(), "heads": heads or None}

    @classmethod
    def from_settings(cls, settings: dict[str, Any]) -> Amphista:
        settings = {k: v for k, v in settings.items() if k not in ("draft_model", "tokenizer", "draft_tokenizer")}
        return cls(settings.pop("heads", None), **settings)

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        *,
        base_model: str | None = None,
        overwrite: bool = False,
        repo_id: str | None = None,
        metrics: Sequence[MetricRecord] = (),
        heads_source: str | None = None,
        save_heads_kwargs: dict[str, Any] | None = None,
        beside_model: str | None = None,
        base_weights: Mapping[str, Any] | None = None,
    ) -> Path:
        """The ``custom_generate`` folder, with the heads' config and weights when they are in memory.

        ``heads_source`` is where the saved ``generate.py`` loads the heads from: by default ``"."``, the
        folder or repo ``custom_generate=`` names when it runs (heads in memory; so the folder records no local
        path and works once pushed), or the name the heads were given. ``base_model`` defaults to the heads'
        base model (its Hub id); ``repo_id`` (the repo the card's code loads) and ``metrics`` (measured results
        for the card) as in :meth:`SpeculativeDecoding.save_pretrained`.

        ``beside_model``: the folder is a sub-folder of the folder of the model the heads draft for (a recipe's
        ``heads/`` beside its compressed model), and this is the code that loads that model and decodes with these
        heads (``custom_generate=<that folder>/<sub-folder>``, as that folder's card shows it). The card then shows
        it instead of loading ``base_model`` with ``custom_generate=<this folder>``, and says that the model is the
        one at the root of the repo.

        ``base_weights`` (the GGUF origin of a reference base model, which the card states) defaults to the one the
        heads recorded when they were built (``config.base_weights``).

        Example:
            >>> Amphista(heads).save_pretrained("smollm2-amphista")  # doctest: +SKIP
            >>> model.generate(ids, custom_generate="smollm2-amphista", trust_remote_code=True)  # doctest: +SKIP
        """
        if isinstance(self.heads, DraftHeads):
            heads_source = heads_source or HERE
            base_model = base_model or hub_model_id(self.heads.config.base_model_name_or_path)
            base_weights = base_weights or getattr(self.heads.config, "base_weights", None)
        self._heads_source, self._save_heads_kwargs = heads_source, save_heads_kwargs or {}
        self._beside_model = beside_model
        try:
            return super().save_pretrained(save_directory, base_model=base_model, overwrite=overwrite, repo_id=repo_id,
                                           metrics=metrics, base_weights=base_weights)
        finally:
            self._heads_source = self._beside_model = None

    def _check_saveable(self, settings: dict[str, Any]) -> None:
        if not settings["heads"]:
            raise ValueError("The heads have no name or path to record; save them first or pass heads_source=.")

    def _write_weights(self, folder: Path) -> None:
        if isinstance(self.heads, DraftHeads):
            config = self.heads.config
            base = config.base_model_name_or_path
            config.base_model_name_or_path = portable_name(base)  # never a local absolute path in config.json
            try:
                PreTrainedModel.save_pretrained(self.heads, folder, **self._save_heads_kwargs)
            finally:
                config.base_model_name_or_path = base

    def _save_kwargs_for_push(self, repo_id: str) -> dict[str, Any]:
        # Heads in memory are uploaded with the folder: the repo is where they load from. A reference (folder
        # or repo id) is recorded as is, and refused by push_to_hub if it is a local folder.
        return {"heads_source": repo_id} if isinstance(self.heads, DraftHeads) else {}

    def model_card(self, name: str, base_model: str | None, settings: dict[str, Any], *, repo_id: str | None = None,
                   metrics: Sequence[MetricRecord] = ()):
        from ...hub import build_model_card

        heads = self.heads if isinstance(self.heads, DraftHeads) else None
        kind = "medusa" if isinstance(heads, MedusaHeads) else "amphista"
        recipe = {"method": kind, "decoding": settings}
        if heads is not None:
            recipe["heads"] = {
                k: v for k, v in heads.config.to_diff_dict().items()
                # numbers, not a setting; base_weights goes to the card's compression.base_weights and its paragraph
                if k not in ("transformers_version", "architectures", "base_model_identity", "base_weights")
            }
            if "base_model_name_or_path" in recipe["heads"]:
                recipe["heads"]["base_model_name_or_path"] = portable_name(recipe["heads"]["base_model_name_or_path"])
            recipe["parameters"] = sum(p.numel() for p in heads.parameters())
        beside = getattr(self, "_beside_model", None)  # a sub-folder of the model's own folder (save_pretrained)
        return build_model_card(
            base_model=base_model, model_name=name, recipe=recipe, template="drafting_heads",
            extra_tags=["custom_generate", "speculative-decoding", "drafting-heads"], metrics=metrics,
            repo_id=repo_id or name,
            load_snippet=beside if beside is not None else usage_snippet(base_model, local=repo_id is None),
            pipeline_tag=None,  # not a model: pipeline("text-generation", model=<this repo>) cannot run it
            template_fields={"beside_model": beside is not None}, base_weights=getattr(self, "_base_weights", None),
        )
