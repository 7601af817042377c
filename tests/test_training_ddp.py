"""Every training entry point under 2-process DDP on CPU: the token router, the experts, drafting heads, the learned
permutation and DL-QAT train to identical replicas, equal to one process
over the same windows where that holds, decisions taken from measurements are rank 0's on every rank, and a
wall-time budget stops every rank at the same step. The same run has ``hf-compress quantize dlqat`` on both ranks:
only rank 0 writes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import training_ddp_worker as worker


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The 2-process run: its folder, exit code and output's end (a hung run is stopped: a non-zero code)."""
    out = tmp_path_factory.mktemp("ddp")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(Path(worker.__file__)), str(out)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        output, _ = process.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        process.terminate()  # torchrun passes SIGTERM on to its workers (a SIGKILL would orphan them, hung)
        output, _ = process.communicate(timeout=60)
    return out, process.returncode, output[-3000:]


@pytest.fixture(scope="module")
def ranks(run):
    out, _, output = run
    assert all((out / f"rank{k}.pt").exists() for k in (0, 1)), output
    loaded = [torch.load(out / f"rank{k}.pt", weights_only=False) for k in (0, 1)]
    assert all(r["world_size"] == 2 and r["distributed"] for r in loaded)
    return loaded


def _same(first: dict, second: dict, **tolerance) -> None:
    assert first.keys() == second.keys()
    for name in first:
        torch.testing.assert_close(first[name], second[name], msg=name, **tolerance)


@pytest.mark.parametrize("entry", ["router", "experts", "heads", "permutation", "dlqat", "cospec", "cospec_perturbed"])
def test_replicas_end_identical(ranks, entry):
    zero, one = (r[entry] for r in ranks)
    assert zero["trained"]
    _same(zero["tensors"], one["tensors"], rtol=0, atol=0)
    assert {k: v for k, v in zero.items() if k != "tensors"} == {k: v for k, v in one.items() if k != "tensors"}


def test_decisions_from_measurements_are_rank_zeros_on_every_rank(ranks):
    """Rank 1's measurements were perturbed so that, alone, it would decide otherwise (as a GPU's last-bit differences
    can): every rank keeps rank 0's subset, clusters, schedule, router and permutation, so the replicas stay identical."""
    zero, one = ranks
    own = one["own"]  # what rank 1 decided from its own measurements
    assert one["selection"] == zero["selection"]
    assert own["selection"][0] != zero["selection"]["indices"]
    assert one["experts"]["labels"] == zero["experts"]["labels"] != own["experts"][0]
    assert one["search"] == zero["search"] and not zero["search"]["search"]["exact_uniform"]  # rank 1 alone: uniform
    kept = zero["router_keep_best"]
    assert kept["selection"]["best_step"] != kept["selection"]["history"][-1]["step"]  # rank 1 alone: the last
    assert {k: v for k, v in one["router_keep_best"].items() if k != "tensors"} == {
        k: v for k, v in kept.items() if k != "tensors"}
    _same(kept["tensors"], one["router_keep_best"]["tensors"], rtol=0, atol=0)
    # Rank 1 alone would keep the last candidate; the rest of the entry is compared in test_replicas_end_identical.
    assert one["permutation"]["best_step"] == zero["permutation"]["best_step"] != zero["permutation"]["steps"]


def test_two_processes_match_one_with_the_same_windows_per_step(ranks):
    # One process with twice the batch sees the same windows per step: the heads' mean loss gives the same update.
    _same(ranks[0]["heads"]["tensors"], worker.heads(batch=4)["tensors"], rtol=1e-4, atol=1e-5)
    # The learned permutation's epochs count every process's windows: 4 training windows, 1 per process per step.
    single = worker.permutation(batch=2)
    assert ranks[0]["permutation"]["steps"] == single["steps"] == 2
    _same(ranks[0]["permutation"]["tensors"], single["tensors"], rtol=1e-5, atol=1e-6)


def test_the_cospec_oracle_labels_shared_out_over_two_processes_equal_one_process(ranks):
    single = worker.cospec()
    assert ranks[0]["cospec"]["oracle"] == single["oracle"] and ranks[0]["cospec"]["oracle"]["labels"] > 0
    assert ranks[0]["cospec"]["target_score_strict"] == single["target_score_strict"]


def test_a_share_failing_on_one_process_raises_on_every_process(ranks):
    zero, one = (r["failing_share"] for r in ranks)
    assert one["raised"] == "ZeroDivisionError"  # its own error
    assert zero["raised"] == "RuntimeError" and "process 1 failed" in zero["message"]
    zero, one = (r["unpicklable_share"] for r in ranks)  # the gather could not send process 1's result
    assert one["raised"] is not None and zero["raised"] == "RuntimeError" and "process 1 failed" in zero["message"]


@pytest.mark.parametrize("entry", ["budget_heads", "budget_permutation"])
def test_a_time_budget_stops_every_rank_at_the_same_step(run, entry):
    out, returncode, output = run
    assert returncode == 0, output
    zero, one = (torch.load(out / f"budget-rank{k}.pt", weights_only=False)[entry] for k in (0, 1))
    assert zero["steps"] == one["steps"] < 4  # rank 1's fast clock stopped it early: rank 0 stopped with it
    _same(zero["tensors"], one["tensors"], rtol=0, atol=0)


def test_the_cli_trains_under_torchrun_and_only_rank_zero_writes(run):
    # Both ranks trained the same adapter; both writing the one --save-dir collided ("already holds a model", or a
    # staging folder gone under the other rank's feet).
    from transformers import AutoModelForCausalLM

    out, _, output = run
    assert all((out / f"cli-rank{k}.pt").exists() for k in (0, 1)), output
    zero, one = (torch.load(out / f"cli-rank{k}.pt", weights_only=False) for k in (0, 1))
    assert zero["code"] == one["code"] == 0, output
    assert "saved to" in zero["printed"] and "saved to" not in one["printed"]
    assert AutoModelForCausalLM.from_pretrained(out / "q").config.quantization_config.bits == 4
    assert (out / "adapter" / "adapter_config.json").is_file()


def test_every_rank_saving_to_one_folder_leaves_rank_zeros_complete_folder(run):
    from transformers import AutoModelForCausalLM

    from hf_compress.speculative.heads import AmphistaHeads

    out, _, output = run
    assert all((out / f"saves-rank{k}.pt").exists() for k in (0, 1)), output
    zero, one = (torch.load(out / f"saves-rank{k}.pt", weights_only=False) for k in (0, 1))
    assert zero == one  # every rank is told where the folder is
    assert AmphistaHeads.from_pretrained(out / "saved-heads").config.num_heads == 2
    for name in ("saved-pruned", "saved-packed"):
        AutoModelForCausalLM.from_pretrained(out / name)
    assert not [path.name for path in out.iterdir() if ".tmp-" in path.name]  # no staging folder left behind
