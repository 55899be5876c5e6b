"""infra/mlflow/server.sh: a real `mlflow server` (sqlite store, artifacts proxied to a local folder standing in
for the bucket, basic auth on) on 127.0.0.1; clients log through it with credentials and hold no artifacts.

The pipeline end to end against it (`narvl run --profile smoke --tasks caption --tracking-uri http://...`) is
marked slow, and so is the server on Postgres (once, when the system's PostgreSQL binaries are present):
.ci/run runs the slow infra tests after the suite.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
NARVL = [sys.executable, "-m", "pipeline"]  # the `narvl` command, this interpreter
SERVER = REPO / "infra" / "mlflow" / "server.sh"
USER, PASSWORD = "narvl-test", "correct-horse-battery-7"

pytestmark = pytest.mark.timeout(600)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _server_env(port: int, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_TRACKING_", "MLFLOW_AUTH_"))}
    env.update(MLFLOW_PORT=str(port), **extra)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # this interpreter's mlflow
    return env


class Server:
    def __init__(self, root: Path, port: int, env: dict[str, str]) -> None:
        self.root, self.port, self.env = root, port, env
        self.url = f"http://127.0.0.1:{port}"

    def start(self) -> None:
        proc = subprocess.run(["bash", str(SERVER), "start", str(self.root)], env=self.env, capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 0, proc.stdout + proc.stderr

    def stop(self) -> None:
        if (self.root / "server.pid").exists():
            subprocess.run(["bash", str(SERVER), "stop", str(self.root)], env=self.env, capture_output=True,
                           timeout=60)


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow-server")
    dest = tmp_path_factory.mktemp("bucket")  # stands in for s3://bucket/mlflow
    port = _free_port()
    env = _server_env(port, MLFLOW_ARTIFACTS_DESTINATION=str(dest), MLFLOW_AUTH_ADMIN_USERNAME=USER,
                      MLFLOW_AUTH_ADMIN_PASSWORD=PASSWORD)
    server = Server(root, port, env)
    server.start()
    server.dest = dest
    yield server
    server.stop()


def _client_env(url: str, credentials: bool) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_"))}
    env.update(MLFLOW_TRACKING_URI=url, MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="20")
    if credentials:
        env.update(MLFLOW_TRACKING_USERNAME=USER, MLFLOW_TRACKING_PASSWORD=PASSWORD)
    return env


LOG_RUN = textwrap.dedent("""
    import json, pathlib, mlflow
    pathlib.Path("out").mkdir()
    pathlib.Path("out/report.md").write_text("caption CIDEr 211\\n")
    mlflow.set_experiment("infra-test")
    with mlflow.start_run() as run:
        mlflow.log_metric("cider", 211.0)
        mlflow.log_artifact("out/report.md", artifact_path="report")
    print(json.dumps({"run_id": run.info.run_id, "artifact_uri": run.info.artifact_uri}))
""")


def test_client_logs_run_and_artifacts_through_the_server(auth_server, tmp_path):
    from mlflow.tracking import MlflowClient

    client_dir = tmp_path / "client"
    client_dir.mkdir()
    proc = subprocess.run([sys.executable, "-c", LOG_RUN], cwd=client_dir, env=_client_env(auth_server.url, True),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    # the server hands out a proxied artifact URI: the client never writes to the store itself
    assert out["artifact_uri"].startswith("mlflow-artifacts:"), out["artifact_uri"]
    landed = list(auth_server.dest.rglob("report.md"))
    assert len(landed) == 1 and landed[0].read_text() == "caption CIDEr 211\n"
    assert out["run_id"] in landed[0].parts
    # nothing but the client's own input file on the client's side (no mlruns/, mlartifacts/, mlflow.db)
    assert sorted(p.name for p in client_dir.iterdir()) == ["out"]
    assert not (auth_server.root / "mlartifacts").exists()  # the destination is the one configured, not a default

    os.environ.update(MLFLOW_TRACKING_USERNAME=USER, MLFLOW_TRACKING_PASSWORD=PASSWORD)
    try:
        client = MlflowClient(tracking_uri=auth_server.url)
        run = client.get_run(out["run_id"])
        assert run.data.metrics["cider"] == 211.0
        assert [a.path for a in client.list_artifacts(out["run_id"], "report")] == ["report/report.md"]
    finally:
        for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            os.environ.pop(k, None)


REFUSED = textwrap.dedent("""
    import sys, mlflow
    from mlflow.exceptions import MlflowException
    try:
        mlflow.MlflowClient().search_experiments()
    except MlflowException as e:
        print("REFUSED", e.get_http_status_code(), str(e)[:200]); sys.exit(0)
    print("ALLOWED"); sys.exit(1)
""")


def test_client_without_credentials_is_refused(auth_server, tmp_path):
    env = _client_env(auth_server.url, credentials=False)
    proc = subprocess.run([sys.executable, "-c", REFUSED], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and "REFUSED 401" in proc.stdout, proc.stdout + proc.stderr[-2000:]
    env.update(MLFLOW_TRACKING_USERNAME=USER, MLFLOW_TRACKING_PASSWORD="wrong")
    proc = subprocess.run([sys.executable, "-c", REFUSED], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and "REFUSED 401" in proc.stdout, proc.stdout + proc.stderr[-2000:]
    # the health check needs no credentials (what probes and server.sh use)
    assert subprocess.run(["bash", str(SERVER), "health", str(auth_server.root)], env=auth_server.env,
                          timeout=30).returncode == 0


def test_server_binds_loopback_by_default(auth_server):
    pid = (auth_server.root / "server.pid").read_text().strip()
    log = (auth_server.root / "server.log").read_text()
    assert f"127.0.0.1:{auth_server.port}" in log, log[-2000:]
    # and is not reachable on another local address of this host
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # TEST-NET: no packet is sent, it only picks the outgoing interface
            other = s.getsockname()[0]
        except OSError:
            other = None
    if other and not other.startswith("127."):
        with socket.socket() as c, pytest.raises(OSError):
            c.settimeout(2)
            c.connect((other, auth_server.port))
    assert pid.isdigit()


def test_refuses_public_bind_without_auth(tmp_path):
    env = _server_env(_free_port(), MLFLOW_HOST="0.0.0.0")
    proc = subprocess.run(["bash", str(SERVER), "start", str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2 and "without auth" in proc.stderr, proc.stderr
    assert not (tmp_path / "server.pid").exists()


def test_server_restarts_on_the_same_store(auth_server, monkeypatch):
    """stop, then start again on the same ROOT: the run is still there, the auth app's users too, and its CSRF
    key is reused rather than regenerated."""
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", USER)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    client = MlflowClient(tracking_uri=auth_server.url)
    exp = client.get_experiment_by_name("restart") or client.get_experiment(client.create_experiment("restart"))
    run = client.create_run(exp.experiment_id)
    client.log_metric(run.info.run_id, "loss", 0.5)
    client.set_terminated(run.info.run_id)
    key = (auth_server.root / "flask_secret_key").read_text()

    auth_server.stop()
    assert not (auth_server.root / "server.pid").exists()
    with socket.socket() as c, pytest.raises(OSError):
        c.connect(("127.0.0.1", auth_server.port))
    auth_server.start()
    assert (auth_server.root / "flask_secret_key").read_text() == key
    again = client.get_run(run.info.run_id)  # the same credentials still work: the user store persisted
    assert again.info.status == "FINISHED" and again.data.metrics["loss"] == 0.5


# ---- Postgres backend (once, where PostgreSQL's binaries are installed) -------------------------------------
def _pg_bin() -> Path | None:
    for cand in [shutil.which("initdb"), *sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))]:
        if cand:
            return Path(cand).resolve().parent
    return None


@pytest.fixture
def postgres():
    pg = _pg_bin()
    if pg is None:
        pytest.skip("PostgreSQL binaries (initdb, pg_ctl) not installed")
    pytest.importorskip("psycopg2")
    # postgres refuses to run as root: as root, run it as `nobody` in a folder that user can reach
    run_as = [] if os.geteuid() != 0 else ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
    base = Path(tempfile.mkdtemp(prefix="narvl-pg-"))
    data, sock = base / "pgdata", base / "sock"
    sock.mkdir()
    if run_as:
        for p in (base, sock):
            shutil.chown(p, "nobody", "nogroup")
    port = _free_port()
    subprocess.run([*run_as, str(pg / "initdb"), "-D", str(data), "-U", "mlflow", "--auth=trust"], check=True,
                   capture_output=True, timeout=120)
    subprocess.run([*run_as, str(pg / "pg_ctl"), "-D", str(data), "-l", str(base / "pg.log"), "-w", "-o",
                    f"-p {port} -k {sock} -c listen_addresses=127.0.0.1", "start"], check=True, capture_output=True,
                   timeout=120)
    try:
        for db in ("mlflow", "mlflow_auth"):  # as infra/k8s/postgres.yaml: runs, and the auth app's users
            subprocess.run([str(pg / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "mlflow", db],
                           check=True, capture_output=True, timeout=60)
        yield f"postgresql+psycopg2://mlflow@127.0.0.1:{port}/mlflow"
    finally:
        subprocess.run([*run_as, str(pg / "pg_ctl"), "-D", str(data), "-m", "fast", "stop"], capture_output=True,
                       timeout=120)
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.slow
def test_server_on_postgres(postgres, tmp_path):
    import psycopg2

    port = _free_port()
    dest = tmp_path / "bucket"
    server = Server(tmp_path / "root", port, _server_env(port, MLFLOW_BACKEND_STORE_URI=postgres,
                                                         MLFLOW_ARTIFACTS_DESTINATION=str(dest),
                                                         MLFLOW_AUTH_DATABASE_URI=postgres + "_auth",
                                                         MLFLOW_AUTH_ADMIN_USERNAME=USER,
                                                         MLFLOW_AUTH_ADMIN_PASSWORD=PASSWORD))
    server.start()
    try:
        proc = subprocess.run([sys.executable, "-c", LOG_RUN], cwd=tmp_path, env=_client_env(server.url, True),
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-3000:]
        run_id = json.loads(proc.stdout.strip().splitlines()[-1])["run_id"]
    finally:
        server.stop()
    # the run is a row in Postgres (not in a sqlite file), its artifact in the destination
    with psycopg2.connect(postgres.replace("+psycopg2", "")) as conn, conn.cursor() as cur:
        cur.execute("SELECT status FROM runs WHERE run_uuid = %s", (run_id,))
        assert cur.fetchone() == ("FINISHED",)
        cur.execute("SELECT value FROM metrics WHERE run_uuid = %s AND key = 'cider'", (run_id,))
        assert cur.fetchone() == (211.0,)
    with psycopg2.connect(postgres.replace("+psycopg2", "") + "_auth") as conn, conn.cursor() as cur:
        cur.execute("SELECT is_admin FROM users WHERE username = %s", (USER,))
        assert cur.fetchone() == (True,)
    assert not (server.root / "mlflow.db").exists() and not (server.root / "basic_auth.db").exists()
    assert [p.name for p in dest.rglob("report.md")] == ["report.md"]


# ---- the pipeline through the server (slow: .ci/run runs it) ---------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_smoke_pipeline_logs_through_the_server(auth_server, tmp_path):
    """`narvl run --profile smoke --tasks caption --tracking-uri http://...` against the auth server: the runs
    are on the server, the artifacts in its destination, none of MLflow's files in the client's artifact root.
    (The server stopping mid-run belongs to the pipeline's own tests.)"""
    root = tmp_path / "artifacts"
    env = _client_env(auth_server.url, credentials=True)
    env.pop("MLFLOW_TRACKING_URI")
    env.update(MLFLOW_HTTP_REQUEST_MAX_RETRIES="2", RAY_AUTH_MODE="disabled", DS_ACCELERATOR="cpu")
    started = time.time()
    proc = subprocess.run(NARVL + ["run", "--profile", "smoke", "--tasks", "caption",
                           "--root", str(root), "--tracking-uri", auth_server.url], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=840)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    print(f"smoke caption through the MLflow server: {time.time() - started:.0f} s")
    assert not (root / "mlflow.db").exists() and not (root / "mlartifacts").exists()

    os.environ.update(MLFLOW_TRACKING_USERNAME=USER, MLFLOW_TRACKING_PASSWORD=PASSWORD)
    try:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=auth_server.url)
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                  filter_string="tags.narvl_role = 'pipeline'")
        assert len(runs) == 1 and runs[0].info.status == "FINISHED"
        parent = runs[0]
        children = client.search_runs([parent.info.experiment_id],
                                      filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
        assert children and all(c.info.status == "FINISHED" for c in children)
        assert parent.info.artifact_uri.startswith("mlflow-artifacts:")
    finally:
        for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            os.environ.pop(k, None)
    reports = list(auth_server.dest.rglob("report.md"))
    assert any(parent.info.run_id in p.parts for p in reports), reports
