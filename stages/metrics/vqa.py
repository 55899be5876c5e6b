"""VQA v2 accuracy, written from the specification of the official evaluator
(Antol et al. 2015; Goyal et al. 2017).

A prediction is compared with the ten human answers of its question. For each of the ten leave-one-out subsets
of nine answers it scores min(#subset answers equal to the prediction / 3, 1); the question scores the mean over
the ten subsets (so 1, 2, 3, >=4 matching annotators give 0.3, 0.6, 0.9, 1.0).

Quirk kept on purpose: the evaluator normalises the answers (`normalize_answer`: punctuation, lower case, number
words -> digits, articles, contractions) only when the ten ground-truth answers are not all identical; when
they all agree, the prediction (only stripped of surrounding whitespace) and the answers are compared verbatim.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path

# Punctuation that is deleted (next to a space, or when the text holds a digit,digit comma) or else turned into a
# space. The apostrophe (contractions), the period (decimals, handled apart) and e.g. ':' '%' '&' are not in it.
PUNCTUATION = tuple(';/[]"{}()=+\\_-><@`,?!')
_COMMA_BETWEEN_DIGITS = re.compile(r"\d,\d")
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")

NUMBER_WORDS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
ARTICLES = frozenset({"a", "an", "the"})

# Canonical English contractions; annotators often typed them without (some of) their apostrophes.
_CANONICAL_CONTRACTIONS = (
    "ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't "
    "he'd he'd've he's how'd how'll how's i'd've i'm i've isn't it'd it'd've it'll let's ma'am mightn't "
    "mightn't've might've mustn't must've needn't not've o'clock oughtn't 'ow's'at shan't she'd've she's "
    "should've shouldn't shouldn't've somebody'd somebody'd've somebody'll somebody's someone'd someone'd've "
    "someone'll someone's something'd something'd've something'll that's there'd there'd've there're there's "
    "they'd they'd've they'll they're they've 'twas wasn't we'd've we've weren't what'll what're what's what've "
    "when's where'd where's where've who'd who'd've who'll who's who've why'll why're why's won't would've "
    "wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll you're you've"
).split()


def _contraction_table() -> dict[str, str]:
    """Map every spelling that drops a non-empty subset of a contraction's apostrophes to the canonical form.

    Forms that are ordinary words once all apostrophes go ("hell", "well", "its", "shed", ...) are left out, so
    real words are never rewritten; partially stripped spellings still map.
    """
    ordinary_words = {"hell", "well", "wed", "were", "its", "id", "shell", "ill", "lets", "shed"}
    table: dict[str, str] = {}
    for canonical in _CANONICAL_CONTRACTIONS:
        positions = [i for i, c in enumerate(canonical) if c == "'"]
        for k in range(1, len(positions) + 1):
            for dropped in itertools.combinations(positions, k):
                variant = "".join(c for i, c in enumerate(canonical) if i not in dropped)
                if variant not in ordinary_words:
                    table.setdefault(variant, canonical)
    return table


CONTRACTIONS = _contraction_table()


def process_punctuation(text: str) -> str:
    """Punctuation step: delete or space out `PUNCTUATION`, drop periods not followed by a digit."""
    digit_comma = _COMMA_BETWEEN_DIGITS.search(text) is not None
    out = text
    for p in PUNCTUATION:
        if digit_comma or f"{p} " in text or f" {p}" in text:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out)


def process_digit_article(text: str) -> str:
    """Word step: lower case, number words -> digits, drop articles, restore contractions' apostrophes."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES]
    return " ".join(words)


def normalize_answer(text: str) -> str:
    """The official answer normalisation: whitespace clean-up, punctuation step, then word step."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text))


def vqa_score(prediction: str, gt_answers: Sequence[str]) -> float:
    """Leave-one-out soft accuracy of one prediction against the human answers of one question, in [0, 1]."""
    if not gt_answers:
        raise ValueError("vqa_score: a question needs at least one ground-truth answer")
    pred = prediction.replace("\n", " ").replace("\t", " ").strip()
    gts = list(gt_answers)
    if len(set(gts)) > 1:
        pred = normalize_answer(pred)
        gts = [normalize_answer(a) for a in gts]
    if len(gts) == 1:
        return float(gts[0] == pred)  # degenerate: no subset to leave one out of
    matches = sum(a == pred for a in gts)
    # Leaving out a matching answer leaves matches - 1 in the subset, any other leaves all of them.
    per_subset = [min((matches - (a == pred)) / 3.0, 1.0) for a in gts]
    return sum(per_subset) / len(per_subset)


def vqa_accuracy(
    predictions: Mapping[Hashable, str],
    answers: Mapping[Hashable, Sequence[str]],
    answer_types: Mapping[Hashable, str] | None = None,
) -> dict:
    """VQA accuracy over the predicted questions.

    Args:
        predictions: question id -> predicted answer.
        answers: question id -> the (ten) human answers; every predicted id must be present.
        answer_types: optional question id -> answer type ("yes/no", "number", "other") for per-type accuracy.

    Returns:
        {"accuracy": mean score in [0, 1], "n": #questions, "per_type": {type: accuracy} (when types are given),
        "per_question": {qid: score}}.
    """
    if not predictions:
        raise ValueError("vqa_accuracy: no predictions")
    missing = [q for q in predictions if q not in answers]
    if missing:
        raise ValueError(f"vqa_accuracy: {len(missing)} predicted questions have no answers, e.g. {missing[0]!r}")
    per_question = {q: vqa_score(p, answers[q]) for q, p in predictions.items()}
    result: dict = {
        "accuracy": sum(per_question.values()) / len(per_question),
        "n": len(per_question),
        "per_question": per_question,
    }
    if answer_types is not None:
        by_type: dict[str, list[float]] = {}
        for q, s in per_question.items():
            if q in answer_types:
                by_type.setdefault(answer_types[q], []).append(s)
        result["per_type"] = {t: sum(v) / len(v) for t, v in sorted(by_type.items())}
    return result


def load_vqa_official(questions_file: str | Path, annotations_file: str | Path) -> dict[int, dict]:
    """Read VQA questions + annotations in the official json layout.

    Returns:
        question_id -> {"question", "image_id", "answers" (list of the human answer strings), "answer_type",
        "question_type", "multiple_choice_answer"}.
    """
    questions = json.loads(Path(questions_file).read_text())["questions"]
    annotations = {a["question_id"]: a for a in json.loads(Path(annotations_file).read_text())["annotations"]}
    out: dict[int, dict] = {}
    for q in questions:
        ann = annotations.get(q["question_id"])
        if ann is None:
            raise ValueError(f"{annotations_file}: no annotation for question_id {q['question_id']}")
        if ann["image_id"] != q["image_id"]:
            raise ValueError(f"question {q['question_id']}: image_id differs between questions and annotations")
        out[q["question_id"]] = {
            "question": q["question"],
            "image_id": q["image_id"],
            "answers": [a["answer"] for a in ann["answers"]],
            "answer_type": ann.get("answer_type"),
            "question_type": ann.get("question_type"),
            "multiple_choice_answer": ann.get("multiple_choice_answer"),
        }
    return out
