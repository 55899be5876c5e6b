"""Requests nothing can serve fail at once with a message naming what was asked: a stage's resources the (real,
local) Ray cluster does not have (checked for every planned stage before the first starts), a tracking store that
does not answer. Before these checks the first ran "running" forever and the second was silent for minutes (MLflow's
client retries)."""

from __future__ import annotations

import socket

import pytest
from typer.testing import CliRunner

from pipeline import dag
from pipeline.cli import app
from pipeline.testing import FAKE_STAGES

runner = CliRunner()
pytestmark = pytest.mark.timeout(180)  # "at once": a hang fails the test instead of the suite


def test_a_stage_asking_more_than_the_cluster_has_fails_naming_both(ray_session, tmp_path, monkeypatch):
    monkeypatch.setattr(dag, "STAGES", FAKE_STAGES)
    res = runner.invoke(app, ["run", "-p", "smoke", "--tasks", "caption", "--root", str(tmp_path / "art"),
                              "resources.train_teacher.cpus=100", "train_teacher.max_steps=3"])
    assert res.exit_code == 2, res.output  # refused before any stage starts: a user error, no traceback
    out = " ".join(res.output.split())
    assert "caption/train_teacher" in out and "cannot provide" in out and "Traceback" not in out
    assert "100 CPU" in out and "CPU: 2" in out, out  # what it asked and what the nodes have
    assert not list((tmp_path / "art").glob("caption*")), "no stage may start on a plan the cluster cannot run"


def test_a_tracking_store_that_does_not_answer_fails_in_seconds_naming_it(ray_session, tmp_path, monkeypatch):
    monkeypatch.setattr(dag, "STAGES", FAKE_STAGES)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uri = f"http://127.0.0.1:{port}"
    res = runner.invoke(app, ["run", "-p", "smoke", "--tasks", "caption", "--root", str(tmp_path / "art"),
                              "--tracking-uri", uri])
    assert res.exit_code == 2, res.output
    assert uri in res.output and "does not answer" in res.output and "Traceback" not in res.output
    assert not list((tmp_path / "art").glob("caption*")), "nothing may start before the store answers"
