"""The DAG on real Ray with fake stages (pipeline/testing.py): caching, --force, --only, crash and resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pipeline import dag
from pipeline.cache import final_dir, work_dir
from pipeline.config import ConfigError, load_config
from pipeline.storage import Storage
from pipeline.testing import FAKE_STAGES, executions

ALL = {"prepare_data", "pretrain", "train_teacher", "distill", "train_nar", "evaluate_ar", "evaluate_narvl",
       "benchmark"}


def config(*overrides: str):
    return load_config(profile="smoke", overrides=["tasks=[caption]", "train_teacher.max_steps=10",
                                                   "train_nar.max_steps=40", *overrides])


def run(cfg, root: Path, **kw) -> tuple[dag.PipelineResult, set[str]]:
    """Run the pipeline; return the result and the node names executed by this run."""
    before = len(executions(root))
    result = dag.run_pipeline(cfg, root, poll_s=0.1, **kw)
    return result, {e["node"] for e in executions(root)[before:]}


@pytest.fixture(scope="module")
def fakes():
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dag, "STAGES", FAKE_STAGES)
        yield


@pytest.fixture(scope="module")
def base(fakes, ray_session, tmp_path_factory) -> Path:
    """A root where the whole caption DAG ran once."""
    root = tmp_path_factory.mktemp("base")
    result, ran = run(config(), root)
    assert result.ok, [(s.id, s.state, s.error) for s in result.statuses.values()]
    assert ran == ALL
    return root


@pytest.fixture
def root(base, tmp_path) -> Path:
    """A private copy of the base root."""
    shutil.copytree(base, tmp_path / "root")
    return tmp_path / "root"


def test_graph_shape_and_ablations(fakes):
    cfg = config("ablations=[ce,no_kd,encoder_input]", "tasks=[caption,vqa]")
    graph = dag.build_graph(cfg)
    names = {n.name for n in graph.nodes.values() if n.task == "vqa"}
    assert names == ALL - {"pretrain"} | {"train_nar[ce]", "evaluate_narvl[ce]", "train_nar[no_kd]",
                                         "evaluate_narvl[no_kd]",
                           "train_nar[encoder_input]", "evaluate_narvl[encoder_input]"}
    n = graph.nodes
    assert n["vqa/train_nar"].inputs == {"data": "prepare_data", "teacher": "train_teacher", "distill": "distill"}
    assert "distill" not in n["vqa/train_nar[no_kd]"].inputs
    assert n["vqa/train_nar[ce]"].cfg.train.loss == "ce"
    enc = n["vqa/train_nar[encoder_input]"].cfg
    assert enc.train.decoder_input == "encoder" and enc.model.decoder_input == "encoder"
    assert n["vqa/train_nar"].cfg.model.num_queries == cfg.train_nar.num_queries["vqa"]
    assert n["vqa/benchmark"].inputs == {"data": "prepare_data", "ar": "train_teacher", "narvl": "train_nar"}
    assert n["vqa/evaluate_narvl[ce]"].inputs["model"] == "train_nar[ce]"
    # the prefix is shared: same keys with or without ablations; tasks differ
    plain = dag.build_graph(config())
    assert plain.nodes["caption/train_nar"].key == n["caption/train_nar"].key
    assert n["caption/prepare_data"].key != n["vqa/prepare_data"].key
    assert len({x.key for x in n.values()}) == len(n)


def test_kd_per_task(fakes):
    """train_nar.kd per task (the paper: captioning and VQA only): no distill node where no NARVL reads it, and the
    distilled tasks' nodes keep the keys they had with kd=true."""
    per_task = dag.build_graph(config("tasks=[caption,vqa,grounding]", "train_nar.kd={caption: true, vqa: true}"))
    everywhere = dag.build_graph(config("tasks=[caption,vqa,grounding]", "train_nar.kd=true"))
    n = per_task.nodes
    assert {i for i in n if i.endswith("/distill")} == {"caption/distill", "vqa/distill"}
    assert n["grounding/train_nar"].inputs == {"data": "prepare_data", "teacher": "train_teacher"}
    assert n["grounding/train_nar"].cfg.train.kd is False and n["vqa/train_nar"].cfg.train.kd is True
    for i in ("caption/train_nar", "vqa/train_nar", "vqa/distill", "grounding/train_teacher"):
        assert n[i].key == everywhere.nodes[i].key, i
    assert n["grounding/train_nar"].key != everywhere.nodes["grounding/train_nar"].key
    # the no_kd ablation of a task without KD trains what its main variant trains: the same config and key
    ablated = dag.build_graph(config("tasks=[grounding]", "train_nar.kd={caption: true}", "ablations=[no_kd]"))
    assert ablated.nodes["grounding/train_nar[no_kd]"].key == ablated.nodes["grounding/train_nar"].key
    assert "grounding/distill" not in ablated.nodes


def test_wiring_matches_each_stage_contract():
    """Every node's inputs are exactly the fields of its (real) stage's Inputs dataclass; optional ones may be
    left out."""
    import dataclasses
    import importlib

    graph = dag.build_graph(config("ablations=[ce_no_kd,no_kd,encoder_input]", "tasks=[caption,vqa]",
                                   "pretrain.enabled=true"))
    for node in graph.nodes.values():
        fields = dataclasses.fields(importlib.import_module(f"stages.{node.stage}").Inputs)
        required = {f.name for f in fields if f.default is dataclasses.MISSING}
        assert required <= set(node.inputs) <= {f.name for f in fields}, node.id


def test_one_pretrain_serves_every_task(fakes):
    graph = dag.build_graph(config("tasks=[caption,vqa]"))
    pre = graph.nodes["shared/pretrain"]
    assert [n.id for n in graph.nodes.values() if n.stage == "pretrain"] == ["shared/pretrain"]
    assert pre.inputs == {"data": "caption/prepare_data"}
    for task in ("caption", "vqa"):
        assert graph.nodes[f"{task}/train_teacher"].inputs["pretrain"] == "shared/pretrain"
    # the same key whichever tasks run (a VQA-only sweep reuses the full run's backbone), but not for other images
    assert dag.build_graph(config("tasks=[vqa]")).nodes["shared/pretrain"].key == pre.key
    assert dag.build_graph(config("tasks=[vqa]")).nodes["vqa/train_teacher"].key == graph.nodes["vqa/train_teacher"].key
    assert dag.build_graph(config("data.seed=5")).nodes["shared/pretrain"].key != pre.key
    # the key follows the backbone, not the rest of the model
    assert dag.build_graph(config("model.overrides.d_model=96")).nodes["shared/pretrain"].key == pre.key
    assert dag.build_graph(config("model.overrides.backbone_width=12")).nodes["shared/pretrain"].key != pre.key


def test_one_shared_teacher_serves_every_task(fakes):
    """train_teacher.shared: one multi-task teacher node, trained on the first task's images with the other tasks
    drawn at equal shares; every task's distillation, NARVL, evaluation and benchmark read it."""
    cfg = config("tasks=[caption,vqa,grounding]", "train_teacher.shared=true", "model.task_overrides={}")
    graph = dag.build_graph(cfg)
    teachers = [n for n in graph.nodes.values() if n.stage == "train_teacher"]
    assert [t.id for t in teachers] == ["shared/train_teacher"]
    teacher = teachers[0]
    assert teacher.inputs["data"] == "caption/prepare_data" and teacher.cfg.task == "caption"
    assert teacher.cfg.train.aux_tasks == pytest.approx({"vqa": 1 / 3, "grounding": 1 / 3})
    for task in ("caption", "vqa", "grounding"):
        n = graph.nodes
        assert n[f"{task}/distill"].inputs["teacher"] == "shared/train_teacher"
        assert n[f"{task}/train_nar"].inputs["teacher"] == "shared/train_teacher"
        assert n[f"{task}/evaluate_ar"].inputs["model"] == "shared/train_teacher"
        assert n[f"{task}/benchmark"].inputs["ar"] == "shared/train_teacher"
        assert f"{task}/train_teacher" not in n
    # its key follows the tasks it learns
    other = dag.build_graph(config("tasks=[caption,vqa]", "train_teacher.shared=true", "model.task_overrides={}"))
    assert other.nodes["shared/train_teacher"].key != teacher.key
    for bad, needle in ((["train_teacher.aux_tasks.caption=0.2"], "aux_tasks"),
                        (["model.task_overrides.vqa.dropout=0.2"], "task_overrides")):
        with pytest.raises(ConfigError, match=needle):
            config("tasks=[caption,vqa]", "train_teacher.shared=true", "model.task_overrides={}", *bad)


def test_shared_teacher_pipeline_runs_every_task(fakes, ray_session, tmp_path):
    cfg = config("tasks=[caption,vqa]", "train_teacher.shared=true", "model.task_overrides={}")
    result, ran = run(cfg, tmp_path)
    assert result.ok, [(s.id, s.state, s.error) for s in result.statuses.values()]
    teacher_runs = [e for e in executions(tmp_path) if e["node"] == "train_teacher"]
    assert len(teacher_runs) == 1  # one teacher for both tasks
    summary = json.loads(next((tmp_path / "runs").glob("*/summary.json")).read_text())
    assert set(summary["tasks"]) == {"caption", "vqa"}
    assert all(summary["tasks"][t]["ar"]["value"] is not None for t in ("caption", "vqa"))


def test_per_task_ablations(fakes):
    cfg = config("ablations={caption: [ce_no_kd, no_kd], vqa: [no_kd]}", "tasks=[caption,vqa]")
    graph = dag.build_graph(cfg)
    extra = {(n.task, n.name) for n in graph.nodes.values() if n.ablation}
    assert extra == {("caption", "train_nar[ce_no_kd]"), ("caption", "evaluate_narvl[ce_no_kd]"),
                     ("caption", "train_nar[no_kd]"), ("caption", "evaluate_narvl[no_kd]"),
                     ("vqa", "train_nar[no_kd]"), ("vqa", "evaluate_narvl[no_kd]")}
    ce = graph.nodes["caption/train_nar[ce_no_kd]"]
    assert ce.cfg.train.loss == "ce" and not ce.cfg.train.kd and "distill" not in ce.inputs
    with pytest.raises(ConfigError, match="ablations"):
        config("ablations={caption: [beam]}")


def test_rerun_is_all_cache_hits(base):
    result, ran = run(config(), base)
    assert result.ok and ran == set()
    assert {s.state for s in result.statuses.values()} == {"hit"}


def test_changed_train_nar_field_reruns_exactly_descendants(root):
    result, ran = run(config("train_nar.lr=0.002"), root)
    assert result.ok and ran == {"train_nar", "evaluate_narvl", "benchmark"}
    states = {s.name: s.state for s in result.statuses.values()}
    assert {k for k, v in states.items() if v == "hit"} == ALL - ran
    # a field outside the key (log_every) changes nothing
    _, ran = run(config("train_nar.lr=0.002", "train_nar.log_every=3"), root)
    assert ran == set()


def test_force_reruns_stage_and_descendants(root):
    _, ran = run(config(), root, force=["distill"])
    assert ran == {"distill", "train_nar", "evaluate_narvl", "benchmark"}
    _, ran = run(config(), root, force=["evaluate"])
    assert ran == {"evaluate_ar", "evaluate_narvl"}


def test_only(root, tmp_path):
    # a changed NAR config with --only train_nar: only that node runs, its descendants wait
    result, ran = run(config("train_nar.lr=0.0031"), root, only="train_nar")
    assert ran == {"train_nar"}
    states = {s.name: s.state for s in result.statuses.values()}
    assert states["evaluate_narvl"] == "not_run" and states["train_nar"] == "succeeded"
    _, ran = run(config(), root, only="evaluate", force=["evaluate"])
    assert ran == {"evaluate_ar", "evaluate_narvl"}
    # inputs not cached: an error naming the input, before anything runs
    with pytest.raises(dag.PipelineError, match="'model'.*caption/train_nar.*not cached"):
        dag.make_plan(dag.build_graph(config("train_nar.lr=0.004")), Storage(root), only="evaluate")
    with pytest.raises(dag.PipelineError, match="not cached"):
        run(config(), tmp_path / "empty", only="benchmark")
    assert not (tmp_path / "empty").exists()


def test_plan_reports_hits_and_runs(root):
    graph = dag.build_graph(config("train_nar.lr=0.005"))
    plan = {graph.nodes[i].name: a for i, a in dag.make_plan(graph, Storage(root)).items()}
    assert {k for k, v in plan.items() if v == "run"} == {"train_nar", "evaluate_narvl", "benchmark"}
    plan = {graph.nodes[i].name: a for i, a in dag.make_plan(graph, Storage(root), force=["train_teacher"]).items()}
    assert {k for k, v in plan.items() if v == "hit"} == {"prepare_data", "pretrain"}


def test_half_written_folder_is_never_a_hit(fakes, ray_session, tmp_path):
    cfg = config()
    node = dag.build_graph(cfg).nodes["caption/prepare_data"]
    half = final_dir(tmp_path, "caption", node.name, node.key)
    half.mkdir(parents=True)
    (half / "junk.bin").write_bytes(b"partial")
    assert dag.make_plan(dag.build_graph(cfg), Storage(tmp_path))["caption/prepare_data"] == "run"
    result, ran = run(cfg, tmp_path)
    assert result.ok and "prepare_data" in ran
    assert (half / "manifest.json").exists() and not (half / "junk.bin").exists()
    assert not list((tmp_path / "caption").glob(".tmp-*"))


def test_crash_then_rerun_resumes_from_checkpoint(fakes, ray_session, tmp_path):
    cfg = config()
    (tmp_path).mkdir(exist_ok=True)
    (tmp_path / "crash-caption-train_nar").write_text("25")
    result, _ = run(cfg, tmp_path)
    states = {s.name: s.state for s in result.statuses.values()}
    assert not result.ok
    assert states["train_nar"] == "failed" and "simulated crash" in result.statuses["caption/train_nar"].error
    assert states["evaluate_narvl"] == states["benchmark"] == "upstream_failed"
    assert states["evaluate_ar"] == "succeeded"
    node = dag.build_graph(cfg).nodes["caption/train_nar"]
    work = work_dir(tmp_path, "caption", node.name, node.key)
    assert json.loads((work / "ckpt.json").read_text())["step"] == 25
    assert json.loads((work / "manifest.json").read_text())["status"] == "failed"
    assert not final_dir(tmp_path, "caption", node.name, node.key).exists()
    assert (tmp_path / "runs").is_dir()  # a report is written even for a failed run

    (tmp_path / "crash-caption-train_nar").unlink()
    result, ran = run(cfg, tmp_path)
    assert result.ok and ran == {"train_nar", "evaluate_narvl", "benchmark"}
    last_nar = [e for e in executions(tmp_path) if e["node"] == "train_nar"][-1]
    assert last_nar["resumed_from"] == 25
    manifest = json.loads((final_dir(tmp_path, "caption", node.name, node.key) / "manifest.json").read_text())
    assert manifest["status"] == "succeeded" and manifest["outputs"]["resumed_from"] == 25
    assert not work.exists()


def test_summary_contract(base):
    result, _ = run(config(), base)
    summary = json.loads((result.report_dir / "summary.json").read_text())
    assert set(summary) == {"profile", "tasks"} and summary["profile"] == "smoke"
    row = summary["tasks"]["caption"]
    assert set(row) == {"ar", "narvl", "speedup", "blind"}
    for kind, value, ms in (("ar", 80.0, 50.0), ("narvl", 75.0, 5.0)):
        assert set(row[kind]) == {"metric", "value", "latency_ms", "metrics", "gap"}
        assert row[kind]["metric"] == "CIDEr" and row[kind]["value"] == value and row[kind]["latency_ms"] == ms
        closed = pytest.approx((value / 2 - 20.0) / 80.0)
        assert row[kind]["gap"] == {"metric": "gap_metric", "score": value / 2, "blind": 20.0, "gap_closed": closed,
                                    "blind_predictor": "constant"}
    assert row["blind"] == {"metric": "gap_metric", "value": 20.0, "predictor": "constant"}
    assert row["speedup"] == pytest.approx(10.0)
    assert result.report_dir.parent == base / "runs" and result.report_dir.name.endswith(result.parent_run_id[:8])
    report = (result.report_dir / "report.md").read_text()
    assert report.count("| caption |") == 2  # Table 1 and the gap-closed table
    assert "| caption | gap_metric | 20.00 (constant) | 40.00 | 37.50 | 0.25 | 0.22 |" in report
    assert (result.report_dir / "metric_vs_latency.png").exists()
    assert (result.report_dir / "curves_caption.png").exists()


def test_manifest_and_stage_folder(base):
    node = dag.build_graph(config()).nodes["caption/train_nar"]
    d = final_dir(base, "caption", node.name, node.key)
    m = json.loads((d / "manifest.json").read_text())
    assert m["status"] == "succeeded" and m["key"] == node.key and m["stage"] == "train_nar" and m["version"] == 1
    assert set(m["inputs"]) == {"data", "teacher", "distill"}
    assert m["files"]["stage.log"] and set(m["files"]) >= {"config.yaml", "curves.parquet", "metrics.json"}
    assert {"sha", "dirty"} <= set(m["git"]) and m["mlflow_run_id"] and m["duration_s"] >= 0
    assert m["outputs"] == {"steps": 40, "resumed_from": 0}
    assert "max_steps: 40" in (d / "config.yaml").read_text()
    assert "trained 40 steps" in (d / "stage.log").read_text()


def test_two_drivers_on_one_root_run_each_stage_once(fakes, ray_session, tmp_path):
    """Two runs started together on one root: one owner per stage (leases); the other waits and reuses the result.
    Without leases both plan every stage "run" and both execute it (each stage here takes 0.5 s)."""
    import threading

    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "slow-s").write_text("0.5")
    cfg = config()
    results: dict[int, dag.PipelineResult] = {}

    def drive(n: int) -> None:
        results[n] = dag.run_pipeline(cfg, tmp_path, poll_s=0.1,
                                      tracking_uri=f"sqlite:///{tmp_path / f'mlflow{n}.db'}")

    threads = [threading.Thread(target=drive, args=(n,)) for n in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert set(results) == {1, 2} and results[1].ok and results[2].ok
    ran = [e["node"] for e in executions(tmp_path)]
    assert sorted(ran) == sorted(ALL), ran  # every stage exactly once, by one of the two
    assert results[1].summary == results[2].summary
    # each stage: succeeded in one run, a cache hit in the other
    for i in results[1].statuses:
        assert {results[1].statuses[i].state, results[2].statuses[i].state} == {"succeeded", "hit"}, i
    assert not list(tmp_path.glob("*/.lease-*"))  # every lease released
