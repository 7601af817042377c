"""The training launcher (``train_with_trainer``): what it checks before Trainer runs."""

from __future__ import annotations

import pytest

from hf_compress.assets import tiny_model, tiny_tokenizer
from hf_compress.training import TrainingSettings, causal_lm_dataset, train_with_trainer


def test_a_failed_hub_kernel_download_says_how_to_train_without_it(tmp_path):
    """transformers 5.25 loads models with hub kernels on; train() kernelizes them for their device, which on a GPU
    downloads kernels. Offline that fails deep in the first training step; the launcher says what to do instead."""
    model, _ = tiny_model("llama")
    model._use_kernels = True  # what from_pretrained leaves on a model loaded with hub kernels

    def kernelize_offline(mode: bool = True):
        raise ValueError("Kernel repository 'kernels-community/rotary' could not verify publisher trust status.")

    model.train = kernelize_offline
    data = causal_lm_dataset(["text " * 50], tiny_tokenizer(), num_sequences=2, seq_len=16)
    with pytest.raises(RuntimeError, match="use_kernels=False.*USE_HUB_KERNELS=0"):
        train_with_trainer(model, data, str(tmp_path / "run"), TrainingSettings(max_steps=1, use_cpu=True))
