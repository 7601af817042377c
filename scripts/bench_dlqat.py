#!/usr/bin/env python
"""DL-QAT benchmark → bench/results/<output-name>.{json,md}.

For every quantization setting (``bits:group_size``, ``-1`` = per-channel) it compares, under the same
code (a DL-QAT adapter with parts switched off) and the same training budget:

- ``rtn``: round-to-nearest, nothing trained (the adapter at initialisation);
- ``magnitude``: only the group magnitudes train (PEQA-like);
- ``lora``: only the LoRA in quantization space trains;
- ``dlqat``: both.

Each trained variant runs ``--steps`` Trainer steps of next-token loss on the Wikipedia calibration
split (``--batch-size`` × ``--seq-len`` tokens a step). Every variant is then exported with
``merge_and_quantize()``, and the **packed** model is what gets evaluated (through ``dequantize()``, which
gives bit-identical outputs at float-matmul speed; checked on every row): perplexity on the Wikipedia
eval split, plus zero-shot ARC-Easy and PIQA (``--tasks`` adds HellaSwag) on fixed seeded subsets. The table also reports
the largest |logit| difference between the packed model and the fake-quant model it came from, the
packed linear bytes against bf16, the trainable share and the training time.

The LoRA rank defaults to the largest (≤ 16) that keeps the trainable parameters under 1% of the model
(``--rank`` overrides it). The full-precision model is evaluated once in bf16 (``--base-dtype``).

Usage:
    python scripts/bench_dlqat.py                                   # 3-bit g128 (all variants), 2-bit g128, 4-bit per-channel
    python scripts/bench_dlqat.py --settings 3:128 --steps 60 --output-name dlqat
    python scripts/bench_dlqat.py --quick                           # a smoke run
    python scripts/bench_dlqat.py --render dlqat                    # rebuild dlqat.md from dlqat.json
"""

from __future__ import annotations

import logging
import tempfile
from typing import Any

import torch
from peft import get_peft_model

from hf_compress.assets import load_model, load_text
from hf_compress.evaluation.report import benchmark_parser, device_description, start_benchmark, write_benchmark
from hf_compress.evaluation.suite import EvaluationSettings, evaluate_row
from hf_compress.modeling import calibration_batches
from hf_compress.quantization import DLQATConfig, packed_size
from hf_compress.training import TrainingSettings, causal_lm_dataset, train_with_trainer


logger = logging.getLogger("bench_dlqat")

TASKS = ("arc_easy", "piqa", "hellaswag")
DEFAULT_TASKS = ("arc_easy", "piqa")  # HellaSwag costs ~2 s an example on 2 CPU cores
VARIANTS: dict[str, dict[str, bool]] = {
    "rtn": {"use_magnitude": False, "use_lora": False},
    "magnitude": {"use_magnitude": True, "use_lora": False},
    "lora": {"use_magnitude": False, "use_lora": True},
    "dlqat": {"use_magnitude": True, "use_lora": True},
}
# What the default run compares: every variant at 3-bit g128, RTN vs DL-QAT elsewhere.
DEFAULT_PLAN = {"3:128": ("rtn", "magnitude", "lora", "dlqat"), "2:128": ("rtn", "dlqat"), "4:-1": ("rtn", "dlqat")}
TRAINABLE_BUDGET = 0.01


def main() -> None:
    parser = benchmark_parser(__doc__, "dlqat", threads=None, devices=("cpu", "cuda"))
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--settings", nargs="+", default=list(DEFAULT_PLAN), help="bits:group_size (-1: per-channel)")
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=None,
                        help="variants for every setting (default: all at 3:128, rtn and dlqat elsewhere)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--rank", type=int, default=None, help="LoRA rank (default: largest keeping < 1%% trainable)")
    parser.add_argument("--max-windows", type=int, default=32, help="512-token eval windows (evenly spaced)")
    parser.add_argument("--zero-shot-limit", type=int, default=500, help="seeded subset size per task (0: skip)")
    parser.add_argument("--tasks", nargs="+", default=list(DEFAULT_TASKS), choices=TASKS,
                        help="zero-shot tasks")
    parser.add_argument("--base-dtype", default="bfloat16", choices=["bfloat16", "float32", "none"])
    args = parser.parse_args()
    if not start_benchmark(args, lambda payload: _markdown(payload["settings"], payload["results"]["rows"])):
        return
    if args.quick:
        args.steps, args.max_windows, args.zero_shot_limit = 2, 2, 8
    evaluation = EvaluationSettings(
        perplexity_sets=("wikipedia",), window=512, max_windows=args.max_windows,
        zero_shot_tasks=tuple(args.tasks) if args.zero_shot_limit else (), zero_shot_limit=args.zero_shot_limit or None,
        batch_size=4,
    )
    payload = {
        "model": args.model, "device": device_description(args.device), "evaluation": evaluation.to_dict(),
        "training": {"steps": args.steps, "batch_size": args.batch_size, "seq_len": args.seq_len,
                     "learning_rate": args.learning_rate, "text": "wikipedia calibration split", "seed": 0,
                     "loss": "next-token cross-entropy"},
    }
    rows: list[dict[str, Any]] = []
    if args.base_dtype != "none":
        model, tokenizer = load_model(args.model)
        model.to(args.device, getattr(torch, args.base_dtype))
        rows.append(evaluate_row(model, tokenizer, evaluation, {"setting": "-", "variant": args.base_dtype}, "base"))
        write_benchmark(args.output_name, payload, {"rows": rows}, _markdown(payload, rows))
        del model
    for setting in args.settings:
        bits, group_size = (int(part) for part in setting.split(":"))
        for variant in args.variants or DEFAULT_PLAN.get(setting, tuple(VARIANTS)):
            rows.append(_run_variant(args, evaluation, bits, group_size, variant))
            write_benchmark(args.output_name, payload, {"rows": rows}, _markdown(payload, rows))


def _rank_under_budget(model: torch.nn.Module, fields: dict[str, Any]) -> int:
    """Largest LoRA rank ≤ 16 keeping magnitudes + LoRA under ``TRAINABLE_BUDGET`` of the model's parameters."""
    total = sum(p.numel() for p in model.parameters())
    probe = get_peft_model(model, DLQATConfig(**{**fields, "r": 1, "use_lora": True, "use_magnitude": True}))
    magnitudes = sum(p.numel() for n, p in probe.named_parameters() if "dlqat_magnitude" in n)
    per_rank = sum(p.numel() for n, p in probe.named_parameters() if "dlqat_A" in n or "dlqat_B" in n)
    probe.unload()
    return max(1, min(16, int((TRAINABLE_BUDGET * total - magnitudes) // per_rank)))


def train_adapter(args, peft_model, tokenizer, seq_len: int) -> tuple[float, list[float]]:
    """``args.steps`` Trainer steps of next-token loss on the Wikipedia calibration split; (seconds, losses)."""
    data = causal_lm_dataset(load_text("wikipedia", "calibration"), tokenizer,
                             num_sequences=args.steps * args.batch_size, seq_len=seq_len, seed=0)
    with tempfile.TemporaryDirectory() as folder:
        result = train_with_trainer(peft_model, data, folder, TrainingSettings(
            max_steps=args.steps, learning_rate=args.learning_rate, per_device_batch_size=args.batch_size,
            logging_steps=max(1, args.steps // 6), use_cpu=torch.device(args.device).type == "cpu",
        ))
    return result["train_seconds"], [h["loss"] for h in result["log_history"] if "loss" in h]


def _run_variant(args, evaluation, bits: int, group_size: int, variant: str) -> dict[str, Any]:
    logger.info("=== %d-bit, group %d: %s", bits, group_size, variant)
    model, tokenizer = load_model(args.model)
    model.to(args.device)
    total = sum(p.numel() for p in model.parameters())
    fields = {"bits": bits, "group_size": group_size, "target_modules": "all-linear", **VARIANTS[variant]}
    rank = args.rank or _rank_under_budget(model, fields)
    config = DLQATConfig(**fields, r=rank, lora_alpha=float(rank))
    peft_model = get_peft_model(model, config)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    row: dict[str, Any] = {
        "setting": f"{bits}:{group_size}", "variant": variant, "rank": rank if config.use_lora else None,
        "trainable_params": trainable, "trainable_percent": 100 * trainable / total, "train_seconds": 0.0,
    }
    if trainable:
        row["train_seconds"], row["losses"] = train_adapter(args, peft_model, tokenizer, args.seq_len)
    peft_model.eval()
    probe_ids = calibration_batches(load_text("wikipedia", "eval"), tokenizer, num_sequences=2, seq_len=128, seed=1)
    probe_ids = probe_ids.to(args.device)
    with torch.no_grad():
        fake_quant = peft_model(probe_ids).logits
        packed = peft_model.merge_and_quantize()
        packed_logits = packed(probe_ids).logits
        row["max_abs_logit_diff_packed_vs_fake_quant"] = float((packed_logits - fake_quant).abs().max())
        row["logit_scale"] = float(fake_quant.abs().max())
    size = packed_size(packed)
    row["packed_bytes"], row["bf16_bytes"] = size["packed"], size["bf16"]
    row["packed_ratio_vs_bf16"] = size["packed"] / size["bf16"]
    # The packed layers unpack their codes on every call, which makes the many short forwards of the
    # zero-shot tasks ~9x slower on CPU. `dequantize()` swaps in nn.Linear layers holding exactly the
    # weights the packed layers compute with, so the measured outputs are the packed model's, bit for bit.
    with torch.no_grad():
        dequantized = packed.dequantize()
        if not torch.equal(dequantized(probe_ids).logits, packed_logits):
            raise RuntimeError("dequantized and packed models disagree")
    return evaluate_row(dequantized, tokenizer, evaluation, row, f"{row['setting']} {row['variant']}")


def _markdown(settings: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    training, evaluation = settings["training"], settings["evaluation"]
    base = next((r for r in rows if r["setting"] == "-"), None)
    with_errors = any("zero_shot_stderr" in row for row in rows)
    lines = [
        f"# DL-QAT: {settings['model']} on {settings['device']}",
        "",
        f"Training: {training['steps']} Trainer steps × {training['batch_size']} × {training['seq_len']} tokens "
        f"of the {training['text']} ({training['loss']}), AdamW lr {training['learning_rate']}, linear decay; "
        "the same budget for every trained variant. Every row is the exported packed model "
        "(`merge_and_quantize()`), evaluated through `dequantize()` (bit-identical logits, checked).",
        f"Perplexity: Wikipedia eval split, {evaluation['max_windows'] or 'all'} 512-token windows. Zero-shot: "
        + (", ".join(evaluation["zero_shot_tasks"]) + f" ({evaluation['zero_shot_limit']} seeded examples each; "
           "average of acc_norm where defined" + (", ± one standard error)" if with_errors else "; no standard errors "
                                                  "recorded: differences cannot be judged)")
           if evaluation["zero_shot_tasks"] else "not run") + ".",
        "",
        "| setting | variant | LoRA r | trainable % | train s | ppl | gap closed | zero-shot avg | packed × bf16 "
        "| max Δlogit packed vs fake-quant |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if row["setting"] == "-":
            lines.append(f"| {row['variant']} (unquantized) | - | | | | {row['perplexity']:.2f} | | {_zs(row)} | 1.000 | |")
            continue
        lines.append(
            f"| {_setting(row['setting'])} | {row['variant']} | {row['rank'] or '-'} | {row['trainable_percent']:.2f} "
            f"| {row['train_seconds']:.0f} | {row['perplexity']:.2f} | {_gap(row, rows, base)} | {_zs(row)} "
            f"| {row['packed_ratio_vs_bf16']:.3f} | {row['max_abs_logit_diff_packed_vs_fake_quant']:.1e} |"
        )
    lines += ["", "Gap closed: (ppl RTN − ppl variant) / (ppl RTN − ppl unquantized), same setting.",
              "", "## Targets", ""] + _targets(rows, base)
    return "\n".join(lines)


def _setting(setting: str) -> str:
    bits, group = setting.split(":")
    return f"{bits}-bit {'per-channel' if group == '-1' else 'g' + group}"


def _zs(row: dict[str, Any]) -> str:
    if "zero_shot_average" not in row:
        return "n/a"
    error = row.get("zero_shot_stderr")  # absent from runs before standard errors were kept
    return f"{row['zero_shot_average']:.4f}" + (f" ± {error:.4f}" if error is not None else "")


def _gap_closed(row, rows, base) -> float | None:
    rtn = next((r for r in rows if r["setting"] == row["setting"] and r["variant"] == "rtn"), None)
    if base is None or rtn is None or rtn["perplexity"] <= base["perplexity"]:
        return None
    return (rtn["perplexity"] - row["perplexity"]) / (rtn["perplexity"] - base["perplexity"])


def _gap(row, rows, base) -> str:
    closed = _gap_closed(row, rows, base)
    if closed is None or row["variant"] == "rtn":
        return ""
    # A linear gap says little when both ends are far off: flag models that remain unusable.
    unusable = base is not None and row["perplexity"] > 10 * base["perplexity"]
    return f"{100 * closed:.0f}%" + (" (still unusable: ppl > 10× unquantized)" if unusable else "")


def _targets(rows: list[dict[str, Any]], base) -> list[str]:
    lines = []
    quantized = [r for r in rows if r["setting"] != "-"]
    if quantized:
        worst = max(r["trainable_percent"] for r in quantized)
        lines.append(f"- Trainable parameters < 1% of the model: largest {worst:.2f}%: "
                     f"**{'met' if worst < 1 else 'missed'}**")
        over = [r for r in quantized if r["packed_ratio_vs_bf16"] > int(r["setting"].split(':')[0]) / 16 + 0.10]
        lines.append("- Packed linear weights ≤ bits/16 + 10% of their bf16 bytes: "
                     f"**{'met' if not over else 'missed'}** (largest excess over bits/16: "
                     f"{max(r['packed_ratio_vs_bf16'] - int(r['setting'].split(':')[0]) / 16 for r in quantized):+.3f})")
        worst_diff = max(r["max_abs_logit_diff_packed_vs_fake_quant"] / max(r["logit_scale"], 1e-12) for r in quantized)
        lines.append(f"- Packed logits equal the merged fake-quant logits to float tolerance: largest |Δ| / max|logit| "
                     f"= {worst_diff:.1e} (tolerance 1e-5): **{'met' if worst_diff <= 1e-5 else 'missed'}**")
    for row in rows:
        if row["setting"] != "3:128" or row["variant"] != "dlqat":
            continue
        closed = _gap_closed(row, rows, base)
        others = [r for r in rows if r["setting"] == "3:128" and r["variant"] in ("magnitude", "lora")]
        beats = all(row["perplexity"] < r["perplexity"] for r in others) and len(others) == 2
        budget = row["train_seconds"] <= 30 * 60
        met = closed is not None and closed >= 0.5 and beats and budget
        lines.append(
            f"- 3-bit g128: DL-QAT closes {'n/a' if closed is None else f'{100 * closed:.0f}%'} of the RTN → "
            f"unquantized perplexity gap (target ≥ 50%) in {row['train_seconds'] / 60:.1f} min of CPU training "
            f"(budget ≤ 30 min), {'beating' if beats else 'not beating'} both ablations"
            f"{'' if len(others) == 2 else ' (ablations not run)'}: **{'met' if met else 'missed'}**"
        )
    return lines


if __name__ == "__main__":
    main()
