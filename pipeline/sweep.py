"""Ray Tune sweep over train_nar's number of learnable queries (paper Table 10).

The data, teacher and distillation come from the stage cache (computed once, before any trial, if missing).
Each trial is train_nar -> evaluate_narvl -> benchmark for one (task, N), run through the same content-addressed
cache as `narvl run`, so a trial whose N equals the pipeline's is a cache hit and a rerun of the sweep is free.
MLflow: a sweep parent run, one child run per trial (param `num_queries`, the trial's metric and latency), and
the trial's stage runs beneath it. Latency is measured inside the trial, so by default one trial runs at a time
(`max_concurrent_trials: 1`): concurrent training would pollute the timings.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, model_validator

from pipeline.config import CONFIG_DIR, ConfigError, PipelineConfig, apply_overrides, load_config
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
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError as e:
        raise ConfigError(f"sweep config {path} not found") from e
    data = apply_overrides(data, overrides or [])
    try:
        return SweepConfig(**data)
    except ValidationError as e:
        lines = [f"  {'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()]
        raise ConfigError(f"{path}: invalid sweep config\n" + "\n".join(lines)) from None


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


def _ensure(node_names: tuple[str, ...], cfg: PipelineConfig, root: Path, tracker: Any, git: dict,
            tags: dict[str, str]) -> dict[str, Path]:
    """Run (or reuse from the cache) the named nodes of cfg's single task, in order; return their folders."""
    from pipeline.cache import final_dir, is_hit, read_manifest
    from pipeline.dag import build_graph, execute_node, node_spec

    graph = build_graph(cfg)
    dirs: dict[str, Path] = {}
    for node in graph.nodes.values():
        if node.name not in node_names:
            continue
        ntags = {**tags, "task": node.task, "stage": node.stage, "node": node.name, "cache_key": node.key,
                 "cache_hit": "false"}
        final = final_dir(root, node.task, node.name, node.key)
        params = node.cfg.model_dump(mode="json")
        if is_hit(final, node.key):
            tracker.log_hit(node.id, ntags, params, read_manifest(final) or {}, final)
            dirs[node.id] = final
            continue
        missing = [node.upstream_id(up) for up in node.inputs.values() if node.upstream_id(up) not in dirs]
        if missing:
            raise RuntimeError(f"{node.id}: inputs {missing} are neither cached nor part of this step")
        run_id = tracker.start_child(node.id, ntags)
        spec = node_spec(node, {name: (dirs[node.upstream_id(up)], graph.nodes[node.upstream_id(up)].key)
                                for name, up in node.inputs.items()}, root, run_id, git)
        res = execute_node(spec)
        tracker.finish_child(run_id, Path(res["dir"]), params, "FINISHED" if res["status"] == "succeeded" else "FAILED")
        if res["status"] != "succeeded":
            raise RuntimeError(f"{node.id} failed:\n{res.get('error')}")
        dirs[node.id] = Path(res["dir"])
    return {node_id.split("/", 1)[1]: d for node_id, d in dirs.items()}


def _trial(config: dict) -> None:
    """A Tune function trainable: train_nar + evaluate_narvl + benchmark for one (task, N)."""
    import json

    from ray import tune

    from pipeline.cache import git_info
    from pipeline.tracking import Tracker

    scfg = SweepConfig(**config["sweep"])
    task, n = config["trial"]["task"], config["trial"]["num_queries"]
    cfg = pipeline_for(scfg, task, n)
    root = Path(config["root"])
    tracker = Tracker(root, config["tracking_uri"], scfg.name)
    tracker.parent_id = config["parent_run_id"]
    trial_run = tracker.start_child(f"{task}/num_queries={n}", {"narvl_role": "trial", "task": task})
    tracker.log_params(trial_run, {"task": task, "num_queries": n})
    tracker.parent_id = trial_run  # the trial's stage runs nest beneath it
    started = time.time()
    status = "FAILED"
    try:
        names = TRIAL if scfg.benchmark else TRIAL[:2]
        dirs = _ensure((*PREFIX, *names), cfg, root, tracker, git_info(),
                       {"profile": cfg.profile, "name": cfg.name, "sweep": scfg.name})
        ev = json.loads((dirs["evaluate_narvl"] / "metrics.json").read_text())
        result: dict[str, Any] = {"task": task, "num_queries": n, "metric": ev["metric"], "value": ev["value"]}
        if scfg.benchmark:
            from pipeline.report import latency_ms

            lat = json.loads((dirs["benchmark"] / "latency.json").read_text())
            result |= {"latency_ms": latency_ms(lat, "narvl"), "ar_latency_ms": latency_ms(lat, "ar")}
            if result["latency_ms"] and result["ar_latency_ms"]:
                result["speedup"] = result["ar_latency_ms"] / result["latency_ms"]
        result["wall_s"] = time.time() - started
        numeric = {k: float(v) for k, v in result.items() if isinstance(v, int | float)}
        tracker.log_metrics(trial_run, [(None, time.time(), numeric)])
        status = "FINISHED"
        tune.report(result)
    finally:
        tracker.client.set_terminated(trial_run, status=status)


def run_sweep(scfg: SweepConfig, root: Path, *, address: str | None = None, tracking_uri: str | None = None,
              storage: Path | None = None) -> dict[str, Any]:
    """Run the sweep; returns {"rows": [...], "dir": folder with results.csv / results.md / plot}."""
    import ray
    from ray import tune

    from pipeline.cache import git_info
    from pipeline.ray_utils import init_local_ray
    from pipeline.tracking import Tracker

    root = Path(root).resolve()
    for task, values in scfg.num_queries.items():  # every trial's config validates before anything runs
        for n in values:
            pipeline_for(scfg, task, n)
    base = pipeline_for(scfg)
    started_ray = not ray.is_initialized()
    init_local_ray(address)
    tracker = Tracker(root, tracking_uri, scfg.name)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    parent = tracker.start_parent({"sweep": scfg.model_dump(mode="json"), "pipeline": base.model_dump(mode="json")},
                                  {"narvl_role": "sweep", "profile": base.profile, "mlflow.runName": f"sweep-{stamp}"})
    status = "FAILED"
    try:
        git = git_info()
        for task in scfg.num_queries:  # the shared prefix, once per task, before the trials
            _ensure(PREFIX, pipeline_for(scfg, task), root, tracker, git, {"profile": base.profile, "sweep": scfg.name})
        grid = [{"task": t, "num_queries": n} for t, values in scfg.num_queries.items() for n in values]
        param_space = {"trial": tune.grid_search(grid), "sweep": scfg.model_dump(mode="json"), "root": str(root),
                       "tracking_uri": tracker.uri, "parent_run_id": parent}
        tuner = tune.Tuner(
            tune.with_resources(_trial, {"cpu": 0.01}),
            param_space=param_space,
            tune_config=tune.TuneConfig(max_concurrent_trials=scfg.max_concurrent_trials),
            run_config=tune.RunConfig(name=f"{scfg.name}-{stamp}",
                                      storage_path=str(storage or root / "tune"), verbose=0),
        )
        results = tuner.fit()
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
        out = root / "sweeps" / f"{stamp}-{parent[:8]}"
        write_sweep_report(rows, out)
        tracker.client.log_artifacts(parent, str(out), artifact_path="sweep")
        if errors:
            raise RuntimeError("sweep trials failed:\n" + "\n".join(errors))
        status = "FINISHED"
        return {"rows": rows, "dir": out, "parent_run_id": parent}
    finally:
        tracker.finish_parent(status)
        if started_ray:
            ray.shutdown()


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
