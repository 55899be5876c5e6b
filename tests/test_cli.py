"""The `narvl` CLI (typer CliRunner): config show, errors exit 2, run / plan / compare with fake stages."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from pipeline import dag
from pipeline.cli import app
from pipeline.testing import FAKE_STAGES

runner = CliRunner()


def test_config_show_applies_overrides():
    res = runner.invoke(app, ["config", "show", "--profile", "smoke", "train_nar.max_steps=7", "--tasks", "vqa"])
    assert res.exit_code == 0, res.output
    shown = yaml.safe_load(res.stdout)
    assert shown["train_nar"]["max_steps"] == 7 and shown["tasks"] == ["vqa"] and shown["profile"] == "smoke"


@pytest.mark.parametrize("args, needle", [
    (["config", "show", "-p", "smoke", "train_nar.bogus=1"], "train_nar.bogus"),
    (["config", "show", "-p", "smoke", "train_nar.num_queries.caption=2"], "num_queries.caption"),
    (["config", "show", "-p", "nope"], "unknown profile"),
    (["config", "show", "-p", "smoke", "-c", "x.yaml"], "either --profile or --config"),
    (["sweep", "--config", "no-such-sweep.yaml"], "not found"),
    (["data", "convert", "nope", "--out", "/tmp/narvl-never"], "unknown format"),
])
def test_user_errors_exit_2_without_traceback(args, needle):
    res = runner.invoke(app, args)
    assert res.exit_code == 2, res.output
    assert needle in res.output and "Traceback" not in res.output


def test_run_plan_compare(ray_session, tmp_path, monkeypatch):
    monkeypatch.setattr(dag, "STAGES", FAKE_STAGES)
    root = str(tmp_path / "art")
    sel = ["--profile", "smoke", "--tasks", "caption", "--root", root, "train_nar.max_steps=5",
           "train_teacher.max_steps=5"]

    res = runner.invoke(app, ["plan", *sel])
    assert res.exit_code == 0, res.output
    assert res.output.count("RUN") == 8 and "HIT" not in res.output  # 8 nodes: pretrain is on in smoke

    res = runner.invoke(app, ["run", "--only", "evaluate", *sel])
    assert res.exit_code == 2 and "not cached" in res.output

    res = runner.invoke(app, ["run", *sel])
    assert res.exit_code == 0, res.output
    assert "report:" in res.output and "CIDEr" in res.output and "caption/train_nar: succeeded" in res.output
    summary = next((tmp_path / "art" / "runs").glob("*/summary.json"))
    assert json.loads(summary.read_text())["tasks"]["caption"]["speedup"] == 10.0
    assert "gap closed over an image-blind baseline" in res.output and "0.25" in res.output  # the fakes' gap

    res = runner.invoke(app, ["plan", *sel, "--force", "train_nar"])
    assert res.exit_code == 0
    assert res.output.count("HIT") == 5 and res.output.count("RUN") == 3

    res = runner.invoke(app, ["compare", "--root", root])
    assert res.exit_code == 0, res.output
    assert "caption AR CIDEr" in res.output and "10.00x" in res.output

    res = runner.invoke(app, ["compare", "--root", str(tmp_path / "none")])
    assert res.exit_code == 2 and "no MLflow store" in res.output


def test_run_with_failed_stage_exits_1(ray_session, tmp_path, monkeypatch):
    monkeypatch.setattr(dag, "STAGES", FAKE_STAGES)
    (tmp_path / "crash-caption-train_teacher").write_text("1")
    res = runner.invoke(app, ["run", "-p", "smoke", "--tasks", "caption", "--root", str(tmp_path),
                              "train_teacher.max_steps=3"])
    assert res.exit_code == 1
    assert "caption/train_teacher: failed" in res.output and "simulated crash at step 1" in res.output
