"""The smoke pipeline end to end with the real stack (Ray, Ray Train + DeepSpeed, MLflow sqlite, shards),
then a rerun that must be all cache hits, then a query-count sweep that reuses the cached prefix."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from pipeline.config import load_config

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def smoke_run(ray_session, tmp_path_factory):
    from pipeline.dag import run_pipeline

    root = tmp_path_factory.mktemp("e2e") / "artifacts"
    cfg = load_config(profile="smoke")
    started = time.time()
    result = run_pipeline(cfg, root)
    return cfg, root, result, time.time() - started


def _client(root: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")


def test_smoke_pipeline_end_to_end(smoke_run):
    cfg, root, result, _ = smoke_run
    assert result.ok, [(f.id, f.error) for f in result.failures]
    summary = json.loads((result.report_dir / "summary.json").read_text())
    assert summary["profile"] == "smoke"
    assert set(summary["tasks"]) == {"caption", "vqa", "grounding", "entailment"}
    for task, row in summary["tasks"].items():
        for kind in ("ar", "narvl"):
            r = row[kind]
            assert isinstance(r["metric"], str) and r["metrics"], (task, kind)
            assert 0.0 <= r["value"] <= (1000.0 if task == "caption" else 100.0), (task, kind, r["value"])
            assert r["latency_ms"] > 0
        assert row["speedup"] > 0
    report = (result.report_dir / "report.md").read_text()
    assert report.count("|") > 10
    for task, row in summary["tasks"].items():  # the image-blind baseline and the gap closed, in the report too
        blind, gap = row["blind"], row["ar"]["gap"]
        assert blind["value"] == pytest.approx(100 * row["ar"]["metrics"][f"blind_{blind['metric']}"])
        assert gap["gap_closed"] == pytest.approx((gap["score"] - gap["blind"]) / (100 - gap["blind"]))
        assert f"| {task} | {blind['metric']} | {blind['value']:.2f} ({blind['predictor']}) |" in report
    # every executed stage left a finished folder with the manifest written last and the resolved config
    from pipeline.storage import verify_files

    for st in result.statuses.values():
        folder = root / st.rel
        manifest = json.loads((folder / "manifest.json").read_text())
        assert manifest["status"] == "succeeded" and manifest["key"] == st.key
        assert (folder / "config.yaml").exists() and (folder / "stage.log").exists()
        assert "stage.log" in manifest["files"]
        verify_files(folder, st.rel)  # every file as the manifest's sha256 says
    # the training stages ran as one worker inside their own Ray task (no worker group to start)
    teacher = json.loads((root / result.statuses["vqa/train_teacher"].rel / "metrics.json").read_text())
    assert teacher["launcher"] == "task" and teacher["steps"] == cfg.train_teacher.max_steps


def test_mlflow_has_parent_and_one_child_per_stage(smoke_run):
    cfg, root, result, _ = smoke_run
    client = _client(root)
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.params["train_nar.loss"] == "qctc"
    assert "caption.narvl.value" in parent.data.metrics and "vqa.speedup" in parent.data.metrics
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{result.parent_run_id}'")
    by_node = {(r.data.tags["task"], r.data.tags["node"]): r for r in children}
    assert len(children) == len(result.statuses) == len(by_node)
    teacher = by_node[("vqa", "train_teacher")]
    assert teacher.data.tags["cache_hit"] == "false"
    history = client.get_metric_history(teacher.info.run_id, "loss")
    assert len(history) >= 3 and history[-1].value < history[0].value  # a training curve that falls
    ev = by_node[("vqa", "evaluate_narvl")]
    assert any(a.path.endswith("predictions.parquet") for a in client.list_artifacts(ev.info.run_id))


def test_rerun_is_all_cache_hits(smoke_run, monkeypatch):
    from pipeline.dag import run_pipeline
    from pipeline.executor import Executor

    def no_ray(self):
        raise AssertionError("an all-hit rerun started Ray")

    monkeypatch.setattr(Executor, "ensure_ray", no_ray)
    cfg, root, first, first_s = smoke_run
    started = time.time()
    result = run_pipeline(cfg, root)
    took = time.time() - started
    assert result.ok
    assert {s.state for s in result.statuses.values()} == {"hit"}
    assert {s.rel for s in result.statuses.values()} == {s.rel for s in first.statuses.values()}
    assert took < first_s / 4
    client = _client(root)
    hits = client.search_runs([client.get_run(result.parent_run_id).info.experiment_id],
                              filter_string=f"tags.mlflow.parentRunId = '{result.parent_run_id}'")
    assert hits and all(r.data.tags["cache_hit"] == "true" for r in hits)
    assert all(r.data.tags["produced_by_run"] not in ("", "unknown") for r in hits)


def test_sweep_reuses_cached_prefix(smoke_run):
    from pipeline.sweep import SweepConfig, run_sweep

    cfg, root, first, _ = smoke_run
    teacher_dir = root / first.statuses["vqa/train_teacher"].rel
    teacher_mtime = (teacher_dir / "manifest.json").stat().st_mtime
    n_default = cfg.train_nar.num_queries["vqa"]
    scfg = SweepConfig(name="sweep-test", pipeline="smoke", num_queries={"vqa": [n_default, 8]})
    result = run_sweep(scfg, root)
    rows = {r["num_queries"]: r for r in result["rows"]}
    assert set(rows) == {n_default, 8}
    for r in rows.values():
        assert r["metric"] and 0 <= r["value"] <= 100 and r["latency_ms"] > 0
    # the teacher was not retrained: same folder, manifest untouched, and a single teacher folder exists
    assert (teacher_dir / "manifest.json").stat().st_mtime == teacher_mtime
    assert len(list((root / "vqa").glob("train_teacher-*"))) == 1
    assert (result["dir"] / "results.csv").exists() and (result["dir"] / "query_length.png").exists()
    client = _client(root)
    parent = client.get_run(result["parent_run_id"])
    trials = client.search_runs([parent.info.experiment_id],
                                filter_string=f"tags.mlflow.parentRunId = '{result['parent_run_id']}' "
                                              "and tags.narvl_role = 'trial'")
    assert sorted(int(t.data.params["num_queries"]) for t in trials) == sorted([n_default, 8])
    assert all("value" in t.data.metrics for t in trials)
