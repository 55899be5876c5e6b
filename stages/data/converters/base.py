"""What every converter shares: the record a parser yields, the image index, validation (in a process pool) and
the driver that writes a task's splits through `stages.data.shards.ShardWriter`.

Validation (every record): missing image file, undecodable image (a full PIL decode), box outside the image by
more than `BOX_TOLERANCE` px (smaller overhangs are clipped and counted) or degenerate (x1 <= x0 or y1 <= y0),
empty text, unknown label, duplicate id. `on_bad="error"` raises `ConversionError` naming the source file, the
record index and id, and the problem; `on_bad="skip"` counts by reason (report["skipped"], and the summary line).

Resume: a split whose manifest.json exists is skipped when `resume=True`. A split without a manifest (interrupted)
is removed and converted again from scratch (a manifest is only written by `ShardWriter.close`, after all
shards). With `resume=False` every split is rebuilt. A split left with no valid record is an error either way.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import os
import re
import shutil
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from PIL import Image

from stages.data.schema import ENTAILMENT_LABELS, snli_ve_label, task_prompt
from stages.data.shards import ShardWriter

_log = logging.getLogger(__name__)

VERSION = 1
FORMATS = ("coco-caption", "vqa", "refcoco", "snli-ve", "ofa-tsv")
BOX_TOLERANCE = 1.0  # px: COCO boxes sometimes overhang the image by rounding; clip those, reject larger ones
CHUNK = 16  # records per pool task
DEFAULT_SPLIT_MAP = {
    "train": "train", "restval": "train", "train2014": "train", "train2017": "train",
    "val": "val", "val2014": "val", "val2017": "val", "minival": "val",
    "test": "test", "test2014": "test", "test2015": "test", "test2017": "test", "testdev": "test",
    "test-dev": "test", "testA": "testA", "testB": "testB", "dev": "val",
}
OnBad = Literal["error", "skip"]


class ConversionError(ValueError):
    """A bad record (or input) in a source dataset; the message names the file, the record and the problem."""


def entailment_word(raw: Any) -> Any:
    """A source's entailment label as the answer word; an unknown label stays as it is, so that validation
    reports it (reason `unknown_label`) with the record it came from."""
    try:
        return snli_ve_label(raw)
    except ValueError:
        return raw


@dataclass
class Record:
    """One sample before its image is read: what a parser yields and a pool worker validates."""

    source: str
    index: int
    id: str
    split: str
    task: str
    fields: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict)
    image_path: str | None = None
    image_b64: str | None = None
    missing: str | None = None  # why the image could not be located, when the parser already knows
    bad: tuple[str, str] | None = None  # (reason, message) when the parser already found the record broken
    expect_size: tuple[int, int] | None = None  # (w, h) from an annotation file; must match the image


# ---- images -------------------------------------------------------------------------------------------------
class ImageIndex:
    """All image files under a folder, by file name and by the number in the name (COCO / Flickr ids)."""

    def __init__(self, root: Path | str | None) -> None:
        self.root = Path(root) if root else None
        self.by_name: dict[str, str] = {}
        self.by_number: dict[int, str] = {}
        if self.root is None:
            return
        if not self.root.is_dir():
            raise ConversionError(f"image folder {self.root} does not exist")
        for dirpath, _, files in sorted(os.walk(self.root)):
            for f in sorted(files):
                if not f.lower().endswith((".jpg", ".jpeg", ".png")):
                    continue
                path = os.path.join(dirpath, f)
                self.by_name.setdefault(f, path)
                m = re.search(r"(\d+)\.(?:jpe?g|png)$", f, re.IGNORECASE)
                if m:
                    self.by_number.setdefault(int(m.group(1)), path)

    def find(self, name: str | None = None, number: int | None = None) -> str | None:
        if name:
            base = os.path.basename(name)
            if base in self.by_name:
                return self.by_name[base]
        if number is not None:
            return self.by_number.get(int(number))
        return None

    def describe(self, name: str | None = None, number: int | None = None) -> str:
        parts = (repr(name) if name else "", f"id {number}" if number is not None else "")
        what = " or ".join(x for x in parts if x)
        return f"no image file for {what} under {self.root}"


def _decode_image(data: bytes) -> tuple[tuple[int, int], str, bytes, bool]:
    """Fully decode an image; return (size, ext, bytes to store, re-encoded?)."""
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        size, fmt = im.size, im.format
        if fmt == "JPEG":
            return size, "jpg", data, False
        if fmt == "PNG":
            return size, "png", data, False
        buf = io.BytesIO()
        im.convert("RGB").save(buf, format="PNG")
        return size, "png", buf.getvalue(), True


# ---- validation (runs in the pool) --------------------------------------------------------------------------
Result = tuple[str, Any, Any, Any]  # ("ok", sample, image bytes, ext-and-flags) | ("bad", reason, message, None)


def _check_text(rec: Record) -> tuple[str, str] | None:
    f = rec.fields
    texts: list[tuple[str, Any]] = []
    if rec.task == "caption":
        refs = f.get("references") or []
        if not refs:
            return "empty_text", "no references"
        texts = [(f"references[{i}]", r) for i, r in enumerate(refs)]
    elif rec.task == "vqa":
        texts = [("question", f.get("question"))]
        answers = f.get("answers") or []
        if not answers:
            return "empty_text", "no answers"
        texts += [(f"answers[{i}]", a) for i, a in enumerate(answers)]
    elif rec.task == "grounding":
        texts = [("expression", f.get("expression"))]
    elif rec.task == "entailment":
        texts = [("premise", f.get("premise")), ("hypothesis", f.get("hypothesis"))]
        if f.get("label") not in ENTAILMENT_LABELS:
            return "unknown_label", f"label {f.get('label')!r} not one of {ENTAILMENT_LABELS}"
    for name, t in texts:
        if not isinstance(t, str) or not t.strip():
            return "empty_text", f"{name} is empty ({t!r})"
    return None


def _build(rec: Record) -> Result:
    bad = rec.bad or _check_text(rec)
    if bad:
        return ("bad", *bad, None)
    if rec.image_b64 is not None:
        try:
            data = base64.b64decode(rec.image_b64, validate=False)
        except (binascii.Error, ValueError) as e:
            return "bad", "bad_image", f"base64 image does not decode: {e}", None
    else:
        if rec.missing or not rec.image_path:
            return "bad", "missing_image", rec.missing or "no image path", None
        try:
            data = Path(rec.image_path).read_bytes()
        except OSError as e:
            return "bad", "missing_image", f"cannot read image {rec.image_path}: {e}", None
    try:
        (w, h), ext, data, reencoded = _decode_image(data)
    except Exception as e:  # PIL raises many types for broken files
        where = rec.image_path or "base64 image"
        return "bad", "bad_image", f"cannot decode {where}: {type(e).__name__}: {e}", None
    if rec.expect_size is not None and tuple(rec.expect_size) != (w, h):
        return "bad", "size_mismatch", f"image is {w}x{h}, the annotations say {rec.expect_size}", None
    fields = dict(rec.fields)
    clipped = False
    if rec.task == "grounding":
        box = [float(v) for v in fields["box"]]
        x0, y0, x1, y1 = box
        if not (x1 > x0 and y1 > y0):
            return "bad", "bad_box", f"degenerate box {box} (needs x1 > x0 and y1 > y0)", None
        t = BOX_TOLERANCE
        if x0 < -t or y0 < -t or x1 > w + t or y1 > h + t:
            return "bad", "bad_box", f"box {box} outside the {w}x{h} image", None
        clip = [min(max(x0, 0.0), w), min(max(y0, 0.0), h), min(max(x1, 0.0), w), min(max(y1, 0.0), h)]
        clipped = clip != box
        fields["box"] = clip
    sample = {"id": rec.id, "task": rec.task, "image_size": [w, h], **fields}
    sample["prompt"] = task_prompt(rec.task, sample)
    if rec.meta:
        sample["meta"] = rec.meta
    return "ok", sample, data, (ext, reencoded, clipped)


def _build_chunk(recs: list[Record]) -> list[Result]:
    return [_build(r) for r in recs]


# ---- the driver shared by every format ----------------------------------------------------------------------
def _chunks(records: Iterable[Record], n: int) -> Iterator[list[Record]]:
    buf: list[Record] = []
    for r in records:
        buf.append(r)
        if len(buf) == n:
            yield buf
            buf = []
    if buf:
        yield buf


def _results(records: Iterable[Record], pool: ProcessPoolExecutor | None, window: int) -> Iterator[
        tuple[Record, Result]]:
    """Validate records in order, with at most `window` chunks in flight (TSV images stay out of memory)."""
    if pool is None:
        for rec in records:
            yield rec, _build(rec)
        return
    pending: deque[tuple[list[Record], Future]] = deque()
    for chunk in _chunks(records, CHUNK):
        pending.append((chunk, pool.submit(_build_chunk, chunk)))
        if len(pending) >= window:
            recs, fut = pending.popleft()
            yield from zip(recs, fut.result(), strict=True)
    while pending:
        recs, fut = pending.popleft()
        yield from zip(recs, fut.result(), strict=True)


def with_default_splits(split_map: dict[str, str] | None) -> dict[str, str]:
    """`DEFAULT_SPLIT_MAP` updated with the caller's source -> output split names."""
    return {**DEFAULT_SPLIT_MAP, **(split_map or {})}


def write_task(fmt: str, task: str, splits: dict[str, Callable[[], Iterable[Record]]], out_dir: Path, *,
               samples_per_shard: int, on_bad: OnBad, workers: int, resume: bool, progress: bool,
               totals: dict[str, int | None] | None = None, sources: list[str] | None = None) -> dict:
    """Write each output split of one task; `splits` maps an output split to a thunk yielding its records."""
    if on_bad not in ("error", "skip"):
        raise ValueError(f"on_bad={on_bad!r}: use 'error' or 'skip'")
    task_dir = Path(out_dir) / task
    report: dict[str, Any] = {"format": fmt, "task": task, "version": VERSION, "out_dir": str(task_dir),
                              "splits": {}, "skipped": {}, "clipped_boxes": 0, "reencoded_images": 0}
    skipped: Counter[str] = Counter()
    seen: set[str] = set()
    t_all, n_all = time.perf_counter(), 0
    pool = ProcessPoolExecutor(max_workers=workers) if workers > 1 else None
    bar = _progress(progress)
    try:
        for split, records in splits.items():
            split_dir = task_dir / split
            if resume and (split_dir / "manifest.json").exists():
                manifest = json.loads((split_dir / "manifest.json").read_text())
                report["splits"][split] = {"status": "finished earlier", "count": manifest.get("count")}
                continue
            if split_dir.exists():
                shutil.rmtree(split_dir)  # interrupted or rebuilt: start this split from scratch
            split_dir.mkdir(parents=True)
            t0, count, split_skips = time.perf_counter(), 0, Counter()
            examples: dict[str, str] = {}
            bar_task = bar.add_task(f"{fmt} {task}/{split}", total=(totals or {}).get(split)) if bar else None
            writer = ShardWriter(split_dir, split, samples_per_shard)
            for rec, (status, a, b, c) in _results(records(), pool, window=max(2, 4 * workers)):
                if status == "ok" and rec.id in seen:
                    status, a, b = "bad", "duplicate_id", f"id {rec.id!r} appears twice"
                if status == "bad":
                    msg = f"{rec.source}: record {rec.index} (id {rec.id!r}): {a}: {b}"
                    if on_bad == "error":
                        raise ConversionError(msg)
                    split_skips[a] += 1
                    examples.setdefault(a, msg)
                else:
                    seen.add(rec.id)
                    ext, reencoded, clipped = c
                    report["reencoded_images"] += int(reencoded)
                    report["clipped_boxes"] += int(clipped)
                    writer.write(a, b, ext)
                    count += 1
                if bar is not None:
                    bar.advance(bar_task)
            if count == 0:
                raise ConversionError(f"{fmt}: split {split!r} has no valid record (skipped: {dict(split_skips)})")
            writer.close({"name": fmt, "version": VERSION, "seed": 0, "sources": sources or [],
                          "skipped": dict(split_skips)})
            dt = time.perf_counter() - t0
            report["splits"][split] = {"status": "converted", "count": count, "skipped": dict(split_skips),
                                       "skip_examples": examples, "seconds": round(dt, 3),
                                       "samples_per_s": round(count / dt, 1) if dt > 0 else None}
            skipped.update(split_skips)
            n_all += count
    finally:
        if bar is not None:
            bar.stop()
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    dt = time.perf_counter() - t_all
    report["skipped"] = dict(skipped)
    report["count"] = n_all
    report["seconds"] = round(dt, 3)
    report["samples_per_s"] = round(n_all / dt, 1) if dt > 0 and n_all else None
    parts = [f"{s}={v['count']}" + ("" if v["status"] == "converted" else " (finished earlier)")
             for s, v in report["splits"].items()]
    skip_s = ", ".join(f"{k}={v}" for k, v in sorted(skipped.items())) or "none"
    report["summary"] = (f"{fmt} -> {task_dir}: {', '.join(parts)}; skipped {sum(skipped.values())} ({skip_s}); "
                         f"{n_all} samples in {dt:.1f}s")
    _log.info(report["summary"])
    return report


def _progress(enabled: bool):
    if not enabled:
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    bar.start()
    return bar


def read_json(path: Path | str) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as e:
        raise ConversionError(f"{path}: file not found") from e
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path}: not valid JSON: {e}") from e


def read_jsonl(path: Path | str) -> Iterator[tuple[int, dict]]:
    path = Path(path)
    if not path.exists():
        raise ConversionError(f"{path}: file not found")
    with path.open() as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            try:
                yield i, json.loads(line)
            except json.JSONDecodeError as e:
                raise ConversionError(f"{path}: line {i + 1} is not valid JSON: {e}") from e


def group_splits(per_source: dict[str, Any], split_map: dict[str, str] | None
                 ) -> dict[str, list[tuple[str, Any]]]:
    """Group source splits by output split, keeping the given order."""
    mapping = with_default_splits(split_map)
    out: dict[str, list[tuple[str, Any]]] = {}
    for src, value in per_source.items():
        out.setdefault(mapping.get(src, src), []).append((src, value))
    return out


def clean_id(raw: Any) -> str:
    """Sample ids double as WebDataset keys: no dots (they start the extension), slashes or spaces."""
    return re.sub(r"[^A-Za-z0-9_\-]", "_", str(raw))
