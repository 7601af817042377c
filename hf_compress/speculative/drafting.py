"""Drafters: cheap guesses of the next tokens, verified by the target in the engine.

A drafter has two methods: ``propose(input_ids, attention_mask, max_tokens)`` returns a :class:`Draft`
of at most ``max_tokens`` tokens per row (``input_ids`` is the full left-padded sequence so far), and
``reset()`` forgets any state before a new ``generate()`` call. Drafters keep their own caches and
re-synchronise by longest common prefix, so the engine never has to tell them what was accepted.
A ``propose`` that also takes ``active`` (keyword) is told which rows are still generating (:func:`~.engine.propose_draft`):
a batch row that has finished must not keep a confidence-stopped draft going.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from ..modeling.layers import has_recurrent_layers
from ..utils import InvalidArgumentTypeError, check_bool, check_float, check_int
from .acceptance import StrictGreedy
from .engine import CachedSequence, verify_and_advance
from .tree import DraftTree


@dataclass
class Draft:
    """``tokens`` (B, n) guessed tokens; ``probs`` (B, n, V) if they were sampled (else deterministic).

    With a ``tree`` (batch 1), ``tokens`` are the tree's node tokens in node order and the tree's depth,
    not ``n``, must fit the budget.
    """

    tokens: torch.LongTensor
    probs: torch.Tensor | None = None
    tree: DraftTree | None = None


class Drafter(Protocol):
    """Proposes drafts. A drafter may also define ``observe(step)``: the engine then captures the target's
    final hidden states and hands every :class:`~.engine.Step` to it (feature-reading drafters)."""

    def propose(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor, max_tokens: int) -> Draft: ...

    def reset(self) -> None: ...


def pad_rows(rows: list[torch.Tensor], like: torch.LongTensor, fill_from: torch.LongTensor) -> torch.LongTensor:
    """Stack token rows of different lengths; short rows are filled with a repeat of ``fill_from[b]``.

    The filler is only a (probably wrong) guess that verification rejects, so one row without a proposal
    does not stop the other rows of a batch from using theirs.
    """
    width = max((len(r) for r in rows), default=0)
    out = fill_from.unsqueeze(1).expand(len(rows), width).clone()
    for b, r in enumerate(rows):
        out[b, : len(r)] = r
    return out.to(like.device, like.dtype)


class NgramDrafter:
    """Prompt-lookup drafting: copy what followed an earlier occurrence of the context's last n tokens.

    For ``n`` from ``max_ngram_size`` down to ``min_ngram_size`` the *earliest* match wins (as FLy's code
    and transformers' prompt lookup do) and up to ``num_pred_tokens`` following tokens are proposed.
    ``reuse_last_proposal`` re-proposes the previous guess when nothing matches (FLy's multi-level drafter).

    Example:
        >>> d = NgramDrafter(max_ngram_size=2)
        >>> d.propose(torch.tensor([[5, 6, 7, 8, 5, 6]]), None, 2).tokens.tolist()
        [[7, 8]]
    """

    def __init__(
        self,
        max_ngram_size: int = 4,
        min_ngram_size: int = 1,
        num_pred_tokens: int | None = None,
        reuse_last_proposal: bool = False,
    ):
        check_int("max_ngram_size", max_ngram_size, minimum=1)
        check_int("min_ngram_size", min_ngram_size, minimum=1)
        if min_ngram_size > max_ngram_size:
            raise ValueError(f"min_ngram_size ({min_ngram_size}) is above max_ngram_size ({max_ngram_size}); the n-gram "
                             "search tries suffix lengths from max_ngram_size down to min_ngram_size.")
        check_int("num_pred_tokens", num_pred_tokens, minimum=1, allow_none=True)
        check_bool("reuse_last_proposal", reuse_last_proposal)
        self.max_ngram_size = max_ngram_size
        self.min_ngram_size = min_ngram_size
        self.num_pred_tokens = num_pred_tokens
        self.reuse_last_proposal = reuse_last_proposal
        self._last: list[torch.Tensor] = []

    def reset(self) -> None:
        self._last = []

    def lookup(self, tokens: torch.Tensor, max_tokens: int) -> torch.Tensor:
        """Proposal for one unpadded row (possibly empty)."""
        length = tokens.shape[0]
        for n in range(self.max_ngram_size, self.min_ngram_size - 1, -1):
            if length < 2 * n:  # earlier n-grams must end before the suffix starts
                continue
            windows = tokens[:-n].unfold(0, n, 1)  # every earlier n-gram, ending before the suffix itself
            hits = (windows == tokens[-n:]).all(dim=-1).nonzero()
            if hits.numel():
                start = int(hits[0]) + n
                return tokens[start : min(start + max_tokens, length)]
        return tokens[:0]

    def propose(self, input_ids, attention_mask, max_tokens) -> Draft:
        limit = max_tokens if self.num_pred_tokens is None else min(max_tokens, self.num_pred_tokens)
        rows = []
        for b in range(input_ids.shape[0]):
            row = input_ids[b] if attention_mask is None else input_ids[b][attention_mask[b].bool()]
            guess = self.lookup(row, limit)
            if not len(guess) and self.reuse_last_proposal and b < len(self._last):
                guess = self._last[b][:limit]
            rows.append(guess)
        self._last = rows
        return Draft(pad_rows(rows, input_ids, input_ids[:, -1]))


class ModelDrafter:
    """Greedy drafting with a smaller causal LM that shares the target's tokenizer.

    The draft model keeps its own KV cache across rounds and re-syncs by longest common prefix. With an
    ``accelerator`` (an :class:`NgramDrafter`) the draft model itself runs speculative greedy decoding —
    FLy's multi-level acceleration: n-gram guesses are checked by one draft forward, and the draft's own
    greedy output is unchanged.

    With a ``confidence_threshold`` the draft stops early, after the first token the draft model itself gives
    a probability below the threshold, as transformers' assisted generation does with
    ``assistant_confidence_threshold``. Drafting past an unsure token mostly produces tokens the target rejects,
    each costing a draft forward and a verified position. In a batch the draft ends once every row has drafted
    an unsure token (verification cuts a batch at its shortest accepted run anyway).

    Example:
        >>> from hf_compress.assets import tiny_model
        >>> draft, _ = tiny_model("llama", seed=1)
        >>> ModelDrafter(draft).propose(torch.tensor([[3, 4, 5]]), None, 4).tokens.shape
        torch.Size([1, 4])
        >>> ModelDrafter(draft, confidence_threshold=1.0).propose(torch.tensor([[3, 4, 5]]), None, 4).tokens.shape
        torch.Size([1, 1])
    """

    def __init__(self, draft_model: PreTrainedModel, accelerator: NgramDrafter | None = None, *,
                 confidence_threshold: float | None = None, vocab_size: int | None = None):
        if not isinstance(draft_model, PreTrainedModel):
            raise InvalidArgumentTypeError(
                f"draft_model must be a loaded causal LM (PreTrainedModel), got {type(draft_model).__name__}."
            )
        if accelerator is not None and not isinstance(accelerator, NgramDrafter):
            raise InvalidArgumentTypeError(f"accelerator must be an NgramDrafter or None, got {type(accelerator).__name__}.")
        if has_recurrent_layers(draft_model):
            # The draft goes back to its common prefix with the target each round, further than the states a
            # recurrent layer records; as the target, such a model is verified chain by chain.
            raise ValueError(
                f"{type(draft_model).__name__} keeps recurrent states (Mamba, linear attention or convolution layers), "
                "which cannot be rolled back as far as a draft model is; draft with an attention-only model or with "
                "n-grams (SpeculativeDecoding(num_draft_tokens=...) without a draft model)."
            )
        self.confidence_threshold = check_float(
            "confidence_threshold", confidence_threshold, low=0.0, high=1.0, allow_none=True,
            hint="The draft stops after a token it gives a lower probability; None drafts the full budget.")
        # The target's vocabulary size, when the draft's embedding is padded larger (same tokenizer, e.g. a 0.5B
        # Qwen2.5 drafting for the 7B): the draft never proposes a padding row the target has no logit for.
        self.vocab_size = check_int("vocab_size", vocab_size, minimum=1, allow_none=True)
        self._limit = self._within_target_vocabulary if vocab_size is not None else None
        self.draft_model = draft_model
        self.accelerator = accelerator
        self._greedy = StrictGreedy()
        self.reset()

    def reset(self) -> None:
        self._sequence: CachedSequence | None = None
        self._ids: torch.Tensor | None = None  # tokens whose keys/values are in the draft cache
        if self.accelerator is not None:
            self.accelerator.reset()

    def _resync(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor) -> int:
        """Crop the draft cache to its common prefix with ``input_ids``; return that length."""
        has_padding = attention_mask is not None and not bool(attention_mask.all())
        if self._sequence is None or self._ids.shape[0] != input_ids.shape[0]:
            # A config-less DynamicCache keeps every layer in full, sliding-window ones included: the draft
            # rolls back several rounds' worth of tokens, deeper than a trimmed sliding layer can.
            self._sequence = CachedSequence(self.draft_model, DynamicCache(), has_padding=has_padding)
            self._ids = input_ids[:, :0]
            return 0
        # Rows re-encoded for another tokenizer can become padded after the first round: mask from then on.
        self._sequence.has_padding |= has_padding
        common = min(self._ids.shape[1], input_ids.shape[1] - 1)  # at least one token must be re-fed
        differs = (self._ids[:, :common] != input_ids[:, :common]).any(dim=0).nonzero()
        if differs.numel():
            common = int(differs[0])
        self._sequence.crop(common)
        return common

    @torch.no_grad()
    def propose(self, input_ids, attention_mask, max_tokens, active=None) -> Draft:
        """Up to ``max_tokens`` greedy draft tokens per row; ``active`` (B,) marks the rows still generating: with a
        confidence threshold, finished rows count as unsure from the start, so only live rows keep a draft going."""
        device = self.draft_model.device
        input_ids = input_ids.to(device)
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device)
        common = self._resync(input_ids, mask)
        pending, pending_mask = input_ids[:, common:], mask[:, common:]
        produced = input_ids[:, :0]
        keep = max_tokens
        unsure_rows = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=device)  # rows that drafted an unsure token
        if active is not None:
            unsure_rows = ~active.to(device=device, dtype=torch.bool)
        while produced.shape[1] < keep:
            context = torch.cat([input_ids, produced], dim=1)
            guesses = input_ids[:, :0]
            room = max_tokens - produced.shape[1] - 1  # the draft forward adds one token of its own
            if self.accelerator is not None and room > 0:
                context_mask = torch.cat([mask, torch.ones_like(produced)], dim=1)
                guesses = self.accelerator.propose(context, context_mask, room).tokens
            step = verify_and_advance(self._sequence, pending, guesses, self._greedy, pending_mask=pending_mask,
                                      context=context, logits_processor=self._limit)
            if self.confidence_threshold is not None:
                unsure_rows, last = self._unsure_so_far(step.scores, unsure_rows)
                if last is not None:
                    keep = min(keep, produced.shape[1] + last + 1)
            produced = torch.cat([produced, step.tokens], dim=1)
            pending, pending_mask = step.tokens[:, -1:], None
        self._ids = torch.cat([input_ids, produced], dim=1)[:, : self._sequence.length]
        return Draft(produced[:, :keep])

    def _within_target_vocabulary(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if scores.shape[-1] <= self.vocab_size:
            return scores
        return scores.index_fill(-1, torch.arange(self.vocab_size, scores.shape[-1], device=scores.device), -math.inf)

    def _unsure_so_far(self, scores: torch.Tensor, unsure_rows: torch.Tensor) -> tuple[torch.Tensor, int | None]:
        """Rows that have drafted an unsure token after this step's tokens, and the index of the step's token at which
        every row first has (``None`` while some row is still sure of all its tokens)."""
        confidence = torch.softmax(scores.float(), dim=-1).amax(dim=-1)  # greedy: the chosen token's probability
        so_far = (confidence < self.confidence_threshold).cummax(dim=1).values | unsure_rows[:, None]  # (B, n)
        done = so_far.all(dim=0).nonzero()
        return so_far[:, -1], (int(done[0]) if done.numel() else None)


class CrossTokenizerDrafter:
    """Drafting with a model whose tokenizer differs from the target's, through text.

    Each round the target's tokens are decoded to text and re-encoded for the draft model (whose cache
    still re-syncs by common prefix), the draft continues greedily, and its new text is encoded with the
    target tokenizer — the same token re-alignment idea as transformers' universal assisted generation.
    The last re-encoded token is dropped when there are several, since it may be a cut word. Verification
    keeps the output exact; a bad alignment only costs acceptance.

    Example:
        >>> drafter = CrossTokenizerDrafter(draft_model, target_tokenizer, draft_tokenizer)  # doctest: +SKIP
    """

    def __init__(
        self,
        draft_model: PreTrainedModel,
        target_tokenizer: PreTrainedTokenizerBase,
        draft_tokenizer: PreTrainedTokenizerBase,
        accelerator: NgramDrafter | None = None,
        *,
        confidence_threshold: float | None = None,
    ):
        for name, tokenizer in (("target_tokenizer", target_tokenizer), ("draft_tokenizer", draft_tokenizer)):
            if not isinstance(tokenizer, PreTrainedTokenizerBase):
                raise InvalidArgumentTypeError(
                    f"{name} must be a loaded tokenizer (PreTrainedTokenizerBase), got {type(tokenizer).__name__}."
                )
        self.inner = ModelDrafter(draft_model, accelerator, confidence_threshold=confidence_threshold)
        self.target_tokenizer = target_tokenizer
        self.draft_tokenizer = draft_tokenizer

    def reset(self) -> None:
        self.inner.reset()

    def propose(self, input_ids, attention_mask, max_tokens, active=None) -> Draft:
        texts = [
            self.target_tokenizer.decode(
                row if attention_mask is None else row[attention_mask[b].bool()], skip_special_tokens=True
            )
            for b, row in enumerate(input_ids)
        ]
        if len(texts) == 1:
            encoded = self.draft_tokenizer(texts, return_tensors="pt")
        else:
            if self.draft_tokenizer.pad_token_id is None:
                raise ValueError(
                    "Batched cross-tokenizer drafting pads the draft's inputs: give the draft tokenizer a pad token "
                    "(e.g. `draft_tokenizer.pad_token = draft_tokenizer.eos_token`)."
                )
            encoded = self.draft_tokenizer(texts, return_tensors="pt", padding=True, padding_side="left")
        draft = self.inner.propose(encoded["input_ids"], encoded["attention_mask"], max_tokens, active=active)
        rows = []
        for b, new in enumerate(draft.tokens.tolist()):
            context = encoded["input_ids"][b][encoded["attention_mask"][b].bool()].tolist()
            text = continuation_text(self.draft_tokenizer, context, new)
            ids = continuation_ids(self.target_tokenizer, texts[b], text)
            ids = ids[:-1] if len(ids) > 1 else ids
            rows.append(torch.tensor(ids[:max_tokens], dtype=torch.long, device=input_ids.device))
        return Draft(pad_rows(rows, input_ids, input_ids[:, -1]))


# How much context the new tokens are decoded / re-encoded with: enough for the seam, a small fraction of a long prompt.
_SEAM_TOKENS, _SEAM_CHARACTERS = 8, 64


def continuation_text(tokenizer: PreTrainedTokenizerBase, context: list[int], new: list[int]) -> str:
    """The text the token ids ``new`` add after ``context``: decoded with the context's last tokens, whose own text is
    then cut off. Decoded alone, a SentencePiece tokenizer drops the space before the first new word.

    Example:
        >>> from hf_compress.assets import tiny_tokenizer
        >>> tokenizer = tiny_tokenizer()
        >>> continuation_text(tokenizer, tokenizer("the cat")["input_ids"], tokenizer(" sat")["input_ids"])
        ' sat'
    """
    context = context[-_SEAM_TOKENS:]
    before = tokenizer.decode(context, skip_special_tokens=True)
    both = tokenizer.decode(context + new, skip_special_tokens=True)
    return both[len(before):] if both.startswith(before) else tokenizer.decode(new, skip_special_tokens=True)


def continuation_ids(tokenizer: PreTrainedTokenizerBase, context: str, text: str) -> list[int]:
    """``tokenizer``'s ids for ``text`` where it continues the text ``context``: encoded with the context's tail,
    whose own ids are then cut off (a tokenizer that marks the first word of a text, as SentencePiece's prefix space
    does, would otherwise encode the continuation as a text of its own). Where the seam merges a context token with
    the new text, ``text`` is encoded alone.

    Example:
        >>> from hf_compress.assets import tiny_tokenizer
        >>> tokenizer = tiny_tokenizer()
        >>> tokenizer.decode(continuation_ids(tokenizer, "the cat", " sat"))
        ' sat'
    """
    tail = context[-_SEAM_CHARACTERS:]
    before = tokenizer(tail, add_special_tokens=False)["input_ids"]
    both = tokenizer(tail + text, add_special_tokens=False)["input_ids"]
    if both[: len(before)] == before:
        return both[len(before):]
    return tokenizer(text, add_special_tokens=False)["input_ids"]
