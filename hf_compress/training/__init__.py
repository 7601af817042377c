"""Training through ``transformers.Trainer``: token-window datasets and one launcher for every method.

Methods that train (DL-QAT adapters, drafting heads, the token router, experts, learned permutations) hand
``train_with_trainer`` a model and a dataset; the ``Trainer`` underneath gives gradient accumulation, checkpointing,
logging and, without code changes, multi-process training (``accelerate launch`` / ``torchrun``: DDP, FSDP, DeepSpeed).
Work outside a ``Trainer`` (a loop of generations: the CoSpec arbiter's oracle labels and rollouts) is shared out with
``map_over_processes``.
"""

from .data import causal_lm_dataset
from .trainer import (
    OWN_LOSS_REFUSED,
    FrozenModelTrainingModule,
    TrainingSettings,
    asked_arguments,
    broadcast_from_main,
    check_training_device,
    is_main_process,
    largest_over_processes,
    map_over_processes,
    preserved_random_state,
    process_count,
    refuse_arguments,
    refuse_gradient_checkpointing,
    train_with_trainer,
)


__all__ = [
    "OWN_LOSS_REFUSED",
    "FrozenModelTrainingModule",
    "TrainingSettings",
    "asked_arguments",
    "broadcast_from_main",
    "causal_lm_dataset",
    "check_training_device",
    "is_main_process",
    "largest_over_processes",
    "map_over_processes",
    "preserved_random_state",
    "process_count",
    "refuse_arguments",
    "refuse_gradient_checkpointing",
    "train_with_trainer",
]
