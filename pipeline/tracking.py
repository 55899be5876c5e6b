"""MLflow tracking of a pipeline run: only the driver writes.

Stages never talk to MLflow. Their logs, progress and curves travel through Ray to the driver (the executor's
LogSink, pipeline/executor.py), which logs curves to the stage's child run while the stage runs; when a stage
ends, the driver logs its config, result metrics and small output files. So one process writes to the tracking
store (the sqlite default is safe) from any number of nodes, and a stage works without MLflow.

Runs: one experiment per pipeline name; one parent run per invocation (tags git sha, dirty, profile, name);
one child run per node (tags mlflow.parentRunId, task, stage, node, cache_key, profile, cache_hit). A cache hit
is a child run tagged `cache_hit=true` and `produced_by_run=<the run id in the manifest>`.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pipeline.cache import CONFIG_FILE, LOG_FILE, MANIFEST
from pipeline.storage import Storage

PARAM_VALUE_LIMIT = 500
PARAM_BATCH = 100
METRIC_BATCH = 1000
MAX_ARTIFACT_BYTES = 64 * 1024 * 1024
# Files of a stage folder worth logging as artifacts (checkpoints and shards stay in the cache).
ARTIFACT_FILES = (CONFIG_FILE, MANIFEST, LOG_FILE, "metrics.json", "latency.json", "predictions.parquet",
                  "curves.parquet")


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists stay values."""
    out: dict[str, Any] = {}
    if isinstance(data, dict):
        for k, v in data.items():
            key = f"{prefix}.{k}" if prefix else str(k)
            if isinstance(v, dict) and v:
                out.update(flatten(v, key))
            else:
                out[key] = v
    else:
        out[prefix] = data
    return out


def numeric_items(data: dict[str, Any]) -> dict[str, float]:
    """The finite numeric leaves of a nested dict, flattened (booleans excluded)."""
    return {k: float(v) for k, v in flatten(data).items()
            if isinstance(v, int | float) and not isinstance(v, bool) and _finite(v)}


def _finite(v: Any) -> bool:
    try:
        return math.isfinite(float(v))
    except (TypeError, ValueError):
        return False


def default_tracking_uri(storage: Storage) -> str:
    """sqlite beside the artifacts on a local root; on an object-store root, in ./artifacts of this machine."""
    folder = Path("artifacts").resolve() if storage.remote else storage.local()
    return f"sqlite:///{folder / 'mlflow.db'}"


class Tracker:
    """Owns the MLflow runs of one pipeline invocation (driver side only)."""

    def __init__(self, storage: Storage, tracking_uri: str | None, experiment: str) -> None:
        from mlflow.tracking import MlflowClient

        self.uri = tracking_uri or default_tracking_uri(storage)
        if self.uri.startswith("sqlite:///"):
            self.local_dir = Path(self.uri[len("sqlite:///"):]).parent
            self.local_dir.mkdir(parents=True, exist_ok=True)
        else:
            self.local_dir = None
            _bounded_http_retries()
        self.client = MlflowClient(tracking_uri=self.uri)
        self.experiment_id = self._experiment(experiment)
        self.parent_id: str | None = None

    def _experiment(self, name: str) -> str:
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        location = (self.local_dir / "mlartifacts").as_uri() if self.local_dir else None
        return self.client.create_experiment(name, artifact_location=location)

    # ---- parent -------------------------------------------------------------------------------------------
    def start_parent(self, config: dict, tags: dict[str, str]) -> str:
        run = self.client.create_run(self.experiment_id, tags={"narvl_role": "pipeline", **tags},
                                     run_name=tags.get("mlflow.runName"))
        self.parent_id = run.info.run_id
        self.log_params(self.parent_id, config)
        return self.parent_id

    def finish_parent(self, status: str, metrics: dict[str, float] | None = None,
                      artifacts_dir: Path | None = None, tags: dict[str, str] | None = None) -> None:
        if self.parent_id is None:
            return
        if metrics:
            self.log_metrics(self.parent_id, [(None, time.time(), metrics)])
        for k, v in (tags or {}).items():
            self.client.set_tag(self.parent_id, k, v)
        if artifacts_dir is not None and Path(artifacts_dir).is_dir():
            self.client.log_artifacts(self.parent_id, str(artifacts_dir), artifact_path="report")
        self.client.set_terminated(self.parent_id, status=status)

    # ---- children -----------------------------------------------------------------------------------------
    def start_child(self, name: str, tags: dict[str, str]) -> str:
        assert self.parent_id is not None, "start_parent first"
        run = self.client.create_run(self.experiment_id, run_name=name,
                                     tags={"mlflow.parentRunId": self.parent_id, "narvl_role": "stage", **tags})
        return run.info.run_id

    def finish_child(self, run_id: str, stage_dir: Path | None, params: dict, status: str) -> None:
        """Log a finished (or failed) stage: its config, the metrics it logged, its outputs, then end the run."""
        try:
            self.log_params(run_id, params)
            if stage_dir is not None and Path(stage_dir).is_dir():
                self._log_stage_dir(run_id, Path(stage_dir))
        finally:
            self.client.set_terminated(run_id, status=status)

    def log_hit(self, name: str, tags: dict[str, str], params: dict, manifest: dict, stage_dir: Path) -> str:
        """A cache hit: a child run pointing at the run that produced the folder; its result metrics again."""
        tags = {**tags, "cache_hit": "true", "produced_by_run": str(manifest.get("mlflow_run_id") or "unknown")}
        run_id = self.start_child(name, tags)
        try:
            self.log_params(run_id, params)
            result = _result_metrics(stage_dir)
            if result:
                self.log_metrics(run_id, [(None, time.time(), result)])
        finally:
            self.client.set_terminated(run_id, status="FINISHED")
        return run_id

    def _log_stage_dir(self, run_id: str, stage_dir: Path) -> None:
        """The stage's result metrics and small output files (its curves were logged live)."""
        result = _result_metrics(stage_dir)
        if result:
            self.log_metrics(run_id, [(None, time.time(), result)])
        for f in [stage_dir / f for f in ARTIFACT_FILES] + sorted(stage_dir.glob("*.png")):
            if f.is_file() and f.stat().st_size <= MAX_ARTIFACT_BYTES:
                self.client.log_artifact(run_id, str(f))

    # ---- batched logging ----------------------------------------------------------------------------------
    def log_params(self, run_id: str, params: dict) -> None:
        from mlflow.entities import Param

        flat = [Param(k, _param_value(v)) for k, v in flatten(params).items()]
        for i in range(0, len(flat), PARAM_BATCH):
            self.client.log_batch(run_id, params=flat[i:i + PARAM_BATCH])

    def log_metrics(self, run_id: str, records: Iterable[tuple[int | None, float, dict[str, float]]]) -> None:
        from mlflow.entities import Metric

        batch = []
        for step, t, values in records:
            for k, v in values.items():
                if _finite(v):
                    batch.append(Metric(_metric_key(k), float(v), int(t * 1000), int(step or 0)))
        for i in range(0, len(batch), METRIC_BATCH):
            self.client.log_batch(run_id, metrics=batch[i:i + METRIC_BATCH])


def _param_value(v: Any) -> str:
    s = v if isinstance(v, str) else json.dumps(v)
    return s if len(s) <= PARAM_VALUE_LIMIT else s[:PARAM_VALUE_LIMIT - 3] + "..."


def _metric_key(k: str) -> str:
    # MLflow keys: alphanumerics, _ - . space / : only
    return "".join(c if c.isalnum() or c in "_-. /:" else "_" for c in k)


def _result_metrics(stage_dir: Path) -> dict[str, float]:
    """Numeric results of a finished stage: metrics.json ("value" under its metric name) and latency.json."""
    out: dict[str, float] = {}
    for name, prefix in (("metrics.json", ""), ("latency.json", "")):
        path = Path(stage_dir) / name
        if not path.exists():
            continue
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if not isinstance(data, dict):
            continue
        if name == "metrics.json" and isinstance(data.get("metric"), str) and _finite(data.get("value")):
            out[data["metric"]] = float(data["value"])
        body = data.get("metrics", data) if name == "metrics.json" else data
        if isinstance(body, dict):
            out.update({prefix + k: v for k, v in numeric_items(body).items()})
    return out


def _bounded_http_retries() -> None:
    """A tracking server that does not answer fails a call in seconds, not after MLflow's default ~4 minutes."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
