#!/usr/bin/env python
"""2:4 semi-structured sparse kernels vs dense on CUDA → bench/results/gpu/<output-name>.{json,md}.

1. Linear layers: ``F.linear`` with a 2:4 weight stored dense vs as PyTorch's semi-structured sparse tensor, each
   backend (cuSPARSELt; CUTLASS on compute capability 8.x, the only GPUs its kernels run on), what
   ``hf_compress.formats.sparse.to_semi_structured(backend=...)`` installs, for a 4096 × 4096 layer and SmolLM2-135M's
   layer shapes, at several token counts (1 = one-token decode, larger = prefill), in bf16 (``--dtype``).
   Median of ``--repeats`` timings of ``--iterations`` calls each, CUDA-synchronised, both paths side by side.
2. The model (unless ``--skip-model``): SmolLM2-135M pruned 2:4 by magnitude, dense-masked vs semi-structured:
   a prefill forward of ``--prefill`` tokens and greedy decode tokens/s; the logits' largest difference.

CUDA only; on a machine without a GPU it refuses in one line.

Usage:
    python scripts/bench_semi_structured.py --device cuda
    python scripts/bench_semi_structured.py --device cuda --quick --skip-model
"""

from __future__ import annotations

import copy
import logging
import statistics
import time
from typing import Any

import torch
import torch.nn.functional as F

from hf_compress.evaluation.report import (
    benchmark_parser,
    device_description,
    start_benchmark,
    synchronize,
    write_benchmark,
)


logger = logging.getLogger("bench_semi_structured")

# (name, out_features, in_features); SmolLM2-135M: hidden 576, 3 key/value heads of 64, MLP 1536.
SHAPES = [("4096x4096", 4096, 4096), ("smollm2 q/o_proj", 576, 576), ("smollm2 k/v_proj", 192, 576),
          ("smollm2 gate/up_proj", 1536, 576), ("smollm2 down_proj", 576, 1536)]


def _two_of_four(rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    weight = torch.randn(rows, cols, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    keep = weight.abs().view(rows, cols // 4, 4).topk(2, dim=-1).indices
    mask = torch.zeros(rows, cols // 4, 4, dtype=torch.bool, device=device).scatter_(-1, keep, True)
    return weight * mask.view(rows, cols)


def _median_seconds(call, iterations: int, repeats: int, device: torch.device) -> float:
    for _ in range(3):  # warm-up (kernel selection, caches)
        call()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(iterations):
            call()
        synchronize(device)
        times.append((time.perf_counter() - start) / iterations)
    return statistics.median(times)


def bench_layers(args, dtype: torch.dtype, device: torch.device) -> list[dict[str, Any]]:
    from hf_compress.formats.sparse import semi_structured_backends, semi_structured_weight

    backends = semi_structured_backends(device)
    logger.info("backends timed on this GPU: %s", ", ".join(backends))
    rows_out = []
    for name, rows, cols in SHAPES:
        dense_weight = _two_of_four(rows, cols, dtype, device)
        sparse = {backend: semi_structured_weight(dense_weight, backend) for backend in backends}
        for tokens in args.tokens:
            x = torch.randn(tokens, cols, generator=torch.Generator().manual_seed(1)).to(device, dtype)
            row: dict[str, Any] = {"layer": name, "shape": [rows, cols], "tokens": tokens}
            with torch.no_grad():
                row["dense_us"] = _median_seconds(lambda: F.linear(x, dense_weight), args.iterations, args.repeats,
                                                  device) * 1e6
                for backend, weight in sparse.items():
                    error = F.linear(x, weight) - F.linear(x, dense_weight)
                    row[f"{backend}_max_abs_error"] = error.abs().max().item()
                    row[f"{backend}_us"] = _median_seconds(lambda: F.linear(x, weight), args.iterations, args.repeats,
                                                           device) * 1e6
                    row[f"{backend}_speedup"] = row["dense_us"] / row[f"{backend}_us"]
            rows_out.append(row)
            logger.info("%s x %d tokens: dense %.1f us, %s", name, tokens, row["dense_us"],
                        ", ".join(f"{b} {row[f'{b}_us']:.1f} us ({row[f'{b}_speedup']:.2f}x)" for b in backends))
    return rows_out


def bench_model(args, dtype: torch.dtype, device: torch.device) -> dict[str, Any]:
    from hf_compress.assets import load_model
    from hf_compress.formats.sparse import to_semi_structured
    from hf_compress.pruning import MagnitudePruner

    model, tokenizer = load_model("smollm2-135m", dtype=dtype)
    MagnitudePruner(model, tokenizer).prune("2:4", progress=False)
    dense = model.to(device).eval()
    sparse = copy.deepcopy(dense)
    converted = to_semi_structured(sparse, backend=args.model_backend)
    ids = torch.randint(3, 40000, (1, args.prefill), generator=torch.Generator().manual_seed(0)).to(device)
    results: dict[str, Any] = {"converted_layers": len(converted), "backend": args.model_backend}
    with torch.no_grad():
        results["max_abs_logit_difference"] = (sparse(ids).logits.float() - dense(ids).logits.float()).abs().max().item()
        for label, m in (("dense", dense), ("semi_structured", sparse)):
            results[f"{label}_prefill_ms"] = _median_seconds(lambda: m(ids), 1, args.repeats, device) * 1e3
            greedy = {"max_new_tokens": args.new_tokens, "min_new_tokens": args.new_tokens, "do_sample": False,
                      "pad_token_id": tokenizer.eos_token_id}
            seconds = _median_seconds(lambda: m.generate(ids[:, :16], **greedy), 1, max(1, args.repeats // 2), device)
            results[f"{label}_decode_tokens_per_s"] = args.new_tokens / seconds
    results["prefill_speedup"] = results["dense_prefill_ms"] / results["semi_structured_prefill_ms"]
    results["decode_speedup"] = results["semi_structured_decode_tokens_per_s"] / results["dense_decode_tokens_per_s"]
    return results


def markdown(payload: dict[str, Any]) -> str:
    settings, results = payload["settings"], payload["results"]
    lines = [f"# 2:4 semi-structured sparse kernels vs dense ({settings['dtype']}, {payload.get('device') or 'cuda'})", "",
             "Same 2:4 weight, stored dense (dense GEMM) and as PyTorch's semi-structured sparse tensor with each "
             f"backend (cuSPARSELt, CUTLASS); median of {settings['repeats']} × {settings['iterations']} calls each, "
             "side by side in one run. Speed-up = dense time / sparse time.", "",
             "| layer | [out, in] | tokens | dense µs | cuSPARSELt µs | speed-up | CUTLASS µs | speed-up "
             "| max abs error |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    # Runs from before the backends were timed apart measured PyTorch's default there, cuSPARSELt.
    layers = [{**row, "cusparselt_us": row["semi_structured_us"], "cusparselt_speedup": row["speedup"],
               "cusparselt_max_abs_error": row["max_abs_error"]} if "semi_structured_us" in row else row
              for row in results["layers"]]
    for row in layers:
        error = max(row.get(f"{b}_max_abs_error", 0.0) for b in ("cusparselt", "cutlass"))
        cells = [f"{row[f'{b}_us']:.1f} | {row[f'{b}_speedup']:.2f}×" if f"{b}_us" in row else "— | —"
                 for b in ("cusparselt", "cutlass")]
        lines.append(f"| {row['layer']} | {row['shape']} | {row['tokens']} | {row['dense_us']:.1f} | {cells[0]} | "
                     f"{cells[1]} | {error:.2g} |")
    if not any("cutlass_us" in row for row in layers):
        lines += ["", "CUTLASS not timed (—): PyTorch's CUTLASS 2:4 kernels run on compute capability 8.x GPUs only."]
    model = results.get("model")
    if model:
        lines += ["", f"SmolLM2-135M pruned 2:4 (magnitude), {model['converted_layers']} layers converted "
                  f"({model.get('backend', 'auto')} backend); "
                  f"largest logit difference {model['max_abs_logit_difference']:.3g}.", "",
                  "| | dense-masked | semi-structured | ratio |", "|---|---:|---:|---:|",
                  f"| prefill {settings['prefill']} tokens, ms | {model['dense_prefill_ms']:.2f} | "
                  f"{model['semi_structured_prefill_ms']:.2f} | {model['prefill_speedup']:.2f}× |",
                  f"| greedy decode, tokens/s | {model['dense_decode_tokens_per_s']:.1f} | "
                  f"{model['semi_structured_decode_tokens_per_s']:.1f} | {model['decode_speedup']:.2f}× |"]
    big = [row for row in layers if row["layer"] == "4096x4096"]
    if big:
        lines += ["", "## Target", ""]
        for backend, label in (("cusparselt", "cuSPARSELt"), ("cutlass", "CUTLASS")):
            timed = [row for row in big if f"{backend}_speedup" in row]
            if timed:
                best = max(timed, key=lambda row: row[f"{backend}_speedup"])
                ratio = best[f"{backend}_speedup"]
                lines.append(f"- {label}, 4096 × 4096 {settings['dtype']}: best {ratio:.2f}× dense "
                             f"(at {best['tokens']} tokens; {'met' if ratio >= 1.3 else 'MISSED'}: ≥ 1.3×).")
    return "\n".join(lines)


def main() -> None:
    parser = benchmark_parser(__doc__, "semi_structured", threads=None, devices=("cuda",))
    parser.add_argument("--dtype", choices=("bfloat16", "float16"), default="bfloat16")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 128, 512, 2048])
    parser.add_argument("--iterations", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--prefill", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--skip-model", action="store_true", help="only the layer table")
    parser.add_argument("--model-backend", choices=("auto", "cusparselt", "cutlass"), default="auto",
                        help="the kernels the model section converts its layers to")
    args = parser.parse_args()
    if not start_benchmark(args, markdown):
        return
    if args.quick:
        args.tokens, args.iterations, args.repeats, args.prefill, args.new_tokens = [1, 512], 5, 3, 64, 8
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    settings = {k: v for k, v in vars(args).items() if k not in ("render", "supported_devices", "output_name")}
    results: dict[str, Any] = {"layers": bench_layers(args, dtype, device)}
    described = device_description(device)
    write_benchmark(args.output_name, settings, results, markdown({"settings": settings, "results": results, "device": described}))
    if not args.skip_model:
        results["model"] = bench_model(args, dtype, device)
        payload = {"settings": settings, "results": results, "device": described}
        json_path, md_path = write_benchmark(args.output_name, settings, results, markdown(payload))
        print(md_path.read_text())


if __name__ == "__main__":
    main()
