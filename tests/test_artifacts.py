"""The ready-to-download set: build every artifact kind (quick mode, tiny Llama), publish it to the fake Hub,
publish again (nothing uploaded), then run each artifact's user journey in a fresh interpreter that downloads
it from the Hub. The set is built for the namespace it is published to: every card loads its own repo, and
publishing to another namespace is refused. Bad inputs (a changed file, no namespace, another namespace, an unknown
name, a card number that was never measured) are refused before anything is pushed."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_compress.assets import tiny_model
from hf_compress.hub.manifest import Manifest, ManifestError, verify_manifest
from hf_compress.hub.model_card import read_metrics
from hf_compress.hub.publish import check_publishable, publish


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import build_artifacts  # noqa: E402  (a script, importable once its folder is on the path)


NAMESPACE = "org"
KINDS = {"model", "router", "adapter", "strategy"}


@pytest.fixture(scope="module")
def built_set(tmp_path_factory) -> Path:
    """The whole set in quick mode (tiny Llama) for ``NAMESPACE``, built once for the module; tests tamper with
    copies only.

    One torch thread: tiny models run fastest so, and on a loaded 2-core machine two threads wait on each other.
    """
    out = tmp_path_factory.mktemp("artifacts")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        build_artifacts.build_set(out, quick=True, namespace=NAMESPACE)
    finally:
        torch.set_num_threads(threads)
    return out / "manifest.json"


@pytest.fixture
def set_copy(built_set, tmp_path) -> Path:
    target = tmp_path / "set"
    shutil.copytree(built_set.parent, target)
    return target / "manifest.json"


def _commits(hub) -> int:
    return sum(1 for method, path in hub.requests if method == "POST" and "/commit/" in path)


def test_build_covers_every_kind_and_resumes(built_set, tmp_path):
    manifest = verify_manifest(built_set)
    expected = {build_artifacts.QUICK.prefix + "-" + key for key in build_artifacts.ARTIFACTS}
    assert set(manifest.artifacts) == expected
    assert {entry.kind for entry in manifest.artifacts.values()} == KINDS
    for entry in manifest.artifacts.values():
        assert entry.build_seconds is not None and entry.build_seconds >= 0
        assert "README.md" in {f.path for f in entry.files}
        assert not Path(entry.folder).is_absolute()
        assert entry.results["disk_bytes"]["value"] > 0 or entry.name.endswith("-fly")  # FLy has no weights
    check_publishable(built_set)  # every card parses and each model-index value is one of the measurements
    models = [e for e in manifest.artifacts.values() if e.kind in ("model", "router", "adapter")]
    assert all(read_metrics(manifest.folder_of(e.name)) for e in models)  # measured cards, not empty ones
    for entry in (e for e in manifest.artifacts.values() if e.kind == "strategy"):  # the speed the build measured
        card = {(m.metric_type, m.metric_value) for m in read_metrics(manifest.folder_of(entry.name))}
        assert card == {(m.record.metric_type, m.record.metric_value) for m in entry.metrics}, entry.name
        assert ("speedup", entry.results["speedup_vs_greedy"]["value"]) in card, (entry.name, card)
        assert "were recorded" not in (manifest.folder_of(entry.name) / "README.md").read_text()
    rows = {row["name"]: row for row in build_artifacts.rows(manifest)}
    assert all(rows[e.name]["perplexity"] > 1 for e in models)
    stacked = rows[f"{build_artifacts.QUICK.prefix}-sds24-dlqat4"]
    assert stacked["decoder_linear_vs_base_fp32"] < rows[f"{build_artifacts.QUICK.prefix}-sds24"]["decoder_linear_vs_base_fp32"]
    assert all(rows[f"{build_artifacts.QUICK.prefix}-{k}"]["tokens_per_s"] > 0 for k in ("sds24", "fly", "amphista"))
    # The results table (and the README's, between its markers) comes from the manifest's measurements only.
    from hf_compress.evaluation.report import write_benchmark

    results = {"rows": list(rows.values()), "targets": build_artifacts.headline_targets(list(rows.values()), "tiny-llama")}
    payload = {"settings": {"base": "tiny-llama", "device": "cpu"}, "results": results}
    json_path, _ = write_benchmark("artifacts", payload["settings"], results, build_artifacts.render(payload),
                                   results_dir=tmp_path)
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{build_artifacts.TABLE_START}\nthe previous table\n{build_artifacts.TABLE_END}\noutro\n")
    build_artifacts.update_readme(json_path, readme)
    text = readme.read_text()
    assert "the previous table" not in text and text.startswith("intro\n") and text.endswith("outro\n")
    assert f"| {stacked['name']} | model |" in text and f"{stacked['perplexity']:.2f}" in text
    # Resumable: a second run finds every artifact complete and rebuilds nothing (same files, same times).
    before = built_set.read_bytes()
    build_artifacts.build_set(built_set.parent, quick=True, namespace=NAMESPACE)
    assert built_set.read_bytes() == before


def test_an_edited_recipe_file_rebuilds_its_artifact(set_copy, tmp_path, monkeypatch):
    """Resuming skips a built model only if its recipe file is unchanged: an edit builds it again instead of
    keeping the old model (and its manifest, card and table row) under the new recipe."""
    class Rebuilt(Exception):
        pass

    def builder(artifact, folder, ctx):
        raise Rebuilt(artifact.key)

    recipes = tmp_path / "recipes"
    shutil.copytree(build_artifacts.RECIPES, recipes)
    monkeypatch.setattr(build_artifacts, "RECIPES", recipes)
    monkeypatch.setitem(build_artifacts.BUILDERS, "recipe", builder)
    build_artifacts.build_set(set_copy.parent, ["sds24"], quick=True, namespace=NAMESPACE)  # unchanged: skipped
    path = recipes / "sds24.yaml"
    path.write_text(path.read_text().replace("base: wanda", "base: magnitude"))
    with pytest.raises(Rebuilt, match="sds24"):
        build_artifacts.build_set(set_copy.parent, ["sds24"], quick=True, namespace=NAMESPACE)


def test_every_card_loads_its_own_repo_and_no_other_namespace_publishes_it(built_set, fake_hub, capsys):
    """Built with --namespace, each card's loading snippet (every kind) loads NAMESPACE/<name>, the repo publish
    pushes it to; publishing to another namespace is refused before anything is hashed or sent."""
    from hf_compress.cli.main import main

    manifest = Manifest.load(built_set)
    for name, entry in manifest.artifacts.items():
        assert entry.namespace == NAMESPACE and entry.repo_id == f"{NAMESPACE}/{name}"
        card = (manifest.folder_of(name) / "README.md").read_text()
        snippet = card.rsplit("## How to ", 1)[1]  # "How to load" / "How to use": the card's last section
        assert f'"{NAMESPACE}/{name}"' in snippet, (name, snippet)
        assert "<owner>/<repo>" not in card and f'"{name}' not in snippet, (name, snippet)  # no folder snippet
    with pytest.raises(ManifestError, match=rf"namespace 'other'.*built for namespace '{NAMESPACE}'.*"
                                            rf"--namespace {NAMESPACE}, or rebuild.*--namespace other --rebuild"):
        publish(built_set, "other")
    with pytest.raises(ManifestError, match=f"built for namespace '{NAMESPACE}'"):
        publish(built_set, "other", names=[f"{build_artifacts.QUICK.prefix}-fly"], dry_run=True)
    assert main(["publish", "--manifest", str(built_set), "--namespace", "other"]) == 2
    assert f"Publish with --namespace {NAMESPACE}" in capsys.readouterr().err
    assert not fake_hub.repos and not fake_hub.requests


def test_resuming_a_set_for_another_namespace_is_refused_before_any_work(set_copy):
    """A set's cards name the namespace it was built for: a run for another (or none) would keep them as they are,
    so it is refused, saying how to resume or rebuild; so is a namespace that makes no repo id."""
    before = set_copy.read_bytes()
    with pytest.raises(ValueError, match=rf"-fly built for namespace '{NAMESPACE}' .*not for no namespace\. Pass "
                                        rf"--namespace {NAMESPACE} to resume.*--rebuild"):
        build_artifacts.build_set(set_copy.parent, ["fly"], quick=True)
    with pytest.raises(SystemExit, match="build_artifacts.py: .*not for namespace 'other'"):
        build_artifacts.main(["--quick", "--namespace", "other", "--out", str(set_copy.parent)])
    with pytest.raises(SystemExit, match="--namespace 'a/b': the namespace must be a Hub user or organisation name "
                                         "without '/'"):
        build_artifacts.main(["--quick", "--namespace", "a/b", "--out", str(set_copy.parent)])
    assert set_copy.read_bytes() == before


def test_a_set_built_without_namespace_loads_its_folders_and_publishes_anywhere(tmp_path, fake_hub, caplog):
    """Without --namespace the cards load the folder from disk (they cannot know the repo) and the set goes to any
    namespace, with a warning that its cards do not name the repos."""
    import logging

    prefix = build_artifacts.QUICK.prefix
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        manifest = build_artifacts.build_set(tmp_path / "set", ["dlqat3-adapter", "fly"], quick=True)
    finally:
        torch.set_num_threads(threads)
    assert {entry.namespace for entry in manifest.artifacts.values()} == {None}
    adapter = (manifest.folder_of(f"{prefix}-dlqat3-adapter") / "README.md").read_text()
    assert f'folder = "{prefix}-dlqat3-adapter/"' in adapter and "PeftModel.from_pretrained(base, folder)" in adapter
    assert f'custom_generate="{prefix}-fly"' in (manifest.folder_of(f"{prefix}-fly") / "README.md").read_text()
    with caplog.at_level(logging.WARNING, logger="hf_compress"):
        results = publish(manifest, "anyone")
    assert {(r.repo_id, r.status) for r in results} == {(f"anyone/{prefix}-dlqat3-adapter", "uploaded"),
                                                         (f"anyone/{prefix}-fly", "uploaded")}
    assert "built without a namespace" in caplog.text


def test_rebuilding_part_of_the_set_elsewhere_keeps_the_other_rows_marked():
    """A part of the set rebuilt into a fresh --out folder replaces its own row and keeps the rest, each kept row
    marked with the results it comes from; a kept row never hides this run's row of the same artifact."""
    prefix = build_artifacts.QUICK.prefix
    earlier = {"commit": "0123456789abcdef", "date": "2026-12-01 12:44 UTC", "settings": {"base": "tiny"},
               "results": {"rows": [
                   {"name": f"{prefix}-perm-wanda24", "kind": "model", "what": "old", "perplexity": 118.0},
                   {"name": f"{prefix}-sds24", "kind": "model", "what": "SDS 2:4", "perplexity": 78.7},
                   {"name": "other-base-sds24", "kind": "model", "what": "another base", "perplexity": 1.0}]}}
    fresh = [{"name": f"{prefix}-perm-wanda24", "kind": "model", "what": "new", "perplexity": 114.0}]
    rows = build_artifacts.with_earlier_rows(fresh, earlier, prefix)
    assert [(row["name"], row["perplexity"]) for row in rows] == [(f"{prefix}-sds24", 78.7),
                                                                  (f"{prefix}-perm-wanda24", 114.0)]
    assert rows[0]["recorded_in"] == {"commit": "0123456789abcdef", "date": "2026-12-01 12:44 UTC"}
    assert "recorded_in" not in rows[1] and "recorded_in" not in earlier["results"]["rows"][1]
    text = build_artifacts.render({"settings": {"base": "tiny", "device": "cpu"}, "results": {"rows": rows}})
    assert f"| {prefix}-sds24 † |" in text and f"| {prefix}-perm-wanda24 |" in text and "0123456" in text
    # Kept again by a later partial run: the row still names the results it was first recorded in.
    again = build_artifacts.with_earlier_rows([], {"commit": "fedcba", "results": {"rows": rows}}, prefix)
    assert again[0]["recorded_in"]["commit"] == "0123456789abcdef" and again[1]["recorded_in"]["commit"] == "fedcba"


def test_zero_shot_scores_each_model_once_and_joins_the_table_by_weights(set_copy, tmp_path):
    from hf_compress.evaluation.report import write_benchmark

    saved = []
    prefix = build_artifacts.QUICK.prefix
    results = build_artifacts.zero_shot_set(set_copy.parent, ["sds24", "tyr30", "fly"], quick=True, save=saved.append)
    assert list(results["models"]) == ["base", f"{prefix}-sds24", f"{prefix}-tyr30"]  # models only, no strategy
    assert len(saved) == 3 and all(r["tasks"]["piqa"]["n"] == 8 for r in results["models"].values())
    again = build_artifacts.zero_shot_set(set_copy.parent, ["sds24", "tyr30"], quick=True, previous=results,
                                          save=saved.append)
    assert again == results and len(saved) == 3  # same weights: nothing scored twice
    rows = {row["name"]: row for row in build_artifacts.rows(Manifest.load(set_copy), zero_shot=results)}
    sds = results["models"][f"{prefix}-sds24"]["tasks"]
    assert rows[f"{prefix}-sds24"]["zero_shot"] == {task: r["score"] for task, r in sds.items()}
    assert rows[f"{prefix}-dlqat3"]["zero_shot"] is None  # not scored: "not measured" in the table
    stale = {"models": {f"{prefix}-sds24": {**results["models"][f"{prefix}-sds24"], "weights": "0" * 64}}}
    unscored = {k: v for k, v in rows[f"{prefix}-sds24"].items() if not k.startswith("zero_shot")}
    assert "zero_shot" not in build_artifacts.with_zero_shot([unscored], stale)[0]  # other weights: not joined
    # The README table carries the column, and the base model's scores, from the zero-shot results file.
    payload = {"settings": {"base": "tiny-llama", "device": "cpu"}, "results": {"rows": list(rows.values())}}
    json_path, _ = write_benchmark("artifacts", payload["settings"], payload["results"], build_artifacts.render(payload),
                                   results_dir=tmp_path)
    write_benchmark(build_artifacts.ZERO_SHOT_NAME, payload["settings"], results,
                    build_artifacts.render_zero_shot({"settings": payload["settings"], "results": results}),
                    results_dir=tmp_path)
    readme = tmp_path / "README.md"
    readme.write_text(f"{build_artifacts.TABLE_START}\n{build_artifacts.TABLE_END}\n")
    build_artifacts.update_readme(json_path, readme)
    text = readme.read_text()
    assert f"piqa {sds['piqa']['score']:.3f} ± {sds['piqa']['stderr']:.3f}" in text and "the base model scores" in text


def test_publish_then_nothing_to_upload_then_fresh_process_journeys(built_set, fake_hub, tmp_path):
    manifest = Manifest.load(built_set)
    first = publish(built_set, NAMESPACE)
    assert {r.status for r in first} == {"uploaded"} and len(first) == len(manifest.artifacts)
    for result in first:
        entry = manifest.artifacts[result.name]
        remote = fake_hub.files(result.repo_id)
        local = manifest.folder_of(result.name)
        assert {f.path for f in entry.files} <= set(remote)
        assert all(remote[f.path] == (local / f.path).read_bytes() for f in entry.files)
        assert f'"{result.repo_id}"'.encode() in remote["README.md"]  # the card on the Hub loads this repo

    commits, requests = _commits(fake_hub), len(fake_hub.requests)
    second = publish(built_set, NAMESPACE)
    assert {r.status for r in second} == {"unchanged"}
    assert _commits(fake_hub) == commits  # nothing uploaded: no commit, no preupload
    assert not any("/preupload/" in path for _, path in fake_hub.requests[requests:])
    assert not fake_hub.unhandled

    # A weight file of another version in one repo is a difference: the next publish deletes it.
    leftover = first[0]
    fake_hub.add_files(leftover.repo_id, {"model-00001-of-00002.safetensors": b"an earlier version"})
    third = {r.name: r for r in publish(built_set, NAMESPACE)}
    assert third[leftover.name].status == "uploaded"
    assert "model-00001-of-00002.safetensors" in third[leftover.name].changed
    assert "model-00001-of-00002.safetensors" not in fake_hub.files(leftover.repo_id)
    assert {r.status for name, r in third.items() if name != leftover.name} == {"unchanged"}

    # Each artifact's journey in a fresh interpreter, downloading from the Hub this process published to.
    state = tmp_path / "hub.pickle"
    fake_hub.save_state(state)
    journeys = [
        {"repo_id": r.repo_id, "kind": manifest.artifacts[r.name].kind, "folder": str(manifest.folder_of(r.name)),
         "base": build_artifacts.QUICK.base}
        for r in first
    ]
    spec = tmp_path / "journeys.json"
    spec.write_text(json.dumps(journeys))
    done = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "artifact_journey.py"), str(state), str(tmp_path / "users"), str(spec)],
        check=False, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = {r["repo_id"]: r for r in map(json.loads, done.stdout.splitlines())}
    assert set(results) == {j["repo_id"] for j in journeys}
    for journey in journeys:
        result = results[journey["repo_id"]]
        assert len(result["hub_tokens"]) == 8, result
        assert result["hub_tokens"] == result["local_tokens"], result  # the download is the build
        assert result.get("loaded") == result.get("loaded_local"), result  # and loads as the same kind of model
        assert "hf_compress" in result["card_tags"]
    by_key = {key: results[f"{NAMESPACE}/{build_artifacts.QUICK.prefix}-{key}"] for key in build_artifacts.ARTIFACTS}
    dense_parameters = sum(p.numel() for p in tiny_model("llama")[0].parameters())
    for key in ("sds24", "perm-wanda24"):  # sparse checkpoints load as plain 2:4 linears
        assert by_key[key]["loaded"]["two_four"] and by_key[key]["loaded"]["packed_layers"] == 0, by_key[key]
    for key in ("dlqat3", "sds24-dlqat4"):  # packed: every decoder linear (2 blocks x 7) stays packed low-bit
        assert by_key[key]["loaded"]["quant_method"] == "hf_compress_packed", by_key[key]
        assert by_key[key]["loaded"]["packed_layers"] == 14, by_key[key]
    assert by_key["tyr30"]["loaded"]["quant_method"] == "hf_compress_slim"
    assert by_key["tyr30"]["loaded"]["parameters"] < dense_parameters  # physically smaller
    assert by_key["token-router"]["loaded"]["routed"] and not by_key["sds24"]["loaded"]["routed"]
    assert by_key["dlqat3-adapter"]["loaded"] == {"class": "PeftModelForCausalLM", "peft_type": "PeftType.DLQAT"}
    assert by_key["amphista"]["hub_tokens"] == by_key["amphista"]["greedy"]  # lossless greedy verification


def test_changed_file_missing_namespace_and_unknown_name_push_nothing(set_copy, fake_hub):
    manifest = Manifest.load(set_copy)
    name = next(iter(manifest.artifacts))
    with pytest.raises(ValueError, match="No namespace"):
        publish(set_copy, None)
    with pytest.raises(ValueError, match="No namespace"):
        publish(set_copy, " ")
    with pytest.raises(ValueError, match="namespace"):
        publish(set_copy, "a/b")
    with pytest.raises(ManifestError, match="Unknown artifact.*'nope'"):
        publish(set_copy, NAMESPACE, names=["nope"])
    with pytest.raises(SystemExit, match="unknown artifact.*nope"):
        build_artifacts.main(["--quick", "--only", "nope", "--out", str(set_copy.parent)])

    # One byte changed in the last artifact's weights: the whole publish is refused, no repo is created.
    last = list(manifest.artifacts)[-1]
    weights = next(f.path for f in manifest.artifacts[last].files if f.path.endswith(".safetensors"))
    path = manifest.folder_of(last) / weights
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ManifestError, match=f"{last}.*{weights}.*does not match"):
        publish(set_copy, NAMESPACE)
    assert not fake_hub.repos and _commits(fake_hub) == 0
    # The other artifacts alone are fine (dry run: checked, nothing sent).
    planned = publish(set_copy, NAMESPACE, names=[name], dry_run=True)
    assert [r.status for r in planned] == ["planned"] and not fake_hub.repos


def test_unlisted_file_bad_manifest_and_unmeasured_card_number_are_refused(set_copy, fake_hub):
    manifest = Manifest.load(set_copy)
    model = next(n for n, e in manifest.artifacts.items() if e.metrics)
    folder = manifest.folder_of(model)
    (folder / "extra.json").write_text("{}")
    with pytest.raises(ManifestError, match="extra.json.*not in the manifest"):
        publish(set_copy, NAMESPACE)
    (folder / "extra.json").unlink()

    # A card whose model-index value differs from every measurement (hand-edited): refused, even with the
    # manifest's hash updated to match the edited card.
    card = folder / "README.md"
    value = manifest.artifacts[model].metrics[0].record.metric_value
    text = card.read_text()
    assert f"value: {value}" in text
    card.write_text(text.replace(f"value: {value}", f"value: {value + 1}"))
    entry = manifest.artifacts[model]
    from hf_compress.hub.manifest import FileEntry, file_digest

    entry.files = [FileEntry(f.path, *file_digest(folder / f.path)) if f.path == "README.md" else f for f in entry.files]
    manifest.save()
    with pytest.raises(ManifestError, match="not one of its measurements"):
        publish(set_copy, NAMESPACE)

    set_copy.write_text("{not json")
    with pytest.raises(ManifestError, match="not valid JSON"):
        publish(set_copy, NAMESPACE)
    set_copy.write_text(json.dumps({"schema_version": 99, "artifacts": []}))
    with pytest.raises(ManifestError, match="schema_version 99"):
        publish(set_copy, NAMESPACE)
    assert not fake_hub.repos


def test_cli_publish_reports_one_line_errors(set_copy, fake_hub, capsys):
    from hf_compress.cli.main import main

    with pytest.raises(SystemExit) as exit_info:  # argparse: --namespace is required, even for --dry-run
        main(["publish", "--manifest", str(set_copy)])
    assert exit_info.value.code == 2
    assert "the following arguments are required: --namespace" in capsys.readouterr().err
    assert main(["publish", "--manifest", str(set_copy), "--namespace", NAMESPACE, "--dry-run"]) == 0
    assert "planned" in capsys.readouterr().out and not fake_hub.repos
    assert main(["publish", "--manifest", str(set_copy), "--namespace", NAMESPACE, "--only", "tiny-llama-fly", "nope"]) == 2
    assert "Unknown artifact(s) 'nope'" in capsys.readouterr().err and not fake_hub.repos
    assert main(["publish", "--manifest", str(set_copy), "--namespace", NAMESPACE, "--only", "tiny-llama-fly",
                 "--private"]) == 0
    assert capsys.readouterr().out.startswith("uploaded  org/tiny-llama-fly")
    assert [(repo_id, repo.private) for (_, repo_id), repo in fake_hub.repos.items()] == [("org/tiny-llama-fly", True)]


def test_a_manifest_path_that_is_one_model_folder_points_at_push_to_hub(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    for path in (model, model / "config.json"):
        with pytest.raises(ManifestError, match=r"one model folder: push it with hf_compress\.hub\.push_to_hub"):
            Manifest.load(path)
    with pytest.raises(ManifestError, match="No manifest at") as refusal:
        Manifest.load(tmp_path / "missing")
    assert "push_to_hub" not in str(refusal.value)
