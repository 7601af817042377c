"""Saving pruned models sparse, so that a plain ``from_pretrained`` restores them exactly.

``save_pruned`` writes a normal transformers checkpoint folder (``config.json``,
``generation_config.json``, safetensors shards, tokenizer files) in which every linear weight of the
decoder blocks that is sparse enough is stored in the ``hf_compress_sparse`` bitmask encoding
(``hf_compress.formats.sparse``); everything else (embeddings, norms, ``lm_head``, dense
layers) is stored as usual. ``config.json`` records the format, the compressed modules, the
pruning recipe and the measured bytes under ``quantization_config``.

Loading needs nothing but ``import hf_compress`` (which registers the format with transformers)::

    model = AutoModelForCausalLM.from_pretrained(folder)

and gives an ordinary dense model with bit-identical weights (zeros come back as ``+0.0``, see
``formats.sparse``). Its ``save_pretrained`` writes a plain dense checkpoint; call ``save_pruned``
again to store it sparse.

A slim (Týr) model is accepted too: its per-block widths are stored in the sparse config's ``slim`` entry,
and the loaded model has them again (with a ``SlimFormatConfig``, as if loaded from a slim checkpoint).

Example:
    >>> import torch
    >>> from hf_compress.assets import tiny_model
    >>> model, tokenizer = tiny_model("llama")
    >>> with torch.no_grad():
    ...     for block in model.model.layers:
    ...         for layer in (block.mlp.up_proj, block.mlp.down_proj):
    ...             layer.weight[:, ::2] = 0  # 50% sparse
    >>> path = save_pruned(model, tokenizer, "pruned", recipe={"method": "manual"})  # doctest: +SKIP
    >>> AutoModelForCausalLM.from_pretrained(path)  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.core_model_loading import WeightConverter

from .. import _compat
from ..modeling.fused_experts import fused_expert_parameters
from ..modeling.layers import find_decoder_blocks, find_linear_layers, is_offloaded, onloaded
from ..formats.base import quant_method_of
from ..formats.integrity import read_header, seal_checkpoint
from ..formats.shards import TensorSpec, index_weight_files, write_safetensors, write_tensor
from ..formats.slim import FORMAT_NAME as SLIM_FORMAT, slim_record
from ..formats.sparse import (
    BITMASK_SUFFIX,
    SHAPE_SUFFIX,
    VALUES_SUFFIX,
    SparseStorageConfig,
    encode_sparse,
    pack_bitmask,
)
from ..utils import atomic_directory, check_save_dir, get_logger
from ..utils.processes import main_process_only


__all__ = ["PlannedWeight", "SparsePlan", "fill_offloaded", "filled_state_dict", "plan_sparse_storage", "save_pruned",
           "sparse_state_dict"]

logger = get_logger(__name__)

class PlannedWeight(NamedTuple):
    """A weight ``save_pruned`` stores encoded, located and measured but not held: the plan keeps no tensor."""

    name: str  # the linear layer's module name, or the fused expert parameter's key
    key: str  # the dense state-dict key it replaces
    module: nn.Module | None  # the linear layer (read under ``onloaded``); ``None`` for a fused expert parameter
    dtype: torch.dtype
    shape: tuple[int, ...]
    nonzeros: int

    @property
    def stored_keys(self) -> tuple[str, str, str]:
        """Keys of the values, bitmask and shape (a linear weight's values keep its name, see ``formats.sparse``)."""
        values = self.key if self.module is not None else self.key + VALUES_SUFFIX
        return values, self.key + BITMASK_SUFFIX, self.key + SHAPE_SUFFIX

    @property
    def stored_shapes(self) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """Shapes of the values, bitmask and shape tensors, as ``encode_sparse`` makes them."""
        rows = self.shape[0] if len(self.shape) > 1 else 1
        columns = math.prod(self.shape) // rows if rows else 0
        return (self.nonzeros,), (rows, -(-columns // 8)), (len(self.shape),)

    @property
    def nbytes(self) -> int:
        """Bytes of the three stored tensors."""
        values, bitmask, shape = (math.prod(s) for s in self.stored_shapes)
        return values * self.dtype.itemsize + bitmask + shape * 8


class SparsePlan(NamedTuple):
    """What the sparse format stores encoded, and the bytes it takes, found without encoding anything."""

    weights: tuple[PlannedWeight, ...]
    storage: dict[str, Any]

    @property
    def compressed_modules(self) -> list[str]:
        return [weight.name for weight in self.weights if weight.module is not None]

    @property
    def compressed_experts(self) -> list[str]:
        return [weight.name for weight in self.weights if weight.module is None]


def plan_sparse_storage(
    model: PreTrainedModel, min_sparsity: float = 0.25, state_dict: Mapping[str, torch.Tensor] | None = None
) -> SparsePlan:
    """Which decoder-block weights the sparse format stores encoded, and the bytes, without holding any encoding.

    A linear weight (``nn.Linear`` or ``Conv1D``) inside the decoder blocks is encoded when its
    fraction of zeros is at least ``min_sparsity`` and the encoding is actually smaller (below
    ``1 / (8 * itemsize)`` sparsity the bitmask costs more than it saves). Weights that the model's
    own checkpoint conversions rename-and-transform (e.g. fused on disk) are left dense, because
    those conversions would otherwise act on the encoded tensors. The 3-D weights of fused MoE experts
    (``mlp.experts.gate_up_proj``) are encoded by the same rule, under ``<parameter>_values``,
    ``_bitmask`` and ``_shape`` (see ``formats.sparse``). ``state_dict``: the model's, when the caller
    already holds it (offloaded weights filled in).

    ``storage`` holds ``dense_linear_bytes`` (all decoder-block linear and expert weights stored dense),
    ``stored_linear_bytes`` (as the format stores them) and their ``ratio``.

    Example:
        >>> from hf_compress.assets import tiny_model
        >>> model, _ = tiny_model("gpt2")
        >>> with torch.no_grad():
        ...     model.transformer.h[0].mlp.c_fc.weight[::2] = 0
        >>> plan_sparse_storage(model).compressed_modules
        ['transformer.h.0.mlp.c_fc']
    """
    if not 0.0 < min_sparsity <= 1.0:
        raise ValueError(f"min_sparsity must be in (0, 1], got {min_sparsity}.")
    _, blocks = find_decoder_blocks(model)
    targets = {id(layer) for block in blocks for layer in find_linear_layers(block).values()}
    converted = _keys_under_model_conversions(model)
    if state_dict is None:
        state_dict = filled_state_dict(model)  # before reading any weight: refuses a model without weights
    weights: list[PlannedWeight] = []
    dense_bytes = stored_bytes = 0

    def plan(name: str, key: str, module: nn.Module | None, weight: torch.Tensor, eligible: bool) -> None:
        """Adds ``weight`` to the plan when it is sparse enough and the encoding is smaller; counts the bytes."""
        nonlocal dense_bytes, stored_bytes
        nbytes = weight.numel() * weight.element_size()
        dense_bytes += nbytes
        planned = None
        if eligible and weight.ndim > 0:
            nonzeros = int(torch.count_nonzero(weight))
            if (weight.numel() - nonzeros) / max(weight.numel(), 1) >= min_sparsity:
                planned = PlannedWeight(name, key, module, weight.dtype, tuple(weight.shape), nonzeros)
        if planned is None or planned.nbytes >= nbytes:
            stored_bytes += nbytes
            return
        stored_bytes += planned.nbytes
        weights.append(planned)

    for name, module in model.named_modules():
        if id(module) not in targets:
            continue
        key = f"{name}.weight"
        with onloaded(module):  # accelerate-offloaded weights are read from their offload store
            # A weight stored under another name (e.g. a torch parametrization) or transformed by the model's
            # own conversions stays dense.
            plan(name, key, module, module.weight.detach(), key in state_dict and key not in converted)
    # Fused MoE experts (3-D parameters): saving would split `gate_up_proj` one tensor per expert through the model's
    # own conversions, which encoded values would not survive, so the encoding goes under keys no conversion matches.
    parameters = dict(model.named_parameters())
    for key in [key for key in fused_expert_parameters(model, recognised_only=True) if key in parameters]:
        # One stored under another name stays dense, as does one named `weight`: loading would take its bitmask and
        # shape for a linear weight's (no known experts module names one so).
        eligible = key in state_dict and key.rpartition(".")[2] != "weight"
        plan(key, key, None, state_dict[key] if key in state_dict else parameters[key].detach(), eligible)
    storage = {
        "dense_linear_bytes": dense_bytes,
        "stored_linear_bytes": stored_bytes,
        "ratio": round(stored_bytes / dense_bytes, 6) if dense_bytes else 1.0,
    }
    # Linear layers first, then expert parameters: the order `compressed` has always had.
    ordered = [w for w in weights if w.module is not None] + [w for w in weights if w.module is None]
    return SparsePlan(tuple(ordered), storage)


def _from_weight(weight: PlannedWeight, state_dict: Mapping[str, torch.Tensor],
                 make: Callable[[torch.Tensor], Any]) -> Any:
    """``make`` applied to the planned weight's dense tensor (a linear layer's onloaded while ``make`` runs, when it
    is offloaded)."""
    if weight.module is None:
        return make(state_dict[weight.key])
    with onloaded(weight.module):
        return make(weight.module.weight.detach())


def sparse_state_dict(
    model: PreTrainedModel, min_sparsity: float = 0.25
) -> tuple[dict[str, torch.Tensor], list[str], dict[str, Any]]:
    """The model's state dict with sparse-enough decoder-block linear weights in the stored encoding.

    Which weights, by :func:`plan_sparse_storage`'s rule. This holds every encoded weight at once (about half
    the pruned weights' bytes at 50% sparsity, on top of the model); ``save_pruned`` does not build it: it
    makes and writes one encoded tensor at a time.

    Returns:
        ``(state_dict, compressed, storage)``: ``compressed`` names the modules whose weight is encoded, then
        the encoded fused expert parameters; ``storage`` as :func:`plan_sparse_storage` counts it.

    Example:
        >>> from hf_compress.assets import tiny_model
        >>> model, _ = tiny_model("gpt2")
        >>> with torch.no_grad():
        ...     model.transformer.h[0].mlp.c_fc.weight[::2] = 0
        >>> state, modules, storage = sparse_state_dict(model)
        >>> modules
        ['transformer.h.0.mlp.c_fc']
        >>> sorted(k.rpartition(".")[2] for k in state if k.startswith("transformer.h.0.mlp.c_fc."))
        ['bias', 'weight', 'weight_bitmask', 'weight_shape']
    """
    state_dict = filled_state_dict(model)
    plan = plan_sparse_storage(model, min_sparsity, state_dict)
    for weight in plan.weights:
        packed = _from_weight(weight, state_dict, encode_sparse)
        del state_dict[weight.key]
        state_dict.update(zip(weight.stored_keys, packed))
    return state_dict, [weight.name for weight in plan.weights], plan.storage


@main_process_only("save_dir")
def save_pruned(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | None,
    save_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
    recipe: Mapping[str, Any] | Any | None = None,
    min_sparsity: float = 0.25,
    max_shard_size: int | str = "5GB",
    model_name: str | None = None,
    base_model: str | None = None,
    progress: bool = True,
) -> Path:
    """Save a pruned model (and its tokenizer) with sparse linear weights, and its model card;
    ``from_pretrained`` restores it.

    Args:
        model: a transformers model (not PEFT-wrapped: merge adapters first with ``merge_and_unload``).
        tokenizer: saved alongside when given.
        save_dir: the checkpoint folder. Written atomically: the files are staged in a temporary folder
            next to it and moved into place at the end, so a failure leaves nothing behind.
        overwrite: save into a folder that is not empty (e.g. holds a model, or a README). Files the save
            does not write are kept, except the old weight files.
        recipe: the pruning recipe recorded in ``config.json`` (a JSON-ready mapping, or an object with
            ``to_dict()`` such as a ``PruningConfig``). By default, the one the pruners leave in
            ``model.config.hf_compress["pruning"]``, if any.
        min_sparsity: decoder-block linear weights with at least this fraction of zeros are stored sparse.
        max_shard_size: the largest weight file: passed to ``save_pretrained`` for the weights stored dense, and
            the size of the shards the encoded weights go to when they do not fit beside them in one file. Either
            way each encoded tensor is made, written and dropped before the next, so saving holds one weight's
            encoding at a time beside the model.
        model_name: the card's title (default: the folder's name).
        base_model: the Hub id the card names as the base (default: the model's own, or the original base an
            earlier hf_compress step recorded; a local path is never written).
        progress: a progress bar over the encoded tensors as they are written.

    Returns:
        The folder. Bytes of the decoder-block linear weights, dense versus stored, are logged and
        recorded in ``config.json`` under ``quantization_config.storage``.

    Raises:
        FileExistsError: ``save_dir`` is a file, or a non-empty folder and ``overwrite`` is false.
        ValueError: the model is quantized (a slim model's widths are fine), carries PEFT adapters, or
            ``recipe`` is not JSON-serialisable.

    Example:
        >>> path = save_pruned(model, tokenizer, "llama-2-4", recipe=config)  # doctest: +SKIP
        >>> AutoModelForCausalLM.from_pretrained(path)  # after `import hf_compress`  # doctest: +SKIP
    """
    from ..hub import base_model_of, base_weights_of, build_model_card, write_model_card
    from ..hub.model_card import with_earlier_pruning

    target = check_save_dir(save_dir, overwrite)
    _check_model(model)
    if recipe is None:  # the pruners record theirs on the config (``hf_compress.pruning.base.RECIPE_KEY``)
        recorded = getattr(model.config, "hf_compress", None)
        recipe = recorded.get("pruning") if isinstance(recorded, Mapping) else None
    recipe_dict = _recipe_to_dict(recipe)

    state_dict = filled_state_dict(model)  # before reading any weight: refuses a model without weights
    plan = plan_sparse_storage(model, min_sparsity, state_dict)
    for weight in plan.weights:  # a linear weight is read from its layer when written: drop an offloaded one's copy
        if weight.module is not None:
            state_dict.pop(weight.key)
    # The names save_pretrained would give the encoded tensors, found before anything is written.
    stored_keys = _compat.checkpoint_keys_of(model, [key for weight in plan.weights for key in weight.stored_keys])
    storage = plan.storage
    quantization_config = SparseStorageConfig(
        compressed_modules=plan.compressed_modules, compressed_experts=plan.compressed_experts,
        min_sparsity=min_sparsity, recipe=recipe_dict, storage=storage,
        slim=slim_record(model),  # None unless the blocks have their own widths (Týr)
    )
    with atomic_directory(target, overwrite=overwrite) as staging:
        with _attached(model, quantization_config), _compat.quiet_weight_progress():
            # save_pretrained writes config/generation config, drops tied duplicates (lm_head) and shards the
            # weights stored dense; the encoded ones are written after, one tensor at a time.
            encoded = {weight.key for weight in plan.weights}
            dense = {key: tensor for key, tensor in state_dict.items() if key not in encoded}
            model.save_pretrained(staging, state_dict=dense, max_shard_size=max_shard_size)
        del dense
        _write_encoded_shards(model, plan, state_dict, stored_keys, staging, max_shard_size, progress=progress)
        seal_checkpoint(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        # The card states the recipe, the stored bytes and where the base weights came from; no metrics, since
        # nothing was measured here (hf_compress.evaluation's records can be added with write_model_card).
        card_recipe, earlier_methods = with_earlier_pruning({**(recipe_dict or {"method": "sparse"}), "storage": storage},
                                                            model.config)
        card = build_model_card(
            base_model=base_model or base_model_of(model.config), model_name=model_name or target.name,
            recipe=card_recipe, base_weights=base_weights_of(model.config), extra_tags=earlier_methods,
        )
        write_model_card(staging, card)
    logger.info(
        "saved %s: %d decoder-block linear weights sparse, %d -> %d bytes (%.3fx)", target,
        len(plan.weights), storage["dense_linear_bytes"], storage["stored_linear_bytes"], storage["ratio"],
    )
    return target


def _write_encoded_shards(model: PreTrainedModel, plan: SparsePlan, state_dict: Mapping[str, torch.Tensor],
                          stored_key: Mapping[str, str], folder: Path, max_shard_size: int | str,
                          progress: bool = True) -> None:
    """Write the planned weights encoded, a row block of one weight in memory at a time, next to the dense weights
    ``save_pretrained`` wrote in ``folder``.

    When everything fits in one file of ``max_shard_size`` (and ``save_pretrained`` wrote one), the encodings join
    the dense tensors in ``model.safetensors``, which is rewritten (its tensors copied in chunks: the dense bytes
    are written twice, and the disk holds both copies for a moment); otherwise they go to shards of their own and
    every weight file is indexed as one sharded checkpoint. A weight's three tensors stay in one file, under
    ``stored_key`` (the names ``save_pretrained`` would give them: the architecture's renamings reverted).
    """
    from huggingface_hub import split_state_dict_into_shards_factory
    from ..utils import progress_bar
    from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

    if not plan.weights:
        return
    bar = progress_bar(total=2 * len(plan.weights), desc="writing sparse weights", unit="tensor", disable=not progress,
               leave=False)

    def specs(weight: PlannedWeight) -> list[TensorSpec]:
        """The weight's values, bitmask and shape, each written when its turn comes, from row blocks of the weight
        (so a weight over 64 MB never has its whole mask or values in memory)."""
        def block_by_block(encode: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[BinaryIO], None]:
            def write(handle: BinaryIO) -> None:
                bar.update()
                _from_weight(weight, state_dict, lambda dense: [write_tensor(handle, encode(rows))
                                                                for rows in _row_blocks(dense)])
            return write

        values_key, bitmask_key, shape_key = (stored_key[key] for key in weight.stored_keys)
        values_shape, bitmask_shape, _ = weight.stored_shapes
        return [TensorSpec(values_key, weight.dtype, values_shape, block_by_block(lambda rows: rows[rows != 0])),
                TensorSpec(bitmask_key, torch.uint8, bitmask_shape, block_by_block(lambda rows: pack_bitmask(rows != 0))),
                TensorSpec.of(shape_key, torch.tensor(weight.shape, dtype=torch.int64, device="cpu"))]  # metadata

    single = folder / SAFE_WEIGHTS_NAME
    sizes = {weight.key: weight.nbytes for weight in plan.weights}
    with bar:
        if not (folder / SAFE_WEIGHTS_INDEX_NAME).exists():
            entries = read_header(single)
            # Would the dense file (one entry, "") and the encodings fit in one shard?
            together = split_state_dict_into_shards_factory(
                {"": sum(e.end - e.begin for e in entries.values()), **sizes}, get_storage_size=lambda size: size,
                filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_size,
            )
            if not together.is_sharded:
                merged = folder / (SAFE_WEIGHTS_NAME + ".partial")
                write_safetensors(merged, [TensorSpec.copied_from(name, entry) for name, entry in entries.items()]
                                  + [spec for weight in plan.weights for spec in specs(weight)],
                                  metadata=_file_metadata(single))
                merged.replace(single)
                return
        split = split_state_dict_into_shards_factory(
            sizes, get_storage_size=lambda size: size, filename_pattern="sparse{suffix}.safetensors",
            max_shard_size=max_shard_size,
        )
        weights = {weight.key: weight for weight in plan.weights}
        added: dict[str, list[str]] = {}
        for filename, keys in split.filename_to_tensors.items():
            shard = [spec for key in keys for spec in specs(weights[key])]
            write_safetensors(folder / filename, shard, metadata={"format": "pt"})
            added[filename] = [spec.name for spec in shard]
    index_weight_files(folder, added, total_parameters=model.num_parameters())


def _row_blocks(dense: torch.Tensor, block_bytes: int = 64 * 2**20) -> Iterator[torch.Tensor]:
    """Views of ``dense`` of whole rows (its first dimension), about ``block_bytes`` each; a 1-D tensor is one row.
    The bitmask packs row by row and the values are row-major, so the blocks' encodings laid end to end are the
    whole tensor's."""
    if dense.ndim < 2:
        yield dense
        return
    rows = max(1, block_bytes // max(1, dense[0].numel() * dense.element_size()))
    for start in range(0, dense.shape[0], rows):
        yield dense[start:start + rows]


def _file_metadata(path: Path) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file (transformers writes ``{"format": "pt"}``)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata() or {"format": "pt"})


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------


def _check_model(model: nn.Module) -> None:
    if not isinstance(model, PreTrainedModel):
        name = type(model).__name__
        hint = " Merge PEFT adapters first (merge_and_unload())." if hasattr(model, "peft_config") else ""
        raise TypeError(f"save_pruned expects a transformers PreTrainedModel, not {name}.{hint}")
    if _compat.has_peft_adapters(model):
        raise ValueError("the model carries PEFT adapters; merge them into the weights first.")
    quantization = getattr(model.config, "quantization_config", None)
    method = quant_method_of(quantization)
    if method == SLIM_FORMAT and _compat.quantizer_of(model) is None:
        return  # a slim model: float weights, its widths go into the sparse config (slim_record)
    if _compat.quantizer_of(model) is not None or quantization:
        raise ValueError(f"the model is quantized ({method or 'unknown method'}); sparse storage needs dense float "
                         "weights.")


def filled_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with the values of accelerate-offloaded weights in place of their ``meta`` placeholders
    (:func:`fill_offloaded`): what saving and byte counts read.

    Example:
        >>> from hf_compress.assets import tiny_model
        >>> from accelerate import cpu_offload
        >>> model = cpu_offload(tiny_model("llama")[0], execution_device="cpu")
        >>> any(tensor.is_meta for tensor in filled_state_dict(model).values())
        False
    """
    state_dict = model.state_dict()
    fill_offloaded(model, state_dict)
    return state_dict


def fill_offloaded(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Replace the ``meta`` placeholders of accelerate-offloaded weights in ``state_dict`` with their values.

    ``model.state_dict()`` of an offloaded model (``cpu_offload``, ``device_map`` with ``"cpu"``/``"disk"``) holds
    ``meta`` tensors, which safetensors cannot write. The values are the offload store's own tensors where it holds
    them under the parameter's name and dtype: a CPU store's are already in memory, so filling copies nothing (a
    disk store reads each one). Anything else is read by onloading its module, one at a time. A ``meta`` tensor that
    no offload hook holds (a model that was never loaded) is refused.
    """
    if not any(tensor.is_meta for tensor in state_dict.values()):
        return
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        missing = [key for key in module.state_dict(keep_vars=True) if state_dict.get(prefix + key) is not None
                   and state_dict[prefix + key].is_meta]
        if not missing or not is_offloaded(module):
            continue
        store = _compat.accelerate_hook(module).weights_map
        unread = []
        for key in missing:
            try:
                stored = store[key]
            except KeyError:  # a child's weight under the child's own hook, or a store keyed otherwise
                stored = None
            if stored is None or stored.is_meta or stored.dtype != state_dict[prefix + key].dtype:
                unread.append(key)
            else:
                state_dict[prefix + key] = stored.detach()
        if not unread:
            continue
        with onloaded(module):
            values = module.state_dict()
            for key in unread:
                if not values[key].is_meta:
                    state_dict[prefix + key] = values[key].detach().to("cpu", copy=True)
    left = [key for key, tensor in state_dict.items() if tensor.is_meta]
    if left:
        raise ValueError(
            f"{len(left)} tensors of the model are on the 'meta' device with no offloaded copy to read "
            f"({', '.join(left[:3])}{', ...' if len(left) > 3 else ''}): the model holds no weights there. Load it "
            "with from_pretrained (device_map offloading is supported)."
        )


def _recipe_to_dict(recipe: Any) -> dict[str, Any] | None:
    if recipe is None:
        return None
    if hasattr(recipe, "to_dict"):
        recipe = recipe.to_dict()
    if not isinstance(recipe, Mapping):
        raise ValueError(f"recipe must be a mapping or have to_dict(), got {type(recipe).__name__}.")
    try:  # fail before writing anything, not inside save_pretrained
        return json.loads(json.dumps(dict(recipe)))
    except (TypeError, ValueError) as error:
        raise ValueError(f"recipe must be JSON-serialisable: {error}") from error


@contextlib.contextmanager
def _attached(model: PreTrainedModel, quantization_config: SparseStorageConfig) -> Iterator[None]:
    """The model's config carries ``quantization_config`` inside the block only (``_check_model`` made
    sure it had none, or a slim one, put back after), so that save_pretrained writes it to config.json and the
    model is left unchanged."""
    previous = getattr(model.config, "quantization_config", None)
    model.config.quantization_config = quantization_config
    try:
        yield
    finally:
        if previous is None:
            del model.config.quantization_config
        else:
            model.config.quantization_config = previous


def _keys_under_model_conversions(model: PreTrainedModel) -> set[str]:
    """Parameter names that the model's checkpoint conversions transform with an operation on save/load.

    save_pretrained reverts these conversions (e.g. re-fuses split projections) and from_pretrained
    applies them; on encoded tensors both would be wrong, so such weights are stored dense.
    """
    converters = [c for c in _compat.model_conversions(model) if isinstance(c, WeightConverter)]
    if not converters:
        return set()
    reversed_converters = []
    for converter in converters:
        try:
            reversed_converters.append(converter.reverse_transform())
        except (ValueError, NotImplementedError):
            reversed_converters.append(converter)
    names = [name for name, _ in model.named_parameters()]
    return {
        name for name in names
        if any(c.rename_source_key(name)[1] is not None for c in reversed_converters)
    }
