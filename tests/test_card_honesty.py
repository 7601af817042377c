"""Cards say what was done to the weights they describe, and nothing that was not measured on them."""

from __future__ import annotations

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
