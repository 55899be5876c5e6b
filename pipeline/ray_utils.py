"""Starting and joining Ray the same way everywhere."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

# what every worker of the pipeline gets in its environment (per-stage settings such as DS_ACCELERATOR are added
# by the executor to each task's own runtime environment)
WORKER_ENV = {"TOKENIZERS_PARALLELISM": "false"}


def init_ray(address: str | None = None, num_cpus: int | None = None, temp_dir: Path | None = None,
             env_vars: dict[str, str] | None = None):
    """Join `address` (or RAY_ADDRESS) when given, else start a small private Ray on 127.0.0.1.

    Only the private Ray runs without Ray's token authentication (RAY_AUTH_MODE=disabled, set for this process
    when unset): it listens on the loopback interface only. A cluster that is joined keeps its own setting.
    `env_vars` reach every worker (e.g. the storage credentials of `pipeline.storage.carried_env`).
    """
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if ray.is_initialized():
        return ray
    runtime_env = {"env_vars": {**WORKER_ENV, **(env_vars or {})}}
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False, runtime_env=runtime_env)
        return ray
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # Ray's socket paths must stay short: keep its temp dir under /tmp.
    tmp = str(temp_dir) if temp_dir and len(str(temp_dir)) < 60 else tempfile.mkdtemp(prefix="narvl-ray-")
    ray.init(
        num_cpus=num_cpus or os.cpu_count() or 2,
        object_store_memory=200 * 1024 * 1024,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        _temp_dir=tmp,
        log_to_driver=False,
        runtime_env=runtime_env,
    )
    return ray



