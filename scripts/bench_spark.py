#!/usr/bin/env python
"""SparK KV-cache benchmark → bench/results/<output-name>.{json,md}.

SmolLM2-135M-Instruct (float32, or ``--dtype bfloat16``; CPU, or CUDA with ``--device cuda``/``auto``), long
contexts built from the offline text, every cache in one process:

- ``dense``: transformers' ``DynamicCache``;
- ``spark-50`` / ``spark-80``: ``SparKCache`` pruning 50% / 80% of key channels per token (values dense,
  the paper's default), recovery on;
- ``spark-50-kv``: keys and values both 50% pruned (what the ≤ 0.6× memory target needs: values are half
  of the cache);
- ``spark-50-no-recovery``: ablation, pruned key entries left at zero;
- ``structured-50`` / ``structured-80``: ``StructuredChannelCache``, the same channels for every token of
  a head (ThinK-like scoring), no recovery;
- ``snapkv-1024`` and ``snapkv-1024+spark-50``: SnapKV eviction of the prompt to 1024 tokens, without and
  with SparK channel pruning on top (the paper's composition);
- ``hf-fp8``: transformers' own ``QuantizedCache(backend="fp8")`` (quanto/hqq are not installed here);
- ``spark-50-reference-read``: ``spark-50`` reading keys through the reference PyTorch reconstruction
  (``PerTokenChannels.densify_keys``) instead of the fast read (``hf_compress/cache/read.py``, Triton on
  CUDA): decode speed only (its outputs are bit-identical to ``spark-50``'s, tested), before/after in one run;
- ``spark-50-interval-1``: ``spark-50`` compressing each decoded token as it leaves the recent window
  (``compression_interval=1``) instead of 16 at a time: decode speed only, the interval's share of the speed.

Tasks:

1. passkey retrieval: a 5-digit key hidden at several depths of ``--passkey-lengths``-token Wikipedia
   haystacks; greedy answer must contain the key;
2. perplexity of a 256-token Wikipedia continuation given a ``--prefix``-token prefix (the prefix goes
   through the cache, the continuation is scored in one forward over it);
3. reading: SQuAD questions whose passage sits among distractor passages (``--reading-tokens`` tokens of
   context), chat template, SQuAD token F1 of the whole 24-token reply (computed locally: ``evaluate.load("squad")``
   needs the Hub);
4. decode speed and memory: ``--decode-tokens`` greedy steps after a ``--prefix``-token prompt; tokens/s of
   the decoding steps, and KV bytes the cache actually holds then (``memory_footprint()`` for ours, every
   stored tensor for transformers' caches) against the dense cache's. The caches take turns, ``--decode-repeats``
   rounds, and the median is reported, so every ratio to ``dense`` is measured side by side under the same load.

``--tasks`` runs a subset (e.g. ``--tasks decode`` for the speed and memory columns only).

Usage:
    python scripts/bench_spark.py
    python scripts/bench_spark.py --quick --output-name spark-smoke
    python scripts/bench_spark.py --tasks decode --output-name spark-decode
    python scripts/bench_spark.py --render spark
"""

from __future__ import annotations

import logging
import random
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from transformers import DynamicCache, QuantizedCache

from hf_compress.assets import load_model, load_text
from hf_compress.cache import ChannelPrunedLayer, SparKCache, StructuredChannelCache, cache_kwargs, triton_read
from hf_compress.evaluation.memory import cache_bytes
from hf_compress.evaluation.report import benchmark_parser, device_description, start_benchmark, write_benchmark
from hf_compress.evaluation.speed import measure_generation_speed, speed_ratio
from hf_compress.evaluation.squad import squad_documents, squad_scores


logger = logging.getLogger("bench_spark")

CACHES: dict[str, Callable[[Any], Any]] = {
    "dense": lambda config: DynamicCache(config=config),
    "spark-50": lambda config: SparKCache(config, channel_ratio=0.5),
    "spark-50-kv": lambda config: SparKCache(config, channel_ratio=0.5, value_channel_ratio=0.5),
    "spark-50-no-recovery": lambda config: SparKCache(config, channel_ratio=0.5, recovery=False),
    "structured-50": lambda config: StructuredChannelCache(config, channel_ratio=0.5),
    "spark-80": lambda config: SparKCache(config, channel_ratio=0.8),
    "structured-80": lambda config: StructuredChannelCache(config, channel_ratio=0.8),
    "snapkv-1024": lambda config: SparKCache(config, channel_ratio=0.0, token_budget=1024),
    "snapkv-1024+spark-50": lambda config: SparKCache(config, channel_ratio=0.5, token_budget=1024),
    "hf-fp8": lambda config: QuantizedCache(backend="fp8", config=config),
    "spark-50-reference-read": lambda config: _reference_read(SparKCache(config, channel_ratio=0.5)),
    "spark-50-interval-1": lambda config: SparKCache(config, channel_ratio=0.5, compression_interval=1),
}
# Ablations of spark-50's speed only (the reference read's outputs are bit-identical to spark-50's).
DECODE_ONLY = {"spark-50-reference-read", "spark-50-interval-1"}
TASKS = ("passkey", "perplexity", "reading", "decode")
PASSKEY_TASK = "There is a pass key hidden in the following text. Find it."
NEEDLE = "\nThe pass key is {key}. Remember it. {key} is the pass key.\n"
PASSKEY_QUESTION = "What is the pass key? Answer with the 5-digit number only."


def _reference_read(cache: SparKCache) -> SparKCache:
    for layer in cache.layers:
        if isinstance(layer, ChannelPrunedLayer):
            layer.reference_read = True
    return cache


# ------------------------------------------------------------------------------------------ tasks
def haystack_ids(tokenizer, tokens: int) -> list[int]:
    text = "\n\n".join(load_text("wikipedia", split="calibration")["text"])
    return tokenizer(text).input_ids[:tokens]


def greedy(model, ids: torch.Tensor, cache, max_new_tokens: int, eos: int | None) -> tuple[list[int], float]:
    """Greedy decoding into ``cache``; returns the new tokens and the decode rate after the first token."""
    measured = measure_generation_speed(model, None, [ids], max_new_tokens, warmup=0, progress=False,
                                        force_length=eos is None, cache_factory=lambda: cache,
                                        **({} if eos is None else {"eos_token_id": eos}))
    return measured["outputs"][0], measured.get("decode_tokens_per_second", float("nan"))


def passkey(model, tokenizer, make_cache, lengths: list[int], depths: list[float], seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    trials = []
    for length in lengths:
        hay = tokenizer.decode(haystack_ids(tokenizer, length - 80))
        for depth in depths:
            key = str(rng.randint(10000, 99999))
            cut = hay.rfind(". ", 0, int(depth * len(hay))) + 2  # at a sentence boundary
            content = f"{PASSKEY_TASK}\n\n{hay[:cut]}{NEEDLE.format(key=key)}{hay[cut:]}\n\n{PASSKEY_QUESTION}"
            ids = tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                                return_tensors="pt", return_dict=True).input_ids
            tokens, _ = greedy(model, ids, make_cache(), 12, tokenizer.eos_token_id)
            answer = tokenizer.decode(tokens, skip_special_tokens=True)
            trials.append({"length": ids.shape[1], "depth": depth, "key": key, "answer": answer, "found": key in answer})
    return {"accuracy": statistics.mean(t["found"] for t in trials), "trials": trials}


def continuation_perplexity(model, tokenizer, make_cache, prefix: int, windows: int) -> dict[str, Any]:
    stream = tokenizer("\n\n".join(load_text("wikipedia", split="eval")["text"]), return_tensors="pt").input_ids[0]
    nlls = []
    for index in range(windows):
        window = stream[index * (prefix + 256) : (index + 1) * (prefix + 256)]
        if len(window) < prefix + 256:
            break
        cache = make_cache()
        window = window.to(model.device)
        with torch.inference_mode():
            model(window[None, :prefix], **cache_kwargs(model, cache), logits_to_keep=1)
            logits = model(window[None, prefix:], **cache_kwargs(model, cache)).logits[0, :-1]
        nlls.append(torch.nn.functional.cross_entropy(logits.float(), window[prefix + 1 :]).item())
    return {"perplexity": float(torch.tensor(nlls).mean().exp()), "windows": len(nlls)}


def reading(model, tokenizer, make_cache, questions: int, context_tokens: int, seed: int) -> dict[str, Any]:
    docs = squad_documents()
    by_title: dict[str, list[dict[str, Any]]] = {}
    for doc in docs:
        by_title.setdefault(doc["title"], []).append(doc)
    titles = sorted(by_title)
    rng = random.Random(seed)
    rows = []
    for index in range(questions):
        target = by_title[titles[index]][0]
        others = [by_title[t][0]["background"] for t in titles if t != target["title"]]
        rng.shuffle(others)
        passages, used = [target["background"]], len(tokenizer(target["background"]).input_ids)
        for passage in others:
            if used > context_tokens:
                break
            passages.append(passage)
            used += len(tokenizer(passage).input_ids)
        passages.insert(index % len(passages), passages.pop(0))  # move the target through the context
        content = "Background texts:\n\n" + "\n\n".join(passages) + f"\n\nQuestion: {target['question']}\n" \
            "Answer with a short phrase copied from the background text."
        ids = tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True).input_ids
        tokens, _ = greedy(model, ids, make_cache(), 24, tokenizer.eos_token_id)
        # The model often opens with "The answer to this question is:" and a line break: score the whole reply.
        answer = " ".join(tokenizer.decode(tokens, skip_special_tokens=True).split())
        exact, f1 = squad_scores(answer, target["answers"])
        rows.append({"question": target["question"], "answer": answer, "gold": target["answers"][0],
                     "context_tokens": ids.shape[1], "exact": exact, "f1": f1})
    return {"f1": statistics.mean(r["f1"] for r in rows), "exact": statistics.mean(r["exact"] for r in rows),
            "rows": rows}


def decode_and_memory(model, tokenizer, makers: dict[str, Callable[[], Any]], prefix: int, steps: int,
                      repeats: int) -> dict[str, dict[str, Any]]:
    """Decode speed and held bytes of every cache; the caches take turns, ``repeats`` rounds, median speed."""
    ids = torch.tensor([haystack_ids(tokenizer, prefix)])
    runs: dict[str, list[float]] = {name: [] for name in makers}
    results: dict[str, dict[str, Any]] = {}
    for round_index in range(repeats):
        for name, make_cache in makers.items():
            cache = make_cache()
            _, tokens_per_s = greedy(model, ids, cache, steps + 1, None)
            runs[name].append(tokens_per_s)
            logger.info("decode round %d %s: %.2f tokens/s", round_index + 1, name, tokens_per_s)
            footprint = getattr(cache, "memory_footprint", None)
            results[name] = {"kv_bytes": cache_bytes(cache), "footprint": footprint() if callable(footprint) else None,
                             "tokens_held": prefix + steps}
    for name, speeds in runs.items():
        results[name].update(decode_tokens_per_s=statistics.median(speeds), decode_runs=speeds)
    return results


# ------------------------------------------------------------------------------------------ report
def _ratio(value: float | None, reference: float | None) -> float | None:
    return value / reference if value is not None and reference else None


def _decode_ratio(row: dict[str, Any], dense: dict[str, Any]) -> float | None:
    """Decode tokens/s of ``row`` over the dense cache's (``speed_ratio``: the caches take turns in each round)."""
    ours, theirs = (r.get("decode", {}) if isinstance(r.get("decode"), dict) else {} for r in (row, dense))
    if ours.get("decode_runs") and theirs.get("decode_runs"):
        return speed_ratio(ours["decode_runs"], theirs["decode_runs"])
    return _ratio(ours.get("decode_tokens_per_s"), theirs.get("decode_tokens_per_s"))


def _cell(value: float | None, fmt: str, suffix: str = "") -> str:
    return "—" if value is None else f"{value:{fmt}}{suffix}"


def markdown(payload: dict[str, Any]) -> str:
    settings, results = payload["settings"], payload["results"]
    tasks = settings.get("tasks", TASKS)
    dense = results.get("dense", {})

    def get(row: dict[str, Any], task: str, key: str) -> float | None:
        return row.get(task, {}).get(key) if isinstance(row.get(task), dict) else None

    machine_note = settings.get("machine_note", "CPU")
    read_path = settings.get("read_path", "reference PyTorch reconstruction (before issue 20)")
    described = []
    if "passkey" in tasks:
        described.append(f"passkey: lengths {settings['passkey_lengths']} × depths {settings['passkey_depths']}")
    if "perplexity" in tasks:
        described.append(f"perplexity: {settings['prefix']}-token prefix + 256-token continuation × "
                         f"{settings['ppl_windows']} windows")
    if "reading" in tasks:
        described.append(f"reading: {settings['reading_questions']} SQuAD questions in ~{settings['reading_tokens']}-token "
                         "contexts")
    if "decode" in tasks:
        rounds = (f"median of {settings['decode_repeats']} rounds in which the caches take turns"
                  if "decode_repeats" in settings else "one run per cache, one cache after another")
        described.append(f"decode: {settings['decode_tokens']} greedy steps after {settings['prefix']} prompt tokens, "
                         + rounds)
    sentence = "; ".join(described)
    lines = [
        "# SparK KV cache — SmolLM2-135M-Instruct, long contexts",
        "",
        (f"Machine: {machine_note}. Command: `{payload.get('command') or settings['command']}`. SparK reads keys "
         f"through: {read_path}."),
        sentence[:1].upper() + sentence[1:] + ". KV bytes are what the cache holds after the decode run"
        + (" (append headroom included)" if "read_path" in settings else "")
        + "; every ratio is against `dense` in the same run (decode: the median of the per-round ratios).",
        "",
        ("| cache | passkey acc. | continuation ppl | ppl vs dense | reading F1 | KV bytes held | vs dense | "
         "decode tok/s | decode vs dense |"),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        ppl = get(r, "perplexity", "perplexity")
        kv = get(r, "decode", "kv_bytes")
        speed = get(r, "decode", "decode_tokens_per_s")
        f1 = get(r, "reading", "f1")
        lines.append(
            f"| {name} | {_cell(get(r, 'passkey', 'accuracy'), '.2f')} | {_cell(ppl, '.3f')} | "
            f"{_cell(_ratio(ppl, get(dense, 'perplexity', 'perplexity')), '.3f', '×')} | "
            f"{_cell(None if f1 is None else 100 * f1, '.1f')} | {_cell(None if kv is None else kv / 2**20, '.1f', ' MiB')} | "
            f"{_cell(_ratio(kv, get(dense, 'decode', 'kv_bytes')), '.3f', '×')} | {_cell(speed, '.1f')} | "
            f"{_cell(_decode_ratio(r, dense), '.2f', '×')} |"
        )
    if dense and "spark-50" in results:
        lines += ["", "## Targets (50% pruning)", ""]
        for name in ("spark-50", "spark-50-kv"):
            if name not in results:
                continue
            r, parts = results[name], []
            mem = _ratio(get(r, "decode", "kv_bytes"), get(dense, "decode", "kv_bytes"))
            if mem is not None:
                parts.append(f"KV bytes {mem:.3f}× dense ({'met' if mem <= 0.6 else 'MISSED'}: ≤ 0.6×)")
            speed = _decode_ratio(r, dense)
            if speed is not None:
                on_gpu = settings.get("device", "cpu") != "cpu"
                bar, where = (0.9, "on GPU") if on_gpu else (0.6, "on CPU")
                parts.append(f"decode {speed:.2f}× dense tokens/s "
                             f"({'met' if speed >= bar else 'MISSED'}: ≥ {bar}× {where})")
            if get(dense, "passkey", "accuracy") is not None:
                acc = _ratio(get(r, "passkey", "accuracy"), get(dense, "passkey", "accuracy"))
                parts.append(f"passkey {'n/a (dense found none)' if acc is None else f'{acc:.2f}× dense'} "
                             f"({'met' if acc is not None and acc >= 0.95 else 'MISSED' if acc is not None else 'not measurable'}"
                             ": ≥ 0.95×)")
            ppl = _ratio(get(r, "perplexity", "perplexity"), get(dense, "perplexity", "perplexity"))
            if ppl is not None:
                parts.append(f"continuation perplexity {ppl:.3f}× dense ({'met' if ppl <= 1.05 else 'MISSED'}: ≤ 1.05×)")
                structured = get(results.get("structured-50", {}), "perplexity", "perplexity")
                if structured is not None:
                    better = get(r, "perplexity", "perplexity") < structured
                    parts.append(f"{'better' if better else 'NOT better'} than `structured-50` on perplexity")
            lines.append(f"- `{name}`: " + "; ".join(parts) + ".")
    if dense:
        lines += ["", "## Notes", ""]
        if get(dense, "reading", "f1") is not None and get(dense, "reading", "f1") < 0.05:
            lines.append(
                f"- Reading: the dense cache scores {100 * get(dense, 'reading', 'f1'):.1f} F1: SmolLM2-135M does not "
                "answer these questions at this context length, so the column does not tell the caches apart (non-zero "
                "scores are stray word overlaps)."
            )
        if isinstance(dense.get("passkey"), dict):
            lines.append(f"- Passkey accuracy is over {len(dense['passkey']['trials'])} trials per cache: a coarse "
                         "signal at this model size.")
        speeds = {n: _decode_ratio(r, dense) for n, r in results.items()
                  if n.startswith("spark") and n not in DECODE_ONLY}
        speeds = {n: v for n, v in speeds.items() if v is not None}
        if speeds:
            line = (f"- Decode speed: SparK caches ran at {min(speeds.values()):.2f}–{max(speeds.values()):.2f}× the "
                    "dense cache's tokens/s (pruned keys are rebuilt on every read, one layer at a time")
            reference = _decode_ratio(results.get("spark-50-reference-read", {}), dense)
            if reference is not None and "spark-50" in speeds:
                line += (f"; `spark-50` through the reference reconstruction ran at {reference:.2f}× in the same run, "
                         f"so the fast read is {speeds['spark-50'] / reference:.2f}× faster")
            single = _decode_ratio(results.get("spark-50-interval-1", {}), dense)
            if single is not None and "spark-50" in speeds:
                line += (f"; compressing each decoded token as it leaves the window (`compression_interval=1`) "
                         f"ran at {single:.2f}×, 16 at a time (the default) at {speeds['spark-50']:.2f}×")
            runs = [f"{n} {', '.join(f'{v:.2f}' for v in results[n]['decode']['decode_runs'])}"
                    for n in ("dense", "spark-50", "spark-50-interval-1", "spark-50-reference-read")
                    if "decode_runs" in results.get(n, {}).get("decode", {})]
            lines.append(line + ")." + (f" Rounds (tokens/s): {'; '.join(runs)}." if runs else ""))
        if (isinstance(results.get("hf-fp8", {}).get("perplexity"), dict) and "decode" in results["hf-fp8"]
                and "decode" in results.get("spark-50-kv", {})):  # partial saves come before the decode task
            fp8, spark = results["hf-fp8"], results["spark-50-kv"]
            lines.append(
                f"- transformers' fp8 cache held {fp8['decode']['kv_bytes'] / dense['decode']['kv_bytes']:.3f}× dense "
                f"at {fp8['perplexity']['perplexity'] / dense['perplexity']['perplexity']:.3f}× perplexity, against "
                f"{spark['decode']['kv_bytes'] / dense['decode']['kv_bytes']:.3f}× and "
                f"{spark['perplexity']['perplexity'] / dense['perplexity']['perplexity']:.3f}× for `spark-50-kv` on this "
                f"{settings.get('dtype', 'float32')} model: channel pruning and quantization are orthogonal, and here "
                "quantization saved more."
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = benchmark_parser(__doc__, "spark", devices=("cpu", "cuda"))
    parser.add_argument("--caches", nargs="+", choices=list(CACHES), default=list(CACHES))
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    parser.add_argument("--passkey-lengths", nargs="+", type=int, default=[2048, 4096])
    parser.add_argument("--passkey-depths", nargs="+", type=float, default=[0.1, 0.5, 0.9])
    parser.add_argument("--prefix", type=int, default=2048)
    parser.add_argument("--ppl-windows", type=int, default=2)
    parser.add_argument("--reading-questions", type=int, default=5)
    parser.add_argument("--reading-tokens", type=int, default=1500)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--decode-repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="the model's and so the caches' dtype (bfloat16: the GPU target's second setting)")
    args = parser.parse_args()
    if not start_benchmark(args, markdown):
        return
    if args.quick:
        args.passkey_lengths, args.passkey_depths, args.prefix = [512], [0.5], 512
        args.ppl_windows, args.reading_questions, args.reading_tokens, args.decode_tokens = 1, 1, 400, 8
        args.decode_repeats = 1
    settings = {k: v for k, v in vars(args).items() if k not in ("render", "supported_devices")}
    settings["machine_note"] = f"{device_description(args.device)}, {args.threads} CPU threads, {args.dtype}"
    settings["read_path"] = (
        "a fused Triton kernel (`hf_compress/cache/triton_read.py`)" if triton_read.usable(torch.zeros(1, device=args.device))
        else "byte tables and one gather (`hf_compress/cache/read.py`)"
    )
    settings["command"] = " ".join(["python", *map(shlex.quote, sys.argv)])
    model, tokenizer = load_model("smollm2-135m")
    model.to(device=args.device, dtype=getattr(torch, args.dtype))
    greedy(model, torch.tensor([haystack_ids(tokenizer, 256)]), DynamicCache(config=model.config), 4, None)  # warm-up
    makers = {name: (lambda factory=CACHES[name]: factory(model.config)) for name in args.caches}
    results: dict[str, Any] = {name: {} for name in args.caches}

    def save() -> None:  # partial results survive
        write_benchmark(args.output_name, settings, results, markdown({"settings": settings, "results": results}))

    for name, make in makers.items():
        if name in DECODE_ONLY or not set(args.tasks) - {"decode"}:
            continue
        logger.info("%s", name)
        start = time.perf_counter()
        if "passkey" in args.tasks:
            results[name]["passkey"] = passkey(model, tokenizer, make, args.passkey_lengths, args.passkey_depths, args.seed)
        if "perplexity" in args.tasks:
            results[name]["perplexity"] = continuation_perplexity(model, tokenizer, make, args.prefix, args.ppl_windows)
        if "reading" in args.tasks:
            results[name]["reading"] = reading(model, tokenizer, make, args.reading_questions, args.reading_tokens, args.seed)
        results[name]["seconds"] = time.perf_counter() - start
        logger.info("%s: %s", name, {k: v for k, v in results[name].items() if k != "reading"})
        save()
    if "decode" in args.tasks:
        for name, measured in decode_and_memory(model, tokenizer, makers, args.prefix, args.decode_tokens,
                                                args.decode_repeats).items():
            results[name]["decode"] = measured
        save()
    logger.info("done")


if __name__ == "__main__":
    main()
