#!/usr/bin/env python
"""Dense SmolLM2-135M baselines that every method is compared with → bench/results/reference.{json,md}.

Measures, in one run on this machine: perplexity on the Wikipedia eval split and the Lee news corpus
(512-token windows, full sets), zero-shot accuracy on ARC-Easy, ARC-Challenge (full validation sets),
PIQA and HellaSwag (fixed seeded subsets, sizes below), greedy decoding tokens/s (median over prompts,
batch 1) and KV-cache bytes after a 2048-token prefill.

Usage:
    python scripts/bench_reference.py [--model smollm2-135m] [--quick]
"""

from __future__ import annotations


from hf_compress.assets import load_model
from hf_compress.evaluation.report import benchmark_parser, start_benchmark, write_benchmark
from hf_compress.evaluation.suite import EvaluationSettings, run_evaluation


TASKS = ("arc_easy", "arc_challenge", "piqa", "hellaswag")
# Full sets where they take minutes on 2 cores; fixed seeded subsets where the full set takes far longer.
LIMITS = {"arc_easy": None, "arc_challenge": None, "piqa": 1000, "hellaswag": 1000}


def main() -> None:
    parser = benchmark_parser(__doc__, "reference", threads=None, devices=("cpu", "cuda"))
    parser.add_argument("--model", default="smollm2-135m")
    args = parser.parse_args()
    if not start_benchmark(args, lambda payload: _markdown(payload["results"]["model"], payload["results"])):
        return

    settings = EvaluationSettings(
        perplexity_sets=("wikipedia", "news"),
        window=512,
        max_windows=8 if args.quick else None,
        zero_shot_tasks=TASKS,
        zero_shot_limit={task: 50 for task in TASKS} if args.quick else LIMITS,
        speed_prompts=3 if args.quick else 10,
        max_new_tokens=64,
        kv_seq_len=2048,
    )
    model, tokenizer = load_model(args.model)
    results, records = run_evaluation(model.to(args.device), tokenizer, settings)
    results["model"] = args.model
    results["records"] = [record.to_dict() for record in records]
    write_benchmark(args.output_name, settings.to_dict(), results, _markdown(args.model, results))


def _markdown(model: str, results: dict) -> str:
    ppl, zero_shot, speed, memory = (results[k] for k in ("perplexity", "zero_shot", "generation", "memory"))
    lines = [
        f"# Reference baselines: {model} (dense, fp32)",
        "",
        "| measurement | value | data / settings |",
        "|---|---|---|",
    ]
    for name, result in ppl.items():
        lines.append(f"| perplexity, {name} | {result['perplexity']:.3f} | {result['windows']} windows × "
                     f"{result['window']} tokens ({result['tokens']} predicted tokens) |")
    for task in TASKS:
        r = zero_shot[task]
        subset = "full validation set" if r["limit"] is None else f"fixed subset (seed {r['seed']})"
        lines.append(f"| {task} acc / acc_norm | {r['acc']:.4f} / {r['acc_norm']:.4f} | n={r['n']}, {subset}, 0-shot |")
    lines.append(f"| zero-shot average ({zero_shot['average']['metric']}) | {zero_shot['average']['score']:.4f} | "
                 f"{', '.join(zero_shot['average']['tasks'])} |")
    lines.append(f"| greedy decode tokens/s (median) | {speed['tokens_per_second']:.2f} | {speed['prompts']} prompts, "
                 f"batch 1, {speed['max_new_tokens']} new tokens |")
    kv = memory["kv_cache"]
    lines.append(f"| KV cache bytes at {kv['seq_len']} tokens | {kv['kv_bytes']:,} | {kv['cache_class']}, fp32 |")
    lines.append(f"| parameter bytes | {memory['parameters']:,} | {memory['parameter_count']:,} parameters, fp32 |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
