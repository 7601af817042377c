"""CoSpec: a learned arbiter keeps the draft's or the target's token at each draft/target mismatch.

The arbiter is an acceptance rule of the shared speculative engine (no second decoding loop), trained by
:func:`train_arbiter` (oracle labels → warm start → REINFORCE on task score − λ · target forwards), and
shared as a ``PreTrainedModel`` whose folder also holds a ``custom_generate/`` strategy.

Example:
    >>> from hf_compress.speculative import CoSpec, train_arbiter
    >>> arbiter = train_arbiter(model, draft, task, reward="squad_f1", tokenizer=tok)        # doctest: +SKIP
    >>> out = model.generate(**inputs, do_sample=False, custom_generate=CoSpec(arbiter, draft_model=draft))  # doctest: +SKIP
    >>> arbiter.save_pretrained("arb/"); arbiter.push_to_hub("me/smollm2-cospec")         # doctest: +SKIP
"""

from . import auto as _auto  # noqa: F401 - registers the Auto classes: AutoModelForCausalLM refuses an arbiter
from .calibration import DEFAULT_KEEP_SHARES, calibrate_arbiter, quantile_thresholds
from .config import ArbiterConfig
from .features import FEATURE_NAMES, mismatch_features
from .modeling import CoSpecArbiter, tokenizer_fingerprint
from .rule import ArbiterRule, Decision, DecisionLog
from .strategy import CoSpec
from .training import (
    REWARDS,
    ArbiterTrainingSettings,
    Episode,
    OracleLabels,
    TaskExample,
    TaskReward,
    collect_oracle_labels,
    fit_warm_start,
    oracle_agreement,
    oracle_label,
    reinforce_step,
    resolve_reward,
    task_examples,
    train_arbiter,
)

__all__ = [
    "DEFAULT_KEEP_SHARES",
    "FEATURE_NAMES",
    "REWARDS",
    "ArbiterConfig",
    "ArbiterRule",
    "ArbiterTrainingSettings",
    "CoSpec",
    "CoSpecArbiter",
    "Decision",
    "DecisionLog",
    "Episode",
    "OracleLabels",
    "TaskExample",
    "TaskReward",
    "calibrate_arbiter",
    "collect_oracle_labels",
    "fit_warm_start",
    "mismatch_features",
    "oracle_agreement",
    "oracle_label",
    "quantile_thresholds",
    "reinforce_step",
    "resolve_reward",
    "task_examples",
    "tokenizer_fingerprint",
    "train_arbiter",
]
