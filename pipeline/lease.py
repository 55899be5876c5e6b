"""Leases: one owner per stage key at a time, on any artifact root.

Two drivers planning the same stage on one root (two `narvl run` started together, a sweep beside a run) must not
both train it: they would share its `.work-*` folder. Before a driver submits a node it takes the node's lease,
`<root>/<task>/.lease-<name>-<key12>.json` = {owner, host, pid, heartbeat}, created atomically (O_EXCL on a
filesystem, a conditional `If-None-Match: *` write on S3). The owner refreshes the heartbeat while the node runs
and deletes the lease when the node ends. Another driver that finds the lease waits: when the owner's manifest
appears the node is a cache hit for it too; when the heartbeat is older than `stale_after_s`, or the owner is a
process of this host that is gone (a driver killed with SIGKILL), the lease is taken over and the node runs again,
resuming from its checkpoints if it trains.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid

from pipeline.cache import folder_name
from pipeline.reaper import process_start
from pipeline.storage import Storage

HEARTBEAT_S = 10.0
STALE_AFTER_S = 60.0


def lease_rel(task: str, node_name: str, key: str) -> str:
    return f"{task}/.lease-{folder_name(node_name, key)}.json"


class Leases:
    """The leases one driver holds, with a thread that keeps their heartbeats fresh."""

    def __init__(self, storage: Storage, stale_after_s: float = STALE_AFTER_S,
                 heartbeat_s: float = HEARTBEAT_S) -> None:
        self.storage, self.stale_after_s, self.heartbeat_s = storage, stale_after_s, heartbeat_s
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.held: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> bytes:
        return json.dumps({"owner": self.owner, "host": socket.gethostname(), "pid": os.getpid(),
                           "pid_start": process_start(os.getpid()), "heartbeat": time.time()}).encode()

    def acquire(self, rel: str) -> bool:
        """Take the lease at `rel`; False while another live owner holds it (a stale one is taken over)."""
        if self.storage.create_exclusive(rel, self._record()):
            return self._hold(rel)
        current = self.storage.read_json(rel)
        if current is None:
            return False  # being replaced right now, or unreadable: the next attempt sees it whole
        if time.time() - float(current.get("heartbeat", 0)) > self.stale_after_s or _owner_gone(current):
            self.storage.delete_file(rel)  # the owner died (or the file is unreadable): take it over
            if self.storage.create_exclusive(rel, self._record()):
                return self._hold(rel)
        return False

    def holder(self, rel: str) -> str | None:
        current = self.storage.read_json(rel)
        return str(current.get("owner")) if isinstance(current, dict) else None

    def _hold(self, rel: str) -> bool:
        with self._lock:
            self.held.add(rel)
            if self._thread is None:
                self._thread = threading.Thread(target=self._beat, name="narvl-leases", daemon=True)
                self._thread.start()
        return True

    def release(self, rel: str) -> None:
        with self._lock:
            if rel not in self.held:
                return
            self.held.discard(rel)
        if self.holder(rel) == self.owner:
            self.storage.delete_file(rel)

    def release_all(self) -> None:
        for rel in list(self.held):
            self.release(rel)
        self._stop.set()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            with self._lock:
                held = list(self.held)
            for rel in held:
                try:
                    self.storage.write_bytes(rel, self._record())
                except Exception:  # noqa: BLE001 - the next beat tries again; staleness needs many misses
                    pass


def _owner_gone(record: dict) -> bool:
    """The lease's owner was a process of this host that no longer runs (same pid, other start time: not it)."""
    pid = record.get("pid")
    if record.get("host") != socket.gethostname() or not isinstance(pid, int) or "pid_start" not in record:
        return False
    return process_start(pid) != record["pid_start"]
