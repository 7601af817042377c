"""The router: which tokens a block computes. One small MLP shared by every block, or the static positional rule.

Both produce a score per token; a block keeps the ``n − skip_count(r_ℓ, n)`` best-scored tokens of each row
(top-k, so the realised sparsity is exactly the schedule's) and always keeps the first token (attention sink).

The four router factors (confirmed from reviews of the paper), per token and block, normalised as the spec
proposes:

- position ``p / n`` (real position among the row's ``n`` non-padding tokens);
- attention score, as ``log(1 + a·n) / log(1 + n)`` in [0, 1] (``a·n`` = 1 for a uniform share): *our proxy* for
  ``a`` — the softmax over the row's tokens of the scaled dot product between each token's RMS-normalised hidden
  state and the last token's, at the block's input. The paper reads the latest attention probabilities; that needs
  eager attention or architecture-specific q/k code, the proxy needs neither and is computed from the same hidden
  states the block receives. The log bound matters: the raw ``a·n`` reaches the hundreds on an attention sink, and
  with Adam's per-parameter steps a few updates of the output layer let it outvote the position factor — training
  then reordered every block's tokens at once (held-out tail KL to the dense model 0.05 → 1.8 within 60 steps on
  SmolLM2-135M, where the bounded factor stays at 0.05);
- the rank of that score within the row, ``rank / n`` (0 = most attended);
- the block's required sparsity ``r_ℓ``.
"""

from __future__ import annotations

import math

import torch
from torch import nn


__all__ = ["ROUTER_FEATURES_VERSION", "TokenRouter", "decoded_token_features", "router_features", "select_tokens",
           "static_scores"]

ROUTER_FEATURES_VERSION = 2
"""What a saved router's weights were trained to read (1: the attention factor unbounded, ``a·n``; 2: ``log``-bounded).
A checkpoint records it; a router saved for other features is refused at load rather than routing wrongly."""


class TokenRouter(nn.Module):
    """The global router: ``Linear(4, hidden) → GELU → Linear(hidden, 1)``; a logit per token (higher = compute).

    Initialised to *be* the static rule, calibrated (ours): the output reads two hidden units only,
    ``2·gelu(4p) − 2·gelu(4r)``. The logit rises strictly with position, so top-k keeps exactly the static router's
    tokens, and it is positive exactly where ``p > r`` (gelu is increasing on [0, 4]), i.e. on the tokens top-k keeps,
    so the decode-time rule (compute when σ > 0.5) agrees with top-k and the sparsity and guide losses start near
    their minimum instead of pulling every logit down. Training starts from the static router and the distillation
    loss moves it from there.

    Example:
        >>> router = TokenRouter(hidden_size=64)
        >>> sum(p.numel() for p in router.parameters())
        385
        >>> router(torch.zeros(2, 5, 4)).shape
        torch.Size([2, 5])
    """

    NUM_FACTORS = 4

    def __init__(self, hidden_size: int = 64) -> None:
        super().__init__()
        self.hidden = nn.Linear(self.NUM_FACTORS, hidden_size)
        self.output = nn.Linear(hidden_size, 1)
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():  # deterministic initialisation, independent of the global RNG
            bound = 1.0 / math.sqrt(self.NUM_FACTORS)
            self.hidden.weight.uniform_(-bound, bound, generator=generator)
            self.hidden.bias.uniform_(-bound, bound, generator=generator)
            self.output.weight.zero_()
            self.output.bias.zero_()
            # Unit 0 = 4 · position ranks tokens by recency; unit 1 = 4 · block sparsity sets the 0.5 threshold.
            self.hidden.weight[:2] = torch.tensor([[4.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 4.0]])
            self.hidden.bias[:2] = 0.0
            self.output.weight[0, :2] = torch.tensor([2.0, -2.0])

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.output(nn.functional.gelu(self.hidden(features.to(self.hidden.weight.dtype)))).squeeze(-1)

    def _apply(self, fn, recurse: bool = True):
        # model.to(torch.bfloat16) / .half() must not round the router: in bf16 its logits tie on long prompts and
        # top-k then keeps other tokens than the float32 router (from_pretrained keeps it in float32 too). A cast
        # follows the device only; forward() casts the features to float32 and returns float32 logits.
        def keep_float32(tensor: torch.Tensor) -> torch.Tensor:
            converted = fn(tensor)
            if tensor.dtype == torch.float32 and converted.dtype != torch.float32:
                return tensor.to(converted.device)
            return converted

        return super()._apply(keep_float32, recurse)


def real_positions(valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token its position among the row's non-padding tokens (``valid`` is ``(B, T)`` bool) and each row's count."""
    positions = valid.long().cumsum(-1) - 1
    return positions.clamp(min=0), valid.sum(-1)


def static_scores(valid: torch.Tensor) -> torch.Tensor:
    """The static router: priority ``x_0 > x_{n−1} > x_{n−2} > … > x_1`` (skip the earliest tokens after the first).

    Example:
        >>> static_scores(torch.tensor([[False, True, True, True]]))
        tensor([[-inf, inf, 1., 2.]])
    """
    positions, _ = real_positions(valid)
    scores = positions.to(torch.float32)
    scores = torch.where(positions == 0, torch.full_like(scores, math.inf), scores)
    return scores.masked_fill(~valid, -math.inf)


def router_features(hidden_states: torch.Tensor, valid: torch.Tensor, block_sparsity: float) -> torch.Tensor:
    """The four factors ``(B, T, 4)`` of every prompt token at one block's input (padding rows are zeros)."""
    positions, counts = real_positions(valid)
    n = counts.clamp(min=1).to(torch.float32)[:, None]
    hidden = hidden_states.detach().to(torch.float32)
    # Cosine-like score of each token against the last one, as matrix-vector products (no [B, T, H] temporaries).
    scale = torch.rsqrt(hidden.pow(2).mean(-1) + 1e-6)  # (B, T)
    dot = torch.matmul(hidden, hidden[:, -1, :, None]).squeeze(-1)  # last token is never padding
    logits = dot * scale * scale[:, -1:] / math.sqrt(hidden.shape[-1])
    logits = logits.masked_fill(~valid, -math.inf)
    attention = torch.softmax(logits, dim=-1).nan_to_num(0.0)
    rank = torch.argsort(torch.argsort(logits, dim=-1, descending=True, stable=True), dim=-1, stable=True)
    features = torch.stack(
        [
            positions.to(torch.float32) / n,
            torch.log1p(attention * n) / torch.log1p(n),
            rank.to(torch.float32) / n,
            torch.full_like(attention, float(block_sparsity)),
        ],
        dim=-1,
    )
    return features * valid[..., None]


def decoded_token_features(valid: torch.Tensor, block_sparsity: float, offset: torch.Tensor) -> torch.Tensor:
    """The four factors ``(B, T, 4)`` of tokens fed after the prompt (padding rows are zeros), each as if fed alone.

    A decoded token is fed alone: among one token its attention factor is 1 and its rank 0, whatever its hidden
    state, so only its position ``p / (p + 1)`` in the whole sequence varies. Several tokens fed together (assisted
    generation's verification, ``generate(use_cache=False)``) get those same factors, not ones computed among them,
    so they are routed exactly as decoding them one by one would route them. ``offset`` ``(B,)``: real tokens before
    these ones.

    Example:
        >>> decoded_token_features(torch.ones(1, 2, dtype=torch.bool), 0.3, torch.tensor([3]))[0]
        tensor([[0.7500, 1.0000, 0.0000, 0.3000],
                [0.8000, 1.0000, 0.0000, 0.3000]])
    """
    positions = real_positions(valid)[0] + offset[:, None]
    ones = torch.ones(valid.shape, dtype=torch.float32, device=valid.device)
    features = torch.stack(
        [positions.to(torch.float32) / (positions + 1).to(torch.float32), ones, torch.zeros_like(ones),
         torch.full_like(ones, float(block_sparsity))],
        dim=-1,
    )
    return features * valid[..., None]


def select_tokens(
    scores: torch.Tensor, valid: torch.Tensor, skip: torch.Tensor, width: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices ``(B, K)`` (ascending) of the tokens a block computes, and which of them are real (not fillers).

    Row b keeps its ``n_b − skip_b`` best-scored real tokens (the first real token always: its score must be +inf).
    Rows keeping fewer than the longest row are filled up with padding positions (or, where a row has none, its
    own skipped tokens) so the gathered batch is rectangular; fillers are computed but their outputs are dropped
    and their keys are masked (``layer.py``). ``skip`` is ``(B,)``: the count each row skips. ``width``, the most
    tokens a row keeps, when the caller knows it (reading it from ``skip`` waits for the device).
    """
    keep_count = valid.sum(-1) - skip
    order = torch.argsort(scores, dim=-1, descending=True, stable=True)
    rank = torch.argsort(order, dim=-1, stable=True)
    kept = valid & (rank < keep_count[:, None])
    if width is None:
        width = int(keep_count.max().item()) if keep_count.numel() else 0
    # 2 = kept real token, 1 = padding (filler candidate), 0 = skipped real token; stable sort keeps order.
    priority = kept.long() * 2 + (~valid).long()
    chosen = torch.argsort(priority, dim=-1, descending=True, stable=True)[:, :width]
    chosen, _ = chosen.sort(dim=-1)
    return chosen, kept.gather(1, chosen)
