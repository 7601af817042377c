"""The demo job end to end on a tiny model: measure, compress, write Hub-ready folders, compare."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_compress.demo import DemoMethod, format_table, run_demo
from hf_compress.evaluation.suite import EvaluationSettings
from hf_compress.hub import read_metrics, read_recipe


SETTINGS = EvaluationSettings(perplexity_sets=("wikipedia",), max_windows=2, zero_shot_tasks=("arc_easy",),
                              zero_shot_limit=4, speed_prompts=1, max_new_tokens=4)


def _halve_weights(model, tokenizer, calibration):
    # A stand-in compression method: deterministic and visible in the metrics.
    assert calibration.num_rows > 0
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(0.5)
    return model, {"method": "halve", "factor": 0.5}


def test_demo_writes_hub_ready_folders(tmp_path):
    out = tmp_path / "demo"
    summary = run_demo("tiny-llama", out, settings=SETTINGS, progress=False,
                       methods=[DemoMethod("halve", "multiply every weight by 0.5", _halve_weights),
                                DemoMethod("halve-again", "the same, to check it starts from dense", _halve_weights)])
    names = [row["model"] for row in summary["rows"]]
    assert names == ["dense", "halve", "halve-again"]
    dense, halved, again = summary["rows"]
    assert dense["ppl_wikipedia"] != halved["ppl_wikipedia"]
    assert again["ppl_wikipedia"] == halved["ppl_wikipedia"]  # from a fresh dense copy, not the halved model
    assert dense["disk_MB"] == halved["disk_MB"] > 0  # halving keeps the checkpoint dense
    folder = out / "halve"
    assert read_recipe(folder) == {"method": "halve", "factor": 0.5}
    metrics = {m.metric_type: m.metric_value for m in read_metrics(folder)}
    assert metrics["perplexity"] == pytest.approx(halved["ppl_wikipedia"], rel=1e-3)
    # Every measured row of the card shows the dense model's number from the same run beside its own.
    dense_values = {m.metric_name or m.metric_type: m.metric_value for m in read_metrics(out / "dense")}
    rows = [line.split(" | ") for line in (folder / "README.md").read_text().splitlines()
            if line.startswith("| ") and line.split(" | ")[0].strip("| ") in dense_values]
    assert len(rows) == len(dense_values) >= 3
    for row in rows:
        assert float(row[4]) == pytest.approx(dense_values[row[0].strip("| ")], rel=1e-5), row
    reloaded = AutoModelForCausalLM.from_pretrained(folder)
    assert reloaded.config.model_type == "llama"
    assert json.loads((out / "summary.json").read_text())["rows"][1]["model"] == "halve"
    table = format_table(summary["rows"])
    assert table.splitlines()[0].startswith("| model | ppl_wikipedia")


def test_demo_refuses_a_non_empty_output_dir(tmp_path):
    (tmp_path / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="--overwrite"):
        run_demo("tiny-llama", tmp_path, settings=SETTINGS, methods=[], progress=False)
    assert (tmp_path / "keep.txt").read_text() == "user data"


def test_failed_method_leaves_nothing_behind(tmp_path):
    def broken(model, tokenizer, calibration):
        raise RuntimeError("method exploded")

    with pytest.raises(RuntimeError, match="method exploded"):
        run_demo("tiny-llama", tmp_path / "demo", settings=SETTINGS, progress=False,
                 methods=[DemoMethod("broken", "fails", broken)])
    assert not (tmp_path / "demo").exists()
    assert list(tmp_path.iterdir()) == []


def test_default_demo_methods_import_and_name_the_pruners():
    # `hf-compress demo` builds its method list here; nothing else in the suite imports it.
    from hf_compress.demo import default_demo_methods

    names = [method.name for method in default_demo_methods()]
    assert names == ["magnitude-2of4", "wanda-2of4", "sparsegpt-2of4"], names


def test_quiet_demo_reaches_methods_that_take_progress(tmp_path, capsys):
    """``demo -q`` (``progress=False``) printed every pruner's bar: the methods were never told. A method whose
    ``apply`` has a ``progress`` keyword gets it; the three-argument form still works (``_halve_weights``)."""
    from hf_compress.pruning.demo import demo_methods

    seen = []

    def halve_quietly(model, tokenizer, calibration, progress=True):
        seen.append(progress)
        return _halve_weights(model, tokenizer, calibration)

    magnitude = demo_methods()[0]
    run_demo("tiny-llama", tmp_path / "demo", settings=SETTINGS, progress=False,
             methods=[DemoMethod("quiet", "halve", halve_quietly), DemoMethod("plain", "halve", _halve_weights),
                      magnitude])
    assert seen == [False]
    assert "%|" not in capsys.readouterr().err  # no bar at all, the magnitude pruner's included
