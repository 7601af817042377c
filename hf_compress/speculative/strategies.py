"""User-facing strategies for ``model.generate(custom_generate=...)``.

A strategy is a callable with the signature transformers gives ``custom_generate`` callables. It picks a
drafter and an acceptance rule and runs the shared engine; it round-trips through a dict (``to_dict`` /
:func:`strategy_from_dict`) so that :meth:`SpeculativeDecoding.save_pretrained` can write a Hub folder
whose ``custom_generate/generate.py`` rebuilds it.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.generation import StoppingCriteriaList
from transformers.generation.stopping_criteria import MaxLengthCriteria

from .. import __version__, _compat
from ..utils import atomic_directory, get_logger
from .acceptance import AcceptanceRule, LooseVerification, SpeculativeSampling, StrictGreedy
from .drafting import CrossTokenizerDrafter, ModelDrafter, NgramDrafter
from .engine import SpeculativeDecodingOutput, SpeculativeMetrics, speculative_decode


logger = get_logger(__name__)

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
        draft_model: A causal LM, or a path/Hub id loaded on first use with the target's dtype and device.
        num_draft_tokens: Tokens drafted per target forward (>= 1).
        tokenizer / draft_tokenizer: Needed only when the two models' vocabularies differ.
        use_ngram: Speed up the draft model itself with n-gram lookup (FLy's multi-level acceleration).
        max_ngram_size / num_ngram_pred_tokens: n-gram search settings (the n-gram drafter and MLA).
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
        drafter=None,
        acceptance: AcceptanceRule | None = None,
    ):
        if not isinstance(num_draft_tokens, int) or num_draft_tokens < 1:
            raise ValueError(f"num_draft_tokens must be an integer >= 1, got {num_draft_tokens!r}.")
        if (tokenizer is None) != (draft_tokenizer is None):
            raise ValueError("Pass both `tokenizer` (the target's) and `draft_tokenizer`, or neither.")
        if max_ngram_size < 1 or num_ngram_pred_tokens < 1:
            raise ValueError("max_ngram_size and num_ngram_pred_tokens must be >= 1.")
        self.draft_model = draft_model
        self.num_draft_tokens = num_draft_tokens
        self.tokenizer = tokenizer
        self.draft_tokenizer = draft_tokenizer
        self.use_ngram = use_ngram
        self.max_ngram_size = max_ngram_size
        self.num_ngram_pred_tokens = num_ngram_pred_tokens
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
            "num_ngram_pred_tokens": self.num_ngram_pred_tokens,
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
        if generation_config.num_beams > 1:
            raise ValueError("Speculative decoding does not combine with beam search: use num_beams=1.")
        if model_kwargs.get("use_cache") is False:
            raise ValueError("Speculative decoding needs the KV cache: drop use_cache=False.")
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

    def drafter_for(self, model: PreTrainedModel):
        """Build (once) the drafter for ``model`` from the constructor's arguments, checking compatibility."""
        if self._custom_drafter:
            return self._drafter
        if isinstance(self.draft_model, (str, os.PathLike)):
            logger.info("Loading draft model %s", self.draft_model)
            self.draft_model = AutoModelForCausalLM.from_pretrained(self.draft_model, dtype=model.dtype).to(model.device)
            self.draft_model.eval()
        for name in ("tokenizer", "draft_tokenizer"):
            if isinstance(getattr(self, name), (str, os.PathLike)):
                setattr(self, name, AutoTokenizer.from_pretrained(getattr(self, name)))
        if self._drafter is None or self._drafter_target is not model:
            self._drafter = NgramDrafter(self.max_ngram_size) if self.draft_model is None else self._model_drafter(model)
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
            NgramDrafter(self.max_ngram_size, num_pred_tokens=self.num_ngram_pred_tokens, reuse_last_proposal=True)
            if self.use_ngram
            else None
        )
        same_vocab = _vocab_size(draft) == _vocab_size(model)
        if self.tokenizer is not None and self.tokenizer.get_vocab() != self.draft_tokenizer.get_vocab():
            return CrossTokenizerDrafter(draft, self.tokenizer, self.draft_tokenizer, accelerator)
        if not same_vocab:
            raise ValueError(
                f"The draft model's vocabulary ({_vocab_size(draft)} tokens) differs from the target's "
                f"({_vocab_size(model)}). To draft across tokenizers pass both `tokenizer=` (the target's) and "
                "`draft_tokenizer=`; otherwise use a draft model that shares the target's tokenizer."
            )
        return ModelDrafter(draft, accelerator)

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

    def save_pretrained(self, save_directory: str | os.PathLike, *, base_model: str | None = None, overwrite: bool = False) -> Path:
        """Write a folder that ``generate(custom_generate=<folder or repo>, trust_remote_code=True)`` runs.

        It holds ``custom_generate/generate.py`` (the settings embedded, since transformers copies only that
        file into its module cache), ``custom_generate/requirements.txt`` and a ``README.md`` card. A draft
        model is referenced by its name or path (``draft_model.name_or_path``), not copied.

        Example:
            >>> FLy().save_pretrained("fly-ngram")  # doctest: +SKIP
        """
        settings = self.to_dict()
        self._check_saveable(settings)
        from ..hub import write_model_card

        with atomic_directory(save_directory, overwrite=overwrite) as tmp:
            (tmp / "custom_generate").mkdir()
            (tmp / "custom_generate" / "generate.py").write_text(_GENERATE_PY.format(
                version=__version__, method=self.method, settings=json.dumps(settings, indent=4),
            ))
            (tmp / "custom_generate" / "requirements.txt").write_text("hf-compress\n")
            self._write_weights(tmp)
            write_model_card(tmp, self.model_card(Path(save_directory).name, base_model, settings))
        logger.info("Saved the %s strategy to %s", self.method, save_directory)
        return Path(save_directory)

    def _check_saveable(self, settings: dict[str, Any]) -> None:
        if self.draft_model is not None and not settings["draft_model"]:
            raise ValueError(
                "The draft model has no name or path to record; save it first (`draft.save_pretrained(dir)`) and "
                "pass that directory or a Hub id as `draft_model`."
            )

    def _write_weights(self, folder: Path) -> None:
        """Weights the folder ships (none: a draft model is referenced, not copied)."""

    def model_card(self, name: str, base_model: str | None, settings: dict[str, Any]):
        from ..hub import build_model_card

        return build_model_card(
            base_model=base_model, model_name=name, recipe=settings, template="decoding_strategy",
            extra_tags=["custom_generate", "speculative-decoding"],
            load_snippet=(
                "import hf_compress  # pip install hf-compress\n"
                f'out = model.generate(**inputs, custom_generate="{name}", trust_remote_code=True)'
            ),
        )

    def push_to_hub(self, repo_id: str, *, base_model: str | None = None, **push_kwargs):
        """``save_pretrained`` into a temporary folder and upload it (see :func:`hf_compress.hub.push_to_hub`)."""
        from ..hub import push_to_hub

        with tempfile.TemporaryDirectory() as tmp:
            folder = self.save_pretrained(Path(tmp) / repo_id.split("/")[-1], base_model=base_model, **self._save_kwargs_for_push(repo_id))
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
        tokenizer: PreTrainedTokenizerBase | str | None = None,
        draft_tokenizer: PreTrainedTokenizerBase | str | None = None,
    ):
        super().__init__(
            draft_model, num_draft_tokens=num_draft_tokens, tokenizer=tokenizer, draft_tokenizer=draft_tokenizer,
            use_ngram=use_ngram, max_ngram_size=max_ngram_size, num_ngram_pred_tokens=num_ngram_pred_tokens,
        )
        LooseVerification(entropy_threshold, entropy_top_k, window)  # validates the knobs now, not mid-generate
        self.entropy_threshold = entropy_threshold
        self.entropy_top_k = entropy_top_k
        self.window = window
        self.use_window = use_window
        self.loose = loose

    def acceptance_rule(self, generation_config) -> AcceptanceRule:
        return LooseVerification(
            self.entropy_threshold, self.entropy_top_k, self.window, use_window=self.use_window,
            loose=self.loose, do_sample=generation_config.do_sample,
        )

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
    settings = dict(settings)
    method = settings.pop("method", None)
    if method not in STRATEGIES:
        discover_strategies()
    if method not in STRATEGIES:
        raise ValueError(f"Unknown decoding strategy {method!r}; known: {sorted(STRATEGIES)}.")
    settings.update({k: v for k, v in overrides.items() if v is not None})
    if settings.get("draft_tokenizer") is None:
        settings["tokenizer"] = None  # a target tokenizer alone (e.g. given for stop strings) is not a pair
    return STRATEGIES[method].from_settings(settings)


def _vocab_size(model: PreTrainedModel) -> int:
    head = model.get_output_embeddings()
    rows = getattr(head, "out_features", None)  # also set on quantized heads, whose `weight` is not a tensor
    return rows if rows is not None else model.config.vocab_size


def _name_of(thing) -> str | None:
    if thing is None:
        return None
    if isinstance(thing, (str, os.PathLike)):
        return str(thing)
    return getattr(thing, "name_or_path", None) or None


_GENERATE_PY = '''"""`generate()` entry point written by hf_compress {version}: the `{method}` decoding strategy.

transformers calls this for `model.generate(..., custom_generate=<this repo or folder>, trust_remote_code=True)`.
Extra keyword arguments `draft_model=`, `draft_tokenizer=` and `heads=` replace the saved draft or drafting
heads (`tokenizer=` is the target's, used when the tokenizers differ). Requires `pip install hf-compress`.
"""

import json

SETTINGS = json.loads("""{settings}""")

# The last strategy built, with the arguments it was built from: a saved draft model is loaded once, not on
# every generate() call (transformers keeps this module loaded while the file is unchanged).
_last = (None, None)


def generate(model, draft_model=None, draft_tokenizer=None, heads=None, **kwargs):
    global _last
    from hf_compress.speculative import strategy_from_dict

    arguments = (draft_model, draft_tokenizer, kwargs.get("tokenizer"), heads)
    key, strategy = _last
    if key is None or any(a is not b for a, b in zip(key, arguments)):
        strategy = strategy_from_dict(
            SETTINGS, draft_model=draft_model, draft_tokenizer=draft_tokenizer, tokenizer=kwargs.get("tokenizer"),
            heads=heads,
        )
        _last = (arguments, strategy)
    return model.generate(custom_generate=strategy, **kwargs)
'''
