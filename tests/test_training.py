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


def test_extra_arguments_change_the_launchers_defaults_and_may_not_shadow_settings(tmp_path):
    from hf_compress.training.trainer import _arguments_from_settings

    arguments = _arguments_from_settings(
        TrainingSettings(use_cpu=True, extra_arguments={"report_to": ["none"], "save_strategy": "steps"}), str(tmp_path))
    assert arguments.save_strategy == "steps"
    with pytest.raises(ValueError, match=r"extra_arguments sets \['learning_rate'\].*TrainingSettings fields"):
        _arguments_from_settings(TrainingSettings(extra_arguments={"learning_rate": 1.0}), str(tmp_path))
    with pytest.raises(ValueError, match="weight_decay"):
        TrainingSettings(weight_decay=-0.1)

