"""The executor: runs the planned nodes of a stage graph on Ray, each with the resources its stage asks for, against
the artifact root, and is the only process that writes to MLflow.

One executor serves `narvl run`, `narvl sweep` (a Tune trial sends its nodes here) and the study.

```
driver (Executor.run)                                  a Ray worker on any node (execute_node)
  submits a node when its inputs are done  ---------->   inputs: from the root (local) or the node cache (s3)
  drains the LogSink actor: progress, live curves  <--   StageLog -> stage.log + LogSink events
  logs each stage's child run to MLflow        <------   outputs published to the root, manifest.json last
```

How a node runs, by stage kind:
- plain stages: `stage.run(cfg, stage.Inputs(...), scratch, log)` in one Ray task with the stage's resources.
- training stages (`stage.job` exists): one worker runs the loop inside the node's own task (`stages.train.run_local`,
  no worker group to start); several workers run it in a Ray Train `TorchTrainer`, each worker asking for the
  stage's resources. Checkpoints go to the work store on the root, so a worker restarted on any node (Ray's task
  retries, Ray Train's FailureConfig, or a rerun) resumes from the last one.
- distill: `stage.decode_part` fanned out over `distill.num_actors` Ray tasks with the stage's resources, then
  `stage.run(..., parts=...)` combines them.

Scratch: on a local root a node works inside the root (`.tmp-*`, or `.work-*` for training) and publishes by a
rename; on an object-store root it works in a node-local temporary folder, keeps its training work store under
`<root>/<task>/.work-*` and publishes by uploading, manifest last. A folder without a manifest is never a hit.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import shutil
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline import cache
from pipeline.lease import Leases, lease_rel
from pipeline.storage import NodeCache, Storage, StorageError, adopt_carried_env, carried_env, sha256_file
from stages.config import StageResources, Strict

TRAINING_STAGES = frozenset({"train_teacher", "train_nar"})
PROGRESS_EVERY_S = 0.5
EVENT_BATCH = 200


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


class ExecutionError(RuntimeError):
    """The cluster cannot run a node as asked (resources, storage); the message names what was asked and what is."""


# ---- what a node receives ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class InputRef:
    """A finished upstream folder: where it is on the root and the key its manifest carries."""

    rel: str
    key: str


@dataclass
class NodeSpec:
    """Everything a Ray worker needs to run one node (picklable; the storage travels as its URI)."""

    id: str
    task: str
    name: str
    stage: str
    stage_ref: str
    version: int
    key: str
    cfg: Strict
    inputs: dict[str, InputRef]  # stage.Inputs field -> upstream folder
    storage: Storage
    resources: StageResources
    run_id: str | None = None
    git: dict[str, Any] = field(default_factory=dict)
    sink: Any = None  # LogSink actor handle (None: no live events)

    @property
    def final_rel(self) -> str:
        return cache.final_rel(self.task, self.name, self.key)

    @property
    def work_rel(self) -> str:
        return cache.work_rel(self.task, self.name, self.key)


# ---- logs and live metrics from any node ---------------------------------------------------------------------
class LogSink:
    """A Ray actor (no CPU) holding the events stages send until the driver drains them."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, Any]] = []

    def put(self, events: list[tuple[str, str, Any]]) -> None:
        self.events.extend(events)

    def drain(self) -> list[tuple[str, str, Any]]:
        out, self.events = self.events, []
        return out


class NodeLog:
    """The StageLog of a node: text to `stage.log` in its scratch folder (if any), events to the driver's LogSink.

    Events: ("info", text), ("metrics", {"step", "t", "values"}), ("progress", {"step", "total"}). Sending is
    fire-and-forget and batched, so a slow driver never slows a stage down.
    """

    def __init__(self, node_id: str, sink: Any, folder: Path | None = None) -> None:
        self.node_id, self.sink = node_id, sink
        self._text = open(Path(folder) / cache.LOG_FILE, "a", buffering=1) if folder else None  # noqa: SIM115
        self._pending: list[tuple[str, str, Any]] = []
        self._last_flush = self._last_progress = 0.0

    def _emit(self, kind: str, payload: Any, now: bool = False) -> None:
        if self.sink is None:
            return
        self._pending.append((self.node_id, kind, payload))
        if now or len(self._pending) >= EVENT_BATCH or time.time() - self._last_flush > PROGRESS_EVERY_S:
            self.flush()

    def flush(self, wait: bool = False) -> None:
        """Send what is pending; `wait`: until the sink holds it (at the end, so the driver's next drain has all)."""
        if self.sink is not None and self._pending:
            ref = self.sink.put.remote(self._pending)
            self._pending = []
            self._last_flush = time.time()
            if wait:
                import ray

                ray.get(ref)

    def info(self, msg: str) -> None:
        if self._text:
            self._text.write(f"{time.strftime('%H:%M:%S')} {msg}\n")
        self._emit("info", msg)

    def metrics(self, values: dict[str, float], step: int | None = None) -> None:
        clean = {k: float(v) for k, v in values.items() if _finite(v)}
        if self._text:
            self._text.write(f"{time.strftime('%H:%M:%S')} step {step}: "
                             + ", ".join(f"{k}={v:.4g}" for k, v in clean.items()) + "\n")
        self._emit("metrics", {"step": step, "t": time.time(), "values": clean}, now=True)

    def artifact(self, path: Path) -> None:
        self.info(f"artifact {Path(path).name}")

    def progress(self, step: int, total: int | None = None) -> None:
        now = time.time()
        if now - self._last_progress < PROGRESS_EVERY_S and step != total:
            return
        self._last_progress = now
        self._emit("progress", {"step": step, "total": total})

    def close(self) -> None:
        self.flush(wait=True)
        if self._text:
            self._text.close()
            self._text = None


def _finite(v: Any) -> bool:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return False
    return f == f and f not in (float("inf"), float("-inf"))


# ---- the work store of a training stage on an object-store root ---------------------------------------------
class StorageWorkStore:
    """stages.train.WorkStore on the artifact root (any node reads what another wrote)."""

    def __init__(self, storage: Storage, rel: str) -> None:
        from stages.train import CKPT_DIR, STATE_FILE

        self.storage, self.rel = storage, rel.rstrip("/")
        self.ckpt, self.state_file = f"{self.rel}/{CKPT_DIR}", STATE_FILE

    def _steps(self) -> list[int]:
        out = []
        for name in self.storage.list_dirs(self.ckpt):
            if name.startswith("step_") and self.storage.read_bytes(f"{self.ckpt}/{name}/{self.state_file}"):
                out.append(int(name.split("_")[1]))
        return sorted(out)

    def latest_checkpoint(self, dest: Path) -> int | None:
        steps = self._steps()
        if not steps:
            return None
        self.storage.download_dir(f"{self.ckpt}/step_{steps[-1]:08d}", Path(dest))
        return steps[-1]

    def save_checkpoint(self, step: int, src: Path, *, final_part: bool) -> None:
        rel = f"{self.ckpt}/step_{step:08d}"
        self.storage.upload_dir(Path(src), rel, skip=(self.state_file,))
        if final_part:
            self.storage.upload_file(Path(src) / self.state_file, f"{rel}/{self.state_file}")
            from stages.train import KEEP_CHECKPOINTS

            for old in self._steps()[:-KEEP_CHECKPOINTS]:
                self.storage.delete_dir(f"{self.ckpt}/step_{old:08d}")

    def put_dir(self, name: str, src: Path) -> None:
        self.storage.delete_dir(f"{self.rel}/{name}")
        self.storage.upload_dir(Path(src), f"{self.rel}/{name}")

    def put_json(self, name: str, data: Any) -> None:
        self.storage.write_json(f"{self.rel}/{name}", data)

    def get_json(self, name: str) -> Any | None:
        return self.storage.read_json(f"{self.rel}/{name}")


def work_store(storage: Storage, rel: str):
    """The WorkStore at `rel` on the root: a folder on a local root, objects on an object store."""
    from stages.train import LocalWorkStore

    return StorageWorkStore(storage, rel) if storage.remote else LocalWorkStore(storage.local(rel))


# ---- running one node (inside a Ray worker) -----------------------------------------------------------------
def resolve_inputs(spec: NodeSpec, stage: Any) -> Any:
    """The stage's typed inputs, each a local folder on this node (downloaded once per node from a remote root)."""
    paths = {}
    for name, ref in spec.inputs.items():
        if spec.storage.remote:
            paths[name] = NodeCache().fetch(spec.storage, ref.rel, ref.key)
        else:
            folder = spec.storage.local(ref.rel)
            manifest = cache.read_manifest(folder)
            if not manifest or manifest.get("key") != ref.key or manifest.get("status") != "succeeded":
                raise StorageError(f"{spec.id}: input {name} at {folder} is not the finished folder of key "
                                   f"{ref.key[:12]} (changed or removed since it was planned)")
            paths[name] = folder
    return stage.Inputs(**paths)


def scratch_dir(spec: NodeSpec, training: bool) -> Path:
    if spec.storage.remote:  # node-local; what must survive the node lives in the work store on the root
        return Path(tempfile.mkdtemp(prefix=f"narvl-{spec.name.replace('[', '.').replace(']', '')}-"))
    if training:
        return spec.storage.local(spec.work_rel)
    return cache.tmp_dir(spec.storage.local(), spec.task, spec.name, spec.key)


def execute_node(spec: NodeSpec) -> dict[str, Any]:
    """Run one stage in its scratch folder, then publish it with the manifest written last."""
    from pipeline.config import config_to_yaml
    adopt_carried_env()
    stage = load_stage(spec.stage_ref)
    training = spec.stage in TRAINING_STAGES
    scratch = scratch_dir(spec, training)
    resumed = scratch.exists() and any(scratch.iterdir()) if not spec.storage.remote else False
    scratch.mkdir(parents=True, exist_ok=True)
    (scratch / cache.MANIFEST).unlink(missing_ok=True)  # a failed attempt's manifest
    (scratch / cache.CONFIG_FILE).write_text(config_to_yaml(spec.cfg))
    log = NodeLog(spec.id, spec.sink, scratch)
    started = time.time()
    error, outputs, status = None, {}, "failed"
    try:
        log.info(f"{spec.id} key={spec.key[:12]} on node {_node_name()}"
                 + (" (resuming in the work folder of an earlier attempt)" if resumed else ""))
        if int(stage.VERSION) != spec.version:
            raise RuntimeError(f"{spec.stage}.VERSION is {stage.VERSION}, planned with {spec.version}")
        inputs = resolve_inputs(spec, stage)
        if training and hasattr(stage, "job"):
            outputs = run_training(spec, stage, inputs, scratch, log)
        elif hasattr(stage, "decode_part") and spec.cfg.distill.num_actors > 1:
            outputs = run_fanned_out(spec, stage, inputs, scratch, log)
        else:
            outputs = stage.run(spec.cfg, inputs, scratch, log)
        outputs = json.loads(json.dumps(outputs or {}, default=str))
        status = "succeeded"
    except Exception:
        error = traceback.format_exc()
        log.info("FAILED\n" + error)
    finally:
        log.close()
    finished = time.time()
    manifest = {
        "status": status, "key": spec.key, "stage": spec.stage, "node": spec.name, "task": spec.task,
        "version": spec.version, "inputs": {k: r.key for k, r in spec.inputs.items()}, "git": spec.git,
        "started": _iso(started), "finished": _iso(finished), "duration_s": round(finished - started, 3),
        "mlflow_run_id": spec.run_id, "outputs": outputs, "error": error, "executed_on": _node_name(),
    }
    if status != "succeeded":
        if spec.storage.remote:  # what a failed attempt wrote stays on the node; its error goes to the driver
            shutil.rmtree(scratch, ignore_errors=True)
        else:
            cache.write_manifest(scratch, manifest)
        return {"status": status, "rel": None, "manifest": manifest, "error": error}
    manifest["files"] = {p.relative_to(scratch).as_posix(): sha256_file(p)
                         for p in sorted(scratch.rglob("*")) if p.is_file() and p.name != cache.MANIFEST}
    cache.publish(spec.storage, scratch, spec.final_rel, manifest)
    if spec.storage.remote:
        shutil.rmtree(scratch, ignore_errors=True)
        if training:
            spec.storage.delete_dir(spec.work_rel)
    return {"status": status, "rel": spec.final_rel, "manifest": manifest, "error": None}


def run_training(spec: NodeSpec, stage: Any, inputs: Any, scratch: Path, log: NodeLog) -> dict:
    """A training stage: its workers (this task, or a TorchTrainer group), then its result."""
    job, extra = stage.job(spec.cfg, inputs, log)
    return train_workers(job, spec.storage, spec.work_rel, scratch, log, resources=spec.resources, extra=extra,
                         node_id=spec.id, sink=spec.sink, spec=spec)


def train_workers(job: Any, storage: Storage, rel: str, out_dir: Path, log: Any, *, resources: StageResources,
                  extra: dict | None = None, node_id: str = "", sink: Any = None, spec: NodeSpec | None = None) -> dict:
    """Run a training job's workers with the work store at `rel` on the root, then write its result to `out_dir`.

    One worker runs in this process (the Ray task that called this holds its resources); several run in a Ray Train
    TorchTrainer, each asking for `resources` (and the GPU of `use_gpu`). On an object-store root every worker
    fetches its own inputs (`spec`) and the best model comes back from the work store.
    """
    from stages import train

    t0 = time.perf_counter()
    tc = train.stage_config(job).train
    store = work_store(storage, rel)
    extra = dict(extra or {})
    if tc.num_workers == 1:
        train.run_local(job, store, log)
        extra["launcher"] = "task"
    else:
        extra.update(launcher="ray_train", fit_s=_fit_torch_trainer(job, storage, rel, resources, node_id, sink, spec))
    if storage.remote:
        storage.download_dir(f"{rel}/{train.BEST_DIR}", Path(out_dir) / train.BEST_DIR)
    metrics = train.finish(job, store, Path(out_dir), log, time.perf_counter() - t0, extra)
    if storage.remote:
        storage.delete_dir(rel)
    else:
        shutil.rmtree(Path(out_dir) / train.CKPT_DIR, ignore_errors=True)  # the best model stays
        (Path(out_dir) / train.SUMMARY_FILE).unlink(missing_ok=True)
    return metrics


def _fit_torch_trainer(job: Any, storage: Storage, rel: str, resources: StageResources, node_id: str, sink: Any,
                       spec: NodeSpec | None) -> float:
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from stages import train

    tc = train.stage_config(job).train
    launch = training_launch(tc, resources)
    scaling = ScalingConfig(num_workers=launch.workers, use_gpu=tc.use_gpu, resources_per_worker=launch.per_worker)
    local = tempfile.mkdtemp(prefix="narvl-raytrain-")  # Ray Train's own run state; checkpoints are in the store
    trainer = TorchTrainer(
        ray_train_loop,
        train_loop_config={"job": job, "storage": storage, "rel": rel, "node_id": node_id, "sink": sink,
                           "spec": spec},
        torch_config=TorchConfig(backend=launch.backend),
        scaling_config=scaling,
        run_config=RunConfig(name=f"{Path(rel).name}-{int(time.time())}", storage_path=local,
                             failure_config=FailureConfig(max_failures=tc.max_failures)),
    )
    t = time.perf_counter()
    try:
        result = trainer.fit()
    finally:
        shutil.rmtree(local, ignore_errors=True)
    if result.error is not None:
        raise RuntimeError(f"{node_id or rel}: training failed") from result.error
    return time.perf_counter() - t


def ray_train_loop(config: dict) -> None:
    """One Ray Train worker: its inputs on its own node, then the stage's loop (stages.train.train_worker)."""
    import ray.train

    from stages import train

    adopt_carried_env()
    job, storage, spec = config["job"], config["storage"], config["spec"]
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    use_gpu = train.stage_config(job).train.use_gpu
    os.environ["DS_ACCELERATOR"] = "cuda" if use_gpu else "cpu"
    if storage.remote and spec is not None:  # this worker's node may not be the stage task's: fetch inputs here
        mine = resolve_inputs(spec, load_stage(spec.stage_ref))
        job = dataclasses.replace(job, inputs=dataclasses.replace(
            job.inputs, **{f: getattr(mine, f) for f in ("data", "pretrain", "teacher", "distill")
                           if hasattr(mine, f) and getattr(job.inputs, f) is not None}))
    log = NodeLog(config["node_id"], config["sink"] if rank == 0 else None)
    try:
        train.train_worker(job, train.WorkerContext(rank=rank, world_size=ctx.get_world_size(),
                                                    store=work_store(storage, config["rel"]), log=log,
                                                    device="cuda" if use_gpu else "cpu"))
    finally:
        log.close()


def train_stage_on_ray(stage: Any, cfg: Any, inputs: Any, out_dir: Path, log: Any,
                       resources: StageResources | None = None) -> dict:
    """A training stage outside a DAG (tests, notebooks): its workers on the connected Ray, the work store and the
    result in `out_dir` (a rerun on the same folder resumes)."""
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    job, extra = stage.job(cfg, inputs, log)
    return train_workers(job, Storage(out_dir.parent), out_dir.name, out_dir, log,
                         resources=resources or StageResources(), extra=extra)


def run_fanned_out(spec: NodeSpec, stage: Any, inputs: Any, scratch: Path, log: NodeLog) -> dict:
    """distill: `decode_part` on `num_actors` Ray tasks (each fetching its inputs on its node), then `run`."""
    import ray

    n = spec.cfg.distill.num_actors
    remote = ray.remote(_decode_part).options(**_ray_resources(spec.resources), max_retries=2,
                                              runtime_env={"env_vars": carried_env()})
    log.info(f"decoding in {n} parts, each asking for {_describe(spec.resources)}")
    parts = ray.get([remote.remote(spec, i, n) for i in range(n)])
    return stage.run(spec.cfg, inputs, scratch, log, parts=parts)


def _decode_part(spec: NodeSpec, rank: int, world_size: int) -> list[dict]:
    adopt_carried_env()
    stage = load_stage(spec.stage_ref)
    return stage.decode_part(spec.cfg, resolve_inputs(spec, stage), rank, world_size)


def _node_name() -> str:
    try:
        import ray

        if ray.is_initialized():
            ctx = ray.get_runtime_context()
            return f"{ctx.get_node_id()[:12]}"
    except Exception:  # noqa: BLE001 - a name for the log only
        pass
    return os.uname().nodename


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"


# ---- resources ------------------------------------------------------------------------------------------------
def worker_resources(res: StageResources, use_gpu: bool) -> StageResources:
    """A training worker's resources: at least one GPU when the training asks for GPUs."""
    return res.model_copy(update={"gpus": max(res.gpus, 1.0)}) if use_gpu and res.gpus < 1 else res


@dataclass(frozen=True)
class TrainingLaunch:
    """How a training stage's workers are started, resolved from its config (inspectable without a GPU)."""

    launcher: str  # "task": the loop in the stage's own Ray task; "ray_train": a TorchTrainer worker group
    workers: int
    backend: str  # torch.distributed: "nccl" on GPUs, "gloo" on CPUs
    ds_accelerator: str  # DeepSpeed's accelerator, set in the workers' own environment: "cuda" | "cpu"
    per_worker: dict[str, float]  # Ray resources of each worker


def training_launch(tc: Any, resources: StageResources) -> TrainingLaunch:
    res = worker_resources(resources, tc.use_gpu)
    return TrainingLaunch(launcher="task" if tc.num_workers == 1 else "ray_train", workers=tc.num_workers,
                          backend="nccl" if tc.use_gpu else "gloo", ds_accelerator="cuda" if tc.use_gpu else "cpu",
                          per_worker=_ray_resources(res, train_worker=True))


def _ray_resources(res: StageResources, train_worker: bool = False) -> dict[str, Any]:
    """Ray options for a task (num_cpus, num_gpus, memory, resources, label_selector) or a Train worker's dict."""
    if train_worker:
        out: dict[str, Any] = {"CPU": res.cpus, **res.custom}
        if res.gpus:
            out["GPU"] = res.gpus
        if res.memory_gb:
            out["memory"] = int(res.memory_gb * 2**30)
        return out
    opts: dict[str, Any] = {"num_cpus": res.cpus, "num_gpus": res.gpus}
    if res.custom:
        opts["resources"] = dict(res.custom)
    if res.memory_gb:
        opts["memory"] = int(res.memory_gb * 2**30)
    if res.labels:
        opts["label_selector"] = dict(res.labels)
    return opts


def _describe(res: StageResources) -> str:
    parts = [f"{res.cpus:g} CPU"] + ([f"{res.gpus:g} GPU"] if res.gpus else [])
    parts += [f"{v:g} {k}" for k, v in res.custom.items()]
    if res.memory_gb:
        parts.append(f"{res.memory_gb:g} GiB memory")
    if res.labels:
        parts.append("labels " + ", ".join(f"{k}={v}" for k, v in res.labels.items()))
    return ", ".join(parts)


def check_feasible(node_id: str, res: StageResources, workers: int = 1) -> None:
    """ExecutionError at once when no node of the cluster can hold one piece of the node's work (or the cluster
    cannot hold all its workers), naming what was asked and what exists, instead of waiting forever."""
    import ray

    want = {"CPU": res.cpus, "GPU": res.gpus, **res.custom}
    if res.memory_gb:
        want["memory"] = res.memory_gb * 2**30
    nodes = [n for n in ray.nodes() if n.get("Alive")]

    def fits(have: dict[str, float]) -> bool:
        return all(have.get(k, 0.0) >= v for k, v in want.items() if v)

    def show(have: dict[str, float]) -> str:
        keep = {k: v for k, v in have.items() if not k.startswith("node:") and k != "object_store_memory"}
        return "{" + ", ".join(f"{k}: {v / 2**30:.1f} GiB" if k == "memory" else f"{k}: {v:g}"
                               for k, v in sorted(keep.items())) + "}"

    fitting = sum(1 for n in nodes if fits(n.get("Resources", {})))
    total = ray.cluster_resources()
    enough = all(total.get(k, 0.0) >= v * workers for k, v in want.items() if v)
    if fitting and enough:
        return
    have = "; ".join(show(n.get("Resources", {})) for n in nodes) or "no alive node"
    raise ExecutionError(f"{node_id} asks for {workers} x ({_describe(res)}) but the cluster cannot provide it; "
                         f"its nodes have: {have}. Lower the stage's resources in the config (resources.<stage>) "
                         "or add nodes that have them.")


def check_storage_on_nodes(storage: Storage, env: dict[str, str]) -> None:
    """One small task per alive node writes and reads a probe under the root; ExecutionError naming the node and the
    root when any cannot (a local path that is not on a filesystem every node shares fails here)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    token = f"probe-{os.getpid()}-{time.time_ns()}"
    storage.write_bytes(f".probe/{token}", token.encode())
    try:
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        probe = ray.remote(_probe_storage)
        refs = {n["NodeID"]: probe.options(
            num_cpus=0, runtime_env={"env_vars": env},
            scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(storage, token)
            for n in nodes}
        addr = {n["NodeID"]: n.get("NodeManagerAddress", "?") for n in nodes}
        for node_id, ref in refs.items():
            try:
                problem = ray.get(ref, timeout=120)
            except Exception as e:  # noqa: BLE001 - the node could not even run the probe
                problem = f"{type(e).__name__}: {e}"
            if problem:
                raise ExecutionError(f"node {node_id[:12]} ({addr[node_id]}) cannot use the artifact root "
                                     f"{storage.uri}: {problem}")
    finally:
        try:
            storage.write_bytes(f".probe/{token}", b"")
        except StorageError:
            pass


def _probe_storage(storage: Storage, token: str) -> str | None:
    adopt_carried_env()
    try:
        if storage.read_bytes(f".probe/{token}") != token.encode():
            return "it does not see a file the driver wrote there (not the same storage on this node)"
        storage.check_writable()
    except Exception as e:  # noqa: BLE001 - reported to the driver with the node's name
        return f"{type(e).__name__}: {e}"
    return None


# ---- the driver ------------------------------------------------------------------------------------------------
def driver_actor(cls: type, **options: Any) -> Any:
    """An actor of the driver's own (no CPU), kept on the driver's node: losing a worker node never loses it."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = ray.get_runtime_context().get_node_id()
    return ray.remote(num_cpus=0)(cls).options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False), **options).remote()


@dataclass
class NodeStatus:
    id: str
    task: str
    name: str
    stage: str
    key: str
    action: str  # hit | run | skip
    state: str  # hit | pending | waiting (another driver runs it) | running | succeeded | failed | upstream_failed
    # | not_run
    rel: str | None = None  # the finished folder on the root
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


DONE_STATES = ("hit", "succeeded")


class Executor:
    """Plans are executed here: one Ray session, one artifact root, one MLflow tracker (the only writer)."""

    def __init__(self, storage: Storage, tracker: Any, *, address: str | None = None,
                 max_concurrent: int = 2, poll_s: float = 0.5, log_models: bool = False) -> None:
        self.storage, self.tracker, self.address = storage, tracker, address
        self.log_models = log_models
        self.leases = Leases(storage)
        self.max_concurrent, self.poll_s = max_concurrent, poll_s
        self.sink: Any = None
        self._started_ray = False
        self._lock = threading.Lock()
        self._views: dict[str, Path] = {}  # node rel -> a local copy of its small files (object-store roots)

    # ---- Ray, started only when something runs -----------------------------------------------------------------
    def ensure_ray(self) -> None:
        import ray

        from pipeline.ray_utils import init_ray

        with self._lock:
            if self.sink is not None:
                return
            self._started_ray = not ray.is_initialized()
            env = carried_env()
            init_ray(self.address, env_vars=env)
            nodes = [n for n in ray.nodes() if n.get("Alive")]
            if self.storage.remote or len(nodes) > 1:
                check_storage_on_nodes(self.storage, env)
            self.sink = driver_actor(LogSink)

    def shutdown(self) -> None:
        import ray

        self.leases.release_all()
        if self.sink is not None:
            try:
                ray.kill(self.sink)
            except Exception:  # noqa: BLE001
                pass
            self.sink = None
        if self._started_ray and ray.is_initialized():
            from pipeline.ray_utils import shutdown_ray

            shutdown_ray()
        self._started_ray = False
        for d in self._views.values():
            shutil.rmtree(d, ignore_errors=True)
        self._views.clear()

    # ---- reading finished folders --------------------------------------------------------------------------------
    def view(self, rel: str) -> Path:
        """A local folder with the small files of a finished stage (itself on a local root)."""
        if not self.storage.remote:
            return self.storage.local(rel)
        if rel not in self._views:
            d = Path(tempfile.mkdtemp(prefix="narvl-view-"))
            for name in self.storage.list_files(rel):
                if "/" not in name:  # the top-level files: manifest, config, metrics, predictions, curves, log
                    self.storage.download_file(f"{rel}/{name}", d / name)
            self._views[rel] = d
        return self._views[rel]

    # ---- running a plan ----------------------------------------------------------------------------------------
    def run(self, graph: Any, plan: dict[str, str], *, resources: Any, tags: dict[str, str],
            git: dict[str, Any], on_update: Callable[[list[NodeStatus]], None] | None = None,
            statuses: dict[str, NodeStatus] | None = None, forced: set[str] | frozenset = frozenset()
            ) -> dict[str, NodeStatus]:
        """Run every node planned "run" once its inputs are done; log hits and results to MLflow."""
        import ray

        statuses = statuses if statuses is not None else {}
        for i, n in graph.nodes.items():
            statuses[i] = NodeStatus(i, n.task, n.name, n.stage, n.key, plan[i],
                                     {"hit": "hit", "run": "pending", "skip": "not_run"}[plan[i]])
        for i, st in statuses.items():
            if st.state == "hit":
                node = graph.nodes[i]
                st.rel = cache.final_rel(node.task, node.name, node.key)
                folder = self.view(st.rel)
                st.run_id = self.tracker.log_hit(i, child_tags(node, tags), node.cfg.model_dump(mode="json"),
                                                 cache.read_manifest(folder) or {}, folder)
        pending = [i for i, st in statuses.items() if st.state == "pending"]
        if not pending:
            return statuses
        self.ensure_ray()
        for i in pending:  # refuse at once what the cluster cannot run
            node = graph.nodes[i]
            res = resources.for_stage(node.stage)
            workers = 1
            if node.stage in TRAINING_STAGES:
                res, workers = worker_resources(res, node.cfg.train.use_gpu), node.cfg.train.num_workers
            elif node.stage == "distill":
                workers = node.cfg.distill.num_actors
            check_feasible(i, res, workers)
        remote = ray.remote(execute_node)
        running: dict[Any, str] = {}
        # a node's result that appears while it waits (another driver's) is adopted; for a forced node, only one
        # newer than the result it was forced to replace
        planned = {i: self._finished_at(graph.nodes[i]) if i in forced else None for i in pending}
        try:
            while pending or running:
                before = (len(pending), len(running))
                waiting = False
                for i in list(pending):
                    node = graph.nodes[i]
                    ups = [statuses[u] for u in node.upstream_ids()]
                    if any(u.state in ("failed", "upstream_failed", "not_run") for u in ups):
                        statuses[i].state = "upstream_failed"
                        pending.remove(i)
                    elif len(running) < self.max_concurrent and all(u.state in DONE_STATES for u in ups):
                        verdict = self._claim(node, statuses[i], tags, planned[i])
                        if verdict == "run":
                            ref = self._submit(remote, node, statuses, resources, tags, git)
                            running[ref] = i
                            pending.remove(i)
                        elif verdict == "hit":  # another driver finished it meanwhile
                            pending.remove(i)
                        else:  # another driver runs it now: wait for its result
                            waiting = True
                if not running:
                    if waiting:
                        time.sleep(self.poll_s)
                        if on_update:
                            on_update(list(statuses.values()))
                        continue
                    if pending and (len(pending), len(running)) == before:
                        raise ExecutionError(f"cannot schedule {pending}: their inputs never became ready")
                    continue
                done, _ = ray.wait(list(running), num_returns=1, timeout=self.poll_s)
                self.drain(statuses)
                for ref in done:
                    i = running.pop(ref)
                    self._finish(ref, graph.nodes[i], statuses[i], statuses)
                if on_update:
                    on_update(list(statuses.values()))
        except BaseException:
            for ref in running:
                ray.cancel(ref, force=True)
            for i in running.values():
                statuses[i].state = "failed"
                if statuses[i].run_id:
                    self.tracker.terminate(statuses[i].run_id, "KILLED")
            self.leases.release_all()
            raise
        return statuses

    def _finished_at(self, node: Any) -> str | None:
        """The `finished` stamp of the node's succeeded result on the root, or None."""
        m = self.storage.read_json(f"{cache.final_rel(node.task, node.name, node.key)}/{cache.MANIFEST}")
        ok = isinstance(m, dict) and m.get("status") == "succeeded" and m.get("key") == node.key
        return str(m.get("finished")) if ok else None

    def _claim(self, node: Any, st: NodeStatus, tags: dict[str, str], planned: str | None) -> str:
        """"run" (this driver now holds the node's lease), "hit" (another driver's result appeared since it was
        planned) or "wait" (another driver holds the lease)."""
        lease = lease_rel(node.task, node.name, node.key)
        held = self.leases.acquire(lease)
        fresh = self._finished_at(node)  # read after the lease attempt: an owner publishes before it releases
        if not held:
            if fresh is not None and fresh != planned:
                self._adopt_hit(node, st, tags)
                return "hit"
            st.state = "waiting"
            return "wait"
        if fresh is not None and fresh != planned:  # another driver finished it just before we took the lease
            self.leases.release(lease)
            self._adopt_hit(node, st, tags)
            return "hit"
        return "run"

    def _adopt_hit(self, node: Any, st: NodeStatus, tags: dict[str, str]) -> None:
        st.state, st.rel = "hit", cache.final_rel(node.task, node.name, node.key)
        folder = self.view(st.rel)
        st.run_id = self.tracker.log_hit(node.id, child_tags(node, tags), node.cfg.model_dump(mode="json"),
                                         cache.read_manifest(folder) or {}, folder)

    def _submit(self, remote: Any, node: Any, statuses: dict[str, NodeStatus], resources: Any,
                tags: dict[str, str], git: dict[str, Any]) -> Any:
        st = statuses[node.id]
        if not self.storage.remote:
            cache.clean_stale(self.storage.local(), node.task, node.name, node.key)
        st.run_id = self.tracker.start_child(node.id, child_tags(node, tags))
        res = resources.for_stage(node.stage)
        training = node.stage in TRAINING_STAGES
        if training:
            res = worker_resources(res, node.cfg.train.use_gpu)
        spec = NodeSpec(
            id=node.id, task=node.task, name=node.name, stage=node.stage, stage_ref=node.stage_ref,
            version=node.version, key=node.key, cfg=node.cfg,
            inputs={f: InputRef(statuses[node.upstream_id(up)].rel, statuses[node.upstream_id(up)].key)
                    for f, up in node.inputs.items()},
            storage=self.storage, resources=res, run_id=st.run_id, git=git, sink=self.sink)
        if training and node.cfg.train.num_workers > 1:
            options = {"num_cpus": 0, "num_gpus": 0}  # the TorchTrainer's workers take the resources
        elif node.stage == "distill" and node.cfg.distill.num_actors > 1:
            options = {"num_cpus": 0, "num_gpus": 0}  # its part tasks take the resources
        else:
            options = _ray_resources(res)
        # a lost node retries the task elsewhere; training resumes from its work store on the root
        retries = node.cfg.train.max_failures if training else 0
        accelerator = training_launch(node.cfg.train, res).ds_accelerator if training else "cpu"
        env = {"DS_ACCELERATOR": accelerator, **carried_env()}
        st.state, st.started = "running", time.time()
        return remote.options(**options, max_retries=retries, name=node.id,
                              runtime_env={"env_vars": env}).remote(spec)

    def drain(self, statuses: dict[str, NodeStatus]) -> None:
        """Forward what the stages sent: progress to the statuses, curves to their MLflow runs (live)."""
        import ray

        if self.sink is None:
            return
        events = ray.get(self.sink.drain.remote())
        metrics: dict[str, list] = {}
        for node_id, kind, payload in events:
            st = statuses.get(node_id)
            if st is None:
                continue
            if kind == "progress":
                st.step, st.total = payload.get("step"), payload.get("total")
            elif kind == "metrics" and st.run_id:
                metrics.setdefault(st.run_id, []).append((payload["step"], payload["t"], payload["values"]))
        for run_id, records in metrics.items():
            self.tracker.log_metrics(run_id, records)

    def _finish(self, ref: Any, node: Any, st: NodeStatus, statuses: dict[str, NodeStatus]) -> None:
        import ray

        try:
            res = ray.get(ref)
        except Exception as e:  # the worker died or Ray failed the task: a stage's own errors come back in res
            res = {"status": "failed", "rel": None, "error": f"{type(e).__name__}: {e}"}
        st.finished = time.time()
        st.state, st.error = res["status"], res.get("error")
        st.rel = res.get("rel")
        if st.state == "succeeded" and st.total:
            st.step = st.total
        folder = self.view(st.rel) if st.rel else None
        if st.state == "succeeded" and self.log_models and node.stage in TRAINING_STAGES:
            self._log_model(node, st, statuses)
        self.tracker.finish_child(st.run_id, folder, node.cfg.model_dump(mode="json"),
                                  "FINISHED" if st.state == "succeeded" else "FAILED")
        self.leases.release(lease_rel(node.task, node.name, node.key))

    def _log_model(self, node: Any, st: NodeStatus, statuses: dict[str, NodeStatus]) -> None:
        """The trained model as an MLflow pyfunc model in its stage's run; a failure is logged, never fatal."""
        from pipeline.serving.mlflow_model import log_model

        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no bars in the live view
        data = statuses[node.upstream_id(node.inputs["data"])]
        try:
            with tempfile.TemporaryDirectory(prefix="narvl-model-") as tmp:
                if self.storage.remote:
                    model_dir, tokenizer = Path(tmp) / "checkpoint", Path(tmp) / "tokenizer"
                    self.storage.download_dir(f"{st.rel}/checkpoint", model_dir)
                    self.storage.download_dir(f"{data.rel}/tokenizer", tokenizer)
                else:
                    model_dir = self.storage.local(st.rel) / "checkpoint"
                    tokenizer = self.storage.local(data.rel) / "tokenizer"
                log_model(st.run_id, model_dir, tokenizer, "ar" if node.stage == "train_teacher" else "narvl",
                          tracking_uri=self.tracker.uri)
        except Exception as e:  # noqa: BLE001 - packaging is a convenience; the stage's result stands
            self.tracker.set_tag(st.run_id, "model_logging_error", f"{type(e).__name__}: {e}"[:4000])


def child_tags(node: Any, common: dict[str, str]) -> dict[str, str]:
    return {**common, "task": node.task, "stage": node.stage, "node": node.name, "cache_key": node.key,
            "ablation": node.ablation or "", "cache_hit": "false"}

