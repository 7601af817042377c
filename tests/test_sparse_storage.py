"""Sparse on-disk storage of pruned models (hf_compress.pruning.storage / formats.sparse) and its loader."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoModelForCausalLM
from transformers.quantizers import auto as quantizers_auto

import hf_compress.formats.base  # noqa: F401
from hf_compress.assets import tiny_model
from hf_compress.modeling import find_decoder_blocks, find_linear_layers, weight_matrix
from hf_compress.formats.base import registered_formats
from hf_compress.formats.integrity import CheckpointIntegrityError, read_header
from hf_compress.formats.sparse import (
    FORMAT_NAME,
    SparseStorageConfig,
    decode_sparse,
    encode_sparse,
    pack_bitmask,
    unpack_bitmask,
)
from hf_compress.pruning.storage import PlannedWeight, plan_sparse_storage, save_pruned, sparse_state_dict


ARCHS = ["llama", "gpt2", "opt", "gemma3"]
INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


# --------------------------------------------------------------------------------------------------
# Helpers: prune by hand, compare bit for bit
# --------------------------------------------------------------------------------------------------


def _block_linears(model) -> dict[str, torch.nn.Module]:
    blocks_name, blocks = find_decoder_blocks(model)
    return {
        f"{blocks_name}.{i}.{name}": layer
        for i, block in enumerate(blocks)
        for name, layer in find_linear_layers(block).items()
    }


@torch.no_grad()
def _prune_2_4(layer: torch.nn.Module) -> None:
    """Keep the 2 largest-magnitude weights of every 4 consecutive inputs of each output row."""
    w = weight_matrix(layer)  # [out, in] view, also for Conv1D
    groups = w.reshape(w.shape[0], -1, 4)
    drop = groups.abs().argsort(dim=-1)[..., :2]
    keep = torch.ones_like(groups, dtype=torch.bool).scatter_(-1, drop, False)
    w.mul_(keep.reshape(w.shape))  # multiplying gives -0.0 for negative weights, as a pruner's mask would


@torch.no_grad()
def _prune_random(layer: torch.nn.Module, ratio: float = 0.5, seed: int = 0) -> None:
    w = layer.weight
    generator = torch.Generator().manual_seed(seed)
    w[torch.rand(w.shape, generator=generator) < ratio] = 0


def _prune(model, pattern: str) -> None:
    for i, layer in enumerate(_block_linears(model).values()):
        _prune_2_4(layer) if pattern == "2:4" else _prune_random(layer, seed=i)


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    """The raw bits, with -0.0 written as +0.0 (the one documented normalisation)."""
    if tensor.dtype not in INT_VIEW:
        return tensor
    return torch.where(tensor == 0, torch.zeros_like(tensor), tensor).view(INT_VIEW[tensor.dtype])


def _assert_same_weights(expected, actual) -> None:
    want, got = expected.state_dict(), actual.state_dict()
    assert want.keys() == got.keys()
    for key, tensor in want.items():
        assert got[key].dtype == tensor.dtype, key
        assert torch.equal(_bits(got[key]), _bits(tensor)), key


def _stored_bytes(folder: Path, modules: list[str]) -> int:
    total = 0
    for file in folder.glob("*.safetensors"):
        with safe_open(file, "pt") as handle:
            for key in handle.keys():
                if key.rpartition(".")[0] in modules and key.rpartition(".")[2].startswith("weight"):
                    tensor = handle.get_tensor(key)
                    total += tensor.numel() * tensor.element_size()
    return total


def _ids(tokenizer):
    return tokenizer(["pruned models stay exact"], return_tensors="pt")


# --------------------------------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------------------------------


def test_bitmask_layout_is_little_endian_per_row():
    mask = torch.zeros(2, 10, dtype=torch.bool)
    mask[0, 0] = mask[0, 2] = mask[0, 9] = mask[1, 7] = True
    packed = pack_bitmask(mask)
    assert packed.dtype == torch.uint8 and packed.tolist() == [[0b101, 0b10], [0b10000000, 0]]
    assert torch.equal(unpack_bitmask(packed, [2, 10]), mask)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(7, 13), (64, 64), (9,), (3, 4, 5)])
def test_encode_decode_exact(shape, dtype):
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(shape, generator=generator).to(dtype)
    weight[torch.rand(shape, generator=generator) < 0.5] = 0
    weight.view(-1)[0] = float("nan")
    packed = encode_sparse(weight)
    assert packed.values.dtype == dtype and packed.values.numel() == int((weight != 0).sum())
    decoded = decode_sparse(*packed)
    assert decoded.dtype == dtype and decoded.shape == weight.shape
    assert torch.equal(_bits(decoded), _bits(weight))  # NaN included: compared as bits


def test_negative_zero_is_a_zero_and_comes_back_positive():
    weight = torch.tensor([[-0.0, 1.5, 0.0, -2.0]])
    packed = encode_sparse(weight)
    assert packed.values.tolist() == [1.5, -2.0]
    decoded = decode_sparse(*packed)
    assert torch.equal(decoded, weight) and not torch.signbit(decoded[0, 0])


def test_decode_rejects_inconsistent_tensors():
    packed = encode_sparse(torch.tensor([[1.0, 0.0, 2.0, 0.0]]))
    with pytest.raises(ValueError, match="non-zeros"):
        decode_sparse(packed.values[:1], packed.bitmask, packed.shape)
    with pytest.raises(ValueError, match="does not fit"):
        decode_sparse(packed.values, packed.bitmask, [4, 1])


# --------------------------------------------------------------------------------------------------
# save_pruned -> plain from_pretrained
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pattern", ["2:4", "50%"])
@pytest.mark.parametrize("arch", ARCHS)
def test_round_trip_is_bit_identical(tmp_path, arch, pattern):
    model, tokenizer = tiny_model(arch)
    _prune(model, pattern)
    linears = _block_linears(model)

    recipe = {"method": "manual", "sparsity": pattern}
    path = save_pruned(model, tokenizer, tmp_path / "pruned", recipe=recipe)
    loaded = AutoModelForCausalLM.from_pretrained(path)

    _assert_same_weights(model, loaded)
    ids = _ids(tokenizer)
    with torch.no_grad():
        assert torch.equal(loaded(**ids).logits, model(**ids).logits)
    if pattern == "2:4":  # generation once per architecture (logits equality already covers the rest)
        generated = loaded.generate(**ids, max_new_tokens=4, do_sample=False)
        assert torch.equal(generated, model.generate(**ids, max_new_tokens=4, do_sample=False))
    # An ordinary dense model: weights decoded into the usual modules, no quantizer left behind.
    assert getattr(loaded, "hf_quantizer", None) is None and not loaded.is_quantized
    assert getattr(loaded.config, "quantization_config", None) is None
    if model.config.tie_word_embeddings:
        assert loaded.get_output_embeddings().weight is loaded.get_input_embeddings().weight

    quantization_config = json.loads((path / "config.json").read_text())["quantization_config"]
    assert quantization_config["quant_method"] == FORMAT_NAME
    assert quantization_config["recipe"] == recipe
    assert sorted(quantization_config["compressed_modules"]) == sorted(linears)
    # On disk: the linear weights' bytes, measured in the safetensors file.
    dense_bytes = sum(layer.weight.numel() * layer.weight.element_size() for layer in linears.values())
    stored = _stored_bytes(path, list(linears))
    assert quantization_config["storage"]["dense_linear_bytes"] == dense_bytes
    assert quantization_config["storage"]["stored_linear_bytes"] == stored
    assert stored <= 0.6 * dense_bytes


@pytest.mark.parametrize("pattern", ["2:4", "50%"])
def test_bf16_round_trip_and_ratio(tmp_path, pattern):
    model, tokenizer = tiny_model("llama")
    model.to(torch.bfloat16)
    _prune(model, pattern)
    path = save_pruned(model, tokenizer, tmp_path / "bf16")
    loaded = AutoModelForCausalLM.from_pretrained(path)
    assert loaded.dtype == torch.bfloat16
    _assert_same_weights(model, loaded)
    linears = _block_linears(model)
    dense_bytes = sum(layer.weight.numel() * 2 for layer in linears.values())
    assert _stored_bytes(path, list(linears)) <= 0.6 * dense_bytes


def test_loading_casts_to_requested_dtype_and_into_base_models(tmp_path):
    model, tokenizer = tiny_model("llama")
    _prune(model, "2:4")
    path = save_pruned(model, tokenizer, tmp_path / "pruned")
    as_bf16 = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    for key, tensor in model.state_dict().items():
        assert torch.equal(as_bf16.state_dict()[key], tensor.to(torch.bfloat16)), key
    base = AutoModel.from_pretrained(path)  # keys lose the "model." prefix; decoding still applies
    for key, tensor in base.state_dict().items():
        assert torch.equal(_bits(tensor), _bits(model.model.state_dict()[key])), key


def test_layers_below_min_sparsity_stay_dense(tmp_path):
    model, tokenizer = tiny_model("llama")
    sparse_layer = model.model.layers[0].mlp.up_proj
    light_layer = model.model.layers[0].mlp.down_proj
    _prune_random(sparse_layer, ratio=0.5)
    _prune_random(light_layer, ratio=0.1)  # below the default min_sparsity of 0.25

    path = save_pruned(model, tokenizer, tmp_path / "pruned")
    config = json.loads((path / "config.json").read_text())["quantization_config"]
    assert config["compressed_modules"] == ["model.layers.0.mlp.up_proj"]
    tensors = load_file(path / "model.safetensors")
    assert tensors["model.layers.0.mlp.up_proj.weight"].ndim == 1
    assert "model.layers.0.mlp.up_proj.weight_bitmask" in tensors
    assert tensors["model.layers.0.mlp.down_proj.weight"].shape == light_layer.weight.shape
    assert not any(key.endswith("_bitmask") for key in tensors if "up_proj" not in key)
    _assert_same_weights(model, AutoModelForCausalLM.from_pretrained(path))

    _, modules, _ = sparse_state_dict(model, min_sparsity=0.05)
    assert modules == ["model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(8, 16), (5, 13), (3, 4, 10), (7,)])
def test_the_plan_counts_the_encoding_it_does_not_make(shape, dtype):
    weight = torch.randn(shape).to(dtype)
    weight[torch.rand(shape, generator=torch.Generator().manual_seed(0)) < 0.6] = 0
    planned = PlannedWeight("w", "w.weight", None, dtype, shape, int(torch.count_nonzero(weight)))
    encoded = encode_sparse(weight)
    assert planned.nbytes == encoded.nbytes
    assert planned.stored_shapes == tuple(tuple(t.shape) for t in encoded)


@pytest.mark.parametrize("shape", [(10, 13), (4, 3, 9), (7,)])
def test_encoding_row_blocks_end_to_end_is_encoding_the_whole_weight(shape):
    import io

    from hf_compress.formats.shards import write_tensor
    from hf_compress.pruning.storage import _row_blocks

    weight = torch.randn(shape)
    weight[torch.rand(shape, generator=torch.Generator().manual_seed(0)) < 0.5] = 0
    whole = encode_sparse(weight)
    for block_bytes in (1, 40, 2**30):  # one row per block, a few rows, everything
        values, bitmask = io.BytesIO(), io.BytesIO()
        for rows in _row_blocks(weight, block_bytes):
            write_tensor(values, rows[rows != 0])
            write_tensor(bitmask, pack_bitmask(rows != 0))
        assert values.getvalue() == whole.values.numpy().tobytes()
        assert bitmask.getvalue() == whole.bitmask.numpy().tobytes()


@pytest.mark.parametrize("dense", ["sharded", "one file"])
def test_past_the_shard_size_the_encoded_weights_get_shards_of_their_own(tmp_path, dense):
    model, tokenizer = tiny_model("llama")
    _prune(model, "50%")
    plan = plan_sparse_storage(model)
    if dense == "sharded":  # save_pretrained shards the dense weights too
        shard_size = max(weight.nbytes for weight in plan.weights)
    else:  # the dense weights fill one file exactly: the encoded ones go to shards of their own
        one_file = save_pruned(model, None, tmp_path / "one") / "model.safetensors"
        encoded = {key for weight in plan.weights for key in weight.stored_keys}
        shard_size = sum(e.end - e.begin for k, e in read_header(one_file).items() if k not in encoded)
    path = save_pruned(model, tokenizer, tmp_path / "pruned", max_shard_size=shard_size)
    assert not (path / "model.safetensors").exists()
    index = json.loads((path / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in path.glob("*.safetensors"))
    assert len(files) >= 2 and set(index["weight_map"].values()) == set(files)
    assert files == [f"model-{i:05d}-of-{len(files):05d}.safetensors" for i in range(1, len(files) + 1)]
    stored = {}
    for file in files:
        with safe_open(path / file, "pt") as handle:
            stored.update(dict.fromkeys(handle.keys(), file))
    assert stored == index["weight_map"]
    for weight in plan.weights:  # a weight's three tensors in one file
        assert len({stored[key] for key in weight.stored_keys}) == 1
    if dense == "one file":
        assert not any(key.endswith("_bitmask") for key, file in stored.items() if file == files[0])
    assert index["metadata"]["total_size"] == sum(
        entry.end - entry.begin for file in files for entry in read_header(path / file).values())
    loaded = AutoModelForCausalLM.from_pretrained(path)  # verifies the sealed checksums of every file
    _assert_same_weights(model, loaded)


def test_recipe_defaults_to_the_pruners_record(tmp_path):
    model, tokenizer = tiny_model("gpt2")
    _prune(model, "2:4")
    model.config.hf_compress = {"pruning": {"method": "magnitude", "sparsity": "2:4"}}
    path = save_pruned(model, tokenizer, tmp_path / "pruned")
    config = json.loads((path / "config.json").read_text())
    assert config["quantization_config"]["recipe"] == {"method": "magnitude", "sparsity": "2:4"}


def test_the_folder_has_a_card_with_the_recipe_storage_and_base_weights(tmp_path):
    """A mask-pruned folder is an artifact to push like the others: its card states the recipe, the stored bytes,
    the Hub base the config names and where the base weights came from (as save_slim's card does)."""
    from hf_compress.hub import read_recipe
    from hf_compress.hub.model_card import load_card

    model, tokenizer = tiny_model("llama")
    _prune(model, "2:4")
    base_weights = {"source": "gguf", "file": "model.Q4_1.gguf", "package": "llm-x==1.0", "tensor_types": {"Q4_1": 7}}
    model.config.hf_compress = {"pruning": {"method": "wanda", "sparsity": "2:4"}, "base_model": "org/base",
                                "base_weights": base_weights}
    path = save_pruned(model, tokenizer, tmp_path / "pruned")
    card = load_card(path)
    recipe = read_recipe(card)
    assert recipe["method"] == "wanda" and recipe["storage"]["ratio"] < 0.6
    assert card.data.base_model == "org/base"
    assert card.data.to_dict()["compression"]["base_weights"] == base_weights
    assert "Base weights" in card.text and card.text.lstrip().startswith("# pruned")


def test_loaded_model_saves_dense_and_can_be_stored_sparse_again(tmp_path):
    model, tokenizer = tiny_model("opt")
    _prune(model, "50%")
    loaded = AutoModelForCausalLM.from_pretrained(save_pruned(model, tokenizer, tmp_path / "sparse"))

    loaded.save_pretrained(tmp_path / "dense")
    assert "quantization_config" not in json.loads((tmp_path / "dense" / "config.json").read_text())
    assert not any(key.endswith("_bitmask") for key in load_file(tmp_path / "dense" / "model.safetensors"))
    _assert_same_weights(model, AutoModelForCausalLM.from_pretrained(tmp_path / "dense"))

    again = save_pruned(loaded, tokenizer, tmp_path / "sparse-again")
    _assert_same_weights(model, AutoModelForCausalLM.from_pretrained(again))


# --------------------------------------------------------------------------------------------------
# Bad input and failures
# --------------------------------------------------------------------------------------------------


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_refuses_a_folder_holding_a_model(tmp_path):
    model, tokenizer = tiny_model("llama")
    _prune(model, "2:4")
    target = save_pruned(model, tokenizer, tmp_path / "pruned")
    before = _snapshot(target)
    with pytest.raises(FileExistsError, match="already holds a model"):
        save_pruned(model, tokenizer, target)
    assert _snapshot(target) == before

    only_config = tmp_path / "config-only"
    only_config.mkdir()
    (only_config / "config.json").write_text("{}")
    with pytest.raises(FileExistsError):
        save_pruned(model, None, only_config)
    assert _snapshot(only_config) == {"config.json": b"{}"}

    with pytest.raises(FileExistsError, match="is a file"):
        save_pruned(model, None, target / "config.json")


def test_overwrite_replaces_and_an_existing_folder_without_model_keeps_its_files(tmp_path):
    model, tokenizer = tiny_model("llama")
    _prune(model, "2:4")
    target = save_pruned(model, tokenizer, tmp_path / "pruned")
    (target / "stale.txt").write_text("old")
    save_pruned(model, None, target, overwrite=True)
    # the user's file stays; the old tokenizer (part of the replaced artifact) goes
    assert (target / "stale.txt").read_text() == "old" and not (target / "tokenizer.json").exists()

    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "notes.txt").write_text("my notes")
    with pytest.raises(FileExistsError, match="not empty .* holds no model.*overwrite=True"):
        save_pruned(model, tokenizer, notes)  # a folder of other files is never written without consent
    save_pruned(model, tokenizer, notes, overwrite=True)
    assert (notes / "notes.txt").read_text() == "my notes" and (notes / "model.safetensors").exists()
    assert "hf_compress" in (notes / "README.md").read_text()  # the card is part of what the save writes
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


class _FailingTokenizer:
    def save_pretrained(self, folder):
        (Path(folder) / "tokenizer.json").write_text("{")  # half written, then the failure
        raise OSError("disk full")


def test_a_failure_leaves_nothing_behind(tmp_path):
    model, _ = tiny_model("gpt2")
    _prune(model, "2:4")
    with pytest.raises(OSError, match="disk full"):
        save_pruned(model, _FailingTokenizer(), tmp_path / "pruned")
    assert list(tmp_path.iterdir()) == []  # neither the folder nor a temporary one
    assert getattr(model.config, "quantization_config", None) is None  # the model is left as it was

    # With overwrite, the existing checkpoint survives a failed replacement.
    target = save_pruned(model, None, tmp_path / "pruned")
    before = _snapshot(target)
    with pytest.raises(OSError):
        save_pruned(model, _FailingTokenizer(), target, overwrite=True)
    assert _snapshot(target) == before
    assert [p.name for p in tmp_path.iterdir()] == ["pruned"]


def test_invalid_inputs_fail_before_writing(tmp_path):
    model, _ = tiny_model("llama")
    with pytest.raises(ValueError, match="JSON"):
        save_pruned(model, None, tmp_path / "a", recipe={"mask": torch.ones(1)})
    with pytest.raises(ValueError, match="min_sparsity"):
        save_pruned(model, None, tmp_path / "b", min_sparsity=0.0)
    assert list(tmp_path.iterdir()) == []


def test_newer_format_version_and_corrupt_checkpoint_fail_clearly(tmp_path):
    model, tokenizer = tiny_model("llama")
    _prune(model, "2:4")
    path = save_pruned(model, tokenizer, tmp_path / "pruned")

    newer = tmp_path / "newer"
    save_pruned(model, None, newer)
    config = json.loads((newer / "config.json").read_text())
    config["quantization_config"]["format_version"] = 99
    (newer / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="upgrade hf_compress"):
        AutoModelForCausalLM.from_pretrained(newer)

    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.0.mlp.up_proj.weight_bitmask"]
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointIntegrityError, match="disagree: 1 module.*up_proj"):
        AutoModelForCausalLM.from_pretrained(path)

    fewer_blocks = tmp_path / "fewer-blocks"  # config.json edited to describe a smaller model than the weights
    save_pruned(model, None, fewer_blocks)
    config = json.loads((fewer_blocks / "config.json").read_text())
    config["num_hidden_layers"] = 1
    (fewer_blocks / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointIntegrityError, match="stores 7 weight.*the model does not have"):
        AutoModelForCausalLM.from_pretrained(fewer_blocks)


def test_the_format_is_not_an_on_the_fly_quantization(tmp_path):
    model, _ = tiny_model("llama", save_dir=tmp_path / "dense")
    with pytest.raises(ValueError, match="checkpoint format"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "dense", quantization_config=SparseStorageConfig())


# --------------------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------------------


def test_registered_with_transformers():
    assert FORMAT_NAME in registered_formats()
    assert quantizers_auto.AUTO_QUANTIZER_MAPPING[FORMAT_NAME] is registered_formats()[FORMAT_NAME]
    assert quantizers_auto.AUTO_QUANTIZATION_CONFIG_MAPPING[FORMAT_NAME] is SparseStorageConfig
    # Registering again (e.g. after a module reload) is harmless: the same entries stay.
    hf_compress.formats.base.register_format(registered_formats()[FORMAT_NAME])
    assert quantizers_auto.AUTO_QUANTIZER_MAPPING[FORMAT_NAME] is registered_formats()[FORMAT_NAME]
    assert quantizers_auto.AUTO_QUANTIZATION_CONFIG_MAPPING[FORMAT_NAME] is SparseStorageConfig


def test_a_name_another_library_registered_is_refused(monkeypatch):
    from hf_compress import _compat

    class ForeignConfig:  # another library's config under our name
        pass

    monkeypatch.setitem(quantizers_auto.AUTO_QUANTIZATION_CONFIG_MAPPING, FORMAT_NAME, ForeignConfig)
    with pytest.raises(ValueError, match="already registered with transformers by .*ForeignConfig"):
        _compat.register_quantization_format(FORMAT_NAME, SparseStorageConfig, registered_formats()[FORMAT_NAME])
    assert quantizers_auto.AUTO_QUANTIZATION_CONFIG_MAPPING[FORMAT_NAME] is ForeignConfig  # nothing replaced


def test_plain_transformers_refuses_and_import_registers(tmp_path):
    """In a fresh interpreter: without hf_compress the load fails loudly; after the import it loads."""
    model, tokenizer = tiny_model("llama")
    _prune(model, "2:4")
    path = save_pruned(model, tokenizer, tmp_path / "pruned")
    script = textwrap.dedent(
        f"""
        import sys
        from transformers import AutoModelForCausalLM
        try:
            AutoModelForCausalLM.from_pretrained({str(path)!r})
        except RuntimeError as error:
            print("REFUSED:", error, file=sys.stderr)
        else:
            sys.exit("loaded without hf_compress")
        import hf_compress
        model = AutoModelForCausalLM.from_pretrained({str(path)!r})
        print(float(model.model.layers[0].mlp.up_proj.weight.double().abs().sum()))
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "REFUSED:" in result.stderr
    assert FORMAT_NAME in result.stderr  # transformers' "Unknown quantization type, got hf_compress_sparse"
    assert "up_proj.weight" in result.stderr and "MISMATCH" in result.stderr
    expected = float(model.model.layers[0].mlp.up_proj.weight.detach().double().abs().sum())
    assert float(result.stdout.strip().splitlines()[-1]) == expected


def test_stored_bytes_of_an_offloaded_model_are_its_weights_not_placeholders():
    from accelerate import cpu_offload

    from hf_compress.recipe.measure import weight_bytes

    model, _ = tiny_model("llama")
    _prune(model, "50%")
    expected = weight_bytes(model)
    cpu_offload(model, execution_device="cpu")  # every weight a 'meta' placeholder, read through a hook
    assert weight_bytes(model) == expected and expected["stored_bytes"] > expected["decoder_linear_bytes"] > 0


def test_a_pruner_whose_save_takes_no_progress_still_saves(tmp_path):
    from hf_compress.pruning import MagnitudeConfig, MagnitudePruner

    class OldStylePruner(MagnitudePruner):
        def save(self, save_dir, overwrite, config):  # written before save took `progress`
            super().save(save_dir, overwrite, config)

    model, tokenizer = tiny_model("llama")
    OldStylePruner(model, tokenizer).prune(MagnitudeConfig(sparsity=0.5), None, save_dir=tmp_path / "out", progress=False)
    _assert_same_weights(model, AutoModelForCausalLM.from_pretrained(tmp_path / "out"))


def test_an_offloaded_models_weights_are_read_from_its_store_without_a_copy(tmp_path):
    # Saving a CPU-offloaded model copied every weight out of the offload store first: twice the model in memory, on
    # exactly the machines that offload because memory is short.
    from accelerate import cpu_offload, disk_offload

    from hf_compress.pruning.storage import fill_offloaded

    model, _ = tiny_model("llama")
    _prune(model, "50%")
    expected = {key: tensor.clone() for key, tensor in model.state_dict().items()}
    cpu_offload(model, execution_device="cpu")
    state_dict = model.state_dict()
    fill_offloaded(model, state_dict)
    stores = {}
    for name, module in model.named_modules():
        hook = getattr(module, "_hf_hook", None)
        if getattr(hook, "weights_map", None) is not None:
            for key, _ in module.named_parameters(recurse=hook.place_submodules):
                stores[f"{name}.{key}" if name else key] = hook.weights_map[key]
    assert state_dict.keys() == expected.keys()
    for key, tensor in state_dict.items():
        assert torch.equal(tensor, expected[key]), key
        assert tensor.data_ptr() == stores[key].data_ptr(), f"{key} was copied out of the store"

    # A disk store hands out a fresh copy at each read: the values are still the model's.
    model, _ = tiny_model("llama")
    expected = {key: tensor.clone() for key, tensor in model.state_dict().items()}
    disk_offload(model, str(tmp_path / "offload"), execution_device="cpu")
    state_dict = model.state_dict()
    assert any(tensor.is_meta for tensor in state_dict.values())
    fill_offloaded(model, state_dict)
    assert all(torch.equal(state_dict[key], expected[key]) for key in expected)


def test_the_cards_snippet_loads_no_tokenizer_the_folder_does_not_hold(tmp_path):
    # The snippet told users to load a tokenizer from a folder saved without one.
    model, tokenizer = tiny_model("llama")
    _prune(model, "2:4")
    save_pruned(model, None, tmp_path / "bare", base_model="org/base")
    save_pruned(model, None, tmp_path / "unnamed")
    save_pruned(model, tokenizer, tmp_path / "whole", base_model="org/base")
    bare = (tmp_path / "bare" / "README.md").read_text()
    assert 'AutoTokenizer.from_pretrained("bare")' not in bare and 'AutoModelForCausalLM.from_pretrained("bare")' in bare
    assert 'tokenizer = AutoTokenizer.from_pretrained("org/base")  # this folder holds no tokenizer' in bare
    assert "# this folder holds no tokenizer: load the one" in (tmp_path / "unnamed" / "README.md").read_text()
    whole = (tmp_path / "whole" / "README.md").read_text()
    assert "holds no tokenizer" not in whole and 'tokenizer = AutoTokenizer.from_pretrained("whole")' in whole
