"""``train_with_trainer``: the one place hf_compress builds ``TrainingArguments`` and runs ``Trainer``."""

from __future__ import annotations

import contextlib
import copy
import os
import pickle
import random
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from ..utils import InvalidArgumentTypeError, check_folder_path, get_logger, progress_bar
from ..utils.processes import is_main_process, process_count, process_group


if TYPE_CHECKING:
    import torch
    from datasets import Dataset
    from torch import nn
    from transformers import TrainingArguments


__all__ = [
    "OWN_LOSS_REFUSED", "FrozenModelTrainingModule", "TrainingSettings", "asked_arguments", "broadcast_from_main",
    "check_training_device", "is_main_process", "largest_over_processes", "map_over_processes",
    "preserved_random_state", "process_count", "refuse_arguments", "train_with_trainer",
]

logger = get_logger(__name__)

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class TrainingSettings:
    """The few knobs the CLI and the benchmarks set; anything else goes in ``extra_arguments``.

    ``device`` is where training runs, as the caller's ``--device`` says (``"cpu"``, ``"cuda"``, ``"cuda:0"``, a
    ``torch.device``; kept as its string); ``None`` leaves it to ``Trainer`` (its first GPU when there is one).
    ``"cpu"`` sets ``use_cpu``. A GPU ``Trainer`` would not train on is refused here, before any work: see
    :func:`check_training_device`.

    Example:
        >>> TrainingSettings(max_steps=10).learning_rate
        0.0001
        >>> TrainingSettings(device="cpu").use_cpu
        True
    """

    max_steps: int = 100
    learning_rate: float = 1e-4
    per_device_batch_size: int = 4
    gradient_accumulation_steps: int = 1
    warmup_steps: int = 0
    weight_decay: float = 0.0
    lr_scheduler_type: str = "linear"
    logging_steps: int = 10
    seed: int = 0
    use_cpu: bool = False
    extra_arguments: dict[str, Any] | None = None
    progress: bool = True  # fields added later go last: they must not shift the positional ones before them
    """``False``: no progress bar and no per-step loss dicts printed (the CLI's ``-q``); the losses still reach the
    returned ``log_history``."""
    device: str | None = None

    def __post_init__(self) -> None:
        if self.device is not None:
            import torch

            if not isinstance(self.device, (str, torch.device)):
                raise TypeError(f"device must be a string such as 'cpu' or a torch.device, got {self.device!r}.")
            try:
                self.device = str(torch.device(self.device))  # a string: the settings are recorded as JSON
            except RuntimeError:
                raise ValueError(f"device {self.device!r} is not a device; pass cpu, cuda or cuda:N.") from None
            if self.use_cpu and self.device != "cpu":
                raise ValueError(f"use_cpu=True contradicts device={self.device!r}: drop one of them.")
            check_training_device(self.device)
            self.use_cpu = self.device == "cpu"
        for name in ("max_steps", "per_device_batch_size", "gradient_accumulation_steps", "logging_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate!r}.")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}.")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be a non-negative integer, got {self.warmup_steps!r}.")


def check_training_device(device: str | torch.device | None) -> None:
    """Refuse, before any work, a device ``Trainer`` would not train on.

    ``Trainer`` places the model itself (``TrainingArguments`` picks the device; ``use_cpu`` asks for the CPU).
    Under ``torchrun`` / ``accelerate launch`` (``LOCAL_RANK`` set) each process trains on its own GPU,
    ``cuda:(LOCAL_RANK % GPU count)``. In one process it trains on ``cuda:0`` whatever the current CUDA device
    (transformers' ``TrainingArguments._setup_devices`` sets ``cuda:0`` current), so ``cuda:1`` there would be
    ignored, the model moved to ``cuda:0``: ``CUDA_VISIBLE_DEVICES=1`` makes that GPU ``cuda:0`` instead.
    ``None``, ``"cpu"`` and an index-less ``"cuda"`` always fit.

    Example:
        >>> check_training_device("cpu")
        >>> check_training_device("mps")
        Traceback (most recent call last):
        ...
        ValueError: training device 'mps': hf_compress trains on cpu or cuda; leave the device unset ...
    """
    import torch

    if device is None:
        return
    device = torch.device(device)
    if device.type == "cpu":
        return
    if device.type != "cuda":
        raise ValueError(f"training device {str(device)!r}: hf_compress trains on cpu or cuda; leave the device unset "
                         "to train where Trainer picks.")
    if not torch.cuda.is_available():
        raise ValueError(f"training device {device}: no CUDA GPU is available here; train on cpu.")
    if device.index is None:
        return
    local_rank = os.environ.get("LOCAL_RANK")
    if local_rank is not None:
        own = int(local_rank) % torch.cuda.device_count()
        if device.index != own:
            raise ValueError(
                f"training device {device}: under torchrun / accelerate launch (LOCAL_RANK={local_rank}) this process "
                f"trains on its own GPU, cuda:{own}; pass auto or cuda, or choose each process's GPUs with "
                "CUDA_VISIBLE_DEVICES."
            )
    elif device.index != 0:
        raise ValueError(
            f"training device {device}: in one process, transformers' Trainer trains on cuda:0, whatever the current "
            f"device; run with CUDA_VISIBLE_DEVICES={device.index} and device cuda (that GPU is then cuda:0)."
        )


@contextlib.contextmanager
def preserved_random_state() -> Iterator[None]:
    """Run a block that trains (``Trainer`` seeds every generator) inside another call, e.g. a learned
    permutation inside ``prune()``, without leaving the caller's generators re-seeded: Python's, NumPy's and
    torch's (the CPU's and every CUDA device's) are restored afterwards.

    Example:
        >>> import torch
        >>> _ = torch.manual_seed(0); expected = torch.rand(1)
        >>> _ = torch.manual_seed(0)
        >>> with preserved_random_state():
        ...     _ = torch.manual_seed(123)
        >>> bool(torch.rand(1) == expected)
        True
    """
    import numpy
    import torch

    python_state, numpy_state = random.getstate(), numpy.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(python_state)
            numpy.random.set_state(numpy_state)


def largest_over_processes(value: float, device: Any = "cpu") -> float:
    """The largest ``value`` over the processes training together (``value`` itself in one process).

    A callback that decides from a per-process reading (wall time) must decide alike on every rank: one rank
    stopping alone leaves the others waiting in DDP's gradient all-reduce forever. Every rank must call it at the
    same point; ``device`` is the Trainer's (``args.device``: NCCL reduces CUDA tensors only).

    Example:
        >>> largest_over_processes(2.5)
        2.5
    """
    import torch

    group = process_group()
    if group is None or group.get_world_size() == 1:
        return value
    reading = torch.tensor([value], dtype=torch.float64, device=device)
    group.all_reduce(reading, op=group.ReduceOp.MAX)
    return float(reading.item())


def broadcast_from_main(obj: T, args: TrainingSettings | TrainingArguments | None = None) -> T:
    """Rank 0's ``obj`` on every process training together (``obj`` itself in one process).

    A decision taken from a per-process measurement (a held-out score that picks a step, an embedding that is
    clustered, a subset that is selected) must be the same on every rank. On GPUs, non-deterministic kernels make
    two ranks' numbers differ in the last bits: ranks deciding on their own then keep different results (silently
    divergent replicas) or run different numbers of steps (DDP's collectives hang). So every rank measures, then
    takes rank 0's result from here. Every rank must call it at the same point, with the same kind of ``obj``.

    ``obj``: anything picklable; tensors should be on the CPU (a pickled CUDA tensor comes back on rank 0's GPU).
    ``args``: the run's ``TrainingSettings`` or ``TrainingArguments``. Under ``torchrun`` / ``accelerate launch``
    before any ``Trainer`` has started the process group (a decision before training), the group is started here
    as ``Trainer`` will start it from ``args`` (default ``TrainingSettings()``); ``TrainingArguments`` also name this
    process's device, which NCCL needs for the bytes it sends.

    Example:
        >>> broadcast_from_main({"best_step": 3})
        {'best_step': 3}
    """
    group = process_group()
    if group is None and process_count() > 1:
        group = _start_process_group(args)
    if group is None or group.get_world_size() == 1:
        return obj
    from transformers import TrainingArguments

    # NCCL moves the pickled bytes through this process's GPU: the Trainer's device (torch would otherwise take
    # the current CUDA device, which accelerate sets to the same one).
    device = args.device if isinstance(args, TrainingArguments) else None
    objects = [obj if group.get_rank() == 0 else None]
    group.broadcast_object_list(objects, src=0, device=device)
    return objects[0]


def map_over_processes(
    function: Callable[[T], R], items: Sequence[T], args: TrainingSettings | TrainingArguments | None = None, *,
    desc: str | None = None, unit: str = "it",
) -> list[R]:
    """``[function(item) for item in items]`` on every process, each process computing its share of the items.

    Item ``i`` is computed by process ``i % n`` of the ``n`` training together, and the results come back in the
    items' order on every process: what one process would compute, in ``1/n`` of the time, for work that is a loop
    over independent items (generations on prompts, rollouts). ``function`` must not call collectives itself;
    its results must be picklable (tensors on the CPU). Every process must call it at the same point with the same
    items. ``args``: as in :func:`broadcast_from_main` (starts the group under ``torchrun`` if no ``Trainer`` has).
    ``desc``: a progress bar over this process's share (drawn by the main process).

    Example:
        >>> map_over_processes(lambda x: x * x, [1, 2, 3])
        [1, 4, 9]
    """
    group = process_group()
    if group is None and process_count() > 1:
        group = _start_process_group(args)
    count, rank = (group.get_world_size(), group.get_rank()) if group else (1, 0)
    bar = progress_bar(range(rank, len(items), count), desc=desc, unit=unit, disable=desc is None)
    if count == 1:
        return [function(items[index]) for index in bar]
    failure: BaseException | None = None
    try:
        computed = [(index, function(items[index])) for index in bar]
        pickle.dumps(computed)  # what the gather sends: a result it cannot send fails here, on this process alone
    except Exception as error:  # noqa: BLE001 - told to every process below, or the others would wait forever
        failure, computed = error, []
    from transformers import TrainingArguments

    device = args.device if isinstance(args, TrainingArguments) else None
    shares: list[Any] = [None] * count
    share = (None if failure is None else f"{type(failure).__name__}: {failure}", computed)
    if device is not None and getattr(device, "type", "cpu") != "cpu":
        import torch

        with torch.cuda.device(device):  # NCCL moves the pickled bytes through this process's GPU
            group.all_gather_object(shares, share)
    else:
        group.all_gather_object(shares, share)
    if failure is not None:
        raise failure
    failed = [(process, message) for process, (message, _) in enumerate(shares) if message is not None]
    if failed:
        raise RuntimeError(f"process {failed[0][0]} failed in map_over_processes ({failed[0][1]}); see its log")
    ordered = dict(pair for _, computed_there in shares for pair in computed_there)
    return [ordered[index] for index in range(len(items))]


def _start_process_group(args: TrainingSettings | TrainingArguments | None) -> Any:
    """Start the process group as ``Trainer`` will (reading ``TrainingArguments.device`` sets up accelerate's
    state: backend, this process's GPU); ``torch.distributed``, or ``None`` when none starts."""
    from transformers import TrainingArguments

    if not isinstance(args, TrainingArguments):
        # Nothing is written to output_dir: the arguments only start the group.
        args = _arguments_from_settings(args or TrainingSettings(), "hf_compress_process_group")
    _ = args.device
    return process_group()


class FrozenModelTrainingModule:
    """Mixin for a module that ``Trainer`` trains around a frozen model: its ``state_dict`` — what ``Trainer``
    checkpoints (``save_steps``) and resumes from — holds the trained part only (``trained_part()``).

    The frozen model's weights need no checkpoint, and writing them would fail: ``Trainer`` saves a module that
    is not a ``PreTrainedModel`` with ``safetensors.save_file``, which refuses tied embeddings (SmolLM2, Gemma).
    ``load_state_dict`` takes such a state dict back into the trained part (resuming reports no missing keys).

    Example:
        >>> from torch import nn
        >>> class Wrapper(FrozenModelTrainingModule, nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.frozen, self.head = nn.Linear(2, 2), nn.Linear(2, 1)
        ...     def trained_part(self):
        ...         return self.head
        >>> sorted(Wrapper().state_dict())
        ['head.bias', 'head.weight']
    """

    def trained_part(self) -> nn.Module:
        raise NotImplementedError

    def state_dict(self, *args: Any, destination: Any = None, prefix: str = "", keep_vars: bool = False) -> Any:
        part, name = self._trained_part_and_prefix()
        return part.state_dict(destination=destination, prefix=f"{prefix}{name}", keep_vars=keep_vars)

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        part, name = self._trained_part_and_prefix()
        outside = [key for key in state_dict if not key.startswith(name)]
        if strict and outside:
            raise RuntimeError(f"the state dict holds keys outside the trained part ({name}*): {outside[:5]}")
        result = part.load_state_dict({key[len(name):]: value for key, value in state_dict.items()
                                       if key.startswith(name)}, strict=strict, assign=assign)
        return type(result)([name + key for key in result.missing_keys],  # torch's (missing, unexpected) tuple
                            [name + key for key in result.unexpected_keys] + outside)

    def _trained_part_and_prefix(self) -> tuple[nn.Module, str]:
        part = self.trained_part()
        return part, next(f"{name}." for name, module in self.named_modules() if module is part)


def asked_arguments(settings: TrainingSettings | TrainingArguments | None, names: Iterable[str]) -> dict[str, Any]:
    """The ``TrainingArguments`` fields ``names`` as ``settings`` ask for them: a ``TrainingArguments``' own values,
    or those a ``TrainingSettings``' ``extra_arguments`` give (a field they leave out is not asked for).

    Example:
        >>> asked_arguments(TrainingSettings(extra_arguments={"push_to_hub": True}), ["push_to_hub", "seed"])
        {'push_to_hub': True}
    """
    if settings is None:
        return {}
    if isinstance(settings, TrainingSettings):
        given = settings.extra_arguments or {}
        return {name: given[name] for name in names if name in given}
    from transformers import TrainingArguments

    if not isinstance(settings, TrainingArguments):  # every method reads its arguments here first
        raise InvalidArgumentTypeError(f"args must be transformers.TrainingArguments or TrainingSettings, got "
                                       f"{type(settings).__name__}.")
    return {name: getattr(settings, name) for name in names if hasattr(settings, name)}


def refuse_gradient_checkpointing(model: nn.Module, settings: Any = None, *, reason: str) -> None:
    """Refuse, before any work, gradient checkpointing on ``model`` or asked of ``Trainer`` by ``settings``
    (``TrainingArguments``, or ``TrainingSettings`` through its ``extra_arguments``), for a training whose forward
    the backward pass's recomputation would not repeat; ``reason`` says why, and the message says what to turn off.

    Example:
        >>> from hf_compress.assets import tiny_model
        >>> refuse_gradient_checkpointing(tiny_model("llama")[0], reason="this training cannot checkpoint")
    """
    if any(getattr(module, "gradient_checkpointing", False) is True for module in model.modules()):
        raise ValueError(f"{reason}; call model.activation_checkpointing_disable() first "
                         "(gradient_checkpointing_disable() before transformers 5.25).")
    # activation_checkpointing is gradient_checkpointing's newer name (transformers 5.25); TrainingArguments sets both.
    flags = ("activation_checkpointing", "gradient_checkpointing")
    asked = asked_arguments(settings, flags)
    named = [name for name in flags if asked.get(name)]
    if named:
        raise ValueError(f"{reason}; leave {' and '.join(named)} off in the training arguments.")


OWN_LOSS_REFUSED: dict[str, str] = {
    "label_smoothing_factor": "it computes its own loss, so Trainer's label smoother has no causal-LM logits to smooth",
    "neftune_noise_alpha": "NEFTune puts noise on a causal LM's input embeddings, and what Trainer trains here is a "
                           "module around the frozen model, not a causal LM",
}
"""Training arguments that a training computing its own loss around a frozen model (router, drafting heads, joint
experts) cannot honour, with why: pass it to :func:`refuse_arguments`."""


def refuse_arguments(settings: TrainingSettings | TrainingArguments | None, refused: dict[str, str], *,
                     what: str) -> None:
    """Refuse, before any work, a training argument ``what`` cannot honour: each field of ``refused`` (a
    ``TrainingArguments`` field name: why) set away from its default in ``settings`` (``TrainingArguments``, or a
    ``TrainingSettings``' ``extra_arguments``) raises ``ValueError`` with the reason and the default to leave it at.

    Example:
        >>> refuse_arguments(TrainingSettings(extra_arguments={"label_smoothing_factor": 0.1}), OWN_LOSS_REFUSED,
        ...                  what="Router training")
        Traceback (most recent call last):
        ValueError: Router training cannot honour label_smoothing_factor=0.1: it computes its own loss, ...
    """
    import dataclasses

    from transformers import TrainingArguments

    asked = asked_arguments(settings, refused)
    if not asked:
        return
    defaults = {field.name: field.default for field in dataclasses.fields(TrainingArguments)}
    for name, why in refused.items():
        if name in asked and asked[name] != defaults.get(name):
            raise ValueError(f"{what} cannot honour {name}={asked[name]!r}: {why}. Leave it at its default "
                             f"({defaults.get(name)!r}).")


def train_with_trainer(
    model: nn.Module,
    train_dataset: Dataset,
    output_dir: str,
    settings: TrainingSettings | TrainingArguments | None = None,
    *,
    callbacks: list | None = None,
    eval_dataset: Dataset | None = None,
) -> dict[str, Any]:
    """Train ``model`` (e.g. a ``PeftModel``) on ``train_dataset`` with ``transformers.Trainer``.

    ``settings`` are our few knobs, or a full ``TrainingArguments`` used as given (where they train included). With
    ``TrainingSettings``, training runs on their ``device`` (checked again here); without one, where ``Trainer``
    picks. Nothing is saved by the
    Trainer itself (``save_strategy="no"`` from settings); the caller saves what it trained. Returns the
    Trainer's metrics plus ``train_seconds`` and ``log_history``. ``eval_dataset`` is Trainer's, for an
    ``eval_strategy`` in the arguments.

    ``resume_from_checkpoint`` in the arguments (``TrainingArguments(..., save_steps=50,
    resume_from_checkpoint=True)``, or ``extra_arguments={"resume_from_checkpoint": "run/checkpoint-50"}``) resumes
    an interrupted run: Trainer restores the trained weights, optimizer, scheduler, random state and step. Trainer
    itself leaves that field to the calling script, and here this function is the script; ``True`` takes the last
    checkpoint in ``output_dir`` (so give one that outlives the run).

    Example:
        >>> from peft import get_peft_model
        >>> from hf_compress.assets import tiny_model, tiny_tokenizer
        >>> from hf_compress.quantization import DLQATConfig
        >>> from hf_compress.training import causal_lm_dataset
        >>> model = get_peft_model(tiny_model("llama")[0], DLQATConfig(bits=4, group_size=32, r=2))
        >>> data = causal_lm_dataset(["text " * 50], tiny_tokenizer(), num_sequences=4, seq_len=16)
        >>> result = train_with_trainer(model, data, "/tmp/run", TrainingSettings(max_steps=2, use_cpu=True))  # doctest: +SKIP
    """
    from transformers import Trainer, TrainingArguments, default_data_collator

    if isinstance(settings, TrainingArguments):
        arguments = settings
        if arguments.dataloader_pin_memory and not _has_accelerator():
            # pinning does nothing without an accelerator except warn on every DataLoader; the user's object stays
            arguments = copy.copy(arguments)
            arguments.dataloader_pin_memory = False
    else:
        arguments = _arguments_from_settings(settings or TrainingSettings(), output_dir)
    if arguments.output_dir:  # Trainer's makedirs would say only "File exists" / "Not a directory"
        check_folder_path(arguments.output_dir)
    trainer = Trainer(
        model=model, args=arguments, train_dataset=train_dataset, data_collator=default_data_collator,
        callbacks=[*(callbacks or []), _untrained_parameters_callback()],
        eval_dataset=eval_dataset,  # for eval_strategy in the caller's TrainingArguments; Trainer refuses it without
    )
    if isinstance(settings, TrainingSettings) and not settings.progress:
        # Without its bar, Trainer print()s every log dict instead (PrinterCallback): quiet means neither.
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)
    _kernelize_for_training(trainer.model)
    start = time.perf_counter()
    output = trainer.train(resume_from_checkpoint=arguments.resume_from_checkpoint)
    seconds = time.perf_counter() - start
    if trainer.state.global_step == 0:
        # Too few rows for one batch (dataloader_drop_last drops the partial one): the caller would get back, and
        # save, an untrained model as a trained one.
        rows = f"{len(train_dataset)} " if hasattr(train_dataset, "__len__") else ""  # an iterable dataset has none
        if arguments.max_steps <= 0 and arguments.num_train_epochs <= 0:
            raise ValueError(f"Trainer ran no optimizer step: the training arguments ask for num_train_epochs="
                             f"{arguments.num_train_epochs:g} and no max_steps; set either above 0.")
        raise ValueError(
            f"Trainer ran no optimizer step on these {rows}training rows (per-device batch "
            f"{arguments.per_device_train_batch_size} x {arguments.world_size} process(es), gradient accumulation "
            f"{arguments.gradient_accumulation_steps}, dataloader_drop_last={arguments.dataloader_drop_last}), so "
            "nothing was trained; give it more rows, a smaller batch, or dataloader_drop_last=False."
        )
    logger.info("trained %d steps in %.1f s (loss %.4f)", trainer.state.global_step, seconds, output.training_loss)
    return {
        **output.metrics,
        "train_seconds": seconds,
        "training_loss": output.training_loss,
        "global_step": trainer.state.global_step,
        "settings": asdict(settings) if isinstance(settings, TrainingSettings) else arguments.to_dict(),
        "log_history": trainer.state.log_history,
    }


def _untrained_parameters_callback() -> Any:
    """A callback that warns, at the first optimizer step, of trainable parameters the backward pass did not reach.

    A layer whose weight its block reads itself (Mamba's mixer reads ``dt_proj.weight``) never runs its forward, so an
    adapter on it gets no gradient: it stays as initialised, while a DL-QAT export would still pack the layer as if
    trained. Nothing is said when no parameter has a gradient (ZeRO and FSDP keep gradients elsewhere).
    """
    from transformers import TrainerCallback

    class UntrainedParameters(TrainerCallback):
        checked = False

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            if self.checked or model is None:
                return
            self.checked = True
            trainable = [(name, parameter) for name, parameter in model.named_parameters() if parameter.requires_grad]
            missing = [name for name, parameter in trainable if parameter.grad is None]
            if missing and len(missing) < len(trainable):
                modules = sorted({_owning_layer(model, name) for name in missing})
                logger.warning(
                    "%d trainable tensors got no gradient in the first step, so they will not train: those of %s. "
                    "The forward never ran them (a block may read a layer's weight itself, as Mamba's mixer does "
                    "dt_proj's) or the loss does not reach them; leave them out of the adapted modules "
                    "(exclude_modules).", len(missing), ", ".join(modules[:4]) + (", ..." if len(modules) > 4 else ""))

    return UntrainedParameters()


def _owning_layer(model: nn.Module, parameter_name: str) -> str:
    """The layer a trainable tensor adapts (a PEFT layer, the one holding ``base_layer``), else the module holding it;
    without PEFT's ``base_model.model.`` prefix."""
    path = parameter_name.rpartition(".")[0]
    prefix = path
    while prefix:
        if hasattr(model.get_submodule(prefix), "base_layer"):
            path = prefix
            break
        prefix = prefix.rpartition(".")[0]
    return path.removeprefix("base_model.model.")


def _kernelize_for_training(model: nn.Module) -> None:
    """Switch a model loaded with hub kernels to training mode before Trainer does, so that a failed kernel
    download says what to do. transformers 5.25 loads with ``use_kernels=True`` by default, and ``train()``
    kernelizes the model again for its device: on a GPU that fetches kernels from the Hub."""
    if not getattr(model, "use_kernels", False):
        return
    try:
        model.train()
    except Exception as err:
        raise RuntimeError(
            f"switching the model to training mode kernelized it with kernels from the Hub, and that failed: {err}. "
            "The model was loaded with hub kernels (transformers 5.25's default): load it with use_kernels=False, or "
            "set USE_HUB_KERNELS=0, on a machine without network."
        ) from err


def _arguments_from_settings(settings: TrainingSettings, output_dir: str):
    from transformers import TrainingArguments

    # Checked again: a field set after the settings were made skipped __post_init__.
    device = None if settings.device is None else str(settings.device)
    check_training_device(device)
    _warn_if_replicated(device)
    use_cpu = settings.use_cpu or device == "cpu"
    owned = {
        "output_dir": output_dir,
        "max_steps": settings.max_steps,
        "learning_rate": settings.learning_rate,
        "per_device_train_batch_size": settings.per_device_batch_size,
        "gradient_accumulation_steps": settings.gradient_accumulation_steps,
        "warmup_steps": settings.warmup_steps,
        "weight_decay": settings.weight_decay,
        "lr_scheduler_type": settings.lr_scheduler_type,
        "logging_steps": settings.logging_steps,
        "seed": settings.seed,
        # Without an accelerator, torchrun's processes train apart unless told the CPU is the device (gloo DDP).
        "use_cpu": use_cpu or not _has_accelerator(),
    }
    extra = dict(settings.extra_arguments or {})
    clashing = sorted(set(extra) & set(owned))
    if clashing:
        raise ValueError(f"extra_arguments sets {clashing}, which TrainingSettings fields set: set those fields instead "
                         "(output_dir is the launcher's argument).")
    defaults = {  # the launcher's choices; extra_arguments may change them (report_to=["tensorboard"], ...)
        "save_strategy": "no", "report_to": [], "disable_tqdm": not settings.progress, "dataloader_num_workers": 0,
        # Pinned memory only helps copies to an accelerator; without one torch warns on every DataLoader.
        "dataloader_pin_memory": not use_cpu and _has_accelerator(),
    }
    return TrainingArguments(**owned, **{**defaults, **extra})


def _warn_if_replicated(device: str | None) -> None:
    """Warn when a named GPU will not be the only one: in one process with several GPUs visible, ``Trainer``
    replicates the model over all of them (``nn.DataParallel``)."""
    import torch

    if (device is not None and device.startswith("cuda") and "LOCAL_RANK" not in os.environ
            and torch.cuda.device_count() > 1):
        logger.warning("training on %s: Trainer replicates the model over all %d visible GPUs in one process "
                       "(nn.DataParallel); run with CUDA_VISIBLE_DEVICES=%d to train on that GPU alone.",
                       device, torch.cuda.device_count(), torch.device(device).index or 0)


def _has_accelerator() -> bool:
    import torch

    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6: CUDA, XPU, MPS, ...
    if accelerator is not None and hasattr(accelerator, "is_available"):
        return bool(accelerator.is_available())
    return torch.cuda.is_available()
