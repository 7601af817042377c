"""One rank of the 2-process DL-QAT training test (``torchrun --nproc_per_node 2``, gloo on CPU).

Each rank trains the same tiny model with ``train_with_trainer`` (Trainer + DDP) and writes a digest
of its adapter weights to ``<out>/rank<k>.json``. DDP all-reduces the gradients, so the two ranks must
end with identical adapters that differ from the initial ones.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

import torch
from peft import get_peft_model

from hf_compress.assets import tiny_model, tiny_tokenizer
from hf_compress.quantization import DLQATConfig
from hf_compress.training import TrainingSettings, causal_lm_dataset, train_with_trainer


def digest(model: torch.nn.Module) -> str:
    hasher = hashlib.sha256()
    for name, parameter in sorted(model.named_parameters()):
        if "dlqat_" in name:
            hasher.update(name.encode())
            hasher.update(parameter.detach().cpu().contiguous().numpy().tobytes())
    return hasher.hexdigest()


def main(out: str) -> None:
    torch.manual_seed(0)
    model = get_peft_model(tiny_model("llama", seed=0)[0], DLQATConfig(bits=3, group_size=32, r=2))
    before = digest(model)
    text = "The quick brown fox jumps over the lazy dog. " * 40
    data = causal_lm_dataset([text], tiny_tokenizer(), num_sequences=16, seq_len=32)
    settings = TrainingSettings(max_steps=3, learning_rate=1e-2, per_device_batch_size=2, logging_steps=1,
                                use_cpu=True, extra_arguments={"ddp_backend": "gloo"})
    train_with_trainer(model, data, os.path.join(out, "trainer"), settings)
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    with open(os.path.join(out, f"rank{rank}.json"), "w") as handle:
        json.dump({"rank": rank, "world_size": world, "distributed": torch.distributed.is_initialized(),
                   "before": before, "after": digest(model)}, handle)


if __name__ == "__main__":
    main(sys.argv[1])
