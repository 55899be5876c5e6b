"""COCO captions -> `caption` shards (`narvl data convert coco-caption`), one sample per image with all its
references: the official `captions_*.json` files or Karpathy's `dataset_coco.json`."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

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
        images_list = get_list(read_json(karpathy), "images", karpathy)
        by_split: dict[str, list[tuple[int, dict | Malformed]]] = {}
        unplaced: list[tuple[int, Malformed]] = []  # no readable split: reported with the first split
        for i, im in enumerate(images_list):
            try:
                split = mapping.get(get(im, "split", "str"), im["split"])
            except Malformed as e:
                unplaced.append((i, e))
                continue
            by_split.setdefault(split, []).append((i, im))
        if unplaced and by_split:
            by_split[next(iter(by_split))][:0] = unplaced
        elif unplaced:
            raise ConversionError(f"{karpathy}: no image has a readable 'split' (images[{unplaced[0][0]}]: "
                                  f"{unplaced[0][1]})")

        def karpathy_record(i: int, im: dict, split: str) -> Record:
            cocoid = get(im, "cocoid", "int", None)
            if cocoid is None:
                if im.get("imgid") is None:
                    raise Malformed("no 'cocoid' (or 'imgid') field (expected an integer image id)")
                cocoid = get(im, "imgid", "int")
            filename = get(im, "filename", "str", None)
            refs = []
            for k, sent in enumerate(get(im, "sentences", "list")):
                raw = get(sent, "raw", "str", None)
                if raw is None:
                    tokens = get(sent, "tokens", "list")
                    if not all(isinstance(t, str) for t in tokens):
                        raise Malformed(f"sentences[{k}]: 'tokens' must be a list of strings")
                    raw = " ".join(tokens)
                refs.append(raw.strip())
            path = index.find(filename, cocoid)
            return Record(str(karpathy), i, f"coco_{clean_id(cocoid)}", split, "caption", {"references": refs},
                          {"image_id": cocoid, "file_name": filename, "source_split": im.get("split")},
                          image_path=path, missing=None if path else index.describe(filename, cocoid))

        def karpathy_records(items: list[tuple[int, dict | Malformed]], split: str) -> Iterator[Record]:
            for i, im in items:
                try:
                    if isinstance(im, Malformed):
                        raise im
                    yield karpathy_record(i, im, split)
                except Malformed as e:
                    yield malformed(karpathy, i, split, "caption", e, where=f"images[{i}]")

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
                images_list, annotations = get_list(data, "images", path), get_list(data, "annotations", path)
                image_ids = {im["id"] for im in images_list if isinstance(im, dict) and isinstance(im.get("id"), int)}
                refs: dict[int, list[str]] = {}
                orphans: list[Record] = []  # reported after the images: an image without an id comes first
                for j, a in enumerate(annotations):  # an annotation that cannot reach its image is a bad record
                    try:
                        image_id, caption = get(a, "image_id", "int"), get(a, "caption", "str")
                    except Malformed as e:
                        yield malformed(path, j, split, "caption", e, where=f"annotations[{j}]")
                        continue
                    if image_id not in image_ids:
                        orphans.append(malformed(path, j, split, "caption", Malformed(
                            f"image_id {image_id} is not the id of any entry of 'images'"), where=f"annotations[{j}]"))
                        continue
                    refs.setdefault(image_id, []).append(caption.strip())
                for i, im in enumerate(images_list):
                    try:
                        image_id, file_name = get(im, "id", "int"), get(im, "file_name", "str", None)
                    except Malformed as e:
                        yield malformed(path, i, split, "caption", e, where=f"images[{i}]")
                        continue
                    p = index.find(file_name, image_id)
                    yield Record(str(path), i, f"coco_{clean_id(image_id)}", split, "caption",
                                 {"references": refs.get(image_id, [])},
                                 {"image_id": image_id, "file_name": file_name},
                                 image_path=p, missing=None if p else index.describe(file_name, image_id))
                yield from orphans

        for split, files in grouped.items():
            splits[split] = lambda files=files, split=split: official_records(files, split)
            totals[split] = None
    return write_task("coco-caption", "caption", splits, out_dir, samples_per_shard=samples_per_shard,
                      on_bad=on_bad, workers=workers, resume=resume, progress=progress, totals=totals,
                      sources=sources)

