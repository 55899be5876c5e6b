"""The reaper of a private Ray: whatever happens to the driver, none of its Ray processes and no temp folder stay.

`ray.init` starts gcs_server and the raylet bound to the driver's life, but the raylet's agents (the dashboard and
runtime-env agents) outlive a driver killed with SIGKILL, and no Ray shutdown removes the session's temp folder.
`pipeline.ray_utils.init_ray` therefore starts this small process beside a private Ray (stdlib only, its own
session, so a Ctrl-C in the terminal does not reach it). Every second it notes the driver's Ray processes: the
driver's children whose command line names the Ray temp folder, and all their descendants. When its stdin closes
(the driver shut Ray down and closed the pipe, or the driver died), it ends those still alive (SIGTERM, then SIGKILL)
and removes the temp folder.

    python -m pipeline.reaper DRIVER_PID TEMP_DIR
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import sys
import time
from pathlib import Path

SCAN_S = 1.0
GRACE_S = 2.0


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time in clock ticks since boot) of a live process, or None."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2:].split()
    return int(fields[1]), int(fields[19])


def process_start(pid: int) -> int | None:
    """The start time of a live process (clock ticks since boot): with the pid, it names one process for good."""
    st = _stat(pid)
    return st[1] if st else None


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def ray_processes(driver_pid: int, temp_dir: str) -> dict[int, int]:
    """pid -> start time of the Ray processes a driver started: its children naming `temp_dir`, and their
    descendants (workers and agents rename themselves, so they are found through their parents)."""
    children: dict[int, list[int]] = {}
    starts: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        st = _stat(int(name))
        if st is not None:
            children.setdefault(st[0], []).append(int(name))
            starts[int(name)] = st[1]
    todo = [p for p in children.get(driver_pid, []) if p != os.getpid() and temp_dir in _cmdline(p)]
    found: dict[int, int] = {}
    while todo:
        pid = todo.pop()
        if pid in found or pid not in starts:
            continue
        found[pid] = starts[pid]
        todo.extend(children.get(pid, []))
    return found


def end_processes(procs: dict[int, int], grace_s: float = GRACE_S) -> int:
    """SIGTERM the processes of `procs` that are still the same processes, SIGKILL those alive after `grace_s`;
    returns how many were alive."""
    alive = {pid for pid, start in procs.items() if (_stat(pid) or (0, -1))[1] == start}
    found = len(alive)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in alive:
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        deadline = time.time() + (grace_s if sig == signal.SIGTERM else 5.0)
        while time.time() < deadline:
            alive = {pid for pid in alive if (_stat(pid) or (0, -1))[1] == procs[pid] and not _zombie(pid)}
            if not alive:
                break
            time.sleep(0.05)
    return found


def _zombie(pid: int) -> bool:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return raw[raw.rindex(")") + 2:].split()[0] == "Z"


def watch(driver_pid: int, temp_dir: str, fd: int = 0) -> None:
    """Note the driver's Ray processes until `fd` reaches end of file, then end them and remove `temp_dir`."""
    seen: dict[int, int] = {}
    while True:
        seen.update(ray_processes(driver_pid, temp_dir))
        ready, _, _ = select.select([fd], [], [], SCAN_S)
        if ready and not os.read(fd, 4096):
            break
    seen.update(ray_processes(driver_pid, temp_dir))
    end_processes(seen)
    shutil.rmtree(temp_dir, ignore_errors=True)


def main(argv: list[str]) -> int:
    if len(argv) != 2 or not argv[0].isdigit():
        print("usage: python -m pipeline.reaper DRIVER_PID TEMP_DIR", file=sys.stderr)
        return 2
    for sig in (signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    watch(int(argv[0]), argv[1])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
