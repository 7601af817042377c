"""The load-path matrix: every saved artifact through the ways a demanding transformers user loads and runs it.

Each artifact kind is built once on a tiny model and saved with the library's own writer, then loaded back through
``pipeline("text-generation")``, ``from_pretrained`` with ``dtype=torch.bfloat16`` / ``"auto"``, a sharded re-save,
``device_map="cpu"`` / ``"auto"`` (and disk offload), ``torch.compile`` and a static cache. Each path must give the
same output as the plain float32 load (exactly, or within bfloat16 rounding), keep what the format stores (zeros,
packed codes, widths, the routing schedule), and never skip the integrity check; where a path is refused, the error
says why.
"""

from __future__ import annotations

import json
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import peft
import pytest
import torch
from packaging.version import Version
from peft import get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification, pipeline
from transformers.integrations import peft as transformers_peft

import hf_compress  # noqa: F401  (registers the formats with transformers, DL-QAT with peft)
from hf_compress.assets import tiny_model
from hf_compress.formats.integrity import CheckpointIntegrityError, _differences, seal_checkpoint
from hf_compress.formats.packed import save_packed
from hf_compress.modeling import find_decoder_blocks
from hf_compress.modeling.layers import find_linear_layers, weight_matrix
from hf_compress.modeling.structure import layer_widths
from hf_compress.pruning import (
    PRUNERS,
    BlockPrunerConfig,
    BlockPrunerPruner,
    BlockRemovalConfig,
    BlockRemovalPruner,
    TyrConfig,
    TyrPruner,
)
from hf_compress.pruning.storage import save_pruned
from hf_compress.quantization import DLQATConfig, PackedLinear, quantize_rtn, set_packed_kernel
from hf_compress.routing import RoutingSchedule, install_routing, routing_state, save_routed


pytestmark = pytest.mark.usefixtures("one_torch_thread")

TEXT = ["The quick brown fox jumps over the lazy dog while the cat sleeps in the sun. " * 30]
IDS = torch.randint(3, 250, (2, 12), generator=torch.Generator().manual_seed(0))
PROMPT = "Hello world, the"
NEW_TOKENS = 8
CALIBRATION = dict(num_calibration_sequences=2, calibration_seq_len=32)


@dataclass
class Artifact:
    name: str
    family: str  # sparse | packed | slim | blocks | routed | adapter
    folder: Path
    tokenizer: object
    reference: torch.nn.Module  # the folder loaded plainly (float32)
    bf16_atol: float = 0.02  # observed ≤ 0.0075 on these models; a misread layer moves logits by ~0.1 and more


def _build(name: str, folder: Path):
    """Build one artifact kind with the library's own pruner/quantizer/router and writer; returns its family."""
    if name == "shortgpt":
        model, tokenizer = tiny_model("llama", num_hidden_layers=3)
    elif name == "blockpruner":
        model, tokenizer = tiny_model("llama", num_hidden_layers=4)
    else:
        model, tokenizer = tiny_model("llama")
    if name == "sparse-2:4":  # Wanda, calibrated, N:M
        PRUNERS["wanda"](model, tokenizer).prune(
            PRUNERS["wanda"].config_class(sparsity="2:4", **CALIBRATION), TEXT, save_dir=folder, progress=False)
        return "sparse"
    if name == "sparse-50%":  # unstructured magnitude
        PRUNERS["magnitude"](model, tokenizer).prune("0.5", save_dir=folder, progress=False)
        return "sparse"
    if name == "packed-rtn4":
        save_packed(quantize_rtn(model, bits=4, group_size=32), tokenizer, folder)
        return "packed"
    if name == "packed-dlqat3":  # the DL-QAT export (3-bit codes pack 8 to 3 bytes)
        adapted = get_peft_model(model, DLQATConfig(bits=3, group_size=32, r=2, init_weights=False))
        save_packed(adapted.merge_and_quantize(), tokenizer, folder)
        return "packed"
    if name == "stacked":  # 2:4 + 4-bit: mask + codes of the kept weights
        PRUNERS["magnitude"](model, tokenizer).prune("2:4", progress=False)
        save_packed(quantize_rtn(model, bits=4, group_size=32), tokenizer, folder)
        return "packed"
    if name == "tyr":
        config = TyrConfig(target_sparsity=0.3, num_iterations=1, generations=1, offspring=2, min_ffn_step=4,
                           selection_tokens=(32,), selection_survivors=(), num_search_sequences=2, kl_topk=16,
                           **CALIBRATION)
        TyrPruner(model, tokenizer).prune(config, TEXT, save_dir=folder, progress=False)
        widths = layer_widths(model)
        assert len({w["key_value_heads"] for w in widths}) > 1  # mixed widths: no stock config describes them
        return "slim"
    if name == "shortgpt":
        BlockRemovalPruner(model, tokenizer).prune(BlockRemovalConfig(target_sparsity=0.3, **CALIBRATION), TEXT,
                                                   save_dir=folder, progress=False)
        assert model.config.num_hidden_layers == 2
        return "blocks"
    if name == "blockpruner":  # sub-blocks removed: widths of 0 in a slim checkpoint
        BlockPrunerPruner(model, tokenizer).prune(BlockPrunerConfig(target_sparsity=0.25, **CALIBRATION), TEXT,
                                                  save_dir=folder, progress=False)
        assert any(0 in w.values() for w in layer_widths(model))
        return "slim"
    if name == "routed":
        state = install_routing(model, RoutingSchedule([0.25, 0.5]), mode="router")
        with torch.no_grad():  # a router that ranks otherwise than the static rule it starts as
            for parameter in state.router.parameters():
                parameter.add_(0.3 * torch.randn(parameter.shape, generator=torch.Generator().manual_seed(1)))
        save_routed(model, tokenizer, folder)
        return "routed"
    if name == "dlqat-adapter":  # a PEFT adapter folder: transformers loads its base and attaches it
        base_folder = folder.parent / "dlqat-base"
        model.save_pretrained(base_folder)
        adapted = get_peft_model(AutoModelForCausalLM.from_pretrained(base_folder),
                                 DLQATConfig(bits=4, group_size=32, r=2, init_weights=False))
        adapted.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        return "adapter"
    raise AssertionError(name)


KINDS = ["sparse-2:4", "sparse-50%", "packed-rtn4", "packed-dlqat3", "stacked", "tyr", "shortgpt", "blockpruner",
         "routed", "dlqat-adapter"]
SEALED = [kind for kind in KINDS if kind not in ("shortgpt", "dlqat-adapter")]  # those two are stock folders


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> dict[str, Artifact]:
    root = tmp_path_factory.mktemp("load-paths")
    built = {}
    for name in KINDS:
        folder = root / name.replace(":", "of").replace("%", "pct")
        family = _build(name, folder)
        reference = AutoModelForCausalLM.from_pretrained(folder).eval()
        tokenizer = type(tiny_model("llama")[1]).from_pretrained(folder)
        # DL-QAT recomputes its grid from the bf16 base weights, so a few codes round to their neighbour
        atol = 0.05 if family == "adapter" else 0.02
        built[name] = Artifact(name, family, folder, tokenizer, reference, bf16_atol=atol)
    return built


def _logits(model, ids=IDS) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(ids).logits


def _greedy(model, tokenizer, **kwargs) -> list[int]:
    inputs = tokenizer(PROMPT, return_tensors="pt")
    return model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, **kwargs)[0].tolist()


def _assert_format_kept(artifact: Artifact, model) -> None:
    """What the format stores survives the load path: zeros, packed bytes, widths, the router."""
    reference = artifact.reference
    if artifact.family == "sparse":
        prefix, blocks = find_decoder_blocks(reference)
        _, other_blocks = find_decoder_blocks(model)
        for block, other in zip(blocks, other_blocks, strict=True):
            layers, other_layers = find_linear_layers(block), find_linear_layers(other)
            for name, layer in layers.items():
                zeros = weight_matrix(layer) == 0
                assert zeros.float().mean() >= 0.5, name
                assert torch.equal(weight_matrix(other_layers[name]) == 0, zeros), name
    elif artifact.family == "packed":
        expected = {n: m for n, m in reference.named_modules() if isinstance(m, PackedLinear)}
        found = {n: m for n, m in model.named_modules() if isinstance(m, PackedLinear)}
        assert found.keys() == expected.keys() and found
        for name, layer in expected.items():
            other = found[name]
            assert other.qweight.dtype == torch.uint8 and other.bits == layer.bits and other.kept == layer.kept, name
            assert torch.equal(other.qweight, layer.qweight) and torch.equal(other.qzeros, layer.qzeros), name
            if layer.is_sparse:
                assert torch.equal(other.qmask, layer.qmask), name
                assert bool((other.dequantized_weight()[~other.mask()] == 0).all()), name
        assert model.is_quantized
    elif artifact.family == "slim":
        assert layer_widths(model) == layer_widths(reference)
    elif artifact.family == "blocks":
        assert model.config.num_hidden_layers == reference.config.num_hidden_layers == 2
    elif artifact.family == "routed":
        state, expected = routing_state(model), routing_state(reference)
        assert state is not None and state.mode == expected.mode == "router"
        assert state.schedule.block_sparsity == expected.schedule.block_sparsity
        for name, tensor in expected.router.state_dict().items():
            loaded = state.router.state_dict()[name]
            assert loaded.dtype == torch.float32 and torch.equal(loaded.to(tensor.device), tensor), name
    elif artifact.family == "adapter":
        assert getattr(model, "_hf_peft_config_loaded", False)
        assert type(model.peft_config["default"]).__name__ == "DLQATConfig"


# ------------------------------------------------------------------------------------------------ 1. pipeline


@pytest.mark.parametrize("kind", KINDS)
def test_pipeline_greedy_equals_generate(artifacts, kind):
    artifact = artifacts[kind]
    expected = _greedy(artifact.reference, artifact.tokenizer)
    settings = dict(max_new_tokens=NEW_TOKENS, do_sample=False, return_tensors=True)
    for model in (artifact.reference, str(artifact.folder)):  # the model, the folder (loaded by the pipeline)
        generator = pipeline("text-generation", model=model, tokenizer=artifact.tokenizer)
        assert generator(PROMPT, **settings)[0]["generated_token_ids"] == expected
    assert generator.model is not artifact.reference and generator.model.dtype == torch.float32  # dtype="auto"
    _assert_format_kept(artifact, generator.model)
    # A left-padded batch: each row's tokens are the row's own.
    prompts = [PROMPT, "Hi"]
    alone = [generator(prompt, **settings)[0]["generated_token_ids"] for prompt in prompts]
    batched = generator(prompts, batch_size=2, **settings)
    for row, single in zip(batched, alone, strict=True):
        assert row[0]["generated_token_ids"][-len(single):] == single


# ------------------------------------------------------------------------------------------------ 2. dtype


@pytest.mark.parametrize("kind", KINDS)
def test_bfloat16_load_is_bfloat16_and_close_to_float32(artifacts, kind):
    artifact = artifacts[kind]
    model = AutoModelForCausalLM.from_pretrained(artifact.folder, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16 and model.config.dtype == torch.bfloat16
    torch.testing.assert_close(_logits(model).float(), _logits(artifact.reference), atol=artifact.bf16_atol, rtol=0)
    _assert_format_kept(artifact, model)
    if artifact.family == "packed":  # codes stay uint8 bytes; the scales follow the requested dtype
        assert {m.scales.dtype for m in model.modules() if isinstance(m, PackedLinear)} == {torch.bfloat16}


@pytest.mark.parametrize("kind", KINDS)
def test_dtype_auto_loads_the_saved_dtype(artifacts, kind):
    artifact = artifacts[kind]
    model = AutoModelForCausalLM.from_pretrained(artifact.folder, dtype="auto")
    assert model.dtype == torch.float32
    assert torch.equal(_logits(model), _logits(artifact.reference))
    _assert_format_kept(artifact, model)


@pytest.mark.parametrize("kind", ["sparse-2:4", "packed-rtn4", "stacked"])
def test_an_artifact_saved_in_bfloat16_loads_in_bfloat16_with_dtype_auto(tmp_path, kind):
    model, tokenizer = tiny_model("llama")
    model = model.to(torch.bfloat16)
    if kind != "packed-rtn4":
        PRUNERS["magnitude"](model, tokenizer).prune("2:4", progress=False)
    if kind == "sparse-2:4":
        save_pruned(model, tokenizer, tmp_path / kind)
    else:
        save_packed(quantize_rtn(model, bits=4, group_size=32), tokenizer, tmp_path / kind)
    auto = AutoModelForCausalLM.from_pretrained(tmp_path / kind, dtype="auto")
    default = AutoModelForCausalLM.from_pretrained(tmp_path / kind)
    assert auto.dtype == default.dtype == torch.bfloat16
    assert torch.equal(_logits(auto), _logits(default))
    upcast = AutoModelForCausalLM.from_pretrained(tmp_path / kind, dtype=torch.float32)
    assert upcast.dtype == torch.float32
    torch.testing.assert_close(_logits(upcast), _logits(default).float(), atol=0.02, rtol=0)


# ------------------------------------------------------------------------------------------------ 3. shards


def _saved_quantization_config(folder: Path) -> dict | None:
    return json.loads((folder / "config.json").read_text()).get("quantization_config")


@pytest.mark.parametrize("kind", KINDS)
def test_sharded_resave_reloads_exactly(artifacts, kind, tmp_path):
    artifact = artifacts[kind]
    loaded = AutoModelForCausalLM.from_pretrained(artifact.folder)
    target = tmp_path / "sharded"
    if artifact.family == "adapter" and Version(peft.__version__) < Version(transformers_peft.MIN_PEFT_VERSION):
        # transformers saves a model holding a PEFT adapter only with the peft it names (5.25: 0.22) and says so.
        with pytest.raises(ValueError, match="version of PEFT"):
            loaded.save_pretrained(target, max_shard_size="100KB")
        return
    loaded.save_pretrained(target, max_shard_size="100KB")
    resaved = None
    if artifact.family == "adapter":  # transformers saves the adapter a model holds (one small file), not the model
        assert (target / "adapter_config.json").is_file() and (target / "adapter_model.safetensors").is_file()
    else:
        assert len(list(target.glob("*.safetensors"))) > 1 and (target / "model.safetensors.index.json").is_file()
        original, resaved = _saved_quantization_config(artifact.folder), _saved_quantization_config(target)
    if artifact.family in ("sparse", "blocks"):
        assert resaved is None  # a loaded sparse model is an ordinary dense one (save_pruned stores it sparse again)
    elif artifact.family != "adapter":
        # The same format, described as before; the checksums of the old files are not carried over.
        assert resaved["quant_method"] == original["quant_method"] and "integrity" not in resaved
        for field in ("modules", "sparse_modules", "bits", "group_size", "layers", "block_sparsity", "mode"):
            assert resaved.get(field) == original.get(field), field
    reloaded = AutoModelForCausalLM.from_pretrained(target)
    assert torch.equal(_logits(reloaded), _logits(artifact.reference))
    _assert_format_kept(artifact, reloaded)
    if resaved is not None:  # sealed after the fact, the record covers every shard and still loads
        record = seal_checkpoint(target)
        assert set(record["tensors"]) == {k for f in target.glob("*.safetensors") for k in load_file(f)}
        assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(target)), _logits(artifact.reference))


@pytest.mark.parametrize("kind", ["sparse-2:4", "sparse-50%"])
def test_save_pruned_writes_sealed_shards(artifacts, kind, tmp_path):
    artifact = artifacts[kind]
    loaded = AutoModelForCausalLM.from_pretrained(artifact.folder)
    folder = save_pruned(loaded, artifact.tokenizer, tmp_path / "sharded", max_shard_size="100KB")
    shards = sorted(folder.glob("*.safetensors"))
    assert len(shards) > 1
    config = _saved_quantization_config(folder)
    assert config["compressed_modules"] == _saved_quantization_config(artifact.folder)["compressed_modules"]
    assert set(config["integrity"]["tensors"]) == {k for shard in shards for k in load_file(shard)}
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(folder)), _logits(artifact.reference))
    _corrupt(next(shard for shard in shards if any(t.is_floating_point() for t in load_file(shard).values())))
    with pytest.raises(CheckpointIntegrityError, match="checksum recorded at save"):
        AutoModelForCausalLM.from_pretrained(folder)


# ------------------------------------------------------------------------------------------------ 4. device_map


@pytest.mark.parametrize("device_map", ["cpu", "auto", "disk"])
@pytest.mark.parametrize("kind", KINDS)
def test_device_map_gives_equal_logits(artifacts, kind, device_map, tmp_path):
    artifact = artifacts[kind]
    if device_map == "disk":  # accelerate offloads what does not fit in 60 KB of CPU memory to the disk
        kwargs = dict(device_map="auto", max_memory={"cpu": "60KB"}, offload_folder=str(tmp_path / "offload"))
    else:
        kwargs = dict(device_map=device_map)
    if device_map == "disk" and artifact.family == "adapter":
        with pytest.raises(ValueError, match="DL-QAT .* offloaded by accelerate. Load the model without offloading"):
            AutoModelForCausalLM.from_pretrained(artifact.folder, **kwargs)
        return
    model = AutoModelForCausalLM.from_pretrained(artifact.folder, **kwargs)
    assert torch.equal(_logits(model), _logits(artifact.reference))
    if device_map == "disk":
        assert "disk" in set(model.hf_device_map.values())
        assert _greedy(model, artifact.tokenizer) == _greedy(artifact.reference, artifact.tokenizer)
    else:
        _assert_format_kept(artifact, model)


# ------------------------------------------------------------------------------------------------ another head


@pytest.mark.parametrize("kind", [kind for kind in KINDS if kind != "dlqat-adapter"])
def test_another_head_class_loads_the_compressed_base(artifacts, kind):
    # A causal LM's folder into AutoModelForSequenceClassification is a common start for fine-tuning: the new head
    # is initialised (transformers reports it), the compressed base loads as saved.
    artifact = artifacts[kind]
    model = AutoModelForSequenceClassification.from_pretrained(artifact.folder, num_labels=2).eval()
    with torch.no_grad():
        hidden = model.model(IDS).last_hidden_state
        expected = artifact.reference.model(IDS).last_hidden_state
    assert torch.equal(hidden, expected)
    assert model.score.weight.shape == (2, model.config.hidden_size)
    _assert_format_kept(artifact, model)


def _drop_tensor(folder: Path, name: str) -> None:
    """Remove ``name`` from the folder's weights and the checksums that would notice it: only the structure check
    is left to refuse the folder."""
    tensors = load_file(folder / "model.safetensors")
    tensors.pop(name)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"].pop("integrity")
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("load", [lambda folder: AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2),
                                  AutoModel.from_pretrained], ids=["sequence-classification", "base-model"])
def test_another_head_class_still_needs_a_complete_base(artifacts, tmp_path, load):
    folder = shutil.copytree(artifacts["tyr"].folder, tmp_path / "truncated")
    _drop_tensor(folder, "model.norm.weight")
    with pytest.raises(CheckpointIntegrityError, match="not stored, e.g. '(model.)?norm.weight'"):
        load(folder)


def test_a_subclass_of_the_saved_class_needs_its_whole_head(tmp_path):
    model, tokenizer = tiny_model("llama", tie_word_embeddings=False)
    PRUNERS["magnitude"](model, tokenizer).prune("0.5", save_dir=tmp_path / "sparse", progress=False)
    _drop_tensor(tmp_path / "sparse", "lm_head.weight")

    class MyLlama(type(model)):
        pass

    with pytest.raises(CheckpointIntegrityError, match="not stored, e.g. 'lm_head.weight'"):
        MyLlama.from_pretrained(tmp_path / "sparse")


def test_a_new_heads_label_count_does_not_hide_a_damaged_file(artifacts, tmp_path):
    folder = shutil.copytree(artifacts["sparse-2:4"].folder, tmp_path / "corrupted")
    name = _corrupt(folder / "model.safetensors")
    with pytest.raises(CheckpointIntegrityError, match="checksum recorded at save") as error:
        AutoModelForSequenceClassification.from_pretrained(folder, num_labels=3)
    assert name in str(error.value) and "differs from its config.json" not in str(error.value)


def test_overridden_nested_config_fields_are_named_field_by_field():
    saved = {"text_config": {"num_hidden_layers": 2, "hidden_size": 64}, "use_cache": True, "dtype": "float32"}
    loaded = {"text_config": {"num_hidden_layers": 1, "hidden_size": 64}, "use_cache": True, "dtype": "bfloat16"}
    assert dict(_differences(saved, loaded)) == {"text_config.num_hidden_layers": (2, 1)}


@pytest.mark.parametrize("kind", SEALED)
@pytest.mark.parametrize("override", [{"num_hidden_layers": 1}, {"intermediate_size": 64}])
def test_an_overridden_architecture_is_named_not_blamed_on_the_files(artifacts, kind, override):
    (name, value), = override.items()
    saved = getattr(artifacts[kind].reference.config, name)
    with pytest.raises(CheckpointIntegrityError, match="differs from its config.json") as error:
        AutoModelForCausalLM.from_pretrained(artifacts[kind].folder, **override)
    message = str(error.value)
    assert f"{name}={value} (saved: {saved})" in message and "without overriding" in message
    assert "corrupted" not in message and "re-download" not in message
    AutoModelForCausalLM.from_pretrained(artifacts[kind].folder, use_cache=False)  # not an architecture field


def test_a_damaged_file_is_still_blamed_when_an_override_changes_no_shape(artifacts, tmp_path):
    folder = shutil.copytree(artifacts["sparse-2:4"].folder, tmp_path / "corrupted")
    name = _corrupt(folder / "model.safetensors")
    with pytest.raises(CheckpointIntegrityError, match="checksum recorded at save") as error:
        AutoModelForCausalLM.from_pretrained(folder, use_cache=False, rms_norm_eps=1e-5)
    assert name in str(error.value) and "differs from its config.json" not in str(error.value)


# ------------------------------------------------------------------------------------------------ integrity


def _corrupt(file: Path) -> str:
    """Change one value of a floating-point tensor of ``file`` (headers stay valid), return its name."""
    tensors = load_file(file)
    name = next(k for k, t in sorted(tensors.items()) if t.is_floating_point() and t.numel() > 1)
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] += 1.0
    save_file(tensors, file, metadata={"format": "pt"})
    return name


LOADERS = {
    "plain": lambda folder: AutoModelForCausalLM.from_pretrained(folder),
    "bfloat16": lambda folder: AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16),
    "device_map": lambda folder: AutoModelForCausalLM.from_pretrained(folder, device_map="auto"),
    "pipeline": lambda folder: pipeline("text-generation", model=str(folder)),
}


@pytest.mark.parametrize("kind", SEALED)
def test_every_load_path_checks_integrity(artifacts, kind, tmp_path):
    folder = shutil.copytree(artifacts[kind].folder, tmp_path / "corrupted")
    name = _corrupt(folder / "model.safetensors")
    for path, load in LOADERS.items():
        # CheckpointIntegrityError is a ValueError; the pipeline wraps it (retrying in float32) and quotes it.
        with pytest.raises(ValueError, match="checksum recorded at save") as error:
            load(folder)
        assert name in str(error.value), path


# ------------------------------------------------------------------------------------------------ 5. compile


@pytest.mark.parametrize("kind", KINDS)
def test_compiled_forward_equals_eager(artifacts, kind):
    artifact = artifacts[kind]
    torch._dynamo.reset()
    model = AutoModelForCausalLM.from_pretrained(artifact.folder).eval()
    compiled = torch.compile(model, backend="eager", fullgraph=True)  # no graph break anywhere
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert torch.equal(compiled(IDS).logits, _logits(artifact.reference))
    # Dynamo warns of possible silent incorrectness where it traces through a functools cache (the routed forward did).
    assert not [str(w.message) for w in caught if "Dynamo" in str(w.message)]


def test_compiled_bfloat16_packed_model_on_the_reference_kernel(artifacts):
    """bf16 packed layers take the CPU int4 kernel by default, whose code cache (keyed by data pointers) dynamo
    cannot trace in one graph once built; with the reference kernel a bf16 packed model compiles as one graph."""
    torch._dynamo.reset()
    model = AutoModelForCausalLM.from_pretrained(artifacts["packed-rtn4"].folder, dtype=torch.bfloat16).eval()
    assert set_packed_kernel(model, "reference") == 14
    eager = _logits(model)
    with torch.no_grad():
        assert torch.equal(torch.compile(model, backend="eager", fullgraph=True)(IDS).logits, eager)


@pytest.mark.parametrize("kind", KINDS)
def test_static_cache_generation(artifacts, kind):
    artifact = artifacts[kind]
    model = artifact.reference
    if artifact.family == "routed":
        with pytest.raises(ValueError, match="cache_implementation='static'.*dynamic cache"):
            _greedy(model, artifact.tokenizer, cache_implementation="static")
        return
    # Mixed key/value widths (Týr) and removed attention (BlockPruner) too: generate()'s static layers size
    # themselves from the first keys they store (transformers' lazy initialisation; an early_initialization from
    # the config, as torch.export needs, would not fit mixed widths).
    assert _greedy(model, artifact.tokenizer, cache_implementation="static") == _greedy(model, artifact.tokenizer)


# ------------------------------------------------------------------------------------------------ heads


def test_drafting_heads_decode_through_a_pipeline(tmp_path):
    """Heads are not a model folder: they decode through ``custom_generate`` (an object, or their saved folder),
    which the pipeline hands to ``generate``; loading them as a causal LM is refused."""
    from hf_compress.speculative.heads import Amphista, AmphistaConfig, AmphistaHeads

    model, tokenizer = tiny_model("llama", save_dir=tmp_path / "base")
    heads = AmphistaHeads.for_model(model, AmphistaConfig(num_heads=2, num_attention_heads=2))
    with torch.no_grad():  # drafts that are sometimes right, sometimes wrong
        for parameter in heads.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=torch.Generator().manual_seed(0)))
    folder = heads.save_pretrained(tmp_path / "heads")
    expected = _greedy(model, tokenizer)
    generator = pipeline("text-generation", model=str(tmp_path / "base"), tokenizer=tokenizer)
    settings = dict(max_new_tokens=NEW_TOKENS, do_sample=False, return_tensors=True)
    strategy = Amphista(heads, tree=[(0,), (1,), (0, 0)])
    assert generator(PROMPT, custom_generate=strategy, **settings)[0]["generated_token_ids"] == expected
    assert strategy.last_metrics is not None
    by_folder = generator(PROMPT, custom_generate=str(folder), trust_remote_code=True, **settings)
    assert by_folder[0]["generated_token_ids"] == expected
    with pytest.raises(ValueError, match="hf_compress_amphista"):
        AutoModelForCausalLM.from_pretrained(folder)
