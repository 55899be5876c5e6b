"""Shared fixtures: one session-scoped local Ray, environment for DeepSpeed on CPU, real-data location."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
REALDATA = REPO.parent / "shared" / "realdata"


@pytest.fixture(scope="session")
def realdata() -> Path:
    if not REALDATA.is_dir():
        pytest.skip(f"real-data samples not found at {REALDATA} (../shared/realdata beside the checkout)")
    return REALDATA


@pytest.fixture(scope="session")
def ray_session(tmp_path_factory):
    """One small local Ray for the whole test session (2 CPUs, no dashboard); shut down at the end."""
    import ray

    from pipeline.ray_utils import init_ray

    if not ray.is_initialized():
        init_ray(temp_dir=tmp_path_factory.mktemp("ray"))
    yield ray
    ray.shutdown()


@pytest.fixture
def one_thread():
    """Two cores shared by several jobs: one intra-op thread avoids oversubscription."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
