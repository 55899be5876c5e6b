"""`narvl submit`: the pipeline as a Ray job on a cluster (Ray's Job Submission API).

The job runs `narvl run <args>` on the cluster's head node as the driver, with this project as its `working_dir`
(Ray uploads it, leaving out what .gitignore names plus `.git`, artifacts and virtual environments) and these
environment variables:
- NARVL_GIT_SHA / NARVL_GIT_DIRTY: the code's version, taken here (the job's copy has no .git), so MLflow records
  the submitter's commit;
- the submitter's storage settings (pipeline.storage.carried_env), which the job's driver and its workers adopt
  where their node has none of its own.
"""

from __future__ import annotations

import os
import shlex
import time
import uuid
from typing import Any

from pipeline.cache import REPO, git_info
from pipeline.storage import carried_env

EXCLUDES = [".git", "artifacts", ".venv", "venv", "*.egg-info", "__pycache__", "mlflow.db", "mlartifacts"]
GIT_ENV = ("NARVL_GIT_SHA", "NARVL_GIT_DIRTY")


def client(address: str) -> Any:
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address)


def submit_run(address: str, run_args: list[str], *, entrypoint_num_cpus: float = 0) -> str:
    """Submit `narvl run <run_args>`; returns the job id."""
    git = git_info()
    env = {"NARVL_GIT_SHA": str(git["sha"]), "NARVL_GIT_DIRTY": str(git["dirty"]), **carried_env()}
    for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
        if os.environ.get(k):  # credentials for a tracking server given with --tracking-uri
            env[k] = os.environ[k]
    job_id = f"narvl-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    return client(address).submit_job(
        entrypoint=f"{os.environ.get('NARVL_JOB_PYTHON', 'python')} -m pipeline run " + shlex.join(run_args),
        submission_id=job_id,
        runtime_env={"working_dir": str(REPO), "excludes": EXCLUDES, "env_vars": env},
        entrypoint_num_cpus=entrypoint_num_cpus,
    )


def submitted_git() -> dict[str, Any] | None:
    """In a submitted job: the submitter's git sha and dirty flag; else None (take them from the checkout)."""
    sha = os.environ.get("NARVL_GIT_SHA")
    if not sha:
        return None
    dirty = os.environ.get("NARVL_GIT_DIRTY", "unknown")
    return {"sha": sha, "dirty": {"True": True, "False": False}.get(dirty, dirty)}


def follow(address: str, job_id: str, poll_s: float = 2.0) -> str:
    """Print the job's new log lines until it ends; its final status."""
    c = client(address)
    shown = 0
    while True:
        status = c.get_job_status(job_id).value
        logs = c.get_job_logs(job_id)
        if len(logs) > shown:
            print(logs[shown:], end="", flush=True)
            shown = len(logs)
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            return status
        time.sleep(poll_s)
