"""MLflow tracking of a pipeline run: only the driver writes.

Stages never talk to MLflow. Their logs, progress and curves travel through Ray to the driver (the executor's
LogSink, pipeline/executor.py), which logs curves to the stage's child run while the stage runs; when a stage
ends, the driver logs its config, result metrics and small output files. So one process writes to the tracking
store (the sqlite default is safe) from any number of nodes, and a stage works without MLflow.

Runs: one experiment per pipeline name; one parent run per invocation (tags git sha, dirty, profile, name);
one child run per node (tags mlflow.parentRunId, task, stage, node, cache_key, profile, cache_hit). A cache hit
is a child run tagged `cache_hit=true` and `produced_by_run=<the run id in the manifest>`.

A tracking server lost mid-run stops nothing: a write that fails for want of the server (after MLflow's bounded
HTTP retries) goes to a spool, `<root>/runs/<stamp>-<run8>/tracking.jsonl`, and so does every write of the next
`RETRY_S` seconds without trying the server; then the next write tries again, replaying the spool first. A child
run created while the server is away gets an `offline-<uuid>` id, which the replay maps to the run it creates
(found again by its `narvl_run_key` tag, so a replay never creates a run twice; curve points already in MLflow are
not logged again). Each invocation keeps a record, `<root>/runs/.live/<parent run id>.json` (its driver's host,
pid and heartbeat, the tracking URI, the spool), until its runs are ended and its spool is empty. The next run on
the root, or `narvl sync`, replays the spools left by ended drivers and marks the runs of drivers that died
(SIGKILL, a lost node) KILLED.
"""

from __future__ import annotations

import json
import math
import os
import socket
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pipeline.cache import CONFIG_FILE, LOG_FILE, MANIFEST
from pipeline.reaper import process_start
from pipeline.storage import Storage

PARAM_VALUE_LIMIT = 500
PARAM_BATCH = 100
METRIC_BATCH = 1000
MAX_ARTIFACT_BYTES = 64 * 1024 * 1024
# Files of a stage folder worth logging as artifacts (checkpoints and shards stay in the cache).
ARTIFACT_FILES = (CONFIG_FILE, MANIFEST, LOG_FILE, "metrics.json", "latency.json", "predictions.parquet",
                  "curves.parquet")
SPOOL_FILE = "tracking.jsonl"
LIVE_DIR = "runs/.live"
OFFLINE_PREFIX = "offline-"
RUN_KEY_TAG = "narvl_run_key"
RETRY_S = 30.0  # while the server is away, writes go straight to the spool for this long between tries
HEARTBEAT_S = 15.0
STALE_AFTER_S = 120.0  # a driver on another host whose record is older than this is taken for dead
# MLflow error codes of a store that is there but refuses the request: a spool would not help
CLIENT_ERRORS = frozenset({"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "RESOURCE_ALREADY_EXISTS",
                           "BAD_REQUEST", "INVALID_STATE", "PERMISSION_DENIED", "UNAUTHENTICATED",
                           "FEATURE_DISABLED", "NOT_IMPLEMENTED"})


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


class TrackingError(RuntimeError):
    """The tracking store cannot be used as asked (no answer at start, a spool that cannot be read)."""


def run_rel(stamp: str, parent_run_id: str | None) -> str:
    """The run folder of one invocation, relative to the root (its report, and its spool while needed)."""
    return f"runs/{stamp}-{(parent_run_id or 'norun')[:8]}"


def unavailable(e: BaseException) -> bool:
    """True when a tracking call failed for want of the store (no answer, a server error), not for its request."""
    from mlflow.exceptions import MlflowException
    from requests import RequestException

    if isinstance(e, MlflowException):
        return e.error_code not in CLIENT_ERRORS
    return isinstance(e, OSError | RequestException)


class Spool:
    """Tracking events not delivered yet: one JSON object a line in a file on the root (rewritten whole on an
    object store, where nothing appends)."""

    def __init__(self, storage: Storage, rel: str) -> None:
        self.storage, self.rel = storage, rel

    def append(self, events: list[dict]) -> None:
        text = "".join(json.dumps(e, separators=(",", ":")) + "\n" for e in events)
        if self.storage.remote:
            self.storage.write_bytes(self.rel, (self.storage.read_bytes(self.rel) or b"") + text.encode())
            return
        path = self.storage.local(self.rel)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    def events(self) -> list[dict]:
        data = self.storage.read_bytes(self.rel)
        lines = data.decode(errors="replace").splitlines() if data else []
        out = []
        for n, line in enumerate(lines, 1):
            try:
                event = json.loads(line)
            except json.JSONDecodeError as e:
                if n == len(lines):
                    break  # the last line of a driver killed while writing it
                raise TrackingError(f"{self.storage.uri_of(self.rel)} line {n}: not a tracking event ({e})") from e
            if not isinstance(event, dict) or "op" not in event:
                raise TrackingError(f"{self.storage.uri_of(self.rel)} line {n}: not a tracking event (no 'op')")
            out.append(event)
        return out

    def reject(self, rejected: list[tuple[dict, str]]) -> None:
        """Keep the events the store refused (with its answer) beside the spool: nothing is dropped silently."""
        if rejected:
            Spool(self.storage, self.rel + ".rejected").append([{**ev, "error": err} for ev, err in rejected])

    def clear(self) -> None:
        self.storage.delete_file(self.rel)


class Tracker:
    """Owns the MLflow runs of one pipeline invocation (driver side only)."""

    def __init__(self, storage: Storage, tracking_uri: str | None, experiment: str,
                 retry_s: float | None = None) -> None:
        from mlflow.tracking import MlflowClient

        self.storage, self.retry_s = storage, RETRY_S if retry_s is None else retry_s
        self.uri = tracking_uri or default_tracking_uri(storage)
        if self.uri.startswith("sqlite:///"):
            self.local_dir = Path(self.uri[len("sqlite:///"):]).parent
            self.local_dir.mkdir(parents=True, exist_ok=True)
        else:
            self.local_dir = None
            _bounded_http_retries()
        self.client = MlflowClient(tracking_uri=self.uri)
        try:
            self.experiment_id = self._experiment(experiment)
        except Exception as e:
            if unavailable(e):
                raise TrackingError(f"the tracking store {self.uri} does not answer: {e}") from None
            raise
        self.parent_id: str | None = None
        self.spool: Spool | None = None
        self.offline_since: float | None = None  # the server stopped answering at this time
        self.spooled = 0  # events this driver kept in its spool
        self._last_try = 0.0
        self._ids: dict[str, str] = {}  # offline run id -> MLflow run id, once created
        self._steps: dict[str, dict[str, set[int]]] = {}  # run -> metric -> steps logged (curves are never doubled)
        self._lock = threading.RLock()
        self._record: dict[str, Any] | None = None
        self._stop = threading.Event()

    def _experiment(self, name: str) -> str:
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        location = (self.local_dir / "mlartifacts").as_uri() if self.local_dir else None
        return self.client.create_experiment(name, artifact_location=location)

    # ---- parent -------------------------------------------------------------------------------------------
    def start_parent(self, config: dict, tags: dict[str, str], stamp: str | None = None) -> str:
        """Create the parent run (the store must answer now), the spool and the driver's record on the root."""
        run = self.client.create_run(self.experiment_id, tags={"narvl_role": "pipeline", **tags},
                                     run_name=tags.get("mlflow.runName"))
        self.parent_id = run.info.run_id
        folder = run_rel(stamp, self.parent_id) if stamp else f"{LIVE_DIR}/{self.parent_id}"
        self.spool = Spool(self.storage, f"{folder}/{SPOOL_FILE}")
        self._record = {"parent_run_id": self.parent_id, "experiment_id": self.experiment_id,
                        "tracking_uri": self.uri, "spool": self.spool.rel, "host": socket.gethostname(),
                        "pid": os.getpid(), "pid_start": process_start(os.getpid()), "heartbeat": time.time(),
                        "closed": False}
        self._save_record()
        threading.Thread(target=self._beat, name="narvl-tracking-record", daemon=True).start()
        self.log_params(self.parent_id, config)
        return self.parent_id

    def finish_parent(self, status: str, metrics: dict[str, float] | None = None,
                      artifacts_dir: Path | None = None, tags: dict[str, str] | None = None) -> None:
        if self.parent_id is None:
            return
        try:
            if metrics:
                self.log_metrics(self.parent_id, [(None, time.time(), metrics)])
            for k, v in (tags or {}).items():
                self.set_tag(self.parent_id, k, v)
            if artifacts_dir is not None and Path(artifacts_dir).is_dir():
                self.log_artifacts(self.parent_id, Path(artifacts_dir), "report")
            self.terminate(self.parent_id, status)
        finally:
            self.close()

    def close(self) -> None:
        """End the record: one last delivery of the spool; a spool still pending stays for `narvl sync`."""
        self._stop.set()
        if self._record is None:
            return
        with self._lock:
            if self.offline_since is not None:
                self._reconnect(force=True)
            self._record.update(closed=True, heartbeat=time.time())
            if self.offline_since is None:
                self.storage.delete_file(self._record_rel())
            else:
                self._save_record()
                print(f"tracking: {self.uri} still does not answer; {self.spooled} events wait in "
                      f"{self.storage.uri_of(self.spool.rel)} for `narvl sync` (or the next run)", file=sys.stderr)
            self._record = None

    def _record_rel(self) -> str:
        return f"{LIVE_DIR}/{self.parent_id}.json"

    def _save_record(self) -> None:
        if self._record is not None:
            self.storage.write_json(self._record_rel(), self._record)

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            with self._lock:
                if self._record is None:
                    return
                self._record["heartbeat"] = time.time()
                try:
                    self._save_record()
                except Exception:  # noqa: BLE001 - the next beat tries again; staleness needs many misses
                    pass

    # ---- children -----------------------------------------------------------------------------------------
    def start_child(self, name: str, tags: dict[str, str]) -> str:
        """A child run of the parent: its MLflow id, or an offline id while the store does not answer."""
        assert self.parent_id is not None, "start_parent first"
        key = uuid.uuid4().hex
        run_id = self._write({"op": "create_run", "key": key, "run_name": name, "start_time": _ms(time.time()),
                              "tags": {"mlflow.parentRunId": self.parent_id, "narvl_role": "stage", **tags,
                                       RUN_KEY_TAG: key}})
        return run_id or OFFLINE_PREFIX + key

    def finish_child(self, run_id: str, stage_dir: Path | None, params: dict, status: str) -> None:
        """Log a finished (or failed) stage: its config, the metrics it logged, its outputs, then end the run."""
        try:
            self.log_params(run_id, params)
            if stage_dir is not None and Path(stage_dir).is_dir():
                self._log_stage_dir(run_id, Path(stage_dir))
        finally:
            self.terminate(run_id, status)

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
            self.terminate(run_id, "FINISHED")
        return run_id

    def _log_stage_dir(self, run_id: str, stage_dir: Path) -> None:
        """The stage's result metrics, the points of its curves not logged live (a training resumed from an
        earlier invocation's checkpoint logged only the steps after it) and its small output files."""
        result = _result_metrics(stage_dir)
        if result:
            self.log_metrics(run_id, [(None, time.time(), result)])
        curves = _curve_records(stage_dir / "curves.parquet")
        if curves:
            self.log_metrics(run_id, curves)
        for f in [stage_dir / f for f in ARTIFACT_FILES] + sorted(stage_dir.glob("*.png")):
            if f.is_file() and f.stat().st_size <= MAX_ARTIFACT_BYTES:
                self.log_artifact(run_id, f)

    # ---- writes: through the spool when the store does not answer --------------------------------------------
    def log_params(self, run_id: str, params: dict) -> None:
        flat = [[k, _param_value(v)] for k, v in flatten(params).items()]
        for i in range(0, len(flat), PARAM_BATCH):
            self._write({"op": "log_batch", "run": run_id, "params": flat[i:i + PARAM_BATCH]})

    def log_metrics(self, run_id: str, records: Iterable[tuple[int | None, float, dict[str, float]]]) -> None:
        """Metric points; a curve point (a step) already logged to the run by this driver is not logged again (a
        training that resumed from a checkpoint sends the steps after it once more)."""
        batch = []
        with self._lock:
            seen = self._steps.setdefault(run_id, {})
            for step, t, values in records:
                for k, v in values.items():
                    if not _finite(v):
                        continue
                    key = _metric_key(k)
                    if step is not None:
                        if int(step) in seen.setdefault(key, set()):
                            continue
                        seen[key].add(int(step))
                    batch.append([key, float(v), _ms(t), int(step or 0)])
        for i in range(0, len(batch), METRIC_BATCH):
            self._write({"op": "log_batch", "run": run_id, "metrics": batch[i:i + METRIC_BATCH]})

    def set_tag(self, run_id: str, key: str, value: str) -> None:
        self._write({"op": "log_batch", "run": run_id, "tags": [[key, str(value)[:5000]]]})

    def terminate(self, run_id: str, status: str) -> None:
        self._write({"op": "set_terminated", "run": run_id, "status": status, "end_time": _ms(time.time())})

    def log_artifact(self, run_id: str, path: Path, artifact_path: str | None = None) -> None:
        self._write({"op": "log_artifact", "run": run_id, "path": str(Path(path).resolve()),
                     "artifact_path": artifact_path})

    def log_artifacts(self, run_id: str, folder: Path, artifact_path: str | None = None) -> None:
        self._write({"op": "log_artifacts", "run": run_id, "path": str(Path(folder).resolve()),
                     "artifact_path": artifact_path})

    def _write(self, event: dict) -> str | None:
        """Deliver one event, or keep it in the spool when the store does not answer (see the module docstring)."""
        with self._lock:
            if self.offline_since is not None and not self._reconnect():
                self._keep(event)
                return None
            try:
                return apply_event(self.client, self.experiment_id, event, self._ids)
            except Exception as e:
                if self.spool is None or not unavailable(e):
                    raise
                self.offline_since = self._last_try = time.time()
                print(f"tracking: {self.uri} does not answer ({_short(e)}); the run goes on and keeps its tracking "
                      f"events in {self.storage.uri_of(self.spool.rel)}, trying the server every "
                      f"{self.retry_s:g} s", file=sys.stderr)
                self._keep(event)
                return None

    def _keep(self, event: dict) -> None:
        assert self.spool is not None
        self.spool.append([event])
        self.spooled += 1

    def _reconnect(self, force: bool = False) -> bool:
        """Try the store again (at most every `retry_s`): replay the spool; True when it is delivered."""
        if not force and time.time() - self._last_try < self.retry_s:
            return False
        self._last_try = time.time()
        assert self.spool is not None
        try:
            events = self.spool.events()
            _, rejected = replay(self.client, self.experiment_id, events, self._ids, artifact_dirs(self.storage))
        except Exception as e:
            if unavailable(e):
                return False
            raise
        self.spool.reject(rejected)
        self.spool.clear()
        print(f"tracking: {self.uri} answers again; {len(events)} kept events delivered", file=sys.stderr)
        self.offline_since = None
        return True


# ---- delivering events (live, or from a spool) -------------------------------------------------------------
def apply_event(client: Any, experiment_id: str, event: dict, ids: dict[str, str],
                history: dict | None = None, allowed: tuple[Path, ...] | None = None) -> str | None:
    """Send one event to MLflow; returns the run id of a `create_run`. `history` (a replay): a run that exists
    already is found again, and metric points already logged are left out. `allowed`: the folders whose files an
    artifact event may log (a replayed spool is read from the root)."""
    from mlflow.entities import Metric, Param, RunTag

    op = event["op"]
    if op == "create_run":
        offline = OFFLINE_PREFIX + event["key"]
        if history is not None:
            found = _find_run(client, experiment_id, event["key"])
            if found:
                ids[offline] = found
                return found
        tags = {k: ids.get(v, v) for k, v in event["tags"].items()}
        run = client.create_run(experiment_id, start_time=event["start_time"], tags=tags,
                                run_name=event.get("run_name"))
        ids[offline] = run.info.run_id
        return run.info.run_id
    run_id = _resolve(client, experiment_id, event["run"], ids)
    if op == "log_batch":
        metrics = [Metric(k, v, ts, step) for k, v, ts, step in event.get("metrics", [])]
        if history is not None and metrics:
            metrics = [m for m in metrics if (m.step, m.timestamp) not in _history(client, run_id, m.key, history)]
        params = [Param(k, v) for k, v in event.get("params", [])]
        tags = [RunTag(k, ids.get(v, v)) for k, v in event.get("tags", [])]
        if metrics or params or tags:
            client.log_batch(run_id, metrics=metrics, params=params, tags=tags)
    elif op == "set_terminated":
        client.set_terminated(run_id, status=event["status"], end_time=event.get("end_time"))
    elif op in ("log_artifact", "log_artifacts"):
        path = Path(event["path"]).resolve()
        if allowed is not None and not any(path.is_relative_to(a) for a in allowed):
            raise TrackingError(f"{path} is outside the folders a spool may log ({', '.join(map(str, allowed))})")
        if not path.exists():
            raise TrackingError(f"{path} is no longer there")
        if op == "log_artifact":
            client.log_artifact(run_id, str(path), artifact_path=event.get("artifact_path"))
        else:
            client.log_artifacts(run_id, str(path), artifact_path=event.get("artifact_path"))
    else:
        raise TrackingError(f"unknown tracking event {op!r}")
    return None


def replay(client: Any, experiment_id: str, events: list[dict], ids: dict[str, str],
           allowed: tuple[Path, ...], parent: str | None = None) -> tuple[int, list[tuple[dict, str]]]:
    """Deliver kept events in order, each at most once in effect (a replay may run again after a partial one).
    `parent`: the events may only touch that run and its children. Returns (delivered, [(event, why) refused]);
    raises when the store does not answer."""
    history: dict = {}
    rejected = []
    family: dict[str, bool] = {}
    for event in events:
        try:
            if parent is not None:
                _check_family(client, event, parent, family)
            apply_event(client, experiment_id, event, ids, history, allowed)
        except Exception as e:
            if unavailable(e):
                raise
            rejected.append((event, _short(e)))
    return len(events) - len(rejected), rejected


def _check_family(client: Any, event: dict, parent: str, family: dict[str, bool]) -> None:
    """TrackingError unless the event creates or touches `parent` or a run below it (a sweep's trials have runs
    of their own)."""
    if event["op"] == "create_run":
        ok = _in_family(client, str(event.get("tags", {}).get("mlflow.parentRunId")), parent, family)
    else:
        ok = _in_family(client, str(event.get("run")), parent, family)
    if not ok:
        raise TrackingError(f"a {event['op']} event outside the runs of pipeline run {parent}")


def _in_family(client: Any, run_id: str, parent: str, family: dict[str, bool], depth: int = 3) -> bool:
    if run_id == parent or run_id.startswith(OFFLINE_PREFIX):
        return True
    if run_id not in family:
        up = client.get_run(run_id).data.tags.get("mlflow.parentRunId") if depth else None
        family[run_id] = bool(up) and _in_family(client, str(up), parent, family, depth - 1)
    return family[run_id]


def artifact_dirs(storage: Storage) -> tuple[Path, ...]:
    """Where the files a spool logs as artifacts may be: the root (local), this machine's ./artifacts (the report
    of an object-store root) and the local views of an object-store root's stage folders."""
    dirs = [Path("artifacts").resolve()] + ([] if storage.remote else [storage.local().resolve()])
    return (*dirs, *sorted(Path(tempfile.gettempdir()).resolve().glob("narvl-view-*")))


def _find_run(client: Any, experiment_id: str, key: str) -> str | None:
    runs = client.search_runs([experiment_id], filter_string=f"tags.{RUN_KEY_TAG} = '{key}'", max_results=1)
    return runs[0].info.run_id if runs else None


def _resolve(client: Any, experiment_id: str, run_id: str, ids: dict[str, str]) -> str:
    if not run_id.startswith(OFFLINE_PREFIX):
        return run_id
    if run_id not in ids:
        found = _find_run(client, experiment_id, run_id[len(OFFLINE_PREFIX):])
        if found is None:
            raise TrackingError(f"run {run_id} was never created (its create_run event is missing)")
        ids[run_id] = found
    return ids[run_id]


def _history(client: Any, run_id: str, key: str, history: dict) -> set[tuple[int, int]]:
    if (run_id, key) not in history:
        history[(run_id, key)] = {(m.step, m.timestamp) for m in client.get_metric_history(run_id, key)}
    return history[(run_id, key)]


# ---- runs of ended drivers: `narvl sync`, and the start of every run --------------------------------------
def driver_alive(record: dict) -> bool:
    """Whether the driver of a record still runs: its pid (and start time) on this host, else a fresh heartbeat."""
    if record.get("host") == socket.gethostname():
        pid = record.get("pid")
        start = process_start(pid) if isinstance(pid, int) else None
        return start is not None and start == record.get("pid_start")
    return time.time() - float(record.get("heartbeat") or 0) < STALE_AFTER_S


def sync_root(storage: Storage, tracking_uri: str | None = None) -> dict[str, Any]:
    """Replay the spools that ended drivers left on the root and mark the runs of drivers that died KILLED.

    Each record under `runs/.live/` of a driver that is gone (or that ended with a pending spool) is taken in
    turn, under a lease so that two syncs never replay one spool together. Only records of `tracking_uri` (default:
    the root's own store) are synced: a record is a file anyone who can write to the root could have written, so
    it never chooses the server (and the credentials) events go to, and the files a spool may log as artifacts
    are those under the root or this machine's ./artifacts. Returns counts, the stores that did not answer and
    the other stores records name.
    """
    from mlflow.tracking import MlflowClient

    from pipeline.lease import Leases

    uri = tracking_uri or default_tracking_uri(storage)
    out: dict[str, Any] = {"records": 0, "replayed": 0, "rejected": 0, "killed": 0, "live": 0, "unreachable": [],
                           "other_stores": []}
    down: set[str] = set()
    leases = Leases(storage)
    try:
        for name in list(storage.list_files(LIVE_DIR)):
            if "/" in name or not name.endswith(".json"):
                continue
            rel = f"{LIVE_DIR}/{name}"
            record = storage.read_json(rel)
            if not isinstance(record, dict) or "parent_run_id" not in record:
                continue
            if not record.get("closed") and driver_alive(record):
                out["live"] += 1
                continue
            if record.get("tracking_uri") != uri:
                out["other_stores"] = sorted({*out["other_stores"], str(record.get("tracking_uri"))})
                continue
            spool_rel = str(record.get("spool") or "")
            if not (spool_rel.startswith("runs/") and spool_rel.endswith(SPOOL_FILE) and ".." not in spool_rel):
                raise TrackingError(f"{storage.uri_of(rel)}: spool {spool_rel!r} is not a run folder's {SPOOL_FILE}")
            if uri in down or not leases.acquire(f"{rel}.sync"):
                continue
            try:
                if not uri.startswith("sqlite:"):
                    _bounded_http_retries()
                client = MlflowClient(tracking_uri=uri)
                spool = Spool(storage, spool_rel)
                experiment = str(record["experiment_id"])
                done, rejected = replay(client, experiment, spool.events(), {}, artifact_dirs(storage),
                                        parent=str(record["parent_run_id"]))
                killed = 0 if record.get("closed") else mark_killed(client, experiment, record["parent_run_id"])
                spool.reject(rejected)
                spool.clear()
                storage.delete_file(rel)
            except Exception as e:
                if not unavailable(e):
                    raise
                down.add(uri)
                out["unreachable"].append(f"{uri} ({_short(e)})")
                continue
            finally:
                leases.release(f"{rel}.sync")
            out["records"] += 1
            out["replayed"] += done
            out["rejected"] += len(rejected)
            out["killed"] += killed
    finally:
        leases.release_all()
    return out


def mark_killed(client: Any, experiment_id: str, parent_run_id: str) -> int:
    """End the parent run of a dead driver and its runs (a sweep's trials' runs too) still RUNNING as KILLED."""
    n = 0
    if client.get_run(parent_run_id).info.status == "RUNNING":
        client.set_terminated(parent_run_id, status="KILLED")
        n += 1
    parents = [parent_run_id]
    while parents:
        runs = client.search_runs([experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parents.pop()}'",
                                  max_results=50000)
        for run in runs:
            if run.info.status == "RUNNING":
                client.set_terminated(run.info.run_id, status="KILLED")
                n += 1
            if run.data.tags.get("narvl_role") == "trial":
                parents.append(run.info.run_id)
    return n


def _curve_records(path: Path) -> list[tuple[int, float, dict[str, float]]]:
    """The points of a stage's curves.parquet as metric records (step, time, values)."""
    if not path.is_file():
        return []
    import pyarrow.parquet as pq

    now = time.time()
    return [(int(row.pop("step")), now, {k: v for k, v in row.items() if _finite(v)})
            for row in pq.read_table(path).to_pylist() if isinstance(row.get("step"), int)]


def _ms(t: float) -> int:
    return int(t * 1000)


def _short(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}"
    return text if len(text) <= 300 else text[:297] + "..."

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
