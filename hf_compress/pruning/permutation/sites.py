"""Where a channel permutation can act on a transformer without changing its function (or its runtime).

N:M groups are consecutive *input* channels of a weight, so a permutation must reorder the inputs of
the layers we prune; to be free at run time it must also reorder the *outputs* of whatever produces
those inputs, so the permuted model computes exactly what the original did with no gather. The sites:

- **FFN** (``down_proj`` / ``fc2`` input, one per block, any permutation of the intermediate channels):
  the rows of ``gate_proj`` and ``up_proj`` (``fc1``) and their biases move with it; the elementwise
  ``act(gate) * up`` is channel-wise, so nothing else changes.
- **attention head** (``o_proj`` input, one site per key/value head, a permutation of ``head_dim``):
  the value head's rows of ``v_proj`` (and bias) move with it, and the permutation is applied to the
  ``o_proj`` columns of *every* query head that reads that value head (grouped-query attention
  shares values, so the query heads of one group must share one permutation). Channels never cross
  heads (attention mixes tokens per head); ``q``/``k`` rows are never touched (RoPE pairs them).
- **residual stream** (input of ``q/k/v_proj`` and ``gate/up_proj``, ``fc1``, and ``lm_head``): the
  stream is read by every block through a normalisation that reduces over all channels (RMSNorm,
  LayerNorm: invariant to their order) and written by every block's ``o_proj`` / ``down_proj``. A
  per-layer permutation of these readers would need a runtime gather ``x[..., p]`` before them; one
  *shared* permutation for the whole model is free: it moves the embedding columns (and learned
  positions), every norm's weight and bias, every reader's columns, every writer's rows and biases,
  and ``lm_head``'s columns. That is the choice made here: one stream permutation per model.

``find_sites`` discovers them (through ``modeling.structure``; a sub-block BlockPruner removed has none)
and refuses models where some parameter is neither a known reader nor a known writer of the stream (fused
``c_attn``, projections in/out of the embedding width, ...): permuting them would silently change the function.

Example:
    >>> from hf_compress.assets import tiny_model
    >>> sites = find_sites(tiny_model("llama")[0])
    >>> [(s.kind, s.width) for s in sites][:3]
    [('stream', 64), ('attention', 16), ('attention', 16)]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import nn

from ...modeling import find_decoder_blocks, find_linear_layers
from ...modeling.structure import FeedForwardStructure, attention_structure, feed_forward_structure
from ...modeling.sublayers import removed_sublayers

__all__ = ["PermutationSite", "Reader", "Writer", "find_sites"]


@dataclass
class Reader:
    """A layer whose input columns ``start .. start + site.width`` the site permutes."""

    name: str
    layer: nn.Linear
    start: int = 0
    scored: bool = True
    """Whether the layer is pruned (its N:M groups are what the permutation optimises)."""


@dataclass
class Writer:
    """A tensor whose slice ``start .. start + site.width`` along ``dim`` the site permutes."""

    name: str
    tensor: nn.Parameter
    dim: int
    start: int = 0


@dataclass
class PermutationSite:
    """One set of channels permuted together: its width, its readers and the writers that absorb it."""

    name: str
    kind: str
    """``"stream"``, ``"attention"`` or ``"ffn"``."""
    width: int
    readers: list[Reader] = field(default_factory=list)
    writers: list[Writer] = field(default_factory=list)

    @property
    def scored_readers(self) -> list[Reader]:
        return [reader for reader in self.readers if reader.scored]


def find_sites(model: nn.Module, skip: Sequence[str] = ()) -> list[PermutationSite]:
    """Every permutation site of ``model``: the stream first, then per block its heads and its FFN.

    ``skip`` are the pruner's skip patterns: skipped layers are still permuted (they must be, to keep
    the function) but their weights do not count in the objective.

    Raises:
        ValueError: the model's blocks have no separate q/k/v/o and FFN ``nn.Linear`` layers, or some
            parameter touches the residual stream in a way the library does not know.
    """
    if hasattr(model, "peft_config"):  # its linears are wrapped by the adapter's layers, not missing
        raise ValueError("channel permutation moves the base weights, and this model carries PEFT adapters around them; "
                         "merge them first (model = model.merge_and_unload()) or prune the base model.")
    block_prefix, blocks = find_decoder_blocks(model)
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if not isinstance(embeddings, nn.Embedding):
        raise ValueError(f"{type(model).__name__} has no nn.Embedding input embeddings; cannot permute its stream.")
    hidden = embeddings.embedding_dim
    module_names = {id(module): name for name, module in model.named_modules()}
    stream = PermutationSite("stream", "stream", hidden)
    heads: list[list[PermutationSite]] = []  # per block: blocks may keep different numbers of heads (Týr)
    ffns: list[PermutationSite | None] = []  # None: the block's MLP was removed (BlockPruner)
    covered: set[int] = set()  # parameters the sites account for (moved, or not on the stream)
    inside_attention: set[int] = set()

    for index, block in enumerate(blocks):
        prefix = f"{block_prefix}.{index}"
        # A sub-block BlockPruner removed (a parameter-free stand-in adding zeros) neither reads nor writes the stream.
        gone = removed_sublayers(block)
        try:
            attention = None if gone["attention"] else attention_structure(block)
            ffn = None if gone["mlp"] else feed_forward_structure(block)
        except ValueError as error:
            raise ValueError(f"channel permutation needs separate q/k/v/o and FFN nn.Linear layers ({error}); prune "
                             "this model with permutation=None.") from None
        pruned = {id(layer) for layer in find_linear_layers(block, skip, qualified_prefix=prefix).values()}
        attention_layers = [] if attention is None else [attention.q, attention.k, attention.v, attention.output]
        ffn_layers = [] if ffn is None else [*ffn.inputs, ffn.output]
        stream_readers = [*attention_layers[:3], *ffn_layers[:-1]]
        for layer in stream_readers:
            if layer.in_features != hidden:
                raise ValueError(f"{module_names[id(layer)]} reads {layer.in_features} channels, not the stream's "
                                 f"{hidden}; its residual stream cannot be permuted. Use permutation=None.")
            stream.readers.append(Reader(module_names[id(layer)], layer, 0, id(layer) in pruned))
        for layer in (*attention_layers[3:], *ffn_layers[-1:]):
            _add_writer_rows(stream, module_names[id(layer)], layer, 0)
        for layer in (*attention_layers, *ffn_layers):
            covered.update(id(p) for p in layer.parameters())
        heads.append([])
        if attention is not None:
            for module in attention.module.modules():
                inside_attention.update(id(p) for p in module.parameters(recurse=False))
            head_dim, per_unit = attention.head_dim, attention.heads_per_unit
            output_name = module_names[id(attention.output)]
            for unit in range(attention.num_units):
                site = PermutationSite(f"{prefix}.{attention.path}[kv head {unit}]", "attention", head_dim)
                for head in range(unit * per_unit, (unit + 1) * per_unit):
                    site.readers.append(Reader(output_name, attention.output, head * head_dim,
                                               id(attention.output) in pruned))
                _add_writer_rows(site, module_names[id(attention.v)], attention.v, unit * head_dim)
                heads[-1].append(site)
        ffns.append(None if ffn is None else _ffn_site(prefix, ffn, module_names, pruned))

    # The stream's other writers: embeddings (also learned positions) and every normalisation outside attention.
    output_embeddings = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name, module in model.named_modules():
        own = list(module.named_parameters(recurse=False))
        if not own or any(id(p) in covered or id(p) in inside_attention for _, p in own):
            continue
        if module is output_embeddings and isinstance(module, nn.Linear) and module.in_features == hidden:
            stream.readers.append(Reader(name, module, 0, scored=False))
            covered.update(id(p) for _, p in own)
            if module.bias is not None:  # a vocabulary bias is not on the stream
                covered.add(id(module.bias))
        elif isinstance(module, nn.Embedding) and module.embedding_dim == hidden:
            stream.writers.append(Writer(f"{name}.weight", module.weight, 1))
            covered.add(id(module.weight))
        elif all(p.ndim == 1 and p.shape[0] == hidden for _, p in own) and not isinstance(module, nn.Linear):
            for pname, parameter in own:  # a norm's scale/shift over the stream
                stream.writers.append(Writer(f"{name}.{pname}", parameter, 0))
                covered.add(id(parameter))
    unknown = [name for name, p in model.named_parameters() if id(p) not in covered and id(p) not in inside_attention]
    if unknown:
        raise ValueError(
            f"channel permutation cannot be absorbed in {type(model).__name__}: {', '.join(unknown[:4])}"
            f"{', ...' if len(unknown) > 4 else ''} touch(es) the residual stream in a way the library does not "
            "know (only embeddings, norms and q/k/v/o, FFN and lm_head linear layers are). Use permutation=None."
        )
    return [stream, *(site for block_heads, ffn in zip(heads, ffns, strict=True)
                      for site in (*block_heads, *([] if ffn is None else [ffn])))]


def _ffn_site(prefix: str, ffn: FeedForwardStructure, module_names: dict[int, str],
              pruned: set[int]) -> PermutationSite:
    """The FFN's intermediate channels: ``down_proj``'s (``fc2``'s) input columns, ``gate``/``up`` (``fc1``) rows."""
    site = PermutationSite(f"{prefix}.{'.'.join(p for p in (ffn.path, ffn.output_name) if p)}", "ffn",
                           ffn.output.in_features)
    site.readers.append(Reader(module_names[id(ffn.output)], ffn.output, 0, id(ffn.output) in pruned))
    for layer in ffn.inputs:
        _add_writer_rows(site, module_names[id(layer)], layer, 0)
    return site


def _add_writer_rows(site: PermutationSite, name: str, layer: nn.Linear, start: int) -> None:
    site.writers.append(Writer(f"{name}.weight", layer.weight, 0, start))
    if layer.bias is not None:
        site.writers.append(Writer(f"{name}.bias", layer.bias, 0, start))

