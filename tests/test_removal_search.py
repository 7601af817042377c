"""Whole sub-blocks removed (modeling.sublayers), the greedy removal search, SLEB and BlockPruner."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import hf_compress  # noqa: F401  (registers the slim format)
from hf_compress.assets import tiny_model
from hf_compress.formats.slim import attach_slim_format
from hf_compress.modeling import find_decoder_blocks
from hf_compress.modeling.calibration import calibration_loss, capture_block_inputs, forward_from_block
from hf_compress.modeling.structure import layer_widths, remove_blocks
from hf_compress.modeling.sublayers import remove_sublayers, removed_sublayers, sublayers_switched_off
from hf_compress.pruning import (
    BlockPrunerConfig, BlockPrunerPruner, BlockRemovalConfig, BlockRemovalPruner, SLEBConfig, SLEBPruner,
)
from hf_compress.pruning import removal_search
from hf_compress.pruning.removal_search import greedy_removal


TEXT = ["The quick brown fox jumps over the lazy dog while the cat sleeps in the sun. " * 30]
SMALL = {"num_calibration_sequences": 2, "calibration_seq_len": 32}


def _ids(seed: int = 0, shape: tuple[int, int] = (2, 24)) -> torch.Tensor:
    return torch.randint(3, 250, shape, generator=torch.Generator().manual_seed(seed))


def _model(arch: str = "llama", layers: int = 4):
    extra = {"layer_types": ["sliding_attention", "full_attention"] * (layers // 2)} if arch == "gemma3" else {}
    return tiny_model(arch, num_hidden_layers=layers, **extra)


def _silence(block, kind: str) -> None:
    """Make a sub-block add (almost) nothing, so that removing it barely changes the loss."""
    with torch.no_grad():
        if kind == "mlp":
            block.mlp.down_proj.weight.mul_(1e-4)
        else:
            block.self_attn.o_proj.weight.mul_(1e-4)


# ------------------------------------------------------------------------------- removed sub-blocks


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3", "mistral"])
def test_removed_sublayers_survive_reload_and_cached_generation_matches_uncached(arch, tmp_path):
    model, _ = _model(arch)
    blocks = find_decoder_blocks(model)[1]
    remove_sublayers(blocks[0], attention=True)  # layer 0: the cache reads the sequence length there
    remove_sublayers(blocks[1], mlp=True)
    remove_sublayers(blocks[2], attention=True, mlp=True)
    widths = layer_widths(model)
    assert [w["key_value_heads"] == 0 for w in widths] == [True, False, True, False]
    assert [w["intermediate_size"] == 0 for w in widths] == [False, True, True, False]
    attach_slim_format(model)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert layer_widths(loaded) == widths
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    cached = loaded.generate(ids, max_new_tokens=40, do_sample=False, use_cache=True)  # past gemma3's window of 32
    uncached = loaded.generate(ids, max_new_tokens=40, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


def test_a_block_without_both_sublayers_equals_the_model_without_the_block():
    model, _ = _model("llama", 3)
    shorter = copy.deepcopy(model)
    remove_blocks(shorter, [1])
    remove_sublayers(find_decoder_blocks(model)[1][1], attention=True, mlp=True)
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, shorter(ids).logits)


def test_switching_off_is_undone_and_opt_without_an_mlp_module_is_refused():
    model, _ = _model("qwen3")
    blocks = find_decoder_blocks(model)[1]
    ids = _ids()
    with torch.no_grad():
        before = model(ids).logits
        with sublayers_switched_off(blocks, [(1, "attention"), (2, "mlp")]):
            assert removed_sublayers(blocks[1]) == {"attention": True, "mlp": False}
            assert not torch.equal(model(ids).logits, before)
        assert torch.equal(model(ids).logits, before)
    opt, _ = tiny_model("opt")
    with pytest.raises(ValueError, match="separate mlp module"):
        remove_sublayers(find_decoder_blocks(opt)[1][0], mlp=True)


# ---------------------------------------------------------------------------------------- the search


def _loss_without(model, ids, units) -> float:
    with sublayers_switched_off(find_decoder_blocks(model)[1], units):
        return calibration_loss(model, ids)


def test_greedy_search_removes_the_least_harmful_unit_first_and_stops_nearest_the_budget():
    model, _ = _model("llama")
    ids = _ids(shape=(2, 32))
    units = [[(index, "mlp")] for index in range(4)]
    before = calibration_loss(model, ids)
    first = min(range(4), key=lambda index: _loss_without(model, ids, units[index]))
    second = min((i for i in range(4) if i != first), key=lambda i: _loss_without(model, ids, units[first] + units[i]))
    result = greedy_removal(model, ids, units, [0.6] * 4, budget=1.0, progress=False)
    assert result.removed == [first, second]  # 1.2 is nearer the budget 1.0 than 0.6 is
    assert result.history[0]["loss"] == pytest.approx(_loss_without(model, ids, units[first]))
    assert result.dense_loss == pytest.approx(before) and calibration_loss(model, ids) == pytest.approx(before)
    assert greedy_removal(model, ids, units, [0.6] * 4, budget=0.8, progress=False).removed == [first]
    with pytest.raises(ValueError, match="4 candidates but 3 costs"):
        greedy_removal(model, ids, units, [0.6] * 3, budget=1.0, progress=False)


@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt2", "qwen3"])
def test_forward_from_block_reproduces_the_whole_forward_and_refuses_a_mismatched_micro_batch(arch):
    model, _ = _model(arch)
    blocks = find_decoder_blocks(model)[1]
    ids = _ids(shape=(3, 40))  # past gemma3's sliding window of 32
    captured = capture_block_inputs(model, ids, batch_size=2)
    entering = [captured.hidden_states]
    with torch.no_grad():
        for block, call in zip(blocks, captured.calls):
            entering.append([call(block, hidden) for hidden in entering[-1]])
        whole = torch.cat([model(ids[start : start + 2]).logits for start in (0, 2)])
        for index in (0, 2, len(blocks) - 1):
            with forward_from_block(model, index, entering[index]):
                resumed = torch.cat([model(ids[start : start + 2]).logits for start in (0, 2)])
            torch.testing.assert_close(resumed, whole)
            assert all("forward" not in block.__dict__ for block in blocks)  # the pass-through is undone
        # the saved hidden states decide the result: other ones give other logits
        with forward_from_block(model, 1, [h + 1.0 for h in entering[1]]):
            assert not torch.allclose(model(ids[:2]).logits, whole[:2])
        with pytest.raises(RuntimeError, match="saved micro-batch"), forward_from_block(model, 1, entering[1]):
            model(ids)  # 3 sequences where the first saved micro-batch holds 2
        with pytest.raises(RuntimeError, match="saved micro-batch"), forward_from_block(model, 1, entering[1][:1]):
            model(ids[:2])
            model(ids[2:])  # one forward more than there are saved micro-batches
    with pytest.raises(ValueError, match="outside"), forward_from_block(model, len(blocks), []):
        pass


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_greedy_search_from_saved_block_inputs_equals_whole_forwards(arch):
    model, _ = _model(arch, layers=6)
    ids = _ids(shape=(3, 40))
    units = [[(index, kind)] for index in range(6) for kind in ("attention", "mlp")]
    whole_blocks = [[(index, "attention"), (index, "mlp")] for index in range(6)]
    for candidates in (units, whole_blocks):
        costs = [1.0] * len(candidates)
        fast = greedy_removal(model, ids, candidates, costs, budget=3.0, batch_size=2, progress=False)
        slow = greedy_removal(model, ids, candidates, costs, budget=3.0, batch_size=2, progress=False,
                              reuse_prefix=False)
        assert fast.removed == slow.removed and len(fast.removed) == 3
        assert len(fast.history) == len(slow.history) == 3
        for quick, reference in zip(fast.history, slow.history, strict=True):
            assert quick["loss"] == pytest.approx(reference["loss"], rel=1e-5)


def test_greedy_search_falls_back_to_whole_forwards_when_the_shortcut_disagrees(monkeypatch, caplog):
    model, _ = _model("llama")
    ids = _ids(shape=(2, 32))
    units = [[(index, "mlp")] for index in range(4)]
    expected = greedy_removal(model, ids, units, [1.0] * 4, budget=2.0, progress=False, reuse_prefix=False)
    monkeypatch.setattr(removal_search._PrefixReuse, "resumed_losses",
                        lambda self, removed, plans, progress: dict.fromkeys(plans, 123.0))
    with caplog.at_level("WARNING", logger="hf_compress.pruning.removal_search"):
        result = greedy_removal(model, ids, units, [1.0] * 4, budget=2.0, progress=False)
    assert "whole forwards instead" in caplog.text
    assert result.removed == expected.removed and result.history == expected.history


# ------------------------------------------------------------------------------------------- SLEB


def test_sleb_removes_the_least_harmful_block_never_a_protected_one_and_saves_a_standard_checkpoint(tmp_path):
    model, tokenizer = _model("gemma3")
    blocks = find_decoder_blocks(model)[1]
    for kind in ("mlp", "attention"):
        _silence(blocks[0], kind)  # the cheapest block to remove, but protected
    ids = _ids(shape=(2, 32))
    expected = min((1, 2), key=lambda index: _loss_without(model, ids, [(index, "attention"), (index, "mlp")]))
    pruner = SLEBPruner(model, tokenizer)
    pruned = pruner.prune(SLEBConfig(target_sparsity=0.25, **SMALL), ids, save_dir=tmp_path / "sleb", progress=False)
    assert pruner.report.extra["removed_blocks"] == [expected]
    assert pruned.config.num_hidden_layers == 3 and len(pruned.config.layer_types) == 3
    assert "hf_compress_slim" not in (tmp_path / "sleb" / "config.json").read_text()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "sleb")
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, pruned(ids).logits)
    with pytest.raises(ValueError, match="only 2 of 4 may go with protected_blocks=1"):
        SLEBPruner(*_model("llama")).prune(SLEBConfig(target_sparsity=0.75, **SMALL), TEXT, progress=False)
    opt = _model("opt")[0]
    with pytest.raises(ValueError, match="SLEB scores a block by switching off its sub-blocks.*ShortGPT"):
        SLEBPruner(opt, tokenizer).prune(SLEBConfig(target_sparsity=0.25, **SMALL), TEXT, progress=False)
    assert opt.config.num_hidden_layers == 4  # refused before any change


def test_sleb_config_stores_a_plain_int_so_its_recipe_saves():
    # protected_blocks was checked but not normalised: a numpy integer (from a sweep) passed, and the recipe then
    # failed to serialise at save time, after the whole search.
    import numpy as np

    config = SLEBConfig(target_sparsity=0.25, protected_blocks=np.int64(1))
    assert type(config.protected_blocks) is int
    assert SLEBConfig.from_dict(json.loads(config.to_json_string())) == config


@pytest.mark.parametrize("pruner_class", [BlockRemovalPruner, SLEBPruner])
def test_whole_block_removal_saves_and_reloads_gpt2(pruner_class, tmp_path):
    # GPT-2's fused c_attn hides the per-block widths; removing whole blocks needs none (its config says how many).
    model, tokenizer = tiny_model("gpt2", n_layer=4)
    config_class = BlockRemovalConfig if pruner_class is BlockRemovalPruner else SLEBConfig
    pruned = pruner_class(model, tokenizer).prune(config_class(target_sparsity=0.25, **SMALL), TEXT, progress=False,
                                                  save_dir=tmp_path / "out")
    assert pruned.config.num_hidden_layers == 3
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    with torch.no_grad():
        assert torch.equal(loaded(_ids()).logits, pruned(_ids()).logits)


# ------------------------------------------------------------------------------------- BlockPruner


@pytest.mark.compat_smoke
def test_block_pruner_removes_the_least_harmful_sublayer_and_the_slim_checkpoint_reloads(tmp_path):
    model, tokenizer = _model("qwen3")
    ids = _ids(shape=(2, 32))
    units = [(index, kind) for index in range(4) for kind in ("attention", "mlp")]
    expected = min(units, key=lambda unit: _loss_without(model, ids, [unit]))
    pruner = BlockPrunerPruner(model, tokenizer)
    pruned = pruner.prune(BlockPrunerConfig(target_sparsity=0.2, **SMALL), ids, save_dir=tmp_path / "bp",
                          progress=False)
    removed = pruner.report.extra["removed_sublayers"]
    assert removed[0] == list(expected)
    assert pruner.report.achieved_sparsity == pytest.approx(0.2, abs=0.1)
    widths = pruner.report.layers
    assert sum(w["key_value_heads"] == 0 for w in widths) + sum(w["intermediate_size"] == 0 for w in widths) == len(removed)
    config = json.loads((tmp_path / "bp" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "hf_compress_slim" and config["layers"] == widths
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "bp")
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, pruned(ids).logits)
    assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in pruned.parameters())
    with pytest.raises(ValueError, match="separate mlp module"):
        BlockPrunerPruner(*tiny_model("opt")).prune(BlockPrunerConfig(target_sparsity=0.2, **SMALL), TEXT,
                                                    progress=False)
    # GPT-2's fused attention has no width a slim checkpoint could record: a removed sub-block would reload random.
    with pytest.raises(ValueError, match="Remove whole blocks instead"):
        BlockPrunerPruner(*tiny_model("gpt2")).prune(BlockPrunerConfig(target_sparsity=0.2, **SMALL), TEXT,
                                                     progress=False)


def test_a_removed_sublayer_the_widths_cannot_record_is_refused_at_save(tmp_path):
    from hf_compress.formats.slim import save_slim
    from hf_compress.modeling.sublayers import remove_sublayers

    model, tokenizer = tiny_model("gpt2")
    save_slim(model, tokenizer, tmp_path / "whole")  # whole blocks only: the config describes it
    remove_sublayers(model.transformer.h[1], mlp=True)
    with pytest.raises(ValueError, match="lost a sub-block"):
        save_slim(model, tokenizer, tmp_path / "mlp-removed")
    assert not (tmp_path / "mlp-removed").exists()


# ------------------------------------------------------------------------------------ the user's own save


def test_the_pruned_model_saves_and_pushes_itself_loadably_without_save_dir(tmp_path, fake_hub):
    # prune() without save_dir, then the user's own save_pretrained / push_to_hub: the widths must be on the config,
    # or the removed sub-blocks reload with random weights (only a "MISSING" warning).
    model, tokenizer = _model("llama")
    pruned = BlockPrunerPruner(model, tokenizer).prune(BlockPrunerConfig(target_sparsity=0.3, **SMALL), TEXT,
                                                       progress=False)
    pruned.save_pretrained(tmp_path / "own")
    pruned.push_to_hub("user/tiny-block-pruner")
    ids = _ids()
    for source in (tmp_path / "own", "user/tiny-block-pruner"):
        loaded = AutoModelForCausalLM.from_pretrained(source)
        assert layer_widths(loaded) == layer_widths(pruned)
        with torch.no_grad():
            assert torch.equal(loaded(ids).logits, pruned(ids).logits)


def test_removing_blocks_from_a_loaded_slim_model_saves_a_checkpoint_that_loads(tmp_path):
    # A slim checkpoint's widths stay on the loaded config; once the only narrowed block is removed the model needs
    # no slim record, and the stale one (4 blocks for a 3-block model) made the saved checkpoint unloadable.
    model, tokenizer = _model("llama")
    remove_sublayers(find_decoder_blocks(model)[1][2], mlp=True)
    attach_slim_format(model)
    model.save_pretrained(tmp_path / "slim")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "slim")

    class RemoveBlockTwo(BlockRemovalPruner):
        def decide(self, config, plan, evidence, progress):
            return {"influence": evidence, "removed_blocks": [2]}

    pruned = RemoveBlockTwo(loaded, tokenizer).prune(BlockRemovalConfig(target_sparsity=0.25, **SMALL), TEXT,
                                                     save_dir=tmp_path / "short", progress=False)
    assert "hf_compress_slim" not in (tmp_path / "short" / "config.json").read_text()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "short")
    with torch.no_grad():
        assert torch.equal(reloaded(_ids()).logits, pruned(_ids()).logits)


def test_remove_blocks_by_hand_on_a_loaded_slim_model_keeps_its_own_save_loadable(tmp_path):
    # The loaded slim record (4 blocks) would otherwise be written for a 3-block model: a folder that does not load.
    model, _ = _model("llama")
    remove_sublayers(find_decoder_blocks(model)[1][1], mlp=True)
    attach_slim_format(model)
    model.save_pretrained(tmp_path / "slim")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "slim")
    remove_blocks(loaded, [3])
    loaded.save_pretrained(tmp_path / "shorter")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "shorter")
    assert layer_widths(reloaded) == layer_widths(loaded)
    with torch.no_grad():
        assert torch.equal(reloaded(_ids()).logits, loaded(_ids()).logits)


@pytest.mark.parametrize("method", ["block_removal", "block_pruner"])
def test_structural_pruning_saves_a_multimodal_model_that_loads(method, tmp_path):
    # Gemma 3 with a vision tower: the widths live on the text config (the top-level config has no heads), and its
    # checkpoint keys are saved under legacy names (language_model.model.*), which the slim format's check of the
    # stored tensors must map as loading does.
    from transformers import AutoModelForImageTextToText, Gemma3Config, Gemma3ForConditionalGeneration

    from hf_compress.assets.tiny_models import tiny_config, tiny_tokenizer

    text = tiny_config("gemma3", num_hidden_layers=4, layer_types=["sliding_attention", "full_attention"] * 2)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8)
    torch.manual_seed(0)
    model = Gemma3ForConditionalGeneration(Gemma3Config(text_config=text.to_dict(), vision_config=vision,
                                                        mm_tokens_per_image=4)).eval()
    if method == "block_removal":
        pruner, config = BlockRemovalPruner(model, tiny_tokenizer()), BlockRemovalConfig(target_sparsity=0.25, **SMALL)
    else:
        pruner, config = BlockPrunerPruner(model, tiny_tokenizer()), BlockPrunerConfig(target_sparsity=0.2, **SMALL)
    pruned = pruner.prune(config, TEXT, save_dir=tmp_path / "pruned", progress=False)
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "pruned")
    assert loaded.config.text_config.num_hidden_layers == pruned.config.text_config.num_hidden_layers
    with torch.no_grad():
        assert torch.equal(loaded(_ids()).logits, pruned(_ids()).logits)


def test_greedy_search_takes_a_cheaper_candidate_when_the_least_harmful_one_overshoots():
    # The silenced MLP is the least harmful but costs 2.5 for a budget of 1: removing it lands farther from the budget
    # than removing nothing. The search used to stop there (BlockPruner then saved the dense model); the attention,
    # costing exactly the budget, is the nearest achievable.
    model, _ = _model("llama")
    _silence(find_decoder_blocks(model)[1][2], "mlp")
    for reuse in (True, False):
        result = greedy_removal(model, _ids(shape=(2, 32)), [[(2, "mlp")], [(1, "attention")]], costs=[2.5, 1.0],
                                budget=1.0, progress=False, reuse_prefix=reuse)
        assert result.removed == [1]


def test_block_pruner_refuses_targets_removing_nothing_or_everything_and_skips_removed_sub_blocks():
    model, tokenizer = _model("llama")
    pruner = BlockPrunerPruner(model, tokenizer)
    with pytest.raises(ValueError, match="nearer to removing nothing.*use at least 0.04"):
        pruner.prune(BlockPrunerConfig(target_sparsity=0.01, **SMALL), TEXT, progress=False)
    with pytest.raises(ValueError, match="could remove every attention and MLP sub-block.*use less than 0.9"):
        pruner.prune(BlockPrunerConfig(target_sparsity=0.95, **SMALL), TEXT, progress=False)
    assert layer_widths(model) == [{"key_value_heads": 2, "intermediate_size": 128}] * 4  # refused before any change
    remove_sublayers(find_decoder_blocks(model)[1][1], attention=True)
    units = pruner.plan(BlockPrunerConfig(target_sparsity=0.2, **SMALL))
    assert (1, "attention") not in [unit[:2] for unit in units] and len(units) == 7  # costs nothing: not a candidate


@pytest.mark.parametrize("pruner_class", [BlockRemovalPruner, SLEBPruner])
def test_blocks_that_cannot_move_are_refused_before_the_search(pruner_class, monkeypatch):
    # GPT-2 with scale_attn_by_inverse_layer_idx: remove_blocks refuses to renumber its blocks. SLEB found out only
    # after its whole search; both methods now refuse before calibrating.
    model, tokenizer = tiny_model("gpt2", n_layer=4, scale_attn_by_inverse_layer_idx=True)
    config_class = BlockRemovalConfig if pruner_class is BlockRemovalPruner else SLEBConfig
    pruner = pruner_class(model, tokenizer)
    monkeypatch.setattr(pruner, "calibrate", lambda *args: pytest.fail("calibrated before refusing"))
    with pytest.raises(ValueError, match=r"scale_attn_by_inverse_layer_idx.*remove_blocks\(model, \[3\]\)"):
        pruner.prune(config_class(target_sparsity=0.25, **SMALL), TEXT, progress=False)
    assert model.config.num_hidden_layers == 4
