"""Ray Tune sweep over train_nar's number of learnable queries (paper Table 10).

The data, teacher and distillation come from the stage cache (computed once, before any trial, if missing).
Each trial is train_nar -> evaluate_narvl -> benchmark for one (task, N). A Tune trial does no work itself: it
sends its request to the driver (through a small broker actor) and waits; the driver runs the trial's nodes with
the same executor, cache and resources as `narvl run` and is the only MLflow writer. So a trial whose N equals the
pipeline's is a cache hit, a rerun of the sweep is free, and each node gets the resources its stage asks for
(GPUs included). MLflow: a sweep parent run, one child run per trial (param `num_queries`, the trial's metric and
latency), and the trial's stage runs beneath it. Latency is measured inside the trial, so by default one trial
runs at a time (`max_concurrent_trials: 1`): concurrent training would pollute the timings.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, model_validator

from pipeline.config import (
    CONFIG_DIR,
    ConfigError,
    PipelineConfig,
    apply_overrides,
    load_config,
    read_yaml_mapping,
    validation_message,
)
from stages.config import Strict, Task

PREFIX = ("prepare_data", "pretrain", "train_teacher", "distill")  # pretrain only where enabled
TRIAL = ("train_nar", "evaluate_narvl", "benchmark")


class SweepConfig(Strict):
    name: str = "narvl-sweep"
    pipeline: str = Field("default", description="a profile name, or a pipeline YAML path (absolute, relative to "
                                                 "the working directory or to configs/)")
    overrides: list[str] = Field(default_factory=list, description="dotted overrides applied to the pipeline")
    num_queries: dict[Task, list[int]] = Field(description="the grid: task -> query counts")
    max_concurrent_trials: int = Field(1, ge=1)
    benchmark: bool = True

    @model_validator(mode="after")
    def _check(self) -> SweepConfig:
        for task, values in self.num_queries.items():
            if not values or any(v < 1 for v in values):
                raise ValueError(f"num_queries.{task}: a non-empty list of positive counts, got {values}")
        return self


def load_sweep_config(path: str | Path, overrides: list[str] | None = None) -> SweepConfig:
    path = Path(path)
    data = apply_overrides(read_yaml_mapping(path, "sweep config"), overrides or [])
    try:
        return SweepConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"{path}: invalid sweep config\n{validation_message(e)}") from None


def pipeline_for(scfg: SweepConfig, task: str | None = None, n: int | None = None) -> PipelineConfig:
    """The pipeline config of the sweep, or of one trial (one task, train_nar.num_queries.<task> = n)."""
    extra = []
    if task is not None:
        extra += [f"tasks=[{task}]"]
    if n is not None:
        extra += [f"train_nar.num_queries.{task}={n}"]
    path = Path(scfg.pipeline)
    if not path.suffix:  # a profile name
        path = CONFIG_DIR / "pipelines" / f"{scfg.pipeline}.yaml"
    elif not path.is_absolute() and not path.exists() and (CONFIG_DIR / path).exists():
        path = CONFIG_DIR / path  # relative to configs/, e.g. studies/paper_tables.yaml
    return load_config(path, overrides=[*scfg.overrides, *extra])


class TrialBroker:
    """A Ray actor (no CPU) between the Tune trials and the driver: trials put requests, the driver answers."""

    def __init__(self) -> None:
        self.requests: list[tuple[int, dict]] = []
        self.results: dict[int, dict] = {}
        self.next_id = 0

    def submit(self, request: dict) -> int:
        self.next_id += 1
        self.requests.append((self.next_id, request))
        return self.next_id

    def take(self) -> list[tuple[int, dict]]:
        out, self.requests = self.requests, []
        return out

    def answer(self, request_id: int, result: dict) -> None:
        self.results[request_id] = result

    def result(self, request_id: int) -> dict | None:
        return self.results.pop(request_id, None)


def _trial(config: dict) -> None:
    """A Tune function trainable: asks the driver to run train_nar + evaluate_narvl + benchmark for (task, N)."""
    import ray
    from ray import tune

    broker = ray.get_actor(config["broker"], namespace=config["namespace"])
    request_id = ray.get(broker.submit.remote(config["trial"]))
    while (answer := ray.get(broker.result.remote(request_id))) is None:
        time.sleep(0.2)
    if "error" in answer:
        raise RuntimeError(answer["error"])
    tune.report(answer)


def _nodes(cfg: PipelineConfig, names: tuple[str, ...], executor: Any, tags: dict[str, str], git: dict) -> dict:
    """Run (or reuse from the cache) the named nodes of cfg's single task with the executor; their statuses."""
    from pipeline.cache import final_rel, is_hit
    from pipeline.dag import build_graph

    graph = build_graph(cfg)
    plan = {i: ("skip" if n.name not in names else
                "hit" if is_hit(executor.storage, final_rel(n.task, n.name, n.key), n.key) else "run")
            for i, n in graph.nodes.items()}
    statuses = executor.run(graph, plan, resources=cfg.resources, tags=tags, git=git)
    failed = [s for s in statuses.values() if s.action != "skip" and s.state not in ("hit", "succeeded")]
    if failed:
        raise RuntimeError("; ".join(f"{s.id} {s.state}: {(s.error or '').strip().splitlines()[-1:]}"
                                     for s in failed))
    return {s.name: s for s in statuses.values() if s.action != "skip"}


def _answer(scfg: SweepConfig, trial: dict, executor: Any, tracker: Any, git: dict) -> dict:
    """Run one trial's nodes (driver side) and return its row."""
    from stages.benchmark import OUTPUT as LATENCY_FILE
    from stages.benchmark import mean_latency_ms

    task, n = trial["task"], trial["num_queries"]
    cfg = pipeline_for(scfg, task, n)
    trial_run = tracker.start_child(f"{task}/num_queries={n}", {"narvl_role": "trial", "task": task})
    tracker.log_params(trial_run, {"task": task, "num_queries": n})
    started = time.time()
    status = "FAILED"
    try:
        names = TRIAL if scfg.benchmark else TRIAL[:2]
        tags = {"profile": cfg.profile, "name": cfg.name, "sweep": scfg.name, "mlflow.parentRunId": trial_run}
        done = _nodes(cfg, (*PREFIX, *names), executor, tags, git)
        ev = json.loads((executor.view(done["evaluate_narvl"].rel) / "metrics.json").read_text())
        result: dict[str, Any] = {"task": task, "num_queries": n, "metric": ev["metric"], "value": ev["value"]}
        if scfg.benchmark:
            lat = json.loads((executor.view(done["benchmark"].rel) / LATENCY_FILE).read_text())
            result |= {"latency_ms": mean_latency_ms(lat, "narvl"), "ar_latency_ms": mean_latency_ms(lat, "ar")}
            if result["latency_ms"] and result["ar_latency_ms"]:
                result["speedup"] = result["ar_latency_ms"] / result["latency_ms"]
        result["wall_s"] = time.time() - started
        numeric = {k: float(v) for k, v in result.items() if isinstance(v, int | float)}
        tracker.log_metrics(trial_run, [(None, time.time(), numeric)])
        status = "FINISHED"
        return result
    finally:
        tracker.terminate(trial_run, status)


def run_sweep(scfg: SweepConfig, root: str | Path, *, address: str | None = None, tracking_uri: str | None = None,
              storage: Path | None = None) -> dict[str, Any]:
    """Run the sweep; returns {"rows": [...], "dir": folder with results.csv / results.md / plot}."""
    import threading
    import uuid

    import ray
    from ray import tune

    from pipeline.cache import git_info
    from pipeline.executor import Executor, driver_actor
    from pipeline.storage import Storage
    from pipeline.tracking import Tracker

    store = Storage(root)
    for task, values in scfg.num_queries.items():  # every trial's config validates before anything runs
        for n in values:
            pipeline_for(scfg, task, n)
    base = pipeline_for(scfg)
    store.check_writable()
    tracker = Tracker(store, tracking_uri, scfg.name)
    executor = Executor(store, tracker, address=address, max_concurrent=base.resources.max_concurrent_tasks)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    parent = tracker.start_parent({"sweep": scfg.model_dump(mode="json"), "pipeline": base.model_dump(mode="json")},
                                  {"narvl_role": "sweep", "profile": base.profile, "mlflow.runName": f"sweep-{stamp}"})
    status = "FAILED"
    try:
        git = git_info()
        for task in scfg.num_queries:  # the shared prefix, once per task, before the trials
            _nodes(pipeline_for(scfg, task), PREFIX, executor, {"profile": base.profile, "sweep": scfg.name}, git)
        executor.ensure_ray()
        name, namespace = f"narvl-sweep-{uuid.uuid4().hex[:8]}", ray.get_runtime_context().namespace
        broker = driver_actor(TrialBroker, name=name, namespace=namespace)
        grid = [{"task": t, "num_queries": n} for t, values in scfg.num_queries.items() for n in values]
        tuner = tune.Tuner(
            tune.with_resources(_trial, {"cpu": 0.01}),  # a trial only waits: its nodes take the resources
            param_space={"trial": tune.grid_search(grid), "broker": name, "namespace": namespace},
            tune_config=tune.TuneConfig(max_concurrent_trials=scfg.max_concurrent_trials),
            run_config=tune.RunConfig(name=f"{scfg.name}-{stamp}",
                                      storage_path=str(storage or Path("artifacts").resolve() / "tune"), verbose=0),
        )
        outcome: dict[str, Any] = {}

        def fit() -> None:
            try:
                outcome["results"] = tuner.fit()
            except BaseException as e:  # noqa: BLE001 - re-raised by the driver below
                outcome["error"] = e

        fitter = threading.Thread(target=fit, name="tune-fit", daemon=True)
        fitter.start()
        while fitter.is_alive():  # the driver serves the trials' requests, one at a time
            for request_id, trial in ray.get(broker.take.remote()):
                try:
                    answer = _answer(scfg, trial, executor, tracker, git)
                except Exception as e:  # noqa: BLE001 - the trial reports it as its error
                    answer = {"error": f"{type(e).__name__}: {e}"}
                broker.answer.remote(request_id, answer)
            fitter.join(timeout=0.2)
        if "error" in outcome:
            raise outcome["error"]
        results = outcome["results"]
        rows, errors = [], []
        for r in results:
            if r.error is not None:
                errors.append(f"{r.config['trial']}: {r.error}")
            elif r.metrics and r.metrics.get("task") is not None:
                rows.append({k: r.metrics.get(k) for k in ("task", "num_queries", "metric", "value", "latency_ms",
                                                           "ar_latency_ms", "speedup", "wall_s")})
            else:  # stopped before it reported (e.g. the sweep was interrupted): no row, but say so
                errors.append(f"{r.config['trial']}: no result (stopped before it finished)")
        rows.sort(key=lambda r: (r["task"], r["num_queries"]))
        rel = f"sweeps/{stamp}-{parent[:8]}"
        out = Path("artifacts").resolve() / rel if store.remote else store.local(rel)
        write_sweep_report(rows, out)
        if store.remote:
            store.upload_dir(out, rel)
        tracker.log_artifacts(parent, out, artifact_path="sweep")
        if errors:
            raise RuntimeError("sweep trials failed:\n" + "\n".join(errors))
        status = "FINISHED"
        return {"rows": rows, "dir": out, "parent_run_id": parent}
    finally:
        tracker.finish_parent(status)
        executor.shutdown()


def write_sweep_report(rows: list[dict], out: Path) -> None:
    """results.csv, results.md and query_length.png (metric and latency against the query count, per task)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    out.mkdir(parents=True, exist_ok=True)
    df = pd.DataFrame(rows)
    df.to_csv(out / "results.csv", index=False)
    (out / "results.md").write_text(df.to_markdown(index=False, floatfmt=".2f") if _has_tabulate() else df.to_string())
    tasks = sorted(df["task"].unique()) if len(df) else []
    if not tasks:
        return
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        d = df[df["task"] == task].sort_values("num_queries")
        ax.plot(d["num_queries"], d["value"], "o-", color="C0")
        ax.set_xscale("log")
        ax.set_xlabel("number of learnable queries N")
        ax.set_ylabel(f"{d['metric'].iloc[0]}", color="C0")
        ax.set_title(task)
        if "latency_ms" in d and d["latency_ms"].notna().any():
            ax2 = ax.twinx()
            ax2.plot(d["num_queries"], d["latency_ms"], "s--", color="C1")
            ax2.set_ylabel("NARVL batch-1 latency (ms)", color="C1")
    fig.tight_layout()
    fig.savefig(out / "query_length.png", dpi=120)
    plt.close(fig)


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
    except ImportError:
        return False
    return True
