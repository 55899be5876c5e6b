"""Chaos benchmark: smoke runs (caption, tiny) with one random fault each, then a clean rerun that must succeed.

Faults: the driver killed (SIGKILL) or interrupted (SIGINT to its process group, as Ctrl-C) during a stage; a
training worker process killed (SIGKILL; the stage's `max_failures=1` lets Ray retry it, resuming from its
checkpoint); the MLflow tracking server killed during the run (restarted before the clean rerun); two invocations
started together on one root. Every run writes to one artifact root and one real `mlflow server` on 127.0.0.1;
round k uses `seed=k`, so each round has all its stages to run. Not a test: it prints figures.

    python bench/chaos.py --runs 6 --budget-s 900 [--seed 0] [--workdir DIR] [overrides ...]

Figures:
- faults injected / survived: a fault is survived when the faulted invocation or its clean rerun succeeds, every
  published stage folder matches its manifest and nothing of the runs is left (processes, temp folders).
- stages retrained beyond the necessary: executions that finished for a stage key that had already finished once
  (MLflow child runs that are not cache hits, per cache key, beyond the first).
- artifacts lost or corrupted: published stage folders that disappeared, or whose files no longer match the sha256s
  of their manifest (all folders checked after every round).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
SERVER = REPO / "infra" / "mlflow" / "server.sh"
TINY = ["pretrain.enabled=false", "train_teacher.max_steps=12", "train_nar.max_steps=12", "data.train_per_task=40",
        "data.val_per_task=10", "data.test_per_task=10", "evaluate.max_samples=10", "benchmark.num_samples=4",
        "train_teacher.checkpoint_every=4", "train_nar.checkpoint_every=4", "train_teacher.val_every=4",
        "train_nar.val_every=4", "train_teacher.max_failures=1", "train_nar.max_failures=1", "name=narvl-chaos"]
FAULTS = ("driver_sigkill", "driver_sigint", "worker_kill", "tracking_kill", "concurrent")
# where a driver is stopped (prepare_data is shared by every round: cached after the first)
STAGE_LINES = ("train_teacher: running", "train_nar: running", "evaluate_ar: running")


def _procs() -> dict[int, tuple[int, int, str]]:
    out = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                raw = Path(f"/proc/{name}/stat").read_text()
                cmd = Path(f"/proc/{name}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            fields = raw[raw.rindex(")") + 2:].split()
            if fields[0] != "Z":
                out[int(name)] = (int(fields[1]), int(fields[3]), cmd)
    return out


def tree(root_pid: int) -> dict[int, str]:
    """A driver started in its own session: its session's processes and all their descendants (pid -> cmdline)."""
    procs = _procs()
    mine = {p for p, (_, sid, _) in procs.items() if sid == root_pid}
    grew = True
    while grew:
        new = {p for p, (ppid, _, _) in procs.items() if ppid in mine and p not in mine}
        mine |= new
        grew = bool(new)
    return {p: procs[p][2] for p in mine}


class Driver:
    def __init__(self, args: list[str], log: Path, tmp: Path, uri: str) -> None:
        env = {**os.environ, "TMPDIR": str(tmp), "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
               "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
        env.pop("RAY_ADDRESS", None)
        self.log = log
        self.proc = subprocess.Popen([sys.executable, "-m", "pipeline", "run", "--tracking-uri", uri, *args],
                                     cwd=REPO, env=env, start_new_session=True, stdout=open(log, "w"),
                                     stderr=subprocess.STDOUT)
        self.seen: set[int] = set()

    def watch(self, until: str | None, timeout: float) -> bool:
        """Note its processes until `until` is in its output (True), it exits or `timeout` passes (False)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            self.seen |= set(tree(self.proc.pid))
            if until is not None and until in self.log.read_text(errors="replace"):
                return True
            if self.proc.poll() is not None:
                return False
            time.sleep(0.2)
        return False

    def finish(self, timeout: float) -> int:
        self.watch(None, timeout)
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        return self.proc.wait()

    def left(self, wait_s: float = 30.0) -> int:
        deadline = time.time() + wait_s
        while True:
            alive = self.seen & set(_procs()) - {self.proc.pid}
            if not alive or time.time() > deadline:
                return len(alive)
            time.sleep(0.5)


def published(root: Path) -> dict[str, str]:
    """rel -> key of every published stage folder (a manifest that says succeeded)."""
    out = {}
    for m in root.glob("*/*/manifest.json"):
        if m.parent.name.startswith("."):
            continue
        try:
            data = json.loads(m.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if data.get("status") == "succeeded":
            out[m.parent.relative_to(root).as_posix()] = data["key"]
    return out


def corrupted(root: Path, folders: dict[str, str]) -> list[str]:
    from pipeline.storage import StorageError, verify_files

    bad = []
    for rel in folders:
        try:
            verify_files(root / rel, rel)
        except (StorageError, OSError, json.JSONDecodeError) as e:
            bad.append(f"{rel}: {e}")
    return bad


def extra_trainings(uri: str) -> int:
    """Finished executions (not cache hits) of a stage key beyond its first, over every run of the session."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("narvl-chaos")
    if exp is None:
        return 0
    runs = client.search_runs([exp.experiment_id], filter_string="tags.narvl_role = 'stage' and "
                              "tags.cache_hit = 'false' and attributes.status = 'FINISHED'", max_results=50000)
    per_key: dict[str, int] = {}
    for r in runs:
        per_key[r.data.tags["cache_key"]] = per_key.get(r.data.tags["cache_key"], 0) + 1
    return sum(n - 1 for n in per_key.values() if n > 1)


def server(cmd: str, folder: Path, port: int) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_TRACKING_", "MLFLOW_AUTH_"))}
    env.update(MLFLOW_PORT=str(port), PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    proc = subprocess.run(["bash", str(SERVER), cmd, str(folder)], env=env, capture_output=True, text=True,
                          timeout=180)
    if proc.returncode != 0:
        raise RuntimeError(f"server.sh {cmd}: {proc.stdout}{proc.stderr}")


def round_(k: int, fault: str, rng: random.Random, work: Path, uri: str, port: int, overrides: list[str],
           deadline: float) -> dict:
    root, tmp = work / "root", Path(tempfile.mkdtemp(prefix="nc", dir="/tmp"))
    args = ["--profile", "smoke", "--tasks", "caption", "--root", str(root), *TINY, *overrides, f"seed={k}"]
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    before = published(root)
    out: dict = {"round": k, "fault": fault, "injected": False}
    left = 0
    t0 = time.time()
    budget = max(60.0, deadline - time.time())
    if fault == "concurrent":
        a = Driver(args, logs / f"{k}-a.log", tmp, uri)
        b = Driver(args, logs / f"{k}-b.log", tmp, uri)
        out["injected"] = True
        rcs = [a.finish(budget), b.finish(budget)]
        out["faulted_rc"] = rcs
        out["faulted_ok"] = rcs == [0, 0]
        left += a.left() + b.left()
    else:
        d = Driver(args, logs / f"{k}-fault.log", tmp, uri)
        if fault == "worker_kill":
            stage = rng.choice(("train_teacher", "train_nar"))
            if d.watch(f"{stage}: running", budget):
                end = time.time() + 60
                while time.time() < end and not out["injected"]:
                    for pid, cmd in tree(d.proc.pid).items():
                        if cmd.startswith(f"ray::caption/{stage}"):
                            time.sleep(rng.uniform(0.5, 3.0))
                            try:
                                os.kill(pid, signal.SIGKILL)
                                out["injected"], out["at"] = True, stage
                            except OSError:
                                pass
                            break
                    time.sleep(0.1)
        else:
            line = rng.choice(STAGE_LINES)
            if d.watch(line, budget):
                time.sleep(rng.uniform(0.0, 2.0))
                out["at"] = line
                if fault == "driver_sigkill":
                    os.kill(d.proc.pid, signal.SIGKILL)
                elif fault == "driver_sigint":
                    os.killpg(d.proc.pid, signal.SIGINT)
                else:
                    server("stop", work / "mlflow", port)
                out["injected"] = True
        rc = d.finish(budget)
        out["faulted_rc"] = rc
        out["faulted_ok"] = rc == 0
        if fault == "tracking_kill" and out["injected"]:
            server("start", work / "mlflow", port)
        left += d.left()
    clean = Driver(args, logs / f"{k}-rerun.log", tmp, uri)
    rc = clean.finish(max(60.0, deadline - time.time()))
    left += clean.left()
    after = published(root)
    out["rerun_ok"] = rc == 0
    out["lost"] = sorted(set(before) - set(after))
    out["corrupted"] = corrupted(root, after)
    out["processes_left"] = left
    out["temp_left"] = sorted(p.name for p in tmp.iterdir() if p.name.startswith("narvl-"))
    out["survived"] = bool(out["rerun_ok"] and not out["lost"] and not out["corrupted"] and not left
                           and not out["temp_left"])
    out["wall_s"] = round(time.time() - t0, 1)
    shutil.rmtree(tmp, ignore_errors=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=6, help="rounds (one fault, then a clean rerun, each)")
    parser.add_argument("--budget-s", type=float, default=900.0, help="no round starts after this many seconds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None, help="kept after the run (default: a temp folder)")
    parser.add_argument("overrides", nargs="*", help="pipeline overrides added to the tiny smoke config")
    a = parser.parse_args()
    if a.runs < 1 or a.runs > 100 or a.budget_s <= 0:
        parser.error("--runs must be 1..100 and --budget-s positive")
    rng = random.Random(a.seed)
    work = a.workdir or Path(tempfile.mkdtemp(prefix="narvl-chaos-"))
    work.mkdir(parents=True, exist_ok=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uri = f"http://127.0.0.1:{port}"
    os.environ.update(MLFLOW_HTTP_REQUEST_MAX_RETRIES="1", MLFLOW_HTTP_REQUEST_TIMEOUT="10")
    server("start", work / "mlflow", port)
    started = time.time()
    deadline = started + a.budget_s
    faults = [FAULTS[i % len(FAULTS)] for i in range(a.runs)]
    rng.shuffle(faults)
    rounds = []
    try:
        for k, fault in enumerate(faults):
            if time.time() > deadline - 60:
                print(f"budget reached: {k} of {a.runs} rounds", flush=True)
                break
            r = round_(k, fault, rng, work, uri, port, a.overrides, deadline)
            rounds.append(r)
            print(json.dumps(r), flush=True)
        extra = extra_trainings(uri)
    finally:
        server("stop", work / "mlflow", port)
    injected = [r for r in rounds if r["injected"]]
    by_kind = {f: sum(r["fault"] == f for r in injected) for f in FAULTS}
    checked = len(published(work / "root"))
    lost = sum(len(r["lost"]) for r in rounds)
    bad = len({c for r in rounds for c in r["corrupted"]})
    cmd = "python bench/chaos.py " + " ".join(sys.argv[1:])
    print(f"\n{cmd}\nchaos: {len(rounds)} rounds in {time.time() - started:.0f} s (seed {a.seed}); work folder {work}")
    print("faults injected: " + f"{len(injected)} (" + ", ".join(f"{k} {v}" for k, v in by_kind.items()) + ")")
    print(f"faults survived: {sum(r['survived'] for r in injected)}/{len(injected)} "
          f"(the faulted invocation itself succeeded in {sum(bool(r['faulted_ok']) for r in injected)})")
    print(f"stages retrained beyond the necessary: {extra}")
    print(f"artifacts lost or corrupted: {lost + bad} ({checked} published stage folders checked against their "
          "manifest sha256s)")
    print(f"processes left behind: {sum(r['processes_left'] for r in rounds)}; temp folders left behind: "
          f"{sum(len(r['temp_left']) for r in rounds)}")
    ok = all(r["survived"] for r in injected) and lost + bad == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
