"""Grounding metrics: IoU by hand, degenerate boxes, Acc@0.5 on real RefCOCO boxes."""

from __future__ import annotations

import json
import math

import pytest

from stages.data.schema import xywh_to_xyxy
from stages.metrics.grounding import box_iou, grounding_metrics


def test_box_iou_by_hand():
    assert box_iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert box_iou((0, 0, 10, 10), (5, 5, 15, 15)) == pytest.approx(25 / 175)
    assert box_iou((0, 0, 10, 10), (2, 2, 8, 8)) == pytest.approx(36 / 100)
    assert box_iou((0, 0, 10, 10), (10, 0, 20, 10)) == 0.0  # touching edges


def test_box_iou_degenerate():
    assert box_iou((5, 5, 5, 5), (5, 5, 5, 5)) == 0.0  # empty union
    assert box_iou((10, 10, 0, 0), (0, 0, 10, 10)) == 0.0  # inverted box has no area
    assert box_iou((0, 0, math.nan, 10), (0, 0, 10, 10)) == 0.0
    with pytest.raises(ValueError):
        box_iou((0, 0, 1), (0, 0, 1, 1))


def test_missing_predictions_are_misses():
    gt = {"a": (0, 0, 10, 10), "b": (0, 0, 10, 10), "c": (0, 0, 10, 10)}
    out = grounding_metrics({"a": (0, 0, 10, 10), "b": None}, gt)
    assert out == {"acc@0.5": pytest.approx(1 / 3), "miou": pytest.approx(1 / 3), "n_missing": 2, "n": 3}


@pytest.mark.realdata
def test_refcoco_self_and_shifted_boxes(realdata):
    lines = (realdata / "refcoco" / "unc_val.jsonl").read_text().splitlines()[:2000]
    records = [json.loads(line) for line in lines]
    gt = {i: xywh_to_xyxy(r["bbox_xywh"]) for i, r in enumerate(records)}
    assert all(x1 > x0 and y1 > y0 for x0, y0, x1, y1 in gt.values())
    assert grounding_metrics(gt, gt) == {"acc@0.5": 1.0, "miou": pytest.approx(1.0), "n_missing": 0, "n": 2000}

    # Shift horizontally by a fraction f of the width: IoU = (1 - f) / (1 + f), a hit for f = 0.2, a miss for 0.4.
    shifted = {}
    for i, (x0, y0, x1, y1) in gt.items():
        f = 0.2 if i % 2 == 0 else 0.4
        dx = f * (x1 - x0)
        shifted[i] = (x0 + dx, y0, x1 + dx, y1)
        assert box_iou(shifted[i], gt[i]) == pytest.approx((1 - f) / (1 + f))
    out = grounding_metrics(shifted, gt)
    assert out["acc@0.5"] == 0.5
    assert out["miou"] == pytest.approx((0.8 / 1.2 + 0.6 / 1.4) / 2)
