"""Strict inputs (issue 19): every public config and constructor checks type, range and finiteness when it is
built, with one line naming the argument; generate() arguments a strategy cannot honour are refused; SparKCache
refuses what is not a decoder-only config before touching it. Valid edge values stay accepted."""

from __future__ import annotations

import contextlib
import io
import math

import pytest
import torch
from transformers import AutoConfig

from hf_compress.assets import load_calibration_text, tiny_model
from hf_compress.cache import SparKCache, StructuredChannelCache
from hf_compress.cli.main import main
from hf_compress.evaluation import evaluate_perplexity, measure_generation_speed, measure_kv_cache_bytes
from hf_compress.evaluation.suite import EvaluationSettings
from hf_compress.pruning import SDSConfig, SparseGPTConfig, TyrConfig, WandaConfig, WandaPruner
from hf_compress.quantization import DLQATConfig, quantize_rtn
from hf_compress.speculative import (
    FLy,
    LooseVerification,
    NgramDrafter,
    SpeculativeDecoding,
    TypicalAcceptance,
    strategy_from_dict,
)
from hf_compress.speculative.heads import Amphista, AmphistaConfig, DraftTree, MedusaConfig
from hf_compress.utils import InvalidArgumentTypeError, check_bool, check_choice, check_float, check_int

NAN, INF = float("nan"), float("inf")


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


# ------------------------------------------------------------------------------------------------ helpers


def test_helpers_name_the_argument_and_the_range():
    with pytest.raises(ValueError, match=r"^window must be a positive integer, got 0\.$"):
        check_int("window", 0, minimum=1)
    with pytest.raises(TypeError, match="window must be a positive integer, got True"):
        check_int("window", True, minimum=1)
    with pytest.raises(ValueError, match=r"ratio must be a number in \[0, 1\) \(NaN and infinity are not\), got nan"):
        check_float("ratio", NAN, low=0.0, high=1.0, high_open=True)
    with pytest.raises(ValueError, match="alpha must be a positive number, got -1. hint"):
        check_float("alpha", -1, low=0.0, low_open=True, hint="hint")
    with pytest.raises(TypeError, match="flag must be True or False, got 1"):
        check_bool("flag", 1)
    with pytest.raises(ValueError, match="mode must be one of 'a', 'b', got 'c'"):
        check_choice("mode", "c", ("a", "b"))
    # a wrong type is both a TypeError and a ValueError (code catching bad settings as ValueError keeps working)
    assert issubclass(InvalidArgumentTypeError, TypeError) and issubclass(InvalidArgumentTypeError, ValueError)
    assert check_int("limit", None, minimum=0, allow_none=True) is None
    assert check_float("x", 1, low=0.0) == 1.0 and isinstance(check_float("x", 1, low=0.0), float)


# ------------------------------------------------------------------------------------------------ configs


@pytest.mark.parametrize(
    ("build", "error", "name"),
    [
        (lambda: DLQATConfig(lora_alpha=NAN), ValueError, "lora_alpha"),
        (lambda: DLQATConfig(lora_alpha=-1), ValueError, "lora_alpha"),
        (lambda: DLQATConfig(lora_alpha="16"), TypeError, "lora_alpha"),
        (lambda: DLQATConfig(r=2.5), TypeError, "r must"),
        (lambda: DLQATConfig(symmetric="no"), TypeError, "symmetric"),
        (lambda: DLQATConfig(layers_to_transform=[-1]), ValueError, "layers_to_transform"),
        (lambda: DLQATConfig(target_modules=5), TypeError, "target_modules"),
        (lambda: WandaConfig(calibration_seq_len="512"), TypeError, "calibration_seq_len"),
        (lambda: WandaConfig(skip=None), TypeError, "skip"),
        (lambda: WandaConfig(calibration_seed=1.5), TypeError, "calibration_seed"),
        (lambda: SparseGPTConfig(percdamp=INF), ValueError, "percdamp"),
        (lambda: SDSConfig(sparse_regularization=NAN), ValueError, "sparse_regularization"),
        (lambda: SDSConfig(final_tuning_epochs=1.5), TypeError, "final_tuning_epochs"),
        (lambda: TyrConfig(initial_step="0.1"), TypeError, "initial_step"),
        (lambda: TyrConfig(damping=NAN), ValueError, "damping"),
        (lambda: TyrConfig(selection_tokens=(1, "a")), TypeError, "selection_tokens"),
        (lambda: TyrConfig(search_seed="0"), TypeError, "search_seed"),
        (lambda: TyrConfig(target_sparsity=NAN), ValueError, "target_sparsity"),
        (lambda: AmphistaConfig(top_k="3"), TypeError, "top_k"),
        (lambda: AmphistaConfig(num_attention_heads=0, hidden_size=64), ValueError, "num_attention_heads"),
        (lambda: AmphistaConfig(loss_decay=NAN), ValueError, "loss_decay"),
        (lambda: AmphistaConfig(share_lm_head="yes"), TypeError, "share_lm_head"),
        (lambda: AmphistaConfig(tree="x"), TypeError, "tree"),
        (lambda: MedusaConfig(num_layers="1"), TypeError, "num_layers"),
        (lambda: MedusaConfig(initializer_range=-1), ValueError, "initializer_range"),
        (lambda: EvaluationSettings(window=1), ValueError, "window"),
        (lambda: EvaluationSettings(window=64, score_last=64), ValueError, "exceeds the 63 predicted tokens"),
        (lambda: EvaluationSettings(score_last=0), ValueError, "score_last"),
        (lambda: EvaluationSettings(perplexity_sets=("c4",)), ValueError, "perplexity_sets"),
        (lambda: EvaluationSettings(zero_shot_limit=-1), ValueError, "zero_shot_limit"),
    ],
)
def test_configs_refuse_bad_values(build, error, name):
    with pytest.raises(error, match=name):
        build()


def test_configs_accept_valid_edges():
    assert DLQATConfig(bits=2, group_size=-1, r=1, lora_alpha=0.5).scaling == 0.5
    assert DLQATConfig(target_modules=["q_proj"], layers_to_transform=0).target_modules == {"q_proj"}
    assert SparseGPTConfig(percdamp=1).percdamp == 1.0
    assert SDSConfig(redense_epochs=0, calibration_seed=-1).redense_epochs == 0
    assert TyrConfig(target_sparsity="30%", num_levels=3, selection_tokens=[8, 16], selection_survivors=[4],
                     num_search_sequences=1, calibration_seq_len=16).selection_tokens == (8, 16)
    assert AmphistaConfig(num_heads=1, loss_decay=1).loss_decay == 1.0
    assert EvaluationSettings(perplexity_sets="news", zero_shot_tasks=(), window=2).perplexity_sets == ("news",)


# ------------------------------------------------------------------------------------------------ speculative


@pytest.mark.parametrize(
    ("build", "error", "name"),
    [
        (lambda: FLy(entropy_threshold=-1), ValueError, "entropy_threshold"),
        (lambda: FLy(entropy_threshold=NAN), ValueError, "entropy_threshold"),
        (lambda: FLy(entropy_threshold="0.3"), TypeError, "entropy_threshold"),
        (lambda: FLy(window=2.5), TypeError, "window"),
        (lambda: FLy(loose="no"), TypeError, "loose"),
        (lambda: SpeculativeDecoding(num_draft_tokens=True), TypeError, "num_draft_tokens"),
        (lambda: SpeculativeDecoding(123), TypeError, "draft_model"),
        (lambda: SpeculativeDecoding(max_ngram_size="4"), TypeError, "max_ngram_size"),
        (lambda: SpeculativeDecoding(min_ngram_size=0), ValueError, "min_ngram_size"),
        (lambda: SpeculativeDecoding(drafter=object()), TypeError, "drafter"),
        (lambda: SpeculativeDecoding(draft_confidence_threshold="0.4"), TypeError, "draft_confidence_threshold"),
        (lambda: SpeculativeDecoding(draft_confidence_threshold=NAN), ValueError, "draft_confidence_threshold"),
        (lambda: FLy(draft_confidence_threshold=1.5), ValueError, "draft_confidence_threshold"),
        (lambda: LooseVerification(num_samples=0), ValueError, "num_samples"),
        (lambda: TypicalAcceptance(posterior_alpha="0.3"), TypeError, "posterior_alpha"),
        (lambda: NgramDrafter(num_pred_tokens=0), ValueError, "num_pred_tokens"),
        (lambda: DraftTree(5), TypeError, "paths"),
        (lambda: DraftTree.chain(0), ValueError, "depth"),
        (lambda: Amphista(5), TypeError, "heads"),
        (lambda: Amphista("user/heads", tree=[(0, 0)]), ValueError, "tree"),
        (lambda: strategy_from_dict("fly"), TypeError, "settings"),
        (lambda: strategy_from_dict({"method": "fly", "entropy_threshold": -1}), ValueError, "entropy_threshold"),
    ],
)
def test_strategies_refuse_bad_values(build, error, name):
    with pytest.raises(error, match=name):
        build()


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"prompt_lookup_num_tokens": 3}, "prompt_lookup_num_tokens"),
        ({"penalty_alpha": 0.6, "top_k": 4}, "penalty_alpha"),
        ({"guidance_scale": 1.5}, "guidance_scale"),
        ({"dola_layers": "low"}, "dola_layers"),
        ({"prefill_chunk_size": 2}, "prefill_chunk_size"),
        ({"output_hidden_states": True, "return_dict_in_generate": True}, "output_hidden_states"),
    ],
)
def test_generate_arguments_a_strategy_cannot_honour_are_refused(llama, kwargs, name):
    model, _ = llama
    with pytest.raises(ValueError, match=name):
        model.generate(torch.tensor([[5, 6, 7, 5, 6]]), max_new_tokens=3, custom_generate=FLy(), **kwargs)


def test_assistant_model_with_a_strategy_is_refused(llama):
    model, _ = llama
    draft, _ = tiny_model("llama", seed=1)
    with pytest.raises(ValueError, match="assistant_model"):
        model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=3, custom_generate=SpeculativeDecoding(),
                       assistant_model=draft)


def test_generate_arguments_that_work_are_still_accepted(llama):
    model, _ = llama
    ids = torch.tensor([[5, 6, 7, 5, 6, 7]])
    out = model.generate(ids, max_new_tokens=3, custom_generate=FLy(entropy_threshold=0.0, window=1), do_sample=True,
                         num_return_sequences=2)
    assert out.shape == (2, 9)
    greedy = model.generate(ids, max_new_tokens=4, do_sample=False, repetition_penalty=1.2)
    assert torch.equal(model.generate(ids, max_new_tokens=4, do_sample=False, repetition_penalty=1.2,
                                      custom_generate=SpeculativeDecoding()), greedy)


# ------------------------------------------------------------------------------------------------ caches


def test_spark_cache_checks_the_config_before_touching_it(llama):
    model, _ = llama
    with pytest.raises(TypeError, match=r"pass model\.config"):
        SparKCache(model)
    for model_type in ("t5", "bert"):
        config = AutoConfig.for_model(model_type)
        before = config._attn_implementation
        with pytest.raises(ValueError, match="config: SparKCache serves decoder-only causal LMs"):
            SparKCache(config)
        assert config._attn_implementation == before  # untouched
    with pytest.raises(TypeError, match="channel_ratio"):
        SparKCache(model.config, channel_ratio="0.5")
    with pytest.raises(ValueError, match="channel_ratio"):
        StructuredChannelCache(model.config, channel_ratio=NAN)
    with pytest.raises(TypeError, match="recovery"):
        SparKCache(model.config, recovery=1)
    with pytest.raises(TypeError, match="token_budget"):
        SparKCache(model.config, token_budget=40.5)
    assert SparKCache(model.config, channel_ratio=0, recent_window=0).settings["channel_ratio"] == 0


# ------------------------------------------------------------------------------------------------ entry points


def test_entry_points_check_their_numbers(llama, tmp_path):
    model, tokenizer = llama
    texts = ["some text to score. " * 20]
    with pytest.raises(TypeError, match="window"):
        evaluate_perplexity(model, tokenizer, texts, window=2.5, progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        evaluate_perplexity(model, tokenizer, texts, window=8, batch_size=0, progress=False)
    with pytest.raises(TypeError, match="prompts"):
        measure_generation_speed(model, tokenizer, "abc", progress=False)
    with pytest.raises(ValueError, match="max_new_tokens"):
        measure_generation_speed(model, tokenizer, ["abc"], max_new_tokens=0, progress=False)
    with pytest.raises(ValueError, match="seq_len"):
        measure_kv_cache_bytes(model, seq_len=0)
    with pytest.raises(TypeError, match="calibration"):
        load_calibration_text(5)
    with pytest.raises(TypeError, match="skip"):
        quantize_rtn(tiny_model("llama")[0], skip=5)
    pruner = WandaPruner(model, tokenizer)
    with pytest.raises(TypeError, match="save_dir"):
        pruner.prune(WandaConfig(num_calibration_sequences=2, calibration_seq_len=16), texts, save_dir=123)
    with pytest.raises(TypeError, match="model_or_path"):
        WandaPruner.from_pretrained(123)
    assert evaluate_perplexity(model, tokenizer, texts, window=8, max_windows=2, progress=False)["windows"] == 2


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["eval", "--window", "1"], "--window"),
        (["quantize", "dlqat", "--save-dir", "x", "--steps", "0"], "--steps"),
        (["quantize", "dlqat", "--save-dir", "x", "--learning-rate", "nan"], "--learning-rate"),
        (["prune", "wanda", "--save-dir", "x", "--options", "{bad"], "--options"),
        (["prune", "wanda", "--save-dir", "x", "--options", '{"nope": 1}'], "--options"),
        (["eval", "--model", "tiny-llama", "--perplexity", "c4"], "perplexity"),
    ],
)
def test_cli_names_the_flag(argv, flag, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            code = main(["-q", *argv])
        except SystemExit as exit_:
            code = exit_.code
    assert code == 2
    assert flag in err.getvalue().splitlines()[-1]
    assert not (tmp_path / "x").exists()  # refused before any work


def test_nan_never_reaches_a_model():
    with pytest.raises(ValueError):
        DLQATConfig(lora_alpha=math.nan)
