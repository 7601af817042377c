#!/usr/bin/env python
"""How much any router that reads attention could gain over the static rule: routers that see the dense model's own
attention maps (an oracle no real router has) → bench/results/<name>.json.

``router_features.md`` asked what the router's proxy factors allow; this asks what the paper's real factor, the
attention a token receives, would allow if it were known exactly. Each oracle ranks a window's tokens by position
plus ``w · log(1 + a·n)``, with ``a`` the attention the token receives in the *dense* model (heads averaged), and a
block skips its ``r_ℓ`` lowest-ranked tokens, the first token always kept:

- ``own block``: ``a`` from the block's own attention, queries in the scored tail (a ranking per block);
- ``previous block``: the same from the block before it, which is what the paper's router reads (a ranking per block);
- ``one ranking``: ``a`` summed over every block, each block's column averaged over the queries that see the token;
  one ranking for all blocks.

Each is scored by the held-out tail KL to the dense model on the windows ``train_token_router`` selects on in
``bench_token_router.py``; the best oracle and the static rule are then compared by tail perplexity on the
Wikipedia eval windows, which the choice never saw. The schedule is the searched one recorded in
``bench/results/token_router.json`` at ``--sparsity``.

Usage:
    python scripts/bench_router_oracle.py
    python scripts/bench_router_oracle.py --quick --output-name router-oracle-smoke
    python scripts/bench_router_oracle.py --render router_oracle
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hf_compress.assets import load_text
from hf_compress.evaluation.perplexity import token_windows, tokenize_stream
from hf_compress.evaluation.report import start_benchmark, write_benchmark
from hf_compress.routing import install_routing
from hf_compress.routing.layer import routing_disabled
from hf_compress.routing.training import KeepBestRouter


sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_router_features import _paired, _verdict, router_bench_parser, router_bench_setup  # noqa: E402
from bench_token_router import window_nlls  # noqa: E402


logger = logging.getLogger("bench_router_oracle")

ORACLES = ("own block", "previous block", "one ranking")


class OracleRouter(nn.Module):
    """Stands in for ``TokenRouter``: returns the scores set for the window at hand, block after block.

    The routed model calls its router once per block, in block order, on each prompt forward; the oracle counts the
    calls to know the block. ``scores``: ``(blocks, T)`` for the next forward.
    """

    def __init__(self) -> None:
        super().__init__()
        self.scores: torch.Tensor | None = None
        self.calls = 0

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        block = self.calls % len(self.scores)
        self.calls += 1
        return self.scores[block][None].expand(features.shape[0], -1).to(features.device)


@torch.no_grad()
def received_attention(model: nn.Module, ids: torch.Tensor, tail: int) -> dict[str, torch.Tensor]:
    """Per oracle, ``(blocks, T)`` of ``a·n`` (attention received, scaled so a uniform share is 1) for one window."""
    maps = [layer[0].float().mean(0) for layer in model(input_ids=ids[None], output_attentions=True,
                                                          use_cache=False).attentions]  # (T, T) per block
    length = maps[0].shape[0]
    own = torch.stack([attention[-tail:].sum(0) for attention in maps])
    seen_by = torch.arange(length, 0, -1, dtype=torch.float32)  # queries at or after each key position
    summed = sum(attention.sum(0) for attention in maps) / seen_by
    received = {"own block": own, "previous block": torch.cat([own[:1], own[:-1]]),
                "one ranking": summed[None].expand(len(maps), -1)}
    return {name: value * length / value.sum(-1, keepdim=True) for name, value in received.items()}


def eager_received_attention(model: nn.Module, windows: list[torch.Tensor], tail: int) -> list[dict[str, torch.Tensor]]:
    """:func:`received_attention` of each window: the maps need eager attention, the routed forwards then run on the
    implementation the model had."""
    implementation = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        return [received_attention(model, ids, tail) for ids in windows]
    finally:
        model.set_attn_implementation(implementation)


def oracle_scores(received: torch.Tensor, weight: float) -> torch.Tensor:
    """Position plus ``weight · log(1 + a·n)``: weight 0 ranks exactly as the static rule does."""
    length = received.shape[-1]
    return torch.arange(length, dtype=torch.float32) / length + weight * torch.log1p(received)


def main() -> None:
    args = router_bench_parser(__doc__, "router_oracle", [0.1, 0.2, 0.3, 0.5, 1]).parse_args()
    if not start_benchmark(args, _markdown):
        return
    model, tokenizer, config, schedule, held_out = router_bench_setup(args, quick_weight=0.3)
    windows = token_windows(tokenize_stream(load_text("wikipedia", "eval"), tokenizer), 512, args.ppl_windows)

    held_out_tail = round(args.seq_len * config.loss_tail)
    held_out_received = eager_received_attention(model, [torch.as_tensor(row["input_ids"]) for row in held_out],
                                                 held_out_tail)
    install_routing(model, schedule, mode="router").router = oracle = OracleRouter()
    scorers = [KeepBestRouter(model, [row], config, every=1) for row in held_out]  # one per window: its own scores

    def validation_kl(oracle_name: str, weight: float) -> float:
        total = 0.0
        for scorer, received in zip(scorers, held_out_received):
            oracle.scores = oracle_scores(received[oracle_name], weight)
            total += scorer.validation_kl()
        return total / len(scorers)

    rows = []
    for name, weight in [("static rule", 0.0)] + [(name, w) for name in ORACLES for w in args.weights]:
        start = time.perf_counter()
        kl = validation_kl("one ranking" if name == "static rule" else name, weight)
        rows.append({"oracle": name, "weight": weight, "validation_kl": kl, "seconds": time.perf_counter() - start})
        logger.info("%s", rows[-1])
    static, best = rows[0], min(rows, key=lambda row: row["validation_kl"])
    blocks = len(held_out_received[0][ORACLES[0]])
    if best is not static:  # the static rule's scores need no attention (weight 0: position only)
        with routing_disabled(model):
            eval_received = eager_received_attention(model, list(windows), args.tail)
    for row in (static, best) if best is not static else (static,):
        row["eval"] = []
        for index, window in enumerate(windows):
            received = (torch.zeros(blocks, len(window)) if row is static
                        else eval_received[index][row["oracle"]])
            oracle.scores = oracle_scores(received, row["weight"])
            row["eval"].append(float(window_nlls(model, window[None])[0][-args.tail:].mean()))
    settings = {k: v for k, v in vars(args).items() if k not in ("render", "supported_devices")}
    settings.update(schedule=schedule.block_sparsity, validation_windows=config.validation_windows,
                    loss_tail=config.loss_tail)
    results = {"rows": rows, "best": rows.index(best), "paired": _paired(static["eval"], best["eval"])}
    write_benchmark(args.output_name, settings, results, _markdown({"settings": settings, "results": results}))


def _markdown(payload: dict[str, Any]) -> str:
    settings, results = payload["settings"], payload["results"]
    rows, best, paired = results["rows"], results["rows"][results["best"]], results["paired"]
    static_kl = rows[0]["validation_kl"]
    lines = [
        f"# Token router: what exact attention would allow ({settings.get('model')}, {settings.get('sparsity'):.0%} "
        "tokens skipped, searched schedule)", "",
        "Oracle routers that read the dense model's own attention maps: each ranks a window's tokens by position plus "
        "`w · log(1 + a·n)`, `a` the attention the token receives (heads averaged; `own block`: that block's, from "
        "the scored tail's queries; `previous block`: the same one block earlier, what the paper's router reads; "
        "`one ranking`: summed over all blocks, so every block ranks alike). Held-out tail KL to the dense model on "
        f"the {settings.get('validation_windows')} windows router training selects on (last "
        f"{settings.get('loss_tail'):.0%} of {settings.get('seq_len')} tokens).", "",
        "| oracle | w | held-out tail KL | vs static rule |", "|---|---|---|---|",
    ]
    for row in rows:
        change = row["validation_kl"] / static_kl - 1
        lines.append(f"| {row['oracle']} | {row['weight']:g} | {row['validation_kl']:.5f} | {change:+.1%} |")
    lines += ["", f"Best: {best['oracle']}, w = {best['weight']:g}. On {settings.get('ppl_windows')} Wikipedia eval "
              f"windows of 512 tokens (last {settings.get('tail')} scored), not used to choose it: tail perplexity "
              f"{paired['best_tail_ppl']:.3f} vs the static rule's {paired['static_tail_ppl']:.3f} (log-perplexity "
              f"difference {paired['log_ppl_difference']:+.4f} ± {paired['log_ppl_difference_se']:.4f}, paired over "
              f"windows): {_verdict(paired)}."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
