"""Training and evaluation targets per task, and the box -> location-token mapping.

A box coordinate c of an image of size s (width for x, height for y) becomes bin k = round(c / s * (B - 1)); bin k
maps back to k / (B - 1) * s (`narvl_model.decoding.bins_to_box`). The same quantisation holds for any square
resize of the image, so targets never depend on the model's input resolution.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from stages.data.schema import REQUIRED_KEYS


def box_to_bins(box: list[float] | tuple[float, ...], image_size: list[int] | tuple[int, int], num_bins: int
                ) -> list[int]:
    """Bins (x0, y0, x1, y1) of a pixel box; `image_size` is [width, height]."""
    w, h = image_size
    scale = (w, h, w, h)
    return [int(min(num_bins - 1, max(0, round(float(c) / s * (num_bins - 1))))) for c, s in zip(box, scale,
                                                                                                    strict=True)]


def box_text(box: list[float], image_size: list[int], num_bins: int) -> str:
    """The grounding target: four location tokens "<bin_a> <bin_b> <bin_c> <bin_d>"."""
    return " ".join(f"<bin_{k}>" for k in box_to_bins(box, image_size, num_bins))


def vqa_confidence(answers: list[str]) -> dict[str, float]:
    """VQA soft score (the training weight) of each distinct annotator answer: min(#annotators who gave it / 3, 1)."""
    return {a: min(c / 3.0, 1.0) for a, c in Counter(answers).items()}


def majority_answer(answers: list[str]) -> str:
    """Most frequent answer; ties go to the one that appears first."""
    counts = Counter(answers)
    best = max(counts.values())
    return next(a for a in answers if counts[a] == best)


def _check(sample: dict) -> str:
    task = sample.get("task")
    if task not in REQUIRED_KEYS:
        raise ValueError(f"sample {sample.get('id')!r}: unknown task {task!r}")
    return task


def train_target(sample: dict, rng: np.random.Generator, num_bins: int) -> tuple[str, float]:
    """A training target and its loss weight.

    caption: an rng-chosen reference (weight 1); vqa: an answer drawn from the 10 by frequency, weight its VQA
    confidence; grounding: the box as four location tokens; entailment: the label.
    """
    task = _check(sample)
    if task == "caption":
        refs = sample["references"]
        return refs[int(rng.integers(len(refs)))], 1.0
    if task == "vqa":
        answers = sample["answers"]
        answer = answers[int(rng.integers(len(answers)))]  # uniform over annotators = by frequency
        return answer, vqa_confidence(answers)[answer]
    if task == "grounding":
        return box_text(sample["box"], sample["image_size"], num_bins), 1.0
    return sample["label"], 1.0


def eval_target(sample: dict, num_bins: int) -> str:
    """The deterministic target: the first reference, the majority answer, the box tokens or the label."""
    task = _check(sample)
    if task == "caption":
        return sample["references"][0]
    if task == "vqa":
        return majority_answer(sample["answers"])
    if task == "grounding":
        return box_text(sample["box"], sample["image_size"], num_bins)
    return sample["label"]


def all_targets(sample: dict, num_bins: int) -> list[str]:
    """Every text the sample can be trained on (all references / distinct answers / the box / the label)."""
    task = _check(sample)
    if task == "caption":
        return list(sample["references"])
    if task == "vqa":
        return list(dict.fromkeys(sample["answers"]))
    return [eval_target(sample, num_bins)]


def sample_texts(sample: dict, num_bins: int) -> list[str]:
    """The texts of a sample a tokenizer should be trained on: the prompt and every target."""
    return [sample["prompt"], *all_targets(sample, num_bins)]
