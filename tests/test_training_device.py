"""Training commands train where ``--device`` says, not where ``Trainer`` defaults.

``Trainer`` places the model itself: on a GPU machine it trained a ``--device cpu`` run on the GPU, and in one
process it trains on ``cuda:0`` whatever ``cuda:N`` was asked (transformers' ``TrainingArguments._setup_devices``
makes ``cuda:0`` current). ``TrainingSettings.device`` carries the device: ``cpu`` becomes ``use_cpu``, and a GPU
``Trainer`` would not train on is refused before any work. This machine has no GPU: a GPU machine is simulated by
patching ``torch.cuda`` and the launcher's accelerator probe; nothing here touches a real GPU.
"""

from __future__ import annotations

import logging

import pytest
import torch
import transformers

from hf_compress.cli.main import main, resolve_device
from hf_compress.training import TrainingSettings, train_with_trainer
from hf_compress.training import trainer as launcher


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class _Stop(Exception):
    """Raised by the fake Trainer once it has seen its arguments: the decision is made, no training needed."""


def _stop_at_trainer(monkeypatch) -> list:
    """Make ``Trainer(...)`` record its ``TrainingArguments`` and stop (``_Stop``): the decision is all we check.
    The class is patched, not the name: ``transformers`` may be another module object by then."""
    seen = []

    def stopping(self, *args, **kwargs):
        seen.append(kwargs["args"])
        raise _Stop

    monkeypatch.setattr(transformers.Trainer, "__init__", stopping)
    return seen


@pytest.fixture
def trainer_arguments(monkeypatch):
    """The ``TrainingArguments`` each ``Trainer`` is built with (the real Trainer still trains)."""
    seen = []
    original = transformers.Trainer.__init__

    def recording(self, *args, **kwargs):
        seen.append(kwargs["args"])
        original(self, *args, **kwargs)

    monkeypatch.setattr(transformers.Trainer, "__init__", recording)
    return seen


@pytest.fixture
def two_gpus(monkeypatch):
    """A machine with two CUDA GPUs, as far as the device checks can tell; no process group (no LOCAL_RANK)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("LOCAL_RANK", raising=False)


@pytest.fixture
def no_model_load(monkeypatch):
    """Record (and refuse) every model load: a refusal must come before it."""
    import hf_compress.assets

    loads = []

    def refusing(*args, **kwargs):
        loads.append(args)
        raise AssertionError("the model was loaded before the device was refused")

    monkeypatch.setattr(hf_compress.assets, "load_model", refusing)
    return loads


def test_device_cpu_reaches_trainer_as_use_cpu_on_a_gpu_machine(monkeypatch, tmp_path):
    """The launcher turns ``device="cpu"`` into ``use_cpu=True`` (no pinned memory) even with an accelerator."""
    monkeypatch.setattr(launcher, "_has_accelerator", lambda: True)
    seen = _stop_at_trainer(monkeypatch)
    with pytest.raises(_Stop):
        train_with_trainer(torch.nn.Linear(2, 2), [], str(tmp_path), TrainingSettings(max_steps=1, device="cpu"))
    assert seen[0].use_cpu and not seen[0].dataloader_pin_memory
    assert TrainingSettings(device=torch.device("cpu")).device == "cpu"  # recorded as JSON: kept as a string


def test_route_device_cpu_trains_on_the_cpu_on_a_gpu_machine(monkeypatch, tmp_path, trainer_arguments):
    """``route --device cpu`` searched on the CPU, then Trainer (use_cpu unset) took the model to the GPU."""
    monkeypatch.setattr(launcher, "_has_accelerator", lambda: True)
    assert main(["-q", "route", "--model", "tiny-llama", "--generations", "0", "--population", "2",
                 "--search-windows", "1", "--seq-len", "16", "--steps", "1", "--device", "cpu",
                 "--save-dir", str(tmp_path / "out")]) == 0
    assert len(trainer_arguments) == 1 and trainer_arguments[0].use_cpu


@pytest.mark.parametrize("argv", [
    ["route", "--model", "tiny-llama", "--steps", "1"],
    ["quantize", "dlqat", "--model", "tiny-llama", "--steps", "1"],
    ["experts", "train", "--base", "tiny-llama", "--data", "boolq,piqa", "--per-task", "4", "--holdout", "0",
     "--num-experts", "1", "--steps", "1"],
], ids=["route", "quantize dlqat", "experts train"])
def test_cuda_1_in_one_process_is_refused_before_the_model_loads(argv, tmp_path, capsys, two_gpus, no_model_load):
    """Trainer would train on cuda:0 and move the model there: refused in one line, naming CUDA_VISIBLE_DEVICES."""
    assert main([*argv, "--device", "cuda:1", "--save-dir", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert "Trainer trains on cuda:0" in error and "CUDA_VISIBLE_DEVICES=1" in error, error
    assert not no_model_load and not (tmp_path / "out").exists()


TRAINING = {"max_steps": 1, "seq_len": 16}


@pytest.mark.parametrize("step, where", [
    ({"quantize": {"method": "dlqat", "bits": 4, "group_size": 32, "r": 2, "training": TRAINING}}, "quantize dlqat"),
    ({"route": {"method": "token_router", "training": TRAINING}}, "route token_router"),
    ({"heads": {"method": "amphista", "num_heads": 2, "training": TRAINING}}, "heads amphista"),
])
def test_recipe_training_step_refuses_cuda_1_before_any_step_runs(step, where, monkeypatch, tmp_path, two_gpus):
    from hf_compress.assets import tiny_model
    from hf_compress.recipe import RecipeError, run
    from hf_compress.recipe import runner

    model, tokenizer = tiny_model("llama")
    moved = []
    monkeypatch.setattr(model, "to", lambda *args, **kwargs: moved.append(args) or model)  # no GPU here
    monkeypatch.setattr(runner, "_summary", lambda metrics: pytest.fail("a step ran before the refusal"))
    recipe = {"name": "tiny-training", "base_model": "tiny-llama", "seed": 0, "steps": [step],
              "evaluation": {"perplexity_windows": 1, "window": 16}}
    with pytest.raises(RecipeError, match=rf"^step 1 \({where}\): .*CUDA_VISIBLE_DEVICES=1"):
        run(recipe, tmp_path / "out", model=model, tokenizer=tokenizer, device=torch.device("cuda", 1))
    assert not moved  # refused before the whole model went to a device the step cannot train on


def test_one_process_takes_cuda_and_cuda_0_but_not_cuda_1(two_gpus):
    assert TrainingSettings(device="cuda").device == "cuda"
    assert TrainingSettings(device="cuda:0").device == "cuda:0" and not TrainingSettings(device="cuda:0").use_cpu
    with pytest.raises(ValueError, match="CUDA_VISIBLE_DEVICES=1 and device cuda"):
        TrainingSettings(device="cuda:1")
    with pytest.raises(ValueError, match="use_cpu=True contradicts device='cuda'"):
        TrainingSettings(device="cuda", use_cpu=True)


def test_under_torchrun_the_process_s_own_gpu_wins(monkeypatch, two_gpus):
    """Under torchrun / accelerate launch each process trains on cuda:LOCAL_RANK: that (and auto, cuda) fits,
    another GPU is refused."""
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert TrainingSettings(device=resolve_device("auto")).device == "cuda:1"
    assert TrainingSettings(device="cuda").device == "cuda"
    with pytest.raises(ValueError, match=r"LOCAL_RANK=1\) this process trains on its own GPU, cuda:1"):
        TrainingSettings(device="cuda:0")


def test_the_launcher_checks_again_and_warns_when_trainer_will_replicate(monkeypatch, tmp_path, caplog, two_gpus):
    """A device set after the settings were made is checked by the launcher; a named GPU among several warns that
    Trainer replicates the model over all of them in one process (nn.DataParallel)."""
    settings = TrainingSettings(max_steps=1)
    settings.device = "cuda:1"
    with pytest.raises(ValueError, match="CUDA_VISIBLE_DEVICES=1"):
        train_with_trainer(torch.nn.Linear(2, 2), [], str(tmp_path), settings)

    # The warning comes before TrainingArguments, which would set up the (simulated) GPU for real: stop there.
    def stopping(self, *args, **kwargs):
        raise _Stop

    monkeypatch.setattr(transformers.TrainingArguments, "__post_init__", stopping)
    with caplog.at_level(logging.WARNING, logger="hf_compress"), pytest.raises(_Stop):
        train_with_trainer(torch.nn.Linear(2, 2), [], str(tmp_path), TrainingSettings(max_steps=1, device="cuda:0"))
    assert "replicates the model over all 2 visible GPUs" in caplog.text and "CUDA_VISIBLE_DEVICES=0" in caplog.text



def test_a_learned_permutation_checks_its_training_device_before_any_work(monkeypatch):
    """prune() with a learned permutation trains through Trainer on the model's device: that device is checked
    (check_training_device) with the sites, before calibration or any permutation work."""
    import hf_compress.training
    from hf_compress.assets import tiny_model
    from hf_compress.pruning import LearnedPermutationConfig, WandaConfig, WandaPruner

    checked = []

    def refusing(device):
        checked.append(torch.device(device))
        raise ValueError("refused device")

    monkeypatch.setattr(hf_compress.training, "check_training_device", refusing)
    model, tokenizer = tiny_model("llama")
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    config = WandaConfig(sparsity="2:4", permutation=LearnedPermutationConfig(groups=2, epochs=1.0), num_calibration_sequences=4,
                         calibration_seq_len=16)
    with pytest.raises(ValueError, match="refused device"):
        WandaPruner(model, tokenizer).prune(config, ["some calibration text " * 40], progress=False)
    assert checked == [torch.device("cpu")]
    assert all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())


@pytest.mark.parametrize("argv", [
    ["route", "--model", "tiny-llama", "--static", "--generations", "0", "--population", "2", "--search-windows", "1",
     "--seq-len", "16"],
    ["route", "--model", "tiny-llama", "--steps", "1", "--generations", "0", "--population", "2", "--search-windows",
     "1", "--seq-len", "16"],
    ["experts", "train", "--base", "tiny-llama", "--data", "boolq,piqa", "--per-task", "4", "--holdout", "0",
     "--num-experts", "1", "--steps", "1", "--select", "0.5"],
], ids=["route --static", "route", "experts train --select"])
def test_a_cpu_run_under_torchrun_shares_its_first_decision_over_a_cpu_group(argv, monkeypatch, tmp_path, capsys):
    """The schedule / the selected subset is rank 0's on every rank, shared before any Trainer has started the process
    group: it starts as the run's Trainer would start it, on the CPU for ``--device cpu`` (not NCCL by default)."""
    monkeypatch.setattr(launcher, "_has_accelerator", lambda: True)
    monkeypatch.setenv("WORLD_SIZE", "2")  # torchrun's; no group has started yet
    started = []

    def starting(args):
        started.append(args)
        raise RuntimeError("stopped where the process group would start")

    monkeypatch.setattr(launcher, "_start_process_group", starting)
    assert main(["-q", *argv, "--device", "cpu", "--save-dir", str(tmp_path / "out")]) != 0
    assert "stopped where the process group would start" in capsys.readouterr().err
    assert len(started) == 1 and started[0] is not None and started[0].device == "cpu"
