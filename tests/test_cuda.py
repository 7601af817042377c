"""Every journey on CUDA, on tiny models: prune + save + reload (with the RIA and the learned permutation), Týr
and block removal, DL-QAT, every speculative strategy, drafting heads, CoSpec (train an arbiter, decode), SparK
and the structured cache, token routing, LoRA experts (train, routed generate, reload), stacked sparse + packed
checkpoints, a Týr → Wanda 2:4 → DL-QAT recipe, an artifact build, the CLI with ``--device cuda``.

Each journey is a function of the device, so the same code runs here on CUDA (marker ``cuda``, skipped
without a GPU) and on the CPU under the device guard of ``test_device_guard.py``, which fails when the
library creates a tensor that does not follow its inputs (what breaks on a GPU). Journeys reuse the
settings and helpers of each method's own tests. fp32 throughout: strict speculative strategies match
greedy ``generate()`` exactly only in fp32 (bf16 verification rounds differently from one-token steps).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM, DynamicCache

from hf_compress.assets import tiny_model, tiny_tokenizer
from hf_compress.cache import SparKCache, StructuredChannelCache, cache_kwargs
from hf_compress.pruning import BlockRemovalConfig, BlockRemovalPruner, PRUNERS, SDSConfig, SDSPruner, TyrPruner
from hf_compress.experts import ExpertConfig, ExpertRouter, train_experts
from hf_compress.pruning import LearnedPermutationConfig, WandaConfig, WandaPruner
from hf_compress.formats.packed import save_packed
from hf_compress.quantization import DLQATConfig, PackedLinear, quantize_rtn
from hf_compress.recipe import run
from hf_compress.routing import RoutingSchedule, install_routing, save_routed
from hf_compress.speculative import FLy, SpeculativeDecoding, SpeculativeSampling
from hf_compress.speculative.cospec import ArbiterConfig, CoSpec, train_arbiter
from hf_compress.speculative.heads import (
    Amphista,
    AmphistaConfig,
    AmphistaHeads,
    DraftTree,
    MedusaConfig,
    MedusaHeads,
    head_accuracy,
    self_distillation_dataset,
    train_heads,
)
from hf_compress.training import TrainingSettings, causal_lm_dataset, train_with_trainer

from test_cospec import PROMPTS as COSPEC_PROMPTS, quick_settings as cospec_settings, task as cospec_task
from test_experts import _task_rows as expert_task_rows
from test_permutation import SMALL as PERMUTATION_SMALL, TINY_LEARNED
from test_pruning import CALIBRATION_TEXT, SMALL
from test_sds import FAST
from test_speculative import PROMPTS, perturbed
from test_tyr import TEXT, _small_config


pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

GREEDY = {"do_sample": False, "max_new_tokens": 12}


def _ids(device, seed: int = 0, shape: tuple[int, int] = (2, 24)) -> torch.Tensor:
    return torch.randint(3, 250, shape, generator=torch.Generator().manual_seed(seed)).to(device)


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def _reloaded(folder, device):
    return AutoModelForCausalLM.from_pretrained(folder).to(device).eval()


def _settings(device, **fields) -> TrainingSettings:
    return TrainingSettings(use_cpu=torch.device(device).type == "cpu", logging_steps=100, **fields)


# ------------------------------------------------------------------------------------------ pruning
def journey_prune_save_reload(device, tmp_path) -> None:
    for method in ("magnitude", "wanda", "sparsegpt"):
        model, tokenizer = tiny_model("llama")
        model.to(device)
        pruner_class = PRUNERS[method]
        config = pruner_class.config_class(sparsity="2:4", **SMALL)
        data = None if method == "magnitude" else CALIBRATION_TEXT
        pruned = pruner_class(model, tokenizer).prune(config, data, save_dir=tmp_path / method, progress=False)
        assert all(p.device.type == torch.device(device).type for p in pruned.parameters())
        ids = _ids(device)
        assert torch.equal(_logits(_reloaded(tmp_path / method, device), ids), _logits(pruned, ids)), method


def journey_sds_save_reload(device, tmp_path) -> None:
    model, tokenizer = tiny_model("mistral")
    model.to(device)
    SDSPruner(model, tokenizer).prune(SDSConfig(sparsity="2:4", base="wanda", **FAST), CALIBRATION_TEXT,
                                      save_dir=tmp_path / "sds", progress=False)
    ids = _ids(device)
    assert torch.equal(_logits(_reloaded(tmp_path / "sds", device), ids), _logits(model, ids))


def journey_tyr_save_reload(device, tmp_path) -> None:
    model, tokenizer = tiny_model("llama", num_hidden_layers=3)
    model.to(device)
    pruned = TyrPruner(model, tokenizer).prune(_small_config(), TEXT, save_dir=tmp_path / "tyr", progress=False)
    ids = _ids(device)
    assert torch.equal(_logits(_reloaded(tmp_path / "tyr", device), ids), _logits(pruned, ids))


def journey_block_removal_save_reload(device, tmp_path) -> None:
    model, tokenizer = tiny_model("gemma3", num_hidden_layers=4, layer_types=["sliding_attention", "full_attention"] * 2)
    model.to(device)
    config = BlockRemovalConfig(target_sparsity=0.5, num_calibration_sequences=2, calibration_seq_len=32)
    pruned = BlockRemovalPruner(model, tokenizer).prune(config, TEXT, save_dir=tmp_path / "short", progress=False)
    ids = _ids(device)
    loaded = _reloaded(tmp_path / "short", device)
    assert torch.equal(_logits(loaded, ids), _logits(pruned, ids))
    assert torch.equal(loaded.generate(ids[:1], **GREEDY), pruned.generate(ids[:1], **GREEDY))


# ------------------------------------------------------------------------------------------ DL-QAT
def journey_dlqat_train_merge_reload(device, tmp_path) -> None:
    base, _ = tiny_model("llama")
    model = get_peft_model(base.to(device), DLQATConfig(bits=3, group_size=16, r=2))
    data = causal_lm_dataset([TEXT[0]], tiny_tokenizer(), num_sequences=4, seq_len=32)
    train_with_trainer(model, data, str(tmp_path / "run"),
                       _settings(device, max_steps=2, learning_rate=1e-2, per_device_batch_size=2))
    model.eval()
    ids = _ids(device)
    fake_quant = _logits(model, ids)
    packed = model.merge_and_quantize()
    # Same grid values; the packed layer's own matmul (a fused kernel on CUDA) may sum in another order.
    tolerance = 1e-5 if torch.device(device).type == "cpu" else 1e-3
    assert torch.allclose(_logits(packed, ids), fake_quant, atol=tolerance, rtol=tolerance)
    packed.save_pretrained(tmp_path / "q")
    assert torch.equal(_logits(_reloaded(tmp_path / "q", device), ids), _logits(packed, ids))


# ------------------------------------------------------------------------------------------ speculative
def journey_speculative_strategies(device, tmp_path) -> None:
    model, tok = tiny_model("llama")
    draft = perturbed(model, 0.1).to(device)
    model.to(device)
    ids = tok(PROMPTS[:1], return_tensors="pt").input_ids.to(device)
    reference = model.generate(ids, max_new_tokens=24, do_sample=False)
    peaked = copy.deepcopy(draft)  # confidences spread over (0, 1): the draft's early stop cuts inside drafts
    with torch.no_grad():
        peaked.lm_head.weight.mul_(40)
    strict = [SpeculativeDecoding(), SpeculativeDecoding(draft, draft_confidence_threshold=None, num_draft_tokens=4),
              SpeculativeDecoding(draft, draft_confidence_threshold=None, num_draft_tokens=6, use_ngram=True),
              SpeculativeDecoding(peaked, draft_confidence_threshold=0.5, num_draft_tokens=6),
              SpeculativeDecoding(peaked, draft_confidence_threshold=0.5, num_draft_tokens=6, use_ngram=True),
              FLy(draft, loose=False), FLy(loose=False)]
    for strategy in strict:
        out = model.generate(ids, max_new_tokens=24, do_sample=False, custom_generate=strategy)
        assert torch.equal(out, reference), type(strategy).__name__
    # Sampling and loose strategies: not comparable to greedy, but they must run and produce the length.
    for strategy in (SpeculativeDecoding(draft, draft_confidence_threshold=None, acceptance=SpeculativeSampling()), FLy(draft)):
        torch.manual_seed(0)
        out = model.generate(ids, max_new_tokens=8, do_sample=True, custom_generate=strategy)
        assert out.shape == (1, ids.shape[1] + 8), type(strategy).__name__
    # Batched, left-padded.
    tok.padding_side = "left"
    enc = tok(PROMPTS, return_tensors="pt", padding=True).to(device)
    expected = model.generate(**enc, max_new_tokens=10, do_sample=False)
    out = model.generate(**enc, max_new_tokens=10, do_sample=False, custom_generate=SpeculativeDecoding(draft, draft_confidence_threshold=None, num_draft_tokens=4))
    assert torch.equal(out, expected)


def journey_cross_tokenizer_drafting(device, tmp_path) -> None:
    model, tok = tiny_model("llama")
    draft, draft_tok = tiny_model("gpt2")
    draft.resize_token_embeddings(300)
    draft_tok = copy.deepcopy(draft_tok)
    draft_tok.add_tokens(["<extra>"])
    model.to(device), draft.to(device)
    ids = tok(PROMPTS[2:], return_tensors="pt").input_ids.to(device)
    reference = model.generate(ids, max_new_tokens=16, do_sample=False)
    strategy = SpeculativeDecoding(draft, draft_confidence_threshold=None, tokenizer=tok, draft_tokenizer=draft_tok, num_draft_tokens=4)
    assert torch.equal(model.generate(ids, max_new_tokens=16, do_sample=False, custom_generate=strategy), reference)
    assert strategy.last_metrics.draft_tokens_proposed > 0


def journey_drafting_heads(device, tmp_path) -> None:
    model, _ = tiny_model("llama")
    model.to(device)
    prompts = torch.randint(3, 250, (8, 6), generator=torch.Generator().manual_seed(0)).to(device)
    data = self_distillation_dataset(model, prompts, 16, batch_size=8)
    for heads_class, config in ((AmphistaHeads, AmphistaConfig(num_heads=3, num_attention_heads=2)),
                                (MedusaHeads, MedusaConfig(num_heads=3))):
        heads = heads_class.for_model(model, config)
        train_heads(model, heads, data, _settings(device, max_steps=4, learning_rate=3e-3, per_device_batch_size=8))
        tree = DraftTree.from_accuracies(head_accuracy(model, heads, data, top_k=3), 8)
        heads.save_pretrained(tmp_path / heads_class.__name__)
        loaded = heads_class.from_pretrained(tmp_path / heads_class.__name__).to(device)
        ids = torch.tensor([data["input_ids"][0][:6]]).to(device)
        reference = model.generate(ids, **GREEDY)
        for strategy in (Amphista(heads, tree="chain"), Amphista(heads, tree=tree), Amphista(loaded, tree=tree)):
            assert torch.equal(model.generate(ids, **GREEDY, custom_generate=strategy), reference), heads_class.__name__


# ------------------------------------------------------------------------------------------ caches
def journey_spark_and_structured_cache(device, tmp_path) -> None:
    model, _ = tiny_model("llama")
    model.to(device)
    ids = _ids(device, shape=(1, 40))
    for cache_class in (SparKCache, StructuredChannelCache):
        settings = {"channel_ratio": 0.5, "recent_window": 0}
        plain = model.generate(ids, **cache_kwargs(model, cache_class(model.config, **settings)), **GREEDY)
        cache = cache_class(model.config, **settings)
        # rejected drafts are cropped out of the compressed cache
        speculative = model.generate(ids, **cache_kwargs(model, cache), custom_generate=SpeculativeDecoding(), **GREEDY)
        assert torch.equal(speculative, plain), cache_class.__name__
        assert cache.get_seq_length() == speculative.shape[1] - 1
        beams = {"num_beams": 3, "max_new_tokens": 6, "do_sample": False}
        expected = model.generate(ids, **cache_kwargs(model, DynamicCache(config=model.config)), **beams)
        lossless = cache_class(model.config, channel_ratio=0.0)
        assert torch.equal(model.generate(ids, **cache_kwargs(model, lossless), **beams), expected), cache_class.__name__


# ------------------------------------------------------------------------------------------ CLI
def journey_cli(device, tmp_path) -> None:
    from hf_compress.cli.main import main

    device_type = torch.device(device).type
    out = tmp_path / "pruned"
    assert main(["-q", "prune", "wanda", "--model", "tiny-llama", "--sparsity", "2:4", "--save-dir", str(out),
                 "--calibration-sequences", "4", "--seq-len", "32", "--device", device_type]) == 0
    assert main(["-q", "eval", "--model", str(out), "--perplexity", "wikipedia", "--max-windows", "2", "--window", "64",
                 "--tasks", "arc_easy", "--limit", "2", "--speed-prompts", "1", "--device", device_type,
                 "--output", str(tmp_path / "eval.json")]) == 0


# ------------------------------------------------------------------------------ methods added later
def journey_permuted_prune_save_reload(device, tmp_path) -> None:
    for permutation in ("ria", "swap"):
        model, tokenizer = tiny_model("llama")
        model.to(device)
        WandaPruner(model, tokenizer).prune(WandaConfig(sparsity="2:4", permutation=permutation, **SMALL),
                                            CALIBRATION_TEXT, save_dir=tmp_path / permutation, progress=False)
        ids = _ids(device)
        assert torch.equal(_logits(_reloaded(tmp_path / permutation, device), ids), _logits(model, ids)), permutation


def journey_learned_permutation_save_reload(device, tmp_path) -> None:
    # A few steps of the learned permutation (Sinkhorn costs trained through Trainer), then the Wanda prune.
    model, tokenizer = tiny_model("llama")
    model.to(device)
    permutation = LearnedPermutationConfig(**{**TINY_LEARNED, "epochs": 0.5})  # 2 steps
    pruner = WandaPruner(model, tokenizer)
    pruner.prune(WandaConfig(sparsity="2:4", permutation=permutation, **PERMUTATION_SMALL), CALIBRATION_TEXT,
                 save_dir=tmp_path / "learned", progress=False)
    assert pruner.permutation_report.training["steps"] >= 1
    ids = _ids(device)
    assert torch.equal(_logits(_reloaded(tmp_path / "learned", device), ids), _logits(model, ids))


def journey_cospec_train_and_decode(device, tmp_path) -> None:
    # A tiny arbiter (hidden-state features: the normalisation buffers meet the target's hidden states), warm
    # start + one RL step, then decoding with its ArbiterRule: strict mode is greedy generate() exactly.
    model, tok = tiny_model("llama")
    draft, _ = tiny_model("llama", seed=1)
    model.to(device), draft.to(device)
    settings = cospec_settings(max_new_tokens=10, max_forks_per_prompt=1, warm_start_steps=5)
    arbiter = train_arbiter(model, draft, cospec_task(tok), reward=lambda text, answers: float(len(text) > 3),
                            tokenizer=tok, settings=settings, config=ArbiterConfig(use_hidden_states=True))
    assert arbiter.feature_mean.device.type == torch.device(device).type
    ids = tok(COSPEC_PROMPTS[0], return_tensors="pt").input_ids.to(device)
    reference = model.generate(ids, max_new_tokens=16, do_sample=False)
    strict = CoSpec(arbiter, draft, mode="strict")
    assert torch.equal(model.generate(ids, max_new_tokens=16, do_sample=False, custom_generate=strict), reference)
    policy = CoSpec(arbiter, draft)
    out = model.generate(ids, max_new_tokens=16, do_sample=False, custom_generate=policy)
    assert out.shape == reference.shape and policy.last_metrics.target_forwards > 0
    folder = arbiter.save_pretrained(tmp_path / "arbiter")
    reloaded = model.generate(ids, max_new_tokens=16, do_sample=False, custom_generate=CoSpec(str(folder), draft))
    assert torch.equal(reloaded, out)


def journey_experts_train_and_route(device, tmp_path) -> None:
    # Two tiny LoRA experts through Trainer, then routed generation (PEFT mixed batch) and save -> load.
    model, tokenizer = tiny_model("llama")
    model.to(device)
    rows, _ = expert_task_rows(8)
    router = train_experts(model, rows, ExpertConfig(num_experts=2, r=2, seq_len=32),
                           args=_settings(device, max_steps=2, per_device_batch_size=2), tokenizer=tokenizer)
    tokenizer.padding_side = "left"
    prompts = [rows[0]["prompt"], rows[1]["prompt"], "Spell QWXYZ: "]
    batch = tokenizer(prompts, return_tensors="pt", padding=True).to(device)
    routes = router.route(**batch)
    out = router.generate(**batch, max_new_tokens=4, do_sample=False)
    assert out.device.type == torch.device(device).type and out.shape == (3, batch.input_ids.shape[1] + 4)
    router.save_pretrained(tmp_path / "experts")
    loaded = ExpertRouter.from_pretrained(tmp_path / "experts", base_model=tiny_model("llama")[0].to(device),
                                          tokenizer=tokenizer)
    assert torch.equal(loaded.route(**batch), routes)
    assert torch.equal(loaded.generate(**batch, max_new_tokens=4, do_sample=False), out)
    # The same through the CLI, with --device.
    from hf_compress.cli.main import main

    data = tmp_path / "rows.jsonl"
    data.write_text("\n".join(json.dumps(row) for row in rows), encoding="utf-8")
    tiny = ["--base", "tiny-llama", "--device", torch.device(device).type]
    assert main(["-q", "experts", "train", "--data", str(data), "--num-experts", "2", "--select", "0.5", "--steps", "2",
                 "--batch-size", "2", "--seq-len", "32", "--rank", "2", "--save-dir", str(tmp_path / "cli"),
                 *tiny]) == 0
    assert main(["-q", "experts", "route", "--experts", str(tmp_path / "cli"), "--prompt", rows[0]["prompt"],
                 "--prompt", rows[1]["prompt"], "--max-new-tokens", "3", *tiny]) == 0


def journey_token_routing_generate_save_reload(device, tmp_path) -> None:
    model, tokenizer = tiny_model("llama")
    model.to(device)
    install_routing(model, RoutingSchedule([0.3, 0.5]), mode="router")
    ids = _ids(device)
    out = model.generate(ids, max_new_tokens=4, do_sample=False)
    save_routed(model, tokenizer, tmp_path / "routed")
    reloaded = _reloaded(tmp_path / "routed", device)
    assert torch.equal(reloaded.generate(ids, max_new_tokens=4, do_sample=False), out)


# ------------------------------------------------------------------------------------------ stacking
def journey_stacked_prune_quantize_reload(device, tmp_path) -> None:
    model, tokenizer = tiny_model("qwen3")
    model.to(device)
    PRUNERS["magnitude"](model, tokenizer).prune("2:4", progress=False)
    packed = quantize_rtn(model, bits=4, group_size=32)  # the 2:4 mask kept: mask + codes of the kept weights
    packed_layers = [m for m in packed.modules() if isinstance(m, PackedLinear)]
    assert len(packed_layers) == 14 and all(m.is_sparse for m in packed_layers)  # 7 linears x 2 blocks, none dense
    save_packed(packed, tokenizer, tmp_path / "stacked")
    ids = _ids(device)
    assert torch.equal(_logits(_reloaded(tmp_path / "stacked", device), ids), _logits(packed, ids))


def journey_recipe_slim_sparse_packed(device, tmp_path) -> None:
    from test_recipe import DLQAT, TYR, WANDA, recipe

    result = run(recipe({"prune": TYR}, {"prune": WANDA}, {"quantize": DLQAT}), tmp_path / "out", device=device,
                 progress=False)
    assert all(p.device.type == torch.device(device).type for p in result.model.parameters())
    ids = _ids(device)
    assert torch.equal(_logits(_reloaded(tmp_path / "out", device), ids), _logits(result.model.eval(), ids))


def journey_artifact_build(device, tmp_path) -> None:
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import build_artifacts

    manifest = build_artifacts.build_set(tmp_path / "set", ["sds24-dlqat4"], quick=True, device=device)
    (entry,) = manifest.artifacts.values()
    assert entry.results["tokens_per_s"]["value"] > 0 and entry.files


JOURNEYS = [
    journey_prune_save_reload, journey_sds_save_reload, journey_tyr_save_reload, journey_block_removal_save_reload,
    journey_dlqat_train_merge_reload, journey_speculative_strategies, journey_cross_tokenizer_drafting,
    journey_drafting_heads, journey_spark_and_structured_cache, journey_cli, journey_permuted_prune_save_reload,
    journey_token_routing_generate_save_reload, journey_learned_permutation_save_reload,
    journey_cospec_train_and_decode, journey_experts_train_and_route, journey_stacked_prune_quantize_reload,
    journey_recipe_slim_sparse_packed, journey_artifact_build,
]


@pytest.mark.parametrize("journey", JOURNEYS, ids=[j.__name__.removeprefix("journey_") for j in JOURNEYS])
def test_journey_on_cuda(journey, tmp_path):
    journey("cuda", tmp_path)
