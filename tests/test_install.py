"""install.sh in a fresh clone with the system interpreter first on PATH (where that interpreter refuses pip
installs under PEP 668): it creates the project's .venv and the README's commands reach `narvl` and pytest
through it. Slow (a full install, 1.5-3 minutes): .ci/run runs it after the suite."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SYSTEM_PYTHON = Path("/usr/bin/python3")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]


@pytest.fixture(scope="module")
def fresh_clone(tmp_path_factory):
    if not SYSTEM_PYTHON.exists() or shutil.which("git") is None:
        pytest.skip("needs /usr/bin/python3 and git")
    clone = tmp_path_factory.mktemp("clone") / "narvl"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True, timeout=120)
    return clone


def _system_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHON", "NARVL_VENV", "PYTHONPATH")}
    env["PATH"] = "/usr/bin:/bin"  # the system interpreter first, as on a fresh Debian / Ubuntu machine
    return env


def test_install_with_the_system_python(fresh_clone):
    env = _system_env()
    refused = subprocess.run(["python3", "-m", "pip", "install", "--dry-run", "-q", "pyyaml"], env=env,
                             capture_output=True, text=True, timeout=120)
    if refused.returncode == 0:
        pytest.skip("this machine's system python3 accepts pip installs: the PEP 668 case does not arise")
    assert "externally-managed-environment" in refused.stderr or "No module named pip" in refused.stderr

    started = time.time()
    first = subprocess.run(["./install.sh", "--dev"], cwd=fresh_clone, env=env, capture_output=True, text=True,
                           timeout=1100)
    cold = time.time() - started
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
    venv = fresh_clone / ".venv"
    base = subprocess.run([str(venv / "bin" / "python"), "-c", "import sys; print(sys.base_prefix)"], env=env,
                          capture_output=True, text=True, timeout=60).stdout.strip()
    assert base == "/usr", base  # made from the system interpreter

    # the README's commands: `.venv/bin/narvl ...` and `.venv/bin/python -m pytest -q`
    help_ = subprocess.run([str(venv / "bin" / "narvl"), "--help"], cwd=fresh_clone, env=env, capture_output=True,
                           text=True, timeout=120)
    assert help_.returncode == 0 and "Usage: narvl" in help_.stdout, help_.stderr[-2000:]
    collected = subprocess.run([str(venv / "bin" / "python"), "-m", "pytest", "-q", "--collect-only"],
                               cwd=fresh_clone, env=env, capture_output=True, text=True, timeout=600)
    assert collected.returncode == 0 and " tests collected" in collected.stdout, collected.stdout[-3000:]
    # DeepSpeed's CPU communication op was prebuilt (no ~35 s compile in the first run)
    assert list((venv / "lib").glob("python3.*/site-packages/deepspeed/ops/comm/deepspeed_shm_comm_op*.so"))

    started = time.time()
    again = subprocess.run(["./install.sh", "--dev"], cwd=fresh_clone, env=env, capture_output=True, text=True,
                           timeout=600)
    warm = time.time() - started
    assert again.returncode == 0, again.stderr[-3000:]
    print(f"install.sh --dev with the system python: cold {cold:.0f} s, again {warm:.0f} s")


def test_install_rejects_bad_arguments_and_interpreters(tmp_path, fresh_clone):
    env = _system_env()
    bad = subprocess.run(["./install.sh", "--gpu"], cwd=fresh_clone, env=env, capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode == 2 and "unknown argument '--gpu'" in bad.stderr
    fake = tmp_path / "python3.9"
    # a Python 3.9 stand-in: fails the version check and reports 3.9.18
    fake.write_text('#!/bin/sh\ncase "$2" in *platform*) echo 3.9.18 ;; *) exit 1 ;; esac\n')
    fake.chmod(0o755)
    env.update(PYTHON=str(fake), NARVL_VENV=str(tmp_path / "venv"))
    old = subprocess.run(["./install.sh"], cwd=fresh_clone, env=env, capture_output=True, text=True, timeout=60)
    assert old.returncode == 1 and "is Python 3.9.18; NARVL needs 3.11 or 3.12" in old.stderr, old.stderr
    assert not (tmp_path / "venv").exists()
