"""The pipeline DAG over the stages, planned against the stage cache; `run_pipeline` hands it to the executor.

Per task: prepare_data [-> shared/pretrain, one for all tasks] -> train_teacher (or shared/train_teacher, one
multi-task teacher for all tasks: train_teacher.shared) -> distill -> train_nar;
evaluate_ar (model = train_teacher), evaluate_narvl (model = train_nar); benchmark (ar = train_teacher,
narvl = train_nar). Ablations from `cfg.ablations` add `train_nar[<a>]` + `evaluate_narvl[<a>]` that reuse
the cached prefix. The report is built by the driver at the end over all tasks.

A node's `inputs` map the fields of its stage's `Inputs` dataclass (`data`, `teacher`, `model`, ...) to upstream
nodes. Planning reads only manifests on the artifact root: `narvl plan` and a run where everything is cached start
no Ray at all. Execution (pipeline/executor.py) submits each node as soon as its inputs are done.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.cache import final_rel, git_info, is_hit, node_key
from pipeline.config import ABLATIONS, ConfigError, PipelineConfig, backbone_config
from pipeline.executor import NodeStatus, PipelineError, load_stage
from pipeline.storage import Storage
from stages.config import (
    BenchmarkStage,
    DistillStage,
    EvaluateStage,
    NARTrainConfig,
    PrepareDataStage,
    PretrainStage,
    Strict,
    TrainNARStage,
    TrainStage,
)

# stage name -> module (or "module:attribute" for an object with VERSION and run, as in pipeline/testing.py)
STAGES: dict[str, str] = {
    "prepare_data": "stages.prepare_data",
    "pretrain": "stages.pretrain",
    "train_teacher": "stages.train_teacher",
    "distill": "stages.distill",
    "train_nar": "stages.train_nar",
    "evaluate": "stages.evaluate",
    "benchmark": "stages.benchmark",
}
# Nodes that serve every task live under this pseudo-task (folder <root>/shared/).
SHARED = "shared"
SHARED_PRETRAIN = f"{SHARED}/pretrain"
SHARED_TEACHER = f"{SHARED}/train_teacher"


@dataclass
class Node:
    """One stage execution for one task."""

    task: str
    name: str  # e.g. train_nar, evaluate_narvl[ce]
    stage: str  # e.g. train_nar, evaluate
    cfg: Strict
    inputs: dict[str, str]  # field of the stage's Inputs -> upstream node: a name in the same task or a node id
    # of another (`shared/pretrain`)
    ablation: str | None = None
    key: str = ""
    # False where the node's config alone determines its output, whichever task's inputs it reads: then the
    # input keys stay out of its key (the shared pretrain: same images and objects in every task's shards)
    keyed_inputs: bool = True
    stage_ref: str = ""  # the module (or "module:attribute") that runs it, from STAGES
    version: int = 0  # its stage's VERSION, part of the key

    @property
    def id(self) -> str:
        return f"{self.task}/{self.name}"

    def upstream_id(self, up: str) -> str:
        """An input reference: a node of the same task (`distill`) or of another (`shared/pretrain`)."""
        return up if "/" in up else f"{self.task}/{up}"

    def upstream_ids(self) -> list[str]:
        return [self.upstream_id(n) for n in self.inputs.values()]


@dataclass
class Graph:
    nodes: dict[str, Node]  # in topological order

    def descendants(self, ids: Iterable[str]) -> set[str]:
        out = set(ids)
        for node in self.nodes.values():  # topological order: one pass suffices
            if any(u in out for u in node.upstream_ids()):
                out.add(node.id)
        return out

    def select(self, selector: str) -> set[str]:
        """Nodes matching a stage (`evaluate`), a node name (`evaluate_ar`, `train_nar[ce]`) or a base name."""
        ids = {n.id for n in self.nodes.values() if selector in (n.stage, n.name, n.name.split("[")[0])}
        if not ids:
            names = sorted({n.stage for n in self.nodes.values()} | {n.name for n in self.nodes.values()})
            raise ConfigError(f"unknown stage {selector!r}; choose one of {', '.join(names)}")
        return ids


def _nar_stage(cfg: PipelineConfig, task: str, train: NARTrainConfig) -> TrainNARStage:
    model = cfg.model.build(task, num_queries=train.num_queries[task], decoder_input=train.decoder_input)
    train = train.model_copy(update={"kd": train.kd_for(task)})  # the stage sees its own task's KD setting
    return TrainNARStage(task=task, seed=cfg.seed, model=model, train=train, on_bad_sample=cfg.data.on_bad_sample)


def build_graph(cfg: PipelineConfig, versions: dict[str, int] | None = None) -> Graph:
    """All nodes of all tasks with their stage configs and cache keys (imports the stage modules for VERSION)."""
    versions = dict(versions or {})
    nodes: dict[str, Node] = {}

    def add(node: Node) -> None:
        node.stage_ref = STAGES[node.stage]
        if node.stage not in versions:
            versions[node.stage] = int(load_stage(node.stage_ref).VERSION)
        node.version = versions[node.stage]
        input_keys = ({name: nodes[node.upstream_id(up)].key for name, up in node.inputs.items()}
                      if node.keyed_inputs else {})
        node.key = node_key(node.stage, versions[node.stage], node.cfg, input_keys)
        nodes[node.id] = node

    shared_teacher = cfg.train_teacher.shared
    for task in cfg.tasks:
        add(Node(task, "prepare_data", "prepare_data", PrepareDataStage(task=task, data=cfg.data), {}))
        teacher_inputs = {"data": "prepare_data"}
        if cfg.pretrain.enabled:
            if SHARED_PRETRAIN not in nodes:  # one backbone pretraining for all tasks, on the first task's images
                add(Node(SHARED, "pretrain", "pretrain",
                         PretrainStage(seed=cfg.seed, data=cfg.data, model=backbone_config(cfg.model.build()),
                                       pretrain=cfg.pretrain),
                         {"data": f"{task}/prepare_data"}, keyed_inputs=False))
            teacher_inputs["pretrain"] = SHARED_PRETRAIN
        if not shared_teacher:
            teacher = TrainStage(task=task, seed=cfg.seed, model=cfg.model.build(task), train=cfg.train_teacher,
                                 on_bad_sample=cfg.data.on_bad_sample, init_from=cfg.init_from)
            add(Node(task, "train_teacher", "train_teacher", teacher, teacher_inputs))
        elif SHARED_TEACHER not in nodes:  # one multi-task teacher, on the first task's images (the same scenes
            # as every task's: the benchmark draws scene i of a split alike for all tasks)
            mix = {t: 1.0 / len(cfg.tasks) for t in cfg.tasks if t != task}
            teacher = TrainStage(task=task, seed=cfg.seed, model=cfg.model.build(),
                                 train=cfg.train_teacher.model_copy(update={"aux_tasks": mix}),
                                 on_bad_sample=cfg.data.on_bad_sample, init_from=cfg.init_from)
            add(Node(SHARED, "train_teacher", "train_teacher", teacher,
                     {k: (f"{task}/{v}" if "/" not in v else v) for k, v in teacher_inputs.items()}))
        teacher_node = SHARED_TEACHER if shared_teacher else "train_teacher"
        variants: list[tuple[str | None, NARTrainConfig]] = [(None, cfg.train_nar)]
        variants += [(a, cfg.train_nar.model_copy(update=ABLATIONS[a])) for a in cfg.task_ablations(task)]
        if any(train.kd_for(task) for _, train in variants):  # no distill node where no NARVL reads it
            add(Node(task, "distill", "distill", DistillStage(task=task, distill=cfg.distill),
                     {"data": "prepare_data", "teacher": teacher_node}))
        for ablation, train in variants:
            suffix = f"[{ablation}]" if ablation else ""
            inputs = {"data": "prepare_data", "teacher": teacher_node}
            if train.kd_for(task):
                inputs["distill"] = "distill"
            add(Node(task, f"train_nar{suffix}", "train_nar", _nar_stage(cfg, task, train), inputs, ablation))
            if ablation is None:
                add(Node(task, "evaluate_ar", "evaluate", EvaluateStage(task=task, kind="ar", eval=cfg.evaluate),
                         {"data": "prepare_data", "model": teacher_node}))
            add(Node(task, f"evaluate_narvl{suffix}", "evaluate",
                     EvaluateStage(task=task, kind="narvl", eval=cfg.evaluate),
                     {"data": "prepare_data", "model": f"train_nar{suffix}"}, ablation))
        add(Node(task, "benchmark", "benchmark", BenchmarkStage(task=task, benchmark=cfg.benchmark),
                 {"data": "prepare_data", "ar": teacher_node, "narvl": "train_nar"}))
    return Graph(nodes)


def make_plan(graph: Graph, storage: Storage, force: Iterable[str] = (), only: str | None = None) -> dict[str, str]:
    """node id -> "hit" (cached), "run", or "skip" (not selected by --only and not cached).

    `force`: those stages and all their descendants run even when cached. `only`: only that stage runs (if not
    cached or forced); its inputs must be cached, else PipelineError naming the missing input.
    """
    forced = graph.descendants(set().union(*(graph.select(s) for s in force)) if force else set())
    selected = graph.select(only) if only else set(graph.nodes)
    cached = {i: is_hit(storage, final_rel(n.task, n.name, n.key), n.key) for i, n in graph.nodes.items()}
    plan: dict[str, str] = {}
    for i in graph.nodes:
        if i in selected:
            plan[i] = "run" if (i in forced or not cached[i]) else "hit"
        else:
            plan[i] = "hit" if cached[i] else "skip"
    if only:
        for i in sorted(selected):
            if plan[i] != "run":
                continue
            node = graph.nodes[i]
            for name, up in node.inputs.items():
                if plan[node.upstream_id(up)] != "hit":
                    raise PipelineError(
                        f"--only {only}: {node.id} needs its input {name!r} ({node.upstream_id(up)}), which is not"
                        " cached;"
                        f" run the pipeline without --only first (`narvl plan` shows what is cached)")
    return plan


# ---- a pipeline run ---------------------------------------------------------------------------------------
@dataclass
class PipelineResult:
    statuses: dict[str, NodeStatus]
    parent_run_id: str | None
    report_dir: Path | None
    summary: dict | None
    ok: bool
    failures: list[NodeStatus] = field(default_factory=list)
    synced: dict | None = None  # what the start of the run did for earlier runs' tracking (tracking.sync_root)


def run_pipeline(cfg: PipelineConfig, root: str | Path, *, address: str | None = None,
                 tracking_uri: str | None = None, force: Iterable[str] = (), only: str | None = None,
                 on_update: Callable[[list[NodeStatus]], None] | None = None,
                 poll_s: float = 0.5, command: str = "", git: dict[str, Any] | None = None) -> PipelineResult:
    """Plan, run every node that is not cached, write the report; track it all in MLflow.

    `root`: a local folder, a shared-filesystem path or an object-store URI (s3://bucket/prefix). `git`: the code's
    sha and dirty flag when they were taken elsewhere (a submitted job's copy of the code has no .git).
    """
    from pipeline.executor import Executor
    from pipeline.report import write_report
    from pipeline.tracking import Tracker, sync_root

    storage = Storage(root)
    graph = build_graph(cfg)
    plan = make_plan(graph, storage, force, only)  # errors before anything starts
    storage.check_writable()
    git = git or git_info()
    tracker = Tracker(storage, tracking_uri, cfg.name)
    synced = sync_root(storage, tracker.uri)  # runs of drivers that died: KILLED; their kept events: delivered
    executor = Executor(storage, tracker, address=address, max_concurrent=cfg.resources.max_concurrent_tasks,
                        poll_s=poll_s, log_models=cfg.log_models)
    common_tags = {"profile": cfg.profile, "name": cfg.name}
    stamp = time.strftime("%Y%m%d-%H%M%S")
    statuses: dict[str, NodeStatus] = {}
    status = "FAILED"
    previous_handlers = _interrupt_on_signals()
    try:
        parent = tracker.start_parent(cfg.model_dump(mode="json"), {
            **common_tags, "git_sha": str(git["sha"]), "git_dirty": str(git["dirty"]), "root": storage.uri,
            "command": command[:4000], "mlflow.runName": f"{cfg.profile}-{stamp}",
            "force": ",".join(force), "only": only or ""}, stamp=stamp)
        forced = graph.descendants(set().union(*(graph.select(f) for f in force))) if force else set()
        executor.run(graph, plan, resources=cfg.resources, tags=common_tags, git=git, on_update=on_update,
                     statuses=statuses, forced=forced)
        failures = [s for s in statuses.values() if s.state in ("failed", "upstream_failed")]
        report_dir, summary = write_report(cfg, graph, statuses, executor, parent, git, stamp)
        if on_update:
            on_update(list(statuses.values()))
        status = "FINISHED" if not failures else "FAILED"
        metrics = _summary_metrics(summary)
        tags = {f"metric_name.{t}": r["ar"]["metric"] for t, r in summary["tasks"].items() if r.get("ar")}
        tracker.finish_parent(status, metrics, report_dir, tags)
        return PipelineResult(statuses, parent, report_dir, summary, not failures, failures, synced)
    except BaseException:
        tracker.finish_parent("KILLED" if status == "FAILED" else status)
        raise
    finally:
        executor.shutdown()
        for signum, previous in previous_handlers.items():
            signal.signal(signum, previous)


def _interrupt_on_signals() -> dict[int, Any]:
    """SIGINT (Ctrl-C) and SIGTERM (a scheduler stopping the job) end the run: the first raises KeyboardInterrupt
    where the driver is, and the ones that follow while it cancels its stages, marks its MLflow runs KILLED and
    shuts Ray down are ignored, so that cleanup completes (it takes seconds). Returns the previous handlers."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    interrupted: list[int] = []

    def handler(signum: int, frame: Any) -> None:
        if not interrupted:
            interrupted.append(signum)
            raise KeyboardInterrupt(f"signal {signum}")

    return {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}


def _summary_metrics(summary: dict) -> dict[str, float]:
    out: dict[str, float] = {}
    for task, row in summary.get("tasks", {}).items():
        for kind in ("ar", "narvl"):
            r = row.get(kind) or {}
            if isinstance(r.get("value"), int | float):
                out[f"{task}.{kind}.value"] = float(r["value"])
            if isinstance(r.get("latency_ms"), int | float):
                out[f"{task}.{kind}.latency_ms"] = float(r["latency_ms"])
        if isinstance(row.get("speedup"), int | float):
            out[f"{task}.speedup"] = float(row["speedup"])
    for task, rows in summary.get("ablations", {}).items():
        for name, r in rows.items():
            if isinstance(r.get("value"), int | float):
                out[f"{task}.ablation.{name}.value"] = float(r["value"])
    return out
