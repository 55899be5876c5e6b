"""The sample schema of the shards: one `.json` beside one image in a WebDataset sample.

Common keys: id (str, unique; also the WebDataset key), task, image_size [w, h], prompt (the encoder text).

- caption:    references: list[str] (>= 1; training picks one per epoch, evaluation uses all)
- vqa:        question: str, answers: list[str] (10 annotator answers, VQA v2 form)
- grounding:  expression: str, box: [x0, y0, x1, y1] pixels of this image
- entailment: premise: str, hypothesis: str, label: "yes" | "maybe" | "no"
- meta:       optional dict (the built-in benchmark stores its object list and question type there)
"""

from __future__ import annotations

from collections.abc import Sequence

REQUIRED_KEYS: dict[str, tuple[str, ...]] = {
    "caption": ("references",),
    "vqa": ("question", "answers"),
    "grounding": ("expression", "box"),
    "entailment": ("premise", "hypothesis", "label"),
}
COMMON_KEYS = ("id", "task", "image_size", "prompt")
ENTAILMENT_LABELS = ("yes", "maybe", "no")  # the answer words OFA trains on
SNLI_TO_LABEL = {"entailment": "yes", "neutral": "maybe", "contradiction": "no"}


def task_prompt(task: str, sample: dict) -> str:
    """The encoder text, worded as OFA's task prompts."""
    if task == "caption":
        return " what does the image describe?"
    if task == "vqa":
        return sample["question"]
    if task == "grounding":
        return f' which region does the text " {sample["expression"]} " describe?'
    if task == "entailment":
        return f' can image and text1 " {sample["premise"]} " imply text2 " {sample["hypothesis"]} "?'
    raise ValueError(f"unknown task {task!r}")


def snli_ve_label(label: str) -> str:
    """An SNLI-VE gold label (entailment / neutral / contradiction, or already yes / maybe / no, any case and
    surrounding space) -> the answer word; ValueError for anything else."""
    key = str(label).strip().lower()
    if key in SNLI_TO_LABEL:
        return SNLI_TO_LABEL[key]
    if key in ENTAILMENT_LABELS:
        return key
    raise ValueError(f"unknown SNLI-VE label {label!r}; expected one of {sorted(SNLI_TO_LABEL)} or "
                     f"{ENTAILMENT_LABELS}")


def xywh_to_xyxy(box: Sequence[float]) -> list[float]:
    """A COCO (x, y, width, height) box -> the schema's [x0, y0, x1, y1]."""
    x, y, w, h = (float(v) for v in box)
    return [x, y, x + w, y + h]
