#!/usr/bin/env python
"""LoRA training-step time on a packed low-bit model against the float model → bench/results/<output-name>.{json,md}.

SmolLM2-135M-Instruct, peft LoRA on every linear layer (``target_modules="all-linear"``), AdamW, one optimizer step
per call on a fixed batch of Wikipedia tokens. Variants, all in one process and timed in interleaved rounds (round r
runs one step of every variant) so that their ratios are side by side:

- ``lora-float``: LoRA on the float model (the model as loaded);
- ``lora-packed4``: LoRA on the same model packed to 4-bit, group 128 (``quantize_rtn``). Its forward and backward
  unpack each layer on every call (``packed_linear._DequantizedMatmul``) instead of keeping float weights.

Reported per variant: median seconds per step and the median of the per-round ratios to ``lora-float``; the loss of
the first step (the packed model's is the float model's within the 4-bit rounding, not equal); the model's resident
bytes. Memory during training is ``bench_memory.py``'s (cases ``lora`` and ``lora-packed``).

Usage:
    python scripts/bench_lora_speed.py
    python scripts/bench_lora_speed.py --quick --output-name lora-speed-smoke
    python scripts/bench_lora_speed.py --render lora-speed
"""

from __future__ import annotations

import logging
import statistics
import time
from typing import Any

import torch
from peft import LoraConfig, get_peft_model

from hf_compress.assets import load_model, load_text
from hf_compress.evaluation.memory import parameter_bytes
from hf_compress.evaluation.report import benchmark_parser, start_benchmark, synchronize, write_benchmark
from hf_compress.evaluation.speed import speed_ratio
from hf_compress.quantization import quantize_rtn


logger = logging.getLogger("bench_lora_speed")

VARIANTS: dict[str, int | None] = {"lora-float": None, "lora-packed4": 4}  # name: packed bits (None: float)
REFERENCE = "lora-float"


def _batch(tokenizer, rows: int, seq_len: int, device: str) -> torch.Tensor:
    """``rows`` consecutive ``seq_len``-token windows of the Wikipedia evaluation text."""
    text = "\n\n".join(load_text("wikipedia", "eval")["text"][:400])
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    if ids.numel() < rows * seq_len:
        raise SystemExit(f"the evaluation text has {ids.numel()} tokens, fewer than {rows} x {seq_len}")
    return ids[: rows * seq_len].view(rows, seq_len).to(device)


def build(names: list[str], model_name: str, group_size: int, rank: int, device: str) -> tuple[dict[str, Any], Any]:
    """One peft model and its optimizer per variant (each from a fresh load: peft adapts the model in place)."""
    built, tokenizer = {}, None
    for name in names:
        model, tokenizer = load_model(model_name)
        bits = VARIANTS[name]
        if bits is not None:
            model = quantize_rtn(model, bits=bits, group_size=group_size)
        model = model.to(device)
        held = parameter_bytes(model)
        resident = held["parameters"] + held["buffers"]
        torch.manual_seed(0)  # the same LoRA initialisation in every variant
        peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear"))
        peft_model.train()
        trainable = [p for p in peft_model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=1e-4)
        built[name] = {"model": peft_model, "optimizer": optimizer, "resident_bytes": resident,
                       "trainable": sum(p.numel() for p in trainable)}
    return built, tokenizer


def step(entry: dict[str, Any], ids: torch.Tensor, device: str) -> tuple[float, float]:
    """One optimizer step; returns (seconds, loss)."""
    synchronize(device)
    start = time.perf_counter()
    loss = entry["model"](input_ids=ids, labels=ids).loss
    loss.backward()
    entry["optimizer"].step()
    entry["optimizer"].zero_grad(set_to_none=True)
    synchronize(device)
    return time.perf_counter() - start, float(loss)


def main() -> None:
    parser = benchmark_parser(__doc__, "lora-speed", devices=("cpu", "cuda"))
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds (one step of each variant per round)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--group-size", type=int, default=128)
    args = parser.parse_args()
    if not start_benchmark(args, lambda payload: markdown(payload["settings"], payload["results"])):
        return
    if args.quick:
        args.model, args.rounds, args.batch_size, args.seq_len = "tiny-llama", 2, 2, 32
    if REFERENCE not in args.variants:
        args.variants = [REFERENCE, *args.variants]
    built, tokenizer = build(args.variants, args.model, args.group_size, args.rank, args.device)
    ids = _batch(tokenizer, args.batch_size, args.seq_len, args.device)
    first_loss = {}
    for name, entry in built.items():  # warm-up step (allocator, kernels); its loss is the untrained adapters'
        _, first_loss[name] = step(entry, ids, args.device)
    seconds: dict[str, list[float]] = {name: [] for name in built}
    for round_index in range(args.rounds):
        order = list(built)[round_index % len(built):] + list(built)[:round_index % len(built)]  # rotate who goes first
        for name in order:
            seconds[name].append(step(built[name], ids, args.device)[0])
        logger.info("round %d/%d: %s", round_index + 1, args.rounds,
                    ", ".join(f"{name} {seconds[name][-1]:.2f} s" for name in built))
    results = {
        name: {
            "median_step_s": statistics.median(seconds[name]),
            "step_s": seconds[name],
            # speed_ratio takes rates: steps per second, so the ratio is the reference's time over this one's.
            "speed_vs_float": speed_ratio([1 / s for s in seconds[name]], [1 / s for s in seconds[REFERENCE]]),
            "first_loss": first_loss[name],
            "resident_bytes": entry["resident_bytes"],
            "trainable_parameters": entry["trainable"],
        }
        for name, entry in built.items()
    }
    settings = {key: getattr(args, key) for key in ("model", "variants", "rounds", "batch_size", "seq_len", "rank",
                                                     "group_size", "threads", "device")}
    table = markdown(settings, results)
    write_benchmark(args.output_name, settings, results, table)
    print(table)


def markdown(settings: dict[str, Any], results: dict[str, Any]) -> str:
    float_bytes = results[REFERENCE]["resident_bytes"]
    lines = [
        f"# LoRA training step on a packed model vs the float model ({settings['model']}, {settings['device']})",
        "",
        f"peft LoRA r={settings['rank']} on all linear layers, AdamW; batch {settings['batch_size']} x "
        f"{settings['seq_len']} Wikipedia tokens; packed: 4-bit round-to-nearest, group {settings['group_size']}. "
        f"Median of {settings['rounds']} interleaved rounds after one warm-up step; the speed ratio is the median of "
        "the per-round ratios. Torch threads: "
        f"{settings['threads']}.",
        "",
        "| variant | s / step | speed vs float | first-step loss | resident MB (x float) | trainable parameters |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in results.items():
        lines.append(f"| {name} | {row['median_step_s']:.2f} | {row['speed_vs_float']:.2f}x | {row['first_loss']:.4f} | "
                     f"{row['resident_bytes'] / 1e6:.1f} ({row['resident_bytes'] / float_bytes:.2f}) | "
                     f"{row['trainable_parameters']:,} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
