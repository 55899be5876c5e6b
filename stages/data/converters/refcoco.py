"""RefCOCO / RefCOCO+ / RefCOCOg -> `grounding` shards (`narvl data convert refcoco`), one sample per referring
expression; COCO xywh boxes become xyxy pixels. The official refs pickle is read without running code."""

from __future__ import annotations

import pickle
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from stages.data.converters.base import (
    ConversionError,
    ImageIndex,
    Malformed,
    OnBad,
    Record,
    clean_id,
    get,
    get_list,
    group_splits,
    malformed,
    read_json,
    read_jsonl,
    shown,
    with_default_splits,
    write_task,
)
from stages.data.schema import xywh_to_xyxy


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


def _read_instances(path: Path) -> tuple[dict[int, tuple[int, int]], dict[int, list[float]]]:
    """Image sizes by image id and xywh boxes by annotation id from a COCO `instances.json`; ConversionError naming
    the entry when one is not readable (every expression depends on this file)."""
    data = read_json(path)
    sizes: dict[int, tuple[int, int]] = {}
    boxes: dict[int, list[float]] = {}
    for section in ("images", "annotations"):
        for j, item in enumerate(get_list(data, section, path)):
            try:
                if section == "images":
                    w, h = get(item, "width", "int"), get(item, "height", "int")
                    if w < 1 or h < 1:
                        raise Malformed(f"size {w}x{h} is not positive")
                    sizes[get(item, "id", "int")] = (w, h)
                else:
                    boxes[get(item, "id", "int")] = get(item, "bbox", "box")
            except Malformed as e:
                raise ConversionError(f"{path}: {section}[{j}]: {e}") from None
    return sizes, boxes


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
        sizes, boxes = _read_instances(instances)

    def record(src: str, i: int, rid: str, split: str, expr: str, box_xywh: list, image_id: int,
               file_name: str | None, meta: dict) -> Record:
        p = index.find(file_name, image_id)
        rec = Record(src, i, rid, split, "grounding", {"expression": expr.strip(), "box": xywh_to_xyxy(box_xywh)},
                     meta, image_path=p, missing=None if p else index.describe(file_name, image_id))
        rec.expect_size = sizes.get(image_id)
        return rec

    splits: dict[str, Callable[[], Iterable[Record]]] = {}
    if jsonl is not None:
        def jsonl_records(files: list[tuple[str, Path]], split: str) -> Iterator[Record]:
            for src, path in files:
                per_ann: Counter[int | str] = Counter()
                for i, r in read_jsonl(path):
                    try:
                        if isinstance(r, Malformed):
                            raise r
                        ann_id, image_id = get(r, "ann_id", "id"), get(r, "image_id", "int")
                        box, expr = get(r, "bbox_xywh", "box"), get(r, "sentence", "str")
                        file_name = get(r, "file_name", "str", None)
                    except Malformed as e:
                        yield malformed(path, i, split, "grounding", e)
                        continue
                    k = per_ann[ann_id]
                    per_ann[ann_id] += 1
                    yield record(str(path), i, f"ref_{clean_id(src)}_{clean_id(ann_id)}_{k}", split, expr, box,
                                 image_id, file_name, {"image_id": image_id, "ann_id": ann_id, "source_split": src})

        for split, files in group_splits(jsonl, split_map).items():
            splits[split] = lambda files=files, split=split: jsonl_records(files, split)
        sources = [str(p) for p in jsonl.values()]
    else:
        all_refs = load_refs_pickle(refs)
        mapping = with_default_splits(split_map)
        by_split: dict[str, list[tuple[int, Any]]] = {}
        unplaced: list[tuple[int, Any]] = []  # no readable split: reported with the first split
        for i, r in enumerate(all_refs):
            if isinstance(r, dict) and isinstance(r.get("split"), str):
                by_split.setdefault(mapping.get(r["split"], r["split"]), []).append((i, r))
            else:
                unplaced.append((i, r))
        if unplaced and not by_split:
            raise ConversionError(f"{refs}: no ref has a 'split' string (ref {unplaced[0][0]}: "
                                  f"{shown(unplaced[0][1])})")
        if unplaced:
            by_split[next(iter(by_split))][:0] = unplaced

        def refs_records(items: list[tuple[int, Any]], split: str) -> Iterator[Record]:
            for i, r in items:
                try:
                    get(r, "split", "str")
                    ann_id, image_id = get(r, "ann_id", "int"), get(r, "image_id", "int")
                    file_name = get(r, "file_name", "str", None)
                    if ann_id not in boxes:
                        raise Malformed(f"ann_id {ann_id} is not an annotation of {instances}")
                    sentences = get(r, "sentences", "list")
                    parsed = []
                    for k, sent in enumerate(sentences):
                        try:
                            expr = get(sent, "sent", "str", None)
                            parsed.append((get(sent, "sent_id", "id"), get(sent, "raw", "str") if expr is None
                                           else expr))
                        except Malformed as e:
                            raise Malformed(f"sentences[{k}]: {e}") from None
                except Malformed as e:
                    yield malformed(refs, i, split, "grounding", e, where=f"ref {i}")
                    continue
                for sent_id, expr in parsed:
                    yield record(str(refs), i, f"ref_{clean_id(sent_id)}", split, expr, boxes[ann_id], image_id,
                                 file_name, {"image_id": image_id, "ann_id": ann_id, "ref_id": r.get("ref_id"),
                                             "sent_id": sent_id, "source_split": r["split"]})

        for split, items in by_split.items():
            splits[split] = lambda items=items, split=split: refs_records(items, split)
        sources = [str(refs), str(instances)]
    return write_task("refcoco", "grounding", splits, out_dir, samples_per_shard=samples_per_shard,
                      on_bad=on_bad, workers=workers, resume=resume, progress=progress, sources=sources)

