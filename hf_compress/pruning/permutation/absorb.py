"""Absorb channel permutations into the weights: the permuted model is an ordinary model, equal in function.

``absorb_permutations`` moves each site's readers' input columns and writers' output rows (see
``sites.py``) and then checks, on a short probe sequence, that the logits did not change; if they did
(an architecture detail the site discovery missed) it undoes everything and raises, so a model is
never left silently different.

Example:
    >>> import torch
    >>> from hf_compress.assets import tiny_model
    >>> from hf_compress.pruning.permutation.sites import find_sites
    >>> model, _ = tiny_model("qwen3")
    >>> sites = find_sites(model)
    >>> perms = {site.name: torch.randperm(site.width) for site in sites}
    >>> absorb_permutations(model, sites, perms) < 1e-4  # largest logit change on the probe
    True
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ...modeling.layers import evaluation_mode
from ...utils import get_logger
from .matching import is_permutation
from .sites import PermutationSite

__all__ = ["absorb_permutations", "permute_site"]

logger = get_logger(__name__)

_PROBE_TOKENS = 24


@torch.no_grad()
def permute_site(site: PermutationSite, perm: torch.Tensor) -> None:
    """Apply ``perm`` (``perm[j]`` = old channel at new position ``j``) to every reader and writer of ``site``."""
    if perm.shape != (site.width,) or not is_permutation(perm):
        raise ValueError(f"{site.name}: expected a permutation of {site.width} channels, got shape {list(perm.shape)}.")
    done: set[tuple[int, int, int]] = set()  # tied tensors (embeddings = lm_head) move once
    moves = [(r.layer.weight, 1, r.start) for r in site.readers] + [(w.tensor, w.dim, w.start) for w in site.writers]
    for tensor, dim, start in moves:
        key = (id(tensor), dim, start)
        if key in done:
            continue
        done.add(key)
        part = tensor.data.narrow(dim, start, site.width)
        part.copy_(part.index_select(dim, perm.to(part.device)))


def absorb_permutations(
    model: nn.Module,
    sites: Sequence[PermutationSite],
    perms: Mapping[str, torch.Tensor],
    check: bool = True,
) -> float:
    """Permute ``model`` in place by ``perms`` (site name → index vector); return the probe's largest logit change.

    Sites without an entry stay as they are.

    Raises:
        RuntimeError: the probe's logits changed beyond rounding (the model is restored first).
    """
    chosen = [(site, perms[site.name]) for site in sites if site.name in perms]
    probe = _probe_ids(model) if check else None
    before = _logits(model, probe) if probe is not None else None
    for site, perm in chosen:
        permute_site(site, perm)
    if before is None:
        return 0.0
    after = _logits(model, probe)
    change = float((after - before).abs().max())
    scale = max(1.0, float(before.abs().max()))
    # The logits come back in float32 whatever the model computes in: the rounding of the new summation order is
    # the weights' precision.
    precise = model.get_input_embeddings().weight.dtype in (torch.float32, torch.float64)
    tolerance = (1e-4 if precise else 5e-2) * scale
    if not change <= tolerance:
        for site, perm in reversed(chosen):
            permute_site(site, torch.argsort(perm))
        raise RuntimeError(
            f"absorbing the channel permutation changed {type(model).__name__}'s logits by {change:.3g} (tolerance "
            f"{tolerance:.3g}): some layer reads the permuted channels in a way the library does not know. The model "
            "was restored; prune it with permutation=None."
        )
    logger.debug("absorbed %d channel permutations; probe logits changed by at most %.2e", len(chosen), change)
    return change


def _probe_ids(model: nn.Module) -> torch.Tensor | None:
    embeddings = model.get_input_embeddings()
    device = embeddings.weight.device
    if device.type == "meta":
        return None
    generator = torch.Generator().manual_seed(0)
    return torch.randint(3, embeddings.num_embeddings, (1, _PROBE_TOKENS), generator=generator).to(device)


@torch.no_grad()
def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with evaluation_mode(model):
        return model(input_ids=ids).logits.float()
