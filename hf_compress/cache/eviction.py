"""SnapKV-style token eviction: which prompt tokens a head keeps under a token budget.

The last ``window`` prompt queries vote for the earlier tokens they attend to; votes are smoothed over
neighbouring positions (average pooling) and every KV head keeps its ``budget - window`` best earlier
tokens plus the whole window. SparK composes with it: evict tokens first, then prune channels of what
survives (``SparKCache(token_budget=...)``).

Example:
    >>> import torch
    >>> query, keys = torch.randn(1, 4, 8, 16), torch.randn(1, 2, 100, 16)
    >>> snapkv_keep_indices(query, keys, budget=40, window=8, scaling=0.25).shape
    torch.Size([1, 2, 40])
"""

from __future__ import annotations

import torch


__all__ = ["snapkv_keep_indices"]


def snapkv_keep_indices(
    query: torch.Tensor, keys: torch.Tensor, budget: int, window: int, scaling: float, pooling_kernel: int = 5
) -> torch.Tensor:
    """Token indices ``(batch, kv_heads, budget)``, ascending, that each KV head keeps.

    ``query`` holds the last ``window`` queries ``(batch, heads, window, head_dim)``; ``keys`` all cached
    keys ``(batch, kv_heads, tokens, head_dim)``, the window's own keys last.
    """
    batch, heads, _, head_dim = query.shape
    kv_heads, tokens = keys.shape[1], keys.shape[2]
    window = min(window, query.shape[2], tokens)
    if budget >= tokens:
        return torch.arange(tokens, device=keys.device).expand(batch, kv_heads, tokens)
    if budget <= window:
        raise ValueError(f"token_budget ({budget}) must exceed the observation window ({window}).")
    group = heads // kv_heads
    grouped_query = query[:, :, -window:].float().view(batch, kv_heads, group, window, head_dim)
    logits = torch.einsum("bhgqd,bhtd->bhgqt", grouped_query, keys.float()) * scaling
    # Causal inside the window: window query j sees window keys 0..j only.
    future = torch.ones(window, window, dtype=torch.bool, device=keys.device).triu(1)
    logits[..., tokens - window :] = logits[..., tokens - window :].masked_fill(future, float("-inf"))
    votes = logits.softmax(dim=-1)[..., : tokens - window].sum(dim=3).mean(dim=2)  # (B, kv_heads, prefix)
    votes = torch.nn.functional.avg_pool1d(
        votes.view(batch * kv_heads, 1, -1), pooling_kernel, stride=1, padding=pooling_kernel // 2
    ).view(batch, kv_heads, -1)
    chosen = votes.topk(budget - window, dim=-1).indices.sort(dim=-1).values
    window_indices = torch.arange(tokens - window, tokens, device=keys.device).expand(batch, kv_heads, window)
    return torch.cat([chosen, window_indices], dim=-1)
