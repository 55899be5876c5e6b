"""A tracking server lost mid-run (a real `mlflow server` process, stopped, then started again on the same store)
and drivers that die: the run goes on and publishes its outputs, the tracking events it could not deliver are kept
in its run folder and delivered later (by the run itself once the server answers, by the next run, or by
`narvl sync`) without doubling a curve point; the runs of a dead driver end KILLED."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline import dag, tracking
from pipeline.config import load_config
from pipeline.storage import Storage
from pipeline.testing import FAKE_STAGES

REPO = Path(__file__).resolve().parent.parent
SERVER = REPO / "infra" / "mlflow" / "server.sh"

pytestmark = pytest.mark.timeout(600)


class MlflowServer:
    """infra/mlflow/server.sh on 127.0.0.1 (sqlite store, no auth): stop() kills it, start() brings it back."""

    def __init__(self, root: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.root, self.url = root, f"http://127.0.0.1:{self.port}"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_TRACKING_", "MLFLOW_AUTH_"))}
        self.env.update(MLFLOW_PORT=str(self.port), PATH=f"{Path(sys.executable).parent}{os.pathsep}"
                                                         f"{os.environ.get('PATH', '')}")

    def _call(self, cmd: str) -> None:
        proc = subprocess.run(["bash", str(SERVER), cmd, str(self.root)], env=self.env, capture_output=True,
                              text=True, timeout=180)
        assert proc.returncode == 0, proc.stdout + proc.stderr

    def start(self) -> None:
        self._call("start")

    def stop(self) -> None:
        self._call("stop")


@pytest.fixture
def server(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    srv = MlflowServer(tmp_path / "mlflow-server")
    srv.start()
    yield srv
    if (srv.root / "server.pid").exists():
        srv.stop()


def _config(*extra: str):
    return load_config(profile="smoke", overrides=["tasks=[caption]", "pretrain.enabled=false",
                                                   "train_teacher.max_steps=6", "train_nar.max_steps=8",
                                                   "name=narvl-outage", *extra])


def _runs(url: str, parent: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=url)
    exp = client.get_run(parent).info.experiment_id
    return client, client.get_run(parent), client.search_runs(
        [exp], filter_string=f"tags.mlflow.parentRunId = '{parent}'")


def test_server_lost_mid_run_then_synced(ray_session, server, tmp_path, monkeypatch):
    """The server dies once prepare_data is done: every stage still runs and is published, nothing waits on the
    server for long, the events wait in the run folder; `narvl sync` after the restart delivers them, once."""
    monkeypatch.setattr(dag, "STAGES", FAKE_STAGES)
    root = tmp_path / "root"
    stopped: list[float] = []

    def on_update(statuses) -> None:
        if not stopped and any(s.name == "prepare_data" and s.state == "succeeded" for s in statuses):
            server.stop()
            stopped.append(time.time())

    result = dag.run_pipeline(_config(), root, tracking_uri=server.url, on_update=on_update, poll_s=0.1)
    took = time.time() - stopped[0]
    assert result.ok, [(f.id, f.error) for f in result.failures]
    assert took < 120, f"the run waited {took:.0f} s on a dead tracking server"
    for st in result.statuses.values():  # every output published, as if the server had been there
        manifest = json.loads((root / st.rel / "manifest.json").read_text())
        assert manifest["status"] == "succeeded" and manifest["key"] == st.key
    spool = result.report_dir / "tracking.jsonl"  # in the run folder, beside the report
    assert result.report_dir.parent == root / "runs" and spool.is_file()
    events = [json.loads(line) for line in spool.read_text().splitlines()]
    ops = {e["op"] for e in events}
    assert {"create_run", "log_batch", "set_terminated", "log_artifact"} <= ops, ops
    record = json.loads((root / "runs" / ".live" / f"{result.parent_run_id}.json").read_text())
    assert record["closed"] is True and record["spool"].endswith("tracking.jsonl")
    kept = spool.read_text()

    server.start()
    proc = subprocess.run([sys.executable, "-m", "pipeline", "sync", "--root", str(root), "--tracking-uri",
                           server.url], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"1 ended run(s) synced: {len(events)} kept tracking event(s) delivered" in proc.stdout, proc.stdout
    assert not spool.exists() and not (root / "runs" / ".live" / f"{result.parent_run_id}.json").exists()

    client, parent, children = _runs(server.url, result.parent_run_id)
    assert parent.info.status == "FINISHED" and "caption.narvl.value" in parent.data.metrics
    assert {c.data.tags["node"] for c in children} == {s.name for s in result.statuses.values()}
    assert all(c.info.status == "FINISHED" for c in children)
    nar = next(c for c in children if c.data.tags["node"] == "train_nar")
    assert nar.data.params["train.max_steps"] == "8"
    steps = [m.step for m in client.get_metric_history(nar.info.run_id, "train/loss")]
    assert sorted(steps) == list(range(8)), steps  # every point, once
    assert any(a.path == "manifest.json" for a in client.list_artifacts(nar.info.run_id))

    # delivering the same events again (a sync cut short and run again) changes nothing
    spool.write_text(kept)
    ids: dict[str, str] = {}
    tracking.replay(client, parent.info.experiment_id, [json.loads(x) for x in kept.splitlines()], ids,
                    tracking.artifact_dirs(Storage(root)), parent=result.parent_run_id)
    _, _, again = _runs(server.url, result.parent_run_id)
    assert len(again) == len(children)
    assert [m.step for m in client.get_metric_history(nar.info.run_id, "train/loss")] == steps


@pytest.mark.slow
def test_server_back_during_the_run_gets_the_events_then(ray_session, server, tmp_path, monkeypatch):
    """Down for a moment: the run delivers what it kept as soon as the server answers again, and ends with an
    empty spool and no record left."""
    monkeypatch.setattr(dag, "STAGES", FAKE_STAGES)
    monkeypatch.setattr(tracking, "RETRY_S", 0.5)
    root = tmp_path / "root"
    (root).mkdir()
    (root / "slow-s").write_text("1.5")
    phase: list[str] = []

    def on_update(statuses) -> None:
        done = {s.name for s in statuses if s.state == "succeeded"}
        if not phase and "prepare_data" in done:
            server.stop()
            phase.append("down")
        elif phase == ["down"] and "train_teacher" in done:
            server.start()
            phase.append("up")

    result = dag.run_pipeline(_config(), root, tracking_uri=server.url, on_update=on_update, poll_s=0.1)
    assert result.ok and phase == ["down", "up"]
    assert not (result.report_dir / "tracking.jsonl").exists()
    assert not (root / "runs" / ".live" / f"{result.parent_run_id}.json").exists()
    client, parent, children = _runs(server.url, result.parent_run_id)
    assert parent.info.status == "FINISHED"
    teacher = next(c for c in children if c.data.tags["node"] == "train_teacher")
    assert teacher.info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(teacher.info.run_id, "train/loss")) == list(range(6))


def test_dead_driver_runs_marked_killed_by_the_next_run(ray_session, tmp_path, monkeypatch):
    """A driver that died (its record names a pid that is gone) left RUNNING runs: the next run on the root marks
    them KILLED; a record of a live driver (this process) is left alone."""
    from mlflow.tracking import MlflowClient

    monkeypatch.setattr(dag, "STAGES", FAKE_STAGES)
    root = tmp_path / "root"
    storage = Storage(root)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    orphans = []
    for pid in (dead.pid, os.getpid()):
        tracker = tracking.Tracker(storage, None, "narvl-outage")
        parent = tracker.start_parent({"a": 1}, {"mlflow.runName": "orphan"}, stamp=f"2000010{len(orphans)}-000000")
        child = tracker.start_child("caption/train_nar", {"node": "train_nar"})
        tracker._stop.set()  # the driver "dies": no heartbeat, no end
        record = storage.read_json(f"runs/.live/{parent}.json")
        storage.write_json(f"runs/.live/{parent}.json", {**record, "pid": pid})
        orphans.append((parent, child))

    result = dag.run_pipeline(_config(), root, poll_s=0.1)
    assert result.ok
    assert result.synced["killed"] == 2 and result.synced["live"] == 1, result.synced
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    (dead_parent, dead_child), (live_parent, live_child) = orphans
    assert client.get_run(dead_parent).info.status == "KILLED"
    assert client.get_run(dead_child).info.status == "KILLED"
    assert client.get_run(live_parent).info.status == "RUNNING"  # its driver (this process) still runs
    assert not (root / "runs" / ".live" / f"{dead_parent}.json").exists()
    assert (root / "runs" / ".live" / f"{live_parent}.json").exists()


def test_resumed_training_points_are_logged_once(tmp_path):
    """A training that resumed from a checkpoint sends the steps after it again: the run keeps the first ones."""
    from mlflow.tracking import MlflowClient

    tracker = tracking.Tracker(Storage(tmp_path), None, "narvl-dedupe")
    tracker.start_parent({}, {}, stamp="20000101-000000")
    run = tracker.start_child("caption/train_nar", {})
    tracker.log_metrics(run, [(s, time.time(), {"loss": 1.0 / (s + 1)}) for s in range(10)])
    tracker.log_metrics(run, [(s, time.time(), {"loss": 2.0}) for s in range(5, 15)])  # resumed at step 5
    tracker.finish_parent("FINISHED")
    history = MlflowClient(tracking_uri=tracker.uri).get_metric_history(run, "loss")
    assert sorted(m.step for m in history) == list(range(15))
    assert {m.step: m.value for m in history}[7] == pytest.approx(1.0 / 8)
