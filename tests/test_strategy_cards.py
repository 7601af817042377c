"""The cards of saved decoding-strategy folders (FLy / speculative decoding, Amphista heads, CoSpec arbiters): their
"How to use" code runs as written (executed here, against a tiny base model), names the repo the folder is
pushed to (``repo_id=``, ``push_to_hub``) or the folder itself, and the card carries measured results passed in."""

from __future__ import annotations

import contextlib
import io
import re

import pytest
import torch
from huggingface_hub import ModelCard
from transformers import AutoModelForCausalLM

from hf_compress.assets import tiny_model
from hf_compress.evaluation.results import MetricRecord
from hf_compress.hub import push_to_hub
from hf_compress.hub.model_card import read_metrics
from hf_compress.speculative import FLy
from hf_compress.speculative.cospec import ArbiterConfig, CoSpecArbiter
from hf_compress.speculative.heads import AmphistaConfig, AmphistaHeads


SPEED = MetricRecord("text-generation", "wikipedia", "English Wikipedia excerpt", "speedup", 1.5, dataset_split="eval",
                     metric_name="speed-up over greedy generate()", settings={"prompts": 1, "device": "cpu"})


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def snippet_of(card_text: str) -> str:
    """The Python block of the card's "How to use" section."""
    section = card_text.split("## How to use", 1)[1]
    (code,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    return code


def run_snippet(code: str) -> dict:
    """Execute the card's code as a user would paste it; its variables and what it printed."""
    namespace: dict = {"__name__": "__card__"}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, "<card snippet>", "exec"), namespace)  # noqa: S102  (the card's own code)
    namespace["printed"] = printed.getvalue()
    return namespace


def check_generated(namespace: dict) -> None:
    out, prompt = namespace["out"], namespace["inputs"]["input_ids"]
    assert out.shape[1] == prompt.shape[1] + 32 or int(out[0, -1]) == namespace["model"].generation_config.eos_token_id
    assert out.shape[1] > prompt.shape[1] and torch.equal(out[:, : prompt.shape[1]], prompt)
    assert namespace["printed"].strip()


@pytest.mark.parametrize("kind", ["fly", "amphista", "cospec"])
def test_pushed_card_code_runs_as_written_and_loads_its_repo(kind, fake_hub, tmp_path):
    """Each kind pushed with ``push_to_hub(repo_id)``: the card on the Hub loads the base model it was saved for and
    runs ``custom_generate="<repo_id>"``; executed, it generates (strict FLy and Amphista: greedy's tokens)."""
    tiny_model("llama", save_dir=tmp_path / "base")
    push_to_hub(tmp_path / "base", "user/tiny-base", allow_missing_card=True)
    model = AutoModelForCausalLM.from_pretrained("user/tiny-base")  # its name_or_path is the base's Hub id
    repo = f"user/tiny-{kind}"
    if kind == "fly":  # measured results travel with the push (the heads and the arbiter: test_artifacts.py)
        FLy(loose=False, num_draft_tokens=4).push_to_hub(repo, base_model="user/tiny-base", metrics=[SPEED])
    elif kind == "amphista":
        AmphistaHeads.for_model(model, AmphistaConfig(num_heads=2, num_attention_heads=2)).push_to_hub(repo)
    else:
        CoSpecArbiter.for_model(model, ArbiterConfig(), tiny_model("llama")[1]).push_to_hub(repo)
    card = ModelCard.load(repo)
    code = snippet_of(card.text)
    assert f'custom_generate="{repo}"' in code and 'from_pretrained("user/tiny-base")' in code, code
    assert card.data.base_model == "user/tiny-base"
    if kind == "fly":  # the measured result, in model-index and the table
        assert read_metrics(card) == [SPEED]
        assert "were recorded" not in card.text and "| speed-up over greedy generate() |" in card.text
    else:
        assert not read_metrics(card) and "results were recorded when this card was written" in card.text
    namespace = run_snippet(code)
    check_generated(namespace)
    if kind != "cospec":  # strict verification: greedy's own tokens (an untrained arbiter keeps some drafts)
        inputs = namespace["inputs"]
        assert torch.equal(namespace["out"], model.generate(**inputs, max_new_tokens=32, do_sample=False))


def test_saved_folder_card_code_runs_from_the_folder_s_parent(tmp_path, monkeypatch):
    """Saved without a repo id, the card runs ``custom_generate="<folder name>"`` from the folder's parent; with
    ``repo_id=`` it names that repo; without a base model it says BASE_MODEL is to be filled in."""
    tiny_model("llama", save_dir=tmp_path / "tiny" / "base")  # "tiny/base": the base model's id, here a folder
    strategy = FLy(num_draft_tokens=4)
    strategy.save_pretrained(tmp_path / "fly", base_model="tiny/base")
    card = (tmp_path / "fly" / "README.md").read_text()
    code = snippet_of(card)
    assert 'custom_generate="fly"' in code and "No speed or quality results were recorded" in card
    monkeypatch.chdir(tmp_path)
    check_generated(run_snippet(code))

    code = snippet_of(strategy.save_pretrained(tmp_path / "fly-for-org", base_model="tiny/base", repo_id="org/fly")
                      .joinpath("README.md").read_text())
    assert 'custom_generate="org/fly"' in code and "fly-for-org" not in code
    anonymous = snippet_of(strategy.save_pretrained(tmp_path / "any-base").joinpath("README.md").read_text())
    assert 'from_pretrained("BASE_MODEL")  # none was recorded' in anonymous
    with pytest.raises(ValueError, match="Repo id"):
        strategy.save_pretrained(tmp_path / "bad", repo_id="not a/repo/id")
    assert not (tmp_path / "bad").exists()


def test_a_subclass_overriding_model_card_with_the_earlier_signature_still_saves(tmp_path):
    """``model_card`` gained ``repo_id=`` and ``metrics=``; a strategy that overrides it as before
    (``model_card(self, name, base_model, settings)``) still saves, warned that its card names neither."""

    class OwnCard(FLy):
        def model_card(self, name, base_model, settings):
            return super().model_card(name, base_model, settings)

    with pytest.warns(FutureWarning, match="takes no repo_id= or metrics="):
        folder = OwnCard(num_draft_tokens=4).save_pretrained(tmp_path / "own", repo_id="org/own", metrics=[SPEED])
    assert (folder / "README.md").is_file() and (folder / "custom_generate" / "generate.py").is_file()
