#!/usr/bin/env python
"""SparK KV-cache benchmark → bench/results/<output-name>.{json,md}.

SmolLM2-135M-Instruct (float32, CPU), long contexts built from the offline text, every cache in one process:

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
- ``hf-fp8``: transformers' own ``QuantizedCache(backend="fp8")`` (quanto/hqq are not installed here).

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
   stored tensor for transformers' caches) against the dense cache's.

Usage:
    python scripts/bench_spark.py
    python scripts/bench_spark.py --quick --output-name spark-smoke
    python scripts/bench_spark.py --render spark
"""

from __future__ import annotations

import logging
import random
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from transformers import DynamicCache, QuantizedCache

from hf_compress.assets import load_model, load_text
from hf_compress.cache import SparKCache, StructuredChannelCache
from hf_compress.evaluation.memory import cache_bytes
from hf_compress.evaluation.report import benchmark_parser, start_benchmark, write_benchmark
from hf_compress.evaluation.speed import measure_generation_speed
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
}
PASSKEY_TASK = "There is a pass key hidden in the following text. Find it."
NEEDLE = "\nThe pass key is {key}. Remember it. {key} is the pass key.\n"
PASSKEY_QUESTION = "What is the pass key? Answer with the 5-digit number only."


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
        with torch.inference_mode():
            model(window[None, :prefix], past_key_values=cache, logits_to_keep=1)
            logits = model(window[None, prefix:], past_key_values=cache).logits[0, :-1]
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


def decode_and_memory(model, tokenizer, make_cache, prefix: int, steps: int) -> dict[str, Any]:
    ids = torch.tensor([haystack_ids(tokenizer, prefix)])
    cache = make_cache()
    _, tokens_per_s = greedy(model, ids, cache, steps + 1, None)
    footprint = getattr(cache, "memory_footprint", None)
    return {"decode_tokens_per_s": tokens_per_s, "kv_bytes": cache_bytes(cache),
            "footprint": footprint() if callable(footprint) else None, "tokens_held": prefix + steps}


# ------------------------------------------------------------------------------------------ report
def markdown(payload: dict[str, Any]) -> str:
    settings, results = payload["settings"], payload["results"]
    dense = results.get("dense")
    lines = [
        "# SparK KV cache — SmolLM2-135M-Instruct, long contexts",
        "",
        f"Machine: {settings['machine_note']}. Command: `{settings['command']}`.",
        f"Passkey: lengths {settings['passkey_lengths']} × depths {settings['passkey_depths']}; perplexity: "
        f"{settings['prefix']}-token prefix + 256-token continuation × {settings['ppl_windows']} windows; reading: "
        f"{settings['reading_questions']} SQuAD questions in ~{settings['reading_tokens']}-token contexts; decode: "
        f"{settings['decode_tokens']} greedy steps after {settings['prefix']} prompt tokens. "
        "KV bytes are what the cache holds after the decode run; ratios are against `dense` in the same run.",
        "",
        "| cache | passkey acc. | continuation ppl | ppl vs dense | reading F1 | KV bytes held | vs dense | decode tok/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        ppl_ratio = r["perplexity"]["perplexity"] / dense["perplexity"]["perplexity"] if dense else float("nan")
        mem_ratio = r["decode"]["kv_bytes"] / dense["decode"]["kv_bytes"] if dense else float("nan")
        lines.append(
            f"| {name} | {r['passkey']['accuracy']:.2f} | {r['perplexity']['perplexity']:.3f} | {ppl_ratio:.3f}× | "
            f"{100 * r['reading']['f1']:.1f} | {r['decode']['kv_bytes'] / 2**20:.1f} MiB | {mem_ratio:.3f}× | "
            f"{r['decode']['decode_tokens_per_s']:.1f} |"
        )
    if dense and "spark-50" in results:
        lines += ["", "## Targets (50% pruning)", ""]
        for name in ("spark-50", "spark-50-kv"):
            if name not in results:
                continue
            r = results[name]
            mem = r["decode"]["kv_bytes"] / dense["decode"]["kv_bytes"]
            ppl = r["perplexity"]["perplexity"] / dense["perplexity"]["perplexity"]
            acc = r["passkey"]["accuracy"] / dense["passkey"]["accuracy"] if dense["passkey"]["accuracy"] else None
            structured = results.get("structured-50")
            if structured is None:
                versus = "`structured-50` not run"
            else:
                better = r["perplexity"]["perplexity"] < structured["perplexity"]["perplexity"]
                versus = f"{'better' if better else 'NOT better'} than `structured-50` on perplexity"
            lines.append(
                f"- `{name}`: KV bytes {mem:.3f}× dense ({'met' if mem <= 0.6 else 'MISSED'}: ≤ 0.6×); passkey "
                f"{'n/a (dense found none)' if acc is None else f'{acc:.2f}× dense'} "
                f"({'met' if acc is not None and acc >= 0.95 else 'MISSED' if acc is not None else 'not measurable'}: "
                f"≥ 0.95×); continuation perplexity {ppl:.3f}× dense ({'met' if ppl <= 1.05 else 'MISSED'}: ≤ 1.05×); "
                f"{versus}."
            )
    if dense:
        lines += ["", "## Notes", ""]
        if dense["reading"]["f1"] < 0.05:
            lines.append(
                f"- Reading: the dense cache scores {100 * dense['reading']['f1']:.1f} F1: SmolLM2-135M does not answer "
                "these questions at this context length, so the column does not tell the caches apart (non-zero "
                "scores are stray word overlaps)."
            )
        trials = len(dense["passkey"]["trials"])
        lines.append(f"- Passkey accuracy is over {trials} trials per cache: a coarse signal at this model size.")
        speeds = {n: r["decode"]["decode_tokens_per_s"] / dense["decode"]["decode_tokens_per_s"]
                  for n, r in results.items() if n.startswith("spark")}
        if speeds:
            lines.append(
                f"- Decode speed: SparK caches ran at {min(speeds.values()):.2f}–{max(speeds.values()):.2f}× the dense "
                "cache's tokens/s: pruned keys are rebuilt on every read, one layer at a time, in PyTorch ops (no fused "
                "kernel); the saving is memory, not time."
            )
        if "hf-fp8" in results and "spark-50-kv" in results:
            fp8, spark = results["hf-fp8"], results["spark-50-kv"]
            lines.append(
                f"- transformers' fp8 cache held {fp8['decode']['kv_bytes'] / dense['decode']['kv_bytes']:.3f}× dense "
                f"at {fp8['perplexity']['perplexity'] / dense['perplexity']['perplexity']:.3f}× perplexity, against "
                f"{spark['decode']['kv_bytes'] / dense['decode']['kv_bytes']:.3f}× and "
                f"{spark['perplexity']['perplexity'] / dense['perplexity']['perplexity']:.3f}× for `spark-50-kv` on this "
                "float32 model: channel pruning and quantization are orthogonal, and here quantization saved more."
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = benchmark_parser(__doc__, "spark")
    parser.add_argument("--caches", nargs="+", choices=list(CACHES), default=list(CACHES))
    parser.add_argument("--passkey-lengths", nargs="+", type=int, default=[2048, 4096])
    parser.add_argument("--passkey-depths", nargs="+", type=float, default=[0.1, 0.5, 0.9])
    parser.add_argument("--prefix", type=int, default=2048)
    parser.add_argument("--ppl-windows", type=int, default=2)
    parser.add_argument("--reading-questions", type=int, default=5)
    parser.add_argument("--reading-tokens", type=int, default=1500)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not start_benchmark(args, markdown):
        return
    if args.quick:
        args.passkey_lengths, args.passkey_depths, args.prefix = [512], [0.5], 512
        args.ppl_windows, args.reading_questions, args.reading_tokens, args.decode_tokens = 1, 1, 400, 8
    settings = {k: v for k, v in vars(args).items() if k not in ("render", "supported_devices", "device")}
    settings["machine_note"] = f"CPU, {args.threads} threads, float32"
    settings["command"] = "python scripts/bench_spark.py" + (" --quick" if args.quick else "")
    model, tokenizer = load_model("smollm2-135m")
    greedy(model, torch.tensor([haystack_ids(tokenizer, 256)]), DynamicCache(config=model.config), 4, None)  # warm-up
    results: dict[str, Any] = {}
    for name in args.caches:
        make = lambda factory=CACHES[name]: factory(model.config)  # noqa: E731
        logger.info("%s", name)
        start = time.perf_counter()
        results[name] = {
            "passkey": passkey(model, tokenizer, make, args.passkey_lengths, args.passkey_depths, args.seed),
            "perplexity": continuation_perplexity(model, tokenizer, make, args.prefix, args.ppl_windows),
            "reading": reading(model, tokenizer, make, args.reading_questions, args.reading_tokens, args.seed),
            "decode": decode_and_memory(model, tokenizer, make, args.prefix, args.decode_tokens),
        }
        results[name]["seconds"] = time.perf_counter() - start
        logger.info("%s: %s", name, {k: v for k, v in results[name].items() if k != "reading"})
        payload = {"settings": settings, "results": results}
        write_benchmark(args.output_name, settings, results, markdown(payload))  # partial results survive
    logger.info("done")


if __name__ == "__main__":
    main()
