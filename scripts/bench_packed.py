#!/usr/bin/env python
"""Packed low-bit decode benchmark → bench/results/<output-name>.{json,md}.

SmolLM2-135M-Instruct, batch 1, greedy decode after a ``--prompt-tokens`` Wikipedia prompt, every variant in
one process, measured in interleaved rounds (round r runs every variant once) so the ratios are side by side:

- ``dense-fp32`` / ``dense-bf16``: the model as loaded / cast to bfloat16;
- ``packed4-reference``: round-to-nearest 4-bit g128 packed layers (``quantize_rtn``, the packing an untrained
  DL-QAT adapter exports) with ``kernel="reference"`` (every call unpacks the whole layer: what ran before);
- ``packed4-fast`` / ``packed3-fast`` / ``packed2-fast``: ``kernel="fast"``: on CPU PyTorch's int4 kernel over a
  once-converted copy of the codes, computing in bfloat16 inside the float32 model; on CUDA the Triton kernel;
- ``packed4-bf16``: the 4-bit model cast to bfloat16 with ``kernel="auto"`` (the kernels within bf16 tolerance).

Reported per variant: decode tokens/s (median over rounds of the rate after the first new token) and its ratio
to ``dense-fp32`` (and ``dense-bf16``); resident bytes (parameters + buffers + the kernel cache after decoding)
and ratio; whether the greedy tokens equal the float32 reference path's (``packed4-*`` only: the same weights).

Usage:
    python scripts/bench_packed.py
    python scripts/bench_packed.py --quick --output-name packed-smoke
    python scripts/bench_packed.py --device cuda   # → bench/results/gpu/packed.{json,md}
    python scripts/bench_packed.py --render packed
"""

from __future__ import annotations

import copy
import logging
import resource
import statistics
from typing import Any

import torch

from hf_compress.assets import load_model, load_text
from hf_compress.evaluation.memory import parameter_bytes
from hf_compress.evaluation.report import benchmark_parser, start_benchmark, write_benchmark
from hf_compress.evaluation.speed import measure_generation_speed, speed_ratio
from hf_compress.quantization import quantize_rtn
from hf_compress.quantization.kernels import kernel_cache_bytes, set_packed_kernel


logger = logging.getLogger("bench_packed")

# name: (bits or None for dense, dtype, kernel setting)
VARIANTS: dict[str, tuple[int | None, torch.dtype, str]] = {
    "dense-fp32": (None, torch.float32, ""),
    "dense-bf16": (None, torch.bfloat16, ""),
    "packed4-reference": (4, torch.float32, "reference"),
    "packed4-fast": (4, torch.float32, "fast"),
    "packed4-bf16": (4, torch.bfloat16, "auto"),
    "packed3-fast": (3, torch.float32, "fast"),
    "packed2-fast": (2, torch.float32, "fast"),
}


def build(names: list[str], base, group_size: int, device: str) -> dict[str, Any]:
    """Every variant, each bit width quantized once (a copy of the packed model per kernel setting)."""
    packed: dict[int, Any] = {}
    models = {}
    for name in names:
        bits, dtype, kernel = VARIANTS[name]
        logger.info("building %s", name)
        if bits is None:
            model = copy.deepcopy(base)
        else:
            if bits not in packed:
                packed[bits] = quantize_rtn(copy.deepcopy(base), bits=bits, group_size=group_size)
            model = copy.deepcopy(packed[bits])
            set_packed_kernel(model, kernel)
        models[name] = model.to(device=device, dtype=dtype).eval()
    return models


def resident_bytes(model) -> dict[str, int]:
    held = parameter_bytes(model)
    cache = kernel_cache_bytes(model)
    return {"parameters_and_buffers": held["parameters"] + held["buffers"], "kernel_cache": cache,
            "resident": held["parameters"] + held["buffers"] + cache}


# ------------------------------------------------------------------------------------------ report
def _speed_ratio(row: dict[str, Any], reference: dict[str, Any] | None) -> float | None:
    """Decode tokens/s over ``reference``'s (``speed_ratio``: every variant runs once per round)."""
    if not reference:
        return None
    if row.get("decode_rounds") and reference.get("decode_rounds"):
        return speed_ratio(row["decode_rounds"], reference["decode_rounds"])
    return row["decode_tokens_per_s"] / reference["decode_tokens_per_s"]


def markdown(payload: dict[str, Any]) -> str:
    settings, results = payload["settings"], payload["results"]
    dense = results.get("dense-fp32")
    dense16 = results.get("dense-bf16")
    lines = [
        f"# Packed low-bit decode — SmolLM2-135M-Instruct, batch 1, {settings['device_note']}",
        "",
        f"Greedy decode of {settings['decode_tokens']} tokens after a {settings['prompt_tokens']}-token prompt; "
        f"{settings.get('rounds_done', settings['rounds'])} interleaved rounds (each round runs every variant once), "
        "medians. Packed models: "
        f"round-to-nearest g{settings['group_size']} (`quantize_rtn`). Resident = parameters + buffers + kernel "
        "cache after decoding (the tied float embedding included in every variant). Ratios are against the "
        "dense rows of the same run (medians of the per-round ratios).",
        "",
        "| variant | decode tok/s | vs dense fp32 | vs dense bf16 | resident MiB | vs dense fp32 | kernel cache MiB "
        "| greedy = fp32 reference |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        speed = r["decode_tokens_per_s"]
        vs = f"{_speed_ratio(r, dense):.2f}×" if dense else "–"
        vs16 = f"{_speed_ratio(r, dense16):.2f}×" if dense16 else "–"
        mem = r["memory"]
        mem_ratio = f"{mem['resident'] / dense['memory']['resident']:.3f}×" if dense else "–"
        agree = r.get("greedy_equal_to_reference")
        agree = "–" if agree is None else f"{agree['equal_tokens']}/{agree['tokens']}"
        lines.append(f"| {name} | {speed:.1f} | {vs} | {vs16} | {mem['resident'] / 2**20:.1f} | {mem_ratio} | "
                     f"{mem['kernel_cache'] / 2**20:.1f} | {agree} |")
    lines += ["", "## Targets", ""]
    if dense and "packed4-fast" in results:
        ratio = _speed_ratio(results["packed4-fast"], dense)
        target = 0.5 if settings["device"] == "cpu" else None
        lines.append(f"- packed 4-bit (`kernel=\"fast\"`) decode: {ratio:.2f}× dense fp32"
                     + (f" ({'met' if ratio >= target else 'MISSED'}: ≥ {target}× on CPU)." if target else "."))
    if dense and "packed4-reference" in results:
        ratio = _speed_ratio(results["packed4-reference"], dense)
        lines.append(f"- the reference path (unpack every call) runs at {ratio:.2f}× dense fp32.")
    if dense16 and "packed4-bf16" in results:
        ratio = _speed_ratio(results["packed4-bf16"], dense16)
        target = 1.0 if settings["device"] != "cpu" else None
        lines.append(f"- packed 4-bit bf16 model decode: {ratio:.2f}× dense bf16"
                     + (f" ({'met' if ratio >= target else 'MISSED'}: ≥ {target}× on GPU)." if target else "."))
    lines += ["", "## Notes", "",
              "- On CPU, `fast`/`auto` use PyTorch's int4 kernel, which computes in bfloat16; in a float32 model this "
              "rounds the packed layers' activations to bfloat16 (hence the greedy-agreement column). `auto` keeps "
              "the exact reference for float32 activations on CPU.",
              "- The kernel cache is a copy of the codes in the kernel's layout: for 4 bits as large as the packed "
              "codes, for 3/2 bits larger than them (4 bits per weight either way). The checkpoint is unchanged.",
              f"- Process peak RSS over the whole run (all variants held at once): {settings['peak_rss_mib']:.0f} MiB.",
              "- Timings on a shared machine: only ratios from the same run are meaningful; differences of a few "
              "percent are ties."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = benchmark_parser(__doc__, "packed", devices=("cpu", "cuda"))
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--group-size", type=int, default=128)
    args = parser.parse_args()
    if not start_benchmark(args, markdown):
        return
    if args.quick:
        args.decode_tokens, args.rounds, args.prompt_tokens = 8, 1, 16
    device = args.device
    settings = {k: v for k, v in vars(args).items() if k not in ("render", "supported_devices")}
    settings["device_note"] = (f"CPU, {torch.get_num_threads()} threads" if device == "cpu"
                               else torch.cuda.get_device_name(torch.device(device)))
    base, tokenizer = load_model("smollm2-135m")
    text = "\n\n".join(load_text("wikipedia", split="eval")["text"])
    prompt = tokenizer(text, return_tensors="pt").input_ids[:, : args.prompt_tokens]
    models = build(args.variants, base, args.group_size, device)
    del base
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in models}

    def save() -> dict[str, Any]:  # after every round: a run cut short still leaves its rounds so far
        reference = runs.get("packed4-reference", [None])[0]
        results: dict[str, Any] = {}
        for name, measured in runs.items():
            rates = [m["decode_tokens_per_second"] for m in measured]
            results[name] = {"decode_tokens_per_s": statistics.median(rates), "decode_rounds": rates,
                             "memory": resident_bytes(models[name]), "tokens": measured[0]["outputs"][0]}
            if reference is not None and name.startswith("packed4"):
                ours, theirs = measured[0]["outputs"][0], reference["outputs"][0]
                same = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
                results[name]["greedy_equal_to_reference"] = {"equal_tokens": same, "tokens": len(theirs)}
        settings["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        settings["rounds_done"] = min(len(measured) for measured in runs.values())
        payload = {"settings": settings, "results": results}
        write_benchmark(args.output_name, settings, results, markdown(payload))
        return payload

    for round_index in range(args.rounds):
        for name, model in models.items():
            logger.info("round %d/%d: %s", round_index + 1, args.rounds, name)
            with torch.inference_mode():
                runs[name].append(measure_generation_speed(model, None, [prompt], args.decode_tokens,
                                                           warmup=1 if round_index == 0 else 0,
                                                           progress=False, force_length=True))
        payload = save()
    print(markdown(payload))


if __name__ == "__main__":
    main()
