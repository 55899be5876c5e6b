"""The pipeline DAG over the stages, planned against the stage cache and executed as plain Ray tasks.

Per task: prepare_data [-> shared/pretrain, one for all tasks] -> train_teacher -> distill -> train_nar;
evaluate_ar (model = train_teacher), evaluate_narvl (model = train_nar); benchmark (ar = train_teacher,
narvl = train_nar). Ablations from `cfg.ablations` add `train_nar[<a>]` + `evaluate_narvl[<a>]` that reuse
the cached prefix. The report is built by the driver at the end over all tasks.

Execution: the driver submits a node as a `ray.remote` task as soon as all its upstream nodes are cache hits or
have succeeded (at most `resources.max_concurrent_tasks` at a time), so independent nodes run concurrently and
the driver always knows each node's status. Training nodes ask Ray for no CPU for their driver task, because the
Ray Train workers they start take the CPUs; other nodes ask `resources.cpus_per_task` / `gpus_per_task`.

out_dir and resume: a training node runs with out_dir = `<root>/<task>/.work-<name>-<key12>/`, a folder that
depends only on the key and survives a crash, so the stage finds the checkpoints of the failed attempt there and
resumes from the last one. Other nodes run in a private `.tmp-...-<id>/` folder. On success the manifest is
written last and the folder renamed to `<name>-<key12>/` (see pipeline/cache.py).
"""

from __future__ import annotations

import importlib
import json
import signal
import threading
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.cache import (
    CONFIG_FILE,
    clean_stale,
    final_dir,
    git_info,
    is_hit,
    node_key,
    publish,
    read_manifest,
    tmp_dir,
    work_dir,
    write_manifest,
)
from pipeline.config import ABLATIONS, ConfigError, PipelineConfig, backbone_config, config_to_yaml
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
TRAINING_STAGES = frozenset({"train_teacher", "train_nar"})
DONE_STATES = ("hit", "succeeded")
# Nodes that serve every task live under this pseudo-task (folder <root>/shared/).
SHARED = "shared"
SHARED_PRETRAIN = f"{SHARED}/pretrain"


class PipelineError(RuntimeError):
    """A pipeline that cannot run as asked (e.g. --only with an input that is not cached); the message says why."""


def load_stage(ref: str) -> Any:
    """Import a stage: "pkg.module" or "pkg.module:attr"; the result has VERSION and run."""
    module, _, attr = ref.partition(":")
    try:
        obj = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and module.startswith(e.name):
            raise PipelineError(f"stage module {module} is not there yet ({e})") from e
        raise
    return getattr(obj, attr) if attr else obj


@dataclass
class Node:
    """One stage execution for one task."""

    task: str
    name: str  # e.g. train_nar, evaluate_narvl[ce]
    stage: str  # e.g. train_nar, evaluate
    cfg: Strict
    inputs: dict[str, str]  # input name (as the stage sees it) -> upstream node: a name in the same task or a
    # node id of another (`shared/pretrain`)
    ablation: str | None = None
    key: str = ""
    # False where the node's config alone determines its output, whichever task's inputs it reads: then the
    # input keys stay out of its key (the shared pretrain: same images and objects in every task's shards)
    keyed_inputs: bool = True

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
    return TrainNARStage(task=task, seed=cfg.seed, model=model, train=train, on_bad_sample=cfg.data.on_bad_sample)


def build_graph(cfg: PipelineConfig, versions: dict[str, int] | None = None) -> Graph:
    """All nodes of all tasks with their stage configs and cache keys (imports the stage modules for VERSION)."""
    versions = dict(versions or {})
    nodes: dict[str, Node] = {}

    def add(node: Node) -> None:
        if node.stage not in versions:
            versions[node.stage] = int(load_stage(STAGES[node.stage]).VERSION)
        input_keys = ({name: nodes[node.upstream_id(up)].key for name, up in node.inputs.items()}
                      if node.keyed_inputs else {})
        node.key = node_key(node.stage, versions[node.stage], node.cfg, input_keys)
        nodes[node.id] = node

    for task in cfg.tasks:
        teacher = TrainStage(task=task, seed=cfg.seed, model=cfg.model.build(task), train=cfg.train_teacher,
                             on_bad_sample=cfg.data.on_bad_sample)
        add(Node(task, "prepare_data", "prepare_data", PrepareDataStage(task=task, data=cfg.data), {}))
        teacher_inputs = {"prepare_data": "prepare_data"}
        if cfg.pretrain.enabled:
            if SHARED_PRETRAIN not in nodes:  # one backbone pretraining for all tasks, on the first task's images
                add(Node(SHARED, "pretrain", "pretrain",
                         PretrainStage(seed=cfg.seed, data=cfg.data, model=backbone_config(cfg.model.build()),
                                       pretrain=cfg.pretrain),
                         {"prepare_data": f"{task}/prepare_data"}, keyed_inputs=False))
            teacher_inputs["pretrain"] = SHARED_PRETRAIN
        add(Node(task, "train_teacher", "train_teacher", teacher, teacher_inputs))
        add(Node(task, "distill", "distill", DistillStage(task=task, distill=cfg.distill),
                 {"prepare_data": "prepare_data", "train_teacher": "train_teacher"}))
        variants: list[tuple[str | None, NARTrainConfig]] = [(None, cfg.train_nar)]
        variants += [(a, cfg.train_nar.model_copy(update=ABLATIONS[a])) for a in cfg.task_ablations(task)]
        for ablation, train in variants:
            suffix = f"[{ablation}]" if ablation else ""
            inputs = {"prepare_data": "prepare_data", "train_teacher": "train_teacher"}
            if train.kd:
                inputs["distill"] = "distill"
            add(Node(task, f"train_nar{suffix}", "train_nar", _nar_stage(cfg, task, train), inputs, ablation))
            if ablation is None:
                add(Node(task, "evaluate_ar", "evaluate", EvaluateStage(task=task, kind="ar", eval=cfg.evaluate),
                         {"prepare_data": "prepare_data", "model": "train_teacher"}))
            add(Node(task, f"evaluate_narvl{suffix}", "evaluate",
                     EvaluateStage(task=task, kind="narvl", eval=cfg.evaluate),
                     {"prepare_data": "prepare_data", "model": f"train_nar{suffix}"}, ablation))
        add(Node(task, "benchmark", "benchmark", BenchmarkStage(task=task, benchmark=cfg.benchmark),
                 {"prepare_data": "prepare_data", "ar": "train_teacher", "narvl": "train_nar"}))
    return Graph(nodes)


def make_plan(graph: Graph, root: Path, force: Iterable[str] = (), only: str | None = None) -> dict[str, str]:
    """node id -> "hit" (cached), "run", or "skip" (not selected by --only and not cached).

    `force`: those stages and all their descendants run even when cached. `only`: only that stage runs (if not
    cached or forced); its inputs must be cached, else PipelineError naming the missing input.
    """
    forced = graph.descendants(set().union(*(graph.select(s) for s in force)) if force else set())
    selected = graph.select(only) if only else set(graph.nodes)
    cached = {i: is_hit(final_dir(root, n.task, n.name, n.key), n.key) for i, n in graph.nodes.items()}
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


# ---- the Ray task -----------------------------------------------------------------------------------------
@dataclass
class NodeSpec:
    """Everything the Ray task needs to run one node (picklable)."""

    task: str
    name: str
    stage: str
    stage_ref: str
    version: int
    key: str
    cfg: Strict
    inputs: dict[str, Path]
    input_keys: dict[str, str]
    scratch: Path
    final: Path
    resumable: bool
    run_id: str | None
    git: dict[str, Any]


def node_spec(node: Node, inputs: dict[str, tuple[Path, str]], root: Path, run_id: str | None,
              git: dict[str, Any]) -> NodeSpec:
    """The spec of one node: `inputs` maps each input name to (finished upstream folder, its key)."""
    resumable = node.stage in TRAINING_STAGES
    scratch = (work_dir if resumable else tmp_dir)(root, node.task, node.name, node.key)
    return NodeSpec(
        task=node.task, name=node.name, stage=node.stage, stage_ref=STAGES[node.stage],
        version=int(load_stage(STAGES[node.stage]).VERSION), key=node.key, cfg=node.cfg,
        inputs={name: Path(d) for name, (d, _) in inputs.items()},
        input_keys={name: k for name, (_, k) in inputs.items()},
        scratch=scratch, final=final_dir(root, node.task, node.name, node.key), resumable=resumable,
        run_id=run_id, git=git)


def execute_node(spec: NodeSpec) -> dict[str, Any]:
    """Run one stage in its scratch dir, write the manifest last, rename into place on success (in a Ray task)."""
    from pipeline.tracking import FileStageLog

    scratch = Path(spec.scratch)
    resumed = scratch.exists()
    scratch.mkdir(parents=True, exist_ok=True)
    (scratch / "manifest.json").unlink(missing_ok=True)  # a failed attempt's manifest
    (scratch / CONFIG_FILE).write_text(config_to_yaml(spec.cfg))
    log = FileStageLog(scratch)
    started = time.time()
    error, outputs, status = None, {}, "failed"
    try:
        inputs = {k: str(v) for k, v in spec.inputs.items()}
        log.info(f"{spec.task}/{spec.name} key={spec.key[:12]} inputs={inputs}"
                 + (" (resuming in the work dir of an earlier attempt)" if resumed and spec.resumable else ""))
        stage = load_stage(spec.stage_ref)
        if int(stage.VERSION) != spec.version:
            raise RuntimeError(f"{spec.stage}.VERSION is {stage.VERSION}, planned with {spec.version}")
        outputs = stage.run(spec.cfg, dict(spec.inputs), scratch, log) or {}
        outputs = json.loads(json.dumps(outputs, default=str))
        status = "succeeded"
    except Exception:
        error = traceback.format_exc()
        log.info("FAILED\n" + error)
    finally:
        log.close()
    finished = time.time()
    manifest = {
        "status": status, "key": spec.key, "stage": spec.stage, "node": spec.name, "task": spec.task,
        "version": spec.version, "inputs": spec.input_keys, "git": spec.git,
        "started": _iso(started), "finished": _iso(finished), "duration_s": round(finished - started, 3),
        "mlflow_run_id": spec.run_id, "outputs": outputs, "error": error,
    }
    write_manifest(scratch, manifest)
    folder = scratch
    if status == "succeeded":
        publish(scratch, spec.final)
        folder = Path(spec.final)
    return {"status": status, "dir": str(folder), "manifest": manifest, "error": error}


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"


# ---- the driver -------------------------------------------------------------------------------------------
@dataclass
class NodeStatus:
    id: str
    task: str
    name: str
    stage: str
    key: str
    action: str  # hit | run | skip
    state: str  # hit | pending | running | succeeded | failed | upstream_failed | not_run
    dir: Path | None = None
    started: float | None = None
    finished: float | None = None
    step: int | None = None
    total: int | None = None
    error: str | None = None
    run_id: str | None = None

    @property
    def elapsed(self) -> float | None:
        if self.started is None:
            return None
        return (self.finished or time.time()) - self.started


@dataclass
class PipelineResult:
    statuses: dict[str, NodeStatus]
    parent_run_id: str | None
    report_dir: Path | None
    summary: dict | None
    ok: bool
    failures: list[NodeStatus] = field(default_factory=list)


def run_pipeline(cfg: PipelineConfig, root: Path, *, address: str | None = None, tracking_uri: str | None = None,
                 force: Iterable[str] = (), only: str | None = None,
                 on_update: Callable[[list[NodeStatus]], None] | None = None,
                 poll_s: float = 0.5, command: str = "") -> PipelineResult:
    """Plan, run every node that is not cached, write the report; track it all in MLflow."""
    import ray

    from pipeline.ray_utils import init_local_ray
    from pipeline.report import write_report
    from pipeline.tracking import Tracker, read_progress

    root = Path(root).resolve()
    graph = build_graph(cfg)
    plan = make_plan(graph, root, force, only)  # errors before anything starts
    started_ray = not ray.is_initialized()
    init_local_ray(address)
    previous_sigterm = _interrupt_on_sigterm()  # after ray.init, which installs its own handler
    git = git_info()
    tracker = Tracker(root, tracking_uri, cfg.name)
    common_tags = {"profile": cfg.profile, "name": cfg.name}
    stamp = time.strftime("%Y%m%d-%H%M%S")
    parent = tracker.start_parent(cfg.model_dump(mode="json"), {
        **common_tags, "git_sha": str(git["sha"]), "git_dirty": str(git["dirty"]), "root": str(root),
        "command": command[:4000], "mlflow.runName": f"{cfg.profile}-{stamp}",
        "force": ",".join(force), "only": only or ""})
    statuses = {i: NodeStatus(i, n.task, n.name, n.stage, n.key, plan[i],
                              {"hit": "hit", "run": "pending", "skip": "not_run"}[plan[i]])
                for i, n in graph.nodes.items()}
    remote = ray.remote(execute_node)
    running: dict[Any, str] = {}
    status = "FAILED"
    try:
        for i, st in statuses.items():
            if st.state == "hit":
                node = graph.nodes[i]
                st.dir = final_dir(root, node.task, node.name, node.key)
                st.run_id = tracker.log_hit(i, _child_tags(node, common_tags), node.cfg.model_dump(mode="json"),
                                            read_manifest(st.dir) or {}, st.dir)
        pending = [i for i, st in statuses.items() if st.state == "pending"]
        limit = cfg.resources.max_concurrent_tasks
        while pending or running:
            before = (len(pending), len(running))
            for i in list(pending):
                ups = [statuses[u] for u in graph.nodes[i].upstream_ids()]
                if any(u.state in ("failed", "upstream_failed", "not_run") for u in ups):
                    statuses[i].state = "upstream_failed"
                    pending.remove(i)
                elif len(running) < limit and all(u.state in DONE_STATES for u in ups):
                    ref = _submit(remote, graph.nodes[i], statuses, root, cfg, tracker, git, common_tags)
                    running[ref] = i
                    pending.remove(i)
            if not running:
                if pending and (len(pending), len(running)) == before:
                    raise PipelineError(f"cannot schedule {pending}: their inputs never became ready")
                continue
            done, _ = ray.wait(list(running), num_returns=1, timeout=poll_s)
            for ref in done:
                i = running.pop(ref)
                _finish(ref, graph.nodes[i], statuses[i], tracker)
            for i in running.values():
                _poll_progress(statuses[i], graph.nodes[i], read_progress)
            if on_update:
                on_update(list(statuses.values()))
        failures = [s for s in statuses.values() if s.state in ("failed", "upstream_failed")]
        report_dir, summary = write_report(cfg, graph, statuses, root, parent, git, stamp)
        if on_update:
            on_update(list(statuses.values()))
        status = "FINISHED" if not failures else "FAILED"
        metrics = _summary_metrics(summary)
        tags = {f"metric_name.{t}": r["ar"]["metric"] for t, r in summary["tasks"].items() if r.get("ar")}
        tracker.finish_parent(status, metrics, report_dir, tags)
        return PipelineResult(statuses, parent, report_dir, summary, not failures, failures)
    except BaseException:
        for ref in running:
            ray.cancel(ref, force=True)
        for i in running.values():
            if statuses[i].run_id:
                tracker.client.set_terminated(statuses[i].run_id, status="KILLED")
        tracker.finish_parent("KILLED" if status == "FAILED" else status)
        raise
    finally:
        if previous_sigterm is not None:
            signal.signal(signal.SIGTERM, previous_sigterm)
        if started_ray:
            ray.shutdown()


def _interrupt_on_sigterm() -> Any:
    """Make SIGTERM (a scheduler stopping the job) end the run like Ctrl-C; return the previous handler."""

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, handler)


def _poll_progress(st: NodeStatus, node: Node, read_progress: Callable[[Path], dict | None]) -> None:
    """The step of a running node: its log.progress, or for training the last line of curves.jsonl (rank 0)."""
    if st.dir is None:
        return
    prog = read_progress(st.dir)
    if prog:
        st.step, st.total = prog.get("step"), prog.get("total")
    elif node.stage in TRAINING_STAGES and (st.dir / "curves.jsonl").exists():
        try:
            with open(st.dir / "curves.jsonl", "rb") as f:
                f.seek(max(0, f.seek(0, 2) - 4096))
                last = f.read().decode(errors="replace").strip().splitlines()[-1]
            st.step, st.total = int(json.loads(last)["step"]), node.cfg.train.max_steps
        except (OSError, IndexError, KeyError, ValueError, TypeError):
            pass


def _child_tags(node: Node, common: dict[str, str]) -> dict[str, str]:
    return {**common, "task": node.task, "stage": node.stage, "node": node.name, "cache_key": node.key,
            "ablation": node.ablation or "", "cache_hit": "false"}


def _submit(remote: Any, node: Node, statuses: dict[str, NodeStatus], root: Path, cfg: PipelineConfig,
            tracker: Any, git: dict, common_tags: dict[str, str]) -> Any:
    st = statuses[node.id]
    clean_stale(root, node.task, node.name, node.key)
    st.run_id = tracker.start_child(node.id, _child_tags(node, common_tags))
    ups = {name: statuses[node.upstream_id(up)] for name, up in node.inputs.items()}
    spec = node_spec(node, {name: (Path(u.dir), u.key) for name, u in ups.items()}, root, st.run_id, git)
    res = cfg.resources
    options = {"num_cpus": 0 if spec.resumable else res.cpus_per_task,
               "num_gpus": 0 if spec.resumable else res.gpus_per_task,
               "max_retries": 0, "name": node.id}
    st.state, st.dir, st.started = "running", spec.scratch, time.time()
    return remote.options(**options).remote(spec)


def _finish(ref: Any, node: Node, st: NodeStatus, tracker: Any) -> None:
    import ray

    try:
        res = ray.get(ref)
    except Exception as e:  # the worker died or Ray failed the task: the stage's own errors come back in res
        res = {"status": "failed", "dir": str(st.dir), "error": f"{type(e).__name__}: {e}"}
    st.finished = time.time()
    st.state, st.dir, st.error = res["status"], Path(res["dir"]), res.get("error")
    if st.state == "succeeded" and st.total:
        st.step = st.total
    tracker.finish_child(st.run_id, st.dir, node.cfg.model_dump(mode="json"),
                         "FINISHED" if st.state == "succeeded" else "FAILED")


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
