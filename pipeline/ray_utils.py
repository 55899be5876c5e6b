"""Starting and joining Ray the same way everywhere."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def init_local_ray(address: str | None = None, num_cpus: int | None = None, temp_dir: Path | None = None):
    """Join `address` (or RAY_ADDRESS) when given, else start a small local Ray sized to this machine."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if ray.is_initialized():
        return ray
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False)
        return ray
    # Ray's socket paths must stay short: keep its temp dir under /tmp.
    tmp = str(temp_dir) if temp_dir and len(str(temp_dir)) < 60 else tempfile.mkdtemp(prefix="narvl-ray-")
    ray.init(
        num_cpus=num_cpus or os.cpu_count() or 2,
        object_store_memory=200 * 1024 * 1024,
        include_dashboard=False,
        _temp_dir=tmp,
        log_to_driver=False,
        runtime_env={"env_vars": {"DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"),
                                  "TOKENIZERS_PARALLELISM": "false"}},
    )
    return ray
