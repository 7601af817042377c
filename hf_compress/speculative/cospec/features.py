"""What the CoSpec arbiter reads at each drafted position: cheap statistics of the target's verify forward.

Everything comes from the one verification forward the engine runs anyway (no extra forward):

- ``target_logp_draft`` / ``target_logp_choice``: log p_T of the draft token and of the target's own choice;
- ``logp_gap``: their difference (how much worse the draft token is, in nats; 0 at an exact match);
- ``top_k_entropy``: FLy's gate statistic (top-3 entropy; low = the target is sure; tokens a logits processor
  masked to ``-inf`` count as probability 0, so the features stay finite while any token is left);
- ``entropy``: the full entropy of p_T;
- ``log_rank``: ``log(1 + rank of the draft token under the target)`` (0 = the target's own choice);
- ``following_matches``: share of the drafts *after* this one that the target confirms exactly, counted
  until the first disagreement — FLy's deferred-window signal: the target's later logits were computed
  with this draft token in the context, so agreeing afterwards means it was not steering elsewhere;
- ``remaining`` / ``position``: how many drafts follow (the look-ahead above is censored near the end) and
  where the position is in the round.

Optionally the target's final hidden state *at the draft token* (after reading it): Judge Decoding's
evidence is that a linear probe on it separates acceptable from harmful continuations. Draft-model
states are deliberately not used: the n-gram and cross-tokenizer drafters have none, the engine's drafters
draft greedily (no distributions), and reading them would tie an arbiter to one drafter.

Example:
    >>> logits = torch.zeros(1, 3, 5); logits[0, :, 1] = 4.0      # the target wants token 1 everywhere
    >>> f = mismatch_features(torch.tensor([[2, 1]]), logits)
    >>> f.shape, round(float(f[0, 0, FEATURE_NAMES.index("following_matches")]), 2)
    (torch.Size([1, 2, 9]), 0.5)
"""

from __future__ import annotations

import math

import torch

from ..acceptance import top_k_entropy_of_log_probs


__all__ = ["FEATURE_NAMES", "NUM_SCALAR_FEATURES", "mismatch_features"]

FEATURE_NAMES = (
    "target_logp_draft",
    "target_logp_choice",
    "logp_gap",
    "top_k_entropy",
    "entropy",
    "log_rank",
    "following_matches",
    "remaining",
    "position",
)
NUM_SCALAR_FEATURES = len(FEATURE_NAMES)


def mismatch_features(
    draft_tokens: torch.LongTensor,
    target_logits: torch.Tensor,
    hidden_states: torch.Tensor | None = None,
    *,
    entropy_top_k: int = 3,
) -> torch.Tensor:
    """``(B, k, F)`` features of every drafted position (``F`` = 9, plus the hidden size with ``hidden_states``).

    ``target_logits`` is ``(B, k + 1, V)`` as acceptance rules receive it; ``hidden_states`` ``(B, k + 1, d)``
    are the target's final states of ``[last, d_1 .. d_k]``, so the state *after* draft ``i`` is at ``i + 1``.
    """
    batch, k = draft_tokens.shape
    log_probs = target_logits[:, :k].float().log_softmax(dim=-1)  # (B, k, V)
    logp_draft = log_probs.gather(-1, draft_tokens.unsqueeze(-1)).squeeze(-1)
    logp_choice = log_probs.max(dim=-1).values
    probs = log_probs.exp()
    top_k_entropy = top_k_entropy_of_log_probs(log_probs, entropy_top_k)  # FLy's gate statistic, banned tokens ignored
    entropy = -(probs * log_probs.clamp_min(-1e4)).sum(dim=-1)
    rank = (log_probs > logp_draft.unsqueeze(-1)).sum(dim=-1).float()
    exact = logp_draft >= logp_choice  # the draft token is (one of) the target's argmax
    following = _following_matches(exact)
    index = torch.arange(k, device=draft_tokens.device, dtype=torch.float32).expand(batch, k)
    remaining = (k - 1 - index) / max(1, k)
    scalars = torch.stack([
        logp_draft.clamp_min(-30.0),
        logp_choice,
        (logp_choice - logp_draft).clamp_max(30.0),
        top_k_entropy,
        entropy,
        torch.log1p(rank),
        following / max(1, k),
        remaining,
        index / max(1, k),
    ], dim=-1)
    if hidden_states is None:
        return scalars
    # On a model split over devices (device_map) the logits come back on the input's device but the decoder's states
    # stay on its last one.
    return torch.cat([scalars, hidden_states[:, 1 : k + 1].to(scalars.device, torch.float32)], dim=-1)


def _following_matches(exact: torch.Tensor) -> torch.Tensor:
    """``(B, k)``: for position ``i``, how many of the drafts ``i+1, i+2, ...`` match exactly before the first miss."""
    batch, k = exact.shape
    out = torch.zeros(batch, k, device=exact.device)
    run = torch.zeros(batch, device=exact.device)
    for i in range(k - 1, -1, -1):  # right to left: run = matches starting at i + 1
        out[:, i] = run
        run = torch.where(exact[:, i], run + 1, torch.zeros_like(run))
    return out


def logit(probability: float) -> float:
    """``log(p / (1 - p))`` with ``0 → -inf`` and ``1 → +inf`` (decision thresholds in logit space)."""
    if probability <= 0.0:
        return -math.inf
    if probability >= 1.0:
        return math.inf
    return math.log(probability / (1.0 - probability))
