"""VQA accuracy: hand-checked leave-one-out values, the normalisation rules and the official file layout."""

from __future__ import annotations

from collections import Counter

import pytest

from stages.metrics.vqa import (
    load_vqa_official,
    normalize_answer,
    process_punctuation,
    vqa_accuracy,
    vqa_score,
)

NUMBER_WORD = {str(i): w for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}


@pytest.mark.parametrize("matches, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (7, 1.0)])
def test_leave_one_out_values(matches, expected):
    answers = ["red"] * matches + ["blue", "green", "black", "white", "gray", "pink", "brown", "tan", "gold"]
    answers = answers[:10]
    assert vqa_score("red", answers) == pytest.approx(expected)


def test_normalisation_rules():
    assert process_punctuation("10,000") == "10000"  # comma between digits: punctuation deleted
    assert process_punctuation("t-shirt") == "t shirt"  # no space beside it: replaced by a space
    assert process_punctuation("yes, it is.") == "yes it is"  # next to a space: deleted; final period dropped
    assert process_punctuation("1.5") == "1.5"  # period before a digit kept
    assert normalize_answer("The Two dogs") == "2 dogs"
    assert normalize_answer("none") == "0"
    assert normalize_answer("dont know") == "don't know"
    assert normalize_answer("its") == "its"  # an ordinary word is not turned into a contraction
    assert normalize_answer(" A  Cat!\n") == "cat"


def test_normalise_only_when_answers_disagree():
    agree = ["2"] * 10
    assert vqa_score("2", agree) == 1.0
    assert vqa_score("two", agree) == 0.0  # the official quirk: unanimous answers are compared verbatim
    disagree = ["2"] * 9 + ["3"]
    assert vqa_score("two", disagree) == vqa_score("2", disagree) == 1.0
    assert vqa_score("Three.", disagree) == pytest.approx(0.3)


@pytest.mark.realdata
def test_official_layout_5q(realdata):
    data = load_vqa_official(
        realdata / "vqa" / "v2_OpenEnded_mscoco_train2014_questions_5q.json",
        realdata / "vqa" / "v2_mscoco_train2014_annotations_5q.json",
    )
    assert len(data) == 5 and all(len(d["answers"]) == 10 for d in data.values())
    first = data[458752000]  # answers: net x8, netting, mesh
    assert vqa_score("net", first["answers"]) == 1.0
    assert vqa_score("netting", first["answers"]) == pytest.approx(0.3)
    assert vqa_score("a net", first["answers"]) == 1.0  # answers disagree -> the article is dropped
    preds = {q: d["multiple_choice_answer"] for q, d in data.items()}
    assert vqa_accuracy(preds, {q: d["answers"] for q, d in data.items()})["accuracy"] == 1.0


@pytest.mark.realdata
def test_majority_answer_on_1k(realdata):
    data = load_vqa_official(
        realdata / "vqa" / "vqa_format_questions_1k.json", realdata / "vqa" / "vqa_format_annotations_1k.json"
    )
    assert len(data) == 1000
    answers = {q: d["answers"] for q, d in data.items()}
    types = {q: d["answer_type"] for q, d in data.items()}
    majority = {q: Counter(a).most_common(1)[0][0] for q, a in answers.items()}
    result = vqa_accuracy(majority, answers, types)
    assert result["n"] == 1000 and set(result["per_type"]) == {"yes/no", "number", "other"}
    assert 0.9 < result["accuracy"] <= 1.0
    assert result["accuracy"] == pytest.approx(0.9631, abs=1e-4)
    assert result["per_type"]["yes/no"] == 1.0
    # Answers chosen by >= 4 annotators score 1.0, and a constant wrong answer scores (almost) nothing.
    for q, a in answers.items():
        if Counter(a).most_common(1)[0][1] >= 4:
            assert result["per_question"][q] == 1.0
    assert vqa_accuracy(dict.fromkeys(answers, "zebra crossing"), answers)["accuracy"] < 0.01

    # Number words vs digits: identical wherever the annotators disagree (normalisation applies).
    disagree_numeric = {q: m for q, m in majority.items() if m in NUMBER_WORD and len(set(answers[q])) > 1}
    assert len(disagree_numeric) >= 10
    as_words = {q: NUMBER_WORD[m] for q, m in disagree_numeric.items()}
    as_digits = vqa_accuracy(disagree_numeric, answers)["per_question"]
    assert vqa_accuracy(as_words, answers)["per_question"] == as_digits


def test_missing_answers_raise():
    with pytest.raises(ValueError, match="no answers"):
        vqa_accuracy({1: "yes"}, {2: ["yes"] * 10})
