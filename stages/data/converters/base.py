"""What every converter shares: the record a parser yields, the image index, validation (in a process pool) and
the driver that writes a task's splits through `stages.data.shards.ShardWriter`.

Validation (every record): missing image file, undecodable image (a full PIL decode), box outside the image by
more than `BOX_TOLERANCE` px (smaller overhangs are clipped and counted) or degenerate (x1 <= x0 or y1 <= y0),
empty text, unknown label, duplicate id, and (found by the parsers, reason `malformed`) a record without a field
its format needs or with a value of the wrong type, a JSONL line that is not JSON, an annotation that names no
image. `on_bad="error"` raises `ConversionError` naming the source file, the record index and id, the field and
what was expected; `on_bad="skip"` counts by reason (report["skipped"], and the summary line). A source file
that is unreadable or not the expected JSON document is a `ConversionError` either way.

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
import math
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


class Malformed(ValueError):
    """A record without a field its format needs, or with a value of the wrong type (raised by `get` in the
    parsers, which turn it into a bad record of reason `malformed`); the message names the field and what was
    expected."""


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
    where: str | None = None  # how a message names it when not "record <index>" (e.g. "annotations[3]")


_MISSING = object()
_KINDS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "int": ("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    "str": ("a string", lambda v: isinstance(v, str)),
    "id": ("an integer or a string", lambda v: isinstance(v, int | str) and not isinstance(v, bool)),
    "list": ("a list", lambda v: isinstance(v, list)),
    "box": ("[x, y, width, height]: four finite numbers",
            lambda v: isinstance(v, list) and len(v) == 4 and all(
                isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) for x in v)),
}


def shown(value: Any, limit: int = 60) -> str:
    """A value for an error message: its repr, cut to `limit` characters, and its type."""
    r = repr(value)
    return f"{r[:limit]}{'...' if len(r) > limit else ''} ({type(value).__name__})"


def get(obj: Any, key: str, kind: str, default: Any = _MISSING) -> Any:
    """`obj[key]`, checked to be of `kind` (int, str, id, list, box); Malformed naming the field otherwise.
    With `default`, a missing key (or a null value) gives the default instead."""
    if not isinstance(obj, dict):
        raise Malformed(f"expected a JSON object with {key!r}, got {shown(obj)}")
    what, ok = _KINDS[kind]
    if obj.get(key) is None and default is not _MISSING:
        return default
    if key not in obj:
        raise Malformed(f"no {key!r} field (expected {what})")
    if not ok(obj[key]):
        raise Malformed(f"{key!r} is {shown(obj[key])}, expected {what}")
    return obj[key]


def get_list(obj: Any, key: str, source: Path | str) -> list:
    """A document's top-level list (`images`, `annotations`, `questions`); ConversionError when the file is not
    such a document (a file-level problem: no record of it can be read)."""
    if not isinstance(obj, dict):
        raise ConversionError(f"{source}: expected a JSON object holding the {key!r} list, got {type(obj).__name__}")
    value = obj.get(key)
    if not isinstance(value, list):
        got = "nothing" if key not in obj else shown(value)
        raise ConversionError(f"{source}: {key!r} must be a list, got {got}")
    return value


def malformed(source: Path | str, index: int, split: str, task: str, error: Exception, id: str = "",
              where: str | None = None) -> Record:
    """A bad record (reason `malformed`) for a source record the parser could not read."""
    return Record(str(source), index, id, split, task, {}, bad=("malformed", str(error)), where=where)


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
            what = "is not a folder" if self.root.exists() else "does not exist"
            raise ConversionError(f"image folder {self.root} {what}")
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
        raise ConversionError(f"on_bad={on_bad!r}: use 'error' (stop at the first bad record) or 'skip' (count it)")
    if isinstance(samples_per_shard, bool) or not isinstance(samples_per_shard, int) or samples_per_shard < 1:
        raise ConversionError(f"samples_per_shard={samples_per_shard!r}: expected a whole number >= 1")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ConversionError(f"workers={workers!r}: expected a whole number >= 1")
    if not splits:
        raise ConversionError(f"{fmt}: no records in {', '.join(sources or []) or 'the sources'} (no split found)")
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
                    named = f"{rec.where or f'record {rec.index}'}" + (f" (id {rec.id!r})" if rec.id else "")
                    msg = f"{rec.source}: {named}: {a}: {b}"
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
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    # markup off: split names come from the user (`--captions "a[/b]=file"` must not be read as a style)
    # on stderr: stdout carries the report (`narvl data convert ... > report.json`)
    bar = Progress(TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), console=Console(stderr=True))
    bar.start()
    return bar


def read_json(path: Path | str) -> Any:
    """A JSON source file; ConversionError naming it when it is missing, unreadable or not JSON."""
    path = Path(path)
    try:
        return json.loads(path.read_bytes())
    except FileNotFoundError as e:
        raise ConversionError(f"{path}: file not found") from e
    except OSError as e:
        raise ConversionError(f"{path}: cannot read ({type(e).__name__}: {e})") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConversionError(f"{path}: not valid JSON: {e}") from e
    except RecursionError as e:
        raise ConversionError(f"{path}: JSON nested too deeply to read") from e


def read_lines(path: Path | str) -> Iterator[tuple[int, str | Malformed]]:
    """(line index, text without the line break) per non-empty line of a UTF-8 text file; a line that is not
    UTF-8 gives a `Malformed` in place of the text. ConversionError when the file is missing or unreadable."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            for i, raw in enumerate(f):
                raw = raw.rstrip(b"\r\n")
                if not raw.strip():
                    continue
                try:
                    yield i, raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    yield i, Malformed(f"line {i + 1} is not UTF-8 text: {e}")
    except FileNotFoundError as e:
        raise ConversionError(f"{path}: file not found") from e
    except OSError as e:
        raise ConversionError(f"{path}: cannot read ({type(e).__name__}: {e})") from e


def read_jsonl(path: Path | str) -> Iterator[tuple[int, Any]]:
    """(line index, object) per non-empty line; a line that is not JSON gives a `Malformed` in place of the
    object (the parser makes it a bad record). ConversionError when the file is missing or unreadable."""
    for i, line in read_lines(path):
        if isinstance(line, Malformed):
            yield i, line
            continue
        try:
            yield i, json.loads(line)
        except json.JSONDecodeError as e:
            yield i, Malformed(f"line {i + 1} is not valid JSON: {e}")
        except RecursionError:
            yield i, Malformed(f"line {i + 1}: JSON nested too deeply to read")


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
