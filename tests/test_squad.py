"""SQuAD v1.1 scoring (hand-computed exact match and token F1) and the offline question set."""

from __future__ import annotations

import pytest

from hf_compress.evaluation.squad import normalize_answer, squad_documents, squad_scores


def test_normalisation_drops_case_punctuation_articles_and_extra_spaces():
    assert normalize_answer("  The  Eiffel-Tower, in Paris!  ") == "eiffeltower in paris"
    assert normalize_answer("An apple a day") == "apple day"
    assert normalize_answer("theatre") == "theatre"  # "the" only as a whole word


def test_exact_match_and_token_f1_by_hand():
    assert squad_scores("the Eiffel Tower", ["Eiffel Tower"]) == (1.0, 1.0)
    # prediction "eiffel tower paris" vs gold "eiffel tower": 2 common, precision 2/3, recall 1 -> F1 0.8
    assert squad_scores("Eiffel Tower, Paris", ["Eiffel Tower"]) == (0.0, pytest.approx(0.8))
    # the best reference counts, for exact match and F1 separately
    assert squad_scores("Paris", ["in Paris, France", "Paris"]) == (1.0, 1.0)
    exact, f1 = squad_scores("France", ["Paris", "in Paris, France"])
    assert exact == 0.0 and f1 == pytest.approx(2 * (1 / 1) * (1 / 3) / (1 + 1 / 3))
    # repeated tokens count once per match (multiset intersection)
    assert squad_scores("paris paris", ["paris"]) == (0.0, pytest.approx(2 * 0.5 * 1 / 1.5))
    assert squad_scores("", ["Paris"]) == (0.0, 0.0)


@pytest.mark.parametrize("answers", [[], "Paris"])
def test_answers_must_be_a_non_empty_list(answers):
    with pytest.raises(ValueError, match="non-empty list"):
        squad_scores("Paris", answers)


def test_offline_documents_are_parsed_and_sliced():
    docs = squad_documents(3)
    assert len(docs) == 3 and squad_documents(2, offset=1) == docs[1:]
    for doc in docs:
        assert doc["question"] and doc["background"] and doc["answers"] and doc["title"]
        assert "Question:" in doc["body"] and not doc["body"].rstrip().endswith("Answer:")
        assert doc["question"] in doc["body"] and doc["background"] in doc["body"]


def test_asking_for_more_questions_than_the_set_holds_is_refused():
    """A benchmark split past the end was scored on the 8 questions left, under its 100-question settings."""
    total = len(squad_documents())
    assert len(squad_documents(8, offset=total - 8)) == 8
    with pytest.raises(ValueError, match=f"the SQuAD set has {total} questions: 100 from offset {total - 8} go past"):
        squad_documents(100, offset=total - 8)
    with pytest.raises(ValueError, match="go past its end"):
        squad_documents(None, offset=total + 1)
