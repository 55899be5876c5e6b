"""What every stage shares: the log it reports through and the sample schema of the shards."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Protocol


class StageLog(Protocol):
    """Where a stage reports. The pipeline passes one that writes to the stage's log file and to MLflow."""

    def info(self, msg: str) -> None: ...
    def metrics(self, values: dict[str, float], step: int | None = None) -> None: ...
    def artifact(self, path: Path) -> None: ...
    def progress(self, step: int, total: int | None = None) -> None: ...


class PrintLog:
    """A StageLog for tests and direct calls: Python logging, metrics kept in memory."""

    def __init__(self, name: str = "narvl") -> None:
        self._log = logging.getLogger(name)
        self.history: list[tuple[int | None, dict[str, float]]] = []
        self.artifacts: list[Path] = []

    def info(self, msg: str) -> None:
        self._log.info(msg)

    def metrics(self, values: dict[str, float], step: int | None = None) -> None:
        self.history.append((step, dict(values)))
        self._log.info("step %s: %s", step, ", ".join(f"{k}={v:.4g}" for k, v in values.items()))

    def artifact(self, path: Path) -> None:
        self.artifacts.append(Path(path))

    def progress(self, step: int, total: int | None = None) -> None:
        pass

    def last(self, key: str) -> float | None:
        for _, values in reversed(self.history):
            if key in values:
                return values[key]
        return None


# ---- sample schema (one `.json` beside one image in a WebDataset sample) -----------------------------------
# Common keys: id (str, unique), task, image_size [w, h], prompt (the encoder text).
# caption:    references: list[str] (>= 1; training picks one per epoch, evaluation uses all)
# vqa:        question: str, answers: list[str] (10 annotator answers, VQA v2 form)
# grounding:  expression: str, box: [x0, y0, x1, y1] pixels of this image
# entailment: premise: str, hypothesis: str, label: "yes" | "maybe" | "no"
# meta:       optional dict (the built-in benchmark stores its object list and question type there)
REQUIRED_KEYS: dict[str, tuple[str, ...]] = {
    "caption": ("references",),
    "vqa": ("question", "answers"),
    "grounding": ("expression", "box"),
    "entailment": ("premise", "hypothesis", "label"),
}
COMMON_KEYS = ("id", "task", "image_size", "prompt")
ENTAILMENT_LABELS = ("yes", "maybe", "no")


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


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON through a temporary file and a rename, so a crash never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
    os.replace(tmp, path)
