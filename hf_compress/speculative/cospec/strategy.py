"""``CoSpec``: speculative decoding where a learned arbiter settles draft/target mismatches.

``model.generate(**inputs, custom_generate=CoSpec(arbiter, draft_model=draft))`` — the shared engine with
a draft model (or n-gram prompt lookup) and :class:`~.rule.ArbiterRule` as its acceptance rule.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.generation import StoppingCriteriaList
from transformers.generation.stopping_criteria import MaxLengthCriteria

from ...hub import hub_model_id
from ...utils import InvalidArgumentTypeError, check_choice, check_float, get_logger
from ..acceptance import AcceptanceRule
from ..engine import propose_draft
from ..strategies import HERE, SpeculativeDecoding, _name_of, portable_name, register_strategy, usage_snippet
from .config import ArbiterConfig
from .modeling import CoSpecArbiter, tokenizer_fingerprint
from .rule import MODES, ArbiterRule, DecisionLog


if TYPE_CHECKING:
    from ...evaluation.results import MetricRecord


__all__ = ["CoSpec"]

logger = get_logger(__name__)
CARD_TEMPLATE = Path(__file__).resolve().parents[2] / "hub" / "templates" / "acceptance_arbiter.md"


# Config fields that name where something loads from: a local absolute path is saved as its folder's name only.
_NAME_FIELDS = ("base_model_name_or_path", "draft_model_name_or_path", "tokenizer_name_or_path",
                "draft_tokenizer_name_or_path")


def _recorded_pair(config: ArbiterConfig) -> str:
    return (f"the draft model {config.draft_model_name_or_path or '(name not recorded)'}, whose tokenizer differs from "
            f"the target's (draft tokenizer {config.draft_tokenizer_name_or_path or '(name not recorded)'}, vocabulary "
            f"fingerprint {config.draft_tokenizer_fingerprint})")


def _another_draft_tokenizer(config: ArbiterConfig, given: str) -> str:
    name = config.draft_tokenizer_name_or_path
    load = f" (AutoTokenizer.from_pretrained({name!r}))" if name else ""
    return (f"This CoSpec arbiter was trained with another draft tokenizer than the draft_tokenizer given (vocabulary "
            f"fingerprint {given}): it was trained with {_recorded_pair(config)}, so the draft model's token ids would "
            f"be read with the wrong vocabulary. Pass that draft model's own tokenizer as draft_tokenizer={load} and "
            "the target's as tokenizer=; to draft with another model and tokenizer, train an arbiter for that pair "
            "(train_arbiter(..., draft_tokenizer=...)).")


class _RowEnd(StoppingCriteriaList):
    """The stopping criteria, noting the sequence length at which row 0 (the row the decision log follows) stopped."""

    def __init__(self, criteria):
        super().__init__(criteria)
        self.length: int | None = None

    def __call__(self, input_ids, scores, **kwargs):
        done = super().__call__(input_ids, scores, **kwargs)
        if self.length is None and bool(done[0]):
            self.length = input_ids.shape[1]
        return done


class _RoundContext:
    """Drafter wrapper that tells the decision log which sequence each round was drafted from, and drops the previous
    round's decisions that did not take effect.

    In a batch a round emits, per row, only as many drafts as the row that accepted fewest (the engine's cut, see
    :mod:`..engine`): row 0's decisions past that cut never took effect (the next round decides those positions
    again). The sequence the next round is drafted from ends where the cut did, so every decision at or past its length
    is dropped (at batch size 1 there is no cut and nothing is dropped here); :meth:`CoSpec.__call__` does the same
    for the last round.
    """

    def __init__(self, drafter, log: DecisionLog):
        self.drafter, self.log = drafter, log
        self.round_start = len(log.decisions)

    def reset(self) -> None:
        self.drafter.reset()
        self.round_start = len(self.log.decisions)

    def propose(self, input_ids, attention_mask, max_tokens, active=None):
        self.log.drop_past(input_ids.shape[1], since=self.round_start)
        self.round_start = len(self.log.decisions)
        self.log.context = input_ids
        return propose_draft(self.drafter, input_ids, attention_mask, max_tokens, active)


@register_strategy
class CoSpec(SpeculativeDecoding):
    """CoSpec (arXiv 2605.24793): at each mismatch a trained arbiter keeps the draft's or the target's token.

    Greedy decoding only (the arbiter arbitrates between the draft token and the target's argmax). The
    output is the target's greedy output with ``threshold=1.0`` (or ``mode="strict"``), token for token in
    float32; lower thresholds keep more mismatching draft tokens: fewer target forwards, a different text.

    Args:
        arbiter: A trained :class:`~.modeling.CoSpecArbiter`, or a folder / Hub id to load one from.
        draft_model: A causal LM (or path / Hub id); ``None`` drafts by n-gram prompt lookup.
        threshold: P(DRAFT) above which a mismatch keeps the draft token; default the arbiter's saved one.
        mode: ``"policy"`` (the threshold), ``"sample"`` (stochastic, as in RL rollouts), ``"strict"``
            (arbiter disabled: strict verification) or ``"accept"`` (keep every draft token).
        num_draft_tokens: Tokens drafted per target forward; default the arbiter's (``config.num_draft_tokens``,
            what it was trained and calibrated with: three of its features count positions in the round).
        min_ngram_size: The shortest suffix the n-gram lookup matches; default the arbiter's
            (``config.min_ngram_size``: the drafts it was trained and calibrated on).
        use_ngram, tokenizer, draft_tokenizer, ...: as for :class:`~..strategies.SpeculativeDecoding`
            (cross-tokenizer drafts work too), except that a draft model drafts the full length by default
            (``draft_confidence_threshold=None``), as the arbiter was trained. An arbiter trained with a
            cross-tokenizer pair records its draft tokenizer: drafting with the recorded draft model, the recorded
            tokenizers are loaded when none are given (the target's from ``config.tokenizer_name_or_path``, else the
            target's name); with another draft model they must be given; and a ``draft_tokenizer`` of another
            vocabulary than the recorded one is refused.

    Example:
        >>> out = model.generate(**inputs, custom_generate=CoSpec(arbiter, draft_model=draft))  # doctest: +SKIP
        >>> out = model.generate(**inputs, custom_generate="me/smollm2-cospec", trust_remote_code=True)  # doctest: +SKIP
    """

    method = "cospec"

    def __init__(
        self,
        arbiter: CoSpecArbiter | str | os.PathLike | None = None,
        draft_model: PreTrainedModel | str | None = None,
        *,
        threshold: float | None = None,
        mode: str = "policy",
        num_draft_tokens: int | None = None,
        use_ngram: bool = False,
        max_ngram_size: int = 4,
        num_ngram_pred_tokens: int = 6,
        min_ngram_size: int | None = None,
        tokenizer: PreTrainedTokenizerBase | str | None = None,
        draft_tokenizer: PreTrainedTokenizerBase | str | None = None,
        draft_confidence_threshold: float | None = None,
    ):
        # Until the arbiter is loaded (a folder or Hub id loads on first use), its config's default stands in.
        self._draft_length_given = num_draft_tokens is not None
        self._lookup_given = min_ngram_size is not None
        config = arbiter.config if isinstance(arbiter, CoSpecArbiter) else ArbiterConfig
        if not self._draft_length_given:
            num_draft_tokens = config.num_draft_tokens
        if not self._lookup_given:
            min_ngram_size = config.min_ngram_size
        super().__init__(
            draft_model, num_draft_tokens=num_draft_tokens, tokenizer=tokenizer, draft_tokenizer=draft_tokenizer,
            use_ngram=use_ngram, max_ngram_size=max_ngram_size, num_ngram_pred_tokens=num_ngram_pred_tokens,
            min_ngram_size=min_ngram_size, draft_confidence_threshold=draft_confidence_threshold,
        )
        if arbiter is None:
            raise ValueError("CoSpec needs a trained arbiter: pass `arbiter=` (a CoSpecArbiter, folder or Hub id; "
                             "see hf_compress.speculative.train_arbiter).")
        if not isinstance(arbiter, (CoSpecArbiter, str, os.PathLike)):
            raise InvalidArgumentTypeError(
                f"arbiter must be a CoSpecArbiter, a folder or a Hub id, got {type(arbiter).__name__}.")
        check_float("threshold", threshold, low=0.0, high=1.0, allow_none=True,
                    hint="1.0 = strict verification, 0.0 = keep every draft token.")
        check_choice("mode", mode, MODES)
        self.arbiter = arbiter
        self.threshold = threshold
        self.mode = mode
        self.decision_log: DecisionLog | None = None  # set by training to record the decisions
        self.generator: torch.Generator | None = None  # random source of mode="sample"
        self._arbiter_source: str | None = None

    def _recorded_lookup(self, config: ArbiterConfig) -> int:
        """The arbiter's ``min_ngram_size``, refused when this strategy's ``max_ngram_size`` cannot honour it."""
        if config.min_ngram_size > self.max_ngram_size:
            raise ValueError(
                f"The arbiter was trained on n-gram lookups of at least {config.min_ngram_size} tokens "
                f"(config.min_ngram_size), above this strategy's max_ngram_size={self.max_ngram_size}; pass a "
                f"max_ngram_size of at least {config.min_ngram_size}, or min_ngram_size= to decode with other drafts.")
        return config.min_ngram_size

    def load_arbiter(self, model: PreTrainedModel | None = None) -> CoSpecArbiter:
        """The arbiter, loaded on first use (onto ``model``'s device) and checked against ``model`` (and against the
        target's tokenizer when the strategy has one: a cross-tokenizer pair; ``generate()`` does not hand its
        ``tokenizer=`` to a ``custom_generate`` callable)."""
        if not isinstance(self.arbiter, CoSpecArbiter):
            logger.info("Loading CoSpec arbiter %s", self.arbiter)
            self._arbiter_source = str(self.arbiter)
            self.arbiter = CoSpecArbiter.from_pretrained(self.arbiter)
            self.arbiter.eval()
            if not self._draft_length_given:
                self.num_draft_tokens = self.arbiter.config.num_draft_tokens
            if not self._lookup_given:
                self.min_ngram_size = self._recorded_lookup(self.arbiter.config)
        if model is not None:
            self.arbiter.check_compatible(model, self.tokenizer if isinstance(self.tokenizer, PreTrainedTokenizerBase) else None)
            self.arbiter.to(model.device)
        return self.arbiter

    def __call__(self, model, input_ids, logits_processor=None, stopping_criteria=None, generation_config=None,
                 synced_gpus: bool = False, **model_kwargs):
        log = self.decision_log
        if log is None:
            return super().__call__(model, input_ids, logits_processor, stopping_criteria, generation_config,
                                    synced_gpus, **model_kwargs)
        # Row 0 can stop inside a round, after the round's decisions were logged: note where, drop what lies past it.
        # (Decisions past a round's batch cut are dropped as the next round is drafted, by _RoundContext, and those of
        # the last round here. A last round without room to draft follows one whose decisions all took effect: that
        # round's drafts reached max_length - 1.)
        first = len(log.decisions)
        if stopping_criteria is None:
            config = generation_config if generation_config is not None else model.generation_config
            stopping_criteria = [MaxLengthCriteria(config.max_length)]
        row_end = _RowEnd(stopping_criteria)
        out = super().__call__(model, input_ids, logits_processor, row_end, generation_config, synced_gpus, **model_kwargs)
        sequences = out if isinstance(out, torch.Tensor) else out.sequences
        log.drop_past(row_end.length if row_end.length is not None else sequences.shape[1], since=first)
        return out

    def acceptance_rule(self, generation_config) -> AcceptanceRule:
        if generation_config.do_sample:
            raise ValueError("CoSpec arbitrates between the draft token and the target's greedy choice: call "
                             "generate() with do_sample=False (or use FLy / SpeculativeDecoding for sampling).")
        return ArbiterRule(self.load_arbiter(), threshold=self.threshold, mode=self.mode, log=self.decision_log,
                           generator=self.generator)

    def drafter_for(self, model: PreTrainedModel):
        self._use_recorded_tokenizers(self.load_arbiter())  # a cross-tokenizer arbiter's, when none were given
        drafter = super().drafter_for(model)  # it loads tokenizers given by name, which the checks read
        self.load_arbiter(model)
        self._check_draft_tokenizer()
        return drafter if self.decision_log is None else _RoundContext(drafter, self.decision_log)

    # ------------------------------------------------------------------ cross-tokenizer pairs
    def _use_recorded_tokenizers(self, arbiter: CoSpecArbiter) -> None:
        """Give a draft model without a draft tokenizer the one a cross-tokenizer arbiter recorded, if it is the draft
        model the arbiter recorded; otherwise refuse (its ids would be read as the target's)."""
        config = arbiter.config
        if config.draft_tokenizer_fingerprint is None or self.draft_model is None or self.draft_tokenizer is not None:
            return
        target = self.tokenizer if self.tokenizer is not None else (
            config.tokenizer_name_or_path or config.base_model_name_or_path)
        if not self._drafts_with_recorded_model(config):
            why = (f"the draft model given ({_name_of(self.draft_model) or 'without a name'}) is not the recorded one, "
                   "so its tokenizer is not guessed")
        elif not config.draft_tokenizer_name_or_path:
            why = "the draft tokenizer's name or path was not recorded"
        elif not target:
            why = "the target tokenizer's name or path was not recorded"
        else:
            self.draft_tokenizer = self._load_recorded(config.draft_tokenizer_name_or_path, "draft tokenizer", config)
            if isinstance(target, (str, os.PathLike)):
                target = self._load_recorded(target, "target tokenizer", config)
            self.tokenizer = target
            return
        raise ValueError(self._pair_needed(config, why))

    def _load_recorded(self, name, what: str, config: ArbiterConfig) -> PreTrainedTokenizerBase:
        try:
            return AutoTokenizer.from_pretrained(name)
        except (OSError, ValueError) as error:
            why = f"its recorded {what} {str(name)!r} does not load here ({error})"
            raise ValueError(self._pair_needed(config, why)) from error

    def _drafts_with_recorded_model(self, config: ArbiterConfig) -> bool:
        """Whether the draft model is, by name, the one the arbiter recorded (``config.json`` keeps a local folder's
        name only)."""
        given, recorded = _name_of(self.draft_model), config.draft_model_name_or_path
        if not given or not recorded:
            return False
        return recorded in (given, portable_name(given))

    @staticmethod
    def _pair_needed(config: ArbiterConfig, why: str) -> str:
        return (f"This CoSpec arbiter was trained with {_recorded_pair(config)}, and {why}: pass draft_tokenizer= (the "
                "draft model's tokenizer) and tokenizer= (the target's), to CoSpec or to generate() with a "
                "custom_generate folder. Without them the draft model's token ids would be read as the target's.")

    def _check_draft_tokenizer(self) -> None:
        """Refuse a draft tokenizer of another vocabulary than the one a cross-tokenizer arbiter was trained with."""
        config = self.arbiter.config
        recorded = config.draft_tokenizer_fingerprint
        if recorded is None or self.draft_model is None or not isinstance(self.draft_tokenizer, PreTrainedTokenizerBase):
            return
        given = tokenizer_fingerprint(self.draft_tokenizer)
        if given != recorded:
            raise ValueError(_another_draft_tokenizer(config, given))

    def _pair_record(self) -> dict[str, Any]:
        """The config fields a cross-tokenizer pair of this strategy records with the arbiter it saves (``{}`` for a
        draft sharing the target's vocabulary, or none)."""
        if self.draft_model is None or self.draft_tokenizer is None or self.tokenizer is None:
            return {}
        config = self.arbiter.config
        named = [name for name in ("tokenizer", "draft_tokenizer") if isinstance(getattr(self, name), (str, os.PathLike))]
        if named and config.draft_tokenizer_fingerprint is not None:
            return {}  # recorded already (arbiter.save_pretrained names them): checked when the folder drafts
        for name in named:  # as drafter_for loads them
            setattr(self, name, AutoTokenizer.from_pretrained(getattr(self, name)))
        draft = tokenizer_fingerprint(self.draft_tokenizer)
        if draft == tokenizer_fingerprint(self.tokenizer):
            return {}
        if config.draft_tokenizer_fingerprint not in (None, draft):
            raise ValueError(_another_draft_tokenizer(config, draft))
        return {
            "draft_tokenizer_fingerprint": draft,
            "draft_tokenizer_name_or_path": _name_of(self.draft_tokenizer) or config.draft_tokenizer_name_or_path,
            "tokenizer_name_or_path": _name_of(self.tokenizer) or config.tokenizer_name_or_path,
            "draft_model_name_or_path": _name_of(self.draft_model) or config.draft_model_name_or_path,
        }

    # ------------------------------------------------------------------ serialisation
    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "threshold": self.threshold, "mode": self.mode}

    def to_dict(self) -> dict[str, Any]:
        arbiter = self._arbiter_source or (
            str(self.arbiter) if not isinstance(self.arbiter, CoSpecArbiter) else self.arbiter.name_or_path)
        return {**super().to_dict(), "arbiter": arbiter or None}

    @classmethod
    def from_settings(cls, settings: dict[str, Any]) -> CoSpec:
        settings = {k: v for k, v in settings.items() if k != "heads"}
        arbiter = settings.pop("arbiter", None)
        return cls(arbiter, **settings)

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        *,
        base_model: str | None = None,
        overwrite: bool = False,
        repo_id: str | None = None,
        metrics: Sequence[MetricRecord] = (),
        arbiter_source: str | None = None,
        save_arbiter_kwargs: dict[str, Any] | None = None,
        base_weights: Mapping[str, Any] | None = None,
    ) -> Path:
        """The ``custom_generate`` folder, with the arbiter's config and weights when it is in memory.

        ``arbiter_source`` is where the saved ``generate.py`` loads the arbiter from: by default ``"."`` (the
        folder or repo ``custom_generate=`` names when it runs) for an arbiter in memory. ``base_model`` defaults
        to the arbiter's target (its Hub id); ``repo_id`` (the repo the card's code loads) and ``metrics``
        (measured results for the card) as in :meth:`SpeculativeDecoding.save_pretrained`. A cross-tokenizer pair
        (a ``draft_tokenizer`` of another vocabulary) is recorded in the saved config (the draft tokenizer's
        fingerprint and name, the target tokenizer's and the draft model's names), so the folder refuses another
        draft tokenizer; the arbiter in memory is left as it is. ``base_weights`` (the GGUF origin of a reference
        target, which the card states) defaults to the one the arbiter recorded when it was built
        (``config.base_weights``).

        Example:
            >>> CoSpec(arbiter).save_pretrained("smollm2-cospec")  # doctest: +SKIP
            >>> model.generate(ids, custom_generate="smollm2-cospec", trust_remote_code=True)  # doctest: +SKIP
        """
        record: dict[str, Any] = {}
        if isinstance(self.arbiter, CoSpecArbiter):
            arbiter_source = arbiter_source or HERE
            base_model = base_model or hub_model_id(self.arbiter.config.base_model_name_or_path)
            base_weights = base_weights or getattr(self.arbiter.config, "base_weights", None)
            record = self._pair_record()  # a cross-tokenizer pair: saved with the arbiter, which stays as it is
        config = self.arbiter.config if record else None
        kept = {key: getattr(config, key) for key in record}
        previous = self._arbiter_source
        self._arbiter_source, self._save_arbiter_kwargs = arbiter_source or previous, save_arbiter_kwargs or {}
        try:
            for key, value in record.items():
                setattr(config, key, value)
            return super().save_pretrained(save_directory, base_model=base_model, overwrite=overwrite, repo_id=repo_id,
                                           metrics=metrics, base_weights=base_weights)
        finally:
            self._arbiter_source = previous
            for key, value in kept.items():
                setattr(config, key, value)

    def _check_saveable(self, settings: dict[str, Any]) -> None:
        super()._check_saveable(settings)
        if not settings["arbiter"]:
            raise ValueError("The arbiter has no name or path to record; save it first or pass arbiter_source=.")

    def _write_weights(self, folder: Path) -> None:
        if isinstance(self.arbiter, CoSpecArbiter):

            config = self.arbiter.config
            names = {k: getattr(config, k) for k in _NAME_FIELDS}
            for key, value in names.items():  # never a local absolute path in config.json
                setattr(config, key, portable_name(value))
            try:
                PreTrainedModel.save_pretrained(self.arbiter, folder, **self._save_arbiter_kwargs)
            finally:
                for key, value in names.items():
                    setattr(config, key, value)

    def _save_kwargs_for_push(self, repo_id: str) -> dict[str, Any]:
        return {"arbiter_source": repo_id} if isinstance(self.arbiter, CoSpecArbiter) else {}

    def model_card(self, name: str, base_model: str | None, settings: dict[str, Any], *, repo_id: str | None = None,
                   metrics: Sequence[MetricRecord] = ()):
        from ...hub import build_model_card

        recipe: dict[str, Any] = {"method": "cospec", "decoding": settings}
        if isinstance(self.arbiter, CoSpecArbiter):

            arbiter = {k: v for k, v in self.arbiter.config.to_diff_dict().items()
                       # numbers; base_weights goes to the card's compression.base_weights and its paragraph
                       if k not in ("transformers_version", "architectures", "base_model_identity", "base_weights")}
            for key in _NAME_FIELDS:
                if key in arbiter:
                    arbiter[key] = portable_name(arbiter[key])
            recipe["arbiter"] = arbiter
            recipe["parameters"] = sum(p.numel() for p in self.arbiter.parameters())
        return build_model_card(
            base_model=base_model, model_name=name, recipe=recipe, template=CARD_TEMPLATE,
            extra_tags=["custom_generate", "speculative-decoding", "cospec"], metrics=metrics,
            repo_id=repo_id or name, load_snippet=usage_snippet(base_model, local=repo_id is None),
            pipeline_tag=None,  # not a causal LM: the Hub must not offer pipeline("text-generation", model=<this repo>)
            base_weights=getattr(self, "_base_weights", None),
        )
