"""Evaluation metrics, one pure function per task over predictions and references (see docs/ARCHITECTURE.md)."""

from stages.metrics.caption import CaptionEval, caption_evaluation, caption_metrics, strip_hypothesis_punctuation
from stages.metrics.entailment import entailment_metrics, snli_ve_label
from stages.metrics.grounding import box_iou, grounding_metrics
from stages.metrics.semantics import caption_semantics
from stages.metrics.vqa import load_vqa_official, normalize_answer, vqa_accuracy, vqa_score

__all__ = [
    "CaptionEval",
    "box_iou",
    "caption_evaluation",
    "caption_metrics",
    "caption_semantics",
    "entailment_metrics",
    "grounding_metrics",
    "load_vqa_official",
    "normalize_answer",
    "snli_ve_label",
    "strip_hypothesis_punctuation",
    "vqa_accuracy",
    "vqa_score",
]
