"""Acceptance rules: which drafted tokens survive one verification forward of the target.

A rule sees the drafted tokens and the target's (processed) logits at every drafted position plus the
bonus position, and answers per row: how many leading drafts it accepts, and which token to emit right
after them (the target's correction at the first rejected position, or the bonus token when all drafts
pass). The engine (:mod:`.engine`) does everything else, so a new rule is one small class.

Shapes, for a batch of ``B`` rows and ``k`` drafts: ``draft_tokens`` ``(B, k)``, ``target_logits``
``(B, k + 1, V)`` where position ``i`` scores ``draft_tokens[:, i]`` and position ``k`` is the bonus,
``draft_probs`` ``(B, k, V)`` or ``None`` (the drafter chose deterministically, e.g. greedy or n-gram).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch

from ..utils import InvalidArgumentTypeError, check_bool, check_float, check_int


@dataclass
class Verdict:
    """Per row: ``num_accepted`` leading drafts are kept, then ``next_token`` is emitted."""

    num_accepted: torch.LongTensor  # (B,)
    next_token: torch.LongTensor  # (B,)


class AcceptanceRule(Protocol):
    """Decides, per row, how many drafted tokens to keep after one target forward."""

    def verify(
        self,
        draft_tokens: torch.LongTensor,
        target_logits: torch.Tensor,
        draft_probs: torch.Tensor | None = None,
    ) -> Verdict: ...


def leading_true_count(accepted: torch.Tensor) -> torch.LongTensor:
    """Length of the run of ``True`` at the start of each row of a ``(B, k)`` boolean tensor."""
    return accepted.long().cumprod(dim=-1).sum(dim=-1)


def token_at(tokens: torch.Tensor, index: torch.LongTensor) -> torch.LongTensor:
    """``tokens[b, index[b]]`` for every row ``b``."""
    return tokens.gather(1, index.unsqueeze(1)).squeeze(1)


def emittable(draft_tokens: torch.LongTensor, target_logits: torch.Tensor) -> torch.BoolTensor:
    """``(B, k)``: whether each draft token may be emitted at all, i.e. its processed score is not ``-inf``.

    Logits processors ban tokens that way (``bad_words_ids``, EOS under ``min_new_tokens``, top-k/top-p when
    sampling); a rule that keeps mismatching drafts (FLy, CoSpec) must never keep a banned one.

    Example:
        >>> banned_one = torch.tensor([[[0.0, -float("inf")], [0.0, -float("inf")], [0.0, 0.0]]])  # token 1 at 0 and 1
        >>> emittable(torch.tensor([[0, 1]]), banned_one).tolist()
        [[True, False]]
    """
    k = draft_tokens.shape[1]
    return target_logits[:, :k].gather(-1, draft_tokens.unsqueeze(-1)).squeeze(-1) > float("-inf")


class StrictGreedy:
    """Lossless greedy verification: keep drafts while they equal the target's argmax.

    The output is token-for-token what greedy ``generate()`` produces in float32. In bfloat16/float16 it is
    equal up to the numerics of multi-token verification: one forward over k tokens rounds differently from
    k one-token forwards, so where two logits nearly tie the argmax can differ and the texts diverge
    (``scripts/bench_speculative.py --precision-agreement`` measures how often).

    Example:
        >>> rule = StrictGreedy()
        >>> logits = torch.eye(4)[[1, 2, 0]].unsqueeze(0)  # target picks 1, 2, then bonus 0
        >>> verdict = rule.verify(torch.tensor([[1, 3]]), logits)
        >>> verdict.num_accepted.tolist(), verdict.next_token.tolist()
        ([1], [2])
    """

    def verify(self, draft_tokens, target_logits, draft_probs=None) -> Verdict:
        target_choice = target_logits.argmax(dim=-1)  # (B, k + 1)
        num_accepted = leading_true_count(draft_tokens == target_choice[:, :-1])
        return Verdict(num_accepted, token_at(target_choice, num_accepted))


class SpeculativeSampling:
    """Lossless-in-distribution verification (Leviathan et al. 2023; Chen et al. 2023).

    Draft ``d_i`` is kept with probability ``min(1, p_i(d_i) / q_i(d_i))``; at the first rejection the
    emitted token is drawn from ``normalize(max(p_i - q_i, 0))``; if every draft passes, the bonus token is
    drawn from ``p_{k+1}``. A deterministic drafter (greedy, n-gram) has one-hot ``q``, so ``draft_probs``
    may be ``None``. ``target_logits`` must already carry the sampling warpers (temperature, top-k/p), as
    ``generate()`` applies them before sampling.

    Example:
        >>> torch.manual_seed(0) and None
        >>> verdict = SpeculativeSampling().verify(torch.tensor([[1]]), torch.tensor([[[0.0, 30.0], [30.0, 0.0]]]))
        >>> verdict.num_accepted.tolist(), verdict.next_token.tolist()   # p(1) ~ 1: kept, then bonus 0
        ([1], [0])
    """

    def __init__(self, generator: torch.Generator | None = None):
        self.generator = _check_generator(generator)

    def verify(self, draft_tokens, target_logits, draft_probs=None) -> Verdict:
        batch, k = draft_tokens.shape
        p = target_logits.float().softmax(dim=-1)  # (B, k + 1, V)
        p_draft = p[:, :k].gather(-1, draft_tokens.unsqueeze(-1)).squeeze(-1)  # (B, k)
        if draft_probs is None:
            q = torch.zeros_like(p[:, :k]).scatter_(-1, draft_tokens.unsqueeze(-1), 1.0)
            ratio = p_draft
        else:
            q = draft_probs.float()
            q_draft = q.gather(-1, draft_tokens.unsqueeze(-1)).squeeze(-1)
            ratio = p_draft / q_draft.clamp_min(torch.finfo(q.dtype).tiny)
        uniform = torch.rand(ratio.shape, generator=self.generator, device=ratio.device)
        num_accepted = leading_true_count(uniform < ratio.clamp(max=1.0))

        # Distribution of the token emitted after the kept drafts: the residual at a rejection, p at the bonus.
        residual = (p[:, :k] - q).clamp_min(0.0)
        residual = torch.cat([residual, p[:, k:]], dim=1)  # (B, k + 1, V)
        rows = torch.arange(batch, device=p.device)
        chosen = residual[rows, num_accepted]
        empty = chosen.sum(dim=-1, keepdim=True) <= 0  # p == q exactly: fall back to p
        chosen = torch.where(empty, p[rows, num_accepted], chosen)
        next_token = torch.multinomial(chosen / chosen.sum(dim=-1, keepdim=True), 1, generator=self.generator)
        return Verdict(num_accepted, next_token.squeeze(1))


class TypicalAcceptance:
    """Medusa's typical acceptance for sampling: keep a draft the target finds plausible enough.

    Draft ``x`` at a position is kept while ``p(x) > min(posterior_threshold, posterior_alpha * exp(-H(p)))``
    with ``p`` the target's (warped) distribution there; the token after the kept drafts is sampled from
    ``p``. Not lossless in distribution: it trades exactness for longer acceptance at ``T > 0``. The
    defaults are those Medusa's ``medusa_generate`` and its released MT-Bench answers use (ε = 0.09,
    δ = 0.3; its helper functions have the two swapped, so they are explicit here).

    Example:
        >>> logits = torch.tensor([[[2.0, 1.0, 0.0], [0.0, 0.0, 5.0]]])
        >>> TypicalAcceptance().verify(torch.tensor([[1]]), logits).num_accepted.tolist()   # p(1) = 0.24 > 0.09
        [1]
    """

    def __init__(self, posterior_threshold: float = 0.09, posterior_alpha: float = 0.3, generator: torch.Generator | None = None):
        for name, value in (("posterior_threshold", posterior_threshold), ("posterior_alpha", posterior_alpha)):
            check_float(name, value, low=0.0, high=1.0, low_open=True,
                        hint="posterior_threshold (ε) and posterior_alpha (δ) must lie in (0, 1].")
        self.posterior_threshold = posterior_threshold
        self.posterior_alpha = posterior_alpha
        self.generator = _check_generator(generator)

    def verify(self, draft_tokens, target_logits, draft_probs=None) -> Verdict:
        k = draft_tokens.shape[1]
        p = target_logits.float().softmax(dim=-1)
        entropy = -(p * p.clamp_min(1e-12).log()).sum(dim=-1)[:, :k]
        threshold = torch.minimum(torch.full_like(entropy, self.posterior_threshold), self.posterior_alpha * (-entropy).exp())
        p_draft = p[:, :k].gather(-1, draft_tokens.unsqueeze(-1)).squeeze(-1)
        num_accepted = leading_true_count(p_draft > threshold)
        rows = torch.arange(p.shape[0], device=p.device)
        next_token = torch.multinomial(p[rows, num_accepted], 1, generator=self.generator).squeeze(1)
        return Verdict(num_accepted, next_token)


def top_k_entropy(logits: torch.Tensor, top_k: int = 3) -> torch.Tensor:
    """``-sum p log p`` over the ``top_k`` most likely tokens of ``softmax(logits)`` (no renormalisation).

    FLy's confidence measure: low values mean the target is sure of its choice.
    """
    check_int("top_k", top_k, minimum=1)
    return top_k_entropy_of_log_probs(logits.float().log_softmax(dim=-1), top_k)


def top_k_entropy_of_log_probs(log_probs: torch.Tensor, top_k: int) -> torch.Tensor:
    """:func:`top_k_entropy` from log-probabilities already computed (the CoSpec features reuse theirs)."""
    top = log_probs.topk(min(top_k, log_probs.shape[-1]), dim=-1).values
    # A token a logits processor banned (-inf) has probability 0 and adds nothing (0 · -inf would be NaN, which no
    # threshold calls confident: the gate would open on a target sure of its one allowed token).
    return -torch.where(top > -math.inf, top.exp() * top, torch.zeros_like(top)).sum(dim=-1)


class LooseVerification:
    """FLy's training-free loose acceptance (arXiv 2511.22972): entropy gate + deferred window.

    A mismatch at position ``i`` is accepted iff (1) the target is not confident there, i.e. its top-k
    entropy is at least ``entropy_threshold`` (the gate; ``entropy_threshold <= 0.01`` disables it), and
    (2) the next ``window - 1`` drafts all match the target exactly (the deferred window, checked on the
    original exact-match vector; in the last ``window`` drafted positions acceptance is exact match only). The longest
    prefix of accepted positions is kept; accepted mismatches keep the *draft* token, because the target's
    later logits were computed on it; a draft token the logits processors ban (score ``-inf``) is never kept.
    ``use_window=False`` is the paper's ``abla_no_window`` ablation (every mismatch that passes the gate is
    kept). ``loose=False`` turns both tiers off: plain exact match.

    With ``do_sample=True`` the target draws ``num_samples`` (2) samples per position and a draft counts as
    matched if either equals it; the first sample is the correction (the official code's sampling path).

    Example:
        >>> rule = LooseVerification(window=3)
        >>> flat = torch.zeros(1, 7, 8)                      # uniform target: high entropy everywhere
        >>> flat[0, :, 0] = 1.0                              # ... but argmax is token 0
        >>> rule.verify(torch.tensor([[5, 0, 0, 0, 0, 0]]), flat).num_accepted.tolist()  # mismatch + 2 matches
        [6]
    """

    def __init__(
        self,
        entropy_threshold: float = 0.3,
        entropy_top_k: int = 3,
        window: int = 6,
        use_window: bool = True,
        loose: bool = True,
        do_sample: bool = False,
        num_samples: int = 2,
        generator: torch.Generator | None = None,
    ):
        check_int("window", window, minimum=1, hint="The mismatch itself counts: window=1 checks no later drafts.")
        check_int("entropy_top_k", entropy_top_k, minimum=1)
        check_float("entropy_threshold", entropy_threshold, low=0.0,
                    hint="It is a top-k entropy in nats (FLy: 0.3); values <= 0.01 disable the gate.")
        for name, flag in (("use_window", use_window), ("loose", loose), ("do_sample", do_sample)):
            check_bool(name, flag)
        check_int("num_samples", num_samples, minimum=1)
        self.entropy_threshold = entropy_threshold
        self.entropy_top_k = entropy_top_k
        self.window = window
        self.use_window = use_window
        self.loose = loose
        self.do_sample = do_sample
        self.num_samples = num_samples
        self.generator = _check_generator(generator)

    def target_choices(self, target_logits: torch.Tensor) -> torch.Tensor:
        """``(B, k + 1, S)`` tokens the target would emit (1 argmax, or ``num_samples`` samples)."""
        if not self.do_sample:
            return target_logits.argmax(dim=-1, keepdim=True)
        probs = target_logits.float().softmax(dim=-1)
        flat = probs.reshape(-1, probs.shape[-1])
        samples = torch.multinomial(flat, self.num_samples, replacement=True, generator=self.generator)
        return samples.reshape(*probs.shape[:-1], self.num_samples)

    def acceptance_mask(self, draft_tokens: torch.Tensor, target_logits: torch.Tensor, choices: torch.Tensor):
        """``(B, k)`` booleans: position accepted on its own (exact match, or loosely), before the cut."""
        k = draft_tokens.shape[1]
        exact = (choices[:, :k] == draft_tokens.unsqueeze(-1)).any(dim=-1)
        if not self.loose:
            return exact
        if self.use_window:
            following = self.window - 1
            window_ok = torch.zeros_like(exact)
            # Position i needs matches at i+1 .. i+W-1 inside the drafts; as in the official code, the last W
            # positions always revert to exact match (so i < k - W, one stricter than "the window fits").
            for i in range(0, k - self.window):
                window_ok[:, i] = exact[:, i + 1 : i + 1 + following].all(dim=-1) if following else True
            loosened = exact | window_ok
        else:
            loosened = torch.ones_like(exact)
        if self.entropy_threshold > 0.01:
            confident = top_k_entropy(target_logits[:, :k], self.entropy_top_k) < self.entropy_threshold
            loosened &= ~(confident & ~exact)
        return loosened & emittable(draft_tokens, target_logits)

    def verify(self, draft_tokens, target_logits, draft_probs=None) -> Verdict:
        choices = self.target_choices(target_logits)
        num_accepted = leading_true_count(self.acceptance_mask(draft_tokens, target_logits, choices))
        return Verdict(num_accepted, token_at(choices[..., 0], num_accepted))


def _check_generator(generator: torch.Generator | None) -> torch.Generator | None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise InvalidArgumentTypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}.")
    return generator
