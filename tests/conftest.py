"""Shared fixtures: one session-scoped local Ray, environment for DeepSpeed on CPU, real-data location."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# every Ray node the tests start (a local Ray, a multi-node cluster) resolves its address to 127.0.0.1
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
# Ray Train / Tune progress bars would replace builtins.print in this process (a test pickles print)
os.environ.setdefault("RAY_TQDM_PATCH_PRINT", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
REALDATA = REPO.parent / "shared" / "realdata"


@pytest.fixture(scope="session")
def realdata() -> Path:
    if not REALDATA.is_dir():
        pytest.skip(f"real-data samples not found at {REALDATA} (../shared/realdata beside the checkout)")
    return REALDATA


@pytest.fixture(scope="session")
def _ray_at_exit():
    yield
    from pipeline.ray_utils import shutdown_ray

    shutdown_ray()


@pytest.fixture(scope="module")
def ray_session(_ray_at_exit):
    """A small local Ray (2 CPUs, no dashboard, 127.0.0.1), started once and shared by the modules that need one;
    a module that needs its own cluster (test_cluster.py) shuts it down, and the next module starts it again."""
    import ray

    from pipeline.ray_utils import init_ray

    if not ray.is_initialized():
        init_ray()
    yield ray


@pytest.fixture
def one_thread():
    """Two cores shared by several jobs: one intra-op thread avoids oversubscription."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def s3_server():
    """An S3-compatible server (moto's, on 127.0.0.1) for a module; this process's AWS_* settings point at it
    while the module runs. Yields those settings."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield env
    server.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
