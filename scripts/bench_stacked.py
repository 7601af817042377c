#!/usr/bin/env python
"""Stacked compression benchmark (2:4 sparse + packed low-bit in one checkpoint) → bench/results/<output-name>.{json,md}.

Rows, all from one run on the same calibration and training data:

- ``dense``: the model as loaded (float32);
- ``dense + RTN`` / ``dense + DL-QAT``: 4-bit g128 on the dense model (references);
- ``SDS 2:4``: SDS around Wanda (``bench/results/pruning.md``'s settings), saved with ``save_pruned``;
- ``SDS 2:4 + RTN``: that model quantized round-to-nearest with its mask kept (a DL-QAT adapter at
  initialisation with nothing trainable, which is exactly RTN), saved stacked with ``save_packed``;
- ``SDS 2:4 + DL-QAT``: a DL-QAT adapter on the SDS model, mask fixed (``keep_sparsity="auto"``), trained
  ``--steps`` Trainer steps as in ``bench/results/dlqat.md``, merged, saved stacked.

Every quantized row is saved, reloaded with a plain ``AutoModelForCausalLM.from_pretrained`` and checked
(logits equal to the model before saving; for SDS rows, every dequantized decoder linear weight exactly 2:4),
then evaluated through ``dequantize()`` (bit-identical logits, checked) because the packed reference path
unpacks codes on every call. Columns: perplexity (Wikipedia eval split, ``--max-windows`` 512-token windows,
``run_evaluation``), the decoder linear weights' stored bytes against the same weights dense in fp32, the
folder's size on disk, and the seconds each step took (pruning, training).

Targets (issue 25): SDS 2:4 + DL-QAT 4-bit: decoder linear weights ≤ 0.2× dense fp32, perplexity ≤ 1.15× the
SDS 2:4 model alone.

Usage:
    python scripts/bench_stacked.py                      # SmolLM2-135M, the full plan
    python scripts/bench_stacked.py --quick --model tiny-llama --output-name stacked-quick
    python scripts/bench_stacked.py --render stacked     # rebuild stacked.md from stacked.json
"""

from __future__ import annotations

import copy
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM

from bench_dlqat import _rank_under_budget, train_adapter  # the LoRA-rank rule and training of bench/results/dlqat.md
from hf_compress.assets import load_model, load_text
from hf_compress.evaluation.report import benchmark_parser, device_description, start_benchmark, write_benchmark
from hf_compress.evaluation.suite import EvaluationSettings, evaluate_row
from hf_compress.formats.packed import save_packed
from hf_compress.modeling import calibration_batches, find_decoder_blocks, find_linear_layers
from hf_compress.pruning import PRUNERS, PruningConfig
from hf_compress.pruning.masks import check_pattern
from hf_compress.pruning.storage import save_pruned
from hf_compress.quantization import DLQATConfig, PackedLinear


logger = logging.getLogger("bench_stacked")

WEIGHT_TARGET, PERPLEXITY_TARGET = 0.2, 1.15


def main() -> None:
    parser = benchmark_parser(__doc__, "stacked", threads=None, devices=("cpu", "cuda"))
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--sds-base", default="wanda")
    parser.add_argument("--calibration-sequences", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512, help="calibration window of the pruning")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--train-seq-len", type=int, default=256)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--max-windows", type=int, default=32, help="512-token eval windows (evenly spaced)")
    parser.add_argument("--no-dense-dlqat", action="store_true", help="skip the dense DL-QAT reference row")
    args = parser.parse_args()
    if not start_benchmark(args, lambda payload: _markdown(payload["settings"], payload["results"]["rows"])):
        return
    if args.quick:
        args.steps, args.max_windows, args.calibration_sequences = 2, 2, 4
    evaluation = EvaluationSettings(perplexity_sets=("wikipedia",), window=512, max_windows=args.max_windows,
                                    zero_shot_tasks=(), batch_size=4)
    settings = {
        "model": args.model, "device": device_description(args.device), "evaluation": evaluation.to_dict(),
        "quantization": {"bits": args.bits, "group_size": args.group_size},
        "pruning": {"method": "sds", "base": args.sds_base, "sparsity": "2:4",
                    "calibration": {"sequences": args.calibration_sequences, "seq_len": args.seq_len, "seed": 0}},
        "training": {"steps": args.steps, "batch_size": args.batch_size, "seq_len": args.train_seq_len,
                     "learning_rate": args.learning_rate, "text": "wikipedia calibration split", "seed": 0},
    }
    rows: list[dict[str, Any]] = []

    def record(row: dict[str, Any]) -> None:
        rows.append(row)
        write_benchmark(args.output_name, settings, {"rows": rows}, _markdown(settings, rows))

    dense, tokenizer = load_model(args.model)
    dense.to(args.device).eval()
    dense_bytes = _dense_fp32_bytes(dense)
    reference = copy.deepcopy(dense)  # the dense rows come last: the stacked rows are what the targets judge

    sparse = dense
    del dense
    config = PruningConfig.from_dict({"method": "sds", "base": args.sds_base, "sparsity": "2:4",
                                      "num_calibration_sequences": args.calibration_sequences,
                                      "calibration_seq_len": args.seq_len})
    calibration = calibration_batches(load_text("wikipedia", "calibration"), tokenizer,
                                      num_sequences=args.calibration_sequences, seq_len=args.seq_len, seed=0)
    start = time.perf_counter()
    PRUNERS["sds"](sparse, tokenizer).prune(config, calibration, progress=False)
    seconds = time.perf_counter() - start
    _check_two_four({n: m.weight for n, m in _decoder_linears(sparse).items()}, "SDS 2:4")
    with tempfile.TemporaryDirectory() as folder:
        path = save_pruned(sparse, tokenizer, Path(folder) / "model", recipe=config)
        stored = _stored_sparse_bytes(path)
        disk = _disk_mb(path)
    row = {"row": "SDS 2:4", "seconds": seconds, "linear_ratio": stored / dense_bytes, "disk_mb": disk}
    record(evaluate_row(sparse, tokenizer, evaluation, row, "SDS 2:4"))
    record(_quantize(args, evaluation, copy.deepcopy(sparse), tokenizer, dense_bytes, "SDS 2:4 + DL-QAT", train=True,
                     sparse=True))
    record(_quantize(args, evaluation, sparse, tokenizer, dense_bytes, "SDS 2:4 + RTN", train=False, sparse=True))
    del sparse
    record(evaluate_row(reference, tokenizer, evaluation, {"row": "dense", "linear_ratio": 1.0, "seconds": 0.0}, "dense"))
    record(_quantize(args, evaluation, copy.deepcopy(reference), tokenizer, dense_bytes, "dense + RTN", train=False))
    if not args.no_dense_dlqat:
        record(_quantize(args, evaluation, reference, tokenizer, dense_bytes, "dense + DL-QAT", train=True))


def _quantize(args, evaluation, model, tokenizer, dense_bytes, name, train: bool, sparse: bool = False) -> dict[str, Any]:
    """DL-QAT (or RTN: the adapter at initialisation, nothing trainable) → merge → save_packed → reload → evaluate."""
    logger.info("=== %s", name)
    fields = {"bits": args.bits, "group_size": args.group_size, "target_modules": "all-linear"}
    if train:
        rank = _rank_under_budget(model, fields)
        config = DLQATConfig(**fields, r=rank, lora_alpha=float(rank))
    else:
        rank, config = None, DLQATConfig(**fields, use_lora=False, use_magnitude=False)
    peft_model = get_peft_model(model, config)
    row: dict[str, Any] = {"row": name, "rank": rank, "seconds": 0.0}
    if train:
        row["seconds"], row["losses"] = train_adapter(args, peft_model, tokenizer, args.train_seq_len)
    peft_model.eval()
    probe = calibration_batches(load_text("wikipedia", "eval"), tokenizer, num_sequences=2, seq_len=128, seed=1)
    probe = probe.to(args.device)
    with torch.no_grad():
        packed = peft_model.merge_and_quantize()
        packed_logits = packed(probe).logits
    layers = {n: m for n, m in packed.named_modules() if isinstance(m, PackedLinear)}
    row["sparse_layers"] = sum(m.is_sparse for m in layers.values())
    row["linear_ratio"] = sum(m.packed_bytes() for m in layers.values()) / dense_bytes
    with tempfile.TemporaryDirectory() as folder:
        path = save_packed(packed, tokenizer, Path(folder) / "model")
        row["disk_mb"] = _disk_mb(path)
        loaded = AutoModelForCausalLM.from_pretrained(path).to(args.device).eval()
    with torch.no_grad():
        row["reload_logits_equal"] = bool(torch.equal(loaded(probe).logits, packed_logits))
        if sparse:
            _check_two_four({n: m.dequantized_weight() for n, m in loaded.named_modules()
                             if isinstance(m, PackedLinear)}, name)
            row["exact_two_four"] = True
        dequantized = loaded.dequantize()
        if not torch.equal(dequantized(probe).logits, packed_logits):
            raise RuntimeError(f"{name}: the dequantized reloaded model and the packed model disagree")
    return evaluate_row(dequantized, tokenizer, evaluation, row, name)


def _decoder_linears(model) -> dict[str, torch.nn.Module]:
    prefix, blocks = find_decoder_blocks(model)
    return {f"{prefix}.{i}.{name}": layer for i, block in enumerate(blocks)
            for name, layer in find_linear_layers(block).items()}


def _dense_fp32_bytes(model) -> int:
    return sum(4 * layer.weight.numel() for layer in _decoder_linears(model).values())


def _check_two_four(weights: dict[str, torch.Tensor], name: str) -> None:
    bad = [n for n, w in weights.items() if not check_pattern(w, "2:4")]
    if bad:
        raise RuntimeError(f"{name}: {len(bad)} decoder linear weights are not exactly 2:4 (e.g. {bad[0]})")


def _stored_sparse_bytes(path: Path) -> int:
    import json

    return json.loads((path / "config.json").read_text())["quantization_config"]["storage"]["stored_linear_bytes"]


def _disk_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def _markdown(settings: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    quant, pruning, training = settings["quantization"], settings["pruning"], settings["training"]
    label = f"{quant['bits']}-bit g{quant['group_size']}"
    lines = [
        f"# Stacked compression (2:4 + {label} in one checkpoint): {settings['model']} on {settings['device']}",
        "",
        f"SDS around {pruning['base']} at 2:4, {pruning['calibration']['sequences']} × "
        f"{pruning['calibration']['seq_len']} calibration tokens (as `bench/results/pruning.md`). DL-QAT: "
        f"{training['steps']} Trainer steps × {training['batch_size']} × {training['seq_len']} tokens of the "
        f"{training['text']}, AdamW lr {training['learning_rate']} (as `bench/results/dlqat.md`); on the SDS model the "
        "mask stays fixed. RTN = the adapter at initialisation, nothing trained. Every quantized row is the reloaded "
        "checkpoint (`save_packed` → `from_pretrained`, logits checked equal), evaluated through `dequantize()`.",
        f"Perplexity: Wikipedia eval split, {settings['evaluation']['max_windows']} 512-token windows. Linear × fp32: "
        "stored bytes of the decoder linear weights (codes, mask, scales, zero-points; sparse values + bitmask "
        "for SDS alone) over the same weights dense in fp32. Seconds: pruning or training time (this machine was "
        "shared: compare ratios within this run).",
        "",
        "| model | ppl | ppl × SDS 2:4 | linear × fp32 | disk MB | seconds | sparse packed layers | exact 2:4 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    sds = next((r for r in rows if r["row"] == "SDS 2:4"), None)
    for row in rows:
        relative = f"{row['perplexity'] / sds['perplexity']:.3f}" if sds and "perplexity" in row else ""
        disk = f"{row['disk_mb']:.1f}" if "disk_mb" in row else ""
        exact = "yes" if row.get("exact_two_four") or row["row"] == "SDS 2:4" else ""
        lines.append(f"| {row['row']} | {row.get('perplexity', float('nan')):.2f} | {relative} | "
                     f"{row['linear_ratio']:.3f} | {disk} | {row['seconds']:.0f} | {row.get('sparse_layers', '')} "
                     f"| {exact} |")
    lines += ["", "## Targets", ""]
    stacked = next((r for r in rows if r["row"] == "SDS 2:4 + DL-QAT"), None)
    if stacked and sds:
        ratio = stacked["linear_ratio"]
        lines.append(f"- SDS 2:4 + DL-QAT {label}: decoder linear weights {ratio:.3f}× dense fp32 (target ≤ "
                     f"{WEIGHT_TARGET}×): **{'met' if ratio <= WEIGHT_TARGET else 'missed'}**")
        relative = stacked["perplexity"] / sds["perplexity"]
        lines.append(f"- SDS 2:4 + DL-QAT {label}: perplexity {stacked['perplexity']:.2f} = {relative:.3f}× the SDS 2:4 "
                     f"model's {sds['perplexity']:.2f} (target ≤ {PERPLEXITY_TARGET}×): "
                     f"**{'met' if relative <= PERPLEXITY_TARGET else 'missed'}**")
    else:
        lines.append("- not judged: the SDS 2:4 and SDS 2:4 + DL-QAT rows are not both measured yet")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
