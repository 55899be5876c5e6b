"""The container images (infra/docker/Dockerfile, infra/mlflow/Dockerfile), .dockerignore, the entrypoint and
the one-host docker-compose file, checked as far as a machine without a container runtime allows: the base
image's Python against the install, the pins against pyproject.toml, every COPY source present in the build
context and not ignored, a non-root user; the entrypoint run for real. Building and running the images is not
verified here (no container runtime): see README "Run on a cluster"."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
IMAGE = REPO / "infra" / "docker" / "Dockerfile"
MLFLOW_IMAGE = REPO / "infra" / "mlflow" / "Dockerfile"
ENTRYPOINT = REPO / "infra" / "docker" / "entrypoint.sh"
COMPOSE = REPO / "infra" / "mlflow" / "docker-compose.yml"

# The Python a base image's distribution installs under each package name (distribution facts: Rocky Linux 9's
# AppStream carries python3.11 beside its 3.9 default; Ubuntu 22.04 ships 3.10, 24.04 ships 3.12; Debian 12
# ships 3.11). The official python:X.Y images carry X.Y in their tag.
DISTRO_PYTHON = {
    "rockylinux9": {"python3": "3.9", "python3.11": "3.11", "python3.12": "3.12"},
    "ubi9": {"python3": "3.9", "python3.11": "3.11", "python3.12": "3.12"},
    "ubuntu20.04": {"python3": "3.8"},
    "ubuntu22.04": {"python3": "3.10"},
    "ubuntu24.04": {"python3": "3.12"},
    "bookworm": {"python3": "3.11"},
}


# ---- a small Dockerfile reader -------------------------------------------------------------------------------
@dataclass
class Dockerfile:
    path: Path
    instructions: list[tuple[str, str]] = field(default_factory=list)  # (INSTRUCTION, arguments)

    @classmethod
    def parse(cls, text: str, path: Path = Path("Dockerfile")) -> Dockerfile:
        out = cls(path)
        logical = ""
        for raw in text.splitlines():
            line = raw.rstrip()
            if not logical and (not line.strip() or line.lstrip().startswith("#")):
                continue
            if line.lstrip().startswith("#"):  # a comment inside a continued instruction
                continue
            if line.endswith("\\"):
                logical += line[:-1] + " "
                continue
            logical += line
            word, _, rest = logical.strip().partition(" ")
            out.instructions.append((word.upper(), rest.strip()))
            logical = ""
        return out

    def all(self, word: str) -> list[str]:
        return [args for w, args in self.instructions if w == word]

    def base_image(self) -> str:
        args = {}
        for w, a in self.instructions:
            if w == "ARG" and "=" in a:
                k, v = a.split("=", 1)
                args[k.strip()] = v.strip().strip('"')
            if w == "FROM":
                return re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), a.split()[0])
        raise ValueError(f"{self.path}: no FROM")


def dockerignore_patterns(text: str) -> list[tuple[bool, re.Pattern]]:
    pats = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pat = line.lstrip("!").strip("/")
        rx = ""
        i = 0
        while i < len(pat):
            if pat.startswith("**/", i):
                rx += "(?:.*/)?"
                i += 3
            elif pat.startswith("**", i):
                rx += ".*"
                i += 2
            elif pat[i] == "*":
                rx += "[^/]*"
                i += 1
            elif pat[i] == "?":
                rx += "[^/]"
                i += 1
            else:
                rx += re.escape(pat[i])
                i += 1
        pats.append((negate, re.compile(rx + "$")))
    return pats


def ignored(rel: str, patterns) -> bool:
    """Docker's rule: the last matching pattern wins; a pattern that matches a folder excludes what is in it."""
    parts = rel.strip("/").split("/")
    result = False
    for negate, rx in patterns:
        if any(rx.match("/".join(parts[:n])) for n in range(1, len(parts) + 1)):
            result = not negate
    return result


def check_image(df: Dockerfile, context: Path, dockerignore: str, pyproject: dict) -> list[str]:
    """Problems a build would hit (or a wrong image it would make) that can be seen without building."""
    where = df.path.name
    errors = []
    patterns = dockerignore_patterns(dockerignore)
    # every COPY source exists in the context and survives .dockerignore
    for args in df.all("COPY"):
        words = [w for w in shlex.split(args) if not w.startswith("--")]
        if any(w.startswith("--from") for w in shlex.split(args)):
            continue
        for src in words[:-1]:
            if not (context / src).exists():
                errors.append(f"{where}: COPY {src}: not in the build context")
            elif ignored(src, patterns):
                errors.append(f"{where}: COPY {src}: excluded by .dockerignore")
    # the Python that runs the project: the base's, or a distribution package installed by a RUN
    base = df.base_image()
    runs = " ".join(df.all("RUN"))
    m = re.match(r"(?:docker\.io/)?(?:library/)?python:(\d+\.\d+)", base)
    if m:
        version = m.group(1)
    else:
        distro = next((d for d in DISTRO_PYTHON if d in base), None)
        if distro is None:
            return errors + [f"{where}: FROM {base}: unknown base distribution (add it to DISTRO_PYTHON)"]
        interp = re.search(r"PYTHON=(python3(?:\.\d+)?)", runs)
        interp = interp.group(1) if interp else "python3"
        version = DISTRO_PYTHON[distro].get(interp)
        if version is None:
            errors.append(f"{where}: FROM {base}: the distribution has no {interp} package")
            return errors
        if interp != "python3" and not re.search(rf"(dnf|yum|apt-get) install[^&;]*\b{re.escape(interp)}\b", runs):
            errors.append(f"{where}: uses {interp} but no RUN installs the {interp} package")
    spec = pyproject["project"]["requires-python"]
    lo, hi = re.search(r">=\s*(\d+\.\d+)", spec).group(1), re.search(r"<\s*(\d+\.\d+)", spec).group(1)
    as_tuple = lambda v: tuple(map(int, v.split(".")))  # noqa: E731
    if not as_tuple(lo) <= as_tuple(version) < as_tuple(hi):
        errors.append(f"{where}: FROM {base} gives Python {version}; pyproject requires-python is {spec}")
    # the last USER is not root
    users = df.all("USER")
    if not users or users[-1].split(":")[0] in ("root", "0"):
        errors.append(f"{where}: the image runs as root (add a USER)")
    return errors


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _pin(name: str) -> str:
    for dep in _pyproject()["project"]["dependencies"]:
        m = re.match(rf"{name}(?:\[[^\]]*\])?==([\w.]+)", dep)
        if m:
            return m.group(1)
    raise AssertionError(f"{name} is not pinned in pyproject.toml")


# ---- the images ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", [IMAGE, MLFLOW_IMAGE], ids=["narvl", "mlflow"])
def test_image_is_buildable_as_far_as_checkable(path):
    df = Dockerfile.parse(path.read_text(), path)
    assert check_image(df, REPO, (REPO / ".dockerignore").read_text(), _pyproject()) == []


def test_narvl_image_installs_the_pinned_stack_with_cuda():
    df = Dockerfile.parse(IMAGE.read_text(), IMAGE)
    base = df.base_image()
    assert base.startswith("nvidia/cuda:12.") and "cudnn-devel" in base, base  # nvcc for DeepSpeed's ops
    args = dict(a.split("=", 1) for a in df.all("ARG") if "=" in a)
    cuda = re.match(r"nvidia/cuda:(\d+)\.(\d+)", base).groups()
    assert args["TORCH_INDEX"].endswith(f"/cu{cuda[0]}{cuda[1]}"), (args["TORCH_INDEX"], base)  # torch's CUDA = base's
    install = next(r for r in df.all("RUN") if "./install.sh" in r)
    assert "TORCH_INDEX=${TORCH_INDEX}" in install and "PYTHON=python3.11" in install
    # install.sh pins torch exactly as pyproject does, so the CUDA index resolves the same release
    assert f"torch=={_pin('torch')}" in (REPO / "install.sh").read_text()
    runs = " ".join(df.all("RUN"))
    assert "java-17-openjdk-headless" in runs and "curl" in runs  # METEOR; health checks
    env = " ".join(df.all("ENV"))
    assert "DS_ACCELERATOR" not in env, "DS_ACCELERATOR is decided at run time (entrypoint / cluster config)"
    assert "NARVL_VENV=/opt/venv" in env and "PATH=/opt/venv/bin:" in env
    entry = df.all("ENTRYPOINT")[-1]
    assert "/usr/local/bin/narvl-entrypoint" in entry
    assert any(a.split()[-1] == "/usr/local/bin/narvl-entrypoint" and "infra/docker/entrypoint.sh" in a
               for a in df.all("COPY"))
    assert os.access(ENTRYPOINT, os.X_OK)


def test_mlflow_image_matches_the_projects_mlflow():
    df = Dockerfile.parse(MLFLOW_IMAGE.read_text(), MLFLOW_IMAGE)
    args = dict(a.split("=", 1) for a in df.all("ARG") if "=" in a)
    assert args["MLFLOW_VERSION"] == _pin("mlflow")
    runs = " ".join(df.all("RUN"))
    assert '"mlflow[auth]==${MLFLOW_VERSION}"' in runs and "psycopg2-binary" in runs and "boto3" in runs
    assert any("curl -fs http://127.0.0.1:5000/health" in h for h in df.all("HEALTHCHECK"))


def test_dockerignore_keeps_state_and_secrets_out():
    patterns = dockerignore_patterns((REPO / ".dockerignore").read_text())
    for path in (".git/HEAD", ".venv/bin/python", "artifacts/mlflow.db", "mlflow.db", "mlruns/0/meta.yaml",
                 "data/coco/caption/train/000000.tar", "stages/__pycache__/x.pyc", "narvl.egg-info/PKG-INFO",
                 "infra/k8s/secrets.env", "infra/mlflow/.env", "tests/test_cache.py"):
        assert ignored(path, patterns), path
    for path in ("pyproject.toml", "README.md", "install.sh", "narvl_model/__init__.py", "stages/common.py",
                 "pipeline/cli.py", "configs/pipelines/smoke.yaml", "infra/docker/entrypoint.sh",
                 "infra/mlflow/server.sh"):
        assert not ignored(path, patterns), path


BROKEN = """\
# the infra/Dockerfile this project had before: each line below is a mistake a build (or the image) would hit
FROM nvidia/cuda:12.8.0-cudnn-devel-ubuntu24.04
RUN apt-get update && apt-get install -y python3-pip openjdk-17-jre-headless git
WORKDIR /opt/narvl
COPY . .
COPY infra/ray-cluster.yaml /opt/
RUN TORCH_INDEX=https://download.pytorch.org/whl/cu128 PYTHON=python3.11 ./install.sh
"""


def test_image_check_rejects_a_broken_dockerfile():
    df = Dockerfile.parse(BROKEN, Path("Dockerfile.broken"))
    errors = check_image(df, REPO, ".git\n", _pyproject())
    assert "Dockerfile.broken: COPY infra/ray-cluster.yaml: not in the build context" in errors
    assert "Dockerfile.broken: FROM nvidia/cuda:12.8.0-cudnn-devel-ubuntu24.04: the distribution has no " \
           "python3.11 package" in errors
    # Ubuntu 24.04's own python3 is 3.12 (allowed by pyproject) but the image would still run as root
    df = Dockerfile.parse(BROKEN.replace("PYTHON=python3.11 ", ""), Path("Dockerfile.broken"))
    assert check_image(df, REPO, ".git\n", _pyproject()) == [
        "Dockerfile.broken: COPY infra/ray-cluster.yaml: not in the build context",
        "Dockerfile.broken: the image runs as root (add a USER)"]
    # a COPY source that .dockerignore drops
    df = Dockerfile.parse("FROM python:3.11-slim\nCOPY tests/ tests/\nUSER app\n", Path("D"))
    assert check_image(df, REPO, "tests\n", _pyproject()) == ["D: COPY tests/: excluded by .dockerignore"]
    df = Dockerfile.parse("FROM python:3.13-slim\nUSER app\n", Path("D"))
    assert check_image(df, REPO, "", _pyproject()) == [
        "D: FROM python:3.13-slim gives Python 3.13; pyproject requires-python is >=3.11,<3.13"]


# ---- the entrypoint, run for real ----------------------------------------------------------------------------
def _run_entrypoint(tmp_path: Path, *, gpu: bool | None, env_accel: str | None = None, args=("env",)) -> str:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    smi = bin_dir / "nvidia-smi"
    smi.unlink(missing_ok=True)
    if gpu is not None:  # a stand-in for the driver's tool: lists one GPU, or fails as with no device
        body = 'echo "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)"' if gpu else 'echo "No devices were found"; exit 6'
        smi.write_text(f"#!/bin/sh\n{body}\n")
        smi.chmod(0o755)
    narvl = bin_dir / "narvl"
    narvl.write_text('#!/bin/sh\necho "narvl $*"\n')
    narvl.chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path), "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")}
    if env_accel:
        env["DS_ACCELERATOR"] = env_accel
    out = subprocess.run(["bash", str(ENTRYPOINT), *args], env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_entrypoint_decides_ds_accelerator_at_run_time(tmp_path):
    assert "DS_ACCELERATOR=cuda" in _run_entrypoint(tmp_path, gpu=True).splitlines()
    assert "DS_ACCELERATOR=cpu" in _run_entrypoint(tmp_path, gpu=False).splitlines()
    assert "DS_ACCELERATOR=cpu" in _run_entrypoint(tmp_path, gpu=None).splitlines()
    assert "DS_ACCELERATOR=cpu" in _run_entrypoint(tmp_path, gpu=True, env_accel="cpu").splitlines()  # caller wins
    assert (tmp_path / "ext").is_dir()
    assert _run_entrypoint(tmp_path, gpu=False, args=()).strip() == "narvl --help"  # the default command


# ---- docker-compose (MLflow + Postgres + MinIO) --------------------------------------------------------------
def test_compose_file_is_consistent():
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    assert {"postgres", "minio", "mlflow"} <= set(services)
    for name, svc in services.items():
        for dep in svc.get("depends_on", {}):
            assert dep in services, (name, dep)
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name}: port {port} published beyond localhost"
        for vol in svc.get("volumes", []):
            assert vol.split(":")[0] in compose.get("volumes", {}), (name, vol)
    build = services["mlflow"]["build"]
    context = (COMPOSE.parent / build["context"]).resolve()
    assert context == REPO and (context / build["dockerfile"]).resolve() == MLFLOW_IMAGE
    env = services["mlflow"]["environment"]
    assert env["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql+psycopg2://") and "@postgres:" in env[
        "MLFLOW_BACKEND_STORE_URI"]
    assert env["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://") and env["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    # every variable the file reads is in .env.example, and those it requires fail with a message naming .env
    used = set(re.findall(r"\$\{(\w+)", COMPOSE.read_text()))
    example = {line.split("=", 1)[0] for line in (COMPOSE.parent / ".env.example").read_text().splitlines()
               if "=" in line and not line.startswith("#")}
    assert used <= example, used - example
    for m in re.finditer(r"\$\{(\w+):\?([^}]*)\}", COMPOSE.read_text()):
        assert "infra/mlflow/.env" in m.group(2), m.group(0)


def test_readme_cluster_section_names_existing_files():
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Run on a cluster", 1)[1].split("\n## ", 1)[0]
    paths = set(re.findall(r"\b(infra/[\w./-]+\w)", section))
    assert {"infra/ray/aws.yaml", "infra/k8s", "infra/docker/Dockerfile", "infra/mlflow/server.sh"} <= paths
    for p in paths:  # a file the user makes from an .example counts as existing
        assert (REPO / p).exists() or (REPO / f"{p}.example").exists(), p
