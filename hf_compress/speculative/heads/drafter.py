"""``HeadsDrafter``: drafting from the target's own features, for the shared speculative engine."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from ..drafting import Draft
from ..engine import Step
from ..tree import DraftTree
from .modeling import BaseParts, DraftHeads, StagePast


__all__ = ["HeadsDrafter"]


class HeadsDrafter:
    """Drafts ``tree`` (or a chain) from Medusa/Amphista heads reading the target's final hidden states.

    The engine hands every verification :class:`~..engine.Step` to :meth:`observe` (with the features of
    the tokens it added to the cache); :meth:`propose` runs the heads on them. Amphista's adaptation stages
    keep their own KV cache, which only ever receives accepted positions, so it never needs a roll-back.
    The first round has no features yet and drafts nothing (that forward is the prompt's prefill).

    Example:
        >>> from hf_compress.assets import tiny_model
        >>> from hf_compress.speculative.heads import AmphistaConfig, AmphistaHeads, Amphista
        >>> model, tok = tiny_model("llama")
        >>> heads = AmphistaHeads.for_model(model, AmphistaConfig(num_heads=3))
        >>> ids = tok("hello hello", return_tensors="pt").input_ids
        >>> out = model.generate(ids, max_new_tokens=6, do_sample=False, custom_generate=Amphista(heads))
        >>> torch.equal(out, model.generate(ids, max_new_tokens=6, do_sample=False))
        True
    """

    def __init__(self, heads: DraftHeads, model: PreTrainedModel, tree: DraftTree):
        self.heads = heads
        self.base = BaseParts.of(model)
        self.tree = tree
        self.reset()

    def reset(self) -> None:
        self._past: StagePast | None = None
        self._unread: list[torch.Tensor] = []

    def observe(self, step: Step) -> None:
        self._unread.append(step.hidden_states)

    @torch.no_grad()
    def propose(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None, max_tokens: int) -> Draft | None:
        if not self._unread:
            return None
        hidden = torch.cat(self._unread, dim=1).to(self.heads.dtype)
        self._unread = []
        # The unread positions are the last ones before the newest token, which is what follows each of them.
        next_tokens = input_ids[:, -hidden.shape[1] :]
        if self.heads.uses_context:
            # The heads' context is every position before the newest token; its left padding must stay unseen.
            padding = None
            if attention_mask is not None and not bool(attention_mask.all()):
                # Only the positions the stages have seen: a cache pre-filled before generate() holds the first ones.
                seen = hidden.shape[1] + (0 if self._past is None else self._past[0][0].shape[2])
                padding = attention_mask[:, input_ids.shape[1] - 1 - seen : input_ids.shape[1] - 1]
            features, self._past = self.heads.features(hidden, next_tokens, self.base, self._past, slice(-1, None),
                                                       attention_mask=padding)
        else:
            features, _ = self.heads.features(hidden[:, -1:], next_tokens[:, -1:], self.base)
        tree = self.tree.truncated(max_tokens)
        logits = self.heads.project(features[:, 0, : tree.depth], self.base)  # (B, depth, V)
        if tree.is_chain:
            return Draft(logits.argmax(dim=-1))
        candidates = logits.topk(tree.max_rank + 1, dim=-1).indices
        return Draft(tree.node_tokens(candidates), tree=tree)
