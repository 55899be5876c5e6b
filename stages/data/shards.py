"""WebDataset shards: writing with a manifest, and reading into padded, tokenised batches.

A shard is a plain tar of `<key>.json` + `<key>.png|jpg` pairs in WebDataset's conventions (tests/test_shards.py reads
ours with `webdataset.WebDataset` and reads `webdataset.TarWriter`'s with ours): a sample is the adjacent members that
share a key, the key is the member path up to the first dot of its file name, the rest is the extension (compared
lower-cased), `__...__` members are metadata and skipped, and gzip/bz2/xz tars are read transparently. A split
folder holds `{split}-000000.tar ...` and `manifest.json` (written last; sha256 and count of every shard);
`index_shards` writes the manifest for shards written by other tools. The reader splits the
shards by (rank, DataLoader worker); with fewer shards than readers every reader scans all shards and keeps the
samples whose running index modulo the reader count is its own, so every sample is read exactly once either way.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import lzma
import math
import os
import re
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from stages.common import write_json_atomic
from stages.data.schema import COMMON_KEYS, ENTAILMENT_LABELS, REQUIRED_KEYS
from stages.data.tasks import eval_target, train_target

_log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
FORMAT_VERSION = 1
IMAGE_EXTS = ("png", "jpg", "jpeg")
_KEY_OK = re.compile(r"[^A-Za-z0-9_-]")
_WDS_NAME = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset.tariterators.base_plus_ext
_WDS_META = re.compile(r"__[^/]*__($|/)")  # webdataset.tariterators.tar_file_iterator's skip_meta


class DataError(ValueError):
    """A shard or sample that is missing, corrupt or not in the expected schema; the message names the file."""


# ---- writing ------------------------------------------------------------------------------------------------
def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644  # fixed metadata: same samples -> same bytes
    tar.addfile(info, io.BytesIO(data))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class ShardWriter:
    """Writes samples into `{split}-NNNNNN.tar` shards of `samples_per_shard`, then the manifest.

    Each shard is written under a temporary name and renamed when full; `close` writes manifest.json last, so a
    folder with a manifest is complete.
    """

    def __init__(self, split_dir: str | Path, split: str, samples_per_shard: int) -> None:
        if samples_per_shard < 1:
            raise ValueError(f"samples_per_shard={samples_per_shard}: must be >= 1")
        self.dir = Path(split_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / MANIFEST).unlink(missing_ok=True)  # an old manifest must not vouch for new shards
        self.split, self.per_shard = split, samples_per_shard
        self.shards: list[dict[str, Any]] = []
        self.task: str | None = None
        self._keys: set[str] = set()
        self._tar: tarfile.TarFile | None = None
        self._tmp: Path | None = None
        self._count = 0

    def _open(self) -> None:
        name = f"{self.split}-{len(self.shards):06d}.tar"
        self._tmp = self.dir / f".{name}.tmp"
        self._tar = tarfile.open(self._tmp, "w", format=tarfile.USTAR_FORMAT)
        self._name, self._count = name, 0

    def _finish(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        final = self.dir / self._name
        os.replace(self._tmp, final)
        self.shards.append({"name": self._name, "sha256": sha256_file(final), "count": self._count})
        self._tar = None

    def write(self, sample_json: dict, image_bytes: bytes, ext: str = "png") -> None:
        """Add one sample (its JSON must hold the common keys and its task's keys)."""
        ext = ext.lower().lstrip(".")
        if ext not in IMAGE_EXTS:
            raise ValueError(f"image extension {ext!r}: expected one of {IMAGE_EXTS}")
        missing = [k for k in COMMON_KEYS if k not in sample_json]
        task = sample_json.get("task")
        missing += [k for k in REQUIRED_KEYS.get(task, ()) if k not in sample_json]
        if missing or task not in REQUIRED_KEYS:
            raise DataError(f"sample {sample_json.get('id')!r}: missing {missing} or unknown task {task!r}")
        if self.task is None:
            self.task = task
        elif task != self.task:
            raise DataError(f"sample {sample_json['id']!r} has task {task!r}; this split holds {self.task!r}")
        key = _KEY_OK.sub("_", str(sample_json["id"]))
        if key in self._keys:
            raise DataError(f"sample id {sample_json['id']!r} (key {key!r}) written twice to {self.dir}")
        self._keys.add(key)
        if self._tar is None:
            self._open()
        _add(self._tar, f"{key}.json", json.dumps(sample_json, sort_keys=True).encode())
        _add(self._tar, f"{key}.{ext}", image_bytes)
        self._count += 1
        if self._count >= self.per_shard:
            self._finish()

    def close(self, dataset_info: dict) -> dict:
        """Finish the last shard and write manifest.json; returns the manifest."""
        self._finish()
        manifest = {
            "format_version": FORMAT_VERSION, "split": self.split, "task": self.task,
            "count": sum(s["count"] for s in self.shards), "shards": self.shards,
            "dataset": {"name": dataset_info.get("name"), "version": dataset_info.get("version"),
                        "seed": dataset_info.get("seed"), **dataset_info},
        }
        write_json_atomic(self.dir / MANIFEST, manifest)
        return manifest


# ---- reading ------------------------------------------------------------------------------------------------
def read_split_manifest(split_dir: str | Path, verify: bool = False) -> dict:
    """The manifest of a split folder, after checking every shard exists (and, with verify, its sha256)."""
    d = Path(split_dir)
    path = d / MANIFEST
    if not path.is_file():
        raise DataError(f"{path} not found: {d} is not a finished split folder (ShardWriter.close writes it)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from e
    for key in ("split", "task", "count", "shards"):
        if key not in manifest:
            raise DataError(f"{path}: missing field {key!r}")
    for shard in manifest["shards"]:
        f = d / shard["name"]
        if not f.is_file():
            raise DataError(f"shard {f} listed in {path} is missing")
        if verify and sha256_file(f) != shard["sha256"]:
            raise DataError(f"shard {f}: sha256 differs from {path} (file changed or corrupt)")
    return manifest


def index_shards(split_dir: str | Path, split: str, dataset_info: dict, shards: list[str] | None = None) -> dict:
    """Write manifest.json for shards another tool wrote (e.g. `webdataset.TarWriter`), so `make_loader` reads them.

    Args:
        split_dir: the folder holding the shards.
        split: the split's name.
        dataset_info: name / version / seed and anything else to record (as `ShardWriter.close` takes).
        shards: shard file names in reading order (default: every `*.tar*` of the folder, sorted).

    Every sample is read and schema-checked (`parse_sample`); all must hold one task. Returns the manifest.
    """
    d = Path(split_dir)
    names = shards if shards is not None else sorted(p.name for p in d.glob("*.tar*") if p.is_file())
    if not names:
        raise DataError(f"{d}: no shards (*.tar*) to index")
    task: str | None = None
    entries = []
    for name in names:
        path, count = d / name, 0
        for key, parts in iter_tar(path):
            if task is None:  # the first sample names the split's task
                try:
                    task = json.loads(parts["json"])["task"]
                except (KeyError, TypeError, ValueError):
                    task = None
                if task not in REQUIRED_KEYS:
                    raise DataError(f"{path}: sample {key!r}: no .json with a known task (one of "
                                    f"{sorted(REQUIRED_KEYS)}; got {task!r})")
            parse_sample(path, key, parts, task)  # the schema, and one task for the split
            count += 1
        entries.append({"name": name, "sha256": sha256_file(path), "count": count})
    manifest = {
        "format_version": FORMAT_VERSION, "split": split, "task": task, "count": sum(e["count"] for e in entries),
        "shards": entries, "dataset": {"name": dataset_info.get("name"), "version": dataset_info.get("version"),
                                       "seed": dataset_info.get("seed"), **dataset_info},
    }
    write_json_atomic(d / MANIFEST, manifest)
    return manifest


def count_samples(split_dir: str | Path) -> int:
    """Number of samples of a split, from its manifest."""
    return int(read_split_manifest(split_dir)["count"])


def _member_bytes(tar: tarfile.TarFile, member: tarfile.TarInfo, path: Path) -> bytes:
    """A member's whole content; DataError when the tar ends inside it."""
    f = tar.extractfile(member)
    data = f.read() if f is not None else b""
    if len(data) != member.size:
        raise DataError(f"{path}: member {member.name} truncated ({len(data)} of {member.size} bytes)")
    return data


def member_key(name: str) -> tuple[str, str] | None:
    """(sample key, extension) of a tar member name as WebDataset groups it: the key is the path up to the first
    dot of the file name, the extension the rest, lower-cased; None for metadata (`__...__`) and dot-less names."""
    if _WDS_META.match(name):
        return None
    m = _WDS_NAME.match(name)
    return (m.group(1), m.group(2).lower()) if m else None


class _HashingReader:
    """A binary file whose bytes are hashed as they are read (tarfile's stream mode reads only through `read`)."""

    def __init__(self, f: Any) -> None:
        self.f, self.sha256 = f, hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.sha256.update(data)
        return data


def iter_tar(path: Path, sha256: str | None = None) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) per sample of a tar (any compression), grouped as WebDataset groups them: adjacent
    members with the same `member_key`. DataError when the tar is unreadable or a sample repeats an extension.

    With `sha256` (the manifest's), the file is hashed while it is read and a DataError follows its last sample
    when it differs: a byte changed inside a member's data is otherwise invisible (a tar checksums its headers
    only). The samples yielded before that error come from the changed file."""
    key: str | None = None
    parts: dict[str, bytes] = {}
    try:
        with open(path, "rb") as f:
            reader = _HashingReader(f)
            with tarfile.open(fileobj=reader, mode="r|*") as tar:
                for member in tar:
                    split = member_key(member.name) if member.isfile() else None
                    if split is None:
                        continue
                    k, ext = split
                    data = _member_bytes(tar, member, path)
                    if k != key and key is not None:
                        yield key, parts
                        parts = {}
                    if ext in parts:
                        raise DataError(f"{path}: sample {k!r} has two {ext!r} members (member {member.name})")
                    key = k
                    parts[ext] = data
            while reader.read(1 << 20):  # the end-of-archive blocks tarfile leaves unread
                pass
    except (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError) as e:
        raise DataError(f"{path}: unreadable tar after sample {key!r} ({type(e).__name__}: {e})") from e
    if sha256 is not None and reader.sha256.hexdigest() != sha256:
        raise DataError(f"{path}: sha256 differs from the manifest's (the shard changed or is corrupt; samples "
                        f"already read from it are suspect)")
    if key is not None:
        yield key, parts


def parse_sample(shard: Path, key: str, parts: dict[str, bytes], task: str) -> tuple[dict, bytes]:
    """The JSON and image bytes of one sample, checked against the schema; DataError names shard and key."""
    where = f"{shard}: sample {key!r}"
    if "json" not in parts:
        raise DataError(f"{where}: no .json member (got {sorted(parts)})")
    image = next((parts[e] for e in IMAGE_EXTS if e in parts), None)
    if image is None:
        raise DataError(f"{where}: no image member (.png or .jpg; got {sorted(parts)})")
    return parse_sample_json(where, parts["json"], task), image


def parse_sample_json(where: str, data: bytes, task: str) -> dict:
    """One sample's JSON checked against the schema of `task`; DataError starts with `where`."""
    try:
        sample = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{where}: .json is not valid JSON ({e})") from e
    if not isinstance(sample, dict):
        raise DataError(f"{where}: .json holds {type(sample).__name__}, expected an object")
    if "task" in sample and sample["task"] != task:  # before the keys: another task's sample lacks this one's
        raise DataError(f"{where}: task {sample['task']!r}, expected {task!r}")
    need = COMMON_KEYS + REQUIRED_KEYS[task]
    missing = [k for k in need if k not in sample]
    if missing:
        raise DataError(f"{where}: JSON lacks {missing} (a {task} sample needs {list(need)})")
    for key in need:
        if not _VALUE_OK[key](sample[key]):
            value = repr(sample[key])
            value = value if len(value) <= 60 else value[:60] + "..."
            raise DataError(f"{where}: {key!r} is {value}, expected {_VALUE_DOC[key]}")
    return sample


def _is_text_list(v: Any) -> bool:
    return isinstance(v, list) and len(v) > 0 and all(isinstance(x, str) for x in v)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


# what each schema key holds (stages/data/schema.py): a sample of another shape is a DataError, not a crash later
_VALUE_OK: dict[str, Any] = {
    "id": lambda v: isinstance(v, str) and v != "",
    "task": lambda v: isinstance(v, str),
    "image_size": lambda v: isinstance(v, list) and len(v) == 2 and all(
        isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in v),
    "prompt": lambda v: isinstance(v, str),
    "references": _is_text_list,
    "question": lambda v: isinstance(v, str),
    "answers": _is_text_list,
    "expression": lambda v: isinstance(v, str),
    "box": lambda v: isinstance(v, list) and len(v) == 4 and all(_is_number(x) for x in v),
    "premise": lambda v: isinstance(v, str),
    "hypothesis": lambda v: isinstance(v, str),
    "label": lambda v: v in ENTAILMENT_LABELS,
}
_VALUE_DOC = {
    "id": "a non-empty string", "task": "a string", "image_size": "[width, height]: two positive integers",
    "prompt": "a string", "references": "a non-empty list of strings", "question": "a string",
    "answers": "a non-empty list of strings", "expression": "a string", "box": "[x0, y0, x1, y1]: four finite numbers",
    "premise": "a string", "hypothesis": "a string", "label": f"one of {list(ENTAILMENT_LABELS)}",
}


def iter_split_json(split_dir: str | Path, task: str) -> Iterator[dict]:
    """The JSON of every sample of a split, in manifest order, without reading the images: the tars are opened
    for random access, so the reader seeks over image members (a converted dataset's train split can hold tens
    of GB of images). Schema-checked like `parse_sample`; the images are not checked here."""
    split_dir = Path(split_dir)
    for shard in read_split_manifest(split_dir)["shards"]:
        path = split_dir / shard["name"]
        try:
            with tarfile.open(path, "r:*") as tar:
                for member in tar:
                    split = member_key(member.name) if member.isfile() else None
                    if split is None or split[1] != "json":
                        continue
                    yield parse_sample_json(f"{path}: sample {split[0]!r}", _member_bytes(tar, member, path), task)
        except (tarfile.TarError, EOFError, OSError) as e:
            raise DataError(f"{path}: unreadable tar ({type(e).__name__}: {e})") from e


@dataclass
class Batch:
    """One padded batch (see docs/ARCHITECTURE.md)."""

    image: torch.Tensor  # (B, 3, H, W) float32, mean = std = 0.5
    src_tokens: torch.Tensor  # (B, S) int64: bos + prompt + eos
    target: torch.Tensor  # (B, T) int64: target + eos
    target_lengths: torch.Tensor  # (B,) incl. eos
    prev_output_tokens: torch.Tensor  # (B, T): bos + target[:-1]
    weights: torch.Tensor  # (B,) float32
    ids: list[str]
    samples: list[dict]
    skipped: list[str] = field(default_factory=list)  # skip reasons carried from the reader (on_bad_sample=skip)

    def __len__(self) -> int:
        return len(self.ids)

    def to(self, device: torch.device | str) -> Batch:
        t = {k: getattr(self, k).to(device) for k in ("image", "src_tokens", "target", "target_lengths",
                                                          "prev_output_tokens", "weights")}
        return Batch(**t, ids=self.ids, samples=self.samples, skipped=self.skipped)


def _pad(rows: list[list[int]], pad_id: int) -> torch.Tensor:
    width = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out


def decode_image(data: bytes, image_size: int | None, where: str) -> np.ndarray:
    """(3, H, W) float32 in [-1, 1]; square-resized to image_size when given."""
    try:
        img = Image.open(io.BytesIO(data))
        img = img.convert("RGB")
    except Exception as e:  # PIL raises several types for bad bytes
        raise DataError(f"{where}: image does not decode ({type(e).__name__}: {e})") from e
    if image_size is not None and img.size != (image_size, image_size):
        img = img.resize((image_size, image_size), Image.BICUBIC)
    arr = np.asarray(img, dtype=np.float32) / 255.0
    return ((arr - 0.5) / 0.5).transpose(2, 0, 1).copy()


def aux_example(task: str, sample: dict, rng: np.random.Generator, num_bins: int, where: str
                ) -> tuple[str, str, float]:
    """(prompt, target text, loss weight) of a fresh `task` sample over the scene of `sample` (built-in benchmark
    samples carry it in meta.objects): the auxiliary tasks of a multi-task teacher over the same images.

    Raises:
        DataError: the sample carries no usable built-in benchmark scene, naming it.
    """
    from stages.data.schema import task_prompt
    from stages.data.shapes import scene_sample
    from stages.data.tasks import train_target

    objects = (sample.get("meta") or {}).get("objects")
    if not objects:
        raise DataError(f"{where}: train_teacher.aux_tasks needs the built-in benchmark's meta.objects "
                        "(data.source=shapes); this sample has none")
    try:
        aux = scene_sample(task, objects, int(sample["image_size"][0]), rng)
    except (TypeError, ValueError, KeyError, IndexError) as e:
        raise DataError(f"{where}: meta.objects / image_size are not the built-in benchmark's "
                        f"([size, colour, shape, x0, y0, x1, y1] rows): {type(e).__name__}: {e}") from None
    text, weight = train_target(aux, rng, num_bins)
    return task_prompt(task, aux), text, weight


class ShardDataset(torch.utils.data.IterableDataset):
    """Batches of one split for one (rank, world_size); DataLoader workers split it further."""

    def __init__(self, split_dir: Path, manifest: dict, tokenizer: Any, task: str, batch_size: int, *, train: bool,
                 seed: int, epoch: int, shuffle_buffer: int, rank: int, world_size: int,
                 target_override: dict[str, str] | None, on_bad_sample: str, image_size: int | None,
                 max_source_len: int, max_target_len: int | None, aux_tasks: dict[str, float] | None = None
                 ) -> None:
        super().__init__()
        self.split_dir, self.manifest, self.tok, self.task = split_dir, manifest, tokenizer, task
        self.batch_size, self.train, self.seed, self.epoch = batch_size, train, seed, epoch
        self.shuffle_buffer, self.rank, self.world_size = shuffle_buffer, rank, world_size
        self.override, self.on_bad, self.image_size = target_override, on_bad_sample, image_size
        self.max_source_len, self.max_target_len = max_source_len, max_target_len
        self.aux_tasks = [(t, p) for t, p in (aux_tasks or {}).items() if p > 0]

    def _raw(self, part: int, parts: int) -> Iterator[tuple[Path, str, dict[str, bytes]] | DataError]:
        """This reader's samples in order; an unreadable shard yields one DataError (the rest of it is lost)."""
        names = [s["name"] for s in self.manifest["shards"]]
        sha256 = {s["name"]: s.get("sha256") for s in self.manifest["shards"]}
        if self.train:
            names = [names[i] for i in np.random.default_rng([self.seed, self.epoch]).permutation(len(names))]
        by_shard = len(names) >= parts
        index = 0
        for name in names[part::parts] if by_shard else names:
            path = self.split_dir / name
            try:
                for key, data in iter_tar(path, sha256[name]):
                    if by_shard or index % parts == part:
                        yield path, key, data
                    index += 1
            except DataError as e:
                if by_shard or part == 0:  # with shared shards one reader reports the loss
                    yield e

    def _shuffled(self, it: Iterator, rng: np.random.Generator) -> Iterator:
        if not self.train or self.shuffle_buffer <= 1:
            yield from it
            return
        buf: list = []
        for item in it:
            if len(buf) < self.shuffle_buffer:
                buf.append(item)
                continue
            j = int(rng.integers(len(buf)))
            yield buf[j]
            buf[j] = item
        for j in rng.permutation(len(buf)):
            yield buf[j]

    def _example(self, path: Path, key: str, parts: dict[str, bytes], rng: np.random.Generator) -> dict:
        sample, image_bytes = parse_sample(path, key, parts, self.task)
        image = decode_image(image_bytes, self.image_size, f"{path}: sample {key!r}")
        tok = self.tok
        prompt, sid = sample["prompt"], str(sample["id"])
        draw = rng.random() if self.train and self.aux_tasks else 1.0
        for aux_task, share in self.aux_tasks:  # the sample's image with another (or a fresh) task over its scene
            if draw >= share:
                draw -= share
                continue
            prompt, text, weight = aux_example(aux_task, sample, rng, tok.num_bins, f"{path}: sample {key!r}")
            src = [tok.bos_id, *tok.encode(prompt)[: self.max_source_len - 2], tok.eos_id]
            tgt = tok.encode(text)
            if self.max_target_len is not None:
                tgt = tgt[: self.max_target_len - 1]
            return {"image": image, "src": src, "tgt": [*tgt, tok.eos_id], "weight": weight, "sample": sample}
        src = [tok.bos_id, *tok.encode(prompt)[: self.max_source_len - 2], tok.eos_id]
        if self.override is not None and sid in self.override:
            text, weight = self.override[sid], 1.0
        elif self.train:
            text, weight = train_target(sample, rng, tok.num_bins)
        else:
            text, weight = eval_target(sample, tok.num_bins), 1.0
        tgt = tok.encode(text)
        if self.max_target_len is not None:
            tgt = tgt[: self.max_target_len - 1]
        return {"image": image, "src": src, "tgt": [*tgt, tok.eos_id], "weight": weight, "sample": sample}

    def _collate(self, items: list[dict], skipped: list[str]) -> Batch:
        tok = self.tok
        if not items:
            empty = torch.zeros(0, dtype=torch.long)
            return Batch(torch.zeros(0, 3, 1, 1), empty[:, None], empty[:, None], empty, empty[:, None],
                         torch.zeros(0), [], [], skipped)
        tgts = [it["tgt"] for it in items]
        return Batch(
            image=torch.from_numpy(np.stack([it["image"] for it in items])),
            src_tokens=_pad([it["src"] for it in items], tok.pad_id),
            target=_pad(tgts, tok.pad_id),
            target_lengths=torch.tensor([len(t) for t in tgts], dtype=torch.long),
            prev_output_tokens=_pad([[tok.bos_id, *t[:-1]] for t in tgts], tok.pad_id),
            weights=torch.tensor([it["weight"] for it in items], dtype=torch.float32),
            ids=[str(it["sample"]["id"]) for it in items],
            samples=[it["sample"] for it in items],
            skipped=skipped,
        )

    def __iter__(self) -> Iterator[Batch]:
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        part, parts = self.rank * nw + wid, self.world_size * nw
        rng = np.random.default_rng([self.seed, self.epoch, part])
        items: list[dict] = []
        skipped: list[str] = []
        for record in self._shuffled(self._raw(part, parts), rng):
            try:
                if isinstance(record, DataError):
                    raise record
                items.append(self._example(*record, rng))
            except DataError as e:
                if self.on_bad != "skip":
                    raise
                skipped.append(str(e))
            if len(items) == self.batch_size:
                yield self._collate(items, skipped)
                items, skipped = [], []
        if items or skipped:
            yield self._collate(items, skipped)


def _identity(x: Any) -> Any:
    return x


class ShardLoader:
    """Iterable of Batch over one split for one rank; `skipped` lists every sample skipped (on_bad_sample=skip)."""

    def __init__(self, dataset: ShardDataset, num_workers: int) -> None:
        self.dataset, self.num_workers = dataset, num_workers
        self.skipped: list[str] = []

    def __iter__(self) -> Iterator[Batch]:
        if self.num_workers == 0:
            batches: Any = iter(self.dataset)
        else:
            batches = torch.utils.data.DataLoader(self.dataset, batch_size=None, num_workers=self.num_workers,
                                                  collate_fn=_identity)
        for batch in batches:
            for reason in batch.skipped:
                _log.warning("skipped bad sample: %s", reason)
            self.skipped += batch.skipped
            if len(batch):
                yield batch


def make_loader(split_dir: str | Path, tokenizer: Any, task: str, batch_size: int, *, train: bool = False,
                seed: int = 0, epoch: int = 0, shuffle_buffer: int = 1000, num_workers: int = 0,
                rank: int | None = None, world_size: int | None = None,
                target_override: dict[str, str] | None = None,
                on_bad_sample: Literal["error", "skip"] = "error", image_size: int | None = None,
                max_source_len: int = 64, max_target_len: int | None = None, verify: bool = False,
                aux_tasks: dict[str, float] | None = None) -> ShardLoader:
    """A loader of padded batches of one split (see docs/ARCHITECTURE.md).

    Args:
        split_dir: a split folder with manifest.json.
        tokenizer: a narvl_model.tokenizer.Tokenizer.
        task: the task the split must hold.
        batch_size: samples per batch (the last batch of each reader may be smaller).
        train: training targets (rng-chosen reference / sampled answer) and shuffling; else eval targets, in order.
        seed, epoch: the shuffle and target-choice streams.
        shuffle_buffer: samples held for shuffling (train only; <= 1 disables).
        num_workers: DataLoader worker processes (0 reads in this process).
        rank, world_size: this reader's rank (default: env RANK / WORLD_SIZE, else 0 / 1).
        target_override: sample id -> target text (distilled targets), weight 1.
        on_bad_sample: "error" raises DataError; "skip" drops the sample, logs it and appends it to `.skipped`.
        image_size: square-resize images to this size (None keeps them).
        max_source_len: longest src_tokens row including bos and eos.
        max_target_len: longest target row including eos (None: no limit).
        verify: check every shard's sha256 against the manifest first.
        aux_tasks: train only; task -> the share of samples trained as a fresh sample of that task over their own
            image instead of their split's sample (built-in benchmark samples, whose meta.objects holds the scene):
            multi-task over the same images. The shares add up to less than 1.
    """
    split_dir = Path(split_dir)
    if on_bad_sample not in ("error", "skip"):
        raise ValueError(f"on_bad_sample={on_bad_sample!r}: expected 'error' or 'skip'")
    if task not in REQUIRED_KEYS:
        raise ValueError(f"unknown task {task!r}")
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} outside world_size={world_size}")
    if max_source_len < 3:
        raise ValueError(f"max_source_len={max_source_len}: needs room for bos, one token and eos")
    manifest = read_split_manifest(split_dir, verify=verify)
    if manifest["task"] not in (None, task):
        raise DataError(f"{split_dir / MANIFEST}: holds task {manifest['task']!r}, expected {task!r}")
    ds = ShardDataset(split_dir, manifest, tokenizer, task, batch_size, train=train, seed=seed, epoch=epoch,
                      shuffle_buffer=shuffle_buffer, rank=rank, world_size=world_size,
                      target_override=target_override, on_bad_sample=on_bad_sample, image_size=image_size,
                      max_source_len=max_source_len, max_target_len=max_target_len,
                      aux_tasks=aux_tasks if train else None)
    return ShardLoader(ds, num_workers)
