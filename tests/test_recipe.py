"""Recipes (hf_compress.recipe): parsing, order checks before any work, end-to-end runs on tiny models that
reload with equal logits, determinism, the CLI, and a heads/generation recipe whose folder's journey works."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hf_compress.recipe import Recipe, RecipeError, run
from hf_compress.recipe.save import reloaded_copy


ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "recipes"
QUICK_EVAL = {"perplexity_windows": 2, "window": 64}
WANDA = {"method": "wanda", "sparsity": "2:4", "num_calibration_sequences": 4, "calibration_seq_len": 32}
DLQAT = {"method": "dlqat", "bits": 4, "group_size": 32, "r": 2, "training": {"max_steps": 2, "batch_size": 2, "seq_len": 32}}
HEADS = {"method": "amphista", "num_heads": 2, "training": {"max_steps": 2, "batch_size": 2, "seq_len": 32}}


def recipe(*steps: dict, **top) -> dict:
    return {"name": "tiny-recipe", "base_model": "tiny-llama", "seed": 0, "evaluation": dict(QUICK_EVAL),
            "steps": list(steps), **top}


# ------------------------------------------------------------------------------------------ parsing


@pytest.mark.parametrize("data, message", [
    (recipe({"prune": WANDA}, stepz=1), "unknown key 'stepz' (did you mean 'steps'?); valid keys: base_model, description, dtype, evaluation"),
    ({"name": "x", "steps": [{"prune": WANDA}]}, "missing 'base_model'"),
    (recipe({"prune": WANDA}, name="no spaces allowed"), "repo-style name"),
    (recipe({"distill": {"method": "kd"}}), "unknown step kind 'distill'; valid kinds: generation, heads, prune, quantize, route"),
    (recipe({"prun": WANDA}), "unknown step kind 'prun' (did you mean 'prune'?); valid kinds: generation"),
    (recipe({"prune": {"method": "wand"}}), "unknown method 'wand' (did you mean 'wanda'?); valid methods: block_pruner"),
    (recipe({"prune": WANDA, "quantize": DLQAT}), "one-key mapping"),
    (recipe({"prune": {"method": "lottery"}}), "unknown method 'lottery'; valid methods: block_pruner, block_removal, magnitude"),
    (recipe({"prune": {"sparsity": "2:4"}}), "step 1 (prune): missing 'method'"),
    (recipe({"prune": {**WANDA, "sparsty": 0.5}}), "step 1 (prune wanda): unknown key 'sparsty' (did you mean 'sparsity'?); valid keys: batch_size"),
    (recipe({"prune": {**WANDA, "sparsity": "5:4"}}), "step 1 (prune wanda): sparsity must be"),
    (recipe({"quantize": {**DLQAT, "bits": 9}}), "step 1 (quantize dlqat)"),
    (recipe({"quantize": {**DLQAT, "training": {"steps": 3}}}), "training: unknown key 'steps' (did you mean 'max_steps'?); valid keys: batch_size"),
    (recipe({"quantize": {"method": "rtn", "rank": 4}}), "unknown key 'rank'; valid keys: bits, group_size, keep_sparsity, method, skip"),
    (recipe({"generation": {"strategy": "warp"}}), "unknown strategy 'warp'; valid strategies: amphista, cospec, fly"),
    (recipe({"generation": {"strategy": "fly", "widow": 4}}), "unknown key 'widow' (did you mean 'window'?); valid keys: cache"),
    (recipe({"generation": {"cache": "paged"}}), "cache must be one of spark, structured"),
    (recipe({"generation": {"cache": {"method": "spark", "ratio": 0.5}}}), "cache: unknown key 'ratio'"),
    (recipe({"generation": {}}), "set `strategy`"),
    (recipe({"heads": {**HEADS, "num_heads": 0}}), "num_heads"),
    (recipe({"prune": WANDA}, evaluation={"windows": 4}), "evaluation: unknown key 'windows'"),
    (recipe({"prune": WANDA}, evaluation={"text": "shakespeare"}), "evaluation: text must be one of 'wikipedia', 'news'"),
    (recipe(), "steps must be a non-empty list"),
])
def test_bad_recipes_are_refused_with_the_valid_choices(data, message):
    with pytest.raises(RecipeError) as error:
        Recipe.from_dict(data)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


TEXT_CHOICES = "must be 'wikipedia', 'news' or the path of an existing UTF-8 text file"


@pytest.mark.parametrize("data, message", [
    (recipe({"prune": {**WANDA, "calibration_text": "wikipeda"}}),
     f"step 1 (prune wanda): calibration_text {TEXT_CHOICES} (relative to the working directory), got 'wikipeda'."),
    (recipe({"quantize": {**DLQAT, "training": {"text": "wikipeda"}}}),
     f"step 1 (quantize dlqat): training.text {TEXT_CHOICES}"),
    (recipe({"heads": {**HEADS, "training": {"text": "no-such-file.txt"}}}), f"step 1 (heads amphista): training.text {TEXT_CHOICES}"),
    (recipe({"quantize": {**DLQAT, "training": {"lr_scheduler_type": "cosin"}}}),
     "step 1 (quantize dlqat): training.lr_scheduler_type must be one of linear, cosine, cosine_with_restarts"),
    (recipe({"route": {"method": "token_router", "training": {"lr_scheduler_type": "reduce_lr_on_plateau"}}}),
     "step 1 (route token_router): training.lr_scheduler_type 'reduce_lr_on_plateau' needs an evaluation strategy"),
    (recipe({"prune": WANDA}, evaluation={"zero_shot_tasks": ["arc_esy"]}),
     "evaluation: zero_shot_tasks must be one of 'arc_easy', 'arc_challenge', 'piqa'"),
    (recipe({"prune": WANDA}, base_model="tiny-lama"),
     "recipe: base_model 'tiny-lama' is neither a reference model (smollm2-135m"),
])
def test_typos_that_would_fail_mid_run_are_refused_when_parsed(data, message):
    with pytest.raises(RecipeError) as error:
        Recipe.from_dict(data)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_a_calibration_text_file_and_a_plain_scheduler_are_accepted(tmp_path):
    text = tmp_path / "calibration.txt"
    text.write_text("One paragraph.\n\nAnother one.\n", encoding="utf-8")
    parsed = Recipe.from_dict(recipe({"prune": {**WANDA, "calibration_text": str(text)}},
                                     {"quantize": {**DLQAT, "training": {"text": "news", "lr_scheduler_type": "cosine"}}}))
    assert parsed.steps[0].fields["calibration_text"] == str(text)
    assert parsed.steps[1].fields["training"]["lr_scheduler_type"] == "cosine"


def test_target_modules_that_match_nothing_are_refused_before_any_work(tmp_path, monkeypatch):
    import hf_compress.recipe.measure as measure

    def no_measuring(*args, **kwargs):
        raise AssertionError("the base model was measured before the steps were checked against it")

    monkeypatch.setattr(measure, "measure", no_measuring)
    steps = ({"prune": {"method": "magnitude", "sparsity": "2:4"}},)
    for targets, message in ((["q_prj"], "target_modules 'q_prj' matches no linear layer of this llama model; the "
                                         "model's linear layers are named down_proj, gate_proj, k_proj"),
                             (["q_proj", "v_prj"], "target_modules 'v_prj' matches no linear layer"),
                             ("self_attn\\.q_prj", "matches no linear layer")):
        with pytest.raises(RecipeError, match="^step 2 \\(quantize dlqat\\): ") as error:
            run(recipe(*steps, {"quantize": {**DLQAT, "target_modules": targets}}), tmp_path / "out", progress=False)
        assert message in str(error.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("data, message", [
    (recipe({"prune": WANDA}, evaluation={"zero_shot_tasks": 3}),
     "evaluation: zero_shot_tasks must be a string or a list of strings, got 3."),
    (recipe({"prune": WANDA}, evaluation={"zero_shot_tasks": {"arc_easy": 1}}),
     "evaluation: zero_shot_tasks must be a list of task names, got the mapping {'arc_easy': 1}; for per-task example "
     "counts use zero_shot_limit: {task: count}."),
    (recipe({"quantize": {**DLQAT, "r": "eight"}}), "step 1 (quantize dlqat): r must be a positive integer, got 'eight'."),
    (recipe({"generation": {"strategy": ["fly"]}}), "step 1 (generation): strategy must be one name, one of amphista"),
    (recipe({"generation": {"cache": {"method": ["spark"]}}}), "step 1 (generation): cache must be one of spark, structured"),
])
def test_values_of_the_wrong_type_are_refused_naming_the_step_and_field(data, message):
    with pytest.raises(RecipeError) as error:
        Recipe.from_dict(data)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_per_task_zero_shot_limits_go_with_their_tasks():
    parsed = Recipe.from_dict(recipe({"prune": WANDA}, evaluation={"zero_shot_tasks": ["arc_easy"],
                                                                     "zero_shot_limit": {"arc_easy": 5}}))
    assert parsed.evaluation.settings(zero_shot=True).zero_shot_limit == {"arc_easy": 5}
    assert parsed.evaluation.settings().zero_shot_tasks == ()  # after the middle steps: no zero-shot


def test_duplicate_yaml_keys_are_refused_with_their_line(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("name: x\nbase_model: tiny-llama\nsteps:\n  - prune: {method: wanda, sparsity: '2:4'}\nseed: 3\n"
                    "steps:\n  - quantize: {method: rtn, bits: 4}\n")
    with pytest.raises(RecipeError) as error:
        Recipe.from_yaml(path)
    assert str(error.value) == (f"{path}: line 6: duplicate key 'steps' (first on line 3); YAML would silently keep "
                                "only the last one: remove or rename one of them.")
    path.write_text("name: x\nbase_model: tiny-llama\nsteps:\n  - quantize: {method: rtn, bits: 4, bits: 8}\n")
    with pytest.raises(RecipeError, match="line 4: duplicate key 'bits' \\(first on line 4\\)"):
        Recipe.from_yaml(path)
    # a key given by a YAML merge (<<) and again explicitly is no duplicate: the explicit one overrides it
    path.write_text("x-anchors: {rtn: &rtn {method: rtn, bits: 4}}\nname: x\nbase_model: tiny-llama\nsteps:\n"
                    "  - quantize: {<<: *rtn, bits: 8}\n")
    with pytest.raises(RecipeError, match="recipe: unknown key 'x-anchors'"):  # the file loaded; the recipe's check ran
        Recipe.from_yaml(path)


def test_evaluation_errors_name_the_recipe_keys():
    for evaluation, message in (({"text": "wiki"}, "evaluation: text must be one of 'wikipedia', 'news', got 'wiki'."),
                                ({"perplexity_windows": "16"}, "evaluation: perplexity_windows must be a positive "
                                                               "integer, got '16'."),
                                ({"perplexity_windows": 0}, "evaluation: perplexity_windows must be a positive")):
        with pytest.raises(RecipeError) as error:
            Recipe.from_dict(recipe({"prune": WANDA}, evaluation=evaluation))
        assert str(error.value).startswith(message)
        assert "max_windows" not in str(error.value) and "perplexity_sets" not in str(error.value)


def test_an_unquoted_n_m_sparsity_says_to_quote_it(tmp_path):
    path = tmp_path / "sexagesimal.yaml"
    path.write_text("name: x\nbase_model: tiny-llama\nsteps:\n  - prune: {method: tyr, target_sparsity: 0.3}\n"
                    "  - prune: {method: wanda, sparsity: 4:8}\n")
    with pytest.raises(RecipeError) as error:
        Recipe.from_yaml(path)
    assert str(error.value) == (f"{path}: step 2 (prune wanda): sparsity is 248, which is how YAML reads an unquoted "
                                '4:8 (a base-60 number); quote it: sparsity: "4:8".')
    with pytest.raises(RecipeError, match="sparsity must be a ratio"):  # no base-60 reading: the usual message
        Recipe.from_dict(recipe({"prune": {**WANDA, "sparsity": 120}}))  # 2:0


@pytest.mark.parametrize("name", ["abc-", "a--b", "a..b", "-abc", "abc.git"])
def test_names_the_hub_refuses_are_refused(name):
    with pytest.raises(RecipeError, match="^recipe: name must be a repo-style name the Hub accepts"):
        Recipe.from_dict(recipe({"prune": WANDA}, name=name))


def test_a_lone_skip_pattern_is_a_list_of_one():
    step = Recipe.from_dict(recipe({"quantize": {"method": "rtn", "skip": "*down_proj"}})).steps[0]
    assert step.fields["skip"] == ["*down_proj"]


@pytest.mark.parametrize("steps, message", [
    ([{"quantize": DLQAT}, {"prune": WANDA}],
     "step 2 (prune wanda) cannot follow step 1 (quantize dlqat): quantize (DL-QAT/RTN) before pruning"),
    ([{"quantize": DLQAT}, {"quantize": {"method": "rtn"}}], "two quantize steps"),
    ([{"prune": WANDA}, {"prune": {"method": "magnitude", "sparsity": 0.5}}], "two mask-pruning steps"),
    ([{"prune": WANDA}, {"prune": {"method": "block_removal", "target_sparsity": 0.3}}], "put the structural step first"),
    ([{"heads": HEADS}, {"quantize": DLQAT}], "drafting heads are trained on the final weights"),
    ([{"generation": {"strategy": "fly"}}, {"prune": WANDA}], "`generation` must be the last step"),
    ([{"prune": WANDA}, {"route": {"method": "token_router"}}], "`route` cannot stack with mask pruning today"),
    ([{"prune": {"method": "tyr", "target_sparsity": 0.3}}, {"route": {"method": "token_router"}}],
     "`route` cannot stack with structural pruning that changes widths"),
    ([{"route": {"method": "token_router"}}, {"quantize": DLQAT}], "`route` cannot stack with `quantize` today"),
    ([{"route": {"method": "token_router"}}, {"prune": {"method": "block_removal", "target_sparsity": 0.3}}],
     "whole-block removal after it (block_removal, sleb) would leave entries for blocks that are gone; move the prune"),
    ([{"route": {"method": "token_router"}}, {"prune": {"method": "tyr", "target_sparsity": 0.3}}],
     "`route` cannot stack with structural pruning that changes widths"),
    ([{"route": {"method": "token_router"}}, {"generation": {"cache": "spark"}}], "a compressed cache after `route`"),
    ([{"generation": {"strategy": "amphista"}}],
     "step 1 (generation amphista): strategy amphista drafts with trained heads: add a `heads` step"),
    ([{"heads": HEADS}, {"generation": {"strategy": "fly"}}], "strategy fly does not use"),
    ([{"prune": {"method": "tyr", "target_sparsity": 0.3}}, {"prune": WANDA}],
     "step 2 (prune wanda) (2:4) after step 1 (prune tyr): its FFN widths must be multiples of 4, and channel_multiple "
     "is 1; set channel_multiple: 4 (or a multiple of 4) on step 1."),
    ([{"prune": {"method": "tyr", "target_sparsity": 0.3, "channel_multiple": 2}}, {"prune": WANDA}],
     "set channel_multiple: 4"),
])
def test_impossible_orders_are_refused(steps, message):
    with pytest.raises(RecipeError, match="^steps: ") as error:
        Recipe.from_dict(recipe(*steps))
    assert message in str(error.value)


TYR = {"method": "tyr", "target_sparsity": 0.3, "channel_multiple": 4, "num_iterations": 1, "generations": 1,
       "offspring": 2, "min_ffn_step": 4, "selection_tokens": [32], "selection_survivors": [],
       "num_calibration_sequences": 2, "calibration_seq_len": 32, "num_search_sequences": 2, "kl_topk": 16}


def test_tyr_then_wanda_2_4_then_rtn_reloads_slim_sparse_and_packed(tmp_path):
    from transformers import AutoModelForCausalLM

    from hf_compress.formats.slim import slim_record
    from hf_compress.pruning.masks import check_pattern
    from hf_compress.quantization import PackedLinear

    result = run(recipe({"prune": TYR}, {"prune": WANDA}, {"quantize": {"method": "rtn", "bits": 4, "group_size": 32}}),
                 tmp_path / "out", progress=False)
    widths = slim_record(result.model)["layers"]  # the packed layers' widths, as the checkpoint records them
    assert all(w["intermediate_size"] % 4 == 0 for w in widths) and any(w["intermediate_size"] < 128 for w in widths)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert slim_record(reloaded)["layers"] == widths
    packed = [m for m in reloaded.modules() if isinstance(m, PackedLinear)]
    assert packed and all(m.is_sparse and check_pattern(m.dequantized_weight(), "2:4") for m in packed)
    ids = torch.tensor([[5, 17, 42, 99, 3, 64, 128, 7]])
    # The reload check of a model on a GPU runs the copy one module at a time (accelerate's cpu_offload): same logits.
    offloaded = reloaded_copy(tmp_path / "out", "cpu", one_module_at_a_time=True)
    with torch.no_grad():
        expected = result.model.eval()(ids).logits
        assert torch.equal(reloaded(ids).logits, expected) and torch.equal(offloaded(ids).logits, expected)


def test_structural_then_n_m_is_accepted_when_the_widths_allow_it():
    for structural in ({"method": "tyr", "target_sparsity": 0.3, "channel_multiple": 8},
                       {"method": "block_removal", "target_sparsity": 0.3}):
        for mask in (WANDA, {"method": "magnitude", "sparsity": 0.5}):
            parsed = Recipe.from_dict(recipe({"prune": structural}, {"prune": mask}))
            assert [step.method for step in parsed.steps] == [structural["method"], mask["method"]]


def test_order_errors_come_before_any_work(tmp_path, monkeypatch):
    import hf_compress.assets

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the recipe was checked")

    monkeypatch.setattr(hf_compress.assets, "load_model", no_loading)
    out = tmp_path / "out"
    with pytest.raises(RecipeError, match="put `prune` first"):
        run(recipe({"quantize": DLQAT}, {"prune": WANDA}), out)
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite"):
        run(recipe({"prune": WANDA}), taken)
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["taken"]  # nothing written, not even staging


def test_recipes_round_trip_and_examples_parse(tmp_path):
    parsed = Recipe.from_dict(recipe({"prune": {**WANDA, "permutation": "ria"}}, {"quantize": DLQAT},
                                     {"heads": HEADS}, {"generation": {"strategy": "amphista", "tree": "chain",
                                                                       "cache": {"method": "spark", "channel_ratio": 0.5}}}))
    assert parsed.steps[0].fields["calibration_seed"] == 0 and parsed.steps[1].fields["target_modules"] == "all-linear"
    path = parsed.save_yaml(tmp_path / "recipe.yaml")
    assert Recipe.from_yaml(path) == parsed
    for example in sorted(EXAMPLES.glob("*.yaml")):
        assert Recipe.from_yaml(example).steps, example
    (tmp_path / "broken.yaml").write_text("name: [unclosed\n")
    with pytest.raises(RecipeError, match="broken.yaml: not valid YAML"):
        Recipe.from_yaml(tmp_path / "broken.yaml")


# ------------------------------------------------------------------------------------------ running


@pytest.fixture(scope="module")
def prune_then_quantize(tmp_path_factory):
    """Wanda 2:4 → DL-QAT 4-bit on a tiny Llama, run twice with the same seed into two folders."""
    folder = tmp_path_factory.mktemp("recipe")
    data = recipe({"prune": WANDA}, {"quantize": DLQAT}, name="tiny-wanda24-dlqat4",
                  description="Wanda 2:4 then 4-bit DL-QAT with the mask kept.")
    first = run(copy.deepcopy(data), folder / "first", progress=False)
    second = run(copy.deepcopy(data), folder / "second", progress=False)
    return first, second


def test_prune_then_quantize_saves_a_folder_that_reloads_with_equal_logits(prune_then_quantize):
    from transformers import AutoModelForCausalLM

    from hf_compress.hub import read_metrics, read_recipe, validate_model_card
    from hf_compress.hub.push import plan_push
    from hf_compress.quantization import PackedLinear

    result, _ = prune_then_quantize
    folder = result.save_dir
    assert {"config.json", "model.safetensors", "recipe.yaml", "recipe_results.json", "README.md"} <= {
        p.name for p in folder.iterdir()}
    assert {"recipe.yaml", "recipe_results.json", "README.md"} <= set(plan_push(folder).files)  # all uploaded
    reloaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert any(isinstance(m, PackedLinear) for m in reloaded.modules())
    ids = torch.tensor([[5, 17, 42, 99, 3, 64, 128, 7]])
    # The reload check of a model on a GPU runs the copy one module at a time (accelerate's cpu_offload): same logits.
    offloaded = reloaded_copy(folder, "cpu", one_module_at_a_time=True)
    with torch.no_grad():
        expected = result.model.eval()(ids).logits
        assert torch.equal(reloaded(ids).logits, expected) and torch.equal(offloaded(ids).logits, expected)
    # DL-QAT kept Wanda's 2:4 mask: every dequantized decoder weight has at most 2 non-zeros per 4 inputs
    dense = reloaded.dequantize()
    for block in dense.model.layers:
        for layer in (block.self_attn.q_proj, block.self_attn.o_proj, block.mlp.up_proj, block.mlp.down_proj):
            groups = layer.weight.reshape(layer.weight.shape[0], -1, 4)
            assert int((groups != 0).sum(-1).max()) <= 2
    # every step measured, the numbers move the way the methods say, the card reports the final measurement
    names = [r.name for r in result.records]
    assert names == ["base model", "prune wanda", "quantize dlqat"]
    base, pruned, packed = (r.metrics for r in result.records)
    assert pruned["decoder_linear_bytes"] < 0.6 * base["decoder_linear_bytes"]  # 2:4: half the values + a bitmask
    assert packed["decoder_linear_bytes"] < pruned["decoder_linear_bytes"]
    assert result.final_metrics["model_disk_bytes"] < base["stored_bytes"]
    assert result.steps[1].details["training_steps"] == 2
    validate_model_card(folder)
    [perplexity] = read_metrics(folder)
    assert perplexity.metric_value == pytest.approx(result.final_metrics["perplexity"], rel=1e-4)
    assert [s["method"] for s in read_recipe(folder)["stages"]] == ["wanda", "dlqat"]
    card = (folder / "README.md").read_text()
    assert "| 1 | prune wanda |" in card and "| 2 | quantize dlqat |" in card and "| 0 | base model |" in card
    assert "Wanda 2:4 then 4-bit DL-QAT with the mask kept." in card and "<!--" not in card
    assert Recipe.from_yaml(folder / "recipe.yaml") == result.recipe
    saved = json.loads((folder / "recipe_results.json").read_text())
    assert [r["metrics"]["perplexity"] for r in saved["records"]] == [r.metrics["perplexity"] for r in result.records]


def test_same_recipe_and_seed_give_the_same_weights(prune_then_quantize):
    first, second = prune_then_quantize
    a, b = (load_file(r.save_dir / "model.safetensors") for r in prune_then_quantize)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r.metrics["perplexity"] for r in first.records] == [r.metrics["perplexity"] for r in second.records]


def test_a_different_seed_gives_different_weights(tmp_path, prune_then_quantize):
    first, _ = prune_then_quantize
    data = recipe({"prune": WANDA}, {"quantize": DLQAT}, seed=1)
    other = run(data, tmp_path / "seed1", progress=False)
    a, b = load_file(first.save_dir / "model.safetensors"), load_file(other.save_dir / "model.safetensors")
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_cli_run_on_a_rank_other_than_zero_runs_and_writes_nothing(tmp_path, capsys, monkeypatch):
    # Under torchrun every rank runs the recipe and rank 0 writes; the others ended in a KeyError (exit 2), which
    # made the launcher stop rank 0 too.
    from hf_compress.cli.main import main

    path = tmp_path / "recipe.yaml"
    Recipe.from_dict(recipe({"prune": {"method": "magnitude", "sparsity": "2:4"}})).save_yaml(path)
    monkeypatch.setenv("RANK", "1")
    assert main(["recipe", "run", str(path), "--save-dir", str(tmp_path / "out"), "--device", "cpu", "-q"]) == 0
    out = capsys.readouterr().out
    assert "1. prune magnitude: perplexity" in out and "saved to" not in out
    assert not (tmp_path / "out").exists()


def test_cli_check_and_run(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from hf_compress.cli.main import main

    path = tmp_path / "recipe.yaml"
    Recipe.from_dict(recipe({"prune": {"method": "magnitude", "sparsity": "2:4"}},
                            {"quantize": {"method": "rtn", "bits": 4, "group_size": 32}})).save_yaml(path)
    assert main(["recipe", "check", str(path)]) == 0
    assert "1. prune magnitude" in capsys.readouterr().out
    assert main(["recipe", "run", str(path), "--save-dir", str(tmp_path / "out"), "--device", "cpu", "-q"]) == 0
    out = capsys.readouterr().out
    assert "2. quantize rtn: perplexity" in out and "saved to" in out
    AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    # RTN kept the 2:4 mask: one stacked checkpoint (mask + the codes of the kept weights).
    config = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "hf_compress_packed" and len(config["sparse_modules"]) == 14
    capsys.readouterr()
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nbase_model: tiny-llama\nsteps:\n  - quantize: {method: rtn}\n  - prune: {method: magnitude}\n")
    assert main(["recipe", "check", str(bad)]) == 2
    error = capsys.readouterr().err
    assert error.startswith("hf-compress: error: ") and "put `prune` first" in error and error.count("\n") == 1
    assert main(["recipe", "run", str(bad), "--save-dir", str(tmp_path / "never")]) == 2
    assert not (tmp_path / "never").exists()
    capsys.readouterr()
    assert main(["recipe", "run", str(path), "--save-dir", str(tmp_path / "never"), "--repo-id", "tiny-recipe"]) == 2
    assert "error: --repo-id must be the Hub repo the folder will be pushed to" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


def test_heads_and_generation_recipe_folder_runs_its_journey(tmp_path, monkeypatch, capfd):
    from transformers import AutoModelForCausalLM

    from hf_compress.cache import SparKCache, cache_kwargs

    data = recipe({"prune": {"method": "magnitude", "sparsity": "2:4"}}, {"heads": HEADS},
                  {"generation": {"strategy": "amphista", "tree": "chain", "cache": {"method": "spark",
                                                                                     "channel_ratio": 0.5}}})
    capfd.readouterr()
    result = run(data, tmp_path / "out", progress=False)
    drawn = capfd.readouterr().err
    # progress=False (the CLI's -q) also silences the heads step: its feature caching and its heads' save
    assert "caching base features" not in drawn and "Writing model shards" not in drawn, drawn
    folder = result.save_dir
    assert (folder / "heads" / "custom_generate" / "generate.py").is_file()
    assert result.steps[1].metrics["heads_bytes"] > 0
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = torch.tensor([[5, 17, 42, 99, 3, 64, 128, 7]])
    greedy = model.generate(ids, max_new_tokens=10, do_sample=False)
    drafted = model.generate(ids, max_new_tokens=10, do_sample=False, custom_generate=str(folder / "heads"),
                             trust_remote_code=True, return_dict_in_generate=True)
    assert torch.equal(drafted.sequences, greedy)  # strict verification: the heads only change the speed
    assert drafted.metrics.new_tokens == 10 and drafted.metrics.draft_tokens_proposed > 0  # the heads did draft
    card = (folder / "README.md").read_text()
    assert 'custom_generate=f"{folder}/heads"' in card and "SparKCache(model.config, channel_ratio=0.5)" in card
    cached = model.generate(ids, max_new_tokens=10, do_sample=False,
                            **cache_kwargs(model, SparKCache(model.config, channel_ratio=0.5)))
    assert cached.shape == greedy.shape
    from hf_compress.hub.push import plan_push

    plan = plan_push(folder)  # a push carries the heads' generate code and card, which the card's snippet loads
    assert {"heads/custom_generate/generate.py", "heads/README.md"} <= set(plan.files)
    assert not [path for path in plan.skipped if path.startswith("heads/")], plan.skipped
    # The heads' own card describes them where they are: beside the compressed model at the root, which its code
    # loads (not the original base) with the heads' sub-folder as custom_generate (a bare "heads" cannot work).
    heads_card = (folder / "heads" / "README.md").read_text()
    assert "not in this repo" not in heads_card and "the model at the root of this repo" in heads_card
    snippet = _card_snippet(folder / "heads", "## How to use")
    assert 'folder = "out/"' in snippet and "from_pretrained(folder)" in snippet
    assert 'custom_generate=f"{folder}/heads"' in snippet and 'custom_generate="heads"' not in snippet
    monkeypatch.chdir(tmp_path)  # from the folder's parent, as the snippet says
    scope: dict = {}
    exec(snippet, scope)
    assert scope["out"].shape[1] > scope["inputs"]["input_ids"].shape[1]


@pytest.mark.parametrize("base", ["HuggingFaceTB/SmolLM2-135M", None])
def test_a_recipe_that_leaves_the_weights_unchanged_does_not_call_them_compressed(base):
    """A recipe of heads and a decoding strategy only keeps the base model's weights: its card said "compressed"."""
    from hf_compress.recipe.card import FolderLayout, recipe_card

    def opening(*steps):
        card = recipe_card(Recipe.from_dict(recipe(*steps)), [], [], FolderLayout(), base)
        return card.text.split("# tiny-recipe", 1)[1].split("\n\n")[1]

    for steps in ([{"generation": {"strategy": "fly"}}], [{"heads": HEADS}, {"generation": {"strategy": "amphista"}}]):
        text = opening(*steps)
        assert "weights unchanged" in text and "compressed" not in text, text
    text = opening({"prune": WANDA}, {"generation": {"strategy": "fly"}})
    assert "compressed" in text and "unchanged" not in text, text


def test_the_heads_card_of_a_recipe_for_a_hub_repo_loads_the_root_model(tmp_path):
    from hf_compress.assets import tiny_model
    from hf_compress.hub import read_recipe
    from hf_compress.hub.model_card import load_card
    from hf_compress.hub.push import check_cards_name_repo, plan_push
    from hf_compress.recipe.card import FolderLayout, load_snippet
    from hf_compress.recipe.save import _save_generation
    from hf_compress.recipe.steps import RecipeState
    from hf_compress.speculative.heads import AmphistaConfig, AmphistaHeads

    model, tokenizer = tiny_model("llama")
    heads = AmphistaHeads.for_model(model, AmphistaConfig(num_heads=2, num_attention_heads=2))
    state = RecipeState(model=model, tokenizer=tokenizer, device=model.device, seed=0, heads=heads)
    folder = tmp_path / "staging"
    folder.mkdir()
    layout = _save_generation(state, folder, "HuggingFaceTB/SmolLM2-135M", repo_id="me/tiny-heads", folder_name="out")
    snippet = _card_snippet(folder / "heads", "## How to use")
    # the root card's code for the heads (no cache lines: they are the root card's), from the root repo
    assert snippet.strip() == load_snippet(FolderLayout(heads_folder=layout.heads_folder), "me/tiny-heads", "out")
    assert 'snapshot_download("me/tiny-heads")' in snippet and 'custom_generate=f"{folder}/heads"' in snippet
    card = load_card(folder / "heads")
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M" and read_recipe(card)["method"] == "amphista"
    assert card.data.compression["repo_id"] == "me/tiny-heads"  # built for the root repo, which push_to_hub checks
    check_cards_name_repo(plan_push(folder), "me/tiny-heads")
    with pytest.raises(ValueError, match=r"heads/README.md was built for the Hub repo me/tiny-heads.*--repo-id me/other"):
        check_cards_name_repo(plan_push(folder), "me/other")


def test_strategy_recipe_saves_custom_generate_next_to_the_model(tmp_path):
    from transformers import AutoModelForCausalLM

    result = run(Recipe.from_yaml(EXAMPLES / "tiny-llama-magnitude24-dlqat4-fly.yaml"), tmp_path / "fly", progress=False)
    folder = result.save_dir
    assert (folder / "custom_generate" / "generate.py").is_file()
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = torch.tensor([[5, 17, 42, 5, 17, 42, 5, 17]])
    greedy = model.generate(ids, max_new_tokens=12, do_sample=False)
    out = model.generate(ids, max_new_tokens=12, do_sample=False, custom_generate=str(folder), trust_remote_code=True,
                         return_dict_in_generate=True)
    assert torch.equal(out.sequences, greedy)  # FLy with loose=false is strict verification
    assert out.metrics.draft_tokens_accepted > 0  # the folder's strategy ran (the repeating prompt drafts well)
    card = (folder / "README.md").read_text()
    assert 'folder = "fly/"' in card and "custom_generate=folder," in card  # what the card's snippet loads
    # Loaded with trust_remote_code, transformers makes the folder's function the model's own generate
    # (partial(generate, model=model)): positional and keyword inputs both work and it does not recurse.
    own = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    assert torch.equal(own.generate(ids, max_new_tokens=12, do_sample=False), greedy)
    assert own.generate(ids, max_new_tokens=12, do_sample=False, return_dict_in_generate=True).metrics.new_tokens == 12
    assert torch.equal(own.generate(input_ids=ids, max_new_tokens=12, do_sample=False), greedy)


def _card_snippet(folder: Path, section: str = "## How to load") -> str:
    card = (folder / "README.md").read_text()
    return card.split(section, 1)[1].split("```python\n", 1)[1].split("```", 1)[0]


def test_the_cards_loading_snippet_loads_the_folder_it_names(tmp_path, monkeypatch, fake_hub):
    from hf_compress.hub import push_to_hub

    data = recipe({"prune": {"method": "magnitude", "sparsity": "2:4"}})
    monkeypatch.chdir(tmp_path)
    run(copy.deepcopy(data), "local", progress=False)
    snippet = _card_snippet(tmp_path / "local")
    assert 'folder = "local/"' in snippet and '"tiny-recipe"' not in snippet  # the recipe's name is no repo id
    exec(snippet, {})  # from the folder's parent, as the snippet says

    run(copy.deepcopy(data), "hub", progress=False, repo_id="me/tiny-recipe")
    snippet = _card_snippet(tmp_path / "hub")
    assert 'from_pretrained("me/tiny-recipe")' in snippet
    push_to_hub(tmp_path / "hub", "me/tiny-recipe")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    exec(snippet, {})  # from the Hub this time
    with pytest.raises(ValueError, match="repo_id must be the Hub repo the folder will be pushed to, as owner/name"):
        run(copy.deepcopy(data), "never", repo_id="tiny-recipe")
    assert not (elsewhere / "never").exists()


def test_a_folder_built_for_one_repo_is_not_pushed_to_another(tmp_path, monkeypatch, fake_hub):
    # Built with --repo-id me/a, the card's code loads me/a: pushed to me/b, it would load another repo.
    from hf_compress.hub import push_to_hub

    monkeypatch.chdir(tmp_path)
    run(recipe({"prune": {"method": "magnitude", "sparsity": "2:4"}}), "a", progress=False, repo_id="me/a")
    for target in ("me/b", "b"):  # a bare name goes to the token owner's namespace: its name is already another
        with pytest.raises(ValueError, match=r"Cannot push .* to (me/)?b: its model card README.md was built for "
                                             r"the Hub repo me/a.*--repo-id (me/)?b.*or push it to me/a"):
            push_to_hub("a", target)
    assert not fake_hub.repos and not fake_hub.requests  # refused before the repo was created
    push_to_hub("a", "me/a")
    assert b'from_pretrained("me/a")' in fake_hub.files("me/a")["README.md"]


def test_local_paths_are_named_in_a_warning_before_any_work(tmp_path, monkeypatch, caplog):
    # A local base_model or calibration text ran to completion and only then did push_to_hub refuse the folder
    # (recipe.yaml, the card and recipe_results.json hold the paths): the run says so before it starts.
    import logging

    import hf_compress.assets
    from hf_compress.assets import tiny_model
    from hf_compress.hub.push import plan_push

    class Stop(Exception):
        pass

    def stop(*args, **kwargs):
        raise Stop

    tiny_model("llama", save_dir=tmp_path / "base")
    text = tmp_path / "text.txt"
    text.write_text("Some calibration words. " * 300)
    base = str(tmp_path / "base")
    monkeypatch.setattr(hf_compress.assets, "load_model", stop)
    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.WARNING, logger="hf_compress"):
        with pytest.raises(Stop):  # warned before the model loads
            run(recipe({"prune": {**WANDA, "calibration_text": str(text)}}, {"heads": HEADS}, base_model=base),
                "out", progress=False)
        warned = caplog.text
        assert (f"base_model '{base}', step 1 (prune wanda) calibration_text '{text}'" in warned
                and "step 2 (heads amphista)" not in warned)  # the heads' text is an offline set
        assert "push_to_hub will refuse to push it" in warned and f"{base}, {text}" in warned
        assert "name the base model by its Hub id" in warned and "offline calibration text set (wikipedia, news)" in warned
        caplog.clear()
        # Relative paths push (nothing absolute is recorded), but recipe.yaml names files of this machine.
        with pytest.raises(Stop):
            run(recipe({"heads": {**HEADS, "training": {**HEADS["training"], "text": "text.txt"}}}, base_model="base"),
                "out", progress=False)
        warned = caplog.text
        assert "base_model 'base', step 1 (heads amphista) training.text 'text.txt'" in warned
        assert "rebuilds it only on this machine" in warned and "push_to_hub will refuse" not in warned
        caplog.clear()
        with pytest.raises(Stop):  # a generation step's draft model given as a folder
            run(recipe({"prune": WANDA}, {"generation": {"strategy": "speculative_decoding", "draft_model": base}}),
                "out", progress=False)
        assert (f"step 2 (generation speculative_decoding) draft_model '{base}'" in caplog.text
                and "name the strategy's models by their Hub ids" in caplog.text)
        caplog.clear()
        with pytest.raises(Stop):  # reference / tiny models, Hub ids and the offline text sets: nothing to say
            run(recipe({"prune": WANDA}), "out", progress=False)
        with pytest.raises(Stop):
            run(recipe({"prune": WANDA}, base_model="someorg/tiny-base"), "out", progress=False)
        assert "this machine" not in caplog.text
    # What the warning says: with the absolute path, the folder the run saves cannot be pushed.
    monkeypatch.undo()
    run(recipe({"prune": {"method": "magnitude", "sparsity": "2:4"}}, base_model=base), tmp_path / "out", progress=False)
    with pytest.raises(ValueError, match="would publish absolute paths of this machine: README.md holds"):
        plan_push(tmp_path / "out")


def test_a_model_that_is_not_the_recipes_base_is_refused_before_any_work(tmp_path, monkeypatch):
    import hf_compress.recipe.measure as measure
    from hf_compress.assets import tiny_model
    from hf_compress.recipe.runner import check_is_base_model

    def no_measuring(*args, **kwargs):
        raise AssertionError("the model was measured before it was checked to be the recipe's base")

    monkeypatch.setattr(measure, "measure", no_measuring)
    data = recipe({"prune": {"method": "magnitude", "sparsity": "2:4"}})
    base, tokenizer = tiny_model("llama")
    for model, message in (
        (tiny_model("gpt2")[0], "run(model=...): the recipe's base_model is 'tiny-llama' (model_type 'llama') but the "
                                "model passed has model_type 'gpt2', so recipe.yaml and the card would describe another "
                                "model"),
        (tiny_model("llama", num_hidden_layers=3)[0], "(num_hidden_layers 2) but the model passed has num_hidden_layers 3"),
    ):
        with pytest.raises(RecipeError) as error:
            run(copy.deepcopy(data), tmp_path / "out", model=model, tokenizer=tokenizer, progress=False)
        assert message in str(error.value)
    assert not (tmp_path / "out").exists()
    check_is_base_model(base, "tiny-llama")  # the base as load_model gives it passes; so does a folder's
    check_is_base_model(copy.deepcopy(base).to(torch.bfloat16), "tiny-llama")  # in bf16 too, with a warning
    folder_model, _ = tiny_model("qwen3", save_dir=tmp_path / "base")
    check_is_base_model(folder_model, str(tmp_path / "base"))
    with pytest.raises(RecipeError, match="model_type 'qwen3'"):
        check_is_base_model(base, str(tmp_path / "base"))
    # Same sizes, other weights (pruned or edited in memory): recipe.yaml would not rebuild it, the card would lie.
    pruned = copy.deepcopy(base)
    with torch.no_grad():
        pruned.model.layers[1].mlp.down_proj.weight[:, ::2] = 0
    with pytest.raises(RecipeError, match=r"holds other values in model\.layers\.1\.mlp\.down_proj\.weight"):
        check_is_base_model(pruned, "tiny-llama")
    edited = copy.deepcopy(folder_model)
    with torch.no_grad():
        edited.model.layers[0].self_attn.q_proj.weight.mul_(1.5)
    with pytest.raises(RecipeError, match=r"holds other values in model\.layers\.0\.self_attn\.q_proj\.weight"):
        check_is_base_model(edited, str(tmp_path / "base"))


@pytest.mark.parametrize("steps, message", [
    ([{"prune": WANDA}, {"quantize": {**DLQAT, "training": {"max_steps": 2, "seq_len": 600}}}],
     "step 2 (quantize dlqat): training.seq_len is 600 tokens, but this model has learned positions for 512 only; "
     "use training.seq_len <= 512."),
    ([{"prune": WANDA}, {"heads": {**HEADS, "training": {"max_steps": 2, "seq_len": 600}}}],
     "step 2 (heads amphista): training.seq_len is 600 tokens"),
    ([{"route": {"method": "token_router", "search_seq_len": 600}}], "step 1 (route token_router): search_seq_len is 600"),
    ([{"prune": {**WANDA, "calibration_seq_len": 600}}], "step 1 (prune wanda): calibration_seq_len is 600 tokens"),
])
def test_windows_longer_than_learned_positions_are_refused_before_any_work(tmp_path, monkeypatch, steps, message):
    # GPT-2's position table has 512 rows: a step's longer windows ended in "IndexError: index out of range in
    # self" from inside the model, after the earlier steps had run.
    import hf_compress.recipe.measure as measure

    monkeypatch.setattr(measure, "measure", lambda *a, **k: pytest.fail("measured before the lengths were checked"))
    with pytest.raises(RecipeError) as error:
        run(recipe(*steps, base_model="tiny-gpt2"), tmp_path / "out", progress=False)
    assert message in str(error.value)
    assert not (tmp_path / "out").exists()


def test_saving_over_the_base_models_own_folder_is_refused_before_loading(tmp_path, monkeypatch, capsys):
    # With --overwrite the run replaced the folder recipe.yaml names as its base: the card's "rerunning recipe.yaml
    # rebuilds these weights" became false, and a rerun would compress the compressed model.
    import hf_compress.assets
    from hf_compress.assets import tiny_model
    from hf_compress.cli.main import main

    tiny_model("llama", save_dir=tmp_path / "base")
    monkeypatch.setattr(hf_compress.assets, "load_model", lambda *a, **k: pytest.fail("loaded before the check"))
    data = recipe({"prune": {"method": "magnitude", "sparsity": "2:4"}}, base_model=str(tmp_path / "base"))
    with pytest.raises(RecipeError, match="is the recipe's base_model folder"):
        run(data, tmp_path / "base", overwrite=True, progress=False)
    path = tmp_path / "recipe.yaml"
    Recipe.from_dict(data).save_yaml(path)
    monkeypatch.chdir(tmp_path)
    assert main(["recipe", "run", str(path), "--save-dir", "./base/", "--overwrite"]) == 2
    assert "error: --save-dir ./base/ is the recipe's base_model folder" in capsys.readouterr().err
    assert not (tmp_path / "base" / "recipe.yaml").exists()


def test_a_model_from_another_hub_repo_is_refused_even_with_the_same_config(tmp_path, monkeypatch):
    # SmolLM2-135M and SmolLM2-135M-Instruct share a config: the card named the passed model's repo as base_model
    # while recipe.yaml (and the card's compression.recipe) named the recipe's, which a rerun rebuilds from.
    import hf_compress.recipe.runner as runner
    from hf_compress.assets import tiny_model
    from hf_compress.assets.tiny_models import tiny_config

    monkeypatch.setattr(runner, "_base_config", lambda base_model, where: tiny_config("llama"))  # as the Hub's
    model, tokenizer = tiny_model("llama")
    model.config.name_or_path = "someorg/tiny-instruct"  # what from_pretrained("someorg/tiny-instruct") records
    data = recipe({"prune": {"method": "magnitude", "sparsity": "2:4"}}, base_model="someorg/tiny-base")
    with pytest.raises(RecipeError) as error:
        run(data, tmp_path / "out", model=model, tokenizer=tokenizer, progress=False)
    assert ("the recipe's base_model is 'someorg/tiny-base' but the model passed was loaded from "
            "someorg/tiny-instruct, so the card would name someorg/tiny-instruct") in str(error.value)
    assert not (tmp_path / "out").exists()


def test_a_base_model_saved_by_hf_compress_keeps_its_format_and_the_order_rules(tmp_path, monkeypatch):
    """A folder an earlier recipe saved (sparse, packed) as base_model: the steps that cannot follow what it already
    is are refused before any work, and the final folder keeps its format, so the card's bytes are the disk's."""
    from safetensors import safe_open

    import hf_compress.recipe.measure as measure
    from hf_compress.assets import tiny_model
    from hf_compress.hub import load_card, read_recipe

    magnitude = {"prune": {"method": "magnitude", "sparsity": "2:4"}}
    rtn = {"quantize": {"method": "rtn", "bits": 4, "group_size": 32}}
    model, tokenizer = tiny_model("llama")
    model.config.name_or_path = "org/tiny-llama"  # as if loaded from the Hub
    sparse = run(recipe(magnitude), tmp_path / "sparse", model=model, tokenizer=tokenizer, progress=False).save_dir
    packed = run(recipe(rtn), tmp_path / "packed", progress=False).save_dir

    # a pruned base with a step that leaves the weights alone: saved sparse again, as its measured bytes say (it
    # was saved dense, 1.5x the bytes the card stated)
    result = run(recipe({"generation": {"strategy": "fly"}}, base_model=str(sparse)), tmp_path / "fly", progress=False)
    assert json.loads((result.save_dir / "config.json").read_text())["quantization_config"]["quant_method"] == (
        "hf_compress_sparse")
    with safe_open(str(result.save_dir / "model.safetensors"), framework="pt") as handle:
        on_disk = sum(handle.get_tensor(key).numel() * handle.get_tensor(key).element_size() for key in handle.keys())
    assert result.final_metrics["stored_bytes"] == on_disk
    card = load_card(result.save_dir)  # names the original Hub model, and says the base was already pruned
    assert card.data.base_model == "org/tiny-llama"
    assert read_recipe(card)["base_model_already"] == ["mask-pruned (decoder weights with many zeros, stored sparse)"]
    assert "The recipe's base model was already mask-pruned" in card.text
    # a packed base measures against the float layers it stands for (it divided by zero after loading)
    result = run(recipe({"generation": {"strategy": "fly"}}, base_model=str(packed)), tmp_path / "packed-fly",
                 progress=False)
    assert 0 < result.base.metrics["decoder_linear_vs_base_fp32"] < 0.2

    def no_measuring(*args, **kwargs):
        raise AssertionError("the base model was measured before the steps were checked against it")

    monkeypatch.setattr(measure, "measure", no_measuring)
    for base, step, message in (
        (packed, rtn, "step 1 (quantize rtn) cannot follow the base model, which is already quantized (packed low-bit "
                      "layers), as if by an earlier step: two quantize steps"),
        (packed, magnitude, "which is already quantized (packed low-bit layers), as if by an earlier step: quantize "
                            "(DL-QAT/RTN) before pruning"),
        (sparse, {"prune": {"method": "magnitude", "sparsity": 0.5}}, "which is already mask-pruned"),
    ):
        with pytest.raises(RecipeError) as error:
            run(recipe(step, base_model=str(base)), tmp_path / "never", progress=False)
        assert str(error.value).startswith(f"recipe: base_model {str(base)!r}: steps: ") and message in str(error.value)
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize("step, saved_as", [
    ({"route": {"method": "token_router", "token_sparsity": 0.25, "static": True, "generations": 1, "population": 2,
                "search_windows": 1, "search_seq_len": 32}}, "hf_compress_routed"),
    ({"prune": {"method": "block_removal", "target_sparsity": 0.3, "num_calibration_sequences": 4,
                "calibration_seq_len": 32}}, None),  # whole blocks go: a plain checkpoint with fewer layers
])
def test_route_and_structural_steps_save_in_their_formats(tmp_path, step, saved_as):
    from transformers import AutoModelForCausalLM

    evaluation = {**QUICK_EVAL, "score_last": 16} if saved_as else QUICK_EVAL  # routing: judged on the tail
    result = run(recipe(step, evaluation=evaluation), tmp_path / "out", progress=False)
    if saved_as:
        assert "Perplexity (last 16 tokens of each window)" in (result.save_dir / "README.md").read_text()
    config = json.loads((result.save_dir / "config.json").read_text())
    if saved_as:
        assert config["quantization_config"]["quant_method"] == saved_as
    else:
        assert "quantization_config" not in config and config["num_hidden_layers"] == 1
    reloaded = AutoModelForCausalLM.from_pretrained(result.save_dir).eval()
    offloaded = reloaded_copy(result.save_dir, "cpu", one_module_at_a_time=True)  # as the reload check runs off the CPU
    ids = torch.tensor([[5, 17, 42, 99, 3, 64, 128, 7]])
    with torch.no_grad():
        expected = result.model.eval()(ids).logits
        torch.testing.assert_close(reloaded(ids).logits, expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(offloaded(ids).logits, expected, rtol=0, atol=1e-6)
    assert result.final_metrics["perplexity"] != result.base.metrics["perplexity"]


def test_stated_bytes_are_the_bytes_the_checkpoint_stores(tmp_path):
    """Pruned layers the quantizer skips are saved dense by the packed format: the card must count them so."""
    from safetensors import safe_open

    steps = ({"prune": {"method": "magnitude", "sparsity": "2:4"}},
             {"quantize": {"method": "rtn", "bits": 4, "group_size": 32, "skip": ["*mlp*"]}})
    result = run(recipe(*steps), tmp_path / "out", progress=False)
    with safe_open(str(result.save_dir / "model.safetensors"), framework="pt") as handle:
        on_disk = sum(handle.get_tensor(key).numel() * handle.get_tensor(key).element_size() for key in handle.keys())
    assert result.final_metrics["stored_bytes"] == on_disk


def test_block_removal_then_route_saves_a_routed_model_with_fewer_blocks(tmp_path):
    from transformers import AutoModelForCausalLM

    steps = ({"prune": {"method": "block_removal", "target_sparsity": 0.3, "num_calibration_sequences": 4,
                        "calibration_seq_len": 32}},
             {"route": {"method": "token_router", "token_sparsity": 0.25, "static": True, "generations": 1,
                        "population": 2, "search_windows": 1, "search_seq_len": 32}})
    result = run(recipe(*steps, evaluation={**QUICK_EVAL, "score_last": 16}), tmp_path / "out", progress=False)
    config = json.loads((result.save_dir / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "hf_compress_routed" and config["num_hidden_layers"] == 1
    reloaded = AutoModelForCausalLM.from_pretrained(result.save_dir).eval()
    ids = torch.tensor([[5, 17, 42, 99, 3, 64, 128, 7]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, result.model.eval()(ids).logits, rtol=0, atol=1e-6)


def test_a_folder_that_would_not_reload_as_the_model_is_never_installed(tmp_path, monkeypatch):
    import hf_compress.recipe.save as save

    original = save.save_model

    def save_then_drift(state, folder, base_model, **kwargs):  # a saver that loses something: the model no longer matches
        kind = original(state, folder, base_model, **kwargs)
        with torch.no_grad():
            state.model.get_output_embeddings().weight.mul_(1.5)
        return kind

    monkeypatch.setattr(save, "save_model", save_then_drift)
    with pytest.raises(RuntimeError, match="does not reload as the model in memory"):
        run(recipe({"prune": {"method": "magnitude", "sparsity": "2:4"}}), tmp_path / "out", progress=False)
    assert list(tmp_path.iterdir()) == []  # neither the folder nor its staging


@pytest.mark.real_model
def test_a_cheap_recipe_on_smollm2(tmp_path):
    """Magnitude 2:4 → RTN 4-bit on the real SmolLM2-135M: the folder reloads (checked by the run itself), the
    tied embeddings are stored once, and the stacked decoder linears are far below their fp32 bytes."""
    result = run(recipe({"prune": {"method": "magnitude", "sparsity": "2:4"}},
                        {"quantize": {"method": "rtn", "bits": 4, "group_size": 128}},
                        name="smollm2-magnitude24-rtn4", base_model="smollm2-135m",
                        evaluation={"perplexity_windows": 2, "window": 256}), tmp_path / "out", progress=False)
    base, pruned, packed = (r.metrics for r in result.records)
    assert packed["decoder_linear_vs_base_fp32"] < 0.2
    assert result.final_metrics["reload_max_logit_difference"] <= 1e-3
    assert result.final_metrics["model_disk_bytes"] < 0.5 * base["stored_bytes"]
    assert base["perplexity"] < pruned["perplexity"]


def test_a_folder_given_as_the_recipe_file_is_named_as_a_folder(tmp_path):
    with pytest.raises(IsADirectoryError, match="is a folder; pass the path of a recipe YAML file.$"):
        Recipe.from_yaml(tmp_path)
    (tmp_path / "recipe.yaml").write_text("name: x\n")
    with pytest.raises(IsADirectoryError, match=r"YAML file \(.*recipe\.yaml\)\.$"):
        Recipe.from_yaml(tmp_path)


def test_a_recipe_loads_its_base_in_the_dtype_it_names(tmp_path):
    # Every recipe loaded its base in float32: twice a bf16 model's memory, with no field to ask otherwise.
    import yaml

    result = run(recipe({"prune": {"method": "magnitude", "sparsity": "2:4"}}, dtype="bfloat16"), tmp_path / "out",
                 progress=False)
    assert result.model.dtype == torch.bfloat16
    saved = yaml.safe_load((tmp_path / "out" / "recipe.yaml").read_text())
    assert saved["dtype"] == "bfloat16" and Recipe.from_dict(saved).dtype == "bfloat16"
    assert "dtype" not in Recipe.from_dict(recipe({"prune": WANDA})).to_dict()  # the default is not written
    with pytest.raises(RecipeError, match="recipe: dtype must be one of float32, bfloat16, float16, got 'fp8'"):
        Recipe.from_dict(recipe({"prune": WANDA}, dtype="fp8"))
