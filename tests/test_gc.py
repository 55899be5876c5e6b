"""`narvl gc` on a local root and on an S3-compatible store (moto's server on 127.0.0.1): a dead owner's work folder
and a lease-less attempt folder are removed, a folder under a live lease and a recently changed one are kept,
--dry-run removes nothing and lists sizes."""

from __future__ import annotations

import json
import os
import time

import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.gc import collect, lease_for, scan
from pipeline.lease import Leases
from pipeline.storage import Storage

DEAD = "vqa/.work-train_teacher-aaaaaaaaaaaa"
LIVE = "vqa/.work-train_nar-bbbbbbbbbbbb"
ATTEMPT = "caption/.tmp-evaluate_ar-cccccccccccc-1234abcd"
DONE = "vqa/train_teacher-aaaaaaaaaaaa"  # a finished stage folder: never a candidate


@pytest.fixture(scope="module")
def s3_root(s3_server):
    import boto3

    boto3.client("s3").create_bucket(Bucket="narvl-gc")
    return "s3://narvl-gc/root"


def _populate(storage: Storage, tag: str) -> Leases:
    """A dead owner's work folder (stale lease), a live owner's (a held lease), a lease-less attempt folder."""
    for rel in (DEAD, LIVE):
        storage.write_bytes(f"{rel}/ckpt/step_00000004/ds/mp_rank_00_model_states.pt", b"w" * 3000)
        storage.write_bytes(f"{rel}/ckpt/step_00000004/train_state.json", b"{}")
    storage.write_bytes(f"{ATTEMPT}/predictions.jsonl", b"p" * 500)
    storage.write_bytes(f"{DONE}/manifest.json", b"{}")
    storage.write_bytes(lease_for("vqa", DEAD.split("/")[1]),  # its owner died an hour ago
                        json.dumps({"owner": f"dead-{tag}", "heartbeat": time.time() - 3600}).encode())
    live = Leases(storage, heartbeat_s=1.0)
    assert live.acquire(lease_for("vqa", LIVE.split("/")[1]))
    return live


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_gc_removes_only_abandoned_folders(kind, tmp_path, request):
    root = str(tmp_path) if kind == "local" else request.getfixturevalue("s3_root") + f"/{tmp_path.name}"
    storage = Storage(root)
    live = _populate(storage, kind)
    try:
        assert lease_for("caption", ATTEMPT.split("/")[1]) == "caption/.lease-evaluate_ar-cccccccccccc.json"
        # within the grace period (files just written) nothing is removed
        kept = {i.rel: i.action for i in collect(storage, grace_s=3600)}
        assert kept.pop(LIVE) == "live lease" and set(kept) == {DEAD, ATTEMPT}
        assert all(a.startswith("changed ") and a.endswith(" s ago") for a in kept.values()), kept
        # --dry-run lists the two abandoned folders with their sizes and removes nothing
        dry = {i.rel: i for i in collect(storage, grace_s=0, dry_run=True)}
        assert {r: i.action for r, i in dry.items()} == {DEAD: "remove", LIVE: "live lease", ATTEMPT: "remove"}
        assert (dry[DEAD].files, dry[DEAD].bytes) == (2, 3002) and dry[ATTEMPT].bytes == 500
        assert storage.tree_stats(DEAD)[0] == 2 and storage.tree_stats(ATTEMPT)[0] == 1

        done = {i.rel: i.action for i in collect(storage, grace_s=0)}
        assert done == {DEAD: "removed", LIVE: "live lease", ATTEMPT: "removed"}
        assert storage.tree_stats(DEAD)[0] == 0 and storage.tree_stats(ATTEMPT)[0] == 0
        assert storage.tree_stats(LIVE)[0] == 2 and storage.read_bytes(f"{DONE}/manifest.json") == b"{}"
        assert storage.read_bytes(lease_for("vqa", DEAD.split("/")[1])) is None  # taken over, then released
        assert live.holder(lease_for("vqa", LIVE.split("/")[1])) == live.owner  # the live owner keeps its lease
    finally:
        live.release_all()
    assert [i.rel for i in scan(storage, grace_s=0)] == [LIVE]  # its owner is gone now: the next gc takes it


def test_gc_command_dry_run_then_remove(tmp_path):
    storage = Storage(tmp_path)
    live = _populate(storage, "cli")
    try:
        old = time.time() - 2 * 3600
        for rel in (DEAD, ATTEMPT):  # idle for two hours
            for folder, _, files in os.walk(tmp_path / rel):
                for p in [folder, *(os.path.join(folder, f) for f in files)]:
                    os.utime(p, (old, old))
        runner = CliRunner()
        res = runner.invoke(app, ["gc", "--root", str(tmp_path), "--dry-run"])
        assert res.exit_code == 0, res.output
        lines = {line.split()[-1]: line.split() for line in res.output.splitlines()[:3]}
        assert lines[DEAD][:6] == ["would", "remove", "2.9", "KB", "2", "files"]
        assert lines[ATTEMPT][:4] == ["would", "remove", "500", "B"] and lines[LIVE][:2] == ["live", "lease"]
        assert "would remove 2 of 3 scratch folders, 3.4 KB" in res.output
        assert (tmp_path / DEAD).is_dir() and (tmp_path / ATTEMPT).is_dir()

        res = runner.invoke(app, ["gc", "--root", str(tmp_path)])  # default grace: one hour
        assert res.exit_code == 0, res.output
        assert "removed 2 of 3 scratch folders" in res.output
        assert not (tmp_path / DEAD).exists() and not (tmp_path / ATTEMPT).exists() and (tmp_path / LIVE).is_dir()
    finally:
        live.release_all()


def test_gc_marks_the_runs_of_dead_drivers_killed(tmp_path):
    """`narvl gc` also ends what a dead driver left in MLflow: its RUNNING runs become KILLED; --dry-run touches
    nothing."""
    import subprocess
    import sys

    from mlflow.tracking import MlflowClient

    from pipeline import tracking

    root = tmp_path / "root"
    storage = Storage(root)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    tracker = tracking.Tracker(storage, None, "narvl-gc")
    parent = tracker.start_parent({"a": 1}, {"mlflow.runName": "orphan"}, stamp="20000101-000000")
    child = tracker.start_child("caption/train_nar", {"node": "train_nar"})
    tracker._stop.set()  # the driver "dies": no heartbeat, no end
    record = storage.read_json(f"runs/.live/{parent}.json")
    storage.write_json(f"runs/.live/{parent}.json", {**record, "pid": dead.pid})
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")

    res = CliRunner().invoke(app, ["gc", "--root", str(root), "--dry-run"])
    assert res.exit_code == 0, res.output
    assert client.get_run(parent).info.status == "RUNNING"
    res = CliRunner().invoke(app, ["gc", "--root", str(root)])
    assert res.exit_code == 0, res.output
    assert "2 MLflow run(s) of dead drivers marked KILLED" in res.output, res.output
    assert {client.get_run(r).info.status for r in (parent, child)} == {"KILLED"}
