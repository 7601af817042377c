"""One rank of the 2-process test of every training entry point but DL-QAT (``torchrun --nproc_per_node 2``, gloo on
CPU; see ``tests/test_training_ddp.py``). Without ``torchrun`` it runs the same functions in one process.

Each rank trains the same tiny models, then writes ``<out>/rank<k>.pt``: per entry point, the trained tensors and
what the run reported. DDP all-reduces the gradients, so every rank must end with the same tensors, equal to a one
process run over the same windows where the loss is a plain mean. ``budget_*`` runs make rank 1's clock run 1000x
fast: a wall-time budget must still stop every rank at the same step (one stopping alone hangs the others).
"""

from __future__ import annotations

import os
import sys
import time
import types

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


def experts() -> dict:
    from datasets import Dataset

    from hf_compress.experts import ExpertConfig, train_experts

    model, tokenizer = tiny_model("llama", seed=0)
    rows = []
    for i in range(8):
        rows.append({"prompt": f"{i % 10} + {(3 * i) % 10} = ", "completion": f"{(i % 10) + (3 * i) % 10}"})
        word = "".join(chr(65 + (i * 7 + j) % 26) for j in range(5))
        rows.append({"prompt": f"Spell {word}: ", "completion": " ".join(word)})
    torch.manual_seed(0)  # the LoRA initialisation
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
    report = permute_for_pruning(model, config, check_permutation(model, config), ids, progress=False)
    training = report.training
    curve = training["objective_curve"]
    return {"tensors": dict(model.named_parameters()), "trained": curve[-1][1] != curve[0][1], "steps": training["steps"],
            "temperature_end": training["temperature_end"], "objective_curve": curve}


def main(out: str) -> None:
    results = {"rank": RANK, "world_size": WORLD, "router": router(), "experts": experts(), "heads": heads(),
               "permutation": permutation()}
    results["distributed"] = torch.distributed.is_initialized()
    torch.save(results, os.path.join(out, f"rank{RANK}.pt"))
    # Last, in a file of their own: a budget that stops one rank alone hangs the run here.
    budgets = {"budget_heads": heads(budget=20.0), "budget_permutation": permutation(budget=20.0)}
    torch.save(budgets, os.path.join(out, f"budget-rank{RANK}.pt"))


if __name__ == "__main__":
    main(sys.argv[1])
