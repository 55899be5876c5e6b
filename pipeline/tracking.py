"""MLflow tracking of a pipeline run, and the StageLog a stage receives.

The path from a stage to MLflow: the stage runs in a Ray task and logs through `FileStageLog`, which writes
only to its stage folder: `stage.log` (text), `stage_metrics.jsonl` (one line per `log.metrics` call or
artifact) and `progress.json` (the latest `log.progress`, polled by the driver for the live view). When the task
ends the driver, which owns every MLflow run, reads those files and logs them to the stage's child run in
batches. So only one process ever writes to the tracking store (the sqlite default is safe; on a cluster the
artifact root must be a shared filesystem anyway for the cache to work), and a stage works without MLflow.

Runs: one experiment per pipeline name; one parent run per invocation (tags git sha, dirty, profile, name);
one child run per node (tags mlflow.parentRunId, task, stage, node, cache_key, profile, cache_hit). A cache hit
is a child run tagged `cache_hit=true` and `produced_by_run=<the run id in the manifest>`.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pipeline.cache import CONFIG_FILE, LOG_FILE, MANIFEST, METRICS_LOG, PROGRESS_FILE
from stages.common import write_json_atomic

PARAM_VALUE_LIMIT = 500
PARAM_BATCH = 100
METRIC_BATCH = 1000
MAX_ARTIFACT_BYTES = 64 * 1024 * 1024
# Files of a stage folder worth logging as artifacts (checkpoints and shards stay in the cache).
ARTIFACT_FILES = (CONFIG_FILE, MANIFEST, LOG_FILE, "metrics.json", "latency.json", "predictions.parquet",
                  "curves.parquet")


class FileStageLog:
    """The StageLog (stages.common.StageLog) the pipeline gives a stage: files in the stage folder only."""

    def __init__(self, stage_dir: Path, progress_every_s: float = 0.5) -> None:
        self.dir = Path(stage_dir)
        self._text = open(self.dir / LOG_FILE, "a", buffering=1)  # noqa: SIM115 - closed in close()
        self._metrics = open(self.dir / METRICS_LOG, "a", buffering=1)  # noqa: SIM115
        self._progress_every = progress_every_s
        self._last_progress = 0.0

    def info(self, msg: str) -> None:
        self._text.write(f"{time.strftime('%H:%M:%S')} {msg}\n")

    def metrics(self, values: dict[str, float], step: int | None = None) -> None:
        clean = {k: float(v) for k, v in values.items() if _finite(v)}
        self._metrics.write(json.dumps({"t": time.time(), "step": step, "values": clean}) + "\n")
        self.info(f"step {step}: " + ", ".join(f"{k}={v:.4g}" for k, v in clean.items()))

    def artifact(self, path: Path) -> None:
        self._metrics.write(json.dumps({"t": time.time(), "artifact": str(Path(path).resolve())}) + "\n")

    def progress(self, step: int, total: int | None = None) -> None:
        now = time.time()
        if now - self._last_progress < self._progress_every and step != total:
            return
        self._last_progress = now
        write_json_atomic(self.dir / PROGRESS_FILE, {"step": step, "total": total, "t": now})

    def close(self) -> None:
        self._text.close()
        self._metrics.close()


def read_progress(stage_dir: Path) -> dict | None:
    try:
        return json.loads((Path(stage_dir) / PROGRESS_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def read_stage_metrics(stage_dir: Path) -> tuple[list[tuple[int | None, float, dict[str, float]]], list[Path]]:
    """(metric records (step, time, values), artifact paths) from a stage's stage_metrics.jsonl."""
    records, artifacts = [], []
    path = Path(stage_dir) / METRICS_LOG
    if not path.exists():
        return records, artifacts
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a crash
        if "artifact" in rec:
            artifacts.append(Path(rec["artifact"]))
        else:
            records.append((rec.get("step"), rec.get("t", time.time()), rec.get("values", {})))
    return records, artifacts


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


def default_tracking_uri(root: Path) -> str:
    return f"sqlite:///{Path(root).resolve() / 'mlflow.db'}"


class Tracker:
    """Owns the MLflow runs of one pipeline invocation (driver side only)."""

    def __init__(self, root: Path, tracking_uri: str | None, experiment: str) -> None:
        from mlflow.tracking import MlflowClient

        self.root = Path(root).resolve()
        self.uri = tracking_uri or default_tracking_uri(self.root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.client = MlflowClient(tracking_uri=self.uri)
        self.experiment_id = self._experiment(experiment)
        self.parent_id: str | None = None

    def _experiment(self, name: str) -> str:
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        location = (self.root / "mlartifacts").as_uri() if self.uri.startswith("sqlite:") else None
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
        records, artifacts = read_stage_metrics(stage_dir)
        result = _result_metrics(stage_dir)
        if result:
            records.append((None, time.time(), result))
        self.log_metrics(run_id, records)
        files = [stage_dir / f for f in ARTIFACT_FILES] + sorted(stage_dir.glob("*.png")) + artifacts
        seen = set()
        for f in files:
            # artifacts recorded in the scratch dir moved with the rename: map them into the final folder
            if not f.exists() and f.is_absolute():
                f = stage_dir / f.name
            if f in seen or not f.is_file() or f.stat().st_size > MAX_ARTIFACT_BYTES:
                continue
            seen.add(f)
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

