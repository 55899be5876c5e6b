"""Convert the public datasets the paper uses into the project's shards (`narvl data convert <format>`).

Every converter writes `out_dir/<task>/<split>/{split}-%06d.tar` + `manifest.json` through
`stages.shards.ShardWriter` (the sample schema of `stages/common.py`; dataset name = the format, version =
`VERSION`). One sample per caption image (all references), per question, per referring expression, per
hypothesis. Images keep their original bytes (JPEG/PNG; any other format is re-encoded to PNG and counted);
resizing happens in the loader (`data.image_size`).

Formats and their inputs (`sources` maps a source split name to a file; `split_map` maps source split names to
output splits, default: identity plus the aliases in `DEFAULT_SPLIT_MAP`, e.g. restval -> train, val2014 -> val):

- `coco-caption`: official `captions_*.json` (`captions={split: file}`) or Karpathy's `dataset_coco.json`
  (`karpathy=file`, splits train/restval/val/test from the file), images searched under `images`.
- `vqa`: official VQA v2 `questions={split: file}` + `annotations={split: file}`; `answers` = the 10 annotator
  answers as strings (confidence weights = min(#matches / 3, 1) are derived from them); `meta` keeps answer_type,
  question_type, multiple_choice_answer and the annotators' answer_confidence. Images under `images`, named
  `COCO_{subtype}_{id:012d}.jpg` (2014) or `{id:012d}.jpg` (2017); the folder is searched recursively.
- `refcoco`: either one-expression-per-line JSONL (`jsonl={split: file}`, keys file_name, bbox_xywh, sentence,
  image_id, ann_id) or the official `refs(unc).p` + `instances.json` pair (`refs=file, instances=file`; the pickle
  is read with an unpickler that accepts only builtin containers). COCO xywh boxes become xyxy pixels.
- `snli-ve`: SNLI-VE JSONL (`jsonl={split: file}`; Flickr30K_ID / Flickr30k_ID / Flikr30kID, sentence1 = premise
  caption, sentence2 = hypothesis, gold_label entailment/neutral/contradiction -> yes/maybe/no), images under
  `images` (`<flickr id>.jpg`).
- `ofa-tsv`: OFA's TSV files (`task=...`, `tsv={split: file}`), tab-separated, no header, one sample per line:

  | task       | columns                                                                        |
  |------------|--------------------------------------------------------------------------------|
  | caption    | uniq-id, image-id, caption (references joined by "&&"), object labels, image b64 |
  | vqa        | uniq-id, image-id, question, answers ("conf|!+answer" joined by "&&"), object labels, |
  |            | image b64                                                                      |
  | grounding  | uniq-id, image-id, text, box "x0,y0,x1,y1" (pixels), image b64                 |
  | entailment | uniq-id, image-id, image b64, hypothesis, premise caption, label               |

  OFA's VQA files carry confidences, not the 10 raw answers: each answer is repeated max(1, round(3 * conf))
  times in `answers` (exact for confidences 1/3, 2/3, 1) and the exact confidences are kept in
  `meta.answer_confidence`. Entailment labels may be entailment/neutral/contradiction or yes/maybe/no.

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
import os
import pickle
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

from stages.common import ENTAILMENT_LABELS, task_prompt

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
ENTAILMENT_WORDS = {"entailment": "yes", "neutral": "maybe", "contradiction": "no",
                    "yes": "yes", "maybe": "maybe", "no": "no"}
OnBad = Literal["error", "skip"]


class ConversionError(ValueError):
    """A bad record (or input) in a source dataset; the message names the file, the record and the problem."""


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


def _split_map(split_map: dict[str, str] | None) -> dict[str, str]:
    return {**DEFAULT_SPLIT_MAP, **(split_map or {})}


def _run(fmt: str, task: str, splits: dict[str, Callable[[], Iterable[Record]]], out_dir: Path, *,
         samples_per_shard: int, on_bad: OnBad, workers: int, resume: bool, progress: bool,
         totals: dict[str, int | None] | None = None, sources: list[str] | None = None) -> dict:
    """Write each output split of one task; `splits` maps an output split to a thunk yielding its records."""
    from stages.shards import ShardWriter

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
    if progress:
        print(report["summary"])
    return report


def _progress(enabled: bool):
    if not enabled:
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    bar.start()
    return bar


def _read_json(path: Path | str) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as e:
        raise ConversionError(f"{path}: file not found") from e
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path}: not valid JSON: {e}") from e


def _read_jsonl(path: Path | str) -> Iterator[tuple[int, dict]]:
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


def _group(per_source: dict[str, Any], split_map: dict[str, str] | None) -> dict[str, list[tuple[str, Any]]]:
    """Group source splits by output split, keeping the given order."""
    mapping = _split_map(split_map)
    out: dict[str, list[tuple[str, Any]]] = {}
    for src, value in per_source.items():
        out.setdefault(mapping.get(src, src), []).append((src, value))
    return out


def _clean_id(raw: Any) -> str:
    """Sample ids double as WebDataset keys: no dots (they start the extension), slashes or spaces."""
    return re.sub(r"[^A-Za-z0-9_\-]", "_", str(raw))


# ---- coco-caption -------------------------------------------------------------------------------------------
def convert_coco_caption(out_dir: Path, *, images: Path, captions: dict[str, Path] | None = None,
                         karpathy: Path | None = None, split_map: dict[str, str] | None = None,
                         samples_per_shard: int = 1000, on_bad: OnBad = "error", workers: int = 2,
                         resume: bool = True, progress: bool = True) -> dict:
    """COCO captions -> `caption` shards, one sample per image with all its references.

    Args:
        out_dir: output root; shards go to `out_dir/caption/<split>/`.
        images: folder searched (recursively) for the image files.
        captions: source split -> official `captions_*.json` (e.g. {"train": captions_train2017.json}).
        karpathy: Karpathy's `dataset_coco.json` instead (splits train/restval/val/test; restval -> train).
        split_map: source split -> output split (defaults: `DEFAULT_SPLIT_MAP`).
    """
    if (captions is None) == (karpathy is None):
        raise ConversionError("coco-caption: give either captions={split: captions_*.json} or karpathy=file")
    index = ImageIndex(images)
    mapping = _split_map(split_map)
    splits: dict[str, Callable[[], Iterable[Record]]] = {}
    totals: dict[str, int | None] = {}
    if karpathy is not None:
        data = _read_json(karpathy)
        by_split: dict[str, list[tuple[int, dict]]] = {}
        for i, im in enumerate(data.get("images", [])):
            by_split.setdefault(mapping.get(im.get("split"), im.get("split")), []).append((i, im))

        def karpathy_records(items: list[tuple[int, dict]], split: str) -> Iterator[Record]:
            for i, im in items:
                cocoid = im.get("cocoid", im.get("imgid"))
                path = index.find(im.get("filename"), cocoid)
                yield Record(str(karpathy), i, f"coco_{_clean_id(cocoid)}", split, "caption",
                             {"references": [s.get("raw", " ".join(s.get("tokens", []))).strip()
                                             for s in im.get("sentences", [])]},
                             {"image_id": cocoid, "file_name": im.get("filename"),
                              "source_split": im.get("split")},
                             image_path=path, missing=None if path else index.describe(im.get("filename"), cocoid))

        for split, items in by_split.items():
            splits[split] = lambda items=items, split=split: karpathy_records(items, split)
            totals[split] = len(items)
        sources = [str(karpathy)]
    else:
        grouped = _group(captions, split_map)
        sources = [str(p) for p in captions.values()]

        def official_records(files: list[tuple[str, Path]], split: str) -> Iterator[Record]:
            for _, path in files:
                data = _read_json(path)
                refs: dict[int, list[str]] = {}
                for a in data.get("annotations", []):
                    refs.setdefault(a["image_id"], []).append(str(a.get("caption", "")).strip())
                for i, im in enumerate(data.get("images", [])):
                    p = index.find(im.get("file_name"), im["id"])
                    yield Record(str(path), i, f"coco_{_clean_id(im['id'])}", split, "caption",
                                 {"references": refs.get(im["id"], [])},
                                 {"image_id": im["id"], "file_name": im.get("file_name")},
                                 image_path=p,
                                 missing=None if p else index.describe(im.get("file_name"), im["id"]))

        for split, files in grouped.items():
            splits[split] = lambda files=files, split=split: official_records(files, split)
            totals[split] = None
    return _run("coco-caption", "caption", splits, out_dir, samples_per_shard=samples_per_shard, on_bad=on_bad,
                workers=workers, resume=resume, progress=progress, totals=totals, sources=sources)


# ---- vqa ----------------------------------------------------------------------------------------------------
def convert_vqa(out_dir: Path, *, images: Path, questions: dict[str, Path], annotations: dict[str, Path],
                split_map: dict[str, str] | None = None, samples_per_shard: int = 1000, on_bad: OnBad = "error",
                workers: int = 2, resume: bool = True, progress: bool = True) -> dict:
    """Official VQA v2 questions + annotations -> `vqa` shards, one sample per question.

    Args:
        out_dir: output root; shards go to `out_dir/vqa/<split>/`.
        images: COCO image folder (searched recursively; COCO_{subtype}_{id:012d}.jpg or {id:012d}.jpg).
        questions: source split -> `v2_OpenEnded_mscoco_*_questions.json`.
        annotations: source split -> `v2_mscoco_*_annotations.json` (same keys as `questions`).
        split_map: source split -> output split (defaults: `DEFAULT_SPLIT_MAP`).
    """
    if set(questions) != set(annotations):
        raise ConversionError(f"vqa: questions splits {sorted(questions)} differ from annotations splits "
                              f"{sorted(annotations)} (test-dev questions without answers are not supported)")
    index = ImageIndex(images)
    grouped = _group(questions, split_map)

    def records(files: list[tuple[str, Path]], split: str) -> Iterator[Record]:
        for src, qpath in files:
            qdata, apath = _read_json(qpath), annotations[src]
            anns = {a["question_id"]: a for a in _read_json(apath).get("annotations", [])}
            subtype = qdata.get("data_subtype", "")
            for i, q in enumerate(qdata.get("questions", [])):
                qid, image_id = q["question_id"], q["image_id"]
                ann = anns.get(qid)
                if ann is None:
                    raise ConversionError(f"{apath}: no annotation for question {qid} (record {i} of {qpath})")
                name = f"COCO_{subtype}_{image_id:012d}.jpg" if subtype else None
                p = index.find(name, image_id)
                answers = [str(a.get("answer", "")) for a in ann.get("answers", [])]
                meta = {"question_id": qid, "image_id": image_id, "answer_type": ann.get("answer_type"),
                        "question_type": ann.get("question_type"),
                        "multiple_choice_answer": ann.get("multiple_choice_answer"),
                        "answer_confidence": [a.get("answer_confidence") for a in ann.get("answers", [])]}
                yield Record(str(qpath), i, f"vqa_{_clean_id(qid)}", split, "vqa",
                             {"question": str(q.get("question", "")).strip(), "answers": answers}, meta,
                             image_path=p, missing=None if p else index.describe(name, image_id))

    splits = {s: (lambda f=f, s=s: records(f, s)) for s, f in grouped.items()}
    return _run("vqa", "vqa", splits, out_dir, samples_per_shard=samples_per_shard, on_bad=on_bad, workers=workers,
                resume=resume, progress=progress, sources=[str(p) for p in [*questions.values(),
                                                                             *annotations.values()]])


# ---- refcoco ------------------------------------------------------------------------------------------------
class _ContainersOnly(pickle.Unpickler):
    """The refs(unc).p pickle holds only lists/dicts/strings/numbers: refuse every class lookup but containers."""

    ALLOWED = {"dict", "list", "tuple", "set", "frozenset"}

    def find_class(self, module: str, name: str) -> Any:
        if module in ("builtins", "__builtin__") and name in self.ALLOWED:
            return {"dict": dict, "list": list, "tuple": tuple, "set": set, "frozenset": frozenset}[name]
        raise pickle.UnpicklingError(
            f"refusing to load {module}.{name}: refs pickles hold only builtin containers")


def load_refs_pickle(path: Path | str) -> list[dict]:
    """Read the official refs(unc).p (a Python 2 pickle of a list of dicts) without running arbitrary code."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            refs = _ContainersOnly(f, encoding="latin1").load()
    except FileNotFoundError as e:
        raise ConversionError(f"{path}: file not found") from e
    except (pickle.UnpicklingError, EOFError, ValueError) as e:
        raise ConversionError(f"{path}: not a refs pickle: {e}") from e
    if not isinstance(refs, list):
        raise ConversionError(f"{path}: expected a list of refs, got {type(refs).__name__}")
    return refs


def _xywh_to_xyxy(b: list[float]) -> list[float]:
    x, y, w, h = (float(v) for v in b)
    return [x, y, x + w, y + h]


def convert_refcoco(out_dir: Path, *, images: Path, jsonl: dict[str, Path] | None = None,
                    refs: Path | None = None, instances: Path | None = None,
                    split_map: dict[str, str] | None = None, samples_per_shard: int = 1000,
                    on_bad: OnBad = "error", workers: int = 2, resume: bool = True, progress: bool = True) -> dict:
    """RefCOCO / RefCOCO+ / RefCOCOg -> `grounding` shards, one sample per referring expression.

    Args:
        out_dir: output root; shards go to `out_dir/grounding/<split>/`.
        images: COCO image folder (searched recursively, by file name then by image id).
        jsonl: source split -> JSONL with file_name, bbox_xywh, sentence, image_id, ann_id per line.
        refs: the official `refs(unc).p` / `refs(umd).p` (splits from the file: train/val/test/testA/testB).
        instances: the matching `instances.json` (boxes by ann_id, image sizes); needed with `refs`, optional
            with `jsonl` (then each image's size there must match the file's).
        split_map: source split -> output split (defaults: `DEFAULT_SPLIT_MAP`; testA/testB keep their names).
    """
    if (jsonl is None) == (refs is None):
        raise ConversionError("refcoco: give either jsonl={split: file} or refs=refs(unc).p with instances=")
    if refs is not None and instances is None:
        raise ConversionError("refcoco: refs=... needs instances=instances.json (boxes by ann_id)")
    index = ImageIndex(images)
    sizes: dict[int, tuple[int, int]] = {}
    boxes: dict[int, list[float]] = {}
    if instances is not None:
        inst = _read_json(instances)
        sizes = {im["id"]: (im["width"], im["height"]) for im in inst.get("images", [])}
        boxes = {a["id"]: a["bbox"] for a in inst.get("annotations", [])}

    def record(src: str, i: int, rid: str, split: str, expr: Any, box_xywh: Any, image_id: int,
               file_name: str | None, meta: dict) -> Record:
        p = index.find(file_name, image_id)
        rec = Record(src, i, rid, split, "grounding",
                     {"expression": str(expr or "").strip(), "box": _xywh_to_xyxy(box_xywh)}, meta,
                     image_path=p, missing=None if p else index.describe(file_name, image_id))
        rec.expect_size = sizes.get(image_id)
        return rec

    splits: dict[str, Callable[[], Iterable[Record]]] = {}
    if jsonl is not None:
        def jsonl_records(files: list[tuple[str, Path]], split: str) -> Iterator[Record]:
            for src, path in files:
                per_ann: Counter[int] = Counter()
                for i, r in _read_jsonl(path):
                    k = per_ann[r["ann_id"]]
                    per_ann[r["ann_id"]] += 1
                    yield record(str(path), i, f"ref_{_clean_id(src)}_{r['ann_id']}_{k}", split, r.get("sentence"),
                                 r["bbox_xywh"], r["image_id"], r.get("file_name"),
                                 {"image_id": r["image_id"], "ann_id": r["ann_id"], "source_split": src})

        for split, files in _group(jsonl, split_map).items():
            splits[split] = lambda files=files, split=split: jsonl_records(files, split)
        sources = [str(p) for p in jsonl.values()]
    else:
        all_refs = load_refs_pickle(refs)
        mapping = _split_map(split_map)
        by_split: dict[str, list[tuple[int, dict]]] = {}
        for i, r in enumerate(all_refs):
            by_split.setdefault(mapping.get(r.get("split"), r.get("split")), []).append((i, r))

        def refs_records(items: list[tuple[int, dict]], split: str) -> Iterator[Record]:
            for i, r in items:
                if r["ann_id"] not in boxes:
                    raise ConversionError(f"{refs}: ref {i} (ref_id {r.get('ref_id')}): ann_id {r['ann_id']} "
                                          f"not in {instances}")
                for s in r.get("sentences", []):
                    expr = s.get("sent", s.get("raw"))
                    yield record(str(refs), i, f"ref_{_clean_id(s['sent_id'])}", split, expr,
                                 boxes[r["ann_id"]], r["image_id"], r.get("file_name"),
                                 {"image_id": r["image_id"], "ann_id": r["ann_id"], "ref_id": r.get("ref_id"),
                                  "sent_id": s["sent_id"], "source_split": r.get("split")})

        for split, items in by_split.items():
            splits[split] = lambda items=items, split=split: refs_records(items, split)
        sources = [str(refs), str(instances)]
    return _run("refcoco", "grounding", splits, out_dir, samples_per_shard=samples_per_shard, on_bad=on_bad,
                workers=workers, resume=resume, progress=progress, sources=sources)


# ---- snli-ve ------------------------------------------------------------------------------------------------
FLICKR_KEYS = ("Flickr30K_ID", "Flickr30k_ID", "Flikr30kID", "flickr30k_id")


def convert_snli_ve(out_dir: Path, *, images: Path, jsonl: dict[str, Path],
                    split_map: dict[str, str] | None = None, samples_per_shard: int = 1000,
                    on_bad: OnBad = "error", workers: int = 2, resume: bool = True, progress: bool = True) -> dict:
    """SNLI-VE JSONL -> `entailment` shards, one sample per hypothesis (premise = sentence1, the caption).

    Args:
        out_dir: output root; shards go to `out_dir/entailment/<split>/`.
        images: Flickr30k image folder (`<flickr id>.jpg`, searched recursively).
        jsonl: source split -> `snli_ve_{train,dev,test}.jsonl` (dev -> val by default).
        split_map: source split -> output split (defaults: `DEFAULT_SPLIT_MAP`).
    """
    index = ImageIndex(images)

    def records(files: list[tuple[str, Path]], split: str) -> Iterator[Record]:
        for _, path in files:
            for i, r in _read_jsonl(path):
                fid = next((str(r[k]) for k in FLICKR_KEYS if k in r), None)
                if fid is None:
                    raise ConversionError(f"{path}: record {i}: no Flickr30k image id (one of {FLICKR_KEYS})")
                name = fid if fid.lower().endswith((".jpg", ".jpeg", ".png")) else f"{fid}.jpg"
                number = int(m.group(1)) if (m := re.match(r"(\d+)", fid)) else None
                p = index.find(name, number)
                raw = r.get("gold_label")
                rid = r.get("pairID") or f"{Path(path).stem}_{i}"
                yield Record(str(path), i, f"snli_{_clean_id(rid)}", split, "entailment",
                             {"premise": str(r.get("sentence1") or "").strip(),
                              "hypothesis": str(r.get("sentence2") or "").strip(),
                              "label": ENTAILMENT_WORDS.get(str(raw).strip().lower(), raw)},
                             {"flickr30k_id": fid, "pair_id": r.get("pairID"), "gold_label": raw},
                             image_path=p, missing=None if p else index.describe(name, number))

    splits = {s: (lambda f=f, s=s: records(f, s)) for s, f in _group(jsonl, split_map).items()}
    return _run("snli-ve", "entailment", splits, out_dir, samples_per_shard=samples_per_shard, on_bad=on_bad,
                workers=workers, resume=resume, progress=progress, sources=[str(p) for p in jsonl.values()])


# ---- ofa-tsv ------------------------------------------------------------------------------------------------
TSV_COLUMNS = {"caption": 5, "vqa": 6, "grounding": 5, "entailment": 6}


def _parse_ofa_answers(raw: str) -> tuple[list[str], dict[str, float]]:
    answers: list[str] = []
    conf: dict[str, float] = {}
    for item in raw.split("&&"):
        if not item.strip():
            continue
        c, sep, ans = item.partition("|!+")
        if not sep:
            raise ValueError(f"answer {item!r} is not 'confidence|!+answer'")
        conf[ans] = float(c)
        answers += [ans] * max(1, round(3 * float(c)))
    return answers, conf


def _tsv_record(task: str, cols: list[str], src: str, i: int, split: str) -> Record:
    uid, image_id = cols[0], cols[1]
    meta: dict[str, Any] = {"uniq_id": uid, "image_id": image_id}
    if task == "caption":
        fields: dict[str, Any] = {"references": [c.strip() for c in cols[2].split("&&")]}
        b64 = cols[4]
    elif task == "vqa":
        answers, conf = _parse_ofa_answers(cols[3])
        fields = {"question": cols[2].strip(), "answers": answers}
        meta["answer_confidence"] = conf
        b64 = cols[5]
    elif task == "grounding":
        box = [float(v) for v in cols[3].split(",")]
        if len(box) != 4:
            raise ValueError(f"box {cols[3]!r} does not have four numbers")
        fields = {"expression": cols[2].strip(), "box": box}
        b64 = cols[4]
    else:
        raw = cols[5].strip()
        fields = {"premise": cols[4].strip(), "hypothesis": cols[3].strip(),
                  "label": ENTAILMENT_WORDS.get(raw.lower(), raw)}
        b64 = cols[2]
    return Record(src, i, f"ofa_{_clean_id(uid)}", split, task, fields, meta, image_b64=b64.strip())


def convert_ofa_tsv(out_dir: Path, *, task: str, tsv: dict[str, Path], split_map: dict[str, str] | None = None,
                    samples_per_shard: int = 1000, on_bad: OnBad = "error", workers: int = 2, resume: bool = True,
                    progress: bool = True) -> dict:
    """OFA's TSV files (see the module docstring for the columns) -> `<task>` shards.

    Args:
        out_dir: output root; shards go to `out_dir/<task>/<split>/`.
        task: caption | vqa | grounding | entailment (the TSV layout).
        tsv: source split -> TSV file (e.g. {"train": caption_stage1_train.tsv, "test": caption_test.tsv}).
        split_map: source split -> output split (defaults: `DEFAULT_SPLIT_MAP`).
    """
    if task not in TSV_COLUMNS:
        raise ConversionError(f"ofa-tsv: unknown task {task!r}; one of {sorted(TSV_COLUMNS)}")
    ncols = TSV_COLUMNS[task]

    def records(files: list[tuple[str, Path]], split: str) -> Iterator[Record]:
        for _, path in files:
            if not Path(path).exists():
                raise ConversionError(f"{path}: file not found")
            with open(path, encoding="utf-8") as f:
                for i, line in enumerate(f):
                    line = line.rstrip("\r\n")
                    if not line:
                        continue
                    cols = line.split("\t")
                    if len(cols) != ncols:
                        yield Record(str(path), i, f"{Path(path).stem}_line{i}", split, task, {}, bad=(
                            "malformed", f"{len(cols)} tab-separated columns, a {task} TSV line has {ncols}"))
                        continue
                    try:
                        yield _tsv_record(task, cols, str(path), i, split)
                    except ValueError as e:
                        yield Record(str(path), i, f"ofa_{_clean_id(cols[0])}", split, task, {},
                                     bad=("malformed", str(e)))

    splits = {s: (lambda f=f, s=s: records(f, s)) for s, f in _group(tsv, split_map).items()}
    return _run("ofa-tsv", task, splits, out_dir, samples_per_shard=samples_per_shard, on_bad=on_bad,
                workers=workers, resume=resume, progress=progress, sources=[str(p) for p in tsv.values()])


# ---- dispatcher ---------------------------------------------------------------------------------------------
CONVERTERS: dict[str, Callable[..., dict]] = {
    "coco-caption": convert_coco_caption,
    "vqa": convert_vqa,
    "refcoco": convert_refcoco,
    "snli-ve": convert_snli_ve,
    "ofa-tsv": convert_ofa_tsv,
}


def convert(fmt: str, args: dict[str, Any], out_dir: Path) -> dict:
    """Run the converter of `fmt` with keyword `args` (see each `convert_<format>`); return its report."""
    if fmt not in CONVERTERS:
        raise ConversionError(f"unknown format {fmt!r}; one of {', '.join(FORMATS)}")
    return CONVERTERS[fmt](Path(out_dir), **args)
