"""The learned channel permutation's block-by-block training (hf_compress.pruning.permutation.blockwise/train):
the block runner reproduces the dense blocks, only the costs train, masks are rebuilt only where a permutation
changed, the result is never worse than its (RIA or swap) start on the score it is selected by, and the permuted
dense model keeps the original's logits."""

from __future__ import annotations

import copy

import pytest
import torch

from hf_compress.assets import tiny_model
from hf_compress.pruning import LearnedPermutationConfig, SwapPermutationConfig, WandaConfig
from hf_compress.pruning.permutation import check_permutation, find_sites, permute_for_pruning
from hf_compress.pruning.permutation.blockwise import BlockwisePermutationLearner
from hf_compress.pruning.permutation.matching import is_permutation, permutation_matrix
from hf_compress.pruning.permutation.selection import sequential_pruned_losses
from hf_compress.pruning.permutation.step import collect_input_norms

IDS = torch.randint(3, 256, (4, 24), generator=torch.Generator().manual_seed(0))


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS[:2]).logits


def _learner(model, config, kept=2, ids=IDS):
    sites = find_sites(model)
    readers = {reader.name: reader.layer for site in sites for reader in site.scored_readers}
    norms = collect_input_norms(model, readers, ids, 2, progress=False)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return BlockwisePermutationLearner(model, sites, norms, config, kept, 4, training_ids=ids, batch_size=2)


def _identity(learner: BlockwisePermutationLearner) -> list[torch.Tensor]:
    return [torch.arange(width).repeat(cost.shape[0], 1) for cost, width in zip(learner.costs, learner.block_widths)]


@pytest.mark.parametrize("arch", ["llama", "gemma3", "opt"])
def test_block_runner_reproduces_the_dense_blocks(arch):
    # 4:4 prunes nothing, so with any hard permutation every block must give back its dense output exactly.
    model, _ = tiny_model(arch)
    learner = _learner(model, LearnedPermutationConfig(groups=2, init="identity"), kept=4)
    assert learner.objective(_identity(learner), torch.arange(4)) < 1e-10
    shuffled = [torch.stack([torch.randperm(w) for _ in range(c.shape[0])]) for c, w in
                zip(learner.costs, learner.block_widths)]
    assert learner.objective(shuffled, torch.arange(4)) < 1e-10
    # 2:4 prunes: the error is real.
    pruned = _learner(tiny_model(arch)[0], LearnedPermutationConfig(groups=2, init="identity"), kept=2)
    assert pruned.objective(_identity(pruned), torch.arange(4)) > 1e-4


def test_blockwise_step_trains_only_the_costs_and_rebuilds_only_changed_masks():
    model, _ = tiny_model("llama")
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    learner = _learner(model, LearnedPermutationConfig(groups=2, init="identity"))
    learner(index=torch.tensor([0, 1]))["loss"].backward()
    assert all(cost.grad is not None and cost.grad.abs().sum() > 0 for cost in learner.costs)
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert learner.mask_rebuilds == len(learner.layers)  # one mask per pruned layer
    learner(index=torch.tensor([2]))  # same hard permutations: every mask is reused
    assert learner.mask_rebuilds == len(learner.layers)
    ffn = next(i for i, site in enumerate(learner.sites) if site.kind == "ffn")
    with torch.no_grad():  # make the Hungarian decoding of one FFN site swap two channels
        swap = torch.arange(learner.block_widths[ffn]).repeat(learner.costs[ffn].shape[0], 1)
        swap[0, [0, 1]] = swap[0, [1, 0]]
        learner.costs[ffn].copy_(-permutation_matrix(swap))
    learner(index=torch.tensor([2]))
    readers = len(learner.sites[ffn].scored_readers)  # only the FFN's down projection reads it
    assert learner.mask_rebuilds == len(learner.layers) + readers


def test_blocks_per_step_trains_a_random_subset_of_blocks():
    model, _ = tiny_model("qwen3")
    learner = _learner(model, LearnedPermutationConfig(groups=2, init="identity", blocks_per_step=1))
    learner(index=torch.tensor([0]))["loss"].backward()
    ffn_grads = [cost.grad is not None and bool(cost.grad.abs().sum() > 0)
                 for cost, site in zip(learner.costs, learner.sites) if site.kind == "ffn"]
    assert sum(ffn_grads) == 1  # only the drawn block's FFN costs see gradient
    assert learner.costs[0].grad.abs().sum() > 0  # the stream is read by every block


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_learned_result_is_never_worse_than_its_ria_start_and_keeps_the_dense_logits(arch):
    model, _ = tiny_model(arch)
    original = _logits(model)
    # A learning rate far too high: the costs jump around, so keep-best has worse candidates to reject.
    learned = LearnedPermutationConfig(groups=2, epochs=1.0, learning_rate=5.0, eval_every=1, eval_sequences=4,
                                       init="ria", selection_margin=0.0)
    config = WandaConfig(sparsity="2:4", permutation=learned, batch_size=2)
    report = permute_for_pruning(model, config, check_permutation(model, config), IDS, progress=False)
    training = report.training
    curve = training["selection_curve"]  # the default selection: the sequentially Wanda-pruned model's loss
    assert training["selection"] == "sequential_ce"
    assert training["steps"] == 4 and len(curve) == len(training["objective_curve"]) == 5  # start + every step
    assert max(value for _, value in curve) > training["selection_initial"]  # worse ones seen
    assert training["selection_best"] <= training["selection_initial"]
    assert training["selection_best"] == min(value for _, value in curve)
    # Exactness: the permuted dense model computes what the original did.
    torch.testing.assert_close(_logits(model), original, atol=1e-5, rtol=1e-5)
    # Independently: the objective of the permutation now absorbed is the best one reported ...
    fresh = _learner(copy.deepcopy(model), LearnedPermutationConfig(groups=2, init="identity"))
    torch.testing.assert_close(fresh.objective(_identity(fresh), torch.arange(4)), training["objective_best"],
                               rtol=1e-4, atol=1e-7)
    # ... and the start it was compared with is the RIA permutation's objective.
    ria_model, _ = tiny_model(arch)
    ria_config = WandaConfig(sparsity="2:4", permutation="ria", batch_size=2)
    permute_for_pruning(ria_model, ria_config, check_permutation(ria_model, ria_config), IDS, progress=False)
    ria = _learner(ria_model, LearnedPermutationConfig(groups=2, init="identity"))
    torch.testing.assert_close(ria.objective(_identity(ria), torch.arange(4)), training["objective_initial"],
                               rtol=1e-4, atol=1e-7)
    # "Never worse", re-measured rather than read from the report: each absorbed model, Wanda-pruned block by block
    # on the selection windows (all four here: too few to hold any out), scored on them.
    def pruned_loss(absorbed):
        identity = {site.name: torch.arange(site.width) for site in find_sites(absorbed)}
        return float(sequential_pruned_losses(absorbed, identity, "2:4", IDS).mean())

    learned_loss, ria_loss = pruned_loss(model), pruned_loss(ria_model)
    assert learned_loss == pytest.approx(training["selection_best"], rel=1e-4)
    assert ria_loss == pytest.approx(training["selection_initial"], rel=1e-4)
    assert learned_loss <= ria_loss * (1 + 1e-6)


def test_swap_start_with_a_strict_margin_returns_the_swap_permutation():
    # init="swap" starts from the swap search's permutation; a margin no candidate can clear keeps it.
    swap_model, learned_model = tiny_model("qwen3")[0], tiny_model("qwen3")[0]
    swap_config = WandaConfig(sparsity="2:4", permutation=SwapPermutationConfig(max_seconds=30), batch_size=2)
    swap = permute_for_pruning(swap_model, swap_config, check_permutation(swap_model, swap_config), IDS,
                               progress=False)
    learned = LearnedPermutationConfig(groups=2, epochs=1.0, learning_rate=5.0, eval_every=1, eval_sequences=2,
                                       init="swap", swap_seconds=30, selection_margin=1e9)
    config = WandaConfig(sparsity="2:4", permutation=learned, batch_size=2)
    report = permute_for_pruning(learned_model, config, check_permutation(learned_model, config), IDS, progress=False)
    training = report.training
    assert training["kept_score_initial"] == pytest.approx(swap.kept_score)  # it started where swap ended
    assert swap.kept_score > swap.kept_score_identity
    assert training["best_step"] == 0 and training["selection_lead"] == 0.0
    assert min(value for _, value in training["selection_curve"][1:]) != training["selection_initial"]  # it moved
    for kept, reference in zip(learned_model.parameters(), swap_model.parameters(), strict=True):
        torch.testing.assert_close(kept, reference)  # the swap permutation, absorbed: the same weights


def test_group_width_rules():
    config = LearnedPermutationConfig(groups=4)
    assert config.group_width(16, "head", 4) == 16  # 4-wide groups could only shuffle inside one N:M group
    assert config.group_width(64, "stream", 4) == 16
    with pytest.raises(ValueError, match="not a multiple of M=4"):
        LearnedPermutationConfig(groups=2).group_width(12, "ffn", 4)
    assert is_permutation(torch.arange(5))
