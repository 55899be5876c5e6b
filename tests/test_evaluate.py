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


def test_blind_baseline_answers_each_text_with_its_most_frequent_training_answer(tmp_path):
    from stages.data.shapes import make_sample
    from stages.data.shards import ShardWriter

    writer = ShardWriter(tmp_path / "train", "train", 4)
    for i, (hypothesis, label) in enumerate([("h1", "no"), ("h1", "no"), ("h1", "yes"), ("h2", "maybe"),
                                             ("h3", "yes"), ("h4", "yes")]):
        sample, png = make_sample("entailment", "train", i, 32, 0, 2)
        writer.write({**sample, "hypothesis": hypothesis, "label": label}, png, "png")
    writer.close({"name": "test"})
    samples = {k: {"id": k, "task": "entailment", "hypothesis": h, "label": "no"} for k, h in
               [("a", "h1"), ("b", "h2"), ("c", "never seen")]}
    # h1: "no" twice, "yes" once; an unseen hypothesis gets the split's most frequent label ("yes": 3 of 6)
    assert evaluate.blind_baseline("entailment", tmp_path / "train", samples) == {"a": "no", "b": "maybe", "c": "yes"}
    assert evaluate.blind_baseline("grounding", tmp_path / "train", samples) is None
