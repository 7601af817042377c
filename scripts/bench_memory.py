#!/usr/bin/env python
"""Peak memory of the methods that train or walk a model, against its depth → bench/results/memory.{json,md}.

"Never hold more than needed": layer-wise work should cost about one block's worth of memory whatever the depth, and
training should not keep a weight-sized tensor per layer for backward. Each case runs in a fresh interpreter on a
random fp32 Llama (hidden 1024, FFN 2816, 16/4 heads: 47 MB per block); a thread samples the process's anonymous
memory (``RssAnon`` in ``/proc/self/status``) every 2 ms, and the table gives the peak minus the level just before the
operation, next to the model's own bytes.

``--baseline-rev REV`` runs every case a second time on the library as it was at ``REV`` (``git archive`` into a
temporary folder, put first on ``PYTHONPATH``), alternating the two, so a fix's before and after are measured side by
side on one machine in one run.

Cases:
    dlqat      DL-QAT adapters (4-bit, group 128, r=16, all linear layers) trained for 2 steps with ``Trainer``
    lora       LoRA (r=16, all linear layers) trained for 2 steps with ``Trainer`` on the float model
    lora-packed  the same LoRA on the model packed to 4 bits first (``quantize_rtn``, group 128; "model" is then the
               packed model's bytes): the backward dequantizes each layer again instead of keeping its float weight
    router     token-router training (30% token sparsity in every block) for 2 steps: its loss reads a tail of each
               window, so full-vocabulary logits for every position are the cost the vocabulary multiplies
    wanda      Wanda 2:4 with 16 calibration sequences of 128 tokens: block by block
    sparsegpt  SparseGPT 2:4, the same calibration: one block's Hessians at a time, none copied
    ria        the same with ``permutation="ria"``: the channel permutation scores every pruned weight, and the
               residual stream's site is read by every block
    swap       the same with ``SwapPermutationConfig(max_passes=2)``: RIA refined by channel swaps
    save       ``save_pruned`` of the model with half of each decoder linear weight zeroed (default shard size):
               the sparse encodings should be written, not all held at once
    perplexity ``evaluate_perplexity`` on 8 windows of 512 tokens, batches of 4, against the vocabulary size: the
               float copies of a batch's full-vocabulary logits are what grows
    save-offloaded  the same model moved to accelerate's CPU offload (``cpu_offload``) before saving: its weights
               already sit in the offload store in memory, so saving should not copy them out of it
    tyr        Týr at 30% of the decoder parameters, one iteration of the search cut to one generation of 2
               offspring on 4 windows (the supernet, up to 9 levels of every o_proj and down_proj, is what is
               measured), 16 calibration sequences of 128 tokens: each variant written as it is made

glibc keeps freed per-layer temporaries as heap it does not return, which hides what the code holds behind
fragmentation; the children run with ``MALLOC_MMAP_THRESHOLD_=131072`` (recorded in the settings) so big buffers
are mapped and unmapped and the number is what the code keeps alive.

Usage:
    python scripts/bench_memory.py [--baseline-rev 739d554] [--cases dlqat router wanda]
    python scripts/bench_memory.py --cases ria swap --baseline-rev REV --output-name memory-permutation
    python scripts/bench_memory.py --cases save --baseline-rev REV --output-name memory-save
    python scripts/bench_memory.py --cases save-offloaded --baseline-rev REV --output-name memory-save-offloaded
    python scripts/bench_memory.py --cases perplexity --baseline-rev REV --output-name memory-perplexity
    python scripts/bench_memory.py --cases sparsegpt --baseline-rev REV --output-name memory-sparsegpt
    python scripts/bench_memory.py --cases tyr --baseline-rev REV --output-name memory-tyr
    python scripts/bench_memory.py --cases lora lora-packed --baseline-rev c8fc9de --output-name memory-lora-packed
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

logger = logging.getLogger("bench_memory")

REPO = Path(__file__).resolve().parents[1]
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}
# (case, knob, values): each value is one fresh interpreter per library version.
SWEEPS = {
    "dlqat": ("layers", (4, 8, 16)),
    "lora": ("layers", (4, 8, 16)),
    "lora-packed": ("layers", (4, 8, 16)),
    "router": ("vocab", (4096, 32768)),
    "wanda": ("layers", (4, 8, 16)),
    "sparsegpt": ("layers", (4, 8)),
    "ria": ("layers", (4, 8, 12)),
    "swap": ("layers", (4, 8, 12)),
    "save": ("layers", (4, 8, 16)),
    "save-offloaded": ("layers", (4, 8, 16)),
    "perplexity": ("vocab", (4096, 32768, 131072)),
    "tyr": ("layers", (2, 4)),
}
QUICK_SWEEPS = {"dlqat": ("layers", (2,)), "lora": ("layers", (2,)), "lora-packed": ("layers", (2,)),
                "router": ("vocab", (4096,)), "wanda": ("layers", (2,)),
                "sparsegpt": ("layers", (2,)),
                "ria": ("layers", (2,)), "swap": ("layers", (2,)), "save": ("layers", (2,)),
                "save-offloaded": ("layers", (2,)), "perplexity": ("vocab", (4096,)), "tyr": ("layers", (2,))}


# ----------------------------------------------------------------------------------------------- child: one measurement

class _PeakSampler:
    """Peak ``RssAnon`` since :meth:`mark`, sampled by a daemon thread (the operation runs in the main thread)."""

    def __init__(self, interval_s: float = 0.002) -> None:
        self.interval_s = interval_s
        self.base = self.peak = _anon_bytes()
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        while True:
            self.peak = max(self.peak, _anon_bytes())
            time.sleep(self.interval_s)

    def mark(self) -> None:
        import ctypes
        import gc

        gc.collect()
        try:  # give freed heap back first, so the base is what is alive
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass
        self.base = self.peak = _anon_bytes()

    def excess(self) -> int:
        time.sleep(0.05)  # one more sample after the operation returns
        return self.peak - self.base


def _anon_bytes() -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status: this benchmark needs Linux")


def _random_llama(layers: int, vocab: int = 4096):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=1024, intermediate_size=2816, num_hidden_layers=layers,
                         num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=1024,
                         tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


def _token_ids(rows: int, seq_len: int, vocab: int):
    import torch

    return torch.randint(3, vocab, (rows, seq_len), generator=torch.Generator().manual_seed(1))


def _measure(case: str, value: int) -> dict:
    import torch

    torch.set_num_threads(2)
    import hf_compress
    from datasets import Dataset
    from hf_compress.evaluation.memory import parameter_bytes  # in every version a baseline may name
    from hf_compress.training import TrainingSettings

    layers, vocab = (value, 4096) if SWEEPS[case][0] == "layers" else (4, value)
    model = _random_llama(layers, vocab)
    model_bytes = parameter_bytes(model)["parameters"]
    settings = TrainingSettings(max_steps=2, per_device_batch_size=2 if case == "router" else 1, learning_rate=1e-3,
                                logging_steps=1, progress=False, use_cpu=True)
    sampler = _PeakSampler()
    started = time.perf_counter()
    if case in ("dlqat", "lora", "lora-packed"):
        from peft import LoraConfig, get_peft_model
        from hf_compress.quantization import DLQATConfig
        from hf_compress.training import train_with_trainer

        if case == "lora-packed":
            from hf_compress.quantization import quantize_rtn

            model = quantize_rtn(model, bits=4, group_size=128)
            model_bytes = sum(parameter_bytes(model)[kind] for kind in ("parameters", "buffers"))
        adapter = (DLQATConfig(bits=4, group_size=128, r=16, target_modules="all-linear") if case == "dlqat"
                   else LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
        ids = _token_ids(8, 64, vocab).tolist()
        data = Dataset.from_dict({"input_ids": ids, "labels": ids})
        sampler.mark()
        peft_model = get_peft_model(model, adapter)
        with tempfile.TemporaryDirectory() as output_dir:
            train_with_trainer(peft_model, data, output_dir, settings)
    elif case == "router":
        from hf_compress.routing import TokenRouterConfig, train_token_router
        from hf_compress.routing.schedule import RoutingSchedule

        ids = _token_ids(8, 256, vocab).tolist()
        data = Dataset.from_dict({"input_ids": ids, "labels": ids})
        sampler.mark()
        train_token_router(model, RoutingSchedule([0.3] * layers), data, args=settings,
                           config=TokenRouterConfig(token_sparsity=0.3, validation_windows=2))
    elif case == "sparsegpt":
        from hf_compress.pruning import SparseGPTConfig, SparseGPTPruner

        ids = _token_ids(16, 128, vocab)
        sampler.mark()
        config = SparseGPTConfig(sparsity="2:4", num_calibration_sequences=16, calibration_seq_len=128)
        SparseGPTPruner(model, None).prune(config, ids, progress=False)
    elif case in ("wanda", "ria", "swap"):
        from hf_compress.pruning import WandaConfig, WandaPruner
        from hf_compress.pruning.permutation import SwapPermutationConfig

        permutation = {"wanda": None, "ria": "ria", "swap": SwapPermutationConfig(max_passes=2)}[case]
        ids = _token_ids(16, 128, vocab)
        sampler.mark()
        config = WandaConfig(sparsity="2:4", num_calibration_sequences=16, calibration_seq_len=128,
                             permutation=permutation)
        WandaPruner(model, None).prune(config, ids, progress=False)
    elif case == "perplexity":
        from hf_compress.assets import tiny_tokenizer
        from hf_compress.evaluation.perplexity import evaluate_perplexity

        text = " ".join(f"w{(i * 7919) % 251} t{i % 13}" for i in range(6000))  # ids below 256: any vocabulary
        sampler.mark()
        evaluate_perplexity(model, tiny_tokenizer(), [text], window=512, max_windows=8, batch_size=4, progress=False)
    elif case in ("save", "save-offloaded"):
        from hf_compress.pruning.storage import save_pruned

        with torch.no_grad():  # half of every decoder linear weight zeroed: about 0.53x stored
            for block in model.model.layers:
                for layer in (m for m in block.modules() if isinstance(m, torch.nn.Linear)):
                    layer.weight[layer.weight.abs() <= layer.weight.abs().median()] = 0
        if case == "save-offloaded":  # the store takes the CPU weights as they are: no second copy
            from accelerate import cpu_offload

            cpu_offload(model, execution_device=torch.device("cpu"))
        with tempfile.TemporaryDirectory() as output_dir:
            sampler.mark()
            save_pruned(model, None, Path(output_dir) / "pruned")
    elif case == "tyr":
        from hf_compress.pruning import TyrConfig, TyrPruner

        ids = _token_ids(16, 128, vocab)
        config = TyrConfig(target_sparsity=0.3, num_iterations=1, generations=1, offspring=2,
                           selection_tokens=(256, 512), selection_survivors=(1,), num_search_sequences=4, kl_topk=32,
                           num_calibration_sequences=16, calibration_seq_len=128)
        with tempfile.TemporaryDirectory() as work_dir:
            sampler.mark()
            TyrPruner(model, None).prune(config, ids, progress=False, work_dir=work_dir)
    else:
        raise ValueError(f"unknown case {case!r}; choose from {', '.join(SWEEPS)}")
    excess = sampler.excess()
    return {"case": case, SWEEPS[case][0]: value, "layers": layers, "vocab": vocab, "model_bytes": model_bytes,
            "peak_excess_bytes": excess, "seconds": time.perf_counter() - started,
            "library": str(Path(hf_compress.__file__).resolve().parent)}


# ------------------------------------------------------------------------------------------------ parent: the sweep

def _run_child(case: str, value: int, library_root: Path | None) -> dict:
    env = {**os.environ, **MALLOC_ENV, "USE_HUB_KERNELS": "0", "TQDM_DISABLE": "1"}
    if library_root is not None:  # the baseline's package first, ahead of the installed one
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(library_root), env.get("PYTHONPATH")]))
    command = [sys.executable, str(Path(__file__).resolve()), "--child", case, str(value)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=library_root or REPO)
    if done.returncode != 0:
        raise RuntimeError(f"{case} {value} failed ({'baseline' if library_root else 'current'}):\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    expected = (library_root or REPO) / "hf_compress"
    if Path(result.pop("library")) != expected.resolve():  # the baseline must really be the one imported
        raise RuntimeError(f"{case} {value} imported hf_compress from the wrong place (expected {expected}).")
    return result


def _export_revision(revision: str, into: Path) -> str:
    sha = subprocess.run(["git", "rev-parse", "--verify", f"{revision}^{{commit}}"], cwd=REPO, check=True,
                         capture_output=True, text=True).stdout.strip()
    # model_cards/: hf_compress/hub/templates links to it (savers write cards)
    archive = subprocess.run(["git", "archive", sha, "hf_compress", "model_cards"], cwd=REPO, check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return sha


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        print(json.dumps(_measure(sys.argv[2], int(sys.argv[3]))))
        return
    from hf_compress.evaluation.report import benchmark_parser, start_benchmark, write_benchmark

    parser = benchmark_parser(__doc__, "memory", threads=None)
    parser.add_argument("--baseline-rev", help="also measure the library at this git revision, side by side")
    parser.add_argument("--cases", nargs="+", choices=sorted(SWEEPS), default=list(SWEEPS))
    args = parser.parse_args()
    if not start_benchmark(args, lambda payload: _markdown(payload["settings"], payload["results"])):
        return
    sweeps = QUICK_SWEEPS if args.quick else SWEEPS
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-memory-baseline-") as baseline_root:
        baseline_sha = _export_revision(args.baseline_rev, Path(baseline_root)) if args.baseline_rev else None
        for case in args.cases:
            knob, values = sweeps[case]
            for value in values:
                row = {"case": case, "knob": knob, "value": value}
                for version, root in [("current", None)] + ([("baseline", Path(baseline_root))] if baseline_sha else []):
                    logger.info("%s %s=%s on the %s library", case, knob, value, version)
                    result = _run_child(case, value, root)
                    row["model_bytes"] = result["model_bytes"]
                    row[version] = {"peak_excess_bytes": result["peak_excess_bytes"], "seconds": result["seconds"]}
                rows.append(row)
    settings = {"cases": args.cases, "sweeps": {case: sweeps[case] for case in args.cases}, "baseline": baseline_sha,
                "child_environment": MALLOC_ENV, "threads": 2, "model": "random fp32 Llama, hidden 1024, FFN 2816, "
                "16/4 heads", "quick": args.quick}
    table = _markdown(settings, rows)
    write_benchmark(args.output_name, settings, rows, table)
    print(table)


def _markdown(settings: dict, rows: list[dict]) -> str:
    mb = lambda b: f"{b / 2**20:,.0f}"
    baseline = settings["baseline"]
    header = "| case | setting | model (MB) | peak above start (MB) |"
    rule = "|---|---|---|---|"
    if baseline:
        header = f"| case | setting | model (MB) | peak above start, now (MB) | at {baseline[:7]} (MB) | now / then |"
        rule = "|---|---|---|---|---|---|"
    lines = [
        "# Peak memory above the level before the operation (RssAnon sampled every 2 ms, fresh interpreter per row)",
        "",
        f"Random fp32 Llama (hidden 1024, FFN 2816); children run with {settings['child_environment']}.",
        "",
        header,
        rule,
    ]
    for row in rows:
        now = row["current"]["peak_excess_bytes"]
        cells = [row["case"], f"{row['knob']}={row['value']}", mb(row["model_bytes"]), mb(now)]
        if baseline:
            then = row["baseline"]["peak_excess_bytes"]
            cells += [mb(then), f"{now / then:.2f}" if then > 0 else "n/a"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", *_growth_per_block(rows, bool(baseline))]
    return "\n".join(lines)


def _growth_per_block(rows: list[dict], with_baseline: bool) -> list[str]:
    """One line per depth sweep: how much the peak grows for each block added (a block is about 47 MB here)."""
    lines = []
    for case in dict.fromkeys(row["case"] for row in rows if row["knob"] == "layers"):
        sweep = [row for row in rows if row["case"] == case]
        if len(sweep) < 2:
            continue
        first, last = sweep[0], sweep[-1]
        blocks = last["value"] - first["value"]
        # rounded before printing, so a flat line reads +0.0 rather than -0.0
        slope = lambda version: round((last[version]["peak_excess_bytes"] - first[version]["peak_excess_bytes"])
                                      / blocks / 2**20, 1) + 0.0
        text = f"- {case}: the peak grows {slope('current'):+.1f} MB per block added now"
        if with_baseline:
            text += f", {slope('baseline'):+.1f} MB at the baseline"
        lines.append(text + f" (layers {first['value']} → {last['value']}).")
    return lines


if __name__ == "__main__":
    main()
