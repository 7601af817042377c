"""Zero-shot multiple-choice accuracy (ARC, PIQA, HellaSwag, BoolQ, Winogrande), lm-eval compatible.

Every answer option is scored by the log-likelihood of its continuation given its context, exactly as
EleutherAI's lm-evaluation-harness 0.4 does for ``output_type: multiple_choice``:

* ``acc``: the option with the highest summed log-likelihood is the prediction;
* ``acc_norm``: the same after dividing each log-likelihood by the option's length in *characters*
  (lm-eval's ``len(choice)``, the option text without the leading space), for the tasks whose lm-eval
  config reports it (ARC, PIQA, HellaSwag); ``None`` for BoolQ and Winogrande;
* tokenization follows lm-eval's ``HFLM``: trailing spaces of the context move to the continuation,
  ``tokenizer.encode(context + continuation)`` is split after ``len(tokenizer.encode(context))``
  tokens, and the tokenizer's own special-token behaviour decides about BOS (``encode``'s default
  ``add_special_tokens=True``, skipped when the text already starts with the BOS string).

Task data and prompts come from :mod:`hf_compress.assets.zero_shot` (offline, lm-eval prompt formats). Every task
is scored on its *validation* split (the records say so). lm-eval scores the same split for PIQA, HellaSwag, BoolQ
and Winogrande, but ``arc_easy`` / ``arc_challenge`` on the ARC *test* split (2,376 / 1,172 questions), which is not
available offline: ARC numbers here are validation-split numbers (570 / 299 questions), comparable with each other,
not with published lm-eval ARC scores.

Two scoring backends give the same numbers (checked to float tolerance in ``tests/test_zero_shot.py``):

* ``"native"`` (default): a batched scorer written for CPU throughput. Requests sharing a context
  (the 4 ARC/HellaSwag options, the 2 BoolQ answers) run the context **once**, then score all their
  continuations against its KV cache, in chunks of similar length; logits are computed only where
  continuation tokens are predicted (``logits_to_keep``, or the short cached rows) and ``log_softmax``
  only at the scored positions. Pass ``share_context=False`` for models without a usable KV cache.
* ``"lm_eval"``: ``lm_eval.models.huggingface.HFLM.loglikelihood`` on the in-memory model (needs the
  ``eval`` extra). It works offline with transformers 5.23 and lm-eval 0.4.13, but it recomputes a
  shared context for every option and applies ``log_softmax`` over the full vocabulary at every
  position, so it is slower here (measurements below).
"""

from __future__ import annotations

import copy
import inspect
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import _compat
from ..assets.zero_shot import PROMPT_FORMATS, TASK_DATASETS, ZERO_SHOT_TASKS, load_zero_shot_task
from ..modeling.layers import evaluation_mode
from ..utils import (
    InvalidArgumentTypeError,
    check_bool,
    check_choice,
    check_int,
    check_seed,
    get_logger,
    is_main_process,
    progress_bar,
)
from .results import MetricRecord
from .uncertainty import standard_error


logger = get_logger(__name__)

# Why "native" is the default (SmolLM2-135M fp32, 2 CPU cores, batch size 32, first 100 docs of the
# seed-1234 permutation): ARC-Easy (400 requests) native 12.7 s vs HFLM 23.6 s; HellaSwag (400 requests)
# native 38.8 s vs HFLM 65.9 s; log-likelihoods agree to <1e-4 (absolute, summed over the continuation).

# lm-eval's metric of record per task (``acc_norm`` where its task YAML reports it, else ``acc``).
PRIMARY_METRIC: dict[str, str] = {
    "arc_easy": "acc_norm",
    "arc_challenge": "acc_norm",
    "piqa": "acc_norm",
    "hellaswag": "acc_norm",
    "boolq": "acc",
    "winogrande": "acc",
}
_HAS_ACC_NORM = frozenset(task for task, metric in PRIMARY_METRIC.items() if metric == "acc_norm")
_DEFAULT_MAX_LENGTH = 2048  # lm-eval's fallback when neither config nor tokenizer names a context length


# --- tokenization (lm-eval conventions) -----------------------------------------------------------------


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of ``(context, continuation)`` split the way lm-eval's ``HFLM`` splits them.

    Trailing whitespace of the context is moved to the continuation, the whole string is encoded, and
    the continuation is what follows the separately encoded context. An empty context becomes the
    tokenizer's BOS (or EOS) token.

    Example:
        >>> from hf_compress.assets.tiny_models import tiny_tokenizer
        >>> encode_pair(tiny_tokenizer(), "Answer: ", "yes")
        ([65, 110, 115, 119, 101, 114, 58], [32, 121, 101, 115])
    """
    if context == "":
        continuation_ids = tokenizer.encode(continuation, add_special_tokens=False)
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if continuation_ids and continuation_ids[0] == prefix:
            return continuation_ids[:1], continuation_ids[1:]
        return [prefix], continuation_ids
    stripped = context.rstrip()
    if len(stripped) < len(context):
        continuation = context[len(stripped) :] + continuation
        context = stripped
    whole = _encode(tokenizer, context + continuation)
    context_ids = _encode(tokenizer, context)
    return context_ids, whole[len(context_ids) :]


def _encode(tokenizer, text: str) -> list[int]:
    # HFLM.tok_encode: the tokenizer's default special tokens, unless the text already starts with BOS.
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if bos is not None and text.startswith(tokenizer.decode([bos])):
        return tokenizer.encode(text, add_special_tokens=False)
    return tokenizer.encode(text)


def model_max_length(model, tokenizer=None) -> int:
    """The context length lm-eval would use for ``model`` (config, then tokenizer, then 2048).

    Example:
        >>> from hf_compress.assets.tiny_models import tiny_model
        >>> model_max_length(*tiny_model("llama"))
        512
    """
    config = getattr(model.config, "text_config", None) or model.config
    for name in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, name, None)
        if value is not None:
            return int(value)
    limit = getattr(tokenizer, "model_max_length", None)
    if limit is not None and limit < 1e12:  # tokenizers say ~1e30 when they do not know
        return int(limit)
    return _DEFAULT_MAX_LENGTH


# --- scoring --------------------------------------------------------------------------------------------


def loglikelihoods(
    model,
    tokenizer,
    requests: Sequence[tuple[str, str]],
    *,
    batch_size: int = 32,
    backend: str = "native",
    share_context: bool = True,
    max_length: int | None = None,
    progress: bool = True,
    desc: str = "log-likelihoods",
) -> list[float]:
    """Summed log-probability of each ``continuation`` given its ``context``, for a causal LM.

    Args:
        model: a causal LM (``AutoModelForCausalLM``), used as is (device and dtype untouched), in eval mode
            (its mode is restored after).
        tokenizer: its tokenizer.
        requests: ``(context, continuation)`` pairs.
        batch_size: continuations scored per forward pass.
        backend: ``"native"`` (default) or ``"lm_eval"`` (lm-eval's ``HFLM``; needs ``lm-eval``).
        share_context: native backend only: run a context shared by several requests once and score
            its continuations from the KV cache (same numbers, fewer FLOPs). ``False`` runs every
            request as one padded sequence, like lm-eval.
        max_length: context window; longer inputs lose tokens on the left, as in lm-eval
            (default: :func:`model_max_length`).
        progress: show a tqdm bar.

    Example:
        >>> from hf_compress.assets.tiny_models import tiny_model
        >>> model, tokenizer = tiny_model("llama")
        >>> scores = loglikelihoods(model, tokenizer, [("The sky is", " blue"), ("The sky is", " green")])
        >>> len(scores)
        2
    """
    if backend == "lm_eval":
        with evaluation_mode(model):  # dropout off (a model left in training mode after Trainer.train())
            return _lm_eval_loglikelihoods(model, tokenizer, requests, batch_size, max_length, progress)
    if backend != "native":
        raise ValueError(f"backend must be 'native' or 'lm_eval', got {backend!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    max_length = max_length or model_max_length(model, tokenizer)
    encoded = _encode_requests(tokenizer, requests, max_length)
    groups = _group(encoded, share_context)
    scores = [0.0] * len(requests)
    bar = progress_bar(total=len(requests), desc=desc, disable=not progress, leave=False)
    # Eval mode inside (the caller's mode restored after): a model left in training mode would score through dropout.
    with torch.inference_mode(), evaluation_mode(model), bar:
        for batch in _batches(groups, batch_size):
            for index, value in _score_batch(model, batch):
                scores[index] = value
            bar.update(sum(len(group.requests) for group in batch))
    return scores


_Encoded = tuple[tuple[int, ...], tuple[int, ...]]  # (context ids, continuation ids)


def _encode_requests(tokenizer, requests: Sequence[tuple[str, str]], max_length: int) -> list[_Encoded]:
    encoded: list[_Encoded] = []
    cache: dict[tuple[str, str], tuple[list[int], list[int]]] = {}
    truncated = 0
    for context, continuation in requests:
        key = (context, continuation)
        if key not in cache:
            cache[key] = encode_pair(tokenizer, context, continuation)
        context_ids, continuation_ids = cache[key]
        if not continuation_ids:
            raise ValueError(f"Continuation {continuation!r} encodes to no tokens after {context[-40:]!r}.")
        if len(continuation_ids) > max_length:
            raise ValueError(
                f"A {len(continuation_ids)}-token continuation exceeds the {max_length}-token window."
            )
        # lm-eval keeps the last max_length + 1 tokens of context + continuation (the last one is a target).
        keep = max_length + 1 - len(continuation_ids)
        if len(context_ids) > keep:
            context_ids, truncated = context_ids[-keep:], truncated + 1
        encoded.append((tuple(context_ids), tuple(continuation_ids)))
    if truncated:
        logger.warning("%d requests exceeded the %d-token window; their context was cut on the left.",
                       truncated, max_length)
    return encoded


@dataclass
class _Group:
    """Requests scored from one forward pass over ``prefix`` (possibly empty) and one row each."""

    prefix: tuple[int, ...]
    # request index -> (row input ids, target ids); the targets are predicted by the last positions.
    requests: dict[int, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)

    @property
    def cost(self) -> int:
        return len(self.prefix) + max(len(row) for row, _ in self.requests.values())


def _group(encoded: list[_Encoded], share_context: bool) -> list[_Group]:
    by_context: dict[tuple[int, ...], list[int]] = {}
    for index, (context_ids, _) in enumerate(encoded):
        by_context.setdefault(context_ids if share_context else (index,), []).append(index)
    groups = []
    for members in by_context.values():
        context_ids = encoded[members[0]][0]
        if len(members) == 1 or len(context_ids) < 2:
            # Nothing to share: one sequence per request, context + continuation minus its last token.
            for index in members:
                row_context, continuation_ids = encoded[index]
                groups.append(_Group((), {index: (row_context + continuation_ids[:-1], continuation_ids)}))
        else:
            # The prefix (context minus its last token) fills the KV cache once; each row then feeds the
            # last context token and the continuation, so its logits predict exactly the continuation.
            group = _Group(context_ids[:-1])
            for index in members:
                continuation_ids = encoded[index][1]
                group.requests[index] = (context_ids[-1:] + continuation_ids[:-1], continuation_ids)
            groups.append(group)
    # Longest first (as lm-eval): the first batch shows the worst-case memory; time estimates err long.
    groups.sort(key=lambda group: (bool(group.prefix), group.cost), reverse=True)
    return groups


def _batches(groups: list[_Group], batch_size: int):
    batch: list[_Group] = []
    rows = 0
    for group in groups:
        # Groups with and without a shared prefix go in separate batches: the latter need a single pass.
        full = rows + len(group.requests) > batch_size
        if batch and (full or bool(group.prefix) != bool(batch[0].prefix)):
            yield batch
            batch, rows = [], 0
        batch.append(group)
        rows += len(group.requests)
    if batch:
        yield batch


def _pad(sequences: Sequence[Sequence[int]], device, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    # Pad id 0 is arbitrary: padded positions are masked out and never scored.
    width = max(len(seq) for seq in sequences)
    # Built on the CPU (one small copy per row), then moved to the model in one transfer.
    ids = torch.zeros(len(sequences), width, dtype=torch.long, device="cpu")
    mask = torch.zeros(len(sequences), width, dtype=torch.long, device="cpu")
    for i, seq in enumerate(sequences):
        if seq:
            span = slice(width - len(seq), width) if left else slice(0, len(seq))
            ids[i, span] = torch.tensor(seq, dtype=torch.long, device="cpu")
            mask[i, span] = 1
    return ids.to(device), mask.to(device)


# Fixed cost of one forward pass, in tokens' worth of compute: SmolLM2-135M on 2 CPU cores takes ~0.08 s
# for a pass plus ~1.6 ms per token, i.e. a pass costs as much as ~50 extra tokens.
_PASS_COST_TOKENS = 64


def _score_batch(model, batch: list[_Group]) -> list[tuple[int, float]]:
    device = model.device
    # Unique rows: requests whose rows coincide (one-token answers " no"/" yes" after the same context)
    # share one row and differ only in the target they read from its logits.
    row_index: dict[tuple[int, tuple[int, ...]], int] = {}
    rows: list[tuple[int, ...]] = []
    row_group: list[int] = []
    lookups: list[tuple[int, int, tuple[int, ...]]] = []  # (request index, row, targets)
    for g, group in enumerate(batch):
        for index, (row, targets) in group.requests.items():
            if (g, row) not in row_index:
                row_index[g, row] = len(rows)
                rows.append(row)
                row_group.append(g)
            lookups.append((index, row_index[g, row], targets))

    if not batch[0].prefix:
        # One pass, left padded: the scored positions are the last ones of every row, so logits_to_keep
        # skips the lm_head (and the log_softmax) everywhere else.
        ids, mask = _pad(rows, device, left=True)
        keep = max(len(targets) for _, _, targets in lookups)
        logits = _forward(model, ids, mask, _positions(mask), logits_to_keep=keep)[:, -keep:]
        wanted = [(index, row, targets, keep - len(targets)) for index, row, targets in lookups]
        return _gather_scores(logits, wanted)

    # Pass 1 fills the KV cache with each group's shared prefix (left padded; no logits needed).
    prefix_ids, prefix_mask = _pad([group.prefix for group in batch], device, left=True)
    past = _forward(
        model, prefix_ids, prefix_mask, _positions(prefix_mask),
        logits_to_keep=1, use_cache=True, return_cache=True,
    )
    # Pass 2 runs the rows against that cache, in chunks of similar length: options of one question can
    # differ a lot in length, and padding every row to the longest wasted ~40% of the compute on ARC.
    by_row: dict[int, list[tuple[int, int, tuple[int, ...]]]] = {}
    for index, row, targets in lookups:
        by_row.setdefault(row, []).append((index, row, targets))
    lengths = [len(row) for row in rows]
    chunks = _length_chunks(sorted(range(len(rows)), key=lengths.__getitem__), lengths)
    results = []
    for n, chunk in enumerate(chunks):
        # batch_select_indices works in place; keep the pass-1 cache intact for the chunks still to come.
        cache = past if n == len(chunks) - 1 else copy.deepcopy(past)
        groups = torch.tensor([row_group[r] for r in chunk], dtype=torch.long, device=device)
        cache.batch_select_indices(groups)
        chunk_mask = prefix_mask[groups]
        # Right padding: each row must directly follow its cached prefix. Sliding-window attention
        # (Gemma 3, Mistral) counts distance in cache slots, so padding in between would hide tokens.
        ids, mask = _pad([rows[r] for r in chunk], device, left=False)
        # Padding slots repeat the row's last real position: counting on past it could leave the position table of a
        # model with learned positions (GPT-2, OPT) although every request fits.
        positions = chunk_mask.sum(-1, keepdim=True) + (mask.cumsum(-1) - 1).clamp(min=0)
        attention_mask = torch.cat([chunk_mask, mask], dim=-1)
        logits = _forward(model, ids, attention_mask, positions, use_cache=True, **{_compat.cache_kwarg_name(model): cache})
        wanted = [
            (index, slot, targets, lengths[r] - len(targets))
            for slot, r in enumerate(chunk)
            for index, _, targets in by_row[r]
        ]
        results += _gather_scores(logits, wanted)
    return results


def _positions(mask: torch.Tensor) -> torch.Tensor:
    # Left padding: real tokens get positions 0, 1, ... whatever the amount of padding before them.
    return (mask.cumsum(-1) - 1).clamp(min=0)


def _length_chunks(order: list[int], lengths: list[int]) -> list[list[int]]:
    """Split rows (``order`` sorts them by length) into runs minimising padded tokens plus pass costs."""
    sizes = [lengths[r] for r in order]
    n = len(sizes)
    best = [0.0] + [math.inf] * n  # best[j]: cheapest split of the j shortest rows
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j):
            cost = best[i] + (j - i) * sizes[j - 1] + _PASS_COST_TOKENS
            if cost < best[j]:
                best[j], cut[j] = cost, i
    chunks, j = [], n
    while j > 0:
        chunks.append(order[cut[j] : j])
        j = cut[j]
    return chunks[::-1]


def _forward(model, ids, mask, positions, *, logits_to_keep: int = 0, return_cache: bool = False, **kwargs):
    if logits_to_keep and _accepts_logits_to_keep(model):
        kwargs["logits_to_keep"] = logits_to_keep
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, **kwargs)
    return _compat.cache_of_output(out) if return_cache else out.logits


def _accepts_logits_to_keep(model) -> bool:
    parameters = inspect.signature(model.forward).parameters
    return "logits_to_keep" in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())


def _gather_scores(
    logits: torch.Tensor, lookups: list[tuple[int, int, tuple[int, ...], int]]
) -> list[tuple[int, float]]:
    """Sum of target log-probs per ``(request index, row in logits, targets, first position)``."""
    device = logits.device
    rows, positions, targets, owners = [], [], [], []
    for slot, (_, row, target_ids, start) in enumerate(lookups):
        rows += [row] * len(target_ids)
        positions += range(start, start + len(target_ids))
        targets += target_ids
        owners += [slot] * len(target_ids)
    # Select the scored positions first so log_softmax runs over (scored tokens x vocab) only.
    selected = logits[torch.tensor(rows, device=device), torch.tensor(positions, device=device)]
    logprobs = torch.log_softmax(selected.float(), dim=-1)
    token_scores = logprobs.gather(-1, torch.tensor(targets, device=device)[:, None]).squeeze(-1)
    totals = torch.zeros(len(lookups), dtype=torch.float64, device=device)
    totals.index_add_(0, torch.tensor(owners, device=device), token_scores.double())
    return [(lookup[0], float(total)) for lookup, total in zip(lookups, totals.tolist())]


def _lm_eval_loglikelihoods(model, tokenizer, requests, batch_size, max_length, progress) -> list[float]:
    try:
        from lm_eval.api.instance import Instance
        from lm_eval.models.huggingface import HFLM
    except ImportError as err:
        raise ImportError(
            "backend='lm_eval' needs lm-evaluation-harness: pip install 'hf-compress[eval]'"
        ) from err
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
    instances = [
        Instance(request_type="loglikelihood", doc={}, arguments=(context, continuation), idx=i)
        for i, (context, continuation) in enumerate(requests)
    ]
    return [float(score) for score, _ in lm.loglikelihood(instances, disable_tqdm=not progress or not is_main_process())]


# --- evaluation -----------------------------------------------------------------------------------------


def evaluate_zero_shot(
    model,
    tokenizer,
    tasks: Sequence[str] = ZERO_SHOT_TASKS,
    limit: int | None | Mapping[str, int | None] = None,
    *,
    seed: int = 1234,
    batch_size: int = 32,
    backend: str = "native",
    share_context: bool = True,
    progress: bool = True,
    return_per_example: bool = False,
) -> dict[str, Any]:
    """Zero-shot multiple-choice accuracy of a causal LM on offline copies of the standard tasks.

    Args:
        model: a causal LM in eval mode (moved nowhere; its device and dtype are used as they are).
        tokenizer: its tokenizer.
        tasks: names from :data:`~hf_compress.assets.zero_shot.ZERO_SHOT_TASKS`.
        limit: ``None`` for the full validation splits, an ``int`` for a fixed subset of every task, or a
            ``{task: int | None}`` mapping (a task it leaves out gets its full split). A subset is the first ``limit`` rows of the seeded permutation
            described in :mod:`hf_compress.assets.zero_shot`.
        seed: seed of that permutation.
        batch_size: continuations scored per forward pass.
        backend: ``"native"`` or ``"lm_eval"`` (see :func:`loglikelihoods`).
        share_context: native backend: score all options of a question from one pass over its context.
        progress: show tqdm bars.
        return_per_example: add ``per_example`` to every task: 1.0 / 0.0 per example for its metric of record, in
            subset order (for paired differences between models scored on the same examples).

    Returns:
        ``{task: {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "metric", "score", "n", "limit",
        "seed", "prompt_format", "dataset", "dataset_config", "split", "num_fewshot", "seconds"},
        "subset", "average": {"score", "acc", "metric", "metrics", "tasks"}, "config": {...}}``.
        ``metric`` is lm-eval's metric of record (``acc_norm`` for ARC/PIQA/HellaSwag, ``acc`` for
        BoolQ/Winogrande) and ``score`` its value; ``average["score"]`` averages these and
        ``average["acc"]`` the plain accuracies. ``acc_norm`` is ``None`` where lm-eval does not define
        it. Accuracies are fractions; ``subset`` says in words which examples were used.

    Example:
        >>> from hf_compress.assets import load_reference_model
        >>> model, tokenizer = load_reference_model("smollm2-135m")  # doctest: +SKIP
        >>> results = evaluate_zero_shot(model, tokenizer, ("arc_easy", "piqa"), limit=500)  # doctest: +SKIP
        >>> round(results["arc_easy"]["acc_norm"], 2)  # doctest: +SKIP
        0.43
    """
    if isinstance(tasks, str):  # one task name, not a sequence of one-letter names
        tasks = (tasks,)
    if not isinstance(tasks, Sequence) or not all(isinstance(task, str) for task in tasks):
        raise InvalidArgumentTypeError(
            f"tasks must be a list of task names ({', '.join(ZERO_SHOT_TASKS)}), got {tasks!r}."
        )
    unknown = [task for task in tasks if task not in PRIMARY_METRIC]
    if unknown:
        raise ValueError(f"Unknown zero-shot task(s) in tasks: {unknown}; choose from {', '.join(ZERO_SHOT_TASKS)}.")
    limits = limit.values() if isinstance(limit, Mapping) else (limit,)
    for value in limits:
        check_int("limit", value, minimum=1, allow_none=True,
                  hint="Pass None (full split), an int, or a {task: int | None} mapping; leave a task out of tasks "
                       "to skip it.")
    if isinstance(limit, Mapping) and set(limit) - set(tasks):
        raise ValueError(
            f"limit names {sorted(set(limit) - set(tasks))}, not in tasks {list(tasks)}: add them to tasks or drop "
            "them from limit (a task the mapping leaves out is scored on its full split)."
        )
    check_seed("seed", seed, numpy=True)
    check_int("batch_size", batch_size, minimum=1)
    check_choice("backend", backend, ("native", "lm_eval"))
    check_bool("share_context", share_context)
    check_bool("progress", progress)
    check_bool("return_per_example", return_per_example)
    results: dict[str, Any] = {}
    with evaluation_mode(model):
        for task in tasks:
            task_limit = limit.get(task) if isinstance(limit, Mapping) else limit
            results[task] = _evaluate_task(
                model, tokenizer, task, task_limit, seed, batch_size, backend, share_context, progress,
                return_per_example,
            )
    scores = [results[task]["score"] for task in tasks]
    results["average"] = {
        "score": sum(scores) / len(scores) if scores else float("nan"),
        "acc": sum(results[task]["acc"] for task in tasks) / len(tasks) if tasks else float("nan"),
        "metric": "lm-eval metric of record (acc_norm: ARC, PIQA, HellaSwag; acc: BoolQ, Winogrande)",
        "metrics": {task: PRIMARY_METRIC[task] for task in tasks},
        "tasks": list(tasks),
    }
    results["config"] = {
        "backend": backend,
        "batch_size": batch_size,
        "share_context": share_context,
        "seed": seed,
        "num_fewshot": 0,
        "protocol": "lm-evaluation-harness 0.4 prompts and log-likelihood scoring",
    }
    return results


def _evaluate_task(
    model, tokenizer, task, limit, seed, batch_size, backend, share_context, progress, return_per_example=False
) -> dict[str, Any]:
    start = time.perf_counter()
    data = load_zero_shot_task(task, limit=limit, seed=seed)
    requests, spans = [], []
    for doc in data:
        spans.append((len(requests), len(doc["contexts"])))
        requests.extend(zip(doc["contexts"], doc["continuations"]))
    scores = loglikelihoods(
        model, tokenizer, requests, batch_size=batch_size, backend=backend, share_context=share_context,
        progress=progress, desc=task,
    )
    correct, correct_norm = [], []
    for doc, (first, count) in zip(data, spans):
        lls = scores[first : first + count]
        correct.append(float(_argmax(lls) == doc["label"]))
        lengths = [float(len(choice)) for choice in doc["choices"]]
        normalized = [ll / length for ll, length in zip(lls, lengths)]
        correct_norm.append(float(_argmax(normalized) == doc["label"]))
    has_norm = task in _HAS_ACC_NORM
    dataset, config = TASK_DATASETS[task]
    result = {
        "acc": _mean(correct),
        "acc_stderr": standard_error(correct),
        "acc_norm": _mean(correct_norm) if has_norm else None,
        "acc_norm_stderr": standard_error(correct_norm) if has_norm else None,
        "metric": PRIMARY_METRIC[task],
        "n": len(data),
        "limit": limit,
        "seed": seed,
        "subset": data.info.description,
        "prompt_format": PROMPT_FORMATS[task],
        "dataset": dataset,
        "dataset_config": config,
        "split": "validation",
        "num_fewshot": 0,
        "seconds": round(time.perf_counter() - start, 2),
    }
    result["score"] = result[result["metric"]]
    if return_per_example:
        result["per_example"] = correct_norm if result["metric"] == "acc_norm" else correct
    logger.info(
        "%s: acc=%.4f acc_norm=%s n=%d (%.1fs)", task, result["acc"],
        "n/a" if result["acc_norm"] is None else f"{result['acc_norm']:.4f}", result["n"], result["seconds"],
    )
    return result


def _argmax(values: Sequence[float]) -> int:
    # First maximum on ties, like numpy.argmax in lm-eval.
    return max(range(len(values)), key=lambda i: (values[i], -i))


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


_TASK_TITLES = {
    "arc_easy": "ARC-Easy",
    "arc_challenge": "ARC-Challenge",
    "piqa": "PIQA",
    "hellaswag": "HellaSwag",
    "boolq": "BoolQ",
    "winogrande": "Winogrande (XL)",
}


def zero_shot_records(results: Mapping[str, Any]) -> list[MetricRecord]:
    """Model-card rows for the measured results of :func:`evaluate_zero_shot`.

    One ``accuracy`` record per task, plus an ``acc_norm`` record where lm-eval defines it.

    Example:
        >>> results = evaluate_zero_shot(model, tokenizer, tasks=("arc_easy",))  # doctest: +SKIP
        >>> records = zero_shot_records(results)  # doctest: +SKIP
        >>> [(r.dataset_type, r.metric_type) for r in records]  # doctest: +SKIP
        [('allenai/ai2_arc', 'accuracy'), ('allenai/ai2_arc', 'acc_norm')]
    """
    records = []
    for task in ZERO_SHOT_TASKS:
        if task not in results:
            continue
        result = results[task]
        subset = result["subset"]
        settings = {
            "num_fewshot": 0,
            "n": result["n"],
            "subset": subset,
            "prompt_format": result["prompt_format"],
            "protocol": "lm-evaluation-harness 0.4 prompts, log-likelihood scoring",
        }
        title = _TASK_TITLES[task]
        common = dict(
            task_type="multiple-choice",
            dataset_type=result["dataset"],
            dataset_name=title if subset.startswith("full") else f"{title}, {subset}",
            dataset_split=result["split"],
            metric_config=result["dataset_config"],
        )
        for metric_type, key in (("accuracy", "acc"), ("acc_norm", "acc_norm")):
            if result[key] is None:
                continue
            records.append(
                MetricRecord(
                    metric_type=metric_type,
                    metric_value=result[key],
                    metric_name=f"{title} {key} (0-shot)",
                    settings={**settings, "stderr": result[f"{key}_stderr"]},
                    **common,
                )
            )
    return records
