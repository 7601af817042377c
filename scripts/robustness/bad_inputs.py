"""The bad-input matrix: every public config, constructor, entry point and CLI command given bad values.

Each :class:`~robustness.common.Case` must either raise a clear error (an expected exception type whose
message names the argument) or, for the ``valid=True`` edge inputs, be accepted. Everything runs on tiny
random models, offline (no Hub call: bad repo ids and folders fail before any), in well under two minutes
on two CPU cores.

Example:
    >>> rows = run_cases(cases(pathlib.Path(tempfile.mkdtemp())))  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach the Hub

from .common import Case

NAN, INF = float("nan"), float("inf")


# ------------------------------------------------------------------------------------------- shared objects


@functools.cache
def _tiny(arch: str = "llama", seed: int = 0):
    """One tiny model per (arch, seed), shared by every case that only reads it."""
    from hf_compress.assets import tiny_model

    return tiny_model(arch, seed=seed)


def _fresh(arch: str = "llama"):
    """A tiny model of its own, for cases that change the model."""
    from hf_compress.assets import tiny_model

    return tiny_model(arch)


def _ids():
    import torch

    return torch.tensor([[5, 6, 7, 5, 6, 7, 5, 6]])


def _texts() -> list[str]:
    return ["calibration text for the robustness matrix, repeated. " * 40]


def _cli(argv: Sequence[str]) -> Callable[[], None]:
    """Run ``hf-compress ARGV``; a non-zero exit raises ``ValueError`` carrying what was printed on stderr, so
    the classifier can check that the message names the flag."""

    def call() -> None:
        from hf_compress.cli.main import main

        err, out = io.StringIO(), io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            try:
                code = main(["-q", *argv])
            except SystemExit as exit_:
                code = exit_.code
        if code not in (0, None):
            # Only the error line(s): argparse's usage text lists every flag and would name them all.
            lines = [line for line in err.getvalue().splitlines() if "error:" in line] or err.getvalue().splitlines()
            raise ValueError(f"exit {code}: {' '.join(lines).strip()}")

    return call


def _gen(strategy_factory: Callable[[], Any], **kwargs: Any) -> Callable[[], Any]:
    def call():
        model, _ = _tiny()
        return model.generate(_ids(), max_new_tokens=4, custom_generate=strategy_factory(), **kwargs)

    return call


# ------------------------------------------------------------------------------------------------- groups


def _pruning_configs() -> list[Case]:
    from hf_compress.pruning import (
        BlockRemovalConfig,
        MagnitudeConfig,
        PruningConfig,
        SDSConfig,
        SparseGPTConfig,
        TyrConfig,
        WandaConfig,
    )

    bad: list[tuple[str, Callable[[], Any], Sequence[str]]] = [
        ("wanda sparsity=1.5", lambda: WandaConfig(sparsity=1.5), ["sparsity"]),
        ("wanda sparsity='3:2'", lambda: WandaConfig(sparsity="3:2"), ["sparsity"]),
        ("wanda sparsity=nan", lambda: WandaConfig(sparsity=NAN), ["sparsity"]),
        ("wanda sparsity=True", lambda: WandaConfig(sparsity=True), ["sparsity"]),
        ("wanda sparsity=[0.5]", lambda: WandaConfig(sparsity=[0.5]), ["sparsity"]),
        ("wanda skip=[1]", lambda: WandaConfig(skip=[1]), ["skip"]),
        ("wanda skip=None", lambda: WandaConfig(skip=None), ["skip"]),
        ("wanda num_calibration_sequences=0", lambda: WandaConfig(num_calibration_sequences=0),
         ["num_calibration_sequences"]),
        ("wanda calibration_seq_len='512'", lambda: WandaConfig(calibration_seq_len="512"), ["calibration_seq_len"]),
        ("wanda batch_size=-1", lambda: WandaConfig(batch_size=-1), ["batch_size"]),
        ("wanda calibration_seed=1.5", lambda: WandaConfig(calibration_seed=1.5), ["calibration_seed"]),
        ("magnitude sparsity='-10%'", lambda: MagnitudeConfig(sparsity="-10%"), ["sparsity"]),
        ("sparsegpt blocksize=0", lambda: SparseGPTConfig(blocksize=0), ["blocksize"]),
        ("sparsegpt percdamp=inf", lambda: SparseGPTConfig(percdamp=INF), ["percdamp"]),
        ("sparsegpt percdamp='0.01'", lambda: SparseGPTConfig(percdamp="0.01"), ["percdamp"]),
        ("sds base='tyr'", lambda: SDSConfig(base="tyr"), ["base"]),
        ("sds redense_epochs=-1", lambda: SDSConfig(redense_epochs=-1), ["redense_epochs"]),
        ("sds redense_learning_rate=0", lambda: SDSConfig(redense_learning_rate=0), ["redense_learning_rate"]),
        ("sds sparse_regularization=nan", lambda: SDSConfig(sparse_regularization=NAN), ["sparse_regularization"]),
        ("sds anchor_regularization=-0.1", lambda: SDSConfig(anchor_regularization=-0.1), ["anchor_regularization"]),
        ("sds sparse_regularization_target='some'", lambda: SDSConfig(sparse_regularization_target="some"),
         ["sparse_regularization_target"]),
        ("sds base_options=list", lambda: SDSConfig(base_options=[("percdamp", 0.1)]), ["base_options"]),
        ("sds base_options percdamp=-1", lambda: SDSConfig(base_options={"percdamp": -1}), ["percdamp"]),
        ("sds base_options sets sparsity", lambda: SDSConfig(base_options={"sparsity": 0.3}), ["sparsity"]),
        ("sds revert_if_worse='yes'", lambda: SDSConfig(revert_if_worse="yes"), ["revert_if_worse"]),
        ("sds final_tuning_learning_rate=-1", lambda: SDSConfig(final_tuning_learning_rate=-1),
         ["final_tuning_learning_rate"]),
        ("sds final_tuning_epochs=1.5", lambda: SDSConfig(final_tuning_epochs=1.5), ["final_tuning_epochs"]),
        ("tyr target_sparsity=1.0", lambda: TyrConfig(target_sparsity=1.0), ["target_sparsity"]),
        ("tyr target_sparsity='2:4'", lambda: TyrConfig(target_sparsity="2:4"), ["ratio", "target_sparsity"]),
        ("tyr target_sparsity=nan", lambda: TyrConfig(target_sparsity=NAN), ["target_sparsity"]),
        ("tyr num_levels=4", lambda: TyrConfig(num_levels=4), ["num_levels"]),
        ("tyr initial_step=0.9", lambda: TyrConfig(initial_step=0.9), ["initial_step"]),
        ("tyr initial_step='0.1'", lambda: TyrConfig(initial_step="0.1"), ["initial_step"]),
        ("tyr damping=1.0", lambda: TyrConfig(damping=1.0), ["damping"]),
        ("tyr generations=0", lambda: TyrConfig(generations=0), ["generations"]),
        ("tyr allocation='random'", lambda: TyrConfig(allocation="random"), ["allocation"]),
        ("tyr propagation='median'", lambda: TyrConfig(propagation="median"), ["propagation"]),
        ("tyr selection_tokens decreasing", lambda: TyrConfig(selection_tokens=(4096, 1024)), ["selection_tokens"]),
        ("tyr selection_survivors too short", lambda: TyrConfig(selection_survivors=(8,)), ["selection_survivors"]),
        ("tyr selection_tokens='abc'", lambda: TyrConfig(selection_tokens="abc"), ["selection_tokens"]),
        ("tyr kl_topk=1.5", lambda: TyrConfig(kl_topk=1.5), ["kl_topk"]),
        ("tyr search_seed='0'", lambda: TyrConfig(search_seed="0"), ["search_seed"]),
        ("tyr pool too small", lambda: TyrConfig(num_search_sequences=1, calibration_seq_len=16),
         ["num_search_sequences"]),
        ("block_removal target_sparsity=0", lambda: BlockRemovalConfig(target_sparsity=0), ["target_sparsity"]),
        ("block_removal skip", lambda: BlockRemovalConfig(skip=["mlp.*"]), ["skip"]),
        ("from_dict unknown method", lambda: PruningConfig.from_dict({"method": "nope"}), ["method"]),
        ("from_dict unknown field", lambda: PruningConfig.from_dict({"method": "wanda", "blocksize": 3}),
         ["blocksize"]),
    ]
    valid = [
        ("wanda sparsity='50%'", lambda: WandaConfig(sparsity="50%")),
        ("sparsegpt 2:4 percdamp=1", lambda: SparseGPTConfig(sparsity="2:4", percdamp=1)),
        ("tyr target '30%' num_levels=3", lambda: TyrConfig(target_sparsity="30%", num_levels=3)),
        ("sds redense_epochs=0, seed=-1", lambda: SDSConfig(redense_epochs=0, calibration_seed=-1)),
    ]
    return [Case("pruning_config", n, c, names) for n, c, names in bad] + [
        Case("pruning_config", n, c, valid=True) for n, c in valid
    ]


def _pruners(workdir: pathlib.Path) -> list[Case]:
    import torch

    from hf_compress.pruning import (
        MagnitudeConfig,
        MagnitudePruner,
        SparseGPTConfig,
        TyrConfig,
        TyrPruner,
        WandaConfig,
        WandaPruner,
    )

    def wanda() -> WandaPruner:
        model, tokenizer = _tiny()
        return WandaPruner(model, tokenizer)

    small = WandaConfig(sparsity=0.5, num_calibration_sequences=2, calibration_seq_len=16)
    a_file = workdir / "a_file"
    a_file.write_text("not a folder")
    bad = [
        ("from_pretrained(123)", lambda: WandaPruner.from_pretrained(123), ["model_or_path"]),
        ("from_pretrained unknown name", lambda: WandaPruner.from_pretrained("no-such-model"), ["model"]),
        ("pruner of a string", lambda: WandaPruner("model"), ["model"]),
        ("pruner tokenizer='tok'", lambda: WandaPruner(_tiny()[0], tokenizer="tok"), ["tokenizer"]),
        ("prune(None)", lambda: wanda().prune(None), ["config"]),
        ("prune(SparseGPTConfig)", lambda: wanda().prune(SparseGPTConfig()), ["config"]),
        ("prune('3:2')", lambda: wanda().prune("3:2"), ["sparsity"]),
        ("prune without calibration", lambda: wanda().prune(small), ["calibration_dataset"]),
        ("prune calibration_dataset=123", lambda: wanda().prune(small, 123), ["calibration_dataset"]),
        ("prune calibration_dataset=[]", lambda: wanda().prune(small, []), ["calibration_dataset"]),
        ("prune float token ids", lambda: wanda().prune(small, torch.zeros(2, 16)), ["calibration"]),
        ("prune save_dir=123", lambda: wanda().prune(small, _texts(), save_dir=123), ["save_dir"]),
        ("prune save_dir is a file", lambda: wanda().prune(small, _texts(), save_dir=a_file), ["save_dir"]),
        ("prune overwrite='yes'", lambda: wanda().prune(small, _texts(), overwrite="yes"), ["overwrite"]),
        ("prune progress=None", lambda: wanda().prune(small, _texts(), progress=None), ["progress"]),
        ("tyr prune work_dir=123", lambda: TyrPruner(*_tiny()).prune(TyrConfig(), _texts(), work_dir=123),
         ["work_dir"]),
        ("magnitude skip pattern matching nothing", lambda: MagnitudePruner(*_fresh()).prune(
            MagnitudeConfig(sparsity="2:4", skip=["*down-proj"]), progress=False), ["skip"]),
        ("tyr on gpt2 (fused c_attn)", lambda: TyrPruner(*_fresh("gpt2")).prune(
            TyrConfig(num_calibration_sequences=2, calibration_seq_len=16, num_search_sequences=1200), _texts()),
         ["c_attn"]),
    ]
    valid = [
        ("magnitude prune a fresh model", lambda: MagnitudePruner(*_fresh()).prune(MagnitudeConfig(sparsity="2:4"),
                                                                                     progress=False)),
    ]
    return [Case("pruner", n, c, names) for n, c, names in bad] + [Case("pruner", n, c, valid=True) for n, c in valid]


def _quantization() -> list[Case]:
    from hf_compress.quantization import DLQATConfig, quantize_rtn

    def merge_other():
        from peft import get_peft_model

        model = get_peft_model(_fresh()[0], DLQATConfig(bits=4, group_size=32, r=2))
        return model.merge_and_quantize(adapter_name="other")

    def no_target():
        from peft import get_peft_model

        return get_peft_model(_fresh()[0], DLQATConfig(target_modules=["no_such_proj"]))

    def _nan_weight():
        model = _fresh()[0]
        model.model.layers[0].mlp.up_proj.weight.data[0, 0] = NAN
        return model

    def diverged_export():
        from peft import get_peft_model

        model = get_peft_model(_fresh()[0], DLQATConfig(bits=4, group_size=32, r=2))
        next(p for n, p in model.named_parameters() if "dlqat_B" in n).data.fill_(NAN)
        return model.merge_and_quantize()

    bad = [
        ("lora_alpha=nan", lambda: DLQATConfig(lora_alpha=NAN), ["lora_alpha"]),
        ("lora_alpha=-1", lambda: DLQATConfig(lora_alpha=-1), ["lora_alpha"]),
        ("lora_alpha=inf", lambda: DLQATConfig(lora_alpha=INF), ["lora_alpha"]),
        ("lora_alpha='16'", lambda: DLQATConfig(lora_alpha="16"), ["lora_alpha"]),
        ("r=0", lambda: DLQATConfig(r=0), ["r must"]),
        ("r=2.5", lambda: DLQATConfig(r=2.5), ["r must"]),
        ("bits=1", lambda: DLQATConfig(bits=1), ["bits"]),
        ("bits=9", lambda: DLQATConfig(bits=9), ["bits"]),
        ("bits='4'", lambda: DLQATConfig(bits="4"), ["bits"]),
        ("group_size=0", lambda: DLQATConfig(group_size=0), ["group_size"]),
        ("group_size=-2", lambda: DLQATConfig(group_size=-2), ["group_size"]),
        ("lora_space='output'", lambda: DLQATConfig(lora_space="output"), ["lora_space"]),
        ("symmetric='no'", lambda: DLQATConfig(symmetric="no"), ["symmetric"]),
        ("use_lora=None", lambda: DLQATConfig(use_lora=None), ["use_lora"]),
        ("target_modules=5", lambda: DLQATConfig(target_modules=5), ["target_modules"]),
        ("layers_to_transform=[-1]", lambda: DLQATConfig(layers_to_transform=[-1]), ["layers_to_transform"]),
        ("modules_to_save=[1]", lambda: DLQATConfig(modules_to_save=[1]), ["modules_to_save"]),
        ("layers_pattern without layers", lambda: DLQATConfig(layers_pattern="layers"), ["layers_pattern"]),
        ("target_modules match nothing", no_target, ["target modules", "target_modules"]),
        ("merge_and_quantize unknown adapter", merge_other, ["adapter"]),
        ("rtn bits=1", lambda: quantize_rtn(_fresh()[0], bits=1), ["bits"]),
        ("rtn group_size='128'", lambda: quantize_rtn(_fresh()[0], group_size="128"), ["group_size"]),
        ("rtn skip=5", lambda: quantize_rtn(_fresh()[0], skip=5), ["skip"]),
        ("rtn symmetric='yes'", lambda: quantize_rtn(_fresh()[0], symmetric="yes"), ["symmetric"]),
        ("rtn of a string", lambda: quantize_rtn("model"), ["model"]),
        ("rtn skip pattern matching nothing", lambda: quantize_rtn(_fresh()[0], skip=["*down-proj"]), ["skip"]),
        ("rtn of a model with a NaN weight", lambda: quantize_rtn(_nan_weight()), ["non-finite"]),
        ("dlqat export of a diverged adapter", diverged_export, ["not finite"]),
    ]
    valid = [
        ("dlqat edge values", lambda: DLQATConfig(bits=2, group_size=-1, r=1, lora_alpha=0.5)),
        ("rtn 8-bit per-channel", lambda: quantize_rtn(_fresh()[0], bits=8, group_size=-1)),
    ]
    return [Case("quantization", n, c, names) for n, c, names in bad] + [
        Case("quantization", n, c, valid=True) for n, c in valid
    ]


def _speculative() -> list[Case]:
    import torch

    from hf_compress.speculative import (
        FLy,
        LooseVerification,
        ModelDrafter,
        NgramDrafter,
        SpeculativeDecoding,
        SpeculativeSampling,
        TypicalAcceptance,
        strategy_from_dict,
    )
    from hf_compress.speculative.heads import Amphista, AmphistaConfig, DraftTree, MedusaConfig

    bad = [
        ("num_draft_tokens=0", lambda: SpeculativeDecoding(num_draft_tokens=0), ["num_draft_tokens"]),
        ("num_draft_tokens=True", lambda: SpeculativeDecoding(num_draft_tokens=True), ["num_draft_tokens"]),
        ("num_draft_tokens='8'", lambda: SpeculativeDecoding(num_draft_tokens="8"), ["num_draft_tokens"]),
        ("draft_model=123", lambda: SpeculativeDecoding(123), ["draft_model"]),
        ("tokenizer without draft_tokenizer", lambda: SpeculativeDecoding(tokenizer=_tiny()[1]), ["tokenizer"]),
        ("draft_tokenizer=5", lambda: SpeculativeDecoding(tokenizer=_tiny()[1], draft_tokenizer=5),
         ["draft_tokenizer"]),
        ("max_ngram_size=0", lambda: SpeculativeDecoding(max_ngram_size=0), ["max_ngram_size"]),
        ("num_ngram_pred_tokens=-1", lambda: SpeculativeDecoding(num_ngram_pred_tokens=-1), ["num_ngram_pred_tokens"]),
        ("use_ngram='yes'", lambda: SpeculativeDecoding(use_ngram="yes"), ["use_ngram"]),
        ("drafter=object()", lambda: SpeculativeDecoding(drafter=object()), ["drafter"]),
        ("acceptance='strict'", lambda: SpeculativeDecoding(acceptance="strict"), ["acceptance"]),
        ("draft_confidence_threshold=1.5", lambda: SpeculativeDecoding(draft_confidence_threshold=1.5),
         ["draft_confidence_threshold"]),
        ("draft_confidence_threshold='0.4'", lambda: SpeculativeDecoding(draft_confidence_threshold="0.4"),
         ["draft_confidence_threshold"]),
        ("FLy draft_confidence_threshold=nan", lambda: FLy(draft_confidence_threshold=NAN),
         ["draft_confidence_threshold"]),
        ("FLy entropy_threshold=-1", lambda: FLy(entropy_threshold=-1), ["entropy_threshold"]),
        ("FLy entropy_threshold=nan", lambda: FLy(entropy_threshold=NAN), ["entropy_threshold"]),
        ("FLy entropy_threshold='0.3'", lambda: FLy(entropy_threshold="0.3"), ["entropy_threshold"]),
        ("FLy entropy_top_k=0", lambda: FLy(entropy_top_k=0), ["entropy_top_k"]),
        ("FLy window=0", lambda: FLy(window=0), ["window"]),
        ("FLy window=2.5", lambda: FLy(window=2.5), ["window"]),
        ("FLy use_window=None", lambda: FLy(use_window=None), ["use_window"]),
        ("FLy loose='no'", lambda: FLy(loose="no"), ["loose"]),
        ("FLy num_draft_tokens=0", lambda: FLy(num_draft_tokens=0), ["num_draft_tokens"]),
        ("LooseVerification num_samples=0", lambda: LooseVerification(num_samples=0), ["num_samples"]),
        ("TypicalAcceptance posterior_threshold=0", lambda: TypicalAcceptance(posterior_threshold=0),
         ["posterior_threshold"]),
        ("TypicalAcceptance posterior_alpha=2", lambda: TypicalAcceptance(posterior_alpha=2), ["posterior_alpha"]),
        ("TypicalAcceptance posterior_alpha='0.3'", lambda: TypicalAcceptance(posterior_alpha="0.3"),
         ["posterior_alpha"]),
        ("SpeculativeSampling generator=0", lambda: SpeculativeSampling(generator=0), ["generator"]),
        ("NgramDrafter max_ngram_size=0", lambda: NgramDrafter(max_ngram_size=0), ["max_ngram_size"]),
        ("NgramDrafter min > max", lambda: NgramDrafter(max_ngram_size=2, min_ngram_size=3), ["min_ngram_size"]),
        ("NgramDrafter num_pred_tokens=0", lambda: NgramDrafter(num_pred_tokens=0), ["num_pred_tokens"]),
        ("ModelDrafter of a string", lambda: ModelDrafter("draft"), ["draft_model"]),
        ("DraftTree([])", lambda: DraftTree([]), ["tree"]),
        ("DraftTree missing parent", lambda: DraftTree([(0, 0)]), ["parent"]),
        ("DraftTree(5)", lambda: DraftTree(5), ["paths"]),
        ("DraftTree negative rank", lambda: DraftTree([(-1,)]), ["rank", "paths"]),
        ("DraftTree.chain(0)", lambda: DraftTree.chain(0), ["depth"]),
        ("DraftTree.from_accuracies num_nodes=0", lambda: DraftTree.from_accuracies(torch.ones(2, 2), 0),
         ["num_nodes"]),
        ("strategy_from_dict unknown method", lambda: strategy_from_dict({"method": "nope"}), ["strategy", "method"]),
        ("strategy_from_dict('fly')", lambda: strategy_from_dict("fly"), ["settings"]),
        ("strategy_from_dict window=0", lambda: strategy_from_dict({"method": "fly", "window": 0}), ["window"]),
        ("strategy_from_dict unknown knob", lambda: strategy_from_dict({"method": "fly", "bogus": 1}), ["bogus"]),
        ("generate assistant_model", _gen(FLy, assistant_model=_tiny("llama", 1)[0]), ["assistant_model"]),
        ("generate prompt_lookup_num_tokens", _gen(FLy, prompt_lookup_num_tokens=3), ["prompt_lookup_num_tokens"]),
        ("generate num_beams=2", _gen(SpeculativeDecoding, num_beams=2), ["num_beams", "beam"]),
        ("generate contrastive search", _gen(FLy, penalty_alpha=0.6, top_k=4), ["penalty_alpha"]),
        ("generate guidance_scale", _gen(SpeculativeDecoding, guidance_scale=1.5), ["guidance_scale"]),
        ("generate dola_layers", _gen(FLy, dola_layers="low"), ["dola_layers"]),
        ("generate output_attentions", _gen(FLy, output_attentions=True, return_dict_in_generate=True),
         ["output_attentions"]),
        ("generate static cache", _gen(FLy, cache_implementation="static"), ["cache"]),
        ("generate use_cache=False", _gen(FLy, use_cache=False), ["use_cache"]),
        ("heads num_heads=0", lambda: AmphistaConfig(num_heads=0), ["num_heads"]),
        ("heads num_heads='4'", lambda: AmphistaConfig(num_heads="4"), ["num_heads"]),
        ("heads top_k=0", lambda: AmphistaConfig(top_k=0), ["top_k"]),
        ("heads loss_decay=0", lambda: AmphistaConfig(loss_decay=0), ["loss_decay"]),
        ("heads loss_decay=nan", lambda: AmphistaConfig(loss_decay=NAN), ["loss_decay"]),
        ("heads num_stages=0", lambda: AmphistaConfig(num_stages=0), ["num_stages"]),
        ("heads stage_feeds='first'", lambda: AmphistaConfig(stage_feeds="first"), ["stage_feeds"]),
        ("heads num_attention_heads=0", lambda: AmphistaConfig(num_attention_heads=0, hidden_size=64),
         ["num_attention_heads"]),
        ("heads hidden_size % heads", lambda: AmphistaConfig(num_attention_heads=5, hidden_size=64),
         ["num_attention_heads"]),
        ("heads intermediate_size=0", lambda: AmphistaConfig(intermediate_size=0), ["intermediate_size"]),
        ("heads share_lm_head='yes'", lambda: AmphistaConfig(share_lm_head="yes"), ["share_lm_head"]),
        ("heads tree='x'", lambda: AmphistaConfig(tree="x"), ["tree"]),
        ("heads tree rank >= top_k", lambda: AmphistaConfig(tree=[(0,), (5,)], top_k=3), ["top_k"]),
        ("medusa num_layers=0", lambda: MedusaConfig(num_layers=0), ["num_layers"]),
        ("medusa initializer_range=-1", lambda: MedusaConfig(initializer_range=-1), ["initializer_range"]),
        ("Amphista() without heads", lambda: Amphista(), ["heads"]),
        ("Amphista(heads=5)", lambda: Amphista(5), ["heads"]),
        ("Amphista tree='wide'", lambda: Amphista("user/heads", tree="wide"), ["tree"]),
        ("Amphista tree missing parent", lambda: Amphista("user/heads", tree=[(0, 0)]), ["tree"]),
        ("Amphista posterior_alpha=0", lambda: Amphista("user/heads", posterior_alpha=0), ["posterior_alpha"]),
    ]
    valid = [
        ("FLy gate off, window=1", lambda: FLy(entropy_threshold=0.0, window=1)),
        ("sampling with num_return_sequences=2",
         _gen(lambda: SpeculativeDecoding(_tiny("llama", 1)[0]), do_sample=True, num_return_sequences=2)),
        ("heads one head, loss_decay=1", lambda: AmphistaConfig(num_heads=1, loss_decay=1)),
    ]
    return [Case("speculative", n, c, names) for n, c, names in bad] + [
        Case("speculative", n, c, valid=True) for n, c in valid
    ]


def _caches() -> list[Case]:
    from transformers import AutoConfig

    from hf_compress.cache import (
        ChannelPrunedLayer,
        SparKCache,
        StructuredChannelCache,
        install_query_capture,
    )

    def config():
        return _fresh()[0].config  # query capture is installed on it: a model of its own

    bad = [
        ("SparKCache(model)", lambda: SparKCache(_fresh()[0]), ["model.config"]),
        ("SparKCache('config')", lambda: SparKCache("config"), ["config"]),
        ("SparKCache(T5 config)", lambda: SparKCache(AutoConfig.for_model("t5")), ["config"]),
        ("SparKCache(BERT config)", lambda: SparKCache(AutoConfig.for_model("bert")), ["config"]),
        ("channel_ratio='0.5'", lambda: SparKCache(config(), channel_ratio="0.5"), ["channel_ratio"]),
        ("channel_ratio=1.0", lambda: SparKCache(config(), channel_ratio=1.0), ["channel_ratio"]),
        ("channel_ratio=nan", lambda: SparKCache(config(), channel_ratio=NAN), ["channel_ratio"]),
        ("value_channel_ratio=-0.1", lambda: SparKCache(config(), value_channel_ratio=-0.1), ["value_channel_ratio"]),
        ("observation_window=0", lambda: SparKCache(config(), observation_window=0), ["observation_window"]),
        ("recent_window=-1", lambda: SparKCache(config(), recent_window=-1), ["recent_window"]),
        ("token_budget=8", lambda: SparKCache(config(), token_budget=8), ["token_budget"]),
        ("token_budget=40.5", lambda: SparKCache(config(), token_budget=40.5), ["token_budget"]),
        ("recovery='yes'", lambda: SparKCache(config(), recovery="yes"), ["recovery"]),
        ("compression_interval=0", lambda: SparKCache(config(), compression_interval=0), ["compression_interval"]),
        ("compression_interval=2.5", lambda: SparKCache(config(), compression_interval=2.5), ["compression_interval"]),
        ("StructuredChannelCache channel_ratio=2", lambda: StructuredChannelCache(config(), channel_ratio=2),
         ["channel_ratio"]),
        ("install_query_capture(model)", lambda: install_query_capture(_fresh()[0]), ["config"]),
        ("ChannelPrunedLayer num_kv_heads=0", lambda: ChannelPrunedLayer(0.5, num_kv_heads=0, head_dim=16),
         ["num_kv_heads"]),
    ]
    valid = [("SparKCache ratio 0, recent_window 0", lambda: SparKCache(config(), channel_ratio=0.0, recent_window=0)),
             ("SparKCache compression_interval 1", lambda: SparKCache(config(), compression_interval=1))]
    return [Case("cache", n, c, names) for n, c, names in bad] + [Case("cache", n, c, valid=True) for n, c in valid]


def _experts() -> list[Case]:
    from hf_compress.experts import ExpertConfig, select_data, train_experts
    from hf_compress.training import TrainingSettings

    rows = [{"prompt": f"Question {i}?", "completion": f" answer {i}"} for i in range(6)]

    def train(config: ExpertConfig, **kwargs: Any) -> Callable[[], Any]:
        def call():
            model, tokenizer = _fresh()
            return train_experts(model, rows, config, args=TrainingSettings(max_steps=2, use_cpu=True),
                                 tokenizer=tokenizer, **kwargs)
        return call

    def select(budget: float) -> Callable[[], Any]:
        def call():
            model, tokenizer = _fresh()
            return select_data(rows, model, budget, tokenizer=tokenizer)
        return call

    bad = [
        ("ExpertConfig num_experts=0", lambda: ExpertConfig(num_experts=0), ["num_experts"]),
        ("ExpertConfig r=0", lambda: ExpertConfig(r=0), ["r"]),
        ("ExpertConfig shared_warmup=1.0", lambda: ExpertConfig(shared_warmup=1.0), ["shared_warmup"]),
        ("ExpertConfig shared_warmup=-0.1", lambda: ExpertConfig(shared_warmup=-0.1), ["shared_warmup"]),
        ("ExpertConfig unknown field", lambda: ExpertConfig.from_dict({"experts": 4}), ["experts"]),
        ("select_data budget=0", select(0.0), ["budget"]),
        ("select_data budget=1.5", select(1.5), ["budget"]),
        ("train_experts more experts than examples", train(ExpertConfig(num_experts=7)), ["num_experts"]),
        ("train_experts an empty cluster", train(ExpertConfig(num_experts=3), clusters=[0, 0, 2, 2, 0, 2]), ["empty"]),
        ("train_experts clusters of the wrong length", train(ExpertConfig(num_experts=2), clusters=[0, 1]),
         ["clusters"]),
        ("train_experts config=dict", train({"num_experts": 2}), ["ExpertConfig"]),
    ]
    return [Case("experts", n, c, names) for n, c, names in bad]


def _evaluation() -> list[Case]:
    import torch

    from hf_compress.evaluation import (
        disk_bytes,
        evaluate_perplexity,
        evaluate_zero_shot,
        measure_generation_speed,
        measure_kv_cache_bytes,
        parameter_bytes,
        token_windows,
    )
    from hf_compress.evaluation.squad import squad_documents
    from hf_compress.evaluation.suite import EvaluationSettings

    def ppl(**kwargs):
        model, tokenizer = _tiny()
        return evaluate_perplexity(model, kwargs.pop("tokenizer", tokenizer), kwargs.pop("texts", _texts()),
                                   progress=False, **kwargs)

    def speed(prompts=("abc",), **kwargs):
        model, tokenizer = _tiny()
        return measure_generation_speed(model, tokenizer, prompts, progress=False, **kwargs)

    def zero_shot(**kwargs):
        model, tokenizer = _tiny()
        return evaluate_zero_shot(model, tokenizer, progress=False, **{"tasks": ("arc_easy",), **kwargs})

    bad = [
        ("perplexity window=1", lambda: ppl(window=1), ["window"]),
        ("perplexity window=2.5", lambda: ppl(window=2.5), ["window"]),
        ("perplexity max_windows=0", lambda: ppl(max_windows=0), ["max_windows"]),
        ("perplexity batch_size=0", lambda: ppl(batch_size=0), ["batch_size"]),
        ("perplexity texts is one string", lambda: ppl(texts="one document"), ["documents", "texts"]),
        ("perplexity texts=[1, 2]", lambda: ppl(texts=[1, 2]), ["texts"]),
        ("perplexity tokenizer=None", lambda: ppl(tokenizer=None), ["tokenizer"]),
        ("perplexity text shorter than a window", lambda: ppl(texts=["ab"], window=64), ["window"]),
        ("token_windows window=0", lambda: token_windows(torch.arange(10), 0), ["window"]),
        ("speed prompts=[]", lambda: speed([]), ["prompts"]),
        ("speed prompts='abc'", lambda: speed("abc"), ["prompts"]),
        ("speed max_new_tokens=0", lambda: speed(max_new_tokens=0), ["max_new_tokens"]),
        ("speed warmup=-1", lambda: speed(warmup=-1), ["warmup"]),
        ("speed cache_factory=5", lambda: speed(cache_factory=5), ["cache_factory"]),
        ("speed reference length", lambda: speed(reference=[[1], [2]]), ["reference"]),
        ("kv bytes seq_len=0", lambda: measure_kv_cache_bytes(_tiny()[0], seq_len=0), ["seq_len"]),
        ("kv bytes batch_size=0", lambda: measure_kv_cache_bytes(_tiny()[0], seq_len=8, batch_size=0),
         ["batch_size"]),
        ("zero-shot unknown task", lambda: zero_shot(tasks=("nope",)), ["task"]),
        ("zero-shot batch_size=0", lambda: zero_shot(batch_size=0), ["batch_size"]),
        ("zero-shot backend='vllm'", lambda: zero_shot(backend="vllm"), ["backend"]),
        ("zero-shot limit=-1", lambda: zero_shot(limit=-1), ["limit"]),
        ("settings window=1", lambda: EvaluationSettings(window=1), ["window"]),
        ("settings perplexity_sets=('c4',)", lambda: EvaluationSettings(perplexity_sets=("c4",)), ["perplexity_sets"]),
        ("settings max_new_tokens=0", lambda: EvaluationSettings(max_new_tokens=0), ["max_new_tokens"]),
        ("settings zero_shot_limit=-5", lambda: EvaluationSettings(zero_shot_limit=-5), ["zero_shot_limit"]),
        ("settings speed_prompts=-1", lambda: EvaluationSettings(speed_prompts=-1), ["speed_prompts"]),
        ("disk_bytes missing folder", lambda: disk_bytes("/no/such/folder"), ["folder"]),
        ("parameter_bytes of a string", lambda: parameter_bytes("model"), ["model"]),
        ("squad_documents count=-1", lambda: squad_documents(count=-1), ["count"]),
    ]
    valid = [
        ("settings with nothing to run", lambda: EvaluationSettings(perplexity_sets=(), zero_shot_tasks=(), window=2)),
        ("perplexity two windows of 8", lambda: ppl(window=8, max_windows=2, batch_size=1)),
        ("speed one token, no warm-up", lambda: speed(max_new_tokens=1, warmup=0)),
    ]
    return [Case("evaluation", n, c, names) for n, c, names in bad] + [
        Case("evaluation", n, c, valid=True) for n, c in valid
    ]


def _hub(workdir: pathlib.Path) -> list[Case]:
    from hf_compress.hub import (
        build_model_card,
        load_card,
        push_to_hub,
        validate_model_card,
        write_model_card,
    )

    empty = workdir / "empty"
    empty.mkdir()
    no_card = workdir / "no_card"
    no_card.mkdir()
    (no_card / "config.json").write_text("{}")
    with_card = workdir / "with_card"
    with_card.mkdir()
    (with_card / "config.json").write_text("{}")

    def card(**kwargs):
        return build_model_card(**{"base_model": "org/base", "model_name": "m", "recipe": {"method": "wanda"},
                                   **kwargs})

    write_model_card(with_card, card())
    bare = workdir / "bare.md"
    bare.write_text("# no metadata\n")
    bad = [
        ("card recipe without method", lambda: card(recipe={"sparsity": 0.5}), ["method"]),
        ("card recipe with nan", lambda: card(recipe={"method": "wanda", "sparsity": NAN}), ["recipe"]),
        ("card unknown template", lambda: card(template="nope"), ["template"]),
        ("card library without snippet", lambda: card(library_name="mylib"), ["load_snippet", "library_name"]),
        ("load_card missing", lambda: load_card(workdir / "missing"), ["model card"]),
        ("validate card without YAML", lambda: validate_model_card(bare), ["metadata", "YAML"]),
        ("push missing folder", lambda: push_to_hub(workdir / "missing", "me/x"), ["folder", "directory"]),
        ("push empty folder", lambda: push_to_hub(empty, "me/x"), ["empty"]),
        ("push folder without card", lambda: push_to_hub(no_card, "me/x"), ["README", "card"]),
        ("push create_pr with revision", lambda: push_to_hub(with_card, "me/x", create_pr=True, revision="dev"),
         ["revision", "create_pr"]),
        ("push bad repo id", lambda: push_to_hub(with_card, "a/b/c"), ["repo id", "repo_id"]),
    ]
    valid = [("card with every default", lambda: card())]
    return [Case("hub", n, c, names) for n, c, names in bad] + [Case("hub", n, c, valid=True) for n, c in valid]


def _assets(workdir: pathlib.Path) -> list[Case]:
    from hf_compress.assets import (
        load_calibration_text,
        load_model,
        load_reference_model,
        load_text,
        load_zero_shot_task,
        speed_prompts,
        tiny_config,
        tiny_model,
    )

    empty_text = workdir / "empty.txt"
    empty_text.write_text("\n\n")
    bad = [
        ("tiny_model('bert')", lambda: tiny_model("bert"), ["architecture", "arch"]),
        ("tiny_model(seed='1')", lambda: tiny_model(seed="1"), ["seed"]),
        ("tiny_model save_dir=5", lambda: tiny_model(save_dir=5), ["save_dir"]),
        ("tiny_config(['llama'])", lambda: tiny_config(["llama"]), ["architecture", "arch"]),
        ("calibration text 5", lambda: load_calibration_text(5), ["calibration"]),
        ("calibration text missing file", lambda: load_calibration_text(workdir / "missing.txt"), ["calibration"]),
        ("calibration text empty file", lambda: load_calibration_text(empty_text), ["empty"]),
        ("load_text('c4')", lambda: load_text("c4"), ["text set", "name"]),
        ("load_text split='test'", lambda: load_text("wikipedia", "test"), ["split"]),
        ("reference model 'gpt-5'", lambda: load_reference_model("gpt-5"), ["reference model"]),
        ("load_model unknown name", lambda: load_model("not-a-model"), ["model"]),
        ("load_model(5)", lambda: load_model(5), ["name_or_path"]),
        ("load_model dtype='half'", lambda: load_model("tiny-llama", dtype="half"), ["dtype"]),
        ("speed_prompts(-1)", lambda: speed_prompts(-1), ["count"]),
        ("speed_prompts chars=0", lambda: speed_prompts(1, chars=0), ["chars"]),
        ("zero-shot task 'nope'", lambda: load_zero_shot_task("nope"), ["zero-shot task"]),
        ("zero-shot limit=-1", lambda: load_zero_shot_task("arc_easy", limit=-1), ["limit"]),
        ("zero-shot limit='5'", lambda: load_zero_shot_task("arc_easy", limit="5"), ["limit"]),
    ]
    valid = [("tiny gpt2 seed 3", lambda: tiny_model("gpt2", seed=3)), ("tiny config override",
                                                                          lambda: tiny_config("qwen3", num_hidden_layers=1))]
    return [Case("assets", n, c, names) for n, c, names in bad] + [Case("assets", n, c, valid=True) for n, c in valid]


def _cli_cases(workdir: pathlib.Path) -> list[Case]:
    out = str(workdir / "cli-out")
    adapter = str(workdir / "cli-adapter")
    missing_text = str(workdir / "missing.txt")
    prune = ["prune", "wanda", "--model", "tiny-llama", "--save-dir", out]
    quantize = ["--model", "tiny-llama", "--save-dir", out]
    no_eval = ["--model", "tiny-llama", "--perplexity", "", "--tasks", ""]
    bad = [
        ("unknown command", ["nope"], ["command", "nope"]),
        ("prune unknown method", ["prune", "nope", "--save-dir", out], ["METHOD", "nope"]),
        ("prune without --save-dir", ["prune", "wanda", "--model", "tiny-llama"], ["--save-dir"]),
        ("prune --sparsity 3:2", [*prune, "--sparsity", "3:2"], ["sparsity"]),
        ("prune --sparsity 150%", [*prune, "--sparsity", "150%"], ["sparsity"]),
        ("prune --batch-size abc", [*prune, "--batch-size", "abc"], ["--batch-size"]),
        ("prune --batch-size 0", [*prune, "--batch-size", "0"], ["batch_size", "batch-size"]),
        ("prune --seq-len -5", [*prune, "--seq-len", "-5"], ["calibration_seq_len", "seq-len"]),
        ("prune --options '{bad'", [*prune, "--options", "{bad"], ["--options"]),
        ("prune --options '[1]'", [*prune, "--options", "[1]"], ["--options"]),
        ("prune --options unknown field", [*prune, "--options", '{"nope": 1}'], ["--options"]),
        ("prune --calibration-text missing", [*prune, "--calibration-text", missing_text], ["calibration text"]),
        ("prune sparsegpt --percdamp nan", ["prune", "sparsegpt", "--save-dir", out, "--percdamp", "nan"],
         ["percdamp"]),
        ("prune sds --base tyr", ["prune", "sds", "--save-dir", out, "--base", "tyr"], ["--base"]),
        ("prune tyr --num-levels 4", ["prune", "tyr", "--save-dir", out, "--num-levels", "4"], ["num_levels"]),
        ("prune tyr --allocation random", ["prune", "tyr", "--save-dir", out, "--allocation", "random"],
         ["allocation"]),
        ("prune block_removal --sparsity 0", ["prune", "block_removal", "--save-dir", out, "--sparsity", "0"],
         ["target_sparsity", "sparsity"]),
        ("quantize unknown method", ["quantize", "gptq", *quantize], ["method", "gptq"]),
        ("quantize --bits 9", ["quantize", "rtn", *quantize, "--bits", "9"], ["bits"]),
        ("quantize --group-size 0", ["quantize", "rtn", *quantize, "--group-size", "0"], ["group_size", "group-size"]),
        ("quantize --steps 0", ["quantize", "dlqat", *quantize, "--steps", "0"], ["--steps"]),
        ("quantize --learning-rate -1", ["quantize", "dlqat", *quantize, "--learning-rate", "-1"], ["--learning-rate"]),
        ("quantize --rank 0", ["quantize", "dlqat", *quantize, "--rank", "0"], ["--rank"]),
        ("quantize --seq-len 1", ["quantize", "dlqat", *quantize, "--seq-len", "1"], ["--seq-len"]),
        ("quantize rtn --adapter-dir", ["quantize", "rtn", *quantize, "--adapter-dir", adapter], ["--adapter-dir"]),
        ("eval --window 1", ["eval", *no_eval, "--window", "1"], ["--window"]),
        ("eval --max-windows 0", ["eval", *no_eval, "--max-windows", "0"], ["--max-windows"]),
        ("eval --limit -1", ["eval", *no_eval, "--limit", "-1"], ["--limit"]),
        ("eval --perplexity c4", ["eval", "--model", "tiny-llama", "--perplexity", "c4"], ["perplexity"]),
        ("eval --tasks nope", ["eval", "--model", "tiny-llama", "--perplexity", "", "--tasks", "nope"], ["tasks"]),
        ("eval --kv-seq-len 0", ["eval", *no_eval, "--kv-seq-len", "0"], ["--kv-seq-len"]),
        ("eval unknown model", ["eval", "--model", "no-such-model", "--tasks", ""], ["model"]),
        ("eval with nothing to measure", ["eval", *no_eval], ["--perplexity", "--tasks"]),
    ]
    valid = [("info", ["info"])]
    return [Case("cli", n, _cli(argv), names) for n, argv, names in bad] + [
        Case("cli", n, _cli(argv), valid=True) for n, argv in valid
    ]


def cases(workdir: pathlib.Path) -> list[Case]:
    """Every bad input (and the few valid edge inputs) of the matrix; ``workdir`` holds the files some need."""
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    return [
        *_pruning_configs(),
        *_pruners(workdir),
        *_quantization(),
        *_speculative(),
        *_caches(),
        *_experts(),
        *_evaluation(),
        *_hub(workdir),
        *_assets(workdir),
        *_cli_cases(workdir),
    ]
