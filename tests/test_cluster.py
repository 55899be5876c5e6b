"""The pipeline on a real multi-node Ray with an object-store root, all on this machine:

- a head and two worker nodes (`ray.cluster_utils.Cluster`, separate raylets on 127.0.0.1), each worker with its own
  custom resource (`node_a`, `node_b`) so that stages can be pinned apart;
- an S3-compatible server (moto's threaded server on 127.0.0.1) as the artifact root, so no stage can succeed by
  reading another node's folder: each node keeps its scratch and its input cache in a folder of its own.

One task (vqa) of the smoke profile runs with the data, distillation and evaluation on node_a and the training and
benchmark on node_b; a rerun is all cache hits served from the bucket; `narvl submit` runs it as a Ray job; a root one
node cannot reach is refused naming the node; a training stage whose node is removed mid-run resumes from its
checkpoint in the bucket on the other node and ends with the losses of an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pipeline.config import load_config

pytestmark = pytest.mark.timeout(600)
BUCKET = "narvl-test"
PINNED = [  # the stages of one task alternate between the two worker nodes
    "resources.prepare_data={cpus: 1, custom: {node_a: 1}}",
    "resources.pretrain={cpus: 1, custom: {node_a: 1}}",
    "resources.train_teacher={cpus: 1, custom: {node_b: 1}}",
    "resources.distill={cpus: 1, custom: {node_a: 1}}",
    "resources.train_nar={cpus: 1, custom: {node_b: 1}}",
    "resources.evaluate={cpus: 1, custom: {node_a: 1}}",
    "resources.benchmark={cpus: 1, custom: {node_b: 1}}",
]
SMALL = ["tasks=[vqa]", "data.train_per_task=120", "data.val_per_task=30", "data.test_per_task=30",
         "pretrain.steps=10", "train_teacher.max_steps=20", "train_nar.max_steps=20", "train_teacher.val_every=10",
         "train_nar.val_every=10", "evaluate.max_samples=30", "benchmark.num_samples=4"]


@pytest.fixture(scope="module")
def s3(s3_server):
    """The S3 server with the test's bucket; the driver's environment points at it."""
    import boto3

    boto3.client("s3").create_bucket(Bucket=BUCKET)
    return s3_server


@pytest.fixture(scope="module")
def cluster(s3, tmp_path_factory):
    """Head (with the job server) + node_a + node_b, separate processes on 127.0.0.1; the driver connected.

    The worker nodes do not see the driver's storage settings (their raylets start without them): the pipeline
    carries them through Ray's runtime environment.
    """
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()  # the session's single-node Ray, if a module before started it
    # workers and submitted jobs run this interpreter
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    no_storage = {k: "" for k in s3}  # raylets (and so their workers) start without the storage settings
    c = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "node_ip_address": "127.0.0.1", "include_dashboard": True, "dashboard_host": "127.0.0.1",
        "dashboard_port": _free_port(), "env_vars": no_storage, "resources": {"head": 1}})
    nodes = {name: c.add_node(num_cpus=1, node_ip_address="127.0.0.1", env_vars=no_storage,
                              resources={name: 1, "trainer": 1}) for name in ("node_a", "node_b")}
    c.wait_for_nodes()
    ray.init(address=c.address, log_to_driver=False)  # the driver joins; the pipeline finds Ray started
    yield c, nodes
    ray.shutdown()
    c.shutdown()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_ids(c) -> dict[str, str]:
    """Ray node id -> our name, by the custom resource each node holds."""
    import ray

    out = {}
    for n in ray.nodes():
        if n.get("Alive"):
            names = [k for k in n["Resources"] if k in ("node_a", "node_b", "node_c", "head")]
            out[n["NodeID"]] = names[0] if names else "?"
    return out


def _keys(prefix: str) -> list[str]:
    import boto3

    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return [o["Key"] for p in pages for o in p.get("Contents", [])]


@pytest.fixture(scope="module")
def first_run(cluster, tmp_path_factory):
    from pipeline.dag import run_pipeline

    c, _ = cluster
    tracking = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    cfg = load_config(profile="smoke", overrides=[*SMALL, *PINNED, "log_models=true"])
    started = time.time()
    result = run_pipeline(cfg, f"s3://{BUCKET}/runs1", address=c.address, tracking_uri=tracking, poll_s=0.2)
    return cfg, tracking, result, time.time() - started


def test_smoke_on_three_nodes_with_an_s3_root(first_run, cluster):
    from mlflow.tracking import MlflowClient

    cfg, tracking, result, wall = first_run
    assert result.ok, [(f.id, f.error) for f in result.failures]
    row = result.summary["tasks"]["vqa"]
    assert row["ar"]["value"] is not None and row["narvl"]["latency_ms"] > 0 and row["speedup"] > 0
    # every stage folder is in the bucket, manifest included; nothing was written to a local root
    keys = _keys("runs1/")
    names = _node_ids(cluster[0])
    for st in result.statuses.values():
        assert f"runs1/{st.rel}/manifest.json" in keys, st.id
        import boto3

        body = boto3.client("s3").get_object(Bucket=BUCKET, Key=f"runs1/{st.rel}/manifest.json")["Body"].read()
        manifest = json.loads(body)
        assert manifest["status"] == "succeeded" and set(manifest["files"]) >= {"config.yaml", "stage.log"}
        # pinned: the data side on node_a, the training side on node_b
        node_of = {n[:12]: name for n, name in names.items()}
        want = "node_b" if st.stage in ("train_teacher", "train_nar", "benchmark") else "node_a"
        assert node_of[manifest["executed_on"]] == want, (st.id, manifest["executed_on"])
    assert any(k.startswith("runs1/runs/") and k.endswith("summary.json") for k in keys)
    assert not any("/.work-" in k for k in keys)  # training work folders are removed once published
    # MLflow: the parent, one child per stage, a live training curve; written by the driver only
    client = MlflowClient(tracking_uri=tracking)
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["root"] == f"s3://{BUCKET}/runs1"
    kids = client.search_runs([parent.info.experiment_id],
                              filter_string=f"tags.mlflow.parentRunId = '{result.parent_run_id}'")
    assert len(kids) == len(result.statuses)
    teacher = next(k for k in kids if k.data.tags["node"] == "train_teacher")
    assert len(client.get_metric_history(teacher.info.run_id, "loss")) >= 2
    models = {m.source_run_id: m for m in client.search_logged_models([parent.info.experiment_id])}
    for k in kids:  # the trained models, packaged for `narvl serve runs:/<id>/model` (from the bucket)
        if k.data.tags["stage"] in ("train_teacher", "train_nar"):
            assert "model_logging_error" not in k.data.tags, k.data.tags.get("model_logging_error")
            assert str(models[k.info.run_id].status).endswith("READY") and models[k.info.run_id].name == "model"
    print(f"\nsmoke (vqa) on 3 nodes with an s3 root: {wall:.1f} s")


def test_rerun_is_all_hits_from_the_bucket(first_run, cluster, monkeypatch):
    from pipeline.dag import run_pipeline
    from pipeline.executor import Executor

    monkeypatch.setattr(Executor, "ensure_ray", lambda self: pytest.fail("an all-hit rerun started Ray work"))
    cfg, tracking, first, _ = first_run
    result = run_pipeline(cfg, f"s3://{BUCKET}/runs1", address=cluster[0].address, tracking_uri=tracking)
    assert result.ok and {s.state for s in result.statuses.values()} == {"hit"}
    assert result.summary == first.summary


def test_submit_runs_the_pipeline_as_a_job(first_run, cluster):
    from mlflow.tracking import MlflowClient

    from pipeline.cache import git_info
    from pipeline.submit import client as job_client
    from pipeline.submit import submit_run

    c, _ = cluster
    cfg, tracking, first, _ = first_run
    address = f"http://{c.webui_url}" if not c.webui_url.startswith("http") else c.webui_url
    args = ["--profile", "smoke", *(x for o in [*SMALL, *PINNED] for x in [o]), "--root", f"s3://{BUCKET}/runs1",
            "--tracking-uri", tracking]
    job_id = submit_run(address, args)
    jc = job_client(address)
    deadline = time.time() + 240
    while (status := jc.get_job_status(job_id).value) not in ("SUCCEEDED", "FAILED", "STOPPED"):
        assert time.time() < deadline, "job did not finish"
        time.sleep(1)
    assert status == "SUCCEEDED", jc.get_job_logs(job_id)[-3000:]
    mlflow = MlflowClient(tracking_uri=tracking)
    runs = mlflow.search_runs([mlflow.get_run(first.parent_run_id).info.experiment_id],
                              filter_string="tags.narvl_role = 'pipeline'", order_by=["attributes.start_time DESC"])
    assert runs[0].info.run_id != first.parent_run_id
    assert runs[0].data.tags["git_sha"] == str(git_info()["sha"])  # taken on the submitting side
    # the CLI around it: status of the finished job
    out = subprocess.run([sys.executable, "-m", "pipeline", "job", "status", job_id, "--address", address],
                         capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "SUCCEEDED", out.stderr


def test_a_root_one_node_cannot_reach_is_refused(first_run, cluster):
    from pipeline.dag import run_pipeline
    from pipeline.executor import ExecutionError

    c, _ = cluster
    cfg, tracking, _, _ = first_run
    # node_c has its own storage settings, and they point at a port where nothing listens
    bad = c.add_node(num_cpus=1, node_ip_address="127.0.0.1", resources={"node_c": 1},
                     env_vars={"AWS_ENDPOINT_URL": "http://127.0.0.1:9"})
    c.wait_for_nodes()
    node_c = next(n for n, name in _node_ids(c).items() if name == "node_c")
    try:
        with pytest.raises(ExecutionError, match=f"node {node_c[:12]}.*s3://{BUCKET}/runs2"):
            run_pipeline(cfg, f"s3://{BUCKET}/runs2", address=c.address, tracking_uri=tracking)
    finally:
        c.remove_node(bad)


def test_losing_the_training_node_resumes_on_the_other(first_run, cluster, tmp_path):
    """train_teacher (1 worker, needs `trainer`, which both nodes have) loses its node after its first checkpoint:
    Ray retries the task on the other node, which resumes from the checkpoint in the bucket."""
    from ray.util.state import list_tasks

    from pipeline.dag import build_graph, run_pipeline
    from pipeline.storage import NodeCache, Storage
    from stages import train_teacher
    from stages.common import PrintLog

    c, nodes = cluster
    cfg0, tracking, _, _ = first_run
    over = [*SMALL, *PINNED, "resources.train_teacher={cpus: 1, custom: {trainer: 1}}",
            "train_teacher.max_steps=30", "train_teacher.checkpoint_every=5", "train_teacher.max_failures=2",
            "train_teacher.lr=2.5e-3"]  # a new key: this training runs now
    cfg = load_config(profile="smoke", overrides=over)
    root = f"s3://{BUCKET}/runs1"
    outcome = {}
    def drive() -> None:
        try:
            outcome["result"] = run_pipeline(cfg, root, address=c.address, tracking_uri=tracking,
                                             only="train_teacher", poll_s=0.2)
        except BaseException as e:  # noqa: BLE001 - reported by the assertion below
            outcome["error"] = repr(e)

    thread = threading.Thread(target=drive)
    thread.start()
    node = build_graph(cfg).nodes["vqa/train_teacher"]
    work = f"runs1/vqa/.work-train_teacher-{node.key[:12]}/ckpt/"
    deadline = time.time() + 300
    while not any(k.endswith("train_state.json") for k in _keys(work)):
        assert time.time() < deadline and thread.is_alive(), "no checkpoint appeared"
        time.sleep(0.5)
    try:
        victim = None
        while victim is None:  # the state API can lag behind the task
            running = list_tasks(filters=[("name", "=", "vqa/train_teacher"), ("state", "=", "RUNNING")])
            if running:
                victim = _node_ids(c)[running[0].node_id]
            else:
                assert time.time() < deadline and thread.is_alive(), "the training task is not seen running"
                time.sleep(0.5)
        c.remove_node(nodes[victim])
    finally:
        thread.join(timeout=400)
    assert "result" in outcome, outcome
    result = outcome["result"]
    assert result.ok, [(f.id, f.error) for f in result.failures]
    metrics = json.loads(Storage(root).read_bytes(f"{result.statuses['vqa/train_teacher'].rel}/metrics.json"))
    assert metrics["resumed_from_step"] > 0 and metrics["steps"] == 30

    # the same training uninterrupted, in this process, on the same data: the same losses at every step
    fetched = {name: NodeCache(tmp_path / "cache").fetch(Storage(root), st.rel, st.key)
               for name, st in (("data", result.statuses["vqa/prepare_data"]),
                                ("pretrain", result.statuses["shared/pretrain"]))}
    ref = train_teacher.run(node.cfg, train_teacher.Inputs(**fetched), tmp_path / "ref", PrintLog())
    assert ref["steps"] == 30
    import pyarrow.parquet as pq

    got_dir = tmp_path / "got"
    Storage(root).download_file(f"{result.statuses['vqa/train_teacher'].rel}/curves.parquet", got_dir / "c.parquet")
    got = {r["step"]: r["loss"] for r in pq.read_table(got_dir / "c.parquet").to_pylist() if "loss" in r}
    want = {r["step"]: r["loss"] for r in pq.read_table(tmp_path / "ref" / "curves.parquet").to_pylist()
            if "loss" in r}
    assert sorted(got) == sorted(want)
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-4, abs=1e-5), step
    c.add_node(num_cpus=1, node_ip_address="127.0.0.1", resources={victim: 1, "trainer": 1},
               env_vars={k: "" for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID")})
    shutil.rmtree(tmp_path / "cache", ignore_errors=True)
