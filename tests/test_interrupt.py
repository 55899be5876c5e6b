"""`narvl run` (the smoke pipeline on caption, tiny) as a user runs it, in its own session, watched from outside:
its private Ray listens on the loopback interface only; SIGINT / SIGTERM stop it within seconds with its MLflow
runs KILLED; after SIGKILL the reaper ends its Ray processes; in every case no process of it and no temp folder
of it stays, and the next run marks the dead driver's runs KILLED, resumes and finishes."""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# the teacher trains long enough (2,000 tiny steps, tens of seconds) that a signal sent a moment after it starts
# always lands mid-training, however fast the machine
TINY = ["pretrain.enabled=false", "train_teacher.max_steps=2000", "train_nar.max_steps=4", "data.train_per_task=40",
        "data.val_per_task=10", "data.test_per_task=10", "evaluate.max_samples=10", "benchmark.num_samples=4",
        "train_teacher.checkpoint_every=500", "train_nar.checkpoint_every=2", "train_teacher.val_every=1000",
        "train_nar.val_every=2"]

pytestmark = pytest.mark.timeout(900)


# ---- watching a process tree from outside ----------------------------------------------------------------
def _procs() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, session id) of every process."""
    out = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                raw = Path(f"/proc/{name}/stat").read_text()
            except OSError:
                continue
            fields = raw[raw.rindex(")") + 2:].split()
            out[int(name)] = (int(fields[1]), int(fields[3]))
    return out


def tree(root_pid: int) -> set[int]:
    """The processes of a driver started in its own session: its session and all their descendants."""
    procs = _procs()
    mine = {p for p, (_, sid) in procs.items() if sid == root_pid} | ({root_pid} & set(procs))
    grew = True
    while grew:
        new = {p for p, (ppid, _) in procs.items() if ppid in mine and p not in mine}
        mine |= new
        grew = bool(new)
    return mine


def listening(pids: set[int]) -> set[tuple[str, int]]:
    """(local address, pid) of the TCP sockets these processes listen on: `ss -ltnp`, else /proc/net/tcp{,6}."""
    if shutil.which("ss"):
        out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
        found = set()
        for line in out.splitlines():
            local = line.split()[3]
            for pid in map(int, re.findall(r"pid=(\d+)", line)):
                if pid in pids:
                    found.add((local.rsplit(":", 1)[0].strip("[]"), pid))
        return found
    inodes: dict[str, str] = {}
    for table, v6 in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            if f[3] == "0A":  # LISTEN
                inodes[f[9]] = _hex_address(f[1].split(":")[0], v6)
    found = set()
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:[") and link[8:-1] in inodes:
                    found.add((inodes[link[8:-1]], pid))
        except OSError:
            continue
    return found


def _hex_address(h: str, v6: bool) -> str:
    raw = bytes.fromhex(h)
    if not v6:
        return str(ipaddress.IPv4Address(raw[::-1]))
    return str(ipaddress.IPv6Address(b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))))


def loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return ip.is_loopback


class Driver:
    """`narvl run --profile smoke --tasks caption` in its own session, with its own TMPDIR, watched every 0.3 s."""

    def __init__(self, root: Path, tmp: Path, *extra: str) -> None:
        self.log = root.parent / f"driver-{time.time_ns()}.log"
        env = {**os.environ, "TMPDIR": str(tmp)}
        env.pop("RAY_ADDRESS", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline", "run", "--profile", "smoke", "--tasks", "caption", "--root",
             str(root), *TINY, *extra], cwd=REPO, env=env, start_new_session=True, stdout=open(self.log, "w"),
            stderr=subprocess.STDOUT)
        self.seen: set[int] = set()
        self.sockets: set[tuple[str, int]] = set()

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def watch_until(self, text: str | None = None, timeout: float = 600, *, for_s: float | None = None) -> None:
        """Watch until `text` appears in the output (None: until the driver exits), or for `for_s` seconds."""
        deadline = time.time() + (for_s or timeout)
        while time.time() < deadline or for_s is not None:
            if for_s is not None and time.time() >= deadline:
                return
            pids = tree(self.proc.pid)
            self.seen |= pids
            self.sockets |= listening(pids)
            if text is not None and text in self.output():
                return
            if self.proc.poll() is not None:
                assert text is None, f"the driver ended before {text!r}:\n{self.output()[-3000:]}"
                return
            time.sleep(0.3)
        raise AssertionError(f"waited {timeout} s for {text!r}:\n{self.output()[-3000:]}")

    def survivors(self, wait_s: float = 30) -> set[int]:
        """Its processes still alive after `wait_s` (the reaper needs a few seconds after a SIGKILL)."""
        deadline = time.time() + wait_s
        while True:
            alive = {p for p in self.seen if p != self.proc.pid and Path(f"/proc/{p}").exists()
                     and Path(f"/proc/{p}/stat").read_text().split(") ")[-1][0] != "Z"}
            if not alive or time.time() > deadline:
                return alive
            time.sleep(0.5)


def _statuses(root: Path) -> dict[str, list[str]]:
    """MLflow run name -> the statuses of the runs of that name, sorted."""
    out: dict[str, list[str]] = {}
    with sqlite3.connect(root / "mlflow.db") as db:
        for name, status in db.execute("select name, status from runs"):
            out.setdefault(name, []).append(status)
    return {k: sorted(v) for k, v in out.items()}


@pytest.fixture
def tmp(tmp_path):
    """A short TMPDIR of its own (Ray's socket paths are short), checked empty of narvl temp folders after."""
    d = Path(tempfile.mkdtemp(prefix="nt", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _leftovers(tmp: Path) -> list[str]:
    return sorted(p.name for p in tmp.iterdir() if p.name.startswith("narvl-"))


@pytest.mark.parametrize("sig", [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow)])
def test_signal_stops_the_run_cleanly(sig, tmp_path, tmp):
    """Stopped during training (SIGTERM: a scheduler; SIGINT to the process group: Ctrl-C in a terminal)."""
    root = tmp_path / "root"
    driver = Driver(root, tmp)
    driver.watch_until("train_teacher: running")
    driver.watch_until(for_s=1.5)  # a little longer: the training worker's sockets too
    exposed = {(a, p) for a, p in driver.sockets if not loopback(a)}
    assert driver.sockets and not exposed, exposed  # Ray's servers, agents and workers: 127.0.0.1 only
    sent = time.time()
    os.killpg(driver.proc.pid, sig) if sig == signal.SIGINT else driver.proc.send_signal(sig)  # Ctrl-C: the group
    driver.watch_until(None, timeout=120)
    took = time.time() - sent
    assert driver.proc.returncode == 130, driver.output()[-3000:]
    assert took < 60, f"stopping took {took:.0f} s"
    assert "interrupted" in driver.output()
    assert not driver.survivors(), driver.survivors()
    assert not _leftovers(tmp)
    statuses = _statuses(root)
    assert not any("RUNNING" in s for s in statuses.values()), statuses
    assert statuses["caption/train_teacher"] == ["KILLED"] and statuses["caption/prepare_data"] == ["FINISHED"]
    assert [s for n, s in statuses.items() if n.startswith("smoke-")] == [["KILLED"]]
    assert not list((root / "runs" / ".live").glob("*.json"))  # the record ended with the run


@pytest.mark.slow
def test_sigkill_then_rerun_on_loopback_only(tmp_path, tmp):
    """SIGKILL mid-training: the reaper ends its Ray and removes its temp folder; the next run marks its MLflow
    runs KILLED, takes over its leases at once, resumes and finishes, listening on 127.0.0.1 only."""
    root = tmp_path / "root"
    killed = Driver(root, tmp)
    killed.watch_until("train_teacher: running")
    killed.proc.kill()
    killed.watch_until(None, timeout=60)
    assert not killed.survivors(), killed.survivors()
    assert not _leftovers(tmp)
    assert _statuses(root)["caption/train_teacher"] == ["RUNNING"]  # nobody could end it

    rerun = Driver(root, tmp)
    rerun.watch_until(None)
    assert rerun.proc.returncode == 0, rerun.output()[-3000:]
    assert "2 MLflow run(s) of dead drivers marked KILLED" in rerun.output()
    exposed = {(a, p) for a, p in rerun.sockets if not loopback(a)}
    assert rerun.sockets and not exposed, exposed
    assert not rerun.survivors(), rerun.survivors()
    assert not _leftovers(tmp)
    statuses = _statuses(root)
    assert statuses["caption/train_teacher"] == ["FINISHED", "KILLED"]
    assert not any("RUNNING" in s for s in statuses.values()), statuses
