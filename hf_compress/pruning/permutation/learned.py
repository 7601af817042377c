"""``PermutationLearner``: the frozen, permuted-and-pruned network whose only parameters are cost matrices.

For every site (``sites.py``) and every group of its channels a cost matrix ``C`` (``[blocks, n, n]``)
is learned. A forward pass:

1. turns each ``C`` into a permutation matrix ``P``: ``Sinkhorn(−C/τ)`` (soft), or with
   ``hard_forward`` the Hungarian permutation in the forward pass and the Sinkhorn gradient in the
   backward (straight-through, PermLLM);
2. for every pruned layer builds its block-diagonal input permutation from the sites it reads
   (``o_proj``: one block per query head, shared inside a key/value group) and permutes the weight
   ``Ŵ = W Pᵀ`` (batched matmuls over the groups); the N:M mask ``M`` keeps the top N of the Wanda
   metric ``|W| · ‖x‖`` in every M consecutive columns *of the Hungarian permutation of the current
   costs* — the mask the export will use — is a constant for the gradient, and is rebuilt only when
   that permutation changed for one of the layer's sites (most steps move few of them); then permutes
   back: ``W_eff = (Ŵ ⊙ M) P`` (= ``W`` masked by the permuted mask when ``P`` is a permutation).
   With ``soft_mask`` the backward also sees the mask move with ``P`` (``_soft_mask``);
3. runs the frozen model with ``W_eff`` (``torch.func.functional_call``; the model's own weights are
   untouched) and returns the loss: next-token CE + ``α`` · Σ_layers Smooth-L1(dense hidden, pruned
   hidden) (the paper), or ``1 − cos`` of the final hidden states (PermLLM). The block-by-block
   objective (``blockwise.py``) reuses 1–2 and runs one decoder block at a time instead.

``hard_permutations()`` decodes every ``C`` with the Hungarian algorithm into site permutations for
``absorb.absorb_permutations``. ``train.py`` runs the training through ``Trainer``.

Example:
    >>> from hf_compress.assets import tiny_model
    >>> from hf_compress.pruning.permutation.sites import find_sites
    >>> model, _ = tiny_model("llama")
    >>> sites = find_sites(model)
    >>> config = LearnedPermutationConfig(groups=4, objective="ce_distill")
    >>> learner = PermutationLearner(model, sites, None, config, kept=2, group=4)
    >>> ids = torch.randint(3, 256, (1, 16))
    >>> learner(input_ids=ids, labels=ids)["loss"].backward()
    >>> all(cost.grad is not None for cost in learner.costs)
    True
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence, Set
from typing import Any

import torch
from torch import nn

from .config import LearnedPermutationConfig
from .matching import hungarian, permutation_matrix, sinkhorn
from .selection import window_losses
from .sites import PermutationSite

__all__ = ["PermutationLearner"]


class PermutationLearner(nn.Module):
    """Cost matrices of every site, trained through the frozen model pruned to N:M with the Wanda metric.

    Args:
        model: the dense model (frozen while learning; its weights are never modified here).
        sites: ``find_sites(model)``.
        input_norms: ``‖X_j‖₂`` per pruned layer name (the Wanda statistic); ``None``: ``|W|`` only.
        initial: site name → the permutation the costs start at (within each group); ``None``: identity.
        config: the learned-permutation settings.
        kept, group: the N:M pattern (N kept per M).
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
    ) -> None:
        super().__init__()
        self.model = model
        self.sites = list(sites)
        self.config = config
        self.kept, self.group = kept, group
        self.progress = 0.0
        """Fraction of training done, set by the trainer callback: drives the temperature annealing."""
        generator = torch.Generator().manual_seed(config.seed)
        device = next(model.parameters()).device
        costs = []
        self.block_widths: list[int] = []
        for site in self.sites:
            width = config.group_width(site.width, site.name, group)
            blocks = site.width // width
            noise = 0.01 * torch.randn(blocks, width, width, generator=generator)
            start = torch.arange(site.width) if initial is None else initial[site.name]
            local = start.reshape(blocks, width) % width  # block-local channel at each position
            costs.append(nn.Parameter((noise - config.identity_margin * permutation_matrix(local)).to(device)))
            self.block_widths.append(width)
        self.costs = nn.ParameterList(costs)
        # Each pruned layer: its weight's name and the (site index, first column) ranges covering its inputs.
        self.layers: dict[str, tuple[nn.Linear, list[tuple[int, int]]]] = {}
        for index, site in enumerate(self.sites):
            for reader in site.scored_readers:
                _, ranges = self.layers.setdefault(reader.name, (reader.layer, []))
                ranges.append((index, reader.start))
        for name, (layer, ranges) in self.layers.items():
            ranges.sort(key=lambda item: item[1])
            covered = sum(self.sites[i].width for i, _ in ranges)
            widths = {self.block_widths[i] for i, _ in ranges}
            if covered != layer.in_features or len(widths) != 1:
                raise ValueError(f"{name}: its input channels are not covered by equal permutation groups.")
        module_names = {id(module): name for name, module in model.named_modules()}
        self.weight_names = {name: f"{module_names[id(layer)]}.weight" for name, (layer, _) in self.layers.items()}
        self.input_norms = {name: input_norms[name].float().to(device) if input_norms is not None
                            else torch.ones(layer.in_features, device=device)
                            for name, (layer, _) in self.layers.items()}
        self._hard: list[torch.Tensor] = []  # the Hungarian decoding of every cost, refreshed each step
        self._masks: dict[str, tuple[list[torch.Tensor], torch.Tensor]] = {}  # layer -> (its sites' perms, mask)
        self.mask_rebuilds = 0
        """How many layer masks were (re)built: a layer's mask is rebuilt only when its permutation changed."""

    def train(self, mode: bool = True) -> PermutationLearner:
        """Only the learner switches mode: the frozen model stays in eval (no dropout in the loss)."""
        super().train(mode)
        self.model.eval()
        return self

    # ------------------------------------------------------------------------------------------ permutations

    @property
    def temperature(self) -> float:
        start, end = self.config.temperature_start, self.config.temperature_end
        return start + (end - start) * min(max(self.progress, 0.0), 1.0)

    def decode(self, used: Set[int] | None = None) -> list[torch.Tensor]:
        """The Hungarian permutation of every cost (``[blocks, n]`` block-local indices); also kept for the masks.

        ``used``: refresh only these sites (the others keep their last decoding).
        """
        if used is None or len(self._hard) != len(self.costs):
            self._hard = [hungarian(cost).to(cost.device) for cost in self.costs]
        else:
            for index in used:
                self._hard[index] = hungarian(self.costs[index]).to(self.costs[index].device)
        return self._hard

    def soft_permutations(self, used: Set[int] | None = None) -> list[torch.Tensor | None]:
        """The ``[blocks, n, n]`` permutation matrices of every site (``used``: only these; ``None`` elsewhere).

        Also decodes the hard permutations the masks are built from (``decode``).
        """
        hard = self.decode(used)
        matrices: list[torch.Tensor | None] = []
        for index, (cost, perm) in enumerate(zip(self.costs, hard, strict=True)):
            if used is not None and index not in used:
                matrices.append(None)
                continue
            soft = sinkhorn(cost, self.temperature, self.config.sinkhorn_iterations)
            if self.config.hard_forward:
                soft = permutation_matrix(perm) + soft - soft.detach()  # forward: the permutation; backward: Sinkhorn
            matrices.append(soft)
        return matrices

    def hard_matrices(self, hard: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """One-hot matrices of ``hard`` (default: a fresh ``decode()``), for scoring the exported permutation."""
        self._hard = list(self.decode() if hard is None else hard)
        return [permutation_matrix(perm) for perm in self._hard]

    def site_permutations(self, hard: Sequence[torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Site name → ``hard`` (default: the Hungarian decoding) as one index vector over the site's channels."""
        hard = self.decode() if hard is None else hard
        perms = {}
        for site, blocks, width in zip(self.sites, hard, self.block_widths, strict=True):
            offsets = torch.arange(blocks.shape[0], device=blocks.device).unsqueeze(1) * width
            perms[site.name] = (blocks + offsets).reshape(-1).cpu()
        return perms

    def hard_permutations(self) -> dict[str, torch.Tensor]:
        """Site name → the Hungarian decoding of its costs as one index vector over the site's channels."""
        return self.site_permutations()

    def layer_weight(self, name: str, matrices: Sequence[torch.Tensor | None]) -> torch.Tensor:
        """One pruned layer's weight permuted by ``matrices``, N:M-masked (Wanda metric) and permuted back."""
        layer, ranges = self.layers[name]
        perm = torch.cat([matrices[i] for i, _ in ranges])  # type: ignore[misc]  # [blocks, n, n], block-diagonal
        blocks, width = perm.shape[0], perm.shape[1]
        weight = layer.weight.detach().float().reshape(layer.out_features, blocks, width).transpose(0, 1)
        keep = self._mask(name, weight)
        if self.config.soft_mask and perm.requires_grad:
            soft = self._soft_mask(name, weight, perm)
            keep = keep + soft - soft.detach()  # forward: the hard mask; backward: how the mask moves with P
        permuted = torch.bmm(weight, perm.transpose(1, 2))  # Ŵ[b, o, j] = Σ_i W[b, o, i] P[b, j, i]
        back = torch.bmm(permuted * keep, perm)  # W_eff[b, o, i] = Σ_j (Ŵ ⊙ M)[b, o, j] P[b, j, i]
        return back.transpose(0, 1).reshape_as(layer.weight).to(layer.weight.dtype)

    def effective_weights(self, matrices: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Every pruned layer's effective weight (``layer_weight``), keyed for ``functional_call`` on the model."""
        return {self.weight_names[name]: self.layer_weight(name, matrices) for name in self.layers}

    @torch.no_grad()
    def _mask(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """The N:M keep-mask ``[blocks, out, n]`` in the permuted order of the current hard permutations (cached)."""
        if not self._hard:
            self.decode()
        _, ranges = self.layers[name]
        perms = [self._hard[i] for i, _ in ranges]
        cached = self._masks.get(name)
        if cached is not None and all(torch.equal(a, b) for a, b in zip(cached[0], perms, strict=True)):
            return cached[1]
        index = torch.cat(perms)  # [blocks, n]: block-local channel at each position
        blocks, out, width = weight.shape
        norms = self.input_norms[name].reshape(blocks, width).gather(1, index)
        scores = weight.gather(2, index.unsqueeze(1).expand(blocks, out, width)).abs() * norms.unsqueeze(1)
        scores = scores.reshape(blocks, out, width // self.group, self.group)
        keep = torch.zeros_like(scores).scatter_(-1, scores.topk(self.kept, dim=-1).indices, 1.0)
        keep = keep.reshape(blocks, out, width)
        self._masks[name] = (perms, keep)
        self.mask_rebuilds += 1
        return keep

    def _soft_mask(self, name: str, weight: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
        """A differentiable stand-in ``[blocks, out, n]`` for the N:M mask of what ``perm`` puts at each position.

        Each position's Wanda score is ``Σ_i P[j, i] · |W[o, i]| · ‖x_i‖`` (the score of the channel it
        holds when ``P`` is a permutation); the sigmoid compares it with the midpoint between the N-th and
        (N+1)-th score of its M-group, so moving a strong channel into a group raises its keep value and
        lowers that of the group's weakest kept one.
        """
        blocks, out, width = weight.shape
        norms = self.input_norms[name].reshape(blocks, 1, width)
        scores = torch.bmm(weight.abs() * norms, perm.transpose(1, 2))  # [b, o, j]: score at position j
        groups = scores.reshape(blocks, out, width // self.group, self.group)
        top = groups.topk(self.kept + 1, dim=-1).values
        threshold = 0.5 * (top[..., self.kept - 1] + top[..., self.kept])
        scale = groups.detach().mean(dim=-1).clamp_min(1e-12) * self.config.mask_temperature
        soft = torch.sigmoid((groups - threshold.unsqueeze(-1)) / scale.unsqueeze(-1))
        return soft.reshape(blocks, out, width)

    # ------------------------------------------------------------------------------------------ loss

    def forward(
        self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
        matrices: Sequence[torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """The loss of the whole pruned model on a batch (``matrices``: given permutations, e.g. ``hard_matrices()``)."""
        if self.config.objective == "block":
            raise ValueError('objective="block" trains one block at a time: use BlockwisePermutationLearner.')
        weights = self.effective_weights(self.soft_permutations() if matrices is None else matrices)
        needs_dense = self.config.objective == "cosine" or self.config.distillation_weight > 0
        inputs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask,
                                  "output_hidden_states": needs_dense, "use_cache": False}
        if self.config.objective == "ce_distill":
            inputs["labels"] = input_ids if labels is None else labels
        student = torch.func.functional_call(self.model, weights, args=(), kwargs=inputs, strict=False)
        dense = None
        if needs_dense:
            with torch.no_grad():
                dense = self.model(**{k: v for k, v in inputs.items() if k != "labels"})
        if self.config.objective == "cosine":
            assert dense is not None
            cosine = nn.functional.cosine_similarity(student.hidden_states[-1].float(),
                                                     dense.hidden_states[-1].float(), dim=-1)
            return {"loss": (1.0 - cosine).mean()}
        loss = student.loss
        if dense is not None:
            distill = sum(nn.functional.smooth_l1_loss(s.float(), d.float())
                          for s, d in zip(student.hidden_states[1:], dense.hidden_states[1:], strict=True))
            loss = loss + self.config.distillation_weight * distill
        return {"loss": loss}

    @torch.no_grad()
    def objective(self, hard: Sequence[torch.Tensor], evaluation_ids: torch.Tensor) -> float:
        """The training loss of the hard permutations ``hard`` on fixed windows."""
        return float(self(input_ids=evaluation_ids, matrices=self.hard_matrices(hard))["loss"])

    @torch.no_grad()
    def pruned_losses(self, hard: Sequence[torch.Tensor], input_ids: torch.Tensor, batch_size: int = 2) -> torch.Tensor:
        """Per-window next-token loss (``[windows]``) of the whole model pruned N:M under the permutations ``hard``.

        The learner's pruned network: permute, Wanda mask from the dense model's statistics, permute back. The
        pruner that follows gathers its statistics block by block on already pruned inputs, so its masks, and its
        loss, can differ (``selection.sequential_pruned_losses`` scores that instead).
        """
        return window_losses(self.model, input_ids, batch_size, self.effective_weights(self.hard_matrices(hard)))
