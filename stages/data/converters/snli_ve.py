"""SNLI-VE -> `entailment` shards (`narvl data convert snli-ve`), one sample per hypothesis; gold labels
entailment / neutral / contradiction become yes / maybe / no."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

from stages.data.converters.base import (
    ImageIndex,
    Malformed,
    OnBad,
    Record,
    clean_id,
    entailment_word,
    get,
    group_splits,
    malformed,
    read_jsonl,
    write_task,
)

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

    def record(path: Path, i: int, r: dict, split: str) -> Record:
        key = next((k for k in FLICKR_KEYS if isinstance(r, dict) and k in r), None)
        if key is None:
            raise Malformed(f"no Flickr30k image id (one of {FLICKR_KEYS})")
        fid = str(get(r, key, "id"))
        premise, hypothesis = get(r, "sentence1", "str"), get(r, "sentence2", "str")
        pair_id = get(r, "pairID", "str", None)
        raw = r.get("gold_label")
        name = fid if fid.lower().endswith((".jpg", ".jpeg", ".png")) else f"{fid}.jpg"
        number = int(m.group(1)) if (m := re.match(r"(\d+)", fid)) else None
        p = index.find(name, number)
        rid = pair_id or f"{Path(path).stem}_{i}"
        return Record(str(path), i, f"snli_{clean_id(rid)}", split, "entailment",
                      {"premise": premise.strip(), "hypothesis": hypothesis.strip(), "label": entailment_word(raw)},
                      {"flickr30k_id": fid, "pair_id": pair_id, "gold_label": raw},
                      image_path=p, missing=None if p else index.describe(name, number))

    def records(files: list[tuple[str, Path]], split: str) -> Iterator[Record]:
        for _, path in files:
            for i, r in read_jsonl(path):
                try:
                    if isinstance(r, Malformed):
                        raise r
                    yield record(path, i, r, split)
                except Malformed as e:
                    yield malformed(path, i, split, "entailment", e)

    splits = {s: (lambda f=f, s=s: records(f, s)) for s, f in group_splits(jsonl, split_map).items()}
    return write_task("snli-ve", "entailment", splits, out_dir, samples_per_shard=samples_per_shard,
                      on_bad=on_bad, workers=workers, resume=resume, progress=progress,
                      sources=[str(p) for p in jsonl.values()])

