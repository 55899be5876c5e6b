"""The built-in benchmark's image-blind baselines: what a reader of the text alone scores on a generated split, and
that it is at chance where the benchmark promises it (entailment's yes/no hypotheses, yes/no VQA questions)."""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path

import pytest

from stages import evaluate
from stages.data.shapes import COLOURS, SHAPES, generate, parse_caption
from stages.data.shards import ShardWriter
from stages.metrics import vqa_accuracy

SIZE, SEED = 32, 7
N_TRAIN = {"caption": 300, "vqa": 600, "grounding": 600, "entailment": 900}
N_TEST = {"caption": 100, "vqa": 400, "grounding": 200, "entailment": 450}


@pytest.fixture(scope="module")
def splits(tmp_path_factory) -> dict[str, tuple[Path, dict[str, dict]]]:
    """Per task: a train split in shards (what the blind predictors read) and the test samples by id."""
    root = tmp_path_factory.mktemp("blind")
    out = {}
    for task in ("caption", "vqa", "grounding", "entailment"):
        writer = ShardWriter(root / task / "train", "train", 500)
        for sample, png in generate(task, "train", N_TRAIN[task], SIZE, SEED):
            writer.write(sample, png, "png")
        writer.close({"name": "test"})
        out[task] = (root / task / "train", {s["id"]: s for s, _ in generate(task, "test", N_TEST[task], SIZE, SEED)})
    return out


def _tolerance(n: int) -> float:
    return 3.5 * (0.25 / n) ** 0.5  # 3.5 standard deviations of an accuracy near 50% on n samples


def test_vqa_yes_no_blind_gets_no_credit_beyond_the_answer_shares(splits):
    train_dir, samples = splits["vqa"]
    yes_no = {k: s for k, s in samples.items() if s["meta"]["answer_type"] == "yes/no"}
    assert len(yes_no) > 100
    share = {a: sum(s["meta"]["answer"] == a for s in yes_no.values()) / len(yes_no) for a in ("yes", "no")}
    # annotators who disagree on a yes/no question never give the other answer: "yes" for everything scores
    # exactly the share of "yes" questions (it scored 0.875 on the "no" questions before)
    for answer in ("yes", "no"):
        res = vqa_accuracy(dict.fromkeys(yes_no, answer), {k: s["answers"] for k, s in yes_no.items()})
        assert res["accuracy"] == pytest.approx(share[answer])
    # the strongest text-only predictor is no better than always giving the majority answer
    name, blind = evaluate.blind_baseline("vqa", train_dir, samples)
    assert blind["accuracy_yes_no"] <= max(share.values()) + _tolerance(len(yes_no)), name
    for candidate in evaluate.blind_candidates("vqa", train_dir, samples).values():
        acc = vqa_accuracy({k: candidate[k] for k in yes_no}, {k: s["answers"] for k, s in yes_no.items()})
        assert acc["accuracy"] <= max(share.values()) + _tolerance(len(yes_no))


def test_vqa_annotators_disagree_like_people(splits):
    _, samples = splits["vqa"]
    others = Counter()
    for s in samples.values():
        answer = s["meta"]["answer"]
        assert Counter(s["answers"])[answer] >= 6
        for a in s["answers"]:
            if a != answer:
                others[s["meta"]["answer_type"], a] += 1
    yes_no = {a for (t, a) in others if t == "yes/no"}
    assert yes_no and not yes_no & {"yes", "no"}
    assert {"yeah", "nope"} & yes_no
    numbers = {a for (t, a) in others if t == "number"}
    assert {"one", "two"} & numbers and {"0", "1", "2", "3"} & numbers  # number words and neighbouring counts


def _text_signature(sample: dict) -> tuple:
    """What a text-only reader of premise and hypothesis can key on: the hypothesis with colours and shapes
    masked, how many objects the premise names, and which of the hypothesis's pairs / shapes / colours it names."""
    named = parse_caption(sample["premise"])
    words = sample["hypothesis"].split()
    colours, shapes = [w for w in words if w in COLOURS], [w for w in words if w in SHAPES]
    skeleton = " ".join("C" if w in COLOURS else "S" if w in SHAPES else w for w in words)
    return (skeleton, len(named), tuple((c, s) in {o[1:] for o in named} for c, s in zip(colours, shapes, strict=True)),
            tuple(s in {o[2] for o in named} for s in shapes), tuple(c in {o[1] for o in named} for c in colours))


def test_entailment_image_dependent_part_is_at_chance_without_the_image(splits):
    train_dir, samples = splits["entailment"]
    decidable = {k: s for k, s in samples.items() if s["label"] != "maybe"}
    tol = _tolerance(len(decidable))
    name, blind = evaluate.blind_baseline("entailment", train_dir, samples)
    assert abs(blind["accuracy_image_dependent"] - 0.5) <= tol, name
    # a stronger text-only reader, premise included: the majority training label of the text's signature
    train = [s for s, _ in generate("entailment", "train", 3000, SIZE, SEED + 1)]
    by_signature: dict[tuple, Counter] = defaultdict(Counter)
    for s in train:
        if s["label"] != "maybe":
            by_signature[_text_signature(s)][s["label"]] += 1
    right = sum((by_signature[_text_signature(s)].most_common(1) or [("yes", 0)])[0][0] == s["label"]
                for s in decidable.values())
    assert abs(right / len(decidable) - 0.5) <= tol


def test_caption_blind_oracle_and_grounding_blind(splits):
    train_dir, samples = splits["caption"]
    name, blind = evaluate.blind_baseline("caption", train_dir, samples)
    assert name == "fixed caption"
    oracle = evaluate.caption_oracle(samples)
    assert oracle["semantic_set_acc"] == 1.0 and oracle["semantic_object_f1"] == 1.0
    # one caption cannot name every scene, though CIDEr gives its shared wording some credit
    assert blind["semantic_set_acc"] < 0.05 and blind["semantic_object_f1"] < 0.2
    assert 0 < blind["CIDEr"] < oracle["CIDEr"] / 2
    train_dir, samples = splits["grounding"]
    name, blind = evaluate.blind_baseline("grounding", train_dir, samples)
    candidates = evaluate.blind_candidates("grounding", train_dir, samples)
    scores = {n: evaluate.score("grounding", p, samples)[0]["acc@0.5"] for n, p in candidates.items()}
    assert blind["acc@0.5"] == max(scores.values()) < 0.25  # a box is not found without the image


def test_best_fixed_box_and_gap_closed():
    boxes = [[0, 0, 10, 10], [1, 1, 11, 11], [0, 1, 10, 11], [50, 50, 60, 60]]
    assert evaluate.best_fixed_box(boxes) in boxes[:3]
    assert evaluate.gap_closed(0.75, 0.5) == pytest.approx(0.5)
    assert evaluate.gap_closed(0.5, 0.5) == 0.0 and evaluate.gap_closed(0.25, 0.5) == pytest.approx(-0.5)
    assert evaluate.gap_closed(1.0, 1.0) is None  # a perfect blind baseline leaves no gap


def test_blind_baseline_picks_the_strongest_blind_predictor(tmp_path):
    from stages.data.shapes import make_sample

    writer = ShardWriter(tmp_path / "train", "train", 4)
    rows = [("the h1 is a", "no"), ("the h1 is a", "no"), ("the h1 is a", "yes"), ("the h2 is b", "maybe"),
            ("the h3 is c", "yes"), ("the h4 is d", "yes"), ("the h1 is b", "maybe")]
    for i, (hypothesis, label) in enumerate(rows):
        sample, png = make_sample("entailment", "train", i, 32, 0, 2)
        writer.write({**sample, "hypothesis": hypothesis, "label": label}, png, "png")
    writer.close({"name": "test"})
    samples = {k: {"id": k, "task": "entailment", "hypothesis": h, "label": gold} for k, h, gold in
               [("a", "the h1 is a", "yes"), ("b", "the h2 is b", "yes"), ("c", "never seen", "no"),
                ("d", "the h1 is x", "yes")]}
    cands = evaluate.blind_candidates("entailment", tmp_path / "train", samples)
    # "the h1 is a": "no" twice, "yes" once; an unseen text gets the split's most frequent label ("yes": 3 of 7)
    assert cands["text prior"] == {"a": "no", "b": "maybe", "c": "yes", "d": "yes"}
    assert cands["prefix prior"]["d"] == "no"  # by its first three words "the h1 is": "no" 2, "yes" 1, "maybe" 1
    assert set(cands) == {"text prior", "prefix prior", "constant 'yes'", "constant 'no'", "constant 'maybe'"}
    name, metrics = evaluate.blind_baseline("entailment", tmp_path / "train", samples)
    assert name == "constant 'yes'" and metrics["accuracy_image_dependent"] == 0.75 and metrics["accuracy"] == 0.75
