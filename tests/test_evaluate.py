"""evaluate: the metrics.json contract for both model kinds, and scoring on the paper's scale."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
from test_train import TASK, shared_data, shared_nar, shared_teacher  # noqa: F401 (session fixtures)

from stages import evaluate
from stages.common import PrintLog
from stages.config import EvalConfig, EvaluateStage


@pytest.mark.timeout(240)
@pytest.mark.parametrize("kind", ["ar", "narvl"])
def test_evaluate_writes_the_contract(kind, shared_data, shared_teacher, shared_nar, tmp_path):  # noqa: F811
    model_dir = shared_teacher if kind == "ar" else shared_nar[0]
    cfg = EvaluateStage(task=TASK, kind=kind, eval=EvalConfig(ar_beam_size=3, ar_max_len=8, batch_size=8))
    res = evaluate.run(cfg, evaluate.Inputs(data=shared_data, model=model_dir), tmp_path, PrintLog())
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["metric"] == "accuracy" and 0.0 <= saved["value"] <= 100.0
    assert saved["value"] == pytest.approx(100 * saved["metrics"]["accuracy"]) and res["n"] == 16
    rows = pq.read_table(tmp_path / "predictions.parquet").to_pylist()
    assert len(rows) == 16 and set(rows[0]) == {"id", "prediction", "references", "score"}
    assert sum(r["score"] for r in rows) / 16 == pytest.approx(saved["metrics"]["accuracy"])
    assert 0.0 <= saved["metrics"]["blind_accuracy"] <= 1.0  # the text-only baseline of the same samples
    gap = saved["gap"]  # and the share of the gap to 100 the model closes over it
    assert gap["metric"] == "accuracy" and gap["blind"] == pytest.approx(100 * saved["metrics"]["blind_accuracy"])
    assert gap["gap_closed"] == pytest.approx((saved["value"] - gap["blind"]) / (100 - gap["blind"]))
    assert saved["metrics"]["gap_closed"] == pytest.approx(gap["gap_closed"])
    assert {k for k in saved["metrics"] if k.startswith("accuracy_")} <= {"accuracy_yes_no", "accuracy_number",
                                                                         "accuracy_other"}
    if kind == "narvl":
        keys = ("infeasible_eval_target_rate", "mean_output_len", "mean_reference_len", "adjacent_repeat_rate")
        assert set(keys) <= set(saved["metrics"])


def test_perfect_predictions_score_100_on_the_paper_scale():
    from narvl_model.tokenizer import Tokenizer
    from stages.data.tasks import box_text

    tok = Tokenizer.train(["a b c yes no maybe"], vocab_size=64, num_bins=16)
    box_sample = {"id": "g", "task": "grounding", "image_size": [32, 32], "box": [4.0, 6.0, 20.0, 30.0]}
    ids = tok.encode(box_text(box_sample["box"], box_sample["image_size"], tok.num_bins))
    box = evaluate.postprocess("grounding", ids, box_sample, tok)
    metrics, per, _ = evaluate.score("grounding", {"g": box}, {"g": box_sample})
    assert metrics["acc@0.5"] == 1.0 and per["g"] > 0.9
    assert evaluate.postprocess("grounding", ids[:3], box_sample, tok) is None  # not four bins: a miss
    ent = {"e": {"id": "e", "task": "entailment", "label": "maybe"}}
    word = evaluate.postprocess("entailment", tok.encode("maybe yes"), ent["e"], tok)
    metrics, per, _ = evaluate.score("entailment", {"e": word}, ent)
    assert word == "maybe" and metrics["accuracy"] == 1.0 and per["e"] == 1.0


def test_vqa_accuracy_per_official_answer_type():
    def sample(k: str, answers: list[str], answer_type: str | None, question_type: str) -> dict:
        return {"id": k, "task": "vqa", "question": "q?", "answers": answers,
                "meta": {"answer_type": answer_type, "question_type": question_type}}

    samples = {"a": sample("a", ["yes"] * 10, "yes/no", "is there a"),
               "b": sample("b", ["no"] * 10, "yes/no", "is the"),
               "c": sample("c", ["2"] * 9 + ["two"], "number", "how many"),
               "d": sample("d", ["red"] * 7 + ["dark red"] * 3, "other", "what color is the")}
    metrics, _, _ = evaluate.score("vqa", {"a": "yes", "b": "yes", "c": "two", "d": "dark red"}, samples)
    # grouped by the answer type as the official evaluator does, not by the question type
    assert {k for k in metrics if k.startswith("accuracy_")} == {"accuracy_yes_no", "accuracy_number",
                                                                "accuracy_other"}
    assert metrics["accuracy_yes_no"] == 0.5 and metrics["accuracy_number"] == 1.0
    assert metrics["accuracy_other"] == pytest.approx(0.9)  # 3 of 10 annotators: 0.9 over the 10 subsets
    # without an answer type on every sample, the question type groups (as before); with neither, no groups
    samples["d"]["meta"]["answer_type"] = None
    assert "accuracy_what_color_is_the" in evaluate.score("vqa", {"d": "red"}, {"d": samples["d"]})[0]
    bare = {"d": {k: v for k, v in samples["d"].items() if k != "meta"}}
    assert not [k for k in evaluate.score("vqa", {"d": "red"}, bare)[0] if k.startswith("accuracy_")]


@pytest.mark.realdata
def test_vqa_answer_types_of_converted_vqa_v2(realdata, tmp_path):
    """Real VQA v2 questions through the converter and the evaluate stage's scoring: the per-type accuracy is the
    official evaluator's perAnswerType (answer_type of the annotations), computed here from the official files."""
    from PIL import Image

    from stages.data.converters import convert
    from stages.data.shards import iter_split_json
    from stages.metrics import load_vqa_official, vqa_score

    vqa = realdata / "vqa"
    questions, annotations = vqa / "v2_OpenEnded_mscoco_train2014_questions_5q.json", \
        vqa / "v2_mscoco_train2014_annotations_5q.json"
    official = load_vqa_official(questions, annotations)
    for q in official.values():
        path = tmp_path / "images" / f"COCO_train2014_{q['image_id']:012d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40, 32), (10, 120, 30)).save(path, format="JPEG")
    convert("vqa", {"images": tmp_path / "images", "questions": {"val2014": questions},
                    "annotations": {"val2014": annotations}, "progress": False, "workers": 1}, tmp_path / "out")
    samples = {s["id"]: s for s in iter_split_json(tmp_path / "out" / "vqa" / "val", "vqa")}
    assert len(samples) == len(official) == 5
    preds = {k: "orange" if i % 2 else "yes" for i, k in enumerate(samples)}
    metrics, _, _ = evaluate.score("vqa", preds, samples)
    expected: dict[str, list[float]] = {}
    for k, s in samples.items():
        q = official[s["meta"]["question_id"]]
        expected.setdefault(q["answer_type"], []).append(vqa_score(preds[k], q["answers"]))
    assert {t for t in expected} == {"yes/no", "other"}  # question types there: "what is this", "is this", ...
    for answer_type, scores in expected.items():
        assert metrics[f"accuracy_{evaluate.type_key(answer_type)}"] == pytest.approx(sum(scores) / len(scores))
    assert not [k for k in metrics if k.startswith("accuracy_what")]
