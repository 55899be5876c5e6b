"""`narvl gc`: remove the abandoned scratch folders of an artifact root (local folder or s3://).

What a run leaves behind when its driver or a worker dies (pipeline/cache.py has the layout):
    <root>/<task>/.work-<name>-<key12>/      a training stage's checkpoints (a rerun of the same key resumes there)
    <root>/<task>/.tmp-<name>-<key12>-<id>/  one attempt of another stage
    <root>/<task>/.old-<name>-<key12>-<id>/  a folder a publish replaced (removed right after, unless it crashed)

A folder is removed only when both hold:
- no live lease covers its node (`<task>/.lease-<name>-<key12>.json` absent, or its heartbeat older than the
  lease timeout: the owner died). gc takes the node's lease itself for the removal (`Leases.acquire` takes over
  only a stale one), so no driver starts resuming from a folder while it is being removed;
- nothing in it changed for `grace_s` (default one hour): a folder written by something that holds no lease
  (an older version, a stage run by hand) is left alone while it is active.

Removing a `.work-*` folder drops its checkpoints: a later run of that key trains from the start. Finished stage
folders, leases of live owners, `runs/` and the MLflow store are never touched.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from pipeline.lease import STALE_AFTER_S, Leases
from pipeline.storage import Storage

GRACE_S = 3600.0
PREFIXES = {".work-": "work", ".tmp-": "tmp", ".old-": "old"}


@dataclass
class Leftover:
    """One scratch folder and what gc does (or would do) with it."""

    rel: str
    kind: str  # work | tmp | old
    files: int
    bytes: int
    age_s: float | None  # since anything in it last changed (None: empty)
    action: str  # "remove", "removed", or why it is kept ("live lease", "changed 5 min ago", ...)


def lease_for(task: str, folder: str) -> str | None:
    """The lease (relative to the root) of the node a scratch folder belongs to, or None for another name."""
    for prefix in PREFIXES:
        if folder.startswith(prefix):
            name = folder[len(prefix):]
            if prefix != ".work-":  # .tmp-/.old-<name>-<key12>-<id>
                name = name.rsplit("-", 1)[0]
            return f"{task}/.lease-{name}.json"
    return None


def lease_is_live(storage: Storage, rel: str, stale_after_s: float, now: float) -> bool:
    """A lease file whose heartbeat is fresh, or one that cannot be read (counted as live: never guess)."""
    data = storage.read_bytes(rel)
    if data is None:
        return False
    record = storage.read_json(rel)
    if not isinstance(record, dict):
        return True
    try:
        return now - float(record.get("heartbeat", 0)) <= stale_after_s
    except (TypeError, ValueError):
        return True


def scan(storage: Storage, grace_s: float = GRACE_S, stale_after_s: float = STALE_AFTER_S,
         now: float | None = None) -> list[Leftover]:
    """Every scratch folder of the root with the action gc takes on it; nothing is changed."""
    now = time.time() if now is None else now
    out: list[Leftover] = []
    for task in storage.list_dirs(""):
        for folder in storage.list_dirs(task):
            lease = lease_for(task, folder)
            if lease is None:
                continue
            rel = f"{task}/{folder}"
            files, size, newest = storage.tree_stats(rel)
            age = None if newest is None else max(0.0, now - newest)
            if lease_is_live(storage, lease, stale_after_s, now):
                action = "live lease"
            elif age is not None and age < grace_s:
                action = f"changed {_duration(age)} ago"
            else:
                action = "remove"
            out.append(Leftover(rel, PREFIXES[folder[:folder.index("-") + 1]], files, size, age, action))
    return out


def collect(storage: Storage, grace_s: float = GRACE_S, dry_run: bool = False,
            stale_after_s: float = STALE_AFTER_S) -> list[Leftover]:
    """Remove every abandoned scratch folder (see the module docstring); with dry_run only list them."""
    found = scan(storage, grace_s, stale_after_s)
    if dry_run:
        return found
    leases = Leases(storage, stale_after_s=stale_after_s)
    try:
        for item in found:
            if item.action != "remove":
                continue
            task, folder = item.rel.split("/", 1)
            lease = lease_for(task, folder)
            assert lease is not None
            if not leases.acquire(lease):  # an owner appeared since the scan
                item.action = "live lease"
                continue
            try:
                storage.delete_dir(item.rel)
                left = storage.tree_stats(item.rel)[0]
                item.action = "removed" if not left else f"removal incomplete: {left} files left (permissions?)"
            finally:
                leases.release(lease)
    finally:
        leases.release_all()
    return found


def human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1024 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"
