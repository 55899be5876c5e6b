"""MLflow records of a pipeline run (real sqlite store): parent/child runs, params, metrics, cache-hit children."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline import dag
from pipeline.config import load_config
from pipeline.testing import FAKE_STAGES
from pipeline.tracking import _param_value, flatten

NODES = {"prepare_data", "pretrain", "train_teacher", "distill", "train_nar", "evaluate_ar", "evaluate_narvl",
       "benchmark"}


def test_node_log_reaches_the_driver_through_ray(ray_session, tmp_path):
    import ray

    from pipeline.executor import LogSink, NodeLog

    sink = ray.remote(num_cpus=0)(LogSink).remote()

    @ray.remote(num_cpus=0)
    def stage(sink) -> None:  # a stage on some worker: only the sink handle connects it to the driver
        log = NodeLog("caption/train_nar", sink, folder=None)
        log.info("hello")
        log.metrics({"loss": 0.5, "bad": float("nan")}, step=3)
        log.progress(3, 10)
        log.close()

    ray.get(stage.remote(sink))
    events = ray.get(sink.drain.remote())
    kinds = [(node, kind) for node, kind, _ in events]
    assert ("caption/train_nar", "info") in kinds and ("caption/train_nar", "progress") in kinds
    metrics = [p for _, kind, p in events if kind == "metrics"]
    assert [(m["step"], m["values"]) for m in metrics] == [(3, {"loss": 0.5})]  # non-finite values dropped
    assert ray.get(sink.drain.remote()) == []
    log = NodeLog("x", None, folder=tmp_path)  # without a driver: the text log only
    log.info("alone")
    log.close()
    assert "alone" in (tmp_path / "stage.log").read_text()


def test_flatten_and_param_limits():
    assert flatten({"a": {"b": 1, "c": [1, 2]}, "d": {}}) == {"a.b": 1, "a.c": [1, 2], "d": {}}
    assert len(_param_value("x" * 1000)) == 500
    assert _param_value([1, 2]) == "[1, 2]"


@pytest.fixture(scope="module")
def tracked(ray_session, tmp_path_factory):
    """Run the caption DAG twice (second: all cache hits); return (root, client, first, second results)."""
    from mlflow.tracking import MlflowClient

    root = tmp_path_factory.mktemp("tracked")
    cfg = load_config(profile="smoke", overrides=["tasks=[caption]", "train_teacher.max_steps=5",
                                                  "train_nar.max_steps=12", "name=narvl-test"])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dag, "STAGES", FAKE_STAGES)
        first = dag.run_pipeline(cfg, root, poll_s=0.1)
        second = dag.run_pipeline(cfg, root, poll_s=0.1)
    assert first.ok and second.ok
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    return root, client, first, second


def children(client, parent_id: str):
    exp = client.get_run(parent_id).info.experiment_id
    return client.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")


def test_experiment_and_parent_runs(tracked):
    root, client, first, second = tracked
    exp = client.get_experiment_by_name("narvl-test")
    assert exp.artifact_location == (Path(root).resolve() / "mlartifacts").as_uri()
    parents = client.search_runs([exp.experiment_id], filter_string="tags.narvl_role = 'pipeline'")
    assert {p.info.run_id for p in parents} == {first.parent_run_id, second.parent_run_id}
    p = client.get_run(first.parent_run_id)
    assert p.info.status == "FINISHED"
    assert p.data.tags["profile"] == "smoke" and p.data.tags["name"] == "narvl-test"
    assert {"git_sha", "git_dirty"} <= set(p.data.tags)
    assert p.data.params["train_nar.max_steps"] == "12" and p.data.params["data.image_size"] == "32"
    assert p.data.metrics["caption.speedup"] == pytest.approx(10.0)
    assert p.data.metrics["caption.ar.value"] == 80.0 and p.data.metrics["caption.narvl.latency_ms"] == 5.0
    arts = {a.path for a in client.list_artifacts(first.parent_run_id, "report")}
    assert {"report/summary.json", "report/report.md", "report/metric_vs_latency.png"} <= arts


def test_one_child_per_executed_stage(tracked):
    _, client, first, _ = tracked
    kids = children(client, first.parent_run_id)
    by_node = {k.data.tags["node"]: k for k in kids}
    assert len(kids) == len(NODES) and set(by_node) == NODES
    for node, run in by_node.items():
        assert run.info.status == "FINISHED"
        tags = run.data.tags
        task = "shared" if node == "pretrain" else "caption"  # one pretraining serves every task
        assert tags["cache_hit"] == "false" and tags["task"] == task and tags["profile"] == "smoke"
        assert tags["cache_key"] == first.statuses[f"{task}/{node}"].key
        assert run.info.run_id == first.statuses[f"{task}/{node}"].run_id
    nar = by_node["train_nar"]
    assert nar.data.params["train.max_steps"] == "12" and nar.data.params["model.num_queries"] == "24"
    assert nar.data.tags["stage"] == "train_nar"
    history = client.get_metric_history(nar.info.run_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(12))
    ev = by_node["evaluate_narvl"]
    assert ev.data.metrics["CIDEr"] == 75.0
    assert {"config.yaml", "manifest.json", "metrics.json", "stage.log"} <= {
        a.path for a in client.list_artifacts(ev.info.run_id)}
    bench = by_node["benchmark"]
    assert bench.data.metrics["latency.ar_beam.mean_ms"] == 50.0 and bench.data.metrics["speedup_vs_beam"] == 10.0
    assert "latency.json" in {a.path for a in client.list_artifacts(bench.info.run_id)}


def test_cache_hits_are_children_pointing_at_producer(tracked):
    _, client, first, second = tracked
    kids = children(client, second.parent_run_id)
    assert len(kids) == len(NODES)
    producers = {k.data.tags["node"]: k.info.run_id for k in children(client, first.parent_run_id)}
    for k in kids:
        assert k.data.tags["cache_hit"] == "true" and k.info.status == "FINISHED"
        assert k.data.tags["produced_by_run"] == producers[k.data.tags["node"]]
    assert client.get_run(second.parent_run_id).data.metrics["caption.speedup"] == pytest.approx(10.0)
