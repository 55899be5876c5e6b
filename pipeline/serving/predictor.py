"""The predictor behind `narvl serve` and the MLflow pyfunc model: (task, image bytes, text) -> answer.

A request is checked and turned into model inputs on its own (`Predictor.prepare`), so a bad one fails alone with
a `RequestError` naming the field; a list of prepared requests (any mix of tasks) is then decoded together
(`Predictor.run`): one model call per task present. Prompts come from stages.common.task_prompt, decoding from
stages.evaluate.decode_batch and the answers (text, entailment word, grounding box in pixels of the request's
image) from stages.evaluate.postprocess, so the served model answers exactly as the evaluate stage scores it.

Loading reads model.safetensors + model_config.json (narvl_model.checkpoint.load_model) and the tokenizer's JSON
files only: nothing is unpickled.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

TASKS = ("caption", "vqa", "grounding", "entailment")
MAX_IMAGE_BYTES = 8 * 1024 * 1024
MAX_TEXT_CHARS = 1000


class RequestError(ValueError):
    """A request the predictor refuses (the HTTP layer answers it with `status`)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Prepared:
    """One checked request as model inputs: image (3, S, S) in [-1, 1], src ids (bos + prompt + eos)."""

    task: str
    image: np.ndarray
    src: list[int]
    image_size: tuple[int, int]  # [width, height] of the request's image: grounding boxes are in its pixels


def resolve_checkpoint(model_dir: str | Path) -> Path:
    """The folder holding model.safetensors: `model_dir` itself or its `checkpoint/` (a training stage output)."""
    from narvl_model.checkpoint import CONFIG, WEIGHTS

    model_dir = Path(model_dir)
    for d in (model_dir, model_dir / "checkpoint"):
        if (d / WEIGHTS).is_file() and (d / CONFIG).is_file():
            return d
    raise FileNotFoundError(f"{model_dir}: no {WEIGHTS} + {CONFIG} in it or in its checkpoint/ "
                            "(expected a train_teacher / train_nar output or its checkpoint folder)")


def check_text(task: str, text: Any, premise: Any = None) -> dict[str, str]:
    """The task fields of a sample (stages.common schema) from the request text; RequestError when unusable."""
    if task not in TASKS:
        raise RequestError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}", status=404)

    def clean(value: Any, field: str) -> str:
        if not isinstance(value, str) or not value.strip():
            raise RequestError(f"field {field!r}: expected a non-empty string for task {task!r}")
        if len(value) > MAX_TEXT_CHARS:
            raise RequestError(f"field {field!r}: {len(value)} characters, at most {MAX_TEXT_CHARS}", status=413)
        return " ".join(value.split())

    if task == "caption":
        return {}  # the caption prompt is fixed; a text, if any, is ignored
    if task == "vqa":
        return {"question": clean(text, "text")}
    if task == "grounding":
        return {"expression": clean(text, "text")}
    return {"hypothesis": clean(text, "text"), "premise": clean(premise, "premise")}


class Predictor:
    """A trained model and its tokenizer, decoding batches of requests.

    Args:
        model_dir: a training stage output (checkpoint/ inside) or the checkpoint folder itself.
        tokenizer_dir: the prepare_data stage's tokenizer/ folder.
        ar_decode: "beam" (beam_size beams) or "greedy"; AR models only.
        beam_size: AR beam width (the paper's 5).
        max_len: longest AR output, in tokens.
        device: "auto" (cuda when available), "cpu" or "cuda".
        max_image_bytes: larger images are refused (413).
    """

    def __init__(self, model_dir: str | Path, tokenizer_dir: str | Path, *, ar_decode: Literal["beam", "greedy"] =
                 "beam", beam_size: int = 5, max_len: int = 24, device: str = "auto",
                 max_image_bytes: int = MAX_IMAGE_BYTES) -> None:
        from narvl_model.checkpoint import load_model
        from narvl_model.tokenizer import Tokenizer
        from stages.evaluate import pick_device

        if ar_decode not in ("beam", "greedy"):
            raise ValueError(f"ar_decode={ar_decode!r}: expected 'beam' or 'greedy'")
        ckpt = resolve_checkpoint(model_dir)
        self.device = pick_device(device)
        self.model = load_model(ckpt, device=self.device)
        self.kind: Literal["ar", "narvl"] = "narvl" if hasattr(self.model, "queries") else "ar"
        self.tokenizer = Tokenizer.load(tokenizer_dir)
        cfg = self.model.cfg
        if cfg.vocab_size is not None and cfg.vocab_size != self.tokenizer.vocab_size:
            raise ValueError(f"{tokenizer_dir}: tokenizer vocabulary {self.tokenizer.vocab_size} != the model's "
                             f"{cfg.vocab_size} ({ckpt}); pass the tokenizer the model was trained with")
        self.ar_decode, self.beam_size, self.max_len = ar_decode, beam_size, max_len
        self.max_image_bytes = max_image_bytes

    @property
    def decoding(self) -> str:
        """How this predictor decodes, e.g. "narvl" or "ar-beam5"."""
        if self.kind == "narvl":
            return "narvl"
        return "ar-greedy" if self.ar_decode == "greedy" else f"ar-beam{self.beam_size}"

    def prepare(self, task: str, image: bytes, text: Any = None, premise: Any = None) -> Prepared:
        """Check one request and build its model inputs; RequestError (with an HTTP status) when it is bad."""
        from PIL import Image

        from stages.data.schema import task_prompt
        from stages.data.shards import DataError, decode_image

        fields = check_text(task, text, premise)
        if not isinstance(image, bytes | bytearray) or not image:
            raise RequestError("field 'image': expected the bytes of a PNG/JPEG image, got none")
        if len(image) > self.max_image_bytes:
            raise RequestError(f"field 'image': {len(image)} bytes, at most {self.max_image_bytes}", status=413)
        try:
            with Image.open(io.BytesIO(image)) as img:
                size = img.size
            pixels = decode_image(bytes(image), self.model.cfg.image_size, "field 'image'")
        except (DataError, OSError, Image.DecompressionBombError) as e:
            raise RequestError(f"field 'image': {len(image)} bytes that are not a readable PNG/JPEG image "
                               f"({type(e).__name__})") from e
        tok = self.tokenizer
        prompt = task_prompt(task, fields)
        src = [tok.bos_id, *tok.encode(prompt)[: self.model.cfg.max_source_positions - 2], tok.eos_id]
        return Prepared(task, pixels, src, (int(size[0]), int(size[1])))

    @torch.no_grad()
    def run(self, items: list[Prepared]) -> list[dict[str, Any]]:
        """Decode prepared requests together (one model call per task present), in order.

        Each answer: {"task", "text", "box" (grounding: [x0, y0, x1, y1] pixels or None), "decoding",
        "batch_size" (requests decoded together), "model_ms" (this model call)}.
        """
        from stages.data.shards import _pad
        from stages.evaluate import decode_batch, postprocess

        out: list[dict[str, Any] | None] = [None] * len(items)
        for task in dict.fromkeys(it.task for it in items):
            idx = [i for i, it in enumerate(items) if it.task == task]
            image = torch.from_numpy(np.stack([items[i].image for i in idx])).to(self.device)
            src = _pad([items[i].src for i in idx], self.tokenizer.pad_id).to(self.device)
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            ids = decode_batch(self.model, image, src, task, kind=self.kind, beam_size=self.beam_size,
                               max_len=self.max_len, greedy=self.ar_decode == "greedy")
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            model_ms = (time.perf_counter() - t0) * 1e3
            for i, row in zip(idx, ids, strict=True):
                sample = {"task": task, "image_size": list(items[i].image_size)}
                answer = postprocess(task, row, sample, self.tokenizer)
                text = self.tokenizer.decode(row).strip()
                if task != "grounding":
                    text = answer
                out[i] = {"task": task, "text": text, "box": answer if task == "grounding" else None,
                          "decoding": self.decoding, "batch_size": len(items), "model_ms": model_ms}
        return out  # type: ignore[return-value]

    def predict(self, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """prepare + run for dicts {"task", "image" (bytes), "text", "premise"}; a bad one raises RequestError."""
        return self.run([self.prepare(r["task"], r["image"], r.get("text"), r.get("premise")) for r in requests])
