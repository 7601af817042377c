"""User-facing strategies for ``model.generate(custom_generate=...)``.

A strategy is a callable with the signature transformers gives ``custom_generate`` callables. It picks a
drafter and an acceptance rule and runs the shared engine; it round-trips through a dict (``to_dict`` /
:func:`strategy_from_dict`) so that :meth:`SpeculativeDecoding.save_pretrained` can write a Hub folder
whose ``custom_generate/generate.py`` rebuilds it.
"""

from __future__ import annotations

import ast
import copy
import inspect
import json
import os
import re
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.generation import StoppingCriteriaList
from transformers.generation.stopping_criteria import MaxLengthCriteria

from .. import __version__, _compat
from ..utils import InvalidArgumentTypeError, atomic_directory, check_bool, check_float, check_int, get_logger
from ..utils.processes import main_process_only
from .acceptance import AcceptanceRule, LooseVerification, SpeculativeSampling, StrictGreedy
from .drafting import CrossTokenizerDrafter, ModelDrafter, NgramDrafter
from .engine import SpeculativeDecodingOutput, SpeculativeMetrics, speculative_decode


if TYPE_CHECKING:
    from ..evaluation.results import MetricRecord


logger = get_logger(__name__)

DRAFT_CONFIDENCE_THRESHOLD = 0.4
"""A draft model's default early stop: the draft ends after a token the draft gives a lower probability. The value
is transformers' default ``assistant_confidence_threshold``; on the 2-core CPU it made strict decoding 1.46x faster
with SmolLM2's int8 self-draft and 1.38x with the cross-tokenizer pair (``bench/results/speculative.md``)."""

# model_kwargs that generate() prepares for every decoder-only call; the engine recomputes or ignores them.
_HANDLED_MODEL_KWARGS = {"attention_mask", *_compat.CACHE_KWARGS, "position_ids", "use_cache", "logits_to_keep", "cache_position"}


class SpeculativeDecoding:
    """Speculative decoding through ``generate(custom_generate=...)`` with a lossless acceptance rule.

    The drafter is a draft model sharing the target's tokenizer, a draft model with another tokenizer (pass
    ``tokenizer`` and ``draft_tokenizer``), or, without a draft model, n-gram prompt lookup. Greedy calls
    are verified exactly (output identical to greedy ``generate()`` in float32; in reduced precision equal up
    to the numerics of multi-token verification, see :class:`~.acceptance.StrictGreedy`); sampling calls use
    speculative sampling (identical in distribution). Batches of left-padded prompts are supported. After a call,
    ``last_metrics`` holds the counts (also returned as ``output.metrics`` with
    ``return_dict_in_generate=True``).

    Args:
        draft_model: A causal LM, or a name ``hf_compress.assets.load_model`` takes (a reference model such as
            ``"smollm2-135m"``, ``tiny-<arch>``, a folder, a Hub id), loaded on first use with the target's dtype
            and device.
        num_draft_tokens: Tokens drafted per target forward (>= 1).
        tokenizer / draft_tokenizer: Needed only when the two models' vocabularies differ.
        use_ngram: Speed up the draft model itself with n-gram lookup (FLy's multi-level acceleration).
        draft_confidence_threshold: A draft model stops drafting after a token it gives a probability below
            this (0.4, the default of transformers' ``assistant_confidence_threshold``; in a batch, once every row
            has); ``None`` always drafts ``num_draft_tokens``. It changes how much is drafted, not what strict
            verification outputs (exactly so in float32; see the reduced-precision note above) nor the
            distribution speculative sampling draws from. A strategy saved before this argument existed loads
            with the default.
        max_ngram_size / num_ngram_pred_tokens: n-gram search settings (the n-gram drafter and MLA).
        min_ngram_size: The shortest suffix the n-gram search matches (1, as transformers' prompt lookup). A
            1-token match (a newline, a comma) is weak evidence: after a chat template's ``assistant\\n`` it matches
            the first newline of the prompt and drafts the system prompt. ``2`` skips such matches: on SQuAD with
            SmolLM2-135M on the CPU strict decoding ran 1.11-1.15x faster and FLy's answers no longer copied the
            system prompt (``bench/results/cospec-ngram-min2*.md``).
        drafter / acceptance: Custom drafter or rule instead of the ones built from the arguments above.

    Example:
        >>> from hf_compress.assets import tiny_model
        >>> model, tok = tiny_model("llama")
        >>> ids = tok("abcabcab", return_tensors="pt").input_ids
        >>> out = model.generate(ids, max_new_tokens=8, do_sample=False, custom_generate=SpeculativeDecoding())
        >>> torch.equal(out, model.generate(ids, max_new_tokens=8, do_sample=False))
        True
    """

    method = "speculative_decoding"

    def __init__(
        self,
        draft_model: PreTrainedModel | str | None = None,
        *,
        num_draft_tokens: int = 8,
        tokenizer: PreTrainedTokenizerBase | str | None = None,
        draft_tokenizer: PreTrainedTokenizerBase | str | None = None,
        use_ngram: bool = False,
        max_ngram_size: int = 4,
        num_ngram_pred_tokens: int = 6,
        min_ngram_size: int = 1,
        draft_confidence_threshold: float | None = DRAFT_CONFIDENCE_THRESHOLD,
        drafter=None,
        acceptance: AcceptanceRule | None = None,
    ):
        check_int("num_draft_tokens", num_draft_tokens, minimum=1)
        draft_confidence_threshold = check_float(
            "draft_confidence_threshold", draft_confidence_threshold, low=0.0, high=1.0, allow_none=True,
            hint="A draft model stops after a token it gives a lower probability; None drafts the full length.")
        if draft_model is not None and not isinstance(draft_model, (PreTrainedModel, str, os.PathLike)):
            raise InvalidArgumentTypeError(
                f"draft_model must be a causal LM (PreTrainedModel), a folder or a Hub id, or None for n-gram "
                f"drafting, got {type(draft_model).__name__}."
            )
        for name, value in (("tokenizer", tokenizer), ("draft_tokenizer", draft_tokenizer)):
            if value is not None and not isinstance(value, (PreTrainedTokenizerBase, str, os.PathLike)):
                raise InvalidArgumentTypeError(
                    f"{name} must be a tokenizer (PreTrainedTokenizerBase), a folder or a Hub id, got {type(value).__name__}."
                )
        if (tokenizer is None) != (draft_tokenizer is None):
            raise ValueError("Pass both `tokenizer` (the target's) and `draft_tokenizer`, or neither.")
        check_bool("use_ngram", use_ngram)
        NgramDrafter(max_ngram_size, min_ngram_size)  # checks the lookup's sizes now, not mid-generate
        check_int("num_ngram_pred_tokens", num_ngram_pred_tokens, minimum=1)
        if drafter is not None and not (callable(getattr(drafter, "propose", None)) and callable(getattr(drafter, "reset", None))):
            raise InvalidArgumentTypeError(
                f"drafter must have propose(input_ids, attention_mask, max_tokens) and reset() methods "
                f"(see hf_compress.speculative.Drafter), got {type(drafter).__name__}."
            )
        if acceptance is not None and not callable(getattr(acceptance, "verify", None)):
            raise InvalidArgumentTypeError(
                f"acceptance must have a verify(draft_tokens, target_logits, draft_probs) method "
                f"(see hf_compress.speculative.AcceptanceRule), got {type(acceptance).__name__}."
            )
        self.draft_model = draft_model
        self.num_draft_tokens = num_draft_tokens
        self.tokenizer = tokenizer
        self.draft_tokenizer = draft_tokenizer
        self.use_ngram = use_ngram
        self.max_ngram_size = max_ngram_size
        self.min_ngram_size = min_ngram_size
        self.num_ngram_pred_tokens = num_ngram_pred_tokens
        self.draft_confidence_threshold = draft_confidence_threshold
        self.acceptance = acceptance
        self._drafter = drafter
        self._custom_drafter = drafter is not None
        self._drafter_target: PreTrainedModel | None = None
        self.last_metrics: SpeculativeMetrics | None = None

    # ------------------------------------------------------------------ pieces a subclass may change
    def acceptance_rule(self, generation_config) -> AcceptanceRule:
        if self.acceptance is not None:
            return self.acceptance
        return SpeculativeSampling() if generation_config.do_sample else StrictGreedy()

    def settings(self) -> dict[str, Any]:
        """The strategy's knobs (JSON-serialisable); the draft model is stored by name only."""
        return {
            "num_draft_tokens": self.num_draft_tokens,
            "use_ngram": self.use_ngram,
            "max_ngram_size": self.max_ngram_size,
            "min_ngram_size": self.min_ngram_size,
            "num_ngram_pred_tokens": self.num_ngram_pred_tokens,
            "draft_confidence_threshold": self.draft_confidence_threshold,
        }

    # ------------------------------------------------------------------ generate() entry point
    def __call__(
        self,
        model: PreTrainedModel,
        input_ids: torch.LongTensor,
        logits_processor=None,
        stopping_criteria=None,
        generation_config=None,
        synced_gpus: bool = False,
        **model_kwargs,
    ):
        generation_config = generation_config if generation_config is not None else model.generation_config
        if model.config.is_encoder_decoder:
            raise ValueError(f"{type(self).__name__} supports decoder-only models only.")
        if (generation_config.num_beams or 1) > 1:
            raise ValueError("Speculative decoding does not combine with beam search: use num_beams=1.")
        self.check_generate_arguments(generation_config, synced_gpus or _compat.generate_syncs_gpus(model))
        if model_kwargs.get("use_cache") is False:
            raise ValueError("Speculative decoding needs the KV cache, but use_cache is False (passed to generate(), or "
                             "the model's generation config, as MPT's is by default): pass use_cache=True.")
        unexpected = sorted(k for k, v in model_kwargs.items() if v is not None and k not in _HANDLED_MODEL_KWARGS)
        if unexpected:
            raise ValueError(f"{type(self).__name__} cannot pass {unexpected} to the model; generate from input_ids only.")
        if stopping_criteria is None:
            stopping_criteria = StoppingCriteriaList([MaxLengthCriteria(generation_config.max_length)])
        drafter = self.drafter_for(model)
        cache = _compat.cache_from_model_kwargs(model_kwargs)
        sequences, metrics, extras = speculative_decode(
            model, input_ids, drafter, self.acceptance_rule(generation_config), self.num_draft_tokens,
            generation_config=generation_config, logits_processor=logits_processor,
            stopping_criteria=stopping_criteria, attention_mask=model_kwargs.get("attention_mask"),
            cache=cache, streamer=_compat.streamer_of_calling_generate(),
        )
        self.last_metrics = metrics
        if generation_config.return_dict_in_generate:
            return SpeculativeDecodingOutput(
                sequences=sequences, scores=extras["scores"], logits=extras["logits"], metrics=metrics,
                **_compat.with_cache_field(SpeculativeDecodingOutput, cache),
            )
        return sequences

    def check_generate_arguments(self, generation_config, synced_gpus: bool = False) -> None:
        """Refuse ``generate()`` arguments this strategy cannot honour (rather than ignore them silently).

        The strategy drafts and verifies by itself, so other drafting (``assistant_model``,
        ``prompt_lookup_num_tokens``, ...), other search modes (beams, contrastive search, DoLa, constraints),
        classifier-free guidance (its logits processor keeps a one-token-per-step cache of its own), chunked
        prefill and per-step attentions / hidden states are refused with one line naming them.
        """
        refused = []
        if _compat.argument_of_calling_generate("assistant_model") is not None:
            refused.append("assistant_model")
        # prefill_chunk_size: the prompt goes through in one forward with the first round's drafts.
        for name in ("prompt_lookup_num_tokens", "assistant_early_exit", "dola_layers", "constraints",
                     "force_words_ids", "prefill_chunk_size"):
            if getattr(generation_config, name, None) is not None:
                refused.append(name)
        if getattr(generation_config, "use_mtp", None):
            refused.append("use_mtp=True")
        if generation_config.return_dict_in_generate:  # otherwise generate() ignores them too
            refused += [f"{name}=True" for name in ("output_attentions", "output_hidden_states")
                        if getattr(generation_config, name, None)]
        if (getattr(generation_config, "penalty_alpha", None) or 0) > 0 and (generation_config.top_k or 0) > 1:
            refused.append("penalty_alpha (contrastive search)")
        if (getattr(generation_config, "num_beam_groups", None) or 1) > 1:
            refused.append("num_beam_groups")
        guidance = getattr(generation_config, "guidance_scale", None)
        if guidance is not None and guidance != 1:
            refused.append("guidance_scale")
        if synced_gpus:
            refused.append("synced_gpus=True (given, or set by generate() for DeepSpeed ZeRO-3 / FSDP sharding)")
        if refused:
            raise ValueError(
                f"{type(self).__name__} drafts and verifies by itself and cannot honour the generate() argument(s) "
                f"{', '.join(refused)}; drop them (or call generate() without custom_generate)."
            )

    def drafter_for(self, model: PreTrainedModel):
        """Build (once) the drafter for ``model`` from the constructor's arguments, checking compatibility."""
        if self._custom_drafter:
            return self._drafter
        if isinstance(self.draft_model, (str, os.PathLike)):
            from ..assets import load_model

            logger.info("Loading draft model %s", self.draft_model)
            # load_model: the names the library takes everywhere (reference, tiny-<arch>), and a one-line error for a
            # missing folder or an unreachable Hub id rather than a minute of retries.
            self.draft_model = load_model(self.draft_model, dtype=model.dtype, with_tokenizer=False)[0]
            self.draft_model.to(model.device)
        for name in ("tokenizer", "draft_tokenizer"):
            if isinstance(getattr(self, name), (str, os.PathLike)):
                setattr(self, name, AutoTokenizer.from_pretrained(getattr(self, name)))
        if self._drafter is None or self._drafter_target is not model:
            self._drafter = (NgramDrafter(self.max_ngram_size, self.min_ngram_size) if self.draft_model is None
                             else self._model_drafter(model))
            self._drafter_target = model
        return self._drafter

    def _model_drafter(self, model: PreTrainedModel):
        draft = self.draft_model
        if draft.device != model.device:
            raise ValueError(
                f"The draft model is on {draft.device} but the target is on {model.device}; move it first "
                "(`draft_model.to(model.device)`)."
            )
        accelerator = (
            NgramDrafter(self.max_ngram_size, self.min_ngram_size, num_pred_tokens=self.num_ngram_pred_tokens,
                         reuse_last_proposal=True)
            if self.use_ngram
            else None
        )
        draft_rows, target_rows = _vocab_size(draft), _vocab_size(model)
        confidence = self.draft_confidence_threshold
        if self.tokenizer is not None and self.tokenizer.get_vocab() != self.draft_tokenizer.get_vocab():
            return CrossTokenizerDrafter(draft, self.tokenizer, self.draft_tokenizer, accelerator,
                                         confidence_threshold=confidence)
        if draft_rows != target_rows and self.tokenizer is None:
            # Embeddings padded to other sizes (Qwen2.5-0.5B's 151,936 rows, the 7B's 152,064) share one tokenizer;
            # only the tokenizers can tell that apart from two vocabularies.
            raise ValueError(
                f"The draft model's vocabulary ({draft_rows} tokens) differs from the target's ({target_rows}). Pass "
                "both `tokenizer=` (the target's) and `draft_tokenizer=`: the same tokenizer (embeddings padded to "
                "other sizes) drafts token ids directly, different ones draft through text."
            )
        # Same tokenizer: a draft padded larger never proposes a row past the target's vocabulary.
        limit = target_rows if draft_rows > target_rows else None
        return ModelDrafter(draft, accelerator, confidence_threshold=confidence, vocab_size=limit)

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        """``{"method": ..., **settings, "draft_model": name or None, ...}``; see :func:`strategy_from_dict`."""
        if self._custom_drafter or self.acceptance is not None:
            raise ValueError("A strategy with a custom drafter or acceptance rule cannot be saved; build it from arguments.")
        return {
            "method": self.method,
            **self.settings(),
            "draft_model": _name_of(self.draft_model),
            "tokenizer": _name_of(self.tokenizer),
            "draft_tokenizer": _name_of(self.draft_tokenizer),
        }

    @main_process_only("save_directory")
    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        *,
        base_model: str | None = None,
        overwrite: bool = False,
        repo_id: str | None = None,
        metrics: Sequence[MetricRecord] = (),
        base_weights: Mapping[str, Any] | None = None,
    ) -> Path:
        """Write a folder that ``generate(custom_generate=<folder or repo>, trust_remote_code=True)`` runs.

        It holds ``custom_generate/generate.py`` (the settings embedded, since transformers copies only that
        file into its module cache; see :func:`render_generate_py`), ``custom_generate/requirements.txt`` and
        a ``README.md`` card. A draft model is referenced by its name or path (``draft_model.name_or_path``),
        not copied; a local path works on this machine only, and :meth:`push_to_hub` refuses it.

        Args:
            base_model: Hub id of the model the strategy decodes for: the card's ``base_model`` and the model its
                "How to use" code loads (``None``: a ``BASE_MODEL`` placeholder there).
            repo_id: The Hub repo the folder will be pushed to, which the card's code passes as
                ``custom_generate=``; ``None`` = the folder's name (run from the folder's parent).
                :meth:`push_to_hub` passes its own.
            metrics: Measured results of this strategy (:class:`~hf_compress.evaluation.results.MetricRecord`,
                e.g. its speed-up over greedy ``generate()``) for the card's ``model-index`` and results table;
                only numbers actually measured belong here.
            base_weights: The GGUF origin of the reference model the results were measured with
                (``hf_compress.hub.base_weights_of(model.config)``), which the card states; ``None``: none.

        Example:
            >>> FLy().save_pretrained("fly-ngram")  # doctest: +SKIP
        """
        settings = _anchored_to_here(self.to_dict())
        self._check_saveable(settings)
        self._check_draft_unchanged(settings)
        from ..hub import write_model_card

        if repo_id is not None:
            from huggingface_hub.utils import validate_repo_id

            validate_repo_id(repo_id)  # an HFValidationError (a ValueError) before anything is written
        # model_card reads it from here: a subclass's override keeps the signature it had before base_weights.
        previous, self._base_weights = getattr(self, "_base_weights", None), base_weights
        try:
            card = self._card(Path(save_directory).name, base_model, settings, repo_id, metrics)
        finally:
            self._base_weights = previous
        with atomic_directory(save_directory, overwrite=overwrite) as tmp:
            (tmp / "custom_generate").mkdir()
            (tmp / "custom_generate" / "generate.py").write_text(render_generate_py(self.method, settings))
            (tmp / "custom_generate" / "requirements.txt").write_text(custom_generate_requirement() + "\n")
            self._write_weights(tmp)
            write_model_card(tmp, card)
        logger.info("Saved the %s strategy to %s", self.method, save_directory)
        return Path(save_directory)

    def _card(self, name: str, base_model: str | None, settings: dict[str, Any], repo_id: str | None,
              metrics: Sequence[MetricRecord]):
        """:meth:`model_card`, also for a subclass that overrides it with the signature of before ``repo_id`` and
        ``metrics`` (``model_card(name, base_model, settings)``): called as before, with a FutureWarning."""
        parameters = inspect.signature(self.model_card).parameters
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()) or (
                "repo_id" in parameters and "metrics" in parameters):
            return self.model_card(name, base_model, settings, repo_id=repo_id, metrics=metrics)
        warnings.warn(
            f"{type(self).__name__}.model_card(name, base_model, settings) takes no repo_id= or metrics=: add these "
            "keyword-only parameters (see SpeculativeDecoding.model_card); until then its card names neither the repo "
            "nor the measured results.", FutureWarning, stacklevel=3)
        return self.model_card(name, base_model, settings)

    def _check_saveable(self, settings: dict[str, Any]) -> None:
        if self.draft_model is not None and not settings["draft_model"]:
            raise ValueError(
                "The draft model has no name or path to record; save it first (`draft.save_pretrained(dir)`) and "
                "pass that directory or a Hub id as `draft_model`."
            )

    def _check_draft_unchanged(self, settings: dict[str, Any]) -> None:
        """Refuse a draft model changed in memory since it was loaded from the local folder it names (pruned,
        routed, quantized: the records hf_compress keeps on its config differ from the folder's): generate() would
        load the folder's weights, not the ones measured."""
        draft, name = self.draft_model, settings.get("draft_model")
        if not isinstance(draft, PreTrainedModel) or not name or not os.path.isfile(os.path.join(name, "config.json")):
            return
        try:
            saved = json.loads(Path(name, "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return  # not a config this can compare: loading it will say what is wrong
        in_memory = json.loads(json.dumps(getattr(draft.config, "hf_compress", None) or {}, default=str))
        if (saved.get("hf_compress") or {}) != in_memory:
            raise ValueError(
                f"The draft model was changed in memory since it was loaded from {name} (its compression records "
                "differ from the folder's), and the strategy would load the folder's weights. Save the draft first "
                "(`draft.save_pretrained(dir)`, or the method's own save) and pass that directory as `draft_model`."
            )

    def _write_weights(self, folder: Path) -> None:
        """Weights the folder ships (none: a draft model is referenced, not copied)."""

    def model_card(self, name: str, base_model: str | None, settings: dict[str, Any], *, repo_id: str | None = None,
                   metrics: Sequence[MetricRecord] = ()):
        from ..hub import build_model_card

        return build_model_card(
            base_model=base_model, model_name=name, recipe=settings, template="decoding_strategy",
            extra_tags=["custom_generate", "speculative-decoding"], metrics=metrics, repo_id=repo_id or name,
            load_snippet=usage_snippet(base_model, local=repo_id is None),
            # No pipeline tag: the folder is a decoding strategy for a base model, and the Hub's "Use this model"
            # would offer pipeline("text-generation", model=<this repo>), which cannot run it.
            pipeline_tag=None, base_weights=getattr(self, "_base_weights", None),
        )

    @main_process_only()
    def push_to_hub(self, repo_id: str, *, base_model: str | None = None, metrics: Sequence[MetricRecord] = (),
                    base_weights: Mapping[str, Any] | None = None, **push_kwargs):
        """``save_pretrained`` into a temporary folder and upload it (see :func:`hf_compress.hub.push_to_hub`).

        The card's code runs ``custom_generate="<repo_id>"``. A draft model, tokenizer or heads referenced by a
        local path are refused before anything is sent (the path would only work here, and would be published):
        push them first and build the strategy from their repo ids.

        Example:
            >>> FLy(draft_model="me/draft").push_to_hub("me/fly")  # doctest: +SKIP
        """
        from ..hub import push_to_hub

        with tempfile.TemporaryDirectory() as tmp:
            folder = self.save_pretrained(Path(tmp) / repo_id.split("/")[-1], base_model=base_model, repo_id=repo_id,
                                          metrics=metrics, base_weights=base_weights,
                                          **self._save_kwargs_for_push(repo_id))
            local = _local_references(read_generate_settings(folder))
            if local:
                raise ValueError(
                    f"Cannot push the {self.method!r} strategy to {repo_id}: {', '.join(local)} refer(s) to local "
                    "folders, which exist only on this machine. Push them to the Hub first (e.g. "
                    "`hf_compress.hub.push_to_hub(folder, 'you/name')`) and build the strategy from the repo ids."
                )
            return push_to_hub(folder, repo_id, **push_kwargs)

    def _save_kwargs_for_push(self, repo_id: str) -> dict[str, Any]:
        return {}

    @classmethod
    def from_settings(cls, settings: dict[str, Any]) -> SpeculativeDecoding:
        """Build from :meth:`to_dict`'s output (without ``method``)."""
        settings = dict(settings)
        draft_model = settings.pop("draft_model", None)
        return cls(draft_model, **settings)


class FLy(SpeculativeDecoding):
    """FLy: training-free loosely speculative decoding (arXiv 2511.22972), with the paper's defaults.

    Drafts ``num_draft_tokens`` (15) tokens, keeps mismatches where the target is unsure (top-3 entropy >=
    ``entropy_threshold`` 0.3) and the next ``window - 1`` (5) drafts match, and speeds up the draft model
    with n-gram lookup (``use_ngram``; ``max_ngram_size`` 4, ``num_ngram_pred_tokens`` 6). Without a draft
    model it drafts by n-gram prompt lookup. ``loose=False`` gives strict verification, token-for-token
    greedy ``generate()``. The output is *not* the target's greedy output when loose: that is the point.
    A draft model drafts the full length (``draft_confidence_threshold=None``, as in the paper): the deferred
    window needs the drafts that follow a mismatch.

    Example:
        >>> from hf_compress.assets import tiny_model
        >>> model, tok = tiny_model("llama")
        >>> ids = tok("abcabcab", return_tensors="pt").input_ids
        >>> out = model.generate(ids, max_new_tokens=8, do_sample=False, custom_generate=FLy(loose=False))
        >>> torch.equal(out, model.generate(ids, max_new_tokens=8, do_sample=False))
        True
    """

    method = "fly"

    def __init__(
        self,
        draft_model: PreTrainedModel | str | None = None,
        *,
        num_draft_tokens: int = 15,
        entropy_threshold: float = 0.3,
        entropy_top_k: int = 3,
        window: int = 6,
        use_window: bool = True,
        loose: bool = True,
        use_ngram: bool = True,
        max_ngram_size: int = 4,
        num_ngram_pred_tokens: int = 6,
        min_ngram_size: int = 1,
        tokenizer: PreTrainedTokenizerBase | str | None = None,
        draft_tokenizer: PreTrainedTokenizerBase | str | None = None,
        draft_confidence_threshold: float | None = None,
    ):
        super().__init__(
            draft_model, num_draft_tokens=num_draft_tokens, tokenizer=tokenizer, draft_tokenizer=draft_tokenizer,
            use_ngram=use_ngram, max_ngram_size=max_ngram_size, num_ngram_pred_tokens=num_ngram_pred_tokens,
            min_ngram_size=min_ngram_size, draft_confidence_threshold=draft_confidence_threshold,
        )
        # validates the knobs now, not mid-generate
        LooseVerification(entropy_threshold, entropy_top_k, window, use_window=use_window, loose=loose)
        self.entropy_threshold = entropy_threshold
        self.entropy_top_k = entropy_top_k
        self.window = window
        self.use_window = use_window
        self.loose = loose

    def acceptance_rule(self, generation_config) -> AcceptanceRule:
        if not self.loose:  # strict: greedy-exact, and with sampling the target's distribution, as SpeculativeDecoding
            return super().acceptance_rule(generation_config)
        return LooseVerification(
            self.entropy_threshold, self.entropy_top_k, self.window, use_window=self.use_window,
            loose=self.loose, do_sample=bool(generation_config.do_sample),
        )

    @classmethod
    def calibrate(cls, model: PreTrainedModel, drafter, held_out_prompts, target_keep: float = 0.99, **kwargs) -> FLy:
        """FLy with the entropy threshold (and window) chosen on ``held_out_prompts`` so the task score stays
        at least ``target_keep`` × strict decoding's; see :func:`~.calibration.calibrate_fly` for the arguments.

        Example:
            >>> fly = FLy.calibrate(model, draft, held_out, target_keep=0.99, tokenizer=tok)  # doctest: +SKIP
        """
        from .calibration import calibrate_fly

        return calibrate_fly(model, drafter, held_out_prompts, target_keep, strategy_class=cls, **kwargs)

    def settings(self) -> dict[str, Any]:
        return {
            **super().settings(),
            "entropy_threshold": self.entropy_threshold,
            "entropy_top_k": self.entropy_top_k,
            "window": self.window,
            "use_window": self.use_window,
            "loose": self.loose,
        }


STRATEGIES: dict[str, type[SpeculativeDecoding]] = {cls.method: cls for cls in (SpeculativeDecoding, FLy)}


def register_strategy(cls: type[SpeculativeDecoding]) -> type[SpeculativeDecoding]:
    """Make ``cls.method`` known to :func:`strategy_from_dict` (and so to saved ``custom_generate`` folders)."""
    if not (isinstance(cls, type) and issubclass(cls, SpeculativeDecoding)):
        raise InvalidArgumentTypeError(f"register_strategy takes a SpeculativeDecoding subclass, got {cls!r}.")
    if not isinstance(cls.method, str) or not cls.method:
        raise ValueError(f"{cls.__name__}.method must be a non-empty string naming the strategy, got {cls.method!r}.")
    STRATEGIES[cls.method] = cls
    return cls


def discover_strategies() -> None:
    """Import every strategy folder of ``hf_compress.speculative`` (each registers its strategies).

    A folder such as ``heads/`` defines its strategy with ``@register_strategy``; nothing here lists it.
    """
    import importlib
    import pkgutil

    for module in pkgutil.iter_modules([str(Path(__file__).parent)]):
        if module.ispkg:
            importlib.import_module(f"{__package__}.{module.name}")


def strategy_from_dict(settings: dict[str, Any], **overrides: Any) -> SpeculativeDecoding:
    """Rebuild a strategy from :meth:`SpeculativeDecoding.to_dict`; non-``None`` ``overrides`` win.

    Example:
        >>> strategy_from_dict({"method": "fly", "window": 4}).window
        4
    """
    if not isinstance(settings, dict):
        raise InvalidArgumentTypeError(
            f"settings must be a dict from SpeculativeDecoding.to_dict(), got {type(settings).__name__}."
        )
    settings = dict(settings)
    method = settings.pop("method", None)
    if isinstance(method, str) and method not in STRATEGIES:
        discover_strategies()
    if not isinstance(method, str) or method not in STRATEGIES:
        raise ValueError(f"Unknown decoding strategy {method!r}; known methods: {sorted(STRATEGIES)}.")
    settings.update({k: v for k, v in overrides.items() if v is not None})
    if settings.get("draft_tokenizer") is None:
        settings["tokenizer"] = None  # a target tokenizer alone (e.g. given for stop strings) is not a pair
    return STRATEGIES[method].from_settings(settings)


def _vocab_size(model: PreTrainedModel) -> int:
    head = model.get_output_embeddings()
    rows = getattr(head, "out_features", None)  # also set on quantized heads, whose `weight` is not a tensor
    return rows if rows is not None else model.config.vocab_size


def portable_name(name_or_path: str | None) -> str | None:
    """A model's or tokenizer's name fit to publish: a local absolute path becomes its folder's name.

    Example:
        >>> portable_name("/home/me/models/draft"), portable_name("org/draft")
        ('draft', 'org/draft')
    """
    if name_or_path and os.path.isabs(os.path.expanduser(name_or_path)):
        return Path(name_or_path).name or None
    return name_or_path


def _anchored_to_here(settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` with each relative path of an existing local folder made absolute: ``generate()`` would read it
    against its own working directory, not the one the strategy was saved from."""
    anchored = dict(settings)
    for key in _REFERENCE_KEYS:
        value = anchored.get(key)
        if isinstance(value, str) and value != HERE and not os.path.isabs(os.path.expanduser(value)) \
                and os.path.isdir(value):
            anchored[key] = os.path.abspath(value)
    return anchored


def _name_of(thing) -> str | None:
    if thing is None:
        return None
    if isinstance(thing, (str, os.PathLike)):
        return str(thing)
    return getattr(thing, "name_or_path", None) or None


# Settings that name where something is loaded from; the value "." means "this repo or folder", resolved
# when generate.py runs (so a saved folder never records its absolute path, and still works once pushed).
_REFERENCE_KEYS = ("heads", "arbiter", "draft_model", "tokenizer", "draft_tokenizer")
HERE = "."


def usage_snippet(base_model: str | None, *, local: bool = False) -> str:
    """The "How to use" code of a strategy folder's card, runnable as written: it loads the base model and its
    tokenizer, builds inputs and runs ``generate(custom_generate=..., trust_remote_code=True)``.

    ``{base_model}`` and ``{repo_id}`` stay placeholders, filled in by :func:`hf_compress.hub.build_model_card`
    (``BASE_MODEL`` when the card knows no base model; said so in a comment). ``local``: the folder is named by
    its folder name (run from its parent folder), not a repo id. Greedy (``do_sample=False``): what the cards
    describe, and the only mode CoSpec runs.

    Example:
        >>> print(usage_snippet("HuggingFaceTB/SmolLM2-135M").splitlines()[3])
        model = AutoModelForCausalLM.from_pretrained("{base_model}")
    """
    base_note = "" if base_model else "  # none was recorded: the model this was saved for"
    folder_note = "  # this folder, from its parent; once pushed, its repo id" if local else ""
    return (
        "import hf_compress  # pip install hf-compress: custom_generate/generate.py runs on it\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        f'model = AutoModelForCausalLM.from_pretrained("{{base_model}}"){base_note}\n'
        'tokenizer = AutoTokenizer.from_pretrained("{base_model}")\n'
        'inputs = tokenizer("The capital of France is", return_tensors="pt").to(model.device)\n'
        "out = model.generate(\n"
        f'    **inputs, max_new_tokens=32, do_sample=False, custom_generate="{{repo_id}}",{folder_note}\n'
        "    trust_remote_code=True,\n"
        ")\n"
        "print(tokenizer.decode(out[0], skip_special_tokens=True))"
    )


def render_generate_py(method: str, settings: dict[str, Any]) -> str:
    """The ``custom_generate/generate.py`` that rebuilds a strategy from ``settings`` (its ``to_dict()``).

    The settings are embedded as JSON, each line a Python string literal (``repr``): any text (quotes,
    backslashes, newlines, NUL, ``\'\'\'``) comes back exactly and can never become code.
    :func:`read_generate_settings` reads them back without running the file.

    Example:
        >>> source = render_generate_py("fly", {"method": "fly", "draft_model": "it's"})
        >>> "SETTINGS = json.loads(" in source
        True
    """
    text = json.dumps(settings, indent=4, ensure_ascii=True)
    literal = "\n".join(f"    {line!r}" for line in text.splitlines(keepends=True))
    method_text = method if re.fullmatch(r"[A-Za-z0-9_.-]+", str(method)) else "registered"
    return (
        _GENERATE_PY.replace("@VERSION@", __version__).replace("@METHOD@", method_text).replace("@SETTINGS@", literal)
    )


def stop_strings_as_criteria(kwargs: dict[str, Any]) -> dict[str, Any]:
    """``generate()`` keyword arguments with ``stop_strings`` turned into a ``StopStringCriteria``.

    transformers builds the stop-string criterion from the ``tokenizer`` argument but does not hand that tokenizer on
    when ``custom_generate`` is a callable, so ``stop_strings`` fails there ("could not locate a tokenizer"). A saved
    strategy folder's ``generate.py`` receives both and converts them first; with a strategy object, pass
    ``stopping_criteria=[StopStringCriteria(tokenizer, stop_strings)]`` yourself.

    Example:
        >>> stop_strings_as_criteria({"max_new_tokens": 4})
        {'max_new_tokens': 4}
    """
    config = kwargs.get("generation_config")
    strings = kwargs.get("stop_strings") or getattr(config, "stop_strings", None)
    if not strings or kwargs.get("tokenizer") is None:
        return kwargs  # nothing to convert, or no tokenizer: transformers' own error says what is missing
    from transformers import StopStringCriteria

    kwargs = dict(kwargs)
    kwargs.pop("stop_strings", None)
    if config is not None and getattr(config, "stop_strings", None):
        config = copy.deepcopy(config)
        config.stop_strings = None
        kwargs["generation_config"] = config
    criteria = StoppingCriteriaList(kwargs.get("stopping_criteria") or [])
    criteria.append(StopStringCriteria(kwargs["tokenizer"], [strings] if isinstance(strings, str) else list(strings)))
    kwargs["stopping_criteria"] = criteria
    return kwargs


def custom_generate_requirement(version: str = __version__) -> str:
    """The ``custom_generate/requirements.txt`` line: at least the hf-compress release that wrote the folder.

    transformers checks it before importing ``generate.py``, so a folder saved by a newer release (settings an
    older one does not know) fails with ``hf-compress>=X (installed: Y)`` instead of an error from inside the
    strategy. Its parser reads only digits and dots, and a development build sorts below its own release, so a
    folder written by a pre-release or development build names the package without a floor.

    Example:
        >>> custom_generate_requirement("0.2.1"), custom_generate_requirement("0.2.1.dev0")
        ('hf-compress>=0.2.1', 'hf-compress')
    """
    from packaging.version import InvalidVersion, Version

    try:
        parsed = Version(version)
    except InvalidVersion:
        return "hf-compress"
    final = not (parsed.is_prerelease or parsed.is_postrelease or parsed.local)
    return f"hf-compress>={parsed.base_version}" if final else "hf-compress"


def read_generate_settings(folder: str | os.PathLike) -> dict[str, Any]:
    """The settings embedded in ``folder/custom_generate/generate.py``, read without running it.

    Example:
        >>> read_generate_settings("fly-ngram")["method"]  # doctest: +SKIP
        'fly'
    """
    path = Path(folder) / "custom_generate" / "generate.py"
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if (
            isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["SETTINGS"]
            and isinstance(node.value, ast.Call) and len(node.value.args) == 1
            and isinstance(node.value.args[0], ast.Constant) and isinstance(node.value.args[0].value, str)
        ):
            return json.loads(node.value.args[0].value)
    raise ValueError(f"{path} holds no SETTINGS = json.loads('...') written by hf_compress.")


def _local_references(settings: dict[str, Any]) -> list[str]:
    """``key='value'`` for each reference in ``settings`` that is a path on this machine."""
    local = []
    for key in _REFERENCE_KEYS:
        value = settings.get(key)
        if not isinstance(value, str) or value == HERE:
            continue
        if os.path.isabs(os.path.expanduser(value)) or value.startswith(("./", "../", "~")) or os.path.isdir(value):
            local.append(f"{key}={value!r}")
    return local


_GENERATE_PY = '''"""`generate()` entry point written by hf_compress @VERSION@: the `@METHOD@` decoding strategy.

transformers calls this for `model.generate(..., custom_generate=<this repo or folder>, trust_remote_code=True)`.
Extra keyword arguments `draft_model=`, `draft_tokenizer=`, `heads=` and `arbiter=` replace the saved draft,
drafting heads or CoSpec arbiter (`tokenizer=` is the target's, used when the tokenizers differ). A saved reference "." is this repo or
folder (the `custom_generate=` value). Requires `pip install hf-compress`.
"""

import json

# The strategy's settings: JSON, one Python string literal per line (read back exactly, never run as code).
SETTINGS = json.loads(
@SETTINGS@
)
_REFERENCE_KEYS = ("heads", "arbiter", "draft_model", "tokenizer", "draft_tokenizer")

# The last strategy built, with the arguments and the files it was built from: a saved draft model is loaded once,
# not on every generate() call (transformers keeps this module loaded while this file is unchanged).
_last = (None, None)


def _files_now(settings):
    """Name, size, modification time and inode of every file in the local folders the settings load from: a folder
    saved again in place (a retrained arbiter, other heads) must not be served by the strategy built from its old
    files."""
    import os

    state = []
    for key in _REFERENCE_KEYS:
        folder = settings.get(key)
        if isinstance(folder, str) and os.path.isdir(folder):
            for root, _, files in os.walk(folder):
                for name in files:
                    path = os.path.join(root, name)
                    stat = os.stat(path)
                    state.append((key, os.path.relpath(path, folder), stat.st_size, stat.st_mtime_ns, stat.st_ino))
    return sorted(state)


def _this_repo_or_folder():
    """The `custom_generate=` value transformers loaded this file for (it copies only this file elsewhere)."""
    from hf_compress._compat import argument_of_calling_generate

    value = argument_of_calling_generate("custom_generate")
    if isinstance(value, str):
        return value
    raise RuntimeError(
        "These settings load files saved next to them: call `model.generate(..., custom_generate=<repo or "
        "folder>, trust_remote_code=True)`, or pass them (`heads=`, `draft_model=`)."
    )


# `model` is keyword-only: transformers calls `generate(model=..., **arguments)` for `custom_generate=`, and a folder
# loaded with trust_remote_code gets `model.generate = partial(generate, model=model)`, so `model.generate(ids)`
# arrives here as (ids, model=model).
def generate(*args, model, draft_model=None, draft_tokenizer=None, heads=None, arbiter=None, **kwargs):
    global _last
    from hf_compress.speculative import strategy_from_dict
    from hf_compress.speculative.strategies import stop_strings_as_criteria

    arguments = (draft_model, draft_tokenizer, kwargs.get("tokenizer"), heads, arbiter)
    settings = dict(SETTINGS)
    given = dict(zip(("draft_model", "draft_tokenizer", "tokenizer", "heads", "arbiter"), arguments))
    if any(settings.get(k) == "." and given[k] is None for k in _REFERENCE_KEYS):
        here = _this_repo_or_folder()
        settings.update({k: here for k in _REFERENCE_KEYS if settings.get(k) == "."})
    files = _files_now(settings)
    key, strategy = _last
    if key is None or any(a is not b for a, b in zip(key[0], arguments)) or key[1:] != (settings, files):
        strategy = strategy_from_dict(
            settings, draft_model=draft_model, draft_tokenizer=draft_tokenizer, tokenizer=kwargs.get("tokenizer"),
            heads=heads, arbiter=arbiter,
        )
        _last = ((arguments, settings, files), strategy)
    # Not model.generate: a folder loaded with trust_remote_code binds this function there. A model whose generate
    # hf_compress wrapped (a routed one records its prompt's length) keeps that one under this name
    # (hf_compress.routing.layer.PROMPT_AWARE_GENERATE); any other runs its class's generate.
    kwargs = stop_strings_as_criteria(kwargs)
    own = vars(model).get("_hf_compress_generate")
    if own is not None:
        return own(*args, custom_generate=strategy, **kwargs)
    return type(model).generate(model, *args, custom_generate=strategy, **kwargs)
'''
