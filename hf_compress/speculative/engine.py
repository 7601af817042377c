"""The one verification engine: draft → verify in one target forward → accept → roll the caches back.

Every strategy (strict/sampling speculative decoding, FLy, Medusa/Amphista heads) is a drafter plus an
acceptance rule run by :func:`speculative_decode`. The same :func:`verify_and_advance` step also speeds
up a draft *model* (FLy's multi-level acceleration), so the cut/crop logic exists once.

Batches (left-padded) advance in lock-step: each round every row emits ``m + 1`` tokens where ``m`` is
the smallest number of drafts any unfinished row accepted. A row that accepted more still emits its own
accepted draft at position ``m + 1``, so each row's output is exactly what the rule allows for that row
cut at ``m``; for the lossless rules that is the same text as decoding the row alone. Caches stay
rectangular (no per-row ragged crop), which is what makes batching cheap.

A draft can also be a *tree* of candidates (:class:`~.tree.DraftTree`, batch 1): every node is scored in
the same forward under a 4-D ancestor mask, the rule runs on each root-to-leaf path, and the KV entries
of the best path are moved into place before the crop.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field

import torch
from transformers import Cache, DynamicCache, PreTrainedModel, StaticCache
from transformers.cache_utils import CacheLayerMixin, DynamicLayer, StaticLayer
from transformers.generation import GenerateDecoderOnlyOutput

from .. import _compat
from ..modeling.layers import has_recurrent_state, keeps_recurrent_state
from ..utils import check_int, get_logger
from .acceptance import AcceptanceRule, Verdict
from .tree import DraftTree


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
    recurrent = [layer for layer in getattr(cache, "layers", ()) if keeps_recurrent_state(layer)]
    if recurrent and not _compat.records_recurrent_states(recurrent):
        import transformers

        release = _compat.RECURRENT_ROLLBACK_RELEASE
        raise ValueError(
            "Speculative decoding rolls the cache back after rejected drafts, and hf_compress rolls back recurrent "
            f"layers (Mamba, linear attention, short convolutions) with transformers {release} or newer, whose cache "
            f"records their states; {transformers.__version__} is installed. Upgrade with "
            f'pip install -U "transformers>={release}" (RecurrentGemma stays refused there: its cache cannot roll '
            "back), or decode this model with plain generate()."
        )
    # Layers say so themselves (transformers' quantized caches keep crop() but cannot undo their compressed states).
    uncroppable = {type(layer).__name__ for layer in getattr(cache, "layers", ()) if not _compat.cache_layer_is_croppable(layer)}
    if uncroppable:
        raise ValueError(
            f"Speculative decoding rolls the KV cache back after rejected drafts, which {type(cache).__name__}'s "
            f"{sorted(uncroppable)[0]} layers cannot do. Use the default dynamic cache (or hf_compress's SparKCache)."
        )


class CachedSequence:
    """One model's decoding state: its KV cache plus the attention mask of every token already in it.

    ``feed`` appends tokens and returns their logits; ``crop`` rolls back to a shorter prefix. Positions
    come from the mask (left padding), like ``generate()`` computes them; the mask is handed to the model
    only when the batch has padding, as ``generate()`` drops an all-ones mask.
    """

    def __init__(self, model: PreTrainedModel, cache: Cache | None = None, has_padding: bool = False,
                 rollback_tokens: int | None = None):
        self.model = model
        self.cache = cache if cache is not None else DynamicCache(config=model.config)
        check_rollback_cache(self.cache)
        self.has_recurrent_state = has_recurrent_state(self.cache)
        if hasattr(self.cache, "activate_past_recording"):
            # Sliding-window layers can then be cropped too, and recurrent layers (Mamba, linear attention) keep the
            # states of their last tokens: crop() removing ``rollback_tokens`` (the most one round can reject) goes
            # back to the state one step before those, so one more is kept. With exactly ``rollback_tokens``, a round
            # whose drafts were all rejected resumed from a wrong state on Qwen3-Next and OLMo-Hybrid (other tokens
            # than plain greedy decoding; Mamba's layers happened to be right).
            recurrent_states = rollback_tokens + 1 if self.has_recurrent_state and rollback_tokens else None
            _compat.activate_past_recording(self.cache, recurrent_states)
        # A model of recurrent layers only (Mamba) masks the padding of the tokens it is fed, and generate() hands it
        # the mask at the prefill only: its states carry the rest.
        layers = getattr(self.cache, "layers", ())
        self._masks_prefill_only = bool(layers) and not any(isinstance(layer, CacheLayerMixin) for layer in layers)
        self.has_padding = has_padding
        self.mask: torch.Tensor | None = None
        self._keeps_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
        self._cache_kwarg = _compat.cache_kwarg_name(model)
        # Drafters that read the target's features (Medusa/Amphista heads) ask for the final hidden states
        # of every fed token; they are taken from the decoder's output, before the vocabulary projection.
        self.capture_hidden_states = False
        self.hidden_states: torch.Tensor | None = None
        # The model attends within its sliding windows whatever the cache holds (a config-less DynamicCache() keeps
        # every token of a sliding layer): the windows its config declares bound tree verification too.
        _, layer_kwargs = _compat.cache_layer_types(model.config.get_text_config())
        self._config_window = min((kw["sliding_window"] for kw in layer_kwargs if kw.get("sliding_window")), default=None)

    @property
    def length(self) -> int:
        return 0 if self.mask is None else self.mask.shape[1]

    def feed(
        self,
        tokens: torch.Tensor,
        token_mask: torch.Tensor | None = None,
        num_logits: int = 1,
        tree: DraftTree | None = None,
    ) -> torch.Tensor:
        """Run the model on ``tokens`` (B, n) after the cached prefix; returns float logits (B, num_logits, V).

        With a ``tree``, the last ``tree.num_nodes`` tokens are its nodes (batch 1): they get the tree's
        ancestor mask and the positions ``root + depth``.
        """
        if token_mask is None:
            token_mask = torch.ones_like(tokens)
        token_mask = token_mask.to(tokens.device, torch.long)
        past = self.length
        self.mask = token_mask if self.mask is None else torch.cat([self.mask, token_mask], dim=1)
        positions = (self.mask.cumsum(-1) - 1).masked_fill(self.mask == 0, 0)[:, -tokens.shape[1] :]
        attention_mask = self.mask if self.has_padding and not (self._masks_prefill_only and past) else None
        if tree is not None:
            attention_mask, positions = self._tree_inputs(tokens, tree, past)
        inputs = dict(
            input_ids=tokens,
            attention_mask=attention_mask,
            position_ids=positions,
            use_cache=True,
        )
        inputs[self._cache_kwarg] = self.cache
        if self._keeps_logits:
            inputs["logits_to_keep"] = num_logits
        # get_decoder(): the module whose output feeds the lm_head (OPT's CausalLM skips its base_model wrapper).
        decoder = self.model.get_decoder() if self.capture_hidden_states else None
        hook = decoder.register_forward_hook(self._keep_hidden_states) if decoder is not None else None
        try:
            logits = self.model(**inputs).logits
        finally:
            if hook is not None:
                hook.remove()
        return logits[:, -num_logits:].float()

    def finish(self) -> None:
        """Hand the cache back as ``generate()`` does: sliding-window layers stop recording their past (kept for
        rollbacks), so that decoding on with the returned cache trims them to their window again."""
        for layer in getattr(self.cache, "layers", ()):
            if hasattr(layer, "record_past"):
                layer.record_past = False

    def _keep_hidden_states(self, module, args, output) -> None:
        self.hidden_states = output[0] if isinstance(output, tuple) else output.last_hidden_state

    @property
    def sliding_window(self) -> int | None:
        """The shortest sliding window among the model's layers and the cache's (``None``: every layer attends to
        and keeps every token)."""
        windows = [getattr(layer, "sliding_window", None) for layer in getattr(self.cache, "layers", ())]
        return min((w for w in [*windows, self._config_window] if w), default=None)

    def tree_fits(self, num_tokens: int) -> bool:
        """Whether ``num_tokens`` more (pending tokens and tree nodes) can be verified as a tree: every node must
        see every cached token, which a sliding-window layer stops keeping once the sequence reaches its window, and
        a recurrent layer's state runs through the tokens in order, not along a tree's branches."""
        window = self.sliding_window
        return not self.has_recurrent_state and (window is None or self.length + num_tokens < window)

    def _tree_inputs(self, tokens: torch.Tensor, tree: DraftTree, past: int) -> tuple[torch.Tensor, torch.Tensor]:
        if tokens.shape[0] != 1 or self.has_padding:
            raise ValueError("Tree drafts are verified one sequence at a time (batch size 1, no padding).")
        num_pending = tokens.shape[1] - tree.num_nodes
        window = self.sliding_window
        if window is not None and past + tokens.shape[1] >= window:  # as tree_fits (the tokens are in the mask now)
            raise ValueError(
                f"Tree verification needs every cached token visible, but this model's sliding window ({window}) "
                f"is shorter than the sequence ({past + tokens.shape[1]} tokens). Draft a chain instead (e.g. tree='chain')."
            )
        device = tokens.device
        positions = torch.cat([
            torch.arange(past, past + num_pending, device=device),
            past + num_pending - 1 + tree.depths.to(device),
        ]).unsqueeze(0)
        return tree.attention_mask(past, num_pending, self.model.dtype, device), positions

    def keep_tree_nodes(self, num_nodes: int, kept: torch.LongTensor) -> None:
        """Move the KV entries of the ``kept`` nodes (of the last ``num_nodes`` fed) into place, drop the rest."""
        for layer in getattr(self.cache, "layers", ()):
            if not isinstance(layer, DynamicLayer):
                raise ValueError(f"Tree verification cannot compact a {type(layer).__name__} cache layer.")
            start = layer.keys.shape[-2] - num_nodes  # the nodes are the last entries (sliding layers record them)
            source = start + kept.to(layer.keys.device)
            layer.keys[:, :, start : start + len(kept)] = layer.keys[:, :, source]
            layer.values[:, :, start : start + len(kept)] = layer.values[:, :, source]
        self.crop(self.length - num_nodes + len(kept))

    def crop(self, keep: int) -> None:
        """Keep the first ``keep`` tokens of the cache (a no-op crop still trims sliding-window layers)."""
        if keep > self.length:
            raise ValueError(f"Cannot crop a sequence of {self.length} tokens to {keep}.")
        try:
            self.cache.crop(-(self.length - keep))
        except TypeError as error:  # transformers' recurrent layers of a model that does not record what crop needs
            raise ValueError(
                f"{type(self.model).__name__}'s cache cannot be rolled back to an earlier token ({error}), which "
                "speculative decoding does after every rejected draft; decode this model with plain generate()."
            ) from error
        self.mask = self.mask[:, :keep]


@dataclass
class Step:
    """What one verification emitted: ``tokens`` (B, m + 1), their processed ``scores`` and raw ``logits``.

    ``hidden_states`` (B, kept, d), when the sequence captures them, are the target's final features of
    the tokens this step added to the cache (the pending ones, then the accepted drafts).
    """

    tokens: torch.LongTensor
    scores: torch.Tensor
    logits: torch.Tensor
    verdict: Verdict
    num_drafts: int
    hidden_states: torch.Tensor | None = None


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
    tree: DraftTree | None = None,
) -> Step:
    """One round: score ``[pending, drafts]`` in one forward, apply ``rule``, cut, crop the cache.

    ``pending`` are the tokens not yet in the cache (the last emitted token, or the whole prompt on the
    first round). ``context`` (the full sequence so far) is only needed by logits processors, which see
    each position's prefix as in ``generate()``. Rows where ``active`` is False do not limit the cut.
    With a ``tree``, ``drafts`` are its node tokens (batch 1) and the best root-to-leaf path is kept.
    """
    if tree is not None:
        return _verify_tree(sequence, pending, drafts, tree, rule, context=context, logits_processor=logits_processor)
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
    if getattr(rule, "reads_hidden_states", False):  # learned rules (CoSpec's arbiter) read the target's features
        if not sequence.capture_hidden_states:
            raise ValueError(f"{type(rule).__name__} reads the target's hidden states; the sequence must capture them.")
        verdict = rule.verify(drafts, scores, draft_probs, hidden_states=sequence.hidden_states[:, -(num_drafts + 1):])
    else:
        verdict = rule.verify(drafts, scores, draft_probs)
    accepted = verdict.num_accepted
    limiting = accepted if active is None else torch.where(active, accepted, num_drafts)
    cut = int(limiting.min())
    last = verdict.next_token
    if cut < num_drafts:  # rows that accepted more keep their own accepted draft here
        last = torch.where(accepted > cut, drafts[:, cut], verdict.next_token)
    tokens = torch.cat([drafts[:, :cut], last.unsqueeze(1)], dim=1)
    sequence.crop(start + pending.shape[1] + cut)
    hidden = None if not sequence.capture_hidden_states else sequence.hidden_states[:, : pending.shape[1] + cut]
    return Step(tokens, scores[:, : cut + 1], logits[:, : cut + 1], verdict, num_drafts, hidden)


def _verify_tree(sequence, pending, nodes, tree: DraftTree, rule: AcceptanceRule, *, context, logits_processor) -> Step:
    """Score every node of ``tree`` in one forward, run ``rule`` on each root-to-leaf path, keep the best."""
    num_pending, num_nodes = pending.shape[1], tree.num_nodes
    logits = sequence.feed(torch.cat([pending, nodes], dim=1), num_logits=num_nodes + 1, tree=tree)[0]
    paths = tree.paths_to_leaves.to(nodes.device)  # (P, D) node indices, -1 padded
    lengths = (paths >= 0).sum(dim=1)
    # Position 0 of a path is scored by the root (the last pending token), position i by the path's node i - 1.
    rows = torch.cat([paths.new_zeros(len(paths), 1), paths.clamp_min(0) + 1], dim=1)  # (P, D + 1)
    path_logits = logits[rows]
    path_tokens = nodes[0][paths.clamp_min(0)].masked_fill(paths < 0, 0)
    path_scores = path_logits
    if logits_processor:
        path_scores = path_logits.clone()
        for p in range(len(paths)):
            for i in range(int(lengths[p]) + 1):
                prefix = torch.cat([context, path_tokens[p : p + 1, :i]], dim=1)
                path_scores[p : p + 1, i] = logits_processor(prefix, path_scores[p : p + 1, i])
    verdict = rule.verify(path_tokens, path_scores)
    accepted = torch.minimum(verdict.num_accepted, lengths)
    best = int(accepted.argmax())  # greedy: every longest path emits the same tokens
    count = int(accepted[best])
    next_token = verdict.next_token[best : best + 1]
    if verdict.num_accepted[best] > count:  # the padding token happened to pass: decide at the leaf again
        next_token = rule.verify(path_tokens[best : best + 1, :count], path_scores[best : best + 1, : count + 1]).next_token
    kept = paths[best, :count]
    hidden = None
    if sequence.capture_hidden_states:
        states = sequence.hidden_states
        hidden = torch.cat([states[:, :num_pending], states[:, num_pending + kept]], dim=1)
    sequence.keep_tree_nodes(num_nodes, kept)
    tokens = torch.cat([path_tokens[best : best + 1, :count], next_token.view(1, 1)], dim=1)
    verdict = Verdict(accepted.new_tensor([count]), next_token.view(1))
    return Step(tokens, path_scores[best : best + 1, : count + 1], path_logits[best : best + 1, : count + 1],
                verdict, num_nodes, hidden)


@dataclass
class SpeculativeMetrics:
    """Counters of one ``generate()`` call (summed over unfinished rows where it says "tokens")."""

    target_forwards: int = 0
    draft_tokens_proposed: int = 0
    draft_tokens_accepted: int = 0  # drafts emitted (after the batch cut, none past a stop inside the round)
    draft_tokens_accepted_by_rule: int = 0  # before the batch cut and stops (equal at batch size 1 without a stop)
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


def propose_draft(drafter, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None,
                  max_tokens: int, active: torch.BoolTensor | None = None):
    """``drafter.propose(...)``, passing ``active`` (rows still generating) to drafters whose ``propose`` takes it.

    The keyword is optional so that drafters written for the two-method protocol keep working unchanged.

    Example:
        >>> from hf_compress.speculative import NgramDrafter
        >>> propose_draft(NgramDrafter(2), torch.tensor([[5, 6, 7, 5, 6]]), None, 2).tokens.tolist()
        [[7, 5]]
    """
    if active is not None and _takes_active(drafter):
        return drafter.propose(input_ids, attention_mask, max_tokens, active=active)
    return drafter.propose(input_ids, attention_mask, max_tokens)


def _takes_active(drafter) -> bool:
    try:
        return "active" in inspect.signature(drafter.propose).parameters
    except (TypeError, ValueError):  # a builtin or C-implemented propose: no signature to read
        return False


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
    Finished rows are filled with ``pad_token_id`` like ``generate()`` (when an EOS criterion is among the stopping
    criteria), and the returned cache holds every token but the last, as ``generate()``'s does (a finished row's
    padding included, fed again after the loop when a dynamic cache let the rounds feed it the row's own drafts). A
    finished row's scores and logits past its end are the rounds' (computed from its drafts, not from padding): the
    tokens they would choose are replaced by padding.
    """
    check_int("num_draft_tokens", num_draft_tokens, minimum=1)
    check = getattr(rule, "check_compatible", None)
    if callable(check):  # a learned rule (a CoSpec arbiter, its ArbiterRule) refuses a target it was not trained for
        check(model)
    if model.device.type != "meta" and input_ids.device != model.device:
        # generate() itself moves each forward's inputs and keeps its bookkeeping on theirs; here the rounds, the
        # drafters and the logits processors all work on the model's device.
        raise ValueError(f"The inputs are on {input_ids.device} but the model is on {model.device}: speculative decoding "
                         "runs on the model's device; move them there first (`inputs.to(model.device)`).")
    started = time.perf_counter()
    batch, prompt_length = input_ids.shape
    has_padding = attention_mask is not None and not bool(attention_mask.all())
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    target = CachedSequence(model, cache, has_padding, rollback_tokens=num_draft_tokens)
    cached = target.cache.get_seq_length()
    if cached:  # generate() was given a pre-filled cache: its tokens are the start of the prompt
        if cached >= prompt_length:
            raise ValueError("The cache already holds the whole prompt; pass at least one new token.")
        target.mask = attention_mask[:, :cached].long()
    pending, pending_mask = input_ids[:, cached:], attention_mask[:, cached:]
    # As generate(): finished rows are padded only when an EOS criterion can finish them (a custom criterion that
    # stops a row without EOS leaves its tokens as decoded).
    has_eos_criterion = any(hasattr(criterion, "eos_token_id") for criterion in stopping_criteria or ())
    pad = _compat.pad_token_tensor(generation_config) if has_eos_criterion else None
    max_length = generation_config.max_length
    # As generate(): scores and logits are kept only when a dict output will return them.
    returned = generation_config.return_dict_in_generate
    want_scores, want_logits = returned and generation_config.output_scores, returned and generation_config.output_logits
    scores_out, logits_out = [], []
    unfinished = torch.ones(batch, dtype=torch.bool, device=input_ids.device)
    # Where each row's padding starts once it stopped (-1: still decoding): see _refeed_padding below.
    first_pad = torch.full((batch,), -1, dtype=torch.long, device=input_ids.device)
    metrics = SpeculativeMetrics(rows=batch)
    drafter.reset()
    observe = getattr(drafter, "observe", None)  # drafters that read the target's features (heads)
    target.capture_hidden_states = observe is not None or bool(getattr(rule, "reads_hidden_states", False))
    chain_fallback = False  # whether trees are past the sliding window and verified as chains

    while True:
        budget = min(num_draft_tokens, max_length - input_ids.shape[1] - 1)
        draft_started = time.perf_counter()
        draft = propose_draft(drafter, input_ids, attention_mask, budget, unfinished) if budget > 0 else None
        metrics.drafting_time_s += time.perf_counter() - draft_started
        tree = draft.tree if draft is not None else None
        if tree is not None and tree.depth > budget:
            raise ValueError(f"The drafter proposed a tree of depth {tree.depth} for a budget of {budget} tokens.")
        if draft is None:
            drafts = input_ids.new_zeros(batch, 0)
        else:  # a tree's nodes are not a sequence to cut; its depth was checked against the budget
            drafts = draft.tokens if tree is not None else draft.tokens[:, :budget]
        probs = draft.probs[:, :budget] if draft is not None and draft.probs is not None else None
        if tree is not None and not target.tree_fits(pending.shape[1] + tree.num_nodes):
            # Past the sliding window a tree cannot be verified (every node must see the whole cache): verify its top-1
            # chain, without draft probabilities as for the tree. The sequence only grows: chains for the rest of the call.
            if not chain_fallback:
                if target.has_recurrent_state:
                    logger.info("%s keeps recurrent states, which run through tokens in order: verifying chains "
                                "instead of trees.", type(model).__name__)
                else:
                    logger.info("The sequence reached the model's sliding window (%d): verifying chains instead of "
                                "trees for the rest of this call.", target.sliding_window)
                chain_fallback = True
            drafts, tree, probs = draft.tokens[:, tree.top_chain.to(draft.tokens.device)], None, None
        step = verify_and_advance(
            target, pending, drafts, rule, pending_mask=pending_mask, context=input_ids,
            # A finished row's tokens are overwritten by padding, so it need not limit the cut; unpadded, it is
            # decoded on, as by generate(), and must stay exact.
            logits_processor=logits_processor, draft_probs=probs, active=unfinished if pad is not None else None,
            tree=tree,
        )
        if observe is not None:
            observe(step)
        metrics.target_forwards += 1
        active_rows = int(unfinished.sum())
        metrics.draft_tokens_proposed += step.num_drafts * active_rows
        metrics.draft_tokens_accepted_by_rule += int(step.verdict.num_accepted[unfinished].sum())

        finished_all = False
        appended = []
        for j in range(step.tokens.shape[1]):
            token = step.tokens[:, j]
            if pad is not None:
                token = torch.where(unfinished, token, pad.to(token.device))
            input_ids = torch.cat([input_ids, token.unsqueeze(1)], dim=1)
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(batch, 1)], dim=1)
            metrics.new_tokens += int(unfinished.sum())
            if j < step.tokens.shape[1] - 1:  # an accepted draft, counted only if emitted (not past a stop mid-round)
                metrics.draft_tokens_accepted += int(unfinished.sum())
            if want_scores:
                scores_out.append(step.scores[:, j])
            if want_logits:
                logits_out.append(step.logits[:, j])
            appended.append(token)
            stopped = unfinished & stopping_criteria(input_ids, step.scores[:, j])
            first_pad[stopped] = input_ids.shape[1]
            unfinished &= ~stopped
            if not unfinished.any():
                finished_all = True
                break
        if streamer is not None:  # a round's tokens arrive together (as in transformers' assisted generation)
            streamer.put(torch.stack(appended, dim=1).cpu())
        if finished_all:
            # Stopped inside a round: the cache holds the round's accepted drafts past the returned tokens. Keep what
            # generate()'s would (all but the last token), so out.past_key_values continues the conversation.
            if target.length > input_ids.shape[1] - 1:
                target.crop(input_ids.shape[1] - 1)
            if pad is not None:
                _refeed_padding(target, input_ids, attention_mask, first_pad)
            break
        pending, pending_mask = step.tokens[:, -1:], None

    drafter.reset()  # a draft model's cache, the heads' state: released now, not held until the next call
    target.finish()
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


def _refeed_padding(target: CachedSequence, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    first_pad: torch.Tensor) -> None:
    """Make the returned cache hold what ``generate()``'s holds for rows that stopped before the others: the padding
    after their end, fed as tokens. The rounds fed such a row its own drafts and verified tokens instead (only the
    returned sequence is padded), and a continuation that attends to those positions would read them. One forward
    over the tokens from the earliest such padding on. Left as the rounds made them: caches other than a
    ``DynamicCache`` (SparK's, whose crop is bounded by what it compressed), and a cache whose sliding-window layers
    have filled their window (they keep only its last tokens, so they cannot go back to the padding)."""
    cached = input_ids.shape[1] - 1  # generate()'s cache holds every token but the last
    stopped_early = (first_pad >= 0) & (first_pad < cached)
    if not bool(stopped_early.any()) or type(target.cache) is not DynamicCache or target.length != cached:
        return
    if target.has_recurrent_state or any(getattr(layer, "is_sliding", False) and
                                         layer.get_seq_length() >= layer.sliding_window for layer in target.cache.layers):
        logger.debug("rows that stopped early keep their own drafts in the returned cache: its sliding-window layers "
                     "hold only their window, its recurrent layers only their last states")
        return
    start = int(first_pad[stopped_early].min())
    target.crop(start)
    target.feed(input_ids[:, start:cached], attention_mask[:, start:cached], num_logits=1)
