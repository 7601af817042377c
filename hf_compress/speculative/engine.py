"""The one verification engine: draft → verify in one target forward → accept → roll the caches back.

Every strategy (strict/sampling speculative decoding, FLy, the Amphista heads next) is a drafter plus an
acceptance rule run by :func:`speculative_decode`. The same :func:`verify_and_advance` step also speeds
up a draft *model* (FLy's multi-level acceleration), so the cut/crop logic exists once.

Batches (left-padded) advance in lock-step: each round every row emits ``m + 1`` tokens where ``m`` is
the smallest number of drafts any unfinished row accepted. A row that accepted more still emits its own
accepted draft at position ``m + 1``, so each row's output is exactly what the rule allows for that row
cut at ``m``; for the lossless rules that is the same text as decoding the row alone. Caches stay
rectangular (no per-row ragged crop), which is what makes batching cheap.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field

import torch
from transformers import Cache, DynamicCache, PreTrainedModel, StaticCache
from transformers.cache_utils import StaticLayer
from transformers.generation import GenerateDecoderOnlyOutput

from ..utils import get_logger
from .acceptance import AcceptanceRule, Verdict


logger = get_logger(__name__)


def check_rollback_cache(cache: Cache) -> None:
    """Raise a clear error for caches that cannot be cropped back after a rejected draft."""
    if isinstance(cache, StaticCache) or any(isinstance(layer, StaticLayer) for layer in getattr(cache, "layers", ())):
        raise ValueError(
            "Speculative decoding rolls the KV cache back after rejected drafts, which a static cache cannot do. "
            "Use the default dynamic cache (drop `cache_implementation='static'` / the StaticCache you passed)."
        )
    if not hasattr(cache, "crop"):
        raise ValueError(f"{type(cache).__name__} has no `crop`; speculative decoding needs a cache that can roll back.")


class CachedSequence:
    """One model's decoding state: its KV cache plus the attention mask of every token already in it.

    ``feed`` appends tokens and returns their logits; ``crop`` rolls back to a shorter prefix. Positions
    come from the mask (left padding), like ``generate()`` computes them; the mask is handed to the model
    only when the batch has padding, as ``generate()`` drops an all-ones mask.
    """

    def __init__(self, model: PreTrainedModel, cache: Cache | None = None, has_padding: bool = False):
        self.model = model
        self.cache = cache if cache is not None else DynamicCache(config=model.config)
        check_rollback_cache(self.cache)
        if hasattr(self.cache, "activate_past_recording"):
            self.cache.activate_past_recording()  # sliding-window layers can then be cropped too
        self.has_padding = has_padding
        self.mask: torch.Tensor | None = None
        self._keeps_logits = "logits_to_keep" in inspect.signature(model.forward).parameters

    @property
    def length(self) -> int:
        return 0 if self.mask is None else self.mask.shape[1]

    def feed(self, tokens: torch.Tensor, token_mask: torch.Tensor | None = None, num_logits: int = 1) -> torch.Tensor:
        """Run the model on ``tokens`` (B, n) after the cached prefix; returns float logits (B, num_logits, V)."""
        if token_mask is None:
            token_mask = torch.ones_like(tokens)
        token_mask = token_mask.to(tokens.device, torch.long)
        self.mask = token_mask if self.mask is None else torch.cat([self.mask, token_mask], dim=1)
        positions = (self.mask.cumsum(-1) - 1).masked_fill(self.mask == 0, 0)[:, -tokens.shape[1] :]
        inputs = dict(
            input_ids=tokens,
            attention_mask=self.mask if self.has_padding else None,
            position_ids=positions,
            past_key_values=self.cache,
            use_cache=True,
        )
        if self._keeps_logits:
            inputs["logits_to_keep"] = num_logits
        logits = self.model(**inputs).logits
        return logits[:, -num_logits:].float()

    def crop(self, keep: int) -> None:
        """Keep the first ``keep`` tokens of the cache (a no-op crop still trims sliding-window layers)."""
        if keep > self.length:
            raise ValueError(f"Cannot crop a sequence of {self.length} tokens to {keep}.")
        self.cache.crop(-(self.length - keep))
        self.mask = self.mask[:, :keep]


@dataclass
class Step:
    """What one verification emitted: ``tokens`` (B, m + 1), their processed ``scores`` and raw ``logits``."""

    tokens: torch.LongTensor
    scores: torch.Tensor
    logits: torch.Tensor
    verdict: Verdict
    num_drafts: int


def verify_and_advance(
    sequence: CachedSequence,
    pending: torch.LongTensor,
    drafts: torch.LongTensor,
    rule: AcceptanceRule,
    *,
    pending_mask: torch.Tensor | None = None,
    context: torch.LongTensor | None = None,
    logits_processor=None,
    draft_probs: torch.Tensor | None = None,
    active: torch.BoolTensor | None = None,
) -> Step:
    """One round: score ``[pending, drafts]`` in one forward, apply ``rule``, cut, crop the cache.

    ``pending`` are the tokens not yet in the cache (the last emitted token, or the whole prompt on the
    first round). ``context`` (the full sequence so far) is only needed by logits processors, which see
    each position's prefix as in ``generate()``. Rows where ``active`` is False do not limit the cut.
    """
    num_drafts = drafts.shape[1]
    start = sequence.length
    draft_mask = torch.ones_like(drafts)
    step_mask = None if pending_mask is None else torch.cat([pending_mask.to(drafts.device), draft_mask], dim=1)
    logits = sequence.feed(torch.cat([pending, drafts], dim=1), step_mask, num_logits=num_drafts + 1)
    scores = logits
    if logits_processor:
        scores = logits.clone()
        for i in range(num_drafts + 1):
            scores[:, i] = logits_processor(torch.cat([context, drafts[:, :i]], dim=1), scores[:, i])
    verdict = rule.verify(drafts, scores, draft_probs)
    accepted = verdict.num_accepted
    limiting = accepted if active is None else torch.where(active, accepted, num_drafts)
    cut = int(limiting.min())
    last = verdict.next_token
    if cut < num_drafts:  # rows that accepted more keep their own accepted draft here
        last = torch.where(accepted > cut, drafts[:, cut], verdict.next_token)
    tokens = torch.cat([drafts[:, :cut], last.unsqueeze(1)], dim=1)
    sequence.crop(start + pending.shape[1] + cut)
    return Step(tokens, scores[:, : cut + 1], logits[:, : cut + 1], verdict, num_drafts)


@dataclass
class SpeculativeMetrics:
    """Counters of one ``generate()`` call (summed over unfinished rows where it says "tokens")."""

    target_forwards: int = 0
    draft_tokens_proposed: int = 0
    draft_tokens_accepted: int = 0  # drafts emitted (after the batch cut)
    draft_tokens_accepted_by_rule: int = 0  # before the batch cut (equal at batch size 1)
    new_tokens: int = 0
    rows: int = 1
    wall_time_s: float = 0.0
    drafting_time_s: float = 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens emitted per target forward, per row (1.0 = no speed-up possible)."""
        return self.new_tokens / max(1, self.target_forwards * self.rows)

    @property
    def acceptance_rate(self) -> float:
        return self.draft_tokens_accepted / max(1, self.draft_tokens_proposed)

    def to_dict(self) -> dict:
        return {
            **{k: getattr(self, k) for k in self.__dataclass_fields__},
            "mean_accepted_length": self.mean_accepted_length,
            "acceptance_rate": self.acceptance_rate,
            "tokens_per_s": self.new_tokens / self.wall_time_s if self.wall_time_s else None,
        }


@dataclass
class SpeculativeDecodingOutput(GenerateDecoderOnlyOutput):
    """``GenerateDecoderOnlyOutput`` plus the call's :class:`SpeculativeMetrics`."""

    metrics: SpeculativeMetrics | None = field(default=None)


def speculative_decode(
    model: PreTrainedModel,
    input_ids: torch.LongTensor,
    drafter,
    rule: AcceptanceRule,
    num_draft_tokens: int,
    *,
    generation_config,
    logits_processor=None,
    stopping_criteria=None,
    attention_mask: torch.Tensor | None = None,
    cache: Cache | None = None,
    streamer=None,
) -> tuple[torch.LongTensor, SpeculativeMetrics, dict]:
    """Decode until the stopping criteria hold, drafting with ``drafter`` and verifying with ``rule``.

    Returns the full sequences (prompt + new tokens), the metrics, and the per-token ``scores``/``logits``
    tuples (filled only if ``generation_config.output_scores``/``output_logits``), as ``generate()`` does.
    Finished rows are filled with ``pad_token_id`` like ``generate()``.
    """
    started = time.perf_counter()
    batch, prompt_length = input_ids.shape
    has_padding = attention_mask is not None and not bool(attention_mask.all())
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    target = CachedSequence(model, cache, has_padding)
    cached = target.cache.get_seq_length()
    if cached:  # generate() was given a pre-filled cache: its tokens are the start of the prompt
        if cached >= prompt_length:
            raise ValueError("The cache already holds the whole prompt; pass at least one new token.")
        target.mask = attention_mask[:, :cached].long()
    pending, pending_mask = input_ids[:, cached:], attention_mask[:, cached:]
    pad = getattr(generation_config, "_pad_token_tensor", None)
    max_length = generation_config.max_length
    want_scores, want_logits = generation_config.output_scores, generation_config.output_logits
    scores_out, logits_out = [], []
    unfinished = torch.ones(batch, dtype=torch.bool, device=input_ids.device)
    metrics = SpeculativeMetrics(rows=batch)
    drafter.reset()

    while True:
        budget = min(num_draft_tokens, max_length - input_ids.shape[1] - 1)
        draft_started = time.perf_counter()
        draft = drafter.propose(input_ids, attention_mask, budget) if budget > 0 else None
        metrics.drafting_time_s += time.perf_counter() - draft_started
        drafts = draft.tokens[:, :budget] if draft is not None else input_ids.new_zeros(batch, 0)
        probs = draft.probs[:, :budget] if draft is not None and draft.probs is not None else None
        step = verify_and_advance(
            target, pending, drafts, rule, pending_mask=pending_mask, context=input_ids,
            logits_processor=logits_processor, draft_probs=probs, active=unfinished,
        )
        metrics.target_forwards += 1
        active_rows = int(unfinished.sum())
        metrics.draft_tokens_proposed += step.num_drafts * active_rows
        metrics.draft_tokens_accepted += (step.tokens.shape[1] - 1) * active_rows
        metrics.draft_tokens_accepted_by_rule += int(step.verdict.num_accepted[unfinished].sum())

        finished_all = False
        for j in range(step.tokens.shape[1]):
            token = step.tokens[:, j]
            if pad is not None:
                token = torch.where(unfinished, token, pad.to(token.device))
            input_ids = torch.cat([input_ids, token.unsqueeze(1)], dim=1)
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(batch, 1)], dim=1)
            metrics.new_tokens += int(unfinished.sum())
            if want_scores:
                scores_out.append(step.scores[:, j])
            if want_logits:
                logits_out.append(step.logits[:, j])
            if streamer is not None:
                streamer.put(token.cpu())
            unfinished &= ~stopping_criteria(input_ids, step.scores[:, j])
            if not unfinished.any():
                finished_all = True
                break
        if finished_all:
            break
        pending, pending_mask = step.tokens[:, -1:], None

    if streamer is not None:
        streamer.end()
    metrics.wall_time_s = time.perf_counter() - started
    logger.debug(
        "speculative decoding: %d new tokens in %d target forwards (%.2f per forward per row), "
        "%d/%d drafts accepted, %.2f s",
        metrics.new_tokens, metrics.target_forwards, metrics.mean_accepted_length,
        metrics.draft_tokens_accepted, metrics.draft_tokens_proposed, metrics.wall_time_s,
    )
    extras = {"scores": tuple(scores_out) if want_scores else None, "logits": tuple(logits_out) if want_logits else None}
    return input_ids, metrics, extras
