"""COCO captions -> `caption` shards (`narvl data convert coco-caption`), one sample per image with all its
references: the official `captions_*.json` files or Karpathy's `dataset_coco.json`."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from stages.data.converters.base import (
    ConversionError,
    ImageIndex,
    OnBad,
    Record,
    clean_id,
    group_splits,
    read_json,
    with_default_splits,
    write_task,
)


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
    mapping = with_default_splits(split_map)
    splits: dict[str, Callable[[], Iterable[Record]]] = {}
    totals: dict[str, int | None] = {}
    if karpathy is not None:
        data = read_json(karpathy)
        by_split: dict[str, list[tuple[int, dict]]] = {}
        for i, im in enumerate(data.get("images", [])):
            by_split.setdefault(mapping.get(im.get("split"), im.get("split")), []).append((i, im))

        def karpathy_records(items: list[tuple[int, dict]], split: str) -> Iterator[Record]:
            for i, im in items:
                cocoid = im.get("cocoid", im.get("imgid"))
                path = index.find(im.get("filename"), cocoid)
                yield Record(str(karpathy), i, f"coco_{clean_id(cocoid)}", split, "caption",
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
        grouped = group_splits(captions, split_map)
        sources = [str(p) for p in captions.values()]

        def official_records(files: list[tuple[str, Path]], split: str) -> Iterator[Record]:
            for _, path in files:
                data = read_json(path)
                refs: dict[int, list[str]] = {}
                for a in data.get("annotations", []):
                    refs.setdefault(a["image_id"], []).append(str(a.get("caption", "")).strip())
                for i, im in enumerate(data.get("images", [])):
                    p = index.find(im.get("file_name"), im["id"])
                    yield Record(str(path), i, f"coco_{clean_id(im['id'])}", split, "caption",
                                 {"references": refs.get(im["id"], [])},
                                 {"image_id": im["id"], "file_name": im.get("file_name")},
                                 image_path=p,
                                 missing=None if p else index.describe(im.get("file_name"), im["id"]))

        for split, files in grouped.items():
            splits[split] = lambda files=files, split=split: official_records(files, split)
            totals[split] = None
    return write_task("coco-caption", "caption", splits, out_dir, samples_per_shard=samples_per_shard,
                      on_bad=on_bad, workers=workers, resume=resume, progress=progress, totals=totals,
                      sources=sources)

