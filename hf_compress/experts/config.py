"""``ExpertConfig``: how many LoRA experts, their adapter settings, and the semantic space they are cut from."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ..utils import check_bool, check_float, check_int, check_seed, check_str_list


__all__ = ["DEFAULT_EMBEDDING_TOKENS", "SELECTION_METHODS", "TASK_MIX_TASKS", "WEIGHTINGS", "ExpertConfig"]

# The choices the CLI offers, here so that `hf-compress experts --help` imports neither torch nor datasets.
DEFAULT_EMBEDDING_TOKENS = 128
"""Prompt tokens embedded by default (the first ones): the default of every ``embedding_max_length``."""
# The offline tasks a mix can draw from (hf_compress.assets): multiple choice, SQuAD and GSM8K.
TASK_MIX_TASKS = ("arc_easy", "arc_challenge", "piqa", "hellaswag", "boolq", "winogrande", "squad", "gsm8k")
SELECTION_METHODS = ("facility_location", "k_center", "random")
WEIGHTINGS = ("loss",)


@dataclass
class ExpertConfig:
    """Settings of :func:`~hf_compress.experts.train_experts`.

    Args:
        num_experts: Number of semantic clusters, hence of LoRA experts (one PEFT adapter each).
        r: LoRA rank of every expert.
        lora_alpha: LoRA scaling numerator (``lora_alpha / r`` scales the update).
        lora_dropout: Dropout on the LoRA input during training.
        target_modules: Modules that get LoRA (PEFT's ``target_modules``: names, or one string read as a regex of
            the full module name; ``"all-linear"`` = every linear
            layer but the output head).
        seq_len: Token length of the packed training windows.
        embedding_layer: Decoder block whose output is pooled into the routing embedding; ``None`` = the
            block an eighth of the way up (index ``(n + 4) // 8``, 4 of SmolLM2's 30: it separated tasks as
            well as later blocks in our measurements and is cheap). Only the blocks up to it run when a
            batch is routed.
        embedding_max_length: Prompt tokens embedded (the first ones; longer prompts are cut).
        kmeans_restarts: k-means runs from different k-means++ seeds; the lowest-inertia one is kept.
        kmeans_iterations: Lloyd iterations per run at most.
        split_steps: With ``TrainingArguments.max_steps`` set, split those steps over the experts in
            proportion to their cluster sizes, so K experts cost what one adapter trained with the same
            arguments costs. ``False`` trains every expert for ``max_steps``.
        shared_warmup: Fraction of ``max_steps`` spent first on one LoRA trained on all the data; every
            expert starts from its weights and trains the remaining steps on its cluster (split as above).
            What all clusters need (the answer formats) is then learnt once instead of once per expert.
            0 (default) starts every expert from PEFT's fresh initialisation.
        joint_training: Train all experts in one ``Trainer`` run of ``max_steps`` steps instead of one run
            each: every batch mixes the clusters (in proportion to their sizes) and each row trains its own
            expert, so every expert is updated at each step its cluster has rows in the batch (nearly all of
            ``max_steps``, for about the compute of one adapter's run) instead of its share of the steps.
            ``split_steps`` then does not apply; gradient checkpointing is refused.
        seed: Seed of the clustering and of the training-window order.

    Example:
        >>> ExpertConfig(num_experts=4, r=8).adapter_name(2)
        'expert_2'
    """

    num_experts: int = 4
    r: int = field(default=8, metadata={"cli": ["--rank"]})
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    target_modules: list[str] | str = "all-linear"
    seq_len: int = 256
    embedding_layer: int | None = field(default=None, metadata={"type": int})  # CLI: --embedding-layer N
    embedding_max_length: int = DEFAULT_EMBEDDING_TOKENS
    kmeans_restarts: int = 4
    kmeans_iterations: int = 100
    split_steps: bool = True
    shared_warmup: float = 0.0
    joint_training: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        check_int("num_experts", self.num_experts, minimum=1)
        check_int("r", self.r, minimum=1)
        check_float("lora_alpha", self.lora_alpha, low=0.0, low_open=True)
        check_float("lora_dropout", self.lora_dropout, low=0.0, high=1.0, high_open=True)
        if isinstance(self.target_modules, str):  # PEFT's meaning: "all-linear", or a regex the full name must match
            if not self.target_modules.strip():
                raise ValueError("target_modules is empty; pass 'all-linear', module names or a regex of full names.")
        else:
            self.target_modules = check_str_list("target_modules", self.target_modules)
            if self.target_modules == ["all-linear"]:  # the CLI's --target-modules all-linear
                self.target_modules = "all-linear"
        check_int("seq_len", self.seq_len, minimum=8)
        check_int("embedding_layer", self.embedding_layer, minimum=0, allow_none=True,
                  hint="It is a decoder block index; None picks the block an eighth of the way up.")
        check_int("embedding_max_length", self.embedding_max_length, minimum=1)
        check_int("kmeans_restarts", self.kmeans_restarts, minimum=1)
        check_int("kmeans_iterations", self.kmeans_iterations, minimum=1)
        check_bool("split_steps", self.split_steps)
        check_float("shared_warmup", self.shared_warmup, low=0.0, high=1.0, high_open=True,
                    hint="It is the fraction of max_steps trained on all the data before the experts split.")
        check_bool("joint_training", self.joint_training)
        check_seed("seed", self.seed, numpy=True)

    @staticmethod
    def adapter_name(index: int) -> str:
        """The PEFT adapter name (and sub-folder) of expert ``index``."""
        return f"expert_{index}"

    def lora_config(self, model=None):
        """The ``peft.LoraConfig`` every expert is trained with (``fan_in_fan_out`` set for GPT-2-style
        ``Conv1D`` models, whose weights are stored transposed)."""
        from peft import LoraConfig
        from transformers.pytorch_utils import Conv1D

        transposed = model is not None and any(isinstance(module, Conv1D) for module in model.modules())
        return LoraConfig(r=self.r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout,
                          target_modules=self.target_modules, task_type="CAUSAL_LM", fan_in_fan_out=transposed)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready settings (what the saved folder records)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ExpertConfig:
        """Inverse of :meth:`to_dict`; unknown keys are refused (a newer format, or a typo)."""
        unknown = sorted(set(values) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"Unknown ExpertConfig field(s) {unknown}; upgrade hf_compress or remove them.")
        return cls(**values)
