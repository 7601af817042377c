"""``BlockwisePermutationLearner``: learn the permutations one decoder block at a time, on captured activations.

The whole-model objectives (``learned.py``: the paper's CE + layer-wise distillation, PermLLM's
cosine) cost a full forward and backward of the model, the LM head included, per step — on 2 CPU
cores about a minute and a half for SmolLM2-135M, so a 45-minute budget buys a few dozen steps. This
learner makes a step cheap: the dense model's inputs of every decoder block are captured once on the
training windows (``modeling.for_each_block``, the calibration mechanism every pruner uses), and
a step runs each block (or ``blocks_per_step`` random ones) on its *dense* inputs with the
permuted-and-pruned effective weights of its layers, scoring

    Σ_blocks ‖block_pruned(x_dense) − block_dense(x_dense)‖² / ‖block_dense(x_dense) − x_dense‖²

— each block's error relative to what the block adds to the residual stream, so every block counts
alike. Blocks are independent given their captured inputs, so each one's graph is freed before the
next (``torch.utils.checkpoint``: the block is recomputed in the backward instead of being held). The
residual-stream costs get gradient from every block, a block's head and FFN costs from that block.

This objective is a labelled choice of this library, not the paper's: the paper trains next-token CE +
1e-5 · Smooth-L1 distillation of every layer's hidden states through the whole network; PermLLM uses
1 − cosine of the final output. Block reconstruction on dense inputs is the layer-wise objective
Wanda and SparseGPT themselves optimise, and close to the paper's distillation term.

Example:
    >>> from hf_compress.assets import tiny_model
    >>> from hf_compress.pruning.permutation.sites import find_sites
    >>> model, _ = tiny_model("llama")
    >>> ids = torch.randint(3, 256, (2, 16))
    >>> learner = BlockwisePermutationLearner(model, find_sites(model), None, LearnedPermutationConfig(groups=4),
    ...                                       kept=2, group=4, training_ids=ids)
    >>> learner(index=torch.tensor([0]))["loss"].backward()
    >>> all(cost.grad is not None for cost in learner.costs)
    True
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ...modeling import find_decoder_blocks, for_each_block
from ...modeling.calibration import BlockCall
from .config import LearnedPermutationConfig
from .learned import PermutationLearner
from .sites import PermutationSite

__all__ = ["BlockwisePermutationLearner"]


class _BlockRunner(nn.Module):
    """Runs one decoder block with the arguments the model gives it (for ``functional_call``)."""

    def __init__(self, block: nn.Module, call: BlockCall) -> None:
        super().__init__()
        self.block = block
        self.call = call

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.call(self.block, hidden_states)


class BlockwisePermutationLearner(PermutationLearner):
    """A ``PermutationLearner`` whose loss is the block-by-block reconstruction error on captured dense inputs.

    Args:
        model, sites, input_norms, config, kept, group, initial: as ``PermutationLearner``.
        training_ids: ``[sequences, seq_len]`` training windows; their dense block inputs are captured here.
        batch_size: sequences per forward while capturing.

    ``forward(index=...)`` takes the indices of training windows (the Trainer's batch) instead of token ids.
    """

    def __init__(
        self,
        model: nn.Module,
        sites: Sequence[PermutationSite],
        input_norms: Mapping[str, torch.Tensor] | None,
        config: LearnedPermutationConfig,
        kept: int,
        group: int,
        initial: Mapping[str, torch.Tensor] | None = None,
        *,
        training_ids: torch.Tensor,
        batch_size: int = 8,
    ) -> None:
        super().__init__(model, sites, input_norms, config, kept, group, initial)
        prefix, blocks = find_decoder_blocks(model)
        self._runners = [_BlockRunner(block, BlockCall()) for block in blocks]  # calls filled while capturing
        inputs: list[torch.Tensor] = []

        def keep_inputs(ctx) -> None:
            inputs.append(torch.cat(ctx.inputs))  # the dense inputs (no callback modifies a block)
            self._runners[ctx.index].call = ctx.call

        last = for_each_block(model, training_ids, keep_inputs, batch_size=batch_size, progress=False)
        self._inputs = inputs
        self._targets = inputs[1:] + [torch.cat(last)]
        with torch.no_grad():  # what each block adds to the stream: the scale of its error
            self._scales = [(t - x).float().pow(2).mean(dim=(1, 2)).clamp_min(1e-12)
                            for x, t in zip(self._inputs, self._targets, strict=True)]
        # Each block's pruned layers: the learner's layer name -> the weight's name inside the runner.
        self._block_layers: list[dict[str, str]] = [{} for _ in blocks]
        self._block_sites: list[set[int]] = [set() for _ in blocks]  # the sites a block's pruned layers read
        for name, (_, ranges) in self.layers.items():
            index, _, rest = name[len(prefix) + 1:].partition(".")
            self._block_layers[int(index)][name] = f"block.{rest}.weight"
            self._block_sites[int(index)].update(site for site, _ in ranges)
        self._generator = torch.Generator().manual_seed(config.seed)

    @property
    def num_blocks(self) -> int:
        return len(self._runners)

    def _block_loss(self, index: int, rows: torch.Tensor, matrices: Sequence[torch.Tensor | None]) -> torch.Tensor:
        weights = {key: self.layer_weight(name, matrices) for name, key in self._block_layers[index].items()}
        hidden = self._inputs[index][rows]
        out = torch.func.functional_call(self._runners[index], weights, (hidden,), strict=False)
        error = (out.float() - self._targets[index][rows].float()).pow(2).mean(dim=(1, 2))
        return (error / self._scales[index][rows]).mean()

    def forward(
        self, index: torch.Tensor, matrices: Sequence[torch.Tensor | None] | None = None,
        blocks: Sequence[int] | None = None,
        **_: Any,
    ) -> dict[str, torch.Tensor]:
        """Mean relative reconstruction error of ``blocks`` (default: all, or ``blocks_per_step`` random) on windows ``index``."""
        rows = index.reshape(-1).to(self._inputs[0].device)
        if blocks is None:
            blocks = range(self.num_blocks)
            if self.config.blocks_per_step is not None and self.config.blocks_per_step < self.num_blocks:
                blocks = torch.randperm(self.num_blocks, generator=self._generator)[: self.config.blocks_per_step].tolist()
        if matrices is None:  # Sinkhorn (and Hungarian) only for the sites these blocks read
            matrices = self.soft_permutations(set().union(*(self._block_sites[block] for block in blocks)))
        total = torch.zeros((), device=self._inputs[0].device)
        for block in blocks:
            if torch.is_grad_enabled():  # free each block's graph; recompute it in the backward
                loss = checkpoint(self._block_loss, block, rows, matrices, use_reentrant=False)
            else:
                loss = self._block_loss(block, rows, matrices)
            total = total + loss
        return {"loss": total / len(blocks)}

    @torch.no_grad()
    def objective(self, hard: Sequence[torch.Tensor], evaluation_ids: torch.Tensor) -> float:
        """Mean relative reconstruction error of every block with the hard permutations on windows ``evaluation_ids``."""
        return float(self(index=evaluation_ids, matrices=self.hard_matrices(hard), blocks=range(self.num_blocks))["loss"])
