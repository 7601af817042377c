"""The lifecycle every pruner shares: load, check everything, calibrate, prune, record, save.

``BasePruner.prune`` is a template: it checks the config, the save folder and the method's own
preconditions (``plan``) before any work, prepares the calibration windows, runs the method (``run``),
records the recipe in ``model.config.hf_compress`` and saves (``save``). Two families fill the hooks:

- ``MaskPruner`` (``mask_pruner.py``): zeros inside every linear layer, block by block, saved sparse
  (magnitude, Wanda, SparseGPT, SDS);
- ``StructuralPruner`` (``structural.py``): whole heads, channels or blocks removed under a global budget,
  saved as a smaller model (Týr, block removal).

A concrete pruner registers itself under its config's ``method`` when its class is defined
(``registry.PRUNERS``).

Example:
    >>> from hf_compress.pruning import WandaConfig, WandaPruner
    >>> pruner = WandaPruner.from_pretrained("tiny-llama")
    >>> model = pruner.prune(WandaConfig(sparsity="2:4", num_calibration_sequences=4, calibration_seq_len=32),
    ...                      calibration_dataset=["some calibration text " * 20], progress=False)
    >>> round(pruner.report.overall_sparsity, 2)
    0.5
"""

from __future__ import annotations

import argparse
import os
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Self

import torch
from torch import nn

from .. import __version__, _compat
from ..modeling import calibration_batches, check_within_learned_positions
from ..modeling.calibration import check_token_ids
from ..utils import check_save_dir as check_save_folder
from ..utils import InvalidArgumentTypeError, check_bool, check_path, get_logger, progress_kwargs
from .config import CALIBRATION_DATA_KEY, CALIBRATION_FIELDS, PruningConfig, SparsityPattern, parse_sparsity
from .registry import register_pruner


if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


__all__ = ["RECIPE_KEY", "BasePruner", "check_save_dir"]

logger = get_logger(__name__)

RECIPE_KEY = "hf_compress"
"""Attribute of ``model.config`` holding ``{"pruning": config.to_dict(), "version": ...}`` after pruning."""


class BasePruner(ABC):
    """Base class of every pruner: ``from_pretrained`` → ``prune(config, ...)`` → pruned model.

    Subclasses set ``config_class`` (the ``PruningConfig`` subclass they accept) and implement ``run``
    and ``save`` (the two families do: ``MaskPruner``, ``StructuralPruner``); ``plan`` checks a call's
    method-specific preconditions before any work.

    Attributes:
        model: the model being pruned (pruned in place).
        tokenizer: used to tokenize calibration text and saved with the model.
        report: the report of the last ``prune`` call (``None`` before).

    Example:
        >>> pruner = MagnitudePruner.from_pretrained("tiny-gpt2")  # doctest: +SKIP
        >>> model = pruner.prune(MagnitudeConfig(sparsity=0.5), save_dir="out/")  # doctest: +SKIP
    """

    config_class: ClassVar[type[PruningConfig]] = PruningConfig
    requires_calibration: ClassVar[bool] = True
    cli_defaults: ClassVar[dict[str, Any]] = {}
    """Config values ``hf-compress prune METHOD`` uses when the flag is not given (over the config's defaults)."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "config_class" in cls.__dict__ and cls.config_class.method:  # a concrete method, not a family base
            register_pruner(cls)

    def __init__(
        self, model: PreTrainedModel | nn.Module, tokenizer: PreTrainedTokenizerBase | None = None
    ) -> None:
        if not isinstance(model, nn.Module):
            from transformers import Pipeline

            hint = (f" {type(self).__name__}.from_pretrained({model!r}) loads one by name." if isinstance(model, str)
                    else " Pass the pipeline's model (pipe.model)." if isinstance(model, Pipeline) else "")
            raise TypeError(f"{type(self).__name__} needs a torch model, got {type(model).__name__}.{hint}")
        _check_tokenizer(tokenizer)
        self.model = model
        self.tokenizer = tokenizer
        self.report: Any = None
        self.permutation_report: Any = None
        """The ``PermutationReport`` of the last ``prune`` with a ``permutation`` (``None`` otherwise)."""
        self.calibration_data: str | None = None
        """What the calibration text is (``"hf_compress news corpus"``), recorded with the recipe (config.json, card)
        when a prune reads calibration text; the command line sets it from ``--calibration-text``."""

    # ------------------------------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(
        cls,
        model_or_path: PreTrainedModel | nn.Module | str | os.PathLike,
        tokenizer: PreTrainedTokenizerBase | None = None,
        **load_kwargs: Any,
    ) -> Self:
        """A pruner for a loaded model (used as is) or for a model to load.

        A name or path goes through ``hf_compress.assets.load_model`` (reference names such as
        ``"smollm2-135m"``, ``"tiny-<arch>"``, a local folder, a Hub id), ``load_kwargs`` with it (``dtype``, and
        ``device_map``, ``revision``, ... for ``from_pretrained``). The tokenizer is loaded alongside unless one is
        given.

        Example:
            >>> pruner = SparseGPTPruner.from_pretrained("tiny-opt")  # doctest: +SKIP
            >>> pruner = SparseGPTPruner.from_pretrained(model, tokenizer)  # doctest: +SKIP
        """
        if isinstance(model_or_path, nn.Module):
            return cls(model_or_path, tokenizer)
        check_path("model_or_path", model_or_path,
                   hint="Pass a loaded model, a reference name (smollm2-135m), tiny-<arch>, a folder or a Hub id.")
        _check_tokenizer(tokenizer)
        name = os.fspath(model_or_path)
        from ..assets import load_model

        model, loaded_tokenizer = load_model(name, with_tokenizer=tokenizer is None, **load_kwargs)
        return cls(model, tokenizer if tokenizer is not None else loaded_tokenizer)

    # ------------------------------------------------------------------------------------------ lifecycle

    def prune(
        self,
        config: PruningConfig | float | str | None = None,
        calibration_dataset: str | Sequence[str] | Dataset | torch.Tensor | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        save_dir: str | os.PathLike | None = None,
        overwrite: bool = False,
        progress: bool = True,
    ) -> PreTrainedModel:
        """Prune the model to ``config``; returns it (pruned in place).

        All inputs are checked before any weight changes: the config type, the ``save_dir`` (a folder
        that already holds a model raises ``FileExistsError`` unless ``overwrite``; saving needs a
        ``PreTrainedModel``), the method's own preconditions (``plan``: e.g. that every N:M layer's input
        width is a multiple of M, or that a structural target is reachable), and, for calibrated methods,
        that calibration text and a tokenizer are given and hold at least ``calibration_seq_len`` tokens.

        With ``config.permutation`` (N:M only) the input channels are permuted first and the permutation is
        absorbed into the dense weights (``hf_compress.pruning.permutation``), so the method prunes an
        equivalent model and the checkpoint stays an ordinary N:M one; ``self.permutation_report`` says
        what it did.

        Should the method fail midway, the in-memory model may be left partly pruned and nothing is
        written. The recipe is recorded in ``model.config.hf_compress`` and the results in ``self.report``.
        With ``save_dir`` the model is saved there in the family's format (an all-or-nothing write);
        ``AutoModelForCausalLM.from_pretrained(save_dir)`` loads it back after ``import hf_compress``.

        Args:
            config: a config of this pruner's ``config_class``, or just a target (``"2:4"``, ``0.5``) for
                its defaults.
            calibration_dataset: text (a string, a list of strings, a ``datasets.Dataset`` with a
                ``text`` column) sampled into ``num_calibration_sequences`` windows of
                ``calibration_seq_len`` tokens, or a ``[num_sequences, seq_len]`` tensor of token ids
                used as is. Ignored (with a warning) by methods without calibration.
            tokenizer: overrides the pruner's tokenizer.
            save_dir: where to save the pruned model and tokenizer.
            overwrite: replace a model already in ``save_dir``.
            progress: show progress bars.

        Example:
            >>> pruner = SparseGPTPruner.from_pretrained("smollm2-135m")  # doctest: +SKIP
            >>> pruner.prune(SparseGPTConfig(sparsity="2:4"), load_text("wikipedia", "calibration"),
            ...              save_dir="smollm2-2of4")  # doctest: +SKIP
        """
        config = self._check_config(config)
        if not config.pattern.is_n_m and config.pattern.ratio == 0:
            logger.warning("%s with sparsity 0 removes no weight: the result is the dense model. Pass the fraction "
                           "to remove, e.g. 0.5 or '2:4'.", type(self).__name__)
        _check_tokenizer(tokenizer)
        check_path("save_dir", save_dir, allow_none=True)
        check_bool("overwrite", overwrite)
        check_bool("progress", progress)
        if tokenizer is not None:
            self.tokenizer = tokenizer
        if save_dir is not None:
            check_save_dir(Path(save_dir), overwrite, self.model)
        self._check_model_can_be_pruned()
        plan = self.plan(config)
        permutation_sites = self._check_permutation(config)
        calibration_ids = self._calibration_ids(config, calibration_dataset,
                                                required=_permutation_trains(config))
        self.permutation_report = None
        if permutation_sites is not None:  # absorbed into the dense weights: the method prunes an equivalent model
            from .permutation import permute_for_pruning

            self.permutation_report = permute_for_pruning(self.model, config, permutation_sites, calibration_ids,
                                                          progress)
        self.report = self.run(config, plan, calibration_ids, progress)
        self._record_recipe(config, calibrated=calibration_ids is not None)
        if save_dir is not None:
            with _compat.quiet_weight_progress():  # transformers' own save bars; the format's encoding has its own
                self.save(Path(save_dir), overwrite, config, **progress_kwargs(self.save, progress))
        return self.model  # type: ignore[return-value]

    def config_for_target(self, target: float | str | SparsityPattern) -> PruningConfig:
        """The default config for a bare target given to ``prune`` (``"2:4"``, ``0.5``)."""
        return self.config_class(sparsity=parse_sparsity(target).to_json())

    def plan(self, config: PruningConfig) -> Any:
        """Check the method's preconditions on this model before any work; return what ``run`` needs."""
        return None

    @abstractmethod
    def run(self, config: PruningConfig, plan: Any, calibration_ids: torch.Tensor | None, progress: bool) -> Any:
        """Prune the model in place (calibrating on ``calibration_ids`` if the method needs it); return the report."""

    @abstractmethod
    def save(self, save_dir: Path, overwrite: bool, config: PruningConfig, progress: bool = True) -> None:
        """Write the pruned model, its tokenizer and card to ``save_dir`` (all or nothing); ``progress``: a bar for
        work that takes long on a big model (the sparse format's encoding). An override may leave ``progress`` out."""

    # ------------------------------------------------------------------------------------- command line

    @classmethod
    def add_cli_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Flags of ``hf-compress prune METHOD`` beyond the config's fields (run options such as a work folder)."""

    @classmethod
    def prune_kwargs_from_cli(cls, args: argparse.Namespace) -> dict[str, Any]:
        """Keyword arguments of ``prune`` taken from those flags."""
        return {}

    # ---------------------------------------------------------------------------------------- internals

    def _check_config(self, config: PruningConfig | float | str | None) -> PruningConfig:
        if config is None:
            raise ValueError(
                f"{type(self).__name__}.prune needs a {self.config_class.__name__} "
                "(or a target such as '2:4' or 0.3)."
            )
        if isinstance(config, (str, float, int, SparsityPattern)) and not isinstance(config, bool):
            return self.config_for_target(config)
        if not isinstance(config, self.config_class):
            wanted = self.config_class.__name__
            if isinstance(config, Mapping):
                hint = f" Build one from the dict: {wanted}.from_dict(config)."
            elif isinstance(config, PruningConfig):
                from .registry import PRUNERS  # the registry imports this module

                owner = PRUNERS.get(config.method)
                hint = f" Prune with {owner.__name__} for a {type(config).__name__}." if owner is not None else ""
            else:
                hint = ""
            raise TypeError(f"{type(self).__name__} takes a {wanted}, got {type(config).__name__}.{hint}")
        return config

    def _check_model_can_be_pruned(self) -> None:
        """Refuse, before any work, a model that an earlier method left in a form no pruner can take."""
        from ..formats.packed import check_not_packed
        from ..routing.layer import check_not_routed

        # Packed layers are not linear layers to prune, and pruning their dequantized weights would discard what the
        # quantizer fitted.
        check_not_packed(self.model, "prune the float model, then quantize it")
        check_not_routed(self.model, "prune the model it was routed from (routing leaves the weights as they are) "
                                     "and route the pruned model anew: the schedule and router were fitted to the "
                                     "weights before pruning")

    def _check_permutation(self, config: PruningConfig) -> Any:
        """The permutation sites when ``config.permutation`` is set (checked before any work), else ``None``."""
        if getattr(config, "permutation", None) is None:
            return None
        from .permutation import check_permutation

        return check_permutation(self.model, config)

    def _calibration_ids(
        self, config: PruningConfig, dataset: str | Sequence[str] | Dataset | torch.Tensor | None,
        required: bool = False,
    ) -> torch.Tensor | None:
        if not self.requires_calibration and not required:
            if dataset is not None:
                logger.warning("%s needs no calibration data; calibration_dataset is ignored.",
                               type(self).__name__)
            return None
        if dataset is None:
            raise ValueError(
                f"{type(self).__name__} needs calibration_dataset: text (a string, a list of strings or a "
                "Dataset with a 'text' column) or a [num_sequences, seq_len] tensor of token ids."
            )
        if torch.is_tensor(dataset):
            check_token_ids(self.model, dataset)
            check_within_learned_positions(self.model, dataset.shape[1], "the calibration tensor has",
                                           "calibration_seq_len")
            return dataset
        if isinstance(dataset, (list, tuple)) and not dataset:
            raise ValueError("calibration_dataset is empty; pass calibration text.")
        if self.tokenizer is None:
            raise ValueError(
                "calibration text needs a tokenizer: pass tokenizer= to prune() or from_pretrained(), or "
                "pass token ids."
            )
        check_within_learned_positions(self.model, config.calibration_seq_len, "calibration_seq_len is",
                                       "calibration_seq_len")
        try:
            return calibration_batches(
                dataset, self.tokenizer, num_sequences=config.num_calibration_sequences,
                seq_len=config.calibration_seq_len, seed=config.calibration_seed,
            )
        except ValueError as error:
            raise ValueError(f"calibration_dataset is unusable: {error}") from error

    def _record_recipe(self, config: PruningConfig, calibrated: bool = False) -> None:
        model_config = getattr(self.model, "config", None)
        if model_config is None:
            return
        # A plain dict attribute is serialised into config.json and restored by from_pretrained (checked on
        # transformers 5.23); other hf_compress entries (e.g. a later quantization) are kept.
        recipe = dict(getattr(model_config, RECIPE_KEY, None) or {})
        if recipe.get("pruning") is not None:
            # A prune of a pruned model: the record must name every prune that shaped the weights, not the last only.
            recipe["earlier_pruning"] = [*recipe.get("earlier_pruning", []), recipe["pruning"]]
        pruning = config.to_dict()
        if not calibrated:
            for name in CALIBRATION_FIELDS:
                pruning.pop(name, None)
        elif self.calibration_data:
            pruning[CALIBRATION_DATA_KEY] = self.calibration_data
        recipe.update({"pruning": pruning, "version": __version__})
        if not recipe.get("base_model"):  # the original Hub model, for the cards of later steps (a folder has none)
            from ..hub.model_card import hub_model_id

            recipe["base_model"] = hub_model_id(getattr(model_config, "name_or_path", None))
        setattr(model_config, RECIPE_KEY, recipe)


def _permutation_trains(config: PruningConfig) -> bool:
    """Whether the config's permutation needs calibration windows even for a pruner without calibration."""
    from .permutation import LearnedPermutationConfig

    return isinstance(getattr(config, "permutation", None), LearnedPermutationConfig)


def _check_tokenizer(tokenizer: Any) -> None:
    from transformers import PreTrainedTokenizerBase

    if tokenizer is not None and not isinstance(tokenizer, PreTrainedTokenizerBase):
        raise InvalidArgumentTypeError(
            f"tokenizer must be a transformers tokenizer (PreTrainedTokenizerBase) or None, got {type(tokenizer).__name__}."
        )


def check_save_dir(save_dir: Path, overwrite: bool, model: nn.Module) -> None:
    """Refuse, before any work, a ``save_dir`` the save would refuse at the end, or a model that cannot be saved."""
    check_save_folder(save_dir, overwrite)
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        raise TypeError(
            f"save_dir needs a transformers PreTrainedModel, got {type(model).__name__} (merge PEFT adapters "
            "first with merge_and_unload(), or prune without save_dir)."
        )
