"""Caption metrics: parity with the coco-caption toolkit's own pipeline (COCO + COCOEvalCap) on real results."""

from __future__ import annotations

import json
import logging
from collections import defaultdict

import pytest

from stages.metrics.caption import (
    caption_evaluation,
    caption_metrics,
    spice_jar_path,
    strip_hypothesis_punctuation,
)
from stages.metrics.semantics import caption_semantics

pytestmark = pytest.mark.realdata

TOOLKIT_KEYS = {
    "Bleu_1": "BLEU-1",
    "Bleu_2": "BLEU-2",
    "Bleu_3": "BLEU-3",
    "Bleu_4": "BLEU-4",
    "METEOR": "METEOR",
    "ROUGE_L": "ROUGE-L",
    "CIDEr": "CIDEr",
}


class _NoSpice:
    """Stands in for pycocoevalcap's Spice (its CoreNLP models are not installed here)."""

    def method(self) -> str:
        return "SPICE"

    def compute_score(self, gts, res):
        return 0.0, [0.0] * len(gts)


def _toolkit_scores(annotation_file, results: list[dict]) -> dict[str, float]:
    """pycocoevalcap's example pipeline: COCO(annotations).loadRes(results) -> COCOEvalCap on the result ids."""
    import pycocoevalcap.eval as coco_eval_module
    from pycocotools.coco import COCO

    coco = COCO(str(annotation_file))
    coco_result = coco.loadRes(results)
    original = coco_eval_module.Spice
    coco_eval_module.Spice = _NoSpice
    try:
        coco_eval = coco_eval_module.COCOEvalCap(coco, coco_result)
        coco_eval.params["image_id"] = coco_result.getImgIds()
        coco_eval.evaluate()
    finally:
        coco_eval_module.Spice = original
    return {ours: coco_eval.eval[theirs] for theirs, ours in TOOLKIT_KEYS.items()}


@pytest.fixture(scope="module")
def fakecap(realdata):
    """The toolkit's demo results restricted to the val2017 images they share with the val2017 captions."""
    annotation_file = realdata / "coco" / "annotations" / "captions_val2017.json"
    annotations = json.loads(annotation_file.read_text())
    results = json.loads((realdata / "coco_caption_results" / "captions_val2014_fakecap_results.json").read_text())
    val2017 = {img["id"] for img in annotations["images"]}
    shared = [r for r in results if r["image_id"] in val2017]
    references: dict[int, list[str]] = defaultdict(list)
    for ann in annotations["annotations"]:
        references[ann["image_id"]].append(ann["caption"])
    predictions = {r["image_id"]: r["caption"] for r in shared}
    ours = caption_evaluation(predictions, references, spice=False, strip_punctuation=False)
    toolkit = _toolkit_scores(annotation_file, shared)
    return {"n": len(shared), "ours": ours, "toolkit": toolkit, "predictions": predictions, "refs": references}


def test_matches_coco_eval_cap_on_real_results(fakecap):
    assert fakecap["n"] == 126
    ours, toolkit = fakecap["ours"].metrics, fakecap["toolkit"]
    for key, value in toolkit.items():
        assert ours[key] == pytest.approx(value, abs=1e-4), key
    # Pinned values measured with pycocoevalcap 1.2 (both pipelines agree to the last digit).
    assert ours["CIDEr"] == pytest.approx(0.627722, abs=1e-5)
    assert ours["BLEU-4"] == pytest.approx(0.198265, abs=1e-5)
    assert set(fakecap["ours"].per_sample) == set(fakecap["predictions"])
    mean_cider = sum(s["CIDEr"] for s in fakecap["ours"].per_sample.values()) / fakecap["n"]
    assert mean_cider == pytest.approx(ours["CIDEr"], rel=1e-6)


def test_string_ids_empty_and_degenerate_hypotheses(realdata, fakecap):
    refs = fakecap["refs"]
    degenerate = json.loads(
        (realdata / "coco_caption_results" / "captions_val2017_degenerate_results.json").read_text()
    )
    # 60 degenerate captions plus an empty one and a punctuation-only one, keyed by string ids.
    preds = {f"img-{r['image_id']}": r["caption"] for r in degenerate[:60]}
    preds["img-empty"], preds["img-dots"] = "", "..."
    image_ids = [r["image_id"] for r in degenerate[:62]]
    str_refs = {f"img-{i}": refs[i] for i in image_ids[:60]}
    str_refs["img-empty"], str_refs["img-dots"] = refs[image_ids[60]], refs[image_ids[61]]
    result = caption_evaluation(preds, str_refs, meteor=False, spice=False)
    assert set(result.metrics) == {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr"}
    assert result.metrics["BLEU-4"] < 1e-3 and result.metrics["CIDEr"] < 0.05
    assert result.per_sample["img-empty"]["CIDEr"] == 0.0


def test_punctuation_stripping_and_perfect_hypothesis(caplog):
    assert strip_hypothesis_punctuation(" a man, riding a horse. ") == "a man riding a horse"
    refs = {"x": ["a man riding a horse on a beach", "a person on a horse"], "y": ["two dogs play in snow"]}
    preds = {"x": "A man riding a horse on a beach.", "y": "two dogs play in snow!"}
    caplog.set_level(logging.INFO, logger="stages.metrics.caption")
    scores = caption_metrics(preds, refs, meteor=False)
    if not spice_jar_path().is_file():
        assert "SPICE" not in scores and "SPICE skipped" in caplog.text
    assert scores["BLEU-1"] == pytest.approx(1.0, abs=1e-6)
    assert scores["ROUGE-L"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="no references"):
        caption_metrics({"z": "a cat"}, refs, meteor=False, spice=False)


def test_caption_semantics_set_arithmetic():
    def parse(caption: str) -> list[tuple[str, str]]:
        words = caption.split()
        return [(words[i], words[i + 1]) for i in range(0, len(words) - 1, 2)]

    objects = {1: [("red", "circle"), ("blue", "square")], 2: [("red", "circle"), ("red", "circle")], 3: []}
    preds = {1: "blue square red circle", 2: "red circle green star", 3: ""}
    out = caption_semantics(preds, objects, parse)
    assert out["set_acc"] == pytest.approx(2 / 3)
    # tp = 2 + 1, fp = 1 (green star), fn = 1 (second red circle)
    assert out["precision"] == pytest.approx(3 / 4) and out["recall"] == pytest.approx(3 / 4)
    assert out["object_f1"] == pytest.approx(3 / 4)
