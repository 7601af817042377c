"""``CoSpecArbiter``: the small policy that arbitrates draft/target mismatches, as a ``PreTrainedModel``.

It maps the features of a drafted position (:mod:`.features`) to the logit of keeping the draft token. It
is also an acceptance rule (:meth:`CoSpecArbiter.verify`, the engine's ``AcceptanceRule`` protocol) with its
saved threshold; :meth:`CoSpecArbiter.as_rule` gives one with another threshold or mode. Saving writes the
config, the weights (input standardisation included), a model card and a ``custom_generate/`` folder.

Example:
    >>> from hf_compress.assets import tiny_model
    >>> model, _ = tiny_model("llama")
    >>> arbiter = CoSpecArbiter.for_model(model)
    >>> arbiter(torch.zeros(2, arbiter.config.num_features)).shape
    torch.Size([2])
"""

from __future__ import annotations

import hashlib
import json
import os
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ...assets.resolve import check_folder_exists
from ...hub import base_weights_of
from ...utils import InvalidArgumentTypeError, get_logger
from ..acceptance import Verdict
from ...modeling.identity import base_model_identity, check_base_model
from .config import ArbiterConfig
from .features import logit


if TYPE_CHECKING:
    from ...evaluation.results import MetricRecord


__all__ = ["CoSpecArbiter", "tokenizer_fingerprint"]

logger = get_logger(__name__)


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A short hash of the tokenizer's vocabulary (token → id): equal iff token ids mean the same strings.

    Example:
        >>> from hf_compress.assets import tiny_model
        >>> len(tokenizer_fingerprint(tiny_model("llama")[1]))
        16
    """
    if not isinstance(tokenizer, PreTrainedTokenizerBase):
        raise InvalidArgumentTypeError(f"tokenizer must be a PreTrainedTokenizerBase, got {type(tokenizer).__name__}.")
    # Hashing a 262k-token vocabulary takes ~0.5 s, and a cross-tokenizer CoSpec checks it at every generate()
    # call: remember it per tokenizer object while its size stays the same (adding tokens changes the size).
    size = len(tokenizer)
    known = _FINGERPRINTS.get(tokenizer)
    if known is not None and known[0] == size:
        return known[1]
    vocab = json.dumps(sorted(tokenizer.get_vocab().items(), key=lambda item: item[1]), ensure_ascii=True)
    fingerprint = hashlib.sha256(vocab.encode()).hexdigest()[:16]
    _FINGERPRINTS[tokenizer] = (size, fingerprint)
    return fingerprint


_FINGERPRINTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _output_head(model: PreTrainedModel):
    """The target's vocabulary projection, whose input width and rows an arbiter is built for."""
    head = model.get_output_embeddings()
    if head is None or getattr(head, "in_features", None) is None or getattr(head, "out_features", None) is None:
        raise ValueError(
            f"{type(model).__name__} has no output projection to the vocabulary (lm_head), so it cannot be a CoSpec "
            "target: pass the causal LM (AutoModelForCausalLM), not its base model.")
    return head


class CoSpecArbiter(PreTrainedModel):
    """Logit of DRAFT (keep the mismatching draft token) from one position's features.

    A linear head (``mlp_hidden_size=0``, Judge Decoding's probe) or a one-hidden-layer MLP, after a fixed
    standardisation of its inputs (``feature_mean``/``feature_std``, set from the warm-start data and saved
    with the weights). The bias starts at ``logit(initial_draft_probability)`` with zero weights, so a fresh
    arbiter keeps a mismatching draft with probability 0.05 everywhere: close to strict decoding.
    """

    config_class = ArbiterConfig
    base_model_prefix = "arbiter"
    main_input_name = "features"
    _no_split_modules: list[str] = []

    def __init__(self, config: ArbiterConfig):
        super().__init__(config)
        width = config.num_features
        # Built on the CPU like nn.Linear's weights (moved with the module); set from the warm-start data.
        self.register_buffer("feature_mean", torch.zeros(width, device="cpu"))
        self.register_buffer("feature_std", torch.ones(width, device="cpu"))
        if config.mlp_hidden_size:
            self.net = nn.Sequential(nn.Linear(width, config.mlp_hidden_size), nn.SiLU(), nn.Linear(config.mlp_hidden_size, 1))
        else:
            self.net = nn.Sequential(nn.Linear(width, 1))
        self.post_init()

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            last = module is self.net[-1]
            if last:
                nn.init.zeros_(module.weight)
                nn.init.constant_(module.bias, logit(self.config.initial_draft_probability))
            else:
                nn.init.normal_(module.weight, std=1.0 / module.in_features**0.5)
                nn.init.zeros_(module.bias)

    # ------------------------------------------------------------------ building
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs) -> CoSpecArbiter:
        """``PreTrainedModel.from_pretrained``, refusing a folder that does not hold every weight of an arbiter.

        transformers would fill missing weights and buffers with fresh (here: uninitialised) values and only warn;
        an arbiter without its standardisation outputs NaN, which silently decodes strictly.
        """
        want_info = kwargs.pop("output_loading_info", False)
        name = os.fspath(pretrained_model_name_or_path)
        check_folder_exists(name, "a folder saved by CoSpecArbiter.save_pretrained or a Hub id (owner/name)")
        local_config = Path(name).expanduser() / "config.json"
        if local_config.is_file():  # another model's folder: its own format (a routed model's) would load first
            try:
                model_type = json.loads(local_config.read_text(encoding="utf-8")).get("model_type")
            except (ValueError, AttributeError):
                model_type = None
            if model_type is not None and model_type != cls.config_class.model_type:
                raise ValueError(f"{name} holds a {model_type!r} model, not a CoSpec arbiter; pass the folder "
                                 "CoSpecArbiter.save_pretrained wrote (train one with train_arbiter).")
        arbiter, info = super().from_pretrained(pretrained_model_name_or_path, *args, output_loading_info=True,
                                                **kwargs)
        missing = sorted(info.get("missing_keys") or ())
        mismatched = sorted(str(entry[0]) if isinstance(entry, tuple) else str(entry)
                            for entry in info.get("mismatched_keys") or ())
        if missing or mismatched:
            foreign = sorted(info.get("unexpected_keys") or ())
            what = (f"it holds another model's weights ({', '.join(foreign[:3])}, ...)" if foreign and len(missing) > 1
                    else f"missing {missing}" if missing else f"wrong shapes for {mismatched}")
            raise ValueError(f"{pretrained_model_name_or_path} is not a complete CoSpec arbiter: {what}. Load a folder "
                             "saved by CoSpecArbiter.save_pretrained (re-save or re-download it if it was cut short).")
        return (arbiter, info) if want_info else arbiter

    @classmethod
    def for_model(
        cls, model: PreTrainedModel, config: ArbiterConfig | None = None, tokenizer: PreTrainedTokenizerBase | None = None
    ) -> CoSpecArbiter:
        """A fresh arbiter for ``model`` (the target): its hidden size, vocabulary and (optionally) tokenizer."""
        if not isinstance(model, PreTrainedModel):
            raise InvalidArgumentTypeError(f"model must be the target causal LM (PreTrainedModel), got {type(model).__name__}.")
        config = ArbiterConfig() if config is None else ArbiterConfig.from_dict(config.to_dict())  # never mutate
        head = _output_head(model)
        config.hidden_size, config.vocab_size = head.in_features, head.out_features
        config.base_model_name_or_path = model.config.name_or_path or None
        config.base_model_identity = base_model_identity(model)
        config.base_weights = base_weights_of(model.config)  # a reference target's GGUF origin, for the card
        if tokenizer is not None:
            config.tokenizer_fingerprint = tokenizer_fingerprint(tokenizer)
            config.tokenizer_name_or_path = tokenizer.name_or_path or None
        arbiter = cls(config)
        arbiter.init_weights()
        weight = getattr(head, "weight", None)  # a method, not a tensor, on a dynamically quantized head
        return arbiter.to(weight.device if isinstance(weight, torch.Tensor) else model.device)

    def check_compatible(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None = None) -> None:
        """Raise a clear error if this arbiter was trained for a target of another width, vocabulary, weights or
        tokenizer."""
        head = _output_head(model)
        hidden, vocab = head.in_features, head.out_features
        if (hidden, vocab) != (self.config.hidden_size, self.config.vocab_size):
            raise ValueError(
                f"This CoSpec arbiter was trained for a target with hidden size {self.config.hidden_size} and "
                f"{self.config.vocab_size} tokens ({self.config.base_model_name_or_path or 'unknown target'}), but this "
                f"model has hidden size {hidden} and {vocab} tokens. Train one for this model (`train_arbiter`)."
            )
        check_base_model(self.config, model, "this CoSpec arbiter",
                         "Train one for this model (`train_arbiter`), or load the target it was trained for.")
        if tokenizer is not None and self.config.tokenizer_fingerprint is not None:
            if tokenizer_fingerprint(tokenizer) != self.config.tokenizer_fingerprint:
                raise ValueError(
                    "This CoSpec arbiter was trained with another tokenizer (its vocabulary fingerprint differs): "
                    "token ids would mean other strings. Train one with this tokenizer (`train_arbiter`)."
                )

    # ------------------------------------------------------------------ computing
    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """``(..., F)`` features → ``(...)`` logits of DRAFT."""
        if features.shape[-1] != self.config.num_features:
            raise ValueError(f"Expected {self.config.num_features} features per position, got {features.shape[-1]}.")
        x = (features.to(self.feature_mean.dtype) - self.feature_mean) / self.feature_std
        return self.net(x).squeeze(-1)

    @torch.no_grad()
    def set_standardisation(self, features: torch.Tensor) -> None:
        """Standardise inputs with the mean and spread of ``features`` ``(N, F)`` (the warm-start data)."""
        self.feature_mean.copy_(features.mean(dim=0))
        self.feature_std.copy_(features.std(dim=0, correction=0).clamp_min(1e-3))

    @property
    def reads_hidden_states(self) -> bool:
        return self.as_rule().reads_hidden_states  # not at threshold 1.0, where the arbiter is never consulted

    def as_rule(self, threshold: float | None = None, mode: str = "policy", **kwargs):
        """An :class:`~.rule.ArbiterRule` with this arbiter (``threshold`` defaults to the saved one)."""
        from .rule import ArbiterRule

        return ArbiterRule(self, threshold=threshold, mode=mode, **kwargs)

    def verify(self, draft_tokens, target_logits, draft_probs=None, hidden_states=None) -> Verdict:
        """The ``AcceptanceRule`` protocol with the saved threshold (see :class:`~.rule.ArbiterRule`)."""
        return self.as_rule().verify(draft_tokens, target_logits, draft_probs, hidden_states=hidden_states)

    def calibrate(self, model: PreTrainedModel, drafter, held_out_prompts, target_keep: float = 0.99, **kwargs) -> CoSpecArbiter:
        """Set the threshold on held-out prompts so the task score keeps ``target_keep`` of strict's (in place).

        See :func:`~.calibration.calibrate_arbiter` for the arguments.

        Example:
            >>> arbiter.calibrate(model, "ngram", held_out, target_keep=0.99, tokenizer=tok).config.threshold  # doctest: +SKIP
        """
        from .calibration import calibrate_arbiter

        return calibrate_arbiter(self, model, drafter, held_out_prompts, target_keep, **kwargs)

    # ------------------------------------------------------------------ sharing
    def strategy(self, **kwargs):
        """The :class:`~.strategy.CoSpec` strategy this arbiter was trained with (``kwargs`` override).

        A cross-tokenizer pair's recorded tokenizers (``config.tokenizer_name_or_path``, else the target's name, and
        ``config.draft_tokenizer_name_or_path``) come with the recorded draft model, unless ``kwargs`` name another
        draft model or tokenizer.
        """
        from .strategy import CoSpec

        config = self.config
        settings = dict(draft_model=config.draft_model_name_or_path, num_draft_tokens=config.num_draft_tokens,
                        use_ngram=config.use_ngram, min_ngram_size=config.min_ngram_size)
        pair = dict(tokenizer=config.tokenizer_name_or_path or config.base_model_name_or_path,
                    draft_tokenizer=config.draft_tokenizer_name_or_path)
        if (config.draft_tokenizer_fingerprint is not None and config.draft_model_name_or_path is not None
                and all(pair.values()) and not {"draft_model", "tokenizer", "draft_tokenizer"} & set(kwargs)):
            settings.update(pair)
        settings.update(kwargs)
        return CoSpec(self, **settings)

    def save_pretrained(
        self, save_directory: str | os.PathLike, *, overwrite: bool = False, arbiter_source: str | None = None,
        repo_id: str | None = None, metrics: Sequence[MetricRecord] = (), **kwargs
    ) -> Path:
        """Config + safetensors + model card + ``custom_generate/`` in one atomic write.

        ``custom_generate/generate.py`` loads the arbiter from ``arbiter_source`` (default ``"."``: the folder or
        repo ``custom_generate=`` names), with the drafting it was trained with (``config.draft_model_name_or_path``,
        ``None`` = n-gram prompt lookup), so ``generate(custom_generate=<folder or repo>, trust_remote_code=True)``
        decodes with it. ``repo_id``: the repo the card's code loads (``None``: the folder's name); ``metrics``:
        measured results for the card. Other ``kwargs`` go to ``PreTrainedModel.save_pretrained``.

        Example:
            >>> arbiter.save_pretrained("smollm2-cospec")  # doctest: +SKIP
        """
        return self._saved_strategy().save_pretrained(
            save_directory, overwrite=overwrite, arbiter_source=arbiter_source, repo_id=repo_id, metrics=metrics,
            save_arbiter_kwargs=kwargs)

    def push_to_hub(self, repo_id: str, **push_kwargs):
        """Save (recording ``repo_id`` as where ``custom_generate`` loads the arbiter from, and in the card's code)
        and upload."""
        return self._saved_strategy().push_to_hub(repo_id, **push_kwargs)

    def _saved_strategy(self):
        """:meth:`strategy`, warning when the saved ``custom_generate`` folder would draft otherwise than in training.

        ``draft_model_name_or_path=None`` means n-gram drafts, which is also what an arbiter trained with an unnamed
        in-memory draft model records: its folder would decode with another drafter unless told which.
        """
        if (self.config.training or {}).get("drafter") == "model" and self.config.draft_model_name_or_path is None:
            logger.warning(
                "This CoSpec arbiter was trained with a draft model that has no name or path, so the custom_generate "
                "folder it saves drafts by n-gram prompt lookup unless generate() is given draft_model=. To record the "
                "draft, save or push it (`draft.save_pretrained(dir)`), set `arbiter.config.draft_model_name_or_path` "
                "to that folder or Hub id, and save again.")
        draft = self.config.draft_model_name_or_path
        if self.config.draft_tokenizer_fingerprint is not None and not (
                self.config.draft_tokenizer_name_or_path
                and (self.config.tokenizer_name_or_path or self.config.base_model_name_or_path)):
            logger.warning(
                "This CoSpec arbiter was trained with a draft model whose tokenizer differs from the target's, and does "
                "not record where %s loads from, so its custom_generate folder refuses to draft until generate() is "
                "given draft_tokenizer= (the draft's) and tokenizer= (the target's). To record them, set "
                "`arbiter.config.draft_tokenizer_name_or_path` and `arbiter.config.tokenizer_name_or_path` to their "
                "folders or Hub ids and save again.",
                "the draft's tokenizer" if not self.config.draft_tokenizer_name_or_path else "the target's tokenizer")
        if draft is not None and draft == self.config.base_model_name_or_path:
            logger.warning(
                "This CoSpec arbiter records its target %r as its draft model (a copy of the target, e.g. quantized, "
                "keeps the target's name): its custom_generate folder would draft with the full target itself. Save "
                "the draft under its own name, set `arbiter.config.draft_model_name_or_path` to it, and save again.",
                draft)
        return self.strategy()
