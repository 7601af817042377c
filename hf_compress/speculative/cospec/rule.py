"""``ArbiterRule``: CoSpec's acceptance rule — exact matches pass, the arbiter decides each mismatch.

Per row, drafts are walked left to right: a draft equal to the target's argmax is kept; at a mismatch the
arbiter says DRAFT (keep the draft token; the target's later logits were computed with it in the context,
so verification simply goes on, as for FLy's accepted mismatches) or TARGET (emit the target's token, end
the round). A draft token the logits processors ban (score ``-inf``: ``bad_words_ids``, EOS under
``min_new_tokens``) is never kept, and such a mismatch is no decision of the arbiter's (not logged). If every
draft is kept the target's bonus token follows. It runs inside the shared engine
(:func:`~..engine.verify_and_advance`), which hands it the target's final hidden states.

Modes: ``"policy"`` (DRAFT iff P(DRAFT) > threshold; the knob), ``"sample"`` (DRAFT with probability
P(DRAFT): the RL rollouts), ``"strict"`` (never DRAFT: exactly strict verification, greedy-identical) and
``"accept"`` (always DRAFT: every draft token is kept). A :class:`DecisionLog` records the decisions that
took effect, with their features, for training.

Example:
    >>> from hf_compress.assets import tiny_model
    >>> from hf_compress.speculative.cospec import CoSpecArbiter
    >>> arbiter = CoSpecArbiter.for_model(tiny_model("llama")[0])
    >>> logits = torch.eye(256)[[1, 2, 0]].unsqueeze(0) * 5           # target: 1, 2, then bonus 0
    >>> hidden = torch.zeros(1, 3, 64)
    >>> ArbiterRule(arbiter, mode="accept").verify(torch.tensor([[1, 7]]), logits, hidden_states=hidden).num_accepted.tolist()
    [2]
    >>> ArbiterRule(arbiter, mode="strict").verify(torch.tensor([[1, 7]]), logits).next_token.tolist()
    [2]
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ...utils import InvalidArgumentTypeError, check_choice, check_float
from ..acceptance import Verdict, emittable, leading_true_count, token_at
from .features import logit, mismatch_features

__all__ = ["MODES", "ArbiterRule", "Decision", "DecisionLog"]

MODES = ("policy", "sample", "strict", "accept")


@dataclass
class Decision:
    """One mismatch where the arbiter's answer took effect (before the row's cut)."""

    features: torch.Tensor  # (F,)
    keep_draft: bool
    draft_token: int
    target_token: int
    index: int  # position in the round's drafts
    context: torch.LongTensor | None  # the sequence when the round was drafted (row 0), if a drafter reported it


@dataclass
class DecisionLog:
    """Decisions of batch row 0, in order; ``context`` is set by the strategy's drafter wrapper each round, and
    the strategy drops (:meth:`drop_past`) those that did not take effect: in a batch, those past the round's cut
    (the row that accepted fewest drafts ends every row's round), and after each ``generate()`` call those past where
    row 0 stopped."""

    decisions: list[Decision] = field(default_factory=list)
    context: torch.LongTensor | None = None
    rounds: int = 0

    def clear(self) -> None:
        self.decisions.clear()
        self.context = None
        self.rounds = 0

    def drop_past(self, length: int, since: int = 0) -> None:
        """Forget the decisions (from the ``since``-th on) at or past position ``length`` of the sequence.

        A round's decisions are logged when it is verified, but the row can stop inside the round (EOS, a stop
        string): what lies past its last emitted token never took effect, so it must not be trained on.
        """
        self.decisions[since:] = [d for d in self.decisions[since:]
                                  if d.context is None or len(d.context) + d.index < length]


class ArbiterRule:
    """The arbiter as an ``AcceptanceRule`` (see the module docstring for the walk and the modes).

    Args:
        arbiter: A :class:`~.modeling.CoSpecArbiter`.
        threshold: P(DRAFT) above which a mismatch keeps the draft token (``"policy"`` mode); default the
            arbiter's ``config.threshold``. ``1.0`` = strict, ``0.0`` = keep every draft.
        mode: ``"policy"``, ``"sample"``, ``"strict"`` or ``"accept"``.
        log: A :class:`DecisionLog` to append the effective decisions to (training).
        generator: Random generator for ``"sample"``.
    """

    def __init__(self, arbiter, threshold: float | None = None, mode: str = "policy",
                 log: DecisionLog | None = None, generator: torch.Generator | None = None):
        from .modeling import CoSpecArbiter

        if not isinstance(arbiter, CoSpecArbiter):
            raise InvalidArgumentTypeError(f"arbiter must be a CoSpecArbiter, got {type(arbiter).__name__}.")
        check_choice("mode", mode, MODES)
        threshold = arbiter.config.threshold if threshold is None else threshold
        check_float("threshold", threshold, low=0.0, high=1.0, hint="1.0 = strict verification, 0.0 = keep every draft.")
        if log is not None and not isinstance(log, DecisionLog):
            raise InvalidArgumentTypeError(f"log must be a DecisionLog or None, got {type(log).__name__}.")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise InvalidArgumentTypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}.")
        self.arbiter = arbiter
        self.threshold = float(threshold)
        self.mode = mode
        self.log = log
        self.generator = generator

    @property
    def keeps_nothing(self) -> bool:
        """Whether no mismatch can keep its draft token (strict mode, or ``threshold=1.0``: P(DRAFT) never exceeds 1)
        — then the arbiter and its features are not computed unless a log asks for them."""
        return self.mode == "strict" or (self.mode == "policy" and self.threshold >= 1.0)

    @property
    def consults_arbiter(self) -> bool:
        """Whether a mismatch's verdict comes from the arbiter (the learned modes, unless nothing can be kept)."""
        return self.mode in ("policy", "sample") and not self.keeps_nothing

    @property
    def reads_hidden_states(self) -> bool:
        # The fixed modes still read them when logging, so logged features match what "policy" would see.
        return self.arbiter.config.use_hidden_states and (self.consults_arbiter or self.log is not None)

    def check_compatible(self, model, tokenizer=None) -> None:
        """The arbiter's check against the target (the engine runs it before decoding with this rule)."""
        self.arbiter.check_compatible(model, tokenizer)

    @torch.no_grad()
    def verify(self, draft_tokens, target_logits, draft_probs=None, hidden_states=None) -> Verdict:
        k = draft_tokens.shape[1]
        choice = target_logits.argmax(dim=-1)  # (B, k + 1)
        exact = draft_tokens == choice[:, :k]
        features = None
        if self.consults_arbiter or (self.log is not None and k):
            if self.arbiter.config.use_hidden_states and hidden_states is None:
                raise ValueError("This arbiter reads the target's hidden states: run it through the speculative engine "
                                 "(generate(custom_generate=CoSpec(arbiter))) or pass hidden_states=.")
            features = mismatch_features(draft_tokens, target_logits, hidden_states if self.arbiter.config.use_hidden_states else None,
                                         entropy_top_k=self.arbiter.config.entropy_top_k)
        if self.keeps_nothing:
            keep = torch.zeros_like(exact)
        elif self.mode == "accept":
            keep = torch.ones_like(exact)
        else:
            logits = self.arbiter(features.to(self.arbiter.feature_mean.device)).to(exact.device)
            if self.mode == "policy":
                keep = logits > logit(self.threshold)
            else:
                keep = torch.rand(logits.shape, generator=self.generator, device=logits.device) < logits.sigmoid()
        allowed = emittable(draft_tokens, target_logits)
        keep = keep & allowed
        num_accepted = leading_true_count(exact | keep)
        if self.log is not None:
            self._record(draft_tokens, choice, exact, allowed, keep, num_accepted, features)
        return Verdict(num_accepted, token_at(choice, num_accepted))

    def _record(self, draft_tokens, choice, exact, allowed, keep, num_accepted, features) -> None:
        self.log.rounds += 1
        last = min(int(num_accepted[0]), draft_tokens.shape[1] - 1)  # the rejecting mismatch is a decision too
        for i in range(last + 1):
            if not exact[0, i] and allowed[0, i]:  # a banned draft was never the arbiter's to keep
                self.log.decisions.append(Decision(
                    features[0, i].cpu(), bool(keep[0, i]), int(draft_tokens[0, i]), int(choice[0, i]), i,
                    None if self.log.context is None else self.log.context[0].cpu(),
                ))
