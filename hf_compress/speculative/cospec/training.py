"""Training a CoSpec arbiter: oracle labels for a supervised warm start, then REINFORCE on the task reward.

1. **Oracle labels** (AutoJudge's fork-and-regenerate): decode each training prompt with strict verification
   (= the target's greedy answer), and at each mismatch met on the way fork: put the draft token in place
   of the target's, let the target continue greedily, score both answers. DRAFT is the label when the draft
   branch scores higher, or equal with the same (normalised) answer; TARGET when it scores lower, or equal
   with a changed answer (the answer moved: conservative, as AutoJudge marks changed answers "important";
   ``label_rule="score"`` accepts a moved answer whose nonzero score is unchanged). The forks reuse one KV
   cache of the strict sequence (cropped per fork), so each costs only its own few decoding steps.
2. **Warm start**: class-balanced logistic regression of those labels on the features, full batch.
3. **RL**: episodes are whole CoSpec generations with the arbiter sampled at each mismatch
   (``mode="sample"``); reward ``R = task score − λ · target forwards``; ``group_size`` rollouts per prompt
   give a group-relative baseline (GRPO-style advantages ``(R − mean) / std``); loss
   ``−Σ_episodes A · Σ_decisions log π(a) − β · entropy``; only the arbiter trains.
4. **Calibration** (``held_out=``, :mod:`.calibration`): the threshold is set on held-out prompts to the loosest
   one keeping ``target_keep`` of strict decoding's score there (else strict).

Why not TRL: its RL trainers (``GRPOTrainer``, ``RLOOTrainer``, ``PPOTrainer``) optimise a causal LM that
*generates* the completions being rewarded, with token log-probabilities from that LM. Here the policy is a
binary classifier called inside another model's decoding loop, a handful of Bernoulli decisions per
episode, and the "completion" is produced by the frozen target. None of those trainers can express that,
so the loop below is a plain REINFORCE with a group baseline, stepping through ``accelerate`` and logging
like ``Trainer`` (a dict per step into ``log_history`` and the log).

Under ``torchrun`` the generations, which are the cost, are shared out (``training.map_over_processes``): each
process labels and rolls out its share of the prompts, every process gets all results in the prompts' order, and
takes the same update on them. The oracle labels equal one process's; each process samples its rollouts from its own
generator (seeded ``seed + rank``). At the end every process keeps rank 0's arbiter (the calibration on ``held_out`` runs on each).

Example:
    >>> arbiter = train_arbiter(model, draft, [{"input_ids": ids, "answers": ["Paris"]}], tokenizer=tok)  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import os
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from ...evaluation.squad import normalize_answer
from ...training import broadcast_from_main, map_over_processes, process_count
from ...utils.processes import process_rank
from ...utils import (
    InvalidArgumentTypeError,
    check_bool,
    check_choice,
    check_float,
    check_int,
    get_logger,
    progress_bar,
)
from ...modeling.identity import record_base_model
from ...modeling.layers import kept_trainability
from ..task_answers import (
    REWARDS,
    Reward,
    TaskExample,
    TaskReward,
    answer_text,
    generate_answer,
    prefix_cache,
    resolve_reward,
    stop_token_ids,
    task_examples,
)
from .config import ArbiterConfig
from .modeling import CoSpecArbiter, tokenizer_fingerprint
from .rule import Decision, DecisionLog
from .strategy import CoSpec

__all__ = [
    "REWARDS",
    "ArbiterTrainingSettings",
    "Episode",
    "OracleLabels",
    "TaskExample",
    "TaskReward",
    "collect_oracle_labels",
    "fit_warm_start",
    "oracle_agreement",
    "oracle_label",
    "reinforce_step",
    "resolve_reward",
    "task_examples",
    "train_arbiter",
]

logger = get_logger(__name__)
LABEL_RULES = ("answer", "score")

@dataclass
class ArbiterTrainingSettings:
    """Knobs of :func:`train_arbiter` (defaults sized for a 135M target on a CPU).

    Args:
        max_new_tokens: Answer budget per generation.
        stop_at_newline: Stop an answer at its first newline (the answer is the first line anyway).
        max_forks_per_prompt: Oracle forks per training prompt (evenly spread over its mismatches); each costs
            one greedy target generation from the cached prefix (the prompt is prefilled once per prompt).
        label_rule: ``"answer"`` (DRAFT iff the draft branch scores higher, or equal with the same normalised
            answer: conservative) or ``"score"`` (DRAFT iff it scores at least as well: the answer may move if
            the score does not; on prompts the target gets wholly wrong, ties at 0 still need the same answer).
        warm_start_steps / warm_start_learning_rate: Full-batch Adam steps of the logistic regression.
        weight_decay: L2 on the arbiter's weights (warm start and RL).
        rl_steps / rl_prompts_per_step / group_size: RL updates, prompts per update, rollouts per prompt (at least
            2: the group's mean reward is each rollout's baseline).
        rl_learning_rate: AdamW learning rate of the RL stage.
        cost_per_forward: λ, the reward's price of one target forward (in task-score units).
        entropy_bonus: β, keeps the policy from collapsing to a deterministic one too early.
        seed: Seeds a fresh arbiter's initial weights (an MLP's hidden layer), the rollouts' sampling and the prompt
            order: the same call trains the same arbiter.
    """

    max_new_tokens: int = 32
    stop_at_newline: bool = True
    max_forks_per_prompt: int = 4
    label_rule: str = "answer"
    warm_start_steps: int = 300
    warm_start_learning_rate: float = 0.05
    weight_decay: float = 0.01
    rl_steps: int = 4
    rl_prompts_per_step: int = 4
    group_size: int = 4
    rl_learning_rate: float = 0.01
    cost_per_forward: float = 0.01
    entropy_bonus: float = 0.01
    seed: int = 0

    def __post_init__(self):
        for name in ("max_new_tokens", "max_forks_per_prompt", "rl_prompts_per_step", "group_size"):
            check_int(name, getattr(self, name), minimum=1)
        for name in ("warm_start_steps", "rl_steps", "seed"):
            check_int(name, getattr(self, name), minimum=0)
        check_bool("stop_at_newline", self.stop_at_newline)
        check_choice("label_rule", self.label_rule, LABEL_RULES)
        if self.rl_steps and self.group_size < 2:
            raise ValueError(
                "group_size=1 gives every rollout an advantage of 0 (its group's own mean is the baseline), so the RL "
                "stage would learn nothing: use group_size >= 2, or rl_steps=0 for the warm start only.")
        for name in ("warm_start_learning_rate", "rl_learning_rate"):
            check_float(name, getattr(self, name), low=0.0, low_open=True)
        for name in ("weight_decay", "cost_per_forward", "entropy_bonus"):
            check_float(name, getattr(self, name), low=0.0)


# ---------------------------------------------------------------------------------------------- oracle labels
def oracle_label(target_score: float, draft_score: float, same_answer: bool, rule: str = "answer") -> int:
    """1 (DRAFT acceptable) or 0 (TARGET needed) from the two branches' scores (see ``label_rule``).

    Example:
        >>> oracle_label(0.5, 1.0, False), oracle_label(1.0, 0.5, False), oracle_label(0.0, 0.0, True), oracle_label(0.0, 0.0, False)
        (1, 0, 1, 0)
        >>> oracle_label(0.5, 0.5, False), oracle_label(0.5, 0.5, False, rule="score")
        (0, 1)
    """
    check_choice("rule", rule, LABEL_RULES)
    if draft_score != target_score:
        return int(draft_score > target_score)
    return int(same_answer or (rule == "score" and target_score > 0))


@dataclass
class OracleLabels:
    """Features ``(N, F)`` of forked mismatches and their labels ``(N,)``; ``target_scores`` per prompt.

    ``harmless`` ``(N,)``: 1 where the draft branch scored at least as well as the target's (whatever the
    label rule) and ``target_positive`` where the target's own answer scored above 0 — together they say how
    often a mismatch is harmless to the task score on prompts the target gets (partly) right.
    """

    features: torch.Tensor
    labels: torch.Tensor
    target_scores: list[float] = field(default_factory=list)
    mismatches_seen: int = 0
    harmless: torch.Tensor | None = None
    target_positive: torch.Tensor | None = None

    def statistics(self) -> dict[str, Any]:
        """Label counts: DRAFT share, harmless share overall and where the target scored above 0."""
        out: dict[str, Any] = {"labels": len(self), "mismatches_seen": self.mismatches_seen,
                               "draft_share": float(self.labels.mean()) if len(self) else None}
        if self.harmless is not None and len(self):
            positive = self.target_positive.bool()
            out["harmless_share"] = float(self.harmless.mean())
            out["labels_where_target_scores"] = int(positive.sum())
            out["harmless_share_where_target_scores"] = float(self.harmless[positive].mean()) if positive.any() else None
        return out

    def __len__(self) -> int:
        return len(self.labels)


@torch.no_grad()
def collect_oracle_labels(
    model: PreTrainedModel,
    strategy: CoSpec,
    examples: Sequence[TaskExample],
    tokenizer: PreTrainedTokenizerBase,
    reward: str | Reward = "squad_f1",
    settings: ArbiterTrainingSettings | None = None,
) -> OracleLabels:
    """Fork-and-regenerate labels at the mismatches of strict decoding (AutoJudge's miner), with their features."""
    settings = settings or ArbiterTrainingSettings()
    reward_fn = resolve_reward(reward)
    unit = reward_fn.answer_unit
    stop_ids = stop_token_ids(model, tokenizer, settings.stop_at_newline)
    log = DecisionLog()

    def label_prompt(example: TaskExample) -> dict[str, Any]:
        log.clear()
        prompt_length = example.input_ids.shape[1]
        sequence = generate_answer(model, example.input_ids, tokenizer, max_new_tokens=settings.max_new_tokens,
                                   stop_ids=stop_ids, strategy=strategy, answer_unit=unit)
        target_answer = answer_text(tokenizer, sequence[prompt_length:], unit)
        target_score = reward_fn(target_answer, example.answers)
        decisions = [d for d in log.decisions if d.context is not None]
        forks = _spread(decisions, settings.max_forks_per_prompt)
        shared = prefix_cache(model, sequence) if forks else None  # prefill once; each fork reuses it
        found: dict[str, Any] = {"target_score": target_score, "seen": len(decisions), "features": [], "labels": [],
                                 "harmless": [], "positive": []}
        for decision in forks:
            position = len(decision.context) + decision.index  # strict: everything before it is greedy output
            prefix = torch.cat([sequence[:position], torch.tensor([decision.draft_token], device="cpu")]).unsqueeze(0)
            room = settings.max_new_tokens - (prefix.shape[1] - prompt_length)
            branch = (generate_answer(model, prefix, tokenizer, max_new_tokens=room, stop_ids=stop_ids,
                                      cache=_cropped(shared, position), answer_unit=unit, answer_start=prompt_length)
                      if room > 0 else prefix[0])
            draft_answer = answer_text(tokenizer, branch[prompt_length:], unit)
            draft_score = reward_fn(draft_answer, example.answers)
            label = oracle_label(target_score, draft_score,
                                 normalize_answer(draft_answer) == normalize_answer(target_answer), settings.label_rule)
            found["features"].append(decision.features)
            found["labels"].append(float(label))
            found["harmless"].append(float(draft_score >= target_score))
            found["positive"].append(float(target_score > 0))
        return found

    saved = strategy.mode, strategy.decision_log
    strategy.mode, strategy.decision_log = "strict", log
    try:  # each process labels its share of the prompts (torchrun); all get every label, in the prompts' order
        per_prompt = map_over_processes(label_prompt, examples, desc="oracle labels", unit="prompt")
    finally:
        strategy.mode, strategy.decision_log = saved
    width = strategy.arbiter.config.num_features
    features = [f for found in per_prompt for f in found["features"]]

    def joined(key: str) -> torch.Tensor:
        return torch.tensor([value for found in per_prompt for value in found[key]], device="cpu")

    return OracleLabels(
        torch.stack(features) if features else torch.zeros(0, width, device="cpu"), joined("labels"),
        [found["target_score"] for found in per_prompt], sum(found["seen"] for found in per_prompt),
        joined("harmless"), joined("positive"))


def _cropped(cache, length: int):
    """A copy of ``cache`` holding its first ``length`` positions (``None`` if it cannot be cropped: no reuse)."""
    if cache is None:
        return None
    fork = copy.deepcopy(cache)
    try:
        fork.crop(length - fork.get_seq_length())  # a negative count: tokens to remove (transformers 5)
    except (AttributeError, ValueError, RuntimeError, NotImplementedError):  # e.g. a sliding window already rolled over
        return None
    return fork if fork.get_seq_length() == length else None


def _spread(items: list, count: int) -> list:
    if len(items) <= count:
        return items
    return [items[round(i * (len(items) - 1) / max(1, count - 1))] for i in range(count)]


def fit_warm_start(arbiter: CoSpecArbiter, data: OracleLabels, settings: ArbiterTrainingSettings | None = None) -> dict[str, float]:
    """Standardise the inputs on ``data`` and fit class-balanced logistic regression (full batch, Adam)."""
    settings = settings or ArbiterTrainingSettings()
    if len(data) == 0:
        logger.warning("No oracle labels (no mismatch met): the warm start keeps the arbiter as it is.")
        return {"labels": 0}
    device = arbiter.feature_mean.device
    x, y = data.features.to(device), data.labels.to(device)
    arbiter.set_standardisation(x)
    positives = float(y.sum())
    weights = torch.where(y > 0, 0.5 / max(positives, 1.0), 0.5 / max(len(y) - positives, 1.0)) * len(y)
    optimizer = torch.optim.Adam(arbiter.parameters(), lr=settings.warm_start_learning_rate)
    arbiter.train()
    loss = torch.zeros((), device=device)
    for _ in range(settings.warm_start_steps):
        optimizer.zero_grad()
        loss = F.binary_cross_entropy_with_logits(arbiter(x), y, weight=weights)
        penalty = sum((p**2).sum() for n, p in arbiter.named_parameters() if n.endswith("weight"))
        (loss + settings.weight_decay * penalty / len(y)).backward()
        optimizer.step()
    arbiter.eval()
    with torch.no_grad():
        accuracy = float(((arbiter(x) > 0).float() == y).float().mean())
    return {"labels": len(y), "draft_share": positives / len(y), "loss": float(loss.detach()), "train_accuracy": accuracy}


@torch.no_grad()
def oracle_agreement(arbiter: CoSpecArbiter, data: OracleLabels, threshold: float | None = None) -> float | None:
    """Share of oracle labels the arbiter's decision (P(DRAFT) > threshold) agrees with; ``None`` without labels."""
    if len(data) == 0:
        return None
    threshold = arbiter.config.threshold if threshold is None else threshold
    probabilities = arbiter(data.features.to(arbiter.feature_mean.device)).sigmoid().cpu()
    return float(((probabilities > threshold).float() == data.labels).float().mean())


# ---------------------------------------------------------------------------------------------- RL
@dataclass
class Episode:
    """One rollout: the decisions' features ``(n, F)`` and actions ``(n,)`` (1 = DRAFT), and its reward."""

    features: torch.Tensor
    actions: torch.Tensor
    reward: float
    score: float = 0.0
    target_forwards: int = 0

    @classmethod
    def from_decisions(cls, decisions: list[Decision], reward: float, score: float, forwards: int, width: int) -> Episode:
        if not decisions:
            return cls(torch.zeros(0, width, device="cpu"), torch.zeros(0, device="cpu"), reward, score, forwards)
        return cls(torch.stack([d.features for d in decisions]), torch.tensor([float(d.keep_draft) for d in decisions], device="cpu"),
                   reward, score, forwards)


def reinforce_step(
    arbiter: CoSpecArbiter,
    optimizer: torch.optim.Optimizer,
    groups: Sequence[Sequence[Episode]],
    entropy_bonus: float = 0.01,
    accelerator=None,
) -> dict[str, float]:
    """One policy-gradient update from groups of episodes (one group per prompt; group-relative advantages).

    Example:
        >>> stats = reinforce_step(arbiter, torch.optim.AdamW(arbiter.parameters()), [[good, bad]])  # doctest: +SKIP
    """
    device = arbiter.feature_mean.device
    arbiter.train()
    optimizer.zero_grad()
    terms, entropies, used = [], [], 0
    for group in groups:
        rewards = torch.tensor([e.reward for e in group], dtype=torch.float32, device="cpu")
        advantages = rewards - rewards.mean()
        if len(group) > 1 and float(rewards.std()) > 1e-8:
            advantages = advantages / rewards.std()
        for episode, advantage in zip(group, advantages):
            if len(episode.actions) == 0:
                continue
            logits = arbiter(episode.features.to(device))
            log_prob = -F.binary_cross_entropy_with_logits(logits, episode.actions.to(device), reduction="sum")
            # Bernoulli entropy −p log p − (1 − p) log(1 − p), differentiated through p too: the bonus must move the
            # policy (as a BCE against a detached p its gradient σ(z) − p is exactly zero).
            probabilities = logits.sigmoid()
            entropy = -(probabilities * F.logsigmoid(logits) + (1 - probabilities) * F.logsigmoid(-logits)).mean()
            terms.append(-float(advantage) * log_prob)
            entropies.append(entropy)
            used += 1
    if not terms:
        arbiter.eval()
        return {"loss": 0.0, "episodes_with_decisions": 0}
    loss = torch.stack(terms).mean() - entropy_bonus * torch.stack(entropies).mean()
    if accelerator is not None:
        accelerator.backward(loss)
    else:
        loss.backward()
    optimizer.step()
    arbiter.eval()
    return {"loss": float(loss.detach()), "episodes_with_decisions": used}


@torch.no_grad()
def rollout(model, strategy: CoSpec, example: TaskExample, tokenizer, reward_fn: TaskReward,
            settings: ArbiterTrainingSettings, stop_ids: list[int]) -> Episode:
    """One sampled CoSpec generation of ``example``: its decisions and ``score − λ · target forwards``."""
    log = strategy.decision_log
    log.clear()
    unit = reward_fn.answer_unit
    sequence = generate_answer(model, example.input_ids, tokenizer, max_new_tokens=settings.max_new_tokens,
                               stop_ids=stop_ids, strategy=strategy, answer_unit=unit)
    score = reward_fn(answer_text(tokenizer, sequence[example.input_ids.shape[1]:], unit), example.answers)
    forwards = strategy.last_metrics.target_forwards
    return Episode.from_decisions(log.decisions, score - settings.cost_per_forward * forwards, score, forwards,
                                  strategy.arbiter.config.num_features)


def run_reinforce(
    model: PreTrainedModel,
    arbiter: CoSpecArbiter,
    strategy: CoSpec,
    examples: Sequence[TaskExample],
    tokenizer: PreTrainedTokenizerBase,
    reward: str | Reward,
    settings: ArbiterTrainingSettings,
) -> list[dict[str, Any]]:
    """The RL stage: ``rl_steps`` updates of ``rl_prompts_per_step`` prompts × ``group_size`` rollouts each."""
    from accelerate import Accelerator

    reward_fn = resolve_reward(reward)
    stop_ids = stop_token_ids(model, tokenizer, settings.stop_at_newline)
    accelerator = Accelerator(device_placement=False)
    optimizer = torch.optim.AdamW(arbiter.parameters(), lr=settings.rl_learning_rate, weight_decay=settings.weight_decay)
    optimizer = accelerator.prepare_optimizer(optimizer, device_placement=False)
    # Each process samples its own prompts' rollouts from its own stream (torchrun), not copies of one.
    generator = torch.Generator(device=model.device).manual_seed(settings.seed + process_rank())
    order = random.Random(settings.seed)
    saved = strategy.mode, strategy.decision_log, strategy.generator
    strategy.mode, strategy.decision_log, strategy.generator = "sample", DecisionLog(), generator
    history = []
    started = time.perf_counter()
    try:
        for step in progress_bar(range(1, settings.rl_steps + 1), desc="CoSpec RL", unit="step"):
            prompts = order.sample(list(examples), min(settings.rl_prompts_per_step, len(examples)))
            # Each process rolls out its share of the prompts; every one then takes the same update on all groups.
            groups = map_over_processes(
                lambda ex: [rollout(model, strategy, ex, tokenizer, reward_fn, settings, stop_ids)
                            for _ in range(settings.group_size)], prompts)
            stats = reinforce_step(arbiter, optimizer, groups, settings.entropy_bonus, accelerator)
            episodes = [e for g in groups for e in g]
            decisions = sum(len(e.actions) for e in episodes)
            entry = {
                "step": step,
                "loss": round(stats["loss"], 5),
                "reward": round(sum(e.reward for e in episodes) / len(episodes), 5),
                "score": round(sum(e.score for e in episodes) / len(episodes), 5),
                "target_forwards": round(sum(e.target_forwards for e in episodes) / len(episodes), 3),
                "draft_decision_rate": round(sum(float(e.actions.sum()) for e in episodes) / max(1, decisions), 4),
                "seconds": round(time.perf_counter() - started, 1),
            }
            history.append(entry)
            logger.info("%s", entry)  # Trainer-style: one dict per logged step
    finally:
        strategy.mode, strategy.decision_log, strategy.generator = saved
    return history


# ---------------------------------------------------------------------------------------------- entry point
def train_arbiter(
    model: PreTrainedModel,
    drafter_or_draft_model: PreTrainedModel | str | None,
    task_dataset: Sequence[Any],
    reward: str | Reward = "squad_f1",
    *,
    tokenizer: PreTrainedTokenizerBase,
    config: ArbiterConfig | None = None,
    arbiter: CoSpecArbiter | None = None,
    settings: ArbiterTrainingSettings | None = None,
    num_draft_tokens: int = 8,
    use_ngram: bool = False,
    min_ngram_size: int = 1,
    draft_tokenizer: PreTrainedTokenizerBase | str | os.PathLike | None = None,
    data_description: str | None = None,
    held_out: Sequence[Any] | None = None,
    target_keep: float = 0.99,
) -> CoSpecArbiter:
    """Train a CoSpec arbiter for ``model`` with this drafter on a task with reference answers.

    Args:
        model: The target (frozen).
        drafter_or_draft_model: A draft causal LM (or its path / Hub id), or ``None`` / ``"ngram"`` for n-gram
            prompt lookup.
        task_dataset: Items with ``answers`` and ``input_ids`` (or a ``prompt`` string); see :func:`task_examples`.
        reward: a name of :data:`REWARDS` (``"squad_f1"``, ``"squad_exact_match"``, ``"lambada_accuracy"``), a
            :class:`TaskReward` or a callable ``(answer_text, answers) -> float`` (scored on the first line).
        tokenizer: The target's tokenizer (decodes answers; its fingerprint is saved with the arbiter).
        config / arbiter: Settings of a fresh arbiter, or an arbiter to continue training.
        settings: :class:`ArbiterTrainingSettings` (forks, warm start, RL steps, λ = ``cost_per_forward``).
        num_draft_tokens, use_ngram, min_ngram_size, draft_tokenizer: Drafting (as :class:`~.strategy.CoSpec`,
            recorded in the arbiter's config); a draft with
            another tokenizer needs ``draft_tokenizer`` (a tokenizer, folder or Hub id). The arbiter then records
            it (``config.draft_tokenizer_fingerprint``, and its ``name_or_path`` as
            ``config.draft_tokenizer_name_or_path``), so its saved folder drafts through it without being told and
            refuses a draft tokenizer of another vocabulary; name it (load it from a folder or Hub id) for the folder
            to load it.
        held_out / target_keep: Prompts disjoint from ``task_dataset`` to calibrate the threshold on afterwards
            (:func:`~.calibration.calibrate_arbiter`: the loosest threshold keeping ``target_keep`` of strict
            decoding's score there, else strict). Recommended: an uncalibrated arbiter can lose quality. Malformed
            held-out prompts are refused before training starts; if the calibration itself fails after training
            (e.g. the target scores 0 on the held-out prompts, or an out-of-memory error), the trained arbiter is
            still returned, uncalibrated: a WARNING gives the reason, ``config.training["calibration_error"]``
            records it, ``config.calibration`` is ``None`` and ``config.threshold`` keeps its configured value
            (``0.5`` by default). Calibrate it then with :func:`~.calibration.calibrate_arbiter`.

    Returns:
        The trained arbiter; ``arbiter.config.training`` holds the summary and the RL log history, and
        ``arbiter.config.calibration`` the held-out calibration (``None`` without ``held_out`` or when it failed;
        training an arbiter again drops the calibration of its former weights).
    """
    if not isinstance(model, PreTrainedModel):
        raise InvalidArgumentTypeError(f"model must be the target causal LM (PreTrainedModel), got {type(model).__name__}.")
    if not isinstance(tokenizer, PreTrainedTokenizerBase):
        raise InvalidArgumentTypeError(f"tokenizer must be the target's tokenizer, got {type(tokenizer).__name__}.")
    if isinstance(draft_tokenizer, (str, os.PathLike)):
        draft_tokenizer = AutoTokenizer.from_pretrained(draft_tokenizer)
    elif draft_tokenizer is not None and not isinstance(draft_tokenizer, PreTrainedTokenizerBase):
        raise InvalidArgumentTypeError(
            f"draft_tokenizer must be the draft model's tokenizer, a folder or a Hub id, got {type(draft_tokenizer).__name__}.")
    reward_fn = resolve_reward(reward)
    check_float("target_keep", target_keep, low=0.0, high=1.0, low_open=True,
                hint="It is the share of strict decoding's score to keep on held_out, e.g. 0.99.")
    settings = settings or ArbiterTrainingSettings()
    if not isinstance(settings, ArbiterTrainingSettings):
        raise InvalidArgumentTypeError(f"settings must be ArbiterTrainingSettings, got {type(settings).__name__}.")
    if config is not None and not isinstance(config, ArbiterConfig):
        raise InvalidArgumentTypeError(f"config must be an ArbiterConfig (ArbiterConfig(**values) for a dict), got "
                                       f"{type(config).__name__}.")
    examples = task_examples(task_dataset, tokenizer)
    if held_out is not None:  # refuse malformed held-out prompts now, not after the whole training run
        from ..calibration import HeldOut

        if isinstance(held_out, (str, bytes, Mapping)):  # list() would make prompts of its letters or keys
            raise InvalidArgumentTypeError(
                f"held_out must be a list of prompts (dicts with 'prompt' or 'input_ids', and 'answers'), got "
                f"{type(held_out).__name__}.")
        held_out = held_out if isinstance(held_out, (list, tuple)) else list(held_out)  # read twice: here and below
        HeldOut.prepare(model, held_out, tokenizer, reward_fn, target_keep=target_keep,
                        max_new_tokens=settings.max_new_tokens, stop_at_newline=settings.stop_at_newline)
    draft = None if drafter_or_draft_model == "ngram" else drafter_or_draft_model
    if arbiter is None:
        with torch.random.fork_rng(devices=[]):  # the init (on the CPU) follows settings.seed, not the global RNG
            torch.manual_seed(settings.seed)
            arbiter = CoSpecArbiter.for_model(model, config, tokenizer)
    else:
        arbiter.check_compatible(model, tokenizer)
        record_base_model(arbiter.config, model)  # an arbiter saved before identities were recorded gets one
    # Built (its drafting arguments checked) before they are recorded in a given arbiter's config.
    pair = dict(tokenizer=tokenizer, draft_tokenizer=draft_tokenizer) if draft_tokenizer is not None else {}
    strategy = CoSpec(arbiter, draft_model=draft, num_draft_tokens=num_draft_tokens, use_ngram=use_ngram,
                      min_ngram_size=min_ngram_size, **pair)
    arbiter.config.num_draft_tokens, arbiter.config.use_ngram = num_draft_tokens, use_ngram
    arbiter.config.min_ngram_size = min_ngram_size
    arbiter.config.draft_model_name_or_path = draft if isinstance(draft, str) else (
        getattr(draft, "name_or_path", None) or None)
    arbiter.config.tokenizer_name_or_path = tokenizer.name_or_path or arbiter.config.tokenizer_name_or_path
    # A draft with another vocabulary: recorded, so the saved folder drafts through its tokenizer (and refuses another).
    cross = (draft is not None and draft_tokenizer is not None
             and tokenizer_fingerprint(draft_tokenizer) != tokenizer_fingerprint(tokenizer))
    arbiter.config.draft_tokenizer_fingerprint = tokenizer_fingerprint(draft_tokenizer) if cross else None
    arbiter.config.draft_tokenizer_name_or_path = (draft_tokenizer.name_or_path or None) if cross else None
    started = time.perf_counter()
    with kept_trainability(model):
        model.requires_grad_(False)
        logger.info("CoSpec: oracle labels on %d prompts", len(examples))
        oracle = collect_oracle_labels(model, strategy, examples, tokenizer, reward_fn, settings)
        warm = fit_warm_start(arbiter, oracle, settings)
        logger.info("CoSpec warm start: %s", warm)
        history = run_reinforce(model, arbiter, strategy, examples, tokenizer, reward_fn, settings) if settings.rl_steps else []
    arbiter.eval()
    arbiter.config.training = {
        "data": data_description,
        "prompts": len(examples),
        "drafter": "ngram" if draft is None else "model",  # a model without a name cannot be recorded above
        "reward": reward if isinstance(reward, str) else getattr(reward, "__name__", "custom"),
        "mismatches_seen": oracle.mismatches_seen,
        "oracle_labels": len(oracle),
        "oracle": oracle.statistics(),
        "warm_start": {k: (round(v, 4) if isinstance(v, float) else v) for k, v in warm.items()},
        "target_score_strict": round(sum(oracle.target_scores) / max(1, len(oracle.target_scores)), 4),
        "settings": asdict(settings),
        "log_history": history,
        "train_seconds": round(time.perf_counter() - started, 1),
    }
    arbiter.config.calibration = None  # a calibration of the weights before this training no longer holds
    if not all(torch.isfinite(p).all() for p in arbiter.parameters()):
        raise RuntimeError("Arbiter training diverged (non-finite weights); lower the learning rates.")
    if held_out is not None:
        from .calibration import calibrate_arbiter

        try:
            calibrate_arbiter(arbiter, model, draft, held_out, target_keep, tokenizer=tokenizer, reward=reward,
                              max_new_tokens=settings.max_new_tokens, stop_at_newline=settings.stop_at_newline,
                              num_draft_tokens=num_draft_tokens, use_ngram=use_ngram, min_ngram_size=min_ngram_size,
                              draft_tokenizer=draft_tokenizer)
        except Exception as error:  # noqa: BLE001 - whatever failed, the trained arbiter must not be lost with it
            reason = f"{type(error).__name__}: {error}"
            arbiter.config.training["calibration_error"] = reason
            logger.warning(
                "CoSpec: the calibration on held_out failed after training (%s). The trained arbiter is returned "
                "uncalibrated, at threshold %s (its config's; arbiter.config.calibration is None): save it now, then "
                "calibrate it with calibrate_arbiter(arbiter, model, draft, held_out_prompts, target_keep, "
                "tokenizer=...) (or arbiter.calibrate(...)) on held-out prompts the target answers.",
                reason, arbiter.config.threshold, exc_info=not isinstance(error, ValueError))
    if process_count() > 1:
        # Every process took the same updates on the same gathered rollouts, and calibrated alike; rank 0's result is
        # kept everywhere, exactly, so that a GPU's last-bit differences cannot leave the replicas apart.
        kept = broadcast_from_main({"state": {k: v.detach().cpu() for k, v in arbiter.state_dict().items()},
                                    "training": arbiter.config.training, "calibration": arbiter.config.calibration,
                                    "threshold": arbiter.config.threshold})
        arbiter.load_state_dict(kept["state"])
        arbiter.config.training, arbiter.config.calibration = kept["training"], kept["calibration"]
        arbiter.config.threshold = kept["threshold"]
    return arbiter
