"""Visual grounding metrics (RefCOCO/+/g): Acc@0.5 and mean IoU of predicted boxes against the gold boxes.

Boxes are (x0, y0, x1, y1) in pixels of the same image (COCO annotations are xywh: convert with
`stages.data.schema.xywh_to_xyxy`).
A missing or None prediction (e.g. a decoded sequence without four location tokens) is a miss with IoU 0.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence

Box = Sequence[float]


def box_area(box: Box) -> float:
    """Area of an xyxy box; inverted or non-finite boxes have area 0."""
    x0, y0, x1, y1 = (float(v) for v in box)
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
        return 0.0
    return max(0.0, x1 - x0) * max(0.0, y1 - y0)


def box_iou(a: Box, b: Box) -> float:
    """Intersection over union of two xyxy boxes, in [0, 1]; 0 when the union is empty (degenerate boxes)."""
    if len(a) != 4 or len(b) != 4:
        raise ValueError(f"box_iou: boxes need 4 coordinates, got {len(a)} and {len(b)}")
    area_a, area_b = box_area(a), box_area(b)
    if area_a == 0.0 or area_b == 0.0:
        return 0.0
    iw = min(float(a[2]), float(b[2])) - max(float(a[0]), float(b[0]))
    ih = min(float(a[3]), float(b[3])) - max(float(a[1]), float(b[1]))
    inter = max(0.0, iw) * max(0.0, ih)
    return inter / (area_a + area_b - inter)


def grounding_metrics(
    pred_boxes: Mapping[Hashable, Box | None],
    gt_boxes: Mapping[Hashable, Box],
    threshold: float = 0.5,
) -> dict[str, float]:
    """Acc@threshold (share with IoU >= threshold), mean IoU and the number of missing predictions.

    Args:
        pred_boxes: id -> predicted xyxy box, or None when the model produced no box.
        gt_boxes: id -> gold xyxy box; the evaluation runs over these ids (absent predictions are misses).
        threshold: IoU needed for a hit (0.5 in the paper).

    Returns:
        {"acc@0.5", "miou", "n_missing", "n"} (the accuracy key names the threshold used).
    """
    if not gt_boxes:
        raise ValueError("grounding_metrics: no ground-truth boxes")
    ious = []
    n_missing = 0
    for key, gt in gt_boxes.items():
        pred = pred_boxes.get(key)
        if pred is None:
            n_missing += 1
            ious.append(0.0)
        else:
            ious.append(box_iou(pred, gt))
    return {
        f"acc@{threshold:g}": sum(iou >= threshold for iou in ious) / len(ious),
        "miou": sum(ious) / len(ious),
        "n_missing": n_missing,
        "n": len(ious),
    }
