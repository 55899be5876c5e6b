"""Starting and joining Ray the same way everywhere."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

# what every worker of the pipeline gets in its environment (per-stage settings such as DS_ACCELERATOR are added
# by the executor to each task's own runtime environment)
WORKER_ENV = {"TOKENIZERS_PARALLELISM": "false"}
# The private Ray of this process: its temp folder (when init_ray made it) and its reaper (pipeline/reaper.py).
_private: dict[str, Any] = {}


def init_ray(address: str | None = None, num_cpus: int | None = None, temp_dir: Path | None = None,
             env_vars: dict[str, str] | None = None):
    """Join `address` (or RAY_ADDRESS) when given, else start a small private Ray on 127.0.0.1.

    The private Ray binds every port to the loopback interface (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0: Ray's
    single-machine mode) and runs without Ray's token authentication (RAY_AUTH_MODE=disabled, set for this process
    when unset); a reaper process ends its processes and removes its temp folder even when this process is killed
    (`shutdown_ray` does both at once). A cluster that is joined keeps its own settings: nothing is disabled.
    `env_vars` reach every worker (e.g. the storage credentials of `pipeline.storage.carried_env`). A SIGTERM
    handler of the caller survives `ray.init` (which installs its own).
    """
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if ray.is_initialized():
        return ray
    _end_reaper()  # a private Ray shut down without shutdown_ray
    runtime_env = {"env_vars": {**WORKER_ENV, **(env_vars or {})}}
    address = address or os.environ.get("RAY_ADDRESS")
    handler = signal.getsignal(signal.SIGTERM) if threading.current_thread() is threading.main_thread() else None
    if address:
        ray.init(address=address, log_to_driver=False, runtime_env=runtime_env)
        _restore_sigterm(handler)
        return ray
    from ray._private import ray_constants

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # Ray's single-machine mode: the node address is 127.0.0.1 and its servers listen there only (without it Ray
    # resolves 127.0.0.1 to the machine's address and listens on every interface)
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    # Ray's socket paths must stay short: keep its temp dir under /tmp.
    own = not (temp_dir and len(str(temp_dir)) < 60)
    tmp = tempfile.mkdtemp(prefix="narvl-ray-") if own else str(temp_dir)
    if own:
        _private["temp_dir"] = tmp
        _private["reaper"] = subprocess.Popen(
            [sys.executable, "-m", "pipeline.reaper", str(os.getpid()), tmp], stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
            cwd=Path(__file__).resolve().parent.parent)
    try:
        ray.init(
            num_cpus=num_cpus or os.cpu_count() or 2,
            object_store_memory=200 * 1024 * 1024,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            _temp_dir=tmp,
            log_to_driver=False,
            runtime_env=runtime_env,
        )
    except BaseException:
        shutdown_ray()
        raise
    _restore_sigterm(handler)
    return ray


def shutdown_ray() -> None:
    """Shut Ray down; for a private Ray also end what is left of it and remove its temp folder."""
    import ray

    ray.shutdown()
    _end_reaper()


def _end_reaper(timeout_s: float = 15.0) -> None:
    reaper, tmp = _private.pop("reaper", None), _private.pop("temp_dir", None)
    if reaper is not None:
        reaper.stdin.close()  # end of file: the reaper ends the Ray processes left and removes the temp folder
        try:
            reaper.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            reaper.kill()
            reaper.wait()
    if tmp is not None:
        shutil.rmtree(tmp, ignore_errors=True)


def _restore_sigterm(handler: Any) -> None:
    """ray.init replaces SIGTERM's handler with sys.exit; keep the caller's own (e.g. the pipeline's interrupt)."""
    if callable(handler):
        signal.signal(signal.SIGTERM, handler)
