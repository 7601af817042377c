"""``ArbiterConfig``: what a CoSpec arbiter reads, how it is built, and which target it was trained for.

A ``transformers`` config (``config.json`` round-trips, ``push_to_hub`` works). The fields that tie an arbiter
to a target (``hidden_size``, ``vocab_size``, ``tokenizer_fingerprint``, ``base_model_identity``) are filled in by
:meth:`~.modeling.CoSpecArbiter.for_model` and checked before every decode.
"""

from __future__ import annotations

from transformers import PreTrainedConfig

from ...utils import InvalidArgumentTypeError, check_bool, check_float, check_int, check_str
from ...modeling.identity import check_identity_field
from .features import NUM_SCALAR_FEATURES

__all__ = ["ArbiterConfig"]


class ArbiterConfig(PreTrainedConfig):
    """A CoSpec arbiter: at a draft/target mismatch, keep the draft token (DRAFT) or the target's (TARGET).

    Args:
        hidden_size / vocab_size: The target's (filled by ``CoSpecArbiter.for_model``).
        use_hidden_states: Read the target's final hidden state at the draft token's position (Judge
            Decoding's signal: a linear probe on it tells acceptable from harmful continuations). Without it
            the arbiter reads only the cheap logit features (:mod:`.features`).
        mlp_hidden_size: ``0`` = a linear head (Judge Decoding / AutoJudge); otherwise one SiLU hidden layer.
        entropy_top_k: ``k`` of the target's top-k entropy feature (FLy's gate statistic, k = 3).
        threshold: Default decision threshold on P(DRAFT): the speed–quality knob (``CoSpec(threshold=)``
            overrides it). ``1.0`` never keeps a mismatching draft (strict), ``0.0`` always does.
        initial_draft_probability: P(DRAFT) of a fresh arbiter (bias only): near strict decoding.
        num_draft_tokens / draft_model_name_or_path / use_ngram / min_ngram_size: The drafting the arbiter was
            trained with, used by the ``custom_generate`` folder it saves and by ``calibrate_arbiter`` (``None``
            draft model = n-gram prompt lookup; ``min_ngram_size`` as for ``SpeculativeDecoding``).
        base_model_name_or_path / tokenizer_fingerprint: The target it was trained for.
        tokenizer_name_or_path: Where the target's tokenizer loads from (its ``name_or_path`` when ``for_model``
            or ``train_arbiter`` got a named one); a cross-tokenizer ``custom_generate`` folder loads it.
        draft_tokenizer_name_or_path / draft_tokenizer_fingerprint: The draft model's tokenizer when it differs from
            the target's (a cross-tokenizer pair, set by ``train_arbiter``, and in the config a ``CoSpec`` built
            with such a pair saves; ``None`` otherwise): the saved strategy
            drafts through it without being told, and a draft tokenizer of another vocabulary is refused (its token
            ids would be read with the wrong vocabulary). ``None`` in folders saved before they were recorded.
        base_model_identity: The target's text model type and a few entries of its input embeddings (filled by
            ``for_model``), checked before decoding so an arbiter trained for another target of the same shape is
            refused.
        base_weights: Where the target's weights came from when it is a reference model (a GGUF de-quantized to
            float32: ``hf_compress.hub.base_weights_of``), filled by ``for_model`` and stated on the arbiter's card;
            ``None`` for any other target (and in folders saved before it was recorded).
        training: What ``train_arbiter`` did (data, oracle labels, RL steps, λ), for the model card.
        calibration: What ``calibrate_arbiter`` did (held-out prompts, target share kept, every threshold tried,
            the one chosen and now in ``threshold``), for the model card; ``None`` = not calibrated.

    Example:
        >>> ArbiterConfig(hidden_size=64, vocab_size=256).num_features
        73
    """

    model_type = "hf_compress_cospec_arbiter"

    hidden_size: int | None = None
    vocab_size: int | None = None
    use_hidden_states: bool = True
    mlp_hidden_size: int = 0
    entropy_top_k: int = 3
    threshold: float = 0.5
    initial_draft_probability: float = 0.05
    num_draft_tokens: int = 8
    draft_model_name_or_path: str | None = None
    use_ngram: bool = False
    min_ngram_size: int = 1
    base_model_name_or_path: str | None = None
    tokenizer_fingerprint: str | None = None
    tokenizer_name_or_path: str | None = None
    draft_tokenizer_name_or_path: str | None = None
    draft_tokenizer_fingerprint: str | None = None
    base_model_identity: dict | None = None
    base_weights: dict | None = None
    training: dict | None = None
    calibration: dict | None = None

    def __post_init__(self, **kwargs):
        for name in ("hidden_size", "vocab_size"):
            check_int(name, getattr(self, name), minimum=1, allow_none=True,
                      hint="CoSpecArbiter.for_model(model, config) fills it from the target.")
        check_bool("use_hidden_states", self.use_hidden_states)
        check_int("mlp_hidden_size", self.mlp_hidden_size, minimum=0, hint="0 gives a linear head.")
        check_int("entropy_top_k", self.entropy_top_k, minimum=1)
        self.threshold = check_float("threshold", self.threshold, low=0.0, high=1.0,
                                     hint="It is a probability of keeping the draft token (1.0 = strict).")
        self.initial_draft_probability = check_float(
            "initial_draft_probability", self.initial_draft_probability, low=0.0, high=1.0, low_open=True, high_open=True)
        check_int("num_draft_tokens", self.num_draft_tokens, minimum=1)
        check_bool("use_ngram", self.use_ngram)
        check_int("min_ngram_size", self.min_ngram_size, minimum=1)
        for name in ("draft_model_name_or_path", "base_model_name_or_path", "tokenizer_fingerprint",
                     "tokenizer_name_or_path", "draft_tokenizer_name_or_path", "draft_tokenizer_fingerprint"):
            check_str(name, getattr(self, name), allow_none=True)
        check_identity_field(self.base_model_identity)
        for name in ("training", "calibration", "base_weights"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), dict):
                raise InvalidArgumentTypeError(f"{name} must be a dict or None, got {type(getattr(self, name)).__name__}.")
        super().__post_init__(**kwargs)

    @property
    def num_features(self) -> int:
        """Width of the arbiter's input: the scalar features, plus the hidden state if it is read."""
        if self.use_hidden_states and self.hidden_size is None:
            raise ValueError("hidden_size is unknown; build the arbiter with CoSpecArbiter.for_model(model, config).")
        return NUM_SCALAR_FEATURES + (self.hidden_size if self.use_hidden_states else 0)
