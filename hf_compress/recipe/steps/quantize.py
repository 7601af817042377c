"""``quantize``: DL-QAT (a PEFT adapter trained with ``Trainer``, exported with ``merge_and_quantize``) or RTN.

Both leave packed low-bit ``PackedLinear`` layers (fact ``packed``). On a sparse model DL-QAT keeps the mask
fixed (``DLQATConfig.keep_sparsity``, ``auto`` by default), so the packed layers carry it.

Example:
    >>> step = QuantizeStep.parse(1, {"method": "dlqat", "bits": 4, "training": {"max_steps": 40}}, seed=0)
    >>> step.fields["group_size"], step.fields["training"]["max_steps"], step.fields["target_modules"]
    (128, 40, 'all-linear')
"""

from __future__ import annotations

import dataclasses
import inspect
import tempfile
from typing import Any

from ...utils import check_str_list, get_logger
from ..config import RecipeError, check_keys, refused_as
from .base import ROUTE_STACKING, RecipeState, Step
from .training import check_device, check_lengths, parse_training, training_data, training_settings


logger = get_logger(__name__)

METHODS = ("dlqat", "rtn")
TWO_QUANTIZE = (
    "two quantize steps: the model is already packed low-bit and packed layers cannot be quantized again; keep one "
    "quantize step."
)
# DL-QAT defaults of the recipe where they differ from DLQATConfig's (as `hf-compress quantize dlqat` does).
DLQAT_DEFAULTS = {"target_modules": "all-linear"}


class QuantizeStep(Step):
    """``quantize: {method: dlqat, <DLQATConfig fields>, training: {...}}`` or ``{method: rtn, bits, group_size, ...}``."""

    kind = "quantize"

    @classmethod
    def parse(cls, index: int, data: dict[str, Any], seed: int) -> QuantizeStep:
        method = cls.method_of(index, data, list(METHODS))
        where = cls.where(index, method)
        if method == "dlqat":
            names = _dlqat_fields()
            fields = check_keys(where, data, {"method", "training", *names})
            fields.pop("method")
            training = parse_training(where, fields.pop("training", None), {"learning_rate": 1e-3})
            fields = {**DLQAT_DEFAULTS, **fields}
            rank = fields.get("r", 16)
            if isinstance(rank, int) and not isinstance(rank, bool):  # else DLQATConfig refuses r, naming it
                fields.setdefault("lora_alpha", float(rank))  # scale 1, as the CLI does
            config = _dlqat_config(where, fields)
            resolved = {name: _plain(getattr(config, name)) for name in names}
            return cls(index, method, {**resolved, "training": training})
        defaults = {name: p.default for name, p in inspect.signature(_rtn()).parameters.items() if name != "model"}
        fields = check_keys(where, data, {"method", *defaults})
        fields.pop("method")
        fields = {**defaults, **fields}
        _check_rtn(where, fields)
        with refused_as(where):  # a lone pattern is a list of one, never a list of its characters
            fields["skip"] = check_str_list("skip", fields["skip"])
        return cls(index, method, fields)

    def produces(self) -> set[str]:
        return {"packed"}

    def refused_after(self) -> dict[str, str]:
        return {**super().refused_after(), "packed": TWO_QUANTIZE, "routed": ROUTE_STACKING["packed"]}

    def check_model(self, state: RecipeState) -> None:
        # PEFT finds out only when it wraps the model, after the earlier steps' work.
        if self.method == "dlqat":
            _check_targets(self.where(self.index, self.method), self.fields, state.model)
            check_device(self.where(self.index, self.method), state.device)
            check_lengths(self.where(self.index, self.method), state.model,
                          {"training.seq_len": self.fields["training"]["seq_len"]})

    def apply(self, state: RecipeState, progress: bool) -> dict[str, Any]:
        if self.method == "rtn":
            state.model = _rtn()(state.model, **self.fields)
            state.format_recipes["quantization"] = {"method": "rtn", **self.fields}
            return {}
        from peft import get_peft_model

        from ... import _compat
        from ...training import train_with_trainer

        fields = {k: v for k, v in self.fields.items() if k != "training"}
        training = self.fields["training"]
        config = _dlqat_config(self.where(self.index, self.method), fields)
        with _compat.third_party_warnings_silenced():
            adapted = get_peft_model(state.model, config)
        data = training_data(training, state.tokenizer, state.seed)
        with tempfile.TemporaryDirectory(prefix="recipe-dlqat-") as scratch:
            result = train_with_trainer(adapted, data, scratch, training_settings(training, state.seed, state.device, progress))
        state.model = adapted.merge_and_quantize(progressbar=progress)
        state.format_recipes["quantization"] = {"method": "dlqat", **self.fields}
        return {"training_loss": round(float(result["training_loss"]), 6), "training_steps": result["global_step"],
                "train_seconds": round(result["train_seconds"], 2)}


def _dlqat_fields() -> list[str]:
    """DLQATConfig's own fields (not PEFT's bookkeeping such as ``revision`` or ``task_type``)."""
    from peft.config import PeftConfig

    from ...quantization.dlqat import DLQATConfig

    inherited = {f.name for f in dataclasses.fields(PeftConfig)}
    return [f.name for f in dataclasses.fields(DLQATConfig) if f.name not in inherited]


def _dlqat_config(where: str, fields: dict[str, Any]) -> Any:
    from ...quantization.dlqat import DLQATConfig

    with refused_as(where):
        return DLQATConfig(**fields)


def _check_targets(where: str, fields: dict[str, Any], model: Any) -> None:
    """Refuse ``target_modules`` that name no linear layer of ``model`` (each entry of a list), or a non-linear one."""
    from peft.tuners.tuners_utils import check_target_module_exists

    from ...modeling.layers import is_linear

    targets = fields["target_modules"]
    if targets == "all-linear":
        return
    config = _dlqat_config(where, {k: v for k, v in fields.items() if k != "training"})
    modules = [(name, module) for name, module in model.named_modules() if name]
    linear = [name for name, module in modules if is_linear(module)]
    endings = ", ".join(sorted({name.rsplit(".", 1)[-1] for name in linear}))
    hint = f"the model's linear layers are named {endings} (or use 'all-linear')"
    if isinstance(targets, str):  # a regex, matched against whole module names as PEFT does
        unmatched = [] if any(check_target_module_exists(config, name) for name in linear) else [targets]
    else:
        unmatched = [t for t in targets if not any(name == t or name.endswith(f".{t}") for name in linear)]
    if unmatched:
        verb = "matches" if len(unmatched) == 1 else "match"
        raise RecipeError(f"{where}: target_modules {', '.join(repr(t) for t in unmatched)} {verb} no linear layer of "
                          f"this {model.config.model_type} model; {hint}.")
    others = [name for name, module in modules if not is_linear(module) and check_target_module_exists(config, name)]
    if others:
        raise RecipeError(f"{where}: target_modules match {', '.join(others[:3])}{', ...' if len(others) > 3 else ''}, "
                          f"which DL-QAT cannot quantize (not linear layers); {hint}.")


def _rtn():
    from ...quantization.rtn import quantize_rtn

    return quantize_rtn


def _check_rtn(where: str, fields: dict[str, Any]) -> None:
    from ...quantization.grid import check_grid_arguments, check_keep_sparsity
    from ...utils import check_bool, check_str_list

    with refused_as(where):
        check_grid_arguments(fields["bits"], fields["group_size"])
        check_keep_sparsity(fields["keep_sparsity"])
        check_bool("symmetric", fields["symmetric"])
        check_str_list("skip", fields["skip"])


def _plain(value: Any) -> Any:
    """A config value as YAML-ready data (PEFT turns module lists into sets)."""
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    return list(value) if isinstance(value, tuple) else value
