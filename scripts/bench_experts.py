#!/usr/bin/env python
r"""SilverSight / ASSL expert routing benchmark → bench/results/<output-name>.{json,md}.

SmolLM2-135M-Instruct (float32) on a multi-task instruction mix built from the offline task data: ARC-Easy,
ARC-Challenge, PIQA, HellaSwag, BoolQ, Winogrande (lm-eval prompts; prompt = the context, completion = the
correct continuation), SQuAD (zero-shot prompt, completion = first reference answer) and GSM8K
("Question: ...\nAnswer:", completion = the reference solution). Each task's fixed seeded subset is split
into disjoint test (first ``--test-per-task``) and train (the next ``--train-per-task``) examples.

Variants, every trained one with the same total optimizer steps (``--steps``, batch ``--batch-size`` x
``--seq-len`` packed tokens; K experts share the steps in proportion to their cluster sizes):

- ``base``: the model as is;
- ``lora-all``: one LoRA on all training data;
- ``lora-assl``: one LoRA on the ASSL subset (facility location, ``--budget`` of the data);
- ``lora-random``: one LoRA on a seeded random subset of the same size;
- ``lora-assl-epochs`` / ``lora-random-epochs``: the same subsets trained for as many epochs as ``lora-all`` (the
  subset's share of ``--steps``) rather than as many steps: what selection saves in compute, without the
  repeated epochs that equal steps put on a 20% subset;
- ``lora-assl-loss`` / ``lora-assl-loss-epochs``: ASSL with the spec's second stage, the model's own training
  needs: coverage weighted by the base model's loss on each completion (``select_data(weights="loss")``);
- ``experts-random``: K experts on a random partition of all data, routed by nearest (random-cluster) centroid;
- ``experts-routed``: K experts on semantic k-means clusters of all data, routed by the router (the method);
- ``experts-oracle``: the same experts, each query sent to its task's expert (the cluster holding most of
  that task's training examples);
- ``experts-warm``: ``experts-routed`` with a shared warm start (``ExpertConfig.shared_warmup``, the
  ``--shared-warmup`` fraction of the steps on one LoRA over all data, then the experts split the rest);
- ``experts-joint``: ``experts-routed`` trained jointly (``ExpertConfig.joint_training``): one run of ``--steps``
  steps whose batches mix the clusters, each row training its own expert, so every expert is updated at every
  step instead of at its share of the steps (same steps, batch and tokens as ``lora-all``).

Scores: multiple-choice accuracy (lm-eval's metric of record: acc_norm for ARC/PIQA/HellaSwag, acc for
BoolQ/Winogrande), SQuAD token F1 of a greedy answer (``--squad-new-tokens``, cut at the first newline),
and GSM8K bits per byte of the reference solution (lower is better; a 135M model solves ~no GSM8K problem,
so accuracy would be 0 for every variant). The average is over the 7 tasks scored in [0, 1]; standard
errors are per-example (SE of the average = sqrt(sum SE_t^2) / 7). Routing accuracy: the share of test
queries the router sends to the oracle expert; the targets are judged on paired differences (both variants
score the same test rows). Generation overhead: greedy generation (forced length) of one batch of test queries
taken round-robin over the tasks, with the router (routing forward + mixed batch, stacked and through PEFT's
``adapter_names``) and with one adapter for every row, interleaved, medians.

Usage:
    python scripts/bench_experts.py                 # the settings below, sized for a shared 2-core CPU
    python scripts/bench_experts.py --train-per-task 200 --test-per-task 99 --steps 400 --batch-size 8 \
        --seq-len 256 --embedding-max-length 128 --squad-new-tokens 16 --eval-batch 16   # the full protocol
    python scripts/bench_experts.py --train-per-task 100 --test-per-task 100 --steps 64 --batch-size 8 --seq-len 256 \
        --embedding-max-length 128 --squad-new-tokens 16 --eval-batch 16 --overhead-repeats 5   # committed (~50 min)
    python scripts/bench_experts.py --overhead-only --train-per-task 100 --test-per-task 100 --steps 8 --batch-size 8 \
        --embedding-layer 7 --embedding-max-length 256 --eval-batch 16 --overhead-repeats 5 \
        --output-name experts-overhead   # speed only, with the earlier default embedding (block 7, 256 tokens)
    python scripts/bench_experts.py --routing-probe --train-per-task 100 --test-per-task 100 \
        --probe-layers 3 4 5 6 7 14 22 --output-name experts-routing   # embedding block and prompt length (no training)
    python scripts/bench_experts.py --overhead-only --train-per-task 100 --test-per-task 100 --steps 8 --batch-size 8 \
        --seq-len 256 --embedding-layer 4 --embedding-max-length 128 --eval-batch 16 --overhead-tokens 32 \
        --overhead-repeats 5 --output-name experts-overhead-block4   # the default embedding (block 4, 128), timed
    python scripts/bench_experts.py --train-per-task 100 --test-per-task 100 --steps 64 --batch-size 8 --seq-len 256 \
        --embedding-layer 7 --embedding-max-length 256 --squad-new-tokens 16 --eval-batch 16 --variants lora-all \
        experts-routed experts-warm --skip-overhead --output-name experts-warm   # the shared warm start (~35 min)
    python scripts/bench_experts.py --train-per-task 200 --test-per-task 99 --steps 200 --batch-size 8 --seq-len 256 \
        --embedding-max-length 128 --squad-new-tokens 16 --eval-batch 16 --skip-overhead --variants lora-assl \
        lora-random --output-name experts-200steps --extend   # ASSL and random 20% beside the 200-step run (~90 min)
    python scripts/bench_experts.py --train-per-task 200 --test-per-task 99 --steps 200 --batch-size 8 --seq-len 256 \
        --embedding-max-length 128 --squad-new-tokens 16 --eval-batch 16 --skip-overhead --variants lora-assl-epochs \
        lora-random-epochs --output-name experts-200steps --extend   # the same subsets at equal epochs (~25 min)
    python scripts/bench_experts.py --training-speed --train-per-task 100 --test-per-task 100 --batch-size 8 \
        --seq-len 256 --overhead-repeats 7 --output-name experts-training-speed   # joint vs one adapter, per step
    python scripts/bench_experts.py --quick --output-name experts-smoke   # tiny model, to check the script
    python scripts/bench_experts.py --render experts
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import statistics
import time
from typing import Any

import torch

from hf_compress.assets import load_gsm8k, load_model, load_squad, load_zero_shot_task
from hf_compress.evaluation.report import (
    benchmark_parser, device_description, results_directory, start_benchmark, synchronize, write_benchmark,
)
from hf_compress.evaluation.squad import squad_scores
from hf_compress.evaluation.uncertainty import average_standard_error, paired_task_average_difference, standard_error
from hf_compress.evaluation.zero_shot import PRIMARY_METRIC, loglikelihoods
from hf_compress.experts import (
    EmbeddingSpec,
    ExpertConfig,
    embed_texts,
    instruction_rows,
    packed_instruction_dataset,
    select_data,
    train_experts,
)
from hf_compress.experts.joint import JointExpertsTrainingModule
from hf_compress.training import TrainingSettings


logger = logging.getLogger("bench_experts")

TASKS = ("arc_easy", "arc_challenge", "piqa", "hellaswag", "boolq", "winogrande", "squad", "gsm8k")
AVERAGED = TASKS[:-1]
VARIANTS = ("base", "lora-all", "lora-assl", "lora-random", "lora-assl-epochs", "lora-random-epochs", "lora-assl-loss",
            "lora-assl-loss-epochs", "experts-random", "experts-routed", "experts-oracle", "experts-warm",
            "experts-joint")
# Subset variants: the selection each trains on (its key in results["selection"]).
SUBSETS = {"lora-all": None, "lora-assl": "facility_location", "lora-random": "random",
           "lora-assl-loss": "facility_location_loss"}


# ------------------------------------------------------------------------------------------ data
def task_examples(task: str, count: int, seed: int) -> list[dict[str, Any]]:
    """``count`` examples of ``task``: prompt/completion for training, the rest for scoring."""
    if task == "squad":
        return [{"task": task, "prompt": r["prompt"], "completion": " " + r["answers"][0], "answers": r["answers"]}
                for r in load_squad(limit=count, seed=seed)]
    if task == "gsm8k":
        return [{"task": task, "prompt": f"Question: {r['question']}\nAnswer:", "completion": " " + r["target"]}
                for r in load_gsm8k(limit=count, seed=seed)]
    rows = []
    for r in load_zero_shot_task(task, limit=count, seed=seed):
        rows.append({"task": task, "prompt": r["contexts"][r["label"]], "completion": r["continuations"][r["label"]],
                     "query": r["contexts"][0], "contexts": r["contexts"], "continuations": r["continuations"],
                     "choices": r["choices"], "label": r["label"]})
    return rows


def split_tasks(train_per_task: int, test_per_task: int, seed: int) -> tuple[list[dict], list[dict]]:
    train, test = [], []
    for task in TASKS:
        rows = task_examples(task, train_per_task + test_per_task, seed)
        test += rows[:test_per_task]
        train += rows[test_per_task:]
    return train, test


def query_of(row: dict[str, Any]) -> str:
    return row.get("query", row["prompt"])


# ------------------------------------------------------------------------------------------ scoring
def score_likelihood_tasks(model, tokenizer, rows: list[dict]) -> list[float]:
    """Per-row score of multiple-choice rows (1/0 on the task's metric) and GSM8K rows (bits per byte)."""
    requests, spans = [], []
    for row in rows:
        pairs = (list(zip(row["contexts"], row["continuations"])) if "choices" in row
                 else [(row["prompt"], row["completion"])])
        spans.append((len(requests), len(pairs)))
        requests += pairs
    values = loglikelihoods(model, tokenizer, requests, batch_size=16, progress=False) if requests else []
    scores = []
    for row, (start, length) in zip(rows, spans):
        lls = values[start : start + length]
        if "choices" in row:
            if PRIMARY_METRIC[row["task"]] == "acc_norm":
                lls = [ll / max(len(choice), 1) for ll, choice in zip(lls, row["choices"])]
            scores.append(float(max(range(len(lls)), key=lls.__getitem__) == row["label"]))
        else:
            scores.append(-lls[0] / math.log(2) / len(row["completion"].encode("utf-8")))
    return scores


def squad_f1(generate, tokenizer, rows: list[dict], experts: list[int] | None, new_tokens: int, batch: int,
             device: torch.device) -> list[float]:
    scores = []
    for start in range(0, len(rows), batch):
        chunk = rows[start : start + batch]
        inputs = tokenizer([r["prompt"] for r in chunk], return_tensors="pt", padding=True).to(device)
        kwargs = {} if experts is None else {"experts": experts[start : start + batch]}
        with torch.inference_mode():
            out = generate(**inputs, max_new_tokens=new_tokens, do_sample=False, **kwargs)
        for row, tokens in zip(chunk, out[:, inputs.input_ids.shape[1]:]):
            answer = tokenizer.decode(tokens, skip_special_tokens=True).strip().split("\n")[0]
            scores.append(squad_scores(answer, row["answers"])[1])
    return scores


def evaluate(model, router, tokenizer, test: list[dict], experts: list[int] | None, args,
             known: dict[int, float] | None = None) -> dict[str, Any]:
    """Per-task scores of ``router`` (or the plain ``model`` when ``router`` is None) with ``experts`` per row.

    ``known``: likelihood scores already measured for some rows with the same expert (the oracle reuses the
    routed run's rows that went to the same expert: same adapter, same numbers).
    """
    per_row: list[float | None] = [None] * len(test)
    groups: dict[int | None, list[int]] = {}
    for index, row in enumerate(test):
        if known and index in known:
            per_row[index] = known[index]
        elif row["task"] != "squad":
            groups.setdefault(None if experts is None else experts[index], []).append(index)
    for expert, indices in groups.items():
        scorer = model
        if expert is not None:
            router.model.set_adapter(router.adapter_names[expert])  # same numbers as a mixed batch (tested)
            scorer = router.model
        for index, value in zip(indices, score_likelihood_tasks(scorer, tokenizer, [test[i] for i in indices])):
            per_row[index] = value
    squad = [i for i, row in enumerate(test) if row["task"] == "squad"]
    generate = model.generate if router is None else router.generate
    squad_experts = None if experts is None else [experts[i] for i in squad]
    for index, value in zip(squad, squad_f1(generate, tokenizer, [test[i] for i in squad], squad_experts,
                                            args.squad_new_tokens, args.eval_batch, next(model.parameters()).device)):
        per_row[index] = value
    tasks: dict[str, Any] = {}
    for task in TASKS:
        values = [per_row[i] for i, row in enumerate(test) if row["task"] == task]
        stderr = standard_error(values)
        metric = "bits_per_byte" if task == "gsm8k" else ("f1" if task == "squad" else PRIMARY_METRIC[task])
        tasks[task] = {"metric": metric, "value": statistics.fmean(values), "stderr": stderr, "n": len(values)}
    average = statistics.fmean(tasks[t]["value"] for t in AVERAGED)
    errors = [tasks[t]["stderr"] for t in AVERAGED]
    average_se = average_standard_error(errors) if all(e is not None for e in errors) else None
    return {"tasks": tasks, "average": average, "average_stderr": average_se, "per_row": per_row}


# ------------------------------------------------------------------------------------------ variants
def oracle_experts(router, train: list[dict]) -> dict[str, int]:
    """Each task's expert: the cluster holding most of that task's training examples."""
    mapping = {}
    for task in TASKS:
        labels = [label for label, row in zip(router.training_labels, train) if row["task"] == task]
        mapping[task] = max(sorted(set(labels)), key=labels.count)
    return mapping


def generation_overhead(router, tokenizer, test: list[dict], args) -> dict[str, Any]:
    """Greedy generation of one batch of test queries taken round-robin over the tasks (so the batch mixes
    experts), routed vs one adapter for every row; the mixed batch runs stacked (the default) and through
    PEFT's per-row ``adapter_names`` path, each with and without the routing forward."""
    by_task = {task: [row for row in test if row["task"] == task] for task in TASKS}
    rows = [by_task[TASKS[i % len(TASKS)]][i // len(TASKS)] for i in range(args.eval_batch)]
    inputs = tokenizer([query_of(r) for r in rows], return_tensors="pt", padding=True).to(router.device)
    settings = {"max_new_tokens": args.overhead_tokens, "min_new_tokens": args.overhead_tokens, "do_sample": False}
    routed = router.route(**inputs)

    def single():
        router.model.set_adapter(router.adapter_names[0])
        return router.model.generate(**inputs, **settings)

    def on(path, experts=None):
        def run():
            router.mixed_batch = path
            return router.generate(**inputs, experts=experts, **settings)
        return run

    runs = {"single_adapter": single, "routed": on("stacked"), "mixed_no_routing": on("stacked", routed),
            "routed_peft": on("peft"), "mixed_no_routing_peft": on("peft", routed)}
    timings: dict[str, list[float]] = {name: [] for name in runs}
    with torch.inference_mode():
        for _ in range(args.overhead_repeats):
            for name, run in runs.items():  # interleaved, so a load change hits every variant alike
                start = time.perf_counter()
                run()
                synchronize(router.device)
                timings[name].append(time.perf_counter() - start)
    router.mixed_batch = "stacked"
    medians = {name: statistics.median(values) for name, values in timings.items()}
    return {"batch": len(rows), "prompt_tokens": int(inputs.input_ids.shape[1]), "new_tokens": args.overhead_tokens,
            "repeats": args.overhead_repeats, "median_seconds": medians, "seconds": timings,
            "distinct_experts_in_batch": len(set(routed.tolist())),
            "routed_vs_single": medians["routed"] / medians["single_adapter"],
            "mixed_vs_single": medians["mixed_no_routing"] / medians["single_adapter"],
            "routed_peft_vs_single": medians["routed_peft"] / medians["single_adapter"],
            "mixed_peft_vs_single": medians["mixed_no_routing_peft"] / medians["single_adapter"]}


def training_speed(base, tokenizer, train: list[dict], config: ExpertConfig, args) -> dict[str, Any]:
    """Seconds per optimizer step (forward, backward, AdamW) of one LoRA adapter and of K experts trained jointly
    (``JointExpertsTrainingModule``, the rows of each batch spread over the experts), on the same training
    windows, interleaved step by step so a load change hits both alike; medians after one untimed step each."""
    from peft import get_peft_model

    windows = packed_instruction_dataset(instruction_rows(train), tokenizer, args.seq_len, seed=0)
    batches = [{key: torch.tensor(windows[i : i + args.batch_size][key], device=args.device)
                for key in ("input_ids", "labels")}
               for i in range(0, (args.overhead_repeats + 1) * args.batch_size, args.batch_size)]
    experts = torch.arange(args.batch_size) % args.experts  # every expert in every batch
    names = [config.adapter_name(i) for i in range(args.experts)]
    single = get_peft_model(copy.deepcopy(base), config.lora_config(base))
    joint_model = get_peft_model(copy.deepcopy(base), config.lora_config(base), adapter_name=names[0])
    for name in names[1:]:
        joint_model.add_adapter(name, config.lora_config(base))
    joint = JointExpertsTrainingModule(joint_model, names)
    runs = {"single_adapter": (single, lambda batch: single(**batch)),
            "joint_experts": (joint, lambda batch: joint(**batch, expert=experts))}
    optimizers = {name: torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=args.learning_rate)
                  for name, (module, _) in runs.items()}
    timings: dict[str, list[float]] = {name: [] for name in runs}
    for step, batch in enumerate(batches):
        for name, (module, forward) in runs.items():
            module.train()
            start = time.perf_counter()
            forward(batch).loss.backward()
            optimizers[name].step()
            optimizers[name].zero_grad()
            synchronize(args.device)
            if step:  # the first step of each warms the allocator and the kernels
                timings[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(values) for name, values in timings.items()}
    return {"steps": len(batches) - 1, "batch": args.batch_size, "seq_len": args.seq_len, "experts": args.experts,
            "median_seconds": medians, "seconds": timings,
            "joint_vs_single": medians["joint_experts"] / medians["single_adapter"]}


def routing_probe(base, tokenizer, train: list[dict], test: list[dict], config: ExpertConfig, args) -> list[dict]:
    """For each embedding block and prompt length: k-means (the experts' clustering) of the training prompts, the
    share of training prompts in their task's majority cluster (purity) and of test queries routed to it."""
    from hf_compress.experts import EmbeddingSpace
    from hf_compress.experts.clustering import assign, kmeans

    rows = []
    for layer in args.probe_layers:
        for length in args.probe_lengths:
            spec = EmbeddingSpec.for_model(base, layer, length)
            raw = embed_texts(base, tokenizer, [r["prompt"] for r in train], spec, progress=False)
            space = EmbeddingSpace.fit(raw)
            clustering = kmeans(space(raw), config.num_experts, seed=config.seed, restarts=config.kmeans_restarts,
                                iterations=config.kmeans_iterations)
            labels = clustering.labels.tolist()
            majority = {}
            for task in TASKS:
                of_task = [label for label, row in zip(labels, train) if row["task"] == task]
                majority[task] = max(sorted(set(of_task)), key=of_task.count)
            queries = embed_texts(base, tokenizer, [query_of(r) for r in test], spec, progress=False)
            routes = assign(space(queries), clustering.centroids).tolist()
            rows.append({"layer": layer, "max_length": length,
                         "purity": statistics.fmean(l == majority[r["task"]] for l, r in zip(labels, train)),
                         "routing_accuracy": statistics.fmean(e == majority[r["task"]] for e, r in zip(routes, test))})
            logger.info("block %d, %d tokens: %s", layer, length, rows[-1])
    return rows


def main() -> None:
    parser = benchmark_parser(__doc__, "experts", devices=("cpu", "cuda"))
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--train-per-task", type=int, default=12)
    parser.add_argument("--test-per-task", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps of every trained variant")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--budget", type=float, default=0.2)
    parser.add_argument("--embedding-max-length", type=int, default=48)
    parser.add_argument("--embedding-layer", type=int, default=None,
                        help="decoder block the routing embedding is pooled from (default: ExpertConfig's, (n + 4) // 8)")
    parser.add_argument("--squad-new-tokens", type=int, default=8)
    parser.add_argument("--eval-batch", type=int, default=3)
    parser.add_argument("--overhead-tokens", type=int, default=32)
    parser.add_argument("--overhead-repeats", type=int, default=3)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--shared-warmup", type=float, default=0.5,
                        help="experts-warm: fraction of --steps trained on all data before the experts split")
    parser.add_argument("--skip-overhead", action="store_true",
                        help="do not time generation (e.g. while the machine is shared; experts-overhead.md holds it)")
    parser.add_argument("--overhead-only", action="store_true",
                        help="train the routed experts and time generation only (speed does not depend on how long "
                             "the experts trained); pair with --output-name experts-overhead")
    parser.add_argument("--training-speed", action="store_true",
                        help="no evaluation: time optimizer steps of K experts trained jointly against one adapter, "
                             "interleaved on the same batches (--overhead-repeats steps each); pair with "
                             "--output-name experts-training-speed")
    parser.add_argument("--routing-probe", action="store_true",
                        help="no training: k-means purity and routing accuracy for each --probe-layers x --probe-lengths "
                             "embedding (why the default block and length); pair with --output-name experts-routing")
    parser.add_argument("--probe-layers", nargs="+", type=int, default=[3, 7, 14, 22])
    parser.add_argument("--probe-lengths", nargs="+", type=int, default=[64, 128, 256])
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--extend", action="store_true",
                        help="keep the variants already in bench/results/<output-name>.json (its settings must equal "
                             "these but for --variants) and run only the missing ones, so every variant is paired "
                             "on the same test rows without retraining the earlier ones")
    args = parser.parse_args()
    if not start_benchmark(args, markdown):
        return
    if args.quick:
        args.model, args.train_per_task, args.test_per_task, args.steps = "tiny-llama", 6, 2, 2
        args.seq_len, args.experts, args.squad_new_tokens, args.overhead_tokens, args.overhead_repeats = 32, 2, 4, 4, 1
        args.probe_layers, args.probe_lengths = [0, 1], [16, 48]
    settings = {k: v for k, v in vars(args).items() if k not in ("render", "supported_devices")}
    settings["command"] = "python scripts/bench_experts.py" + (" --quick" if args.quick else "")
    settings["machine_note"] = (f"CPU, {args.threads} threads, float32, machine shared with other jobs"
                                if args.device == "cpu" else f"{device_description(args.device)}, float32")
    base, tokenizer = load_model(args.model)
    base.to(args.device)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    train, test = split_tasks(args.train_per_task, args.test_per_task, args.seed)
    settings["examples"] = {"train": len(train), "test": len(test)}
    config = ExpertConfig(num_experts=args.experts, r=args.r, seq_len=args.seq_len, embedding_layer=args.embedding_layer,
                          embedding_max_length=args.embedding_max_length, seed=0)
    single = ExpertConfig(num_experts=1, r=args.r, seq_len=args.seq_len, seed=0)
    training = TrainingSettings(max_steps=args.steps, per_device_batch_size=args.batch_size,
                                learning_rate=args.learning_rate, logging_steps=max(1, args.steps // 4),
                                use_cpu=args.device == "cpu", seed=0)
    if args.routing_probe:
        results = {"routing_probe": routing_probe(base, tokenizer, train, test, config, args)}
        write_benchmark(args.output_name, settings, results, markdown({"settings": settings, "results": results}))
        return
    if args.training_speed:
        results = {"training_speed": training_speed(base, tokenizer, train, config, args)}
        write_benchmark(args.output_name, settings, results, markdown({"settings": settings, "results": results}))
        return
    start = time.perf_counter()
    spec = EmbeddingSpec.for_model(base, config.embedding_layer, config.embedding_max_length)
    settings["embedding_layer"] = spec.layer
    pool_embeddings = embed_texts(base, tokenizer, [r["prompt"] for r in train], spec)
    results: dict[str, Any] = {"embedding_seconds": time.perf_counter() - start, "variants": {}}
    if args.extend:
        results.update(_earlier_run(args.output_name, settings))

    def save(partial=True):
        payload = {"settings": settings, "results": results}
        write_benchmark(args.output_name, settings, results, markdown(payload))
        if partial:
            logger.info("saved partial results")

    if args.overhead_only:
        router = train_experts(copy.deepcopy(base), train, config, args=training, tokenizer=tokenizer,
                               embeddings=pool_embeddings)
        results["generation_overhead"] = generation_overhead(router, tokenizer, test, args)
        results["training"] = {k: router.info["training"][k] for k in ("total_steps", "train_seconds")}
        save(partial=False)
        return
    subsets: dict[str, tuple[list[dict], dict]] = {}
    selections = [("facility_location", None), ("random", None)]
    if any(v.startswith("lora-assl-loss") for v in args.variants):
        selections.append(("facility_location", "loss"))
    for method, weights in selections:
        subset, report = select_data(train, base, args.budget, tokenizer=tokenizer, method=method, seed=args.seed,
                                     embeddings=pool_embeddings, weights=weights, return_report=True)
        subsets[method + (f"_{weights}" if weights else "")] = (subset, report.summary())
    # Merged: an extended run keeps the earlier run's selections (the same seed selects the same rows).
    results["selection"] = {**results.get("selection", {}),
                            **{m: {**s, "tasks": _task_counts(sub)} for m, (sub, s) in subsets.items()}}

    semantic = None
    for variant in args.variants:
        if variant in results["variants"]:
            logger.info("variant %s: kept from the earlier run", variant)
            continue
        logger.info("variant %s", variant)
        start = time.perf_counter()
        entry: dict[str, Any] = {}
        model = copy.deepcopy(base)
        router, experts, known = None, None, None
        if variant == "base":
            entry["kept"] = 0
        elif variant.startswith("lora-"):
            selection = SUBSETS[variant.removesuffix("-epochs")]
            data = train if selection is None else subsets[selection][0]
            steps = max(1, round(args.steps * len(data) / len(train))) if variant.endswith("-epochs") else args.steps
            router = train_experts(model, data, single, args=dataclasses.replace(training, max_steps=steps),
                                   tokenizer=tokenizer)
            experts = [0] * len(test)
            entry["kept"] = len(data)
        elif variant == "experts-oracle" and semantic is not None:
            router, model, routed_experts, routed_scores = semantic
            mapping = oracle_experts(router, train)
            experts = [mapping[row["task"]] for row in test]
            known = {i: routed_scores[i] for i, row in enumerate(test)
                     if row["task"] != "squad" and experts[i] == routed_experts[i]}
            entry["kept"] = len(train)
            entry["oracle_mapping"] = mapping
        else:
            clusters = None
            if variant == "experts-random":
                generator = torch.Generator().manual_seed(args.seed)
                clusters = torch.randperm(len(train), generator=generator) % args.experts
            variant_config = {"experts-warm": dataclasses.replace(config, shared_warmup=args.shared_warmup),
                              "experts-joint": dataclasses.replace(config, joint_training=True)}.get(variant, config)
            router = train_experts(model, train, variant_config, args=training, tokenizer=tokenizer, clusters=clusters,
                                   embeddings=pool_embeddings)
            mapping = oracle_experts(router, train)
            entry["kept"] = len(train)
            if variant == "experts-oracle":  # the routed experts are not in this run: train them, route by task
                experts = [mapping[row["task"]] for row in test]
                entry["oracle_mapping"] = mapping
            else:
                experts = router.route_texts([query_of(row) for row in test]).tolist()
                entry["routing_accuracy"] = statistics.fmean(e == mapping[row["task"]] for e, row in zip(experts, test))
            entry["cluster_tasks"] = _cluster_tasks(router, train)
            if variant == "experts-routed" and not args.skip_overhead:
                entry["generation_overhead"] = generation_overhead(router, tokenizer, test, args)
        if router is not None and variant != "experts-oracle":
            entry["training"] = {k: router.info["training"][k] for k in ("total_steps", "train_seconds")}
        entry.update(evaluate(model, router, tokenizer, test, experts, args, known if variant == "experts-oracle" else None))
        per_row = entry["per_row"]  # kept in the JSON: paired differences between variants
        if variant == "experts-routed":
            semantic = (router, model, experts, per_row)
        entry["seconds"] = time.perf_counter() - start
        results["variants"][variant] = entry
        logger.info("%s: average %.4f (%s)", variant, entry["average"], entry.get("routing_accuracy"))
        save()
    save(partial=False)
    logger.info("done")


# Settings that say what a run did, not what it measured: an extended run may differ in these.
_RUN_ONLY_SETTINGS = ("variants", "skip_overhead", "extend", "command", "machine_note")


def _earlier_run(name: str, settings: dict[str, Any]) -> dict[str, Any]:
    """The variants of the stored run ``name`` and where they came from, for ``--extend``.

    Raises ``SystemExit`` when there is no such run or its settings differ from ``settings`` (other than the
    run-only ones), since pairing variants measured under different settings would compare different things.
    """
    path = results_directory() / f"{name}.json"
    if not path.is_file():
        raise SystemExit(f"--extend: {path} does not exist; run without --extend first.")
    payload = json.loads(path.read_text())
    stored = payload["settings"]
    # An option one of the runs does not know (added since) counts as the same when the other leaves it off.
    differing = sorted(k for k in set(settings) | set(stored) if k not in _RUN_ONLY_SETTINGS and (
        settings.get(k) != stored.get(k) if k in settings and k in stored else bool(settings.get(k, stored.get(k)))))
    if differing:
        raise SystemExit(f"--extend: {path} was run with other settings ({', '.join(differing)}); pass the same "
                         "options as that run (its command is in the file) or choose another --output-name.")
    own = {k: payload[k] for k in ("command", "commit", "date")}
    own["variants"] = [v for v in payload["results"]["variants"]
                       if all(v not in run["variants"] for run in payload["results"].get("earlier_runs", []))]
    return {"variants": dict(payload["results"]["variants"]),
            "earlier_runs": kept_runs([*payload["results"].get("earlier_runs", []), own],
                                      payload["results"]["variants"])}


def kept_runs(runs: list[dict[str, Any]], variants: dict[str, Any]) -> list[dict[str, Any]]:
    """``runs`` naming only the variants still stored (a variant deleted from the JSON to be measured again
    comes from the new run), without the runs left with none."""
    kept = [{**run, "variants": [v for v in run["variants"] if v in variants]} for run in runs]
    return [run for run in kept if run["variants"]]


def _short_commit(commit: str | None) -> str:
    return "unknown" if commit is None else commit[:7] + ("+dirty" if commit.endswith("+dirty") else "")


def _task_counts(rows: list[dict]) -> dict[str, int]:
    return {task: sum(row["task"] == task for row in rows) for task in TASKS}


def _cluster_tasks(router, train: list[dict]) -> list[dict[str, int]]:
    clusters = [dict() for _ in range(router.num_experts)]
    for label, row in zip(router.training_labels, train):
        clusters[label][row["task"]] = clusters[label].get(row["task"], 0) + 1
    return clusters


# ------------------------------------------------------------------------------------------ table
SHORT = {"arc_easy": "ARC-E", "arc_challenge": "ARC-C", "piqa": "PIQA", "hellaswag": "HellaS", "boolq": "BoolQ",
         "winogrande": "Wino", "squad": "SQuAD F1", "gsm8k": "GSM8K bpb ↓"}


def markdown(payload: dict[str, Any]) -> str:
    settings, results = payload["settings"], payload["results"]
    if settings.get("overhead_only"):
        return _overhead_markdown(settings, results)
    if settings.get("routing_probe"):
        return _routing_markdown(settings, results)
    if settings.get("training_speed"):
        return _training_speed_markdown(settings, results)
    lines = [
        "# SilverSight / ASSL experts (SmolLM2-135M-Instruct, multi-task instruction mix)",
        "",
        f"{settings['examples']['train']} training / {settings['examples']['test']} test examples "
        f"({settings['train_per_task']} / {settings['test_per_task']} per task, disjoint), {settings['steps']} "
        f"optimizer steps per trained variant (batch {settings['batch_size']} x {settings['seq_len']} packed tokens), "
        f"LoRA r={settings['r']}, K={settings['experts']} experts, ASSL budget {settings['budget']:.0%}. Scores in % "
        "± one standard error; GSM8K is bits per byte of the reference solution (lower is better, not averaged).",
        "",
        "| variant | average | " + " | ".join(SHORT[t] for t in TASKS) + " | routing acc. | data kept | steps | train s |",
        "|---" * (len(TASKS) + 6) + "|",
    ]
    for name, entry in results["variants"].items():
        cells = []
        for task in TASKS:
            score = entry["tasks"][task]
            scale = 1 if task == "gsm8k" else 100
            digits = 2 if task == "gsm8k" else 1
            error = f" ± {score['stderr'] * scale:.{digits}f}" if score["stderr"] is not None else ""
            cells.append(f"{score['value'] * scale:.{digits}f}{error}")
        routing = f"{entry['routing_accuracy']:.0%}" if "routing_accuracy" in entry else "—"
        train = entry.get("training", {})
        se = f" ± {entry['average_stderr'] * 100:.1f}" if entry.get("average_stderr") is not None else ""
        lines.append(f"| {name} | {entry['average'] * 100:.1f}{se} | " + " | ".join(cells)
                     + f" | {routing} | {entry['kept']} | {train.get('total_steps', '—')} | "
                     + f"{train.get('train_seconds', 0):.0f} |")
    lines.append("")
    selection = results.get("selection", {})
    if selection:
        fl, rnd = selection["facility_location"], selection["random"]
        lines.append(f"ASSL selection kept {fl['kept']} of {fl['pool_size']} examples: mean cosine distance from a pool "
                     f"example to its nearest kept one {fl['mean_distance']:.3f} (a random subset of the same size: "
                     f"{fl['random_mean_distance']:.3f}); worst {fl['max_distance']:.3f} (random: {rnd['max_distance']:.3f}). "
                     f"Kept per task: {fl['tasks']}.")
        if "facility_location_loss" in selection:
            weighted = selection["facility_location_loss"]
            lines.append(f"Weighted by the base model's completion loss, it kept per task: {weighted['tasks']} (mean "
                         f"distance {weighted['mean_distance']:.3f}).")
        lines.append("")
    full = {"train_per_task": 200, "test_per_task": 99, "steps": 400, "batch_size": 8, "seq_len": 256,
            "embedding_max_length": 128, "squad_new_tokens": 16}
    shrunk = [f"{k.replace('_', '-')} {settings[k]} (full: {v})" for k, v in full.items() if settings.get(k, v) < v]
    full_command = ("`python scripts/bench_experts.py --train-per-task 200 --test-per-task 99 --steps 400 "
                    "--batch-size 8 --seq-len 256 --embedding-max-length 128 --squad-new-tokens 16 --eval-batch 16`")
    if shrunk and (settings["steps"] < 20 or settings["test_per_task"] < 50):
        lines.append("**Scale.** Sized for a shared 2-core CPU, this run is a smoke test of the protocol, not a "
                     "measurement of the targets: " + ", ".join(shrunk) + ". With so few steps the LoRA updates "
                     "are tiny and with so few test examples per task every score difference here is inside the "
                     f"noise. Full run: {full_command}.")
        lines.append("")
    elif shrunk:
        lines.append("**Scale.** Reduced to fit about an hour on a 2-core CPU: " + ", ".join(shrunk) + ". The "
                     f"full protocol is {full_command}.")
        lines.append("")
    for run in results.get("earlier_runs", []):
        lines.append(f"Variants {', '.join(run['variants'])} come from an earlier run with the same settings "
                     f"(commit {_short_commit(run['commit'])}, {run['date']}: `{run['command']}`); training is seeded, and "
                     "every variant scores the same test rows, so the paired differences hold across the runs.")
        lines.append("")
    lines += _target_lines(results)
    routed = results["variants"].get("experts-routed", {})
    overhead = results.get("generation_overhead") or routed.get("generation_overhead")
    if overhead:
        lines.append(_overhead_line(overhead))
    if routed.get("cluster_tasks"):
        lines.append(f"Semantic clusters (training examples per task): {routed['cluster_tasks']}.")
    lines.append("")
    return "\n".join(lines) + "\n"


def _overhead_markdown(settings: dict[str, Any], results: dict[str, Any]) -> str:
    training = results.get("training", {})
    lines = [f"# Expert routing: generation time of a mixed batch ({settings['model']})", "",
             f"K={settings['experts']} LoRA experts (r={settings['r']}, every linear layer) trained on semantic clusters "
             f"of {settings['examples']['train']} instruction examples for {training.get('total_steps', '?')} steps in "
             "all: speed does not depend on how far they trained, so this run only trains them briefly and times "
             "greedy generation. Routing embeds each prompt with the base model's first blocks (up to block "
             f"{settings.get('embedding_layer', '(n + 4) // 8')}, at most {settings['embedding_max_length']} tokens).", "",
             _overhead_line(results["generation_overhead"]), ""]
    return "\n".join(lines + _target_lines(results)) + "\n"


def _training_speed_markdown(settings: dict[str, Any], results: dict[str, Any]) -> str:
    speed = results["training_speed"]
    m = speed["median_seconds"]
    return "\n".join([
        f"# Expert training: one joint step of K experts vs one adapter's step ({settings['model']})", "",
        f"Seconds per optimizer step (forward, backward, AdamW) on the same {speed['batch']} x {speed['seq_len']}-token "
        f"training windows, LoRA r={settings['r']} on every linear layer, median of {speed['steps']} steps each, "
        "interleaved step by step after one untimed step each. The joint step trains "
        f"{speed['experts']} experts (`ExpertConfig(joint_training=True)`), the batch's rows spread over them.", "",
        "| run | s / step | vs one adapter |", "|---|---|---|",
        f"| one adapter | {m['single_adapter']:.2f} | 1.00x |",
        f"| {speed['experts']} experts, joint | {m['joint_experts']:.2f} | {speed['joint_vs_single']:.2f}x |", ""]) + "\n"


def _routing_markdown(settings: dict[str, Any], results: dict[str, Any]) -> str:
    lines = [f"# Expert routing: which embedding block and prompt length ({settings['model']})", "",
             f"No training. The {settings['examples']['train']} training prompts of the benchmark's task mix are "
             f"embedded (mean of one decoder block's output over the first N prompt tokens), clustered by k-means "
             f"(K={settings['experts']}, the experts' clustering); purity: the share of training prompts in their "
             f"task's majority cluster; routing: the share of the {settings['examples']['test']} test queries sent "
             "to that cluster. The default is block (n + 4) // 8 (4 of SmolLM2's 30) and 128 tokens.", "",
             "| block | prompt tokens | purity | routing accuracy |", "|---|---|---|---|"]
    for row in results["routing_probe"]:
        lines.append(f"| {row['layer']} | {row['max_length']} | {row['purity']:.1%} | {row['routing_accuracy']:.1%} |")
    return "\n".join(lines) + "\n"


def _overhead_line(overhead: dict[str, Any]) -> str:
    m = overhead["median_seconds"]
    prompts = ("SQuAD prompts" if "prompt_tokens" not in overhead else  # runs before the batch mixed tasks
               f"test queries round-robin over the tasks, padded to {overhead['prompt_tokens']} tokens")
    text = (f"Generation overhead (batch {overhead['batch']} {prompts}, {overhead['new_tokens']} forced new tokens, "
            f"median of {overhead['repeats']}, interleaved; {overhead['distinct_experts_in_batch']} experts in the "
            f"batch): one adapter {m['single_adapter']:.2f} s; routed {m['routed']:.2f} s "
            f"({overhead['routed_vs_single']:.2f}x), of which the mixed batch without the routing forward "
            f"{m['mixed_no_routing']:.2f} s ({overhead['mixed_vs_single']:.2f}x)")
    if "routed_peft" in m:
        text += (f". Through PEFT's per-row adapter_names path instead of the stacked one: routed {m['routed_peft']:.2f} s "
                 f"({overhead['routed_peft_vs_single']:.2f}x), without the routing forward "
                 f"{m['mixed_no_routing_peft']:.2f} s ({overhead['mixed_peft_vs_single']:.2f}x)")
    elif "prompt_tokens" in overhead:
        text += (" (PEFT's per-row adapter_names path, the only mixed-batch path when this ran; the stacked path "
                 "that replaced it is timed in experts-overhead.md)")
    return text + "."


def _paired_difference(a: dict[str, Any], b: dict[str, Any]) -> tuple[float, float] | None:
    """Average score of ``a`` minus ``b`` over the averaged tasks, with the standard error of the paired
    per-example differences (both variants scored the same test rows)."""
    if "per_row" not in a or "per_row" not in b:
        return None
    return paired_task_average_difference(_rows_by_task(a), _rows_by_task(b), AVERAGED)


def _rows_by_task(variant: dict[str, Any]) -> dict[str, list[float]]:
    """A variant's flat ``per_row`` scores split by task (rows are grouped in TASKS order by split_tasks)."""
    rows, offset = {}, 0
    for task in TASKS:
        n = variant["tasks"][task]["n"]
        rows[task], offset = variant["per_row"][offset : offset + n], offset + n
    return rows


def _target_lines(results: dict[str, Any]) -> list[str]:
    """The issue's targets, each with the measured numbers and met / missed / tie."""
    variants = results["variants"]
    lines = []

    def difference(a: str, b: str) -> str:
        measured = _paired_difference(variants[a], variants[b])
        return "—" if measured is None else f"{measured[0] * 100:+.1f} ± {measured[1] * 100:.1f} points (paired SE)"

    def plus_two_points(a: str) -> str:  # a vs one LoRA on all data, judged at two paired standard errors
        measured = _paired_difference(variants[a], variants["lora-all"])
        verdict = "" if measured is None else (" — met" if measured[0] - 2 * measured[1] >= 0.02 else
                                              " — missed" if measured[0] + 2 * measured[1] < 0.02 else " — not resolved")
        return f"{difference(a, 'lora-all')}{verdict}"

    if {"experts-routed", "lora-all"} <= variants.keys():
        lines.append(f"- Routed experts vs one LoRA on all data (target ≥ +2 points): {plus_two_points('experts-routed')}.")
    for variant, how, plain in (("experts-warm", "with a shared warm start", "the same experts without it"),
                                ("experts-joint", "trained jointly", "the same experts trained one after another")):
        if {variant, "lora-all"} <= variants.keys():
            lines.append(f"- Routed experts {how} vs one LoRA on all data (target ≥ +2 points): "
                         f"{plus_two_points(variant)}"
                         + (f"; vs {plain}: {difference(variant, 'experts-routed')}" if "experts-routed" in variants
                            else "") + ".")
    if {"lora-assl", "lora-all", "lora-random"} <= variants.keys():
        keep = variants["lora-assl"]["average"] / variants["lora-all"]["average"]
        lines.append(f"- ASSL subset vs full data (target ≥ 95% of the full-data score): {keep:.1%} "
                     f"({difference('lora-assl', 'lora-all')}) — {'met' if keep >= 0.95 else 'missed'}; vs a random "
                     f"subset of the same size (target: higher): {difference('lora-assl', 'lora-random')}.")
    if {"lora-assl-epochs", "lora-all", "lora-random-epochs"} <= variants.keys():
        keep = variants["lora-assl-epochs"]["average"] / variants["lora-all"]["average"]
        steps = variants["lora-assl-epochs"].get("training", {}).get("total_steps", "—")
        lines.append(f"- The same subsets at equal epochs ({steps} steps, not the target's protocol): ASSL keeps "
                     f"{keep:.1%} of the full-data score ({difference('lora-assl-epochs', 'lora-all')}); vs the random "
                     f"subset: {difference('lora-assl-epochs', 'lora-random-epochs')}.")
    for suffix, protocol in (("", "equal steps"), ("-epochs", "equal epochs")):
        weighted, plain = f"lora-assl-loss{suffix}", f"lora-assl{suffix}"
        if {weighted, "lora-all", f"lora-random{suffix}"} <= variants.keys():
            keep = variants[weighted]["average"] / variants["lora-all"]["average"]
            lines.append(f"- ASSL weighted by the model's loss ({protocol}): keeps {keep:.1%} of the full-data score "
                         f"({difference(weighted, 'lora-all')}); vs the random subset: "
                         f"{difference(weighted, f'lora-random{suffix}')}"
                         + (f"; vs unweighted ASSL: {difference(weighted, plain)}" if plain in variants else "") + ".")
    routed = variants.get("experts-routed", {})
    if "routing_accuracy" in routed:
        lines.append(f"- Router picks the oracle expert (target ≥ 90%): {routed['routing_accuracy']:.1%} — "
                     f"{'met' if routed['routing_accuracy'] >= 0.9 else 'missed'}.")
    overhead = results.get("generation_overhead") or routed.get("generation_overhead")
    if overhead:
        lines.append(f"- Routed generation time vs one adapter (target ≤ 1.10x): {overhead['routed_vs_single']:.2f}x "
                     f"({overhead['distinct_experts_in_batch']} experts in the batch) — "
                     f"{'met' if overhead['routed_vs_single'] <= 1.10 else 'missed'}.")
    return lines + [""] if lines else []


if __name__ == "__main__":
    main()
