"""The permutation step of the pruning lifecycle: choose the permutations, absorb them, then prune as usual.

``BasePruner.prune`` calls ``check_permutation`` before any work (with the method's other
preconditions) and ``permute_for_pruning`` between calibration and pruning. Because the permutation is
absorbed into the dense model's weights (``absorb.py``) before the pruner runs, every N:M pruner —
magnitude, Wanda, SparseGPT, SDS, and the ones to come — prunes the permuted model unchanged, and the
checkpoint it saves is an ordinary N:M sparse checkpoint: same format, size and speed, no gather.

Example:
    >>> from hf_compress.pruning import WandaConfig, WandaPruner
    >>> pruner = WandaPruner.from_pretrained("tiny-llama")
    >>> config = WandaConfig(sparsity="2:4", permutation="ria", num_calibration_sequences=4, calibration_seq_len=32)
    >>> model = pruner.prune(config, ["calibration text " * 20], progress=False)
    >>> report = pruner.permutation_report
    >>> report.kept_score >= report.kept_score_identity
    True
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ...modeling import InputNormCollector
from ...modeling.layers import check_not_offloaded, evaluation_mode
from ...utils import get_logger, progress_bar
from .absorb import absorb_permutations
from .config import LearnedPermutationConfig, SwapPermutationConfig
from .ria import SiteScores, kept_score, ria_permutation
from .swap import swap_refine
from .sites import PermutationSite, find_sites

if TYPE_CHECKING:
    from ..config import PruningConfig


__all__ = ["PermutationReport", "check_permutation", "collect_input_norms", "permute_for_pruning"]

logger = get_logger(__name__)


@dataclass
class PermutationReport:
    """What the permutation step did (``pruner.permutation_report``).

    Attributes:
        kind: ``"ria"``, ``"swap"`` or ``"learned"``.
        sites: permutation sites (stream, key/value heads, FFNs).
        kept_score_identity, kept_score: the Wanda-metric score an N:M mask keeps without and with the
            permutation (``ria.kept_score``; every pruned reader normalised to 1, summed over sites).
        moved_channels: fraction of channels that left their place.
        probe_logit_change: largest logit change on the probe after absorbing (rounding only).
        seconds: wall time of the step (statistics, choice or training, absorption).
        training: the learned permutation's training (seconds, steps, loss curve); ``None`` for RIA.
        swap_search: the channel-swap search (``"swap"``, or the start of a learned one): ``passes`` (summed over
            sites), ``seconds``, and ``unconverged_sites`` (sites a pass or time budget stopped while an exchange
            still gained; 0 means the permutation does not depend on the machine's speed); ``None`` without one.
    """

    kind: str
    sites: int
    kept_score_identity: float
    kept_score: float
    moved_channels: float
    probe_logit_change: float
    seconds: float
    training: dict[str, Any] | None = field(default=None)
    swap_search: dict[str, Any] | None = field(default=None)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_permutation(model: nn.Module, config: PruningConfig) -> list[PermutationSite]:
    """The model's permutation sites, after checking that ``config.permutation`` can apply (before any work).

    Raises:
        ValueError: no N:M pattern, offloaded weights, a model whose stream or heads cannot be permuted (also found
            by absorbing a random permutation on a probe and undoing it), an N:M group straddling an attention head,
            learned groups that do not divide a site's width, or a learned permutation on a GPU ``Trainer`` would not
            train on (``check_training_device``).
    """
    pattern = config.pattern
    if not pattern.is_n_m:
        raise ValueError(f"a channel permutation only helps N:M sparsity; sparsity={config.sparsity} is unstructured. "
                         "Use an N:M pattern such as '2:4' or permutation=None.")
    check_not_offloaded(model, "A channel permutation", instead=", or use permutation=None")
    sites = find_sites(model, config.skip)
    group = pattern.group_size or 1
    for site in sites:
        if not site.scored_readers:  # every reader skipped: the site is left as it is (permute_for_pruning)
            continue
        if site.kind == "attention" and site.width % group:
            raise ValueError(f"head_dim {site.width} of {site.name} is not a multiple of M={group}: N:M groups would "
                             "straddle heads, which a within-head permutation cannot serve. Use permutation=None.")
        if isinstance(config.permutation, LearnedPermutationConfig):
            config.permutation.group_width(site.width, site.name, group)
    if isinstance(config.permutation, LearnedPermutationConfig):  # trained by Trainer, on the model's device
        from ...training import check_training_device

        check_training_device(next(model.parameters()).device)
    _check_absorbable(model, sites)
    return sites


def _check_absorbable(model: nn.Module, sites: list[PermutationSite]) -> None:
    """Absorb a random permutation of every site and undo it, exactly: a model that reads the permuted channels where
    the sites do not look (XGLM adds a sinusoidal position buffer to the stream) is refused before the search, which
    can take many minutes, instead of after it."""
    generator = torch.Generator().manual_seed(0)
    trial = {site.name: torch.randperm(site.width, generator=generator) for site in sites}
    try:
        absorb_permutations(model, sites, trial)  # restores the model and raises when the logits change
    except RuntimeError as error:
        raise ValueError(str(error)) from None
    absorb_permutations(model, sites, {name: torch.argsort(perm) for name, perm in trial.items()}, check=False)


def permute_for_pruning(
    model: nn.Module,
    config: PruningConfig,
    sites: list[PermutationSite],
    calibration_ids: torch.Tensor | None,
    progress: bool = True,
) -> PermutationReport:
    """Choose the permutation of every site (RIA heuristic or learned), absorb it into ``model``; return the report."""
    start = time.perf_counter()
    pattern = config.pattern
    kept, group = pattern.kept_per_group or 1, pattern.group_size or 1
    permutation = config.permutation
    if isinstance(permutation, LearnedPermutationConfig) and calibration_ids is None:
        raise ValueError("a learned permutation trains on calibration text: pass calibration_dataset to prune().")
    wanted = getattr(permutation, "num_training_sequences", None)
    if wanted is not None and calibration_ids is not None and wanted > calibration_ids.shape[0]:
        # The training windows are the first of the calibration windows: more cannot be had from them.
        raise ValueError(f"num_training_sequences={wanted} of the learned permutation asks for more windows than the "
                         f"{calibration_ids.shape[0]} calibration windows it trains on; raise "
                         f"num_calibration_sequences to at least {wanted} or lower num_training_sequences.")
    readers = {reader.name: reader.layer for site in sites for reader in site.scored_readers}
    norms = None
    if calibration_ids is not None:
        norms = collect_input_norms(model, readers, calibration_ids, config.batch_size, progress)
    # Scores are computed reader by reader when read (SiteScores), so every site's are never held at once. They are
    # of the weights as they are when read: every score in the report is taken before a permutation is absorbed,
    # but the learned path's final one, taken on the start-absorbed weights with norms permuted alike (below).
    scores = [SiteScores(site, norms) for site in sites]
    # A site whose readers are all skipped has no N:M mask to improve: it stays as it is (its readers keep their
    # weights whole; the channels of their inputs need no order).
    unscored = [site.name for site, score in zip(sites, scores, strict=True) if len(score) == 0]
    if unscored:
        logger.info("not permuting %d site(s) whose readers are all skipped: %s", len(unscored), ", ".join(unscored))
        sites, scores = [site for site, s in zip(sites, scores) if len(s)], [s for s in scores if len(s)]
    kind = "learned" if isinstance(permutation, LearnedPermutationConfig) else (
        "swap" if isinstance(permutation, SwapPermutationConfig) else "ria")
    if not sites:
        return PermutationReport(kind=kind, sites=0, kept_score_identity=0.0, kept_score=0.0, moved_channels=0.0,
                                 probe_logit_change=0.0, seconds=time.perf_counter() - start)
    training = search = None
    change = 0.0
    # A permutation is a small index, built on the CPU by design (kept_score moves it to each score's device).
    unmoved = {site.name: torch.arange(site.width, device="cpu") for site in sites}
    identity = _total_kept_score(sites, scores, unmoved, kept, group)
    if isinstance(permutation, LearnedPermutationConfig):
        from .train import learn_permutations  # imports Trainer

        assert calibration_ids is not None
        base = None
        initial = identity
        if permutation.init != "identity":  # start from a heuristic's permutation, absorbed: the groups refine it
            base = {site.name: ria_permutation(score, kept, group) for site, score in zip(sites, scores, strict=True)}
            if permutation.init == "swap":
                base, search = _swap_refined(sites, scores, base,
                                             SwapPermutationConfig(max_seconds=permutation.swap_seconds), kept, group,
                                             progress)
            initial = _total_kept_score(sites, scores, base, kept, group)
            change = absorb_permutations(model, sites, base)
            norms = _permuted_norms(norms, sites, base)
        learned, training = learn_permutations(model, sites, norms, calibration_ids, permutation, kept, group,
                                               batch_size=config.batch_size, skip=config.skip, progress=progress)
        # The start is absorbed and the norms permuted alike, so these are the scores in the start's order: the
        # learned permutation applies to them as the composed one does to the original order.
        chosen = _total_kept_score(sites, [SiteScores(site, norms) for site in sites], learned, kept, group)
        change = max(change, absorb_permutations(model, sites, learned))
        perms = learned if base is None else {name: base[name][learned[name]] for name in learned}
        training["kept_score_initial"] = initial
    else:
        bar = progress_bar(zip(sites, scores, strict=True), total=len(sites), desc="permutation", disable=not progress,
                   leave=False)
        perms = {site.name: ria_permutation(score, kept, group) for site, score in bar}
        if isinstance(permutation, SwapPermutationConfig):
            perms, search = _swap_refined(sites, scores, perms, permutation, kept, group, progress)
        chosen = _total_kept_score(sites, scores, perms, kept, group)
        change = absorb_permutations(model, sites, perms)
    moved = sum(int((perms[site.name] != torch.arange(site.width, device=perms[site.name].device)).sum()) for site in sites)
    report = PermutationReport(
        kind=kind, sites=len(sites), kept_score_identity=identity,
        kept_score=chosen, moved_channels=moved / sum(site.width for site in sites), probe_logit_change=change,
        seconds=time.perf_counter() - start, training=training, swap_search=search,
    )
    logger.info("%s permutation of %d sites: kept score %.4f -> %.4f, %.1f%% of channels moved (%.1fs)",
                report.kind, len(sites), identity, chosen, 100 * report.moved_channels, report.seconds)
    return report


def _total_kept_score(sites: list[PermutationSite], scores: list[SiteScores], perms: dict[str, torch.Tensor], kept: int,
                      group: int) -> float:
    """``ria.kept_score`` of every site's permutation, summed over the sites."""
    return sum(kept_score(score, perms[site.name], kept, group) for site, score in zip(sites, scores, strict=True))


def _swap_refined(sites: list[PermutationSite], scores: list[SiteScores], perms: dict[str, torch.Tensor],
                  config: SwapPermutationConfig, kept: int, group: int,
                  progress: bool) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Each site's permutation refined by channel swaps, and a summary of the search (``swap_search``).

    With ``config.max_seconds`` the budget is shared in proportion to each site's weight in the kept score (its
    number of pruned readers: the residual stream, read by every block's q/k/v/gate/up, outweighs everything else);
    the heaviest sites go last, so time the light ones leave unused (a converged search stops early) flows to them.
    """
    start = time.perf_counter()
    deadline = None if config.max_seconds is None else start + config.max_seconds
    order = sorted(range(len(sites)), key=lambda i: len(sites[i].scored_readers))
    remaining = sum(len(site.scored_readers) for site in sites)
    refined, passes, unconverged = {}, 0, []
    for index in progress_bar(order, desc="channel swaps", disable=not progress, leave=False):
        site, weight = sites[index], len(sites[index].scored_readers)
        site_deadline = None
        if deadline is not None:
            site_deadline = time.perf_counter() + (deadline - time.perf_counter()) * weight / max(remaining, 1)
        remaining -= weight
        search = swap_refine(scores[index], perms[site.name], kept, group, max_passes=config.max_passes,
                             max_rows=config.max_rows, deadline=site_deadline)
        refined[site.name], passes = search.perm, passes + search.passes
        if not search.converged:
            unconverged.append(site.name)
    if unconverged:  # the permutation now depends on how fast this machine is (or on max_passes)
        logger.warning("channel swaps: %d of %d sites stopped by the budget (max_seconds=%s, max_passes=%d) while "
                       "an exchange still gained, e.g. %s; the permutation then depends on the machine's speed. "
                       "Raise the budget (max_seconds=None: no time limit) for a reproducible one.",
                       len(unconverged), len(sites), config.max_seconds, config.max_passes, unconverged[0])
    summary = {"passes": passes, "seconds": time.perf_counter() - start, "unconverged_sites": len(unconverged)}
    return refined, summary


def _permuted_norms(norms: dict[str, torch.Tensor] | None, sites: list[PermutationSite],
                    perms: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """The input norms of the pruned readers once ``perms`` are absorbed (each reader's columns move with its site)."""
    if norms is None:
        return None
    moved = {name: value.clone() for name, value in norms.items()}
    for site in sites:
        for reader in site.scored_readers:
            part = moved[reader.name][reader.start:reader.start + site.width]
            part.copy_(part[perms[site.name].to(part.device)])
    return moved


@torch.no_grad()
def collect_input_norms(
    model: nn.Module, layers: dict[str, nn.Module], ids: torch.Tensor, batch_size: int, progress: bool = True
) -> dict[str, torch.Tensor]:
    """``‖X_j‖₂`` of every named layer's inputs over the dense model's forward passes on ``ids``."""
    collectors = {name: InputNormCollector() for name in layers}
    handles = [layer.register_forward_pre_hook(lambda _, args, c=collectors[name]: c.add_batch(args[0]))
               for name, layer in layers.items()]
    device = model.get_input_embeddings().weight.device
    try:
        with evaluation_mode(model):
            for begin in progress_bar(range(0, ids.shape[0], batch_size), desc="permutation statistics",
                              disable=not progress, leave=False):
                # one logit row: the output layer's full-vocabulary logits for every position are not needed here
                model(input_ids=ids[begin:begin + batch_size].to(device), use_cache=False, logits_to_keep=1)
    finally:
        for handle in handles:
            handle.remove()
    return {name: collector.norms for name, collector in collectors.items()}
