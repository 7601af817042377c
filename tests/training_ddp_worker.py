"""One rank of the 2-process test of every training entry point (``torchrun --nproc_per_node 2``, gloo on CPU; see
``tests/test_training_ddp.py``). Without ``torchrun`` it runs the same functions in one process.

Each rank trains the same tiny models, then writes ``<out>/rank<k>.pt``: per entry point, the trained tensors and
what the run reported. DDP all-reduces the gradients, so every rank must end with the same tensors, equal to a one
process run over the same windows where the loss is a plain mean. ``budget_*`` runs make rank 1's clock run 1000x
fast: a wall-time budget must still stop every rank at the same step (one stopping alone hangs the others).
``cli-rank<k>.pt``: ``hf-compress quantize dlqat`` run on every rank, as ``torchrun -m hf_compress`` runs it (in this
process, which spares two more interpreters): only rank 0 may write the folders and say so.

Decisions taken from measurements (the data selection, the experts' clusters, the router's schedule search, the
router's and the permutation's keep-best) must be rank 0's on every rank: rank 1's measurements are perturbed (``perturbed_on_rank_1``), as a GPU's
last-bit differences would, exaggerated so that rank 1 alone would decide otherwise; what it decided alone is
recorded in ``OWN`` (saved as ``own``).
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import tempfile
import time
import types
from collections.abc import Iterator

import torch

from hf_compress.assets import tiny_model
from hf_compress.training import TrainingSettings, causal_lm_dataset


TEXT = "The quick brown fox jumps over the lazy dog. " * 40
RANK = int(os.environ.get("RANK", "0"))
WORLD = int(os.environ.get("WORLD_SIZE", "1"))


def settings(steps: int, batch: int, **fields) -> TrainingSettings:
    extra = {"ddp_backend": "gloo", "ddp_timeout": 60} if WORLD > 1 else None
    return TrainingSettings(max_steps=steps, learning_rate=1e-2, per_device_batch_size=batch, logging_steps=1,
                            use_cpu=True, progress=False, extra_arguments=extra, **fields)


OWN: dict[str, list] = {}  # rank 1's own decisions, from its perturbed measurements


@contextlib.contextmanager
def perturbed_on_rank_1(owner, name: str, perturb) -> Iterator[None]:
    """On rank 1, ``owner.name`` returns ``perturb(its result)`` inside the block (elsewhere it is left alone)."""
    if RANK != 1:
        yield
        return
    original = getattr(owner, name)
    setattr(owner, name, lambda *args, **kwargs: perturb(original(*args, **kwargs)))
    try:
        yield
    finally:
        setattr(owner, name, original)


def recorded_on_rank_1(owner, name: str, key: str, result=lambda value: value):
    """On rank 1, ``result(...)`` of every call of ``owner.name`` in the block is appended to ``OWN[key]``."""
    def record(value):
        OWN.setdefault(key, []).append(result(value))
        return value

    return perturbed_on_rank_1(owner, name, record)


def fast_clock_on_rank_1(module) -> None:
    """``module.time.perf_counter`` runs 1000x fast on rank 1 (a straggling or late-starting rank 0, exaggerated)."""
    if RANK != 1:
        return
    start = time.perf_counter()
    module.time = types.SimpleNamespace(perf_counter=lambda: start + 1000 * (time.perf_counter() - start))


def router() -> dict:
    from hf_compress.routing import RoutingSchedule, TokenRouterConfig, routing_state, train_token_router
    from hf_compress.routing.training import _is_fresh_router

    model, tokenizer = tiny_model("llama", seed=0)
    data = causal_lm_dataset([TEXT], tokenizer, num_sequences=10, seq_len=24)
    # No keep-best: in 3 steps no router beats the start, which keep-best would restore.
    config = TokenRouterConfig(token_sparsity=0.4, validation_windows=0)
    train_token_router(model, RoutingSchedule([0.3, 0.5]), data, args=settings(3, 2), config=config)
    state = routing_state(model)
    return {"tensors": state.router.state_dict(), "trained": not _is_fresh_router(state.router)}


def search() -> dict:
    from hf_compress.routing import TokenRouterConfig, search_schedule
    from hf_compress.routing import search as searching

    model, _ = tiny_model("llama", seed=0)
    ids = torch.randint(3, 256, (4, 24), generator=torch.Generator().manual_seed(0))
    # Rank 1 measures every schedule alike: alone, it would keep the exactly uniform one (it wins ties).
    with perturbed_on_rank_1(searching, "calibration_loss", lambda loss: 0.0):
        schedule = search_schedule(model, ids, TokenRouterConfig(token_sparsity=0.3, generations=1, population=4),
                                   progress=False)
    return {"block_sparsity": schedule.block_sparsity, "search": schedule.search}


def router_keep_best() -> dict:
    from hf_compress.routing import RoutingSchedule, TokenRouterConfig, routing_state, train_token_router
    from hf_compress.routing.training import KeepBestRouter

    model, tokenizer = tiny_model("llama", seed=0)
    data = causal_lm_dataset([TEXT], tokenizer, num_sequences=10, seq_len=24)
    config = TokenRouterConfig(token_sparsity=0.4, validation_windows=2, validation_every=1)
    # Rank 1 measures each router far better than the one before: alone, it would keep the last.
    checks = iter(range(100))
    with perturbed_on_rank_1(KeepBestRouter, "validation_kl", lambda value: value - next(checks)):
        train_token_router(model, RoutingSchedule([0.3, 0.5]), data, args=settings(3, 2), config=config)
    state = routing_state(model)
    return {"tensors": state.router.state_dict(), "mode": state.mode,
            "selection": state.schedule.search["training"]["selection"]}


def selection() -> dict:
    from hf_compress.experts import select_data
    from hf_compress.experts import selection as selecting

    model, tokenizer = tiny_model("llama", seed=0)
    prompts = [f"{i % 10} + {(3 * i) % 10} = " if i % 2 else f"Spell {chr(65 + i)}{chr(70 + i)}: " for i in range(16)]
    # Run first, before any Trainer: the selection starts the process group itself. Rank 1 embeds the pool
    # with its rows reversed, and records the subset it would keep (select_indices' first call) alone.
    with perturbed_on_rank_1(selecting, "embed_texts", lambda raw: raw.flip(0)), \
            recorded_on_rank_1(selecting, "select_indices", "selection"):
        _, report = select_data(prompts, model, 0.25, tokenizer=tokenizer, return_report=True)
    return {"indices": report.indices, "mean_distance": report.mean_distance}


def experts() -> dict:
    from datasets import Dataset

    from hf_compress.experts import ExpertConfig, train_experts
    from hf_compress.experts import training as experts_training

    model, tokenizer = tiny_model("llama", seed=0)
    rows = []
    for i in range(8):
        rows.append({"prompt": f"{i % 10} + {(3 * i) % 10} = ", "completion": f"{(i % 10) + (3 * i) % 10}"})
        word = "".join(chr(65 + (i * 7 + j) % 26) for j in range(5))
        rows.append({"prompt": f"Spell {word}: ", "completion": " ".join(word)})
    torch.manual_seed(0)  # the LoRA initialisation
    # Rank 1 embeds other prompts (random rows) and records the clusters it would train alone.
    noise = torch.Generator().manual_seed(1)
    with perturbed_on_rank_1(experts_training, "embed_texts", lambda raw: torch.randn(raw.shape, generator=noise)), \
            recorded_on_rank_1(experts_training, "kmeans", "experts", lambda clustering: clustering.labels.tolist()):
        router = train_experts(model, Dataset.from_list(rows), ExpertConfig(num_experts=2, r=2, seq_len=32,
                                                                            shared_warmup=0.5),
                               args=settings(4, 1), tokenizer=tokenizer)
    tensors = {n: p for n, p in router.model.named_parameters() if "lora_" in n}
    return {"tensors": tensors, "trained": all(bool(p.any()) for n, p in tensors.items() if "lora_B" in n),
            "labels": router.training_labels, "steps": router.info["training"]["total_steps"]}


def heads(budget: float | None = None, batch: int = 2) -> dict:
    from hf_compress.speculative.heads import AmphistaConfig, AmphistaHeads, train_heads
    from hf_compress.speculative.heads import training as heads_training

    model, tokenizer = tiny_model("llama", seed=0)
    torch.manual_seed(0)
    drafting = AmphistaHeads.for_model(model, AmphistaConfig(num_heads=2, num_attention_heads=2))
    data = causal_lm_dataset([TEXT], tokenizer, num_sequences=8, seq_len=16)
    before = {name: p.detach().clone() for name, p in drafting.named_parameters()}
    if budget:
        fast_clock_on_rank_1(heads_training)
    result = train_heads(model, drafting, data, settings(4, batch), max_train_seconds=budget)
    tensors = dict(drafting.named_parameters())
    return {"tensors": tensors, "trained": any(not torch.equal(p, before[n]) for n, p in tensors.items()),
            "steps": result["global_step"], "stopped": result["stopped_by_budget"]}


def permutation(budget: float | None = None, batch: int = 1) -> dict:
    from hf_compress.pruning import LearnedPermutationConfig, WandaConfig
    from hf_compress.pruning.permutation import check_permutation, permute_for_pruning
    from hf_compress.pruning.permutation import train as permutation_training

    model, _ = tiny_model("llama", seed=0)
    ids = torch.randint(3, 256, (8, 24), generator=torch.Generator().manual_seed(0))
    learned = LearnedPermutationConfig(groups=2, epochs=4.0 if budget else 1.0, learning_rate=0.5, eval_every=1, eval_sequences=4,
                                       init="identity", batch_size=batch, max_train_seconds=budget,
                                       selection="objective" if budget else "sequential_ce")
    if budget:
        fast_clock_on_rank_1(permutation_training)
    config = WandaConfig(sparsity="2:4", permutation=learned, batch_size=2)
    # Rank 1 scores each candidate far better than the one before: alone, it would keep the last.
    offers = iter(range(100))
    with perturbed_on_rank_1(permutation_training, "sequential_pruned_losses", lambda losses: losses - next(offers)):
        report = permute_for_pruning(model, config, check_permutation(model, config), ids, progress=False)
    training = report.training
    curve = training["objective_curve"]
    return {"tensors": dict(model.named_parameters()), "trained": curve[-1][1] != curve[0][1], "steps": training["steps"],
            "temperature_end": training["temperature_end"], "objective_curve": curve, "best_step": training["best_step"],
            "selection_curve": training["selection_curve"]}


def dlqat() -> dict:
    from peft import get_peft_model

    from hf_compress.quantization import DLQATConfig
    from hf_compress.training import train_with_trainer

    model, tokenizer = tiny_model("llama", seed=0)
    torch.manual_seed(0)
    model = get_peft_model(model, DLQATConfig(bits=3, group_size=32, r=2))
    before = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    data = causal_lm_dataset([TEXT], tokenizer, num_sequences=16, seq_len=32)
    with tempfile.TemporaryDirectory() as scratch:
        train_with_trainer(model, data, scratch, settings(3, 2))
    tensors = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    return {"tensors": tensors, "trained": any(not torch.equal(p, before[n]) for n, p in tensors.items())}


def cospec(perturbed: bool = False) -> dict:
    """The CoSpec arbiter (oracle labels, warm start, REINFORCE); ``perturbed``: rank 1's target logits get noise, as
    a GPU's last-bit differences would give them."""
    from hf_compress.speculative import ArbiterTrainingSettings, train_arbiter

    model, tokenizer = tiny_model("llama", seed=0)
    if perturbed and RANK == 1:
        noise = torch.Generator().manual_seed(1)
        model.lm_head.register_forward_hook(lambda module, args, out: out + 1e-3 * torch.randn(out.shape, generator=noise))
    task = [{"prompt": f"the cat sat on the mat the cat sat on the {word} the cat sat", "answers": [word]}
            for word in ("mat", "dog", "hat", "rug", "box", "car")]
    settings = ArbiterTrainingSettings(max_new_tokens=12, max_forks_per_prompt=2, rl_steps=3, rl_prompts_per_step=2,
                                       group_size=2, cost_per_forward=0.01)
    torch.manual_seed(0)
    arbiter = train_arbiter(model, None, task, reward="squad_f1", tokenizer=tokenizer, settings=settings,
                            min_ngram_size=2)
    training = arbiter.config.training
    return {"tensors": {name: p.detach().clone() for name, p in arbiter.named_parameters()},
            "trained": len(training["log_history"]) == 3, "oracle": training["oracle"],
            "target_score_strict": training["target_score_strict"], "log_history": training["log_history"]}


def failing_share(unpicklable: bool = False) -> dict:
    """Item 3 fails (or, ``unpicklable``, gives a result the gather cannot send), on process 1 of 2: every process
    must raise, none wait for the others forever."""
    from hf_compress.training import map_over_processes

    try:
        map_over_processes((lambda x: (lambda: x) if x == 3 else x) if unpicklable else (lambda x: 1 // (x - 3)),
                           list(range(6)))
    except Exception as error:  # noqa: BLE001
        return {"raised": type(error).__name__, "message": str(error)}
    return {"raised": None}


def cli(out: str) -> dict:
    """The exit code and printed output of ``hf-compress quantize dlqat`` on this rank (both ranks save to one folder)."""
    from hf_compress.cli.main import main as hf_compress

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = hf_compress(["quantize", "dlqat", "--model", "tiny-llama", "--group-size", "32", "--rank", "2",
                            "--steps", "2", "--batch-size", "1", "--seq-len", "32", "--save-dir", os.path.join(out, "q"),
                            "--adapter-dir", os.path.join(out, "adapter"), "-q"])
    return {"code": code, "printed": printed.getvalue()}


def saves(out: str) -> dict:
    """Every rank saves to the same folders, rank 0 a second late: only rank 0 may write (rank 1 writing first used to
    leave a folder without weights, or make rank 0 fail on a folder that "already holds a model")."""
    from hf_compress.formats.packed import save_packed
    from hf_compress.pruning import save_pruned
    from hf_compress.quantization import quantize_rtn
    from hf_compress.speculative.heads import AmphistaConfig, AmphistaHeads

    model, tokenizer = tiny_model("llama", seed=0)
    torch.manual_seed(0)
    drafting = AmphistaHeads.for_model(model, AmphistaConfig(num_heads=2, num_attention_heads=2))
    packed = quantize_rtn(tiny_model("llama", seed=0)[0], bits=4, group_size=32)
    if RANK == 0:
        time.sleep(1.0)
    returned = {
        "heads": drafting.save_pretrained(os.path.join(out, "saved-heads")),
        "pruned": save_pruned(model, tokenizer, os.path.join(out, "saved-pruned"), recipe={"method": "manual"},
                              progress=False),
        "packed": save_packed(packed, tokenizer, os.path.join(out, "saved-packed")),
    }
    return {name: str(path) for name, path in returned.items()}


def main(out: str) -> None:
    results = {"rank": RANK, "world_size": WORLD, "selection": selection(), "router": router(),
               "router_keep_best": router_keep_best(), "search": search(), "experts": experts(), "heads": heads(),
               "permutation": permutation(), "dlqat": dlqat(), "cospec": cospec(),
               "cospec_perturbed": cospec(perturbed=True), "failing_share": failing_share(),
               "unpicklable_share": failing_share(unpicklable=True)}
    results["distributed"] = torch.distributed.is_initialized()
    results["own"] = OWN
    torch.save(results, os.path.join(out, f"rank{RANK}.pt"))
    torch.save(cli(out), os.path.join(out, f"cli-rank{RANK}.pt"))
    torch.save(saves(out), os.path.join(out, f"saves-rank{RANK}.pt"))
    # Last, in a file of their own: a budget that stops one rank alone hangs the run here.
    budgets = {"budget_heads": heads(budget=20.0), "budget_permutation": permutation(budget=20.0)}
    torch.save(budgets, os.path.join(out, f"budget-rank{RANK}.pt"))


if __name__ == "__main__":
    main(sys.argv[1])
