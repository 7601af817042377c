"""Task answers for lossy decoding: rewards and their answer unit, last-word accuracy, stopping at a word's end."""

from __future__ import annotations

import pytest
import torch
from transformers import StoppingCriteriaList

from hf_compress.assets import tiny_model
from hf_compress.evaluation.lambada import ends_first_word, first_word, last_word_accuracy
from hf_compress.speculative import SpeculativeDecoding
from hf_compress.speculative.calibration import HeldOut
from hf_compress.speculative.task_answers import (
    REWARDS,
    FirstWordStop,
    TaskReward,
    answer_stopping_criteria,
    answer_text,
    generate_answer,
    resolve_reward,
)

PROMPTS = ["hello world, hello", "12 + 34 =", "once upon a time there", "the cat sat on the mat and"]


@pytest.fixture(scope="module")
def pair():
    model, tok = tiny_model("llama")
    draft, _ = tiny_model("llama", seed=1)
    return model, tok, draft


def ids_of(tok, prompt: str) -> torch.Tensor:
    return tok(prompt, return_tensors="pt").input_ids


def test_last_word_accuracy_by_hand():
    assert last_word_accuracy(" Signs. She looked up", ["signs"]) == 1.0
    assert last_word_accuracy("signs", ["Signs."]) == 1.0  # case and surrounding punctuation do not count
    assert last_word_accuracy(" sign", ["signs"]) == 0.0
    assert last_word_accuracy("   ", ["signs"]) == 0.0
    assert last_word_accuracy("don't go", ["don't"]) == 1.0 and last_word_accuracy("don go", ["don't"]) == 0.0
    with pytest.raises(ValueError, match="non-empty list"):
        last_word_accuracy("signs", [])


@pytest.mark.parametrize(("text", "complete", "word"), [
    (" signs", False, "signs"), (" signs.", True, "signs"), (" guardian ", True, "guardian"),
    (" don", False, "don"), (" don'", False, "don"), (" don't", False, "don't"), (" don't ", True, "don't"),
    (" well-", False, "well"), (" well-known,", True, "well-known"), ("  ", False, ""), ('"Hi', False, "Hi"),
    (" caf\ufffd", False, "caf"), (" café ", True, "café"),
])
def test_first_word_and_when_it_is_complete(text, complete, word):
    assert ends_first_word(text) is complete
    assert first_word(text) == word


def test_rewards_carry_their_answer_unit():
    assert resolve_reward("lambada_accuracy").answer_unit == "word"
    assert resolve_reward("squad_f1").answer_unit == "line" and resolve_reward("squad_f1") is REWARDS["squad_f1"]
    custom = resolve_reward(lambda text, answers: float(text in answers))
    assert isinstance(custom, TaskReward) and custom.answer_unit == "line" and custom("a", ["a"]) == 1.0
    assert resolve_reward(REWARDS["lambada_accuracy"]) is REWARDS["lambada_accuracy"]
    with pytest.raises(ValueError, match="answer_unit must be one of"):
        TaskReward(len, "sentence")
    with pytest.raises(ValueError, match="Unknown reward 'lambada'"):
        resolve_reward("lambada")
    tok = tiny_model("llama")[1]
    new = torch.tensor(tok.encode(" signs. She\nlooked", add_special_tokens=False))
    assert answer_text(tok, new, "word") == "signs" and answer_text(tok, new) == "signs. She"
    assert answer_stopping_criteria(tok, "line") is None
    assert [type(c) for c in answer_stopping_criteria(tok, "word")] == [FirstWordStop]


def test_first_word_stop_ends_generation_right_after_the_first_word(pair):
    model, tok, _ = pair
    stopped_early = 0
    for prompt in PROMPTS:
        ids = ids_of(tok, prompt)
        reference = model.generate(ids, max_new_tokens=20, do_sample=False)[0, ids.shape[1]:]
        out = model.generate(ids, max_new_tokens=20, do_sample=False,
                             stopping_criteria=StoppingCriteriaList([FirstWordStop(tok)]))[0, ids.shape[1]:]
        assert torch.equal(out, reference[: len(out)])  # a cut of the same greedy text, nothing else changed
        if len(out) < 20:
            stopped_early += 1
            assert ends_first_word(tok.decode(out)) and not ends_first_word(tok.decode(out[:-1]))
    assert stopped_early >= 2  # the random model does write words that end


def test_one_criterion_serves_many_calls_and_a_speculative_strategy(pair):
    """The criterion finds each call's answer start (prompts of other lengths, in any order); the speculative engine
    checks it at every accepted token, so strict verification stops where greedy does, token for token."""
    model, tok, draft = pair
    shared = StoppingCriteriaList([FirstWordStop(tok)])
    for prompt in PROMPTS + PROMPTS[::-1]:
        ids = ids_of(tok, prompt)
        fresh = model.generate(ids, max_new_tokens=20, do_sample=False,
                               stopping_criteria=StoppingCriteriaList([FirstWordStop(tok)]))
        reused = model.generate(ids, max_new_tokens=20, do_sample=False, stopping_criteria=shared)
        strict = model.generate(ids, max_new_tokens=20, do_sample=False, stopping_criteria=shared,
                                custom_generate=SpeculativeDecoding(draft, draft_confidence_threshold=None, num_draft_tokens=4))
        assert torch.equal(fresh, reused) and torch.equal(fresh, strict)


def test_a_fork_continues_the_answer_begun_before_it(pair):
    """generate_answer(answer_start=prompt length) on a prefix that holds the answer's first token stops where the
    unforked answer stops: the word begun in the prefix is the one completed (CoSpec's oracle forks)."""
    model, tok, _ = pair
    for prompt in PROMPTS:
        ids = ids_of(tok, prompt)
        whole = generate_answer(model, ids, tok, max_new_tokens=20, stop_ids=[], answer_unit="word")
        if len(whole) - ids.shape[1] < 2:
            continue
        prefix = whole[: ids.shape[1] + 1].unsqueeze(0)
        fork = generate_answer(model, prefix, tok, max_new_tokens=19, stop_ids=[], answer_unit="word",
                               answer_start=ids.shape[1])
        assert torch.equal(fork, whole)


def test_calibration_scores_word_answers(pair):
    model, tok, draft = pair
    items = [{"prompt": p, "answers": ["x"]} for p in PROMPTS]
    held_out = HeldOut.prepare(model, items, tok, "lambada_accuracy", target_keep=0.99, max_new_tokens=20,
                               stop_at_newline=False)
    answers = held_out.run(SpeculativeDecoding(draft, draft_confidence_threshold=None, num_draft_tokens=4))["answers"]
    assert len(answers) == len(PROMPTS)  # one answer per held-out prompt: the loop below checks them all
    for prompt, answer in zip(PROMPTS, answers, strict=True):
        ids = ids_of(tok, prompt)
        greedy = generate_answer(model, ids, tok, max_new_tokens=20, stop_ids=[], answer_unit="word")
        assert answer == first_word(tok.decode(greedy[ids.shape[1]:])) and " " not in answer
