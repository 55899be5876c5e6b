"""The content-addressed stage cache: keys, folders, manifests and the atomic publish of a finished stage.

Layout (one folder per node, `<name>` is the node name with an ablation as `.<ablation>`, e.g. `train_nar.ce`):

```
<root>/<task>/<name>-<key12>/            finished: outputs + config.yaml + stage.log + manifest.json (written last)
<root>/<task>/.work-<name>-<key12>/      training stages: stable scratch dir, survives a crash (checkpoints)
<root>/<task>/.tmp-<name>-<key12>-<id>/  other stages: private scratch dir of one attempt
```

A stage runs with `out_dir` = its scratch dir; on success the manifest is written into it and the folder is
renamed to `<name>-<key12>`. On an object-store root the scratch dir is on the node that ran the stage and
publishing uploads every file, then the manifest. A folder is a cache hit only when its manifest says `succeeded`
with the same key, so a half-written folder (no manifest) is never a hit. The manifest lists the sha256 of every
file of the folder (`files`); a stage that reads the folder from another node checks them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import uuid
from pathlib import Path
from typing import Any

from pipeline.config import cache_dict
from pipeline.storage import Storage
from stages.common import write_json_atomic
from stages.config import Strict

MANIFEST = "manifest.json"
CONFIG_FILE = "config.yaml"
LOG_FILE = "stage.log"
METRICS_LOG = "stage_metrics.jsonl"
PROGRESS_FILE = "progress.json"
REPO = Path(__file__).resolve().parent.parent


def node_key(stage: str, version: int, cfg: Strict, input_keys: dict[str, str]) -> str:
    """sha256 over the stage name, its VERSION, the canonical JSON of its cache-relevant config, its input keys
    and the content digests of what it reads from outside the root (pipeline/content.py; ConfigError if missing)."""
    from pipeline.content import content_digests

    payload = {
        "stage": stage,
        "version": version,
        "config": cache_dict(cfg),
        "inputs": sorted(input_keys.items()),
    }
    external = content_digests(cfg)
    if external:  # absent otherwise: the keys of stages reading nothing outside the root stay what they were
        payload["external"] = sorted(external.items())
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def folder_name(node_name: str, key: str) -> str:
    """`train_nar[ce]` + key -> `train_nar.ce-<key12>` (no shell glob characters in paths)."""
    safe = node_name.replace("[", ".").replace("]", "")
    return f"{safe}-{key[:12]}"


def final_rel(task: str, node_name: str, key: str) -> str:
    """A finished stage folder, relative to the root."""
    return f"{task}/{folder_name(node_name, key)}"


def work_rel(task: str, node_name: str, key: str) -> str:
    """A training stage's work folder (checkpoints), relative to the root: a rerun resumes from it."""
    return f"{task}/.work-{folder_name(node_name, key)}"


def final_dir(root: Path, task: str, node_name: str, key: str) -> Path:
    return Path(root) / final_rel(task, node_name, key)


def work_dir(root: Path, task: str, node_name: str, key: str) -> Path:
    """The stable scratch dir of a training stage: a rerun after a crash finds its checkpoints here."""
    return Path(root) / work_rel(task, node_name, key)


def tmp_dir(root: Path, task: str, node_name: str, key: str) -> Path:
    """A private scratch dir for one attempt of a non-training stage."""
    return Path(root) / task / f".tmp-{folder_name(node_name, key)}-{uuid.uuid4().hex[:8]}"


def read_manifest(folder: Path) -> dict | None:
    """The manifest of a stage folder, or None when absent or unreadable."""
    path = Path(folder) / MANIFEST
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
        return None


def is_hit(storage: Storage, rel: str, key: str) -> bool:
    """A cache hit: the manifest exists, says succeeded, and carries the same key."""
    m = storage.read_json(f"{rel}/{MANIFEST}")
    return isinstance(m, dict) and m.get("status") == "succeeded" and m.get("key") == key


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    write_json_atomic(Path(folder) / MANIFEST, manifest)


def publish(storage: Storage, scratch: Path, rel: str, manifest: dict[str, Any]) -> None:
    """Put a finished scratch dir in place as `rel`, the manifest last: a rename on a local root (replacing a stale
    or forced older folder), an upload of every file and then the manifest on an object store."""
    if storage.remote:
        old = storage.read_json(f"{rel}/{MANIFEST}")
        if old is not None:  # a forced rerun: the old folder stops being a hit before any file changes
            storage.delete_dir(rel)
        storage.upload_dir(scratch, rel, skip=(MANIFEST,))
        storage.write_json(f"{rel}/{MANIFEST}", manifest)
        return
    write_manifest(scratch, manifest)
    _rename_into_place(scratch, storage.local(rel))


def _rename_into_place(scratch: Path, final: Path) -> None:
    final = Path(final)
    old = None
    if final.exists():
        old = final.with_name(f".old-{final.name}-{uuid.uuid4().hex[:8]}")
        os.rename(final, old)
    os.rename(scratch, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def clean_stale(root: Path, task: str, node_name: str, key: str) -> None:
    """Remove leftover private scratch dirs of earlier attempts of this node (never the training work dir)."""
    parent = Path(root) / task
    if not parent.is_dir():
        return
    for p in parent.glob(f".tmp-{folder_name(node_name, key)}-*"):
        shutil.rmtree(p, ignore_errors=True)
    for p in parent.glob(f".old-{folder_name(node_name, key)}-*"):
        shutil.rmtree(p, ignore_errors=True)


def git_info(repo: Path = REPO) -> dict[str, Any]:
    """{"sha": commit or "unknown", "dirty": bool or "unknown"} of the code that runs."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                                capture_output=True, text=True, timeout=10, check=True).stdout
        return {"sha": sha, "dirty": bool(status.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"sha": "unknown", "dirty": "unknown"}
