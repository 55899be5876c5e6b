"""Inputs a stage reads from outside the artifact root enter its cache key by their content, not their path.

Three such inputs exist: converted shards (`data.shards_dir` with `data.source=shards`, read by prepare_data),
OFA's BPE files (`data.ofa_bpe_dir` with `data.tokenizer=ofa`, read by prepare_data; `init_from.bpe_dir` sets it)
and an OFA checkpoint to start the teacher from (`init_from.ofa`, read by train_teacher). Their path fields are
marked `cache="content"` in stages/config.py, so the path stays out of the key; `content_digests(cfg)` gives the
digest of each input the stage reads, and `pipeline.cache.node_key` adds them. Shards replaced in place are a
MISS; the same shards copied elsewhere are a HIT.

- shards: the canonical JSON of each split manifest of the task (`<shards_dir>/<task>/<split>/manifest.json`), which
  lists every shard's sha256 (prepare_data verifies the shards against it when it copies them);
- a file: the sha256 of its bytes, remembered per (path, size, mtime, ctime, inode) in a small cache file
  (`$NARVL_DIGEST_CACHE`, default `~/.cache/narvl/file-digests.json`) so a 1 GB checkpoint is hashed once, not on
  every plan.

An input that is missing or unreadable fails the plan with ConfigError naming the field and the path.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from pipeline.config import ConfigError
from pipeline.storage import sha256_file
from stages.common import write_json_atomic
from stages.config import PrepareDataStage, Strict, TrainStage
from stages.data.shards import DataError, read_split_manifest

SPLITS = ("train", "val", "test")
OFA_BPE_FILES = ("encoder.json", "vocab.bpe", "dict.txt")


def content_digests(cfg: Strict) -> dict[str, str]:
    """{input name: sha256} of what this stage config reads from outside the artifact root ({} for none)."""
    out: dict[str, str] = {}
    if isinstance(cfg, PrepareDataStage):
        if cfg.data.source == "shards":
            assert cfg.data.shards_dir is not None  # DataConfig checks it
            out["data.shards_dir"] = shards_digest(Path(cfg.data.shards_dir), cfg.task)
        if cfg.data.tokenizer == "ofa":
            assert cfg.data.ofa_bpe_dir is not None
            out["data.ofa_bpe_dir"] = files_digest("data.ofa_bpe_dir", Path(cfg.data.ofa_bpe_dir), OFA_BPE_FILES)
    if isinstance(cfg, TrainStage) and cfg.init_from is not None:  # only the checkpoint: train_teacher reads it
        out["init_from.ofa"] = file_digest("init_from.ofa", Path(cfg.init_from.ofa))
    return out


def shards_digest(shards_dir: Path, task: str) -> str:
    """The digest of one task's split manifests under a `narvl data convert` output (test split optional)."""
    h = hashlib.sha256()
    for split in SPLITS:
        d = shards_dir / task / split
        if split == "test" and not d.exists():  # prepare_data: real datasets often have no test split
            continue
        try:
            manifest = read_split_manifest(d)
        except DataError as e:
            raise ConfigError(f"data.shards_dir: {e}") from None
        h.update(split.encode() + b"\0" + json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode())
    return h.hexdigest()


def files_digest(field: str, folder: Path, names: tuple[str, ...]) -> str:
    h = hashlib.sha256()
    for name in names:
        h.update(name.encode() + b"\0" + file_digest(field, folder / name).encode())
    return h.hexdigest()


def digest_cache_path() -> Path:
    env = os.environ.get("NARVL_DIGEST_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "narvl" / "file-digests.json"


def file_digest(field: str, path: Path) -> str:
    """sha256 of a file's bytes, from the digest cache when its path, size and mtime are unchanged."""
    path = Path(path).expanduser().resolve()
    try:
        st = path.stat()
    except OSError as e:
        raise ConfigError(f"{field}: {path} cannot be read ({e.strerror or e})") from None
    if not path.is_file():
        raise ConfigError(f"{field}: {path} is not a file")
    stamp = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]  # a rewrite or a replacement changes one
    cache_file = digest_cache_path()
    try:
        cache = json.loads(cache_file.read_text())
        if not isinstance(cache, dict):
            cache = {}
    except (OSError, json.JSONDecodeError):
        cache = {}
    entry = cache.get(str(path))
    if isinstance(entry, dict) and entry.get("stamp") == stamp and isinstance(entry.get("sha256"), str):
        return entry["sha256"]
    try:
        digest = sha256_file(path)
    except OSError as e:
        raise ConfigError(f"{field}: {path} cannot be read ({e.strerror or e})") from None
    cache[str(path)] = {"stamp": stamp, "sha256": digest}
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(cache_file, cache)
    except OSError:  # a read-only home: hash again next time
        pass
    return digest
