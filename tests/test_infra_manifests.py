"""infra/k8s and infra/ray validated against the real schemas: the KubeRay CRDs (../shared/cluster-schemas, v1
openAPIV3Schema), the installed Ray's own ray/autoscaler/ray-schema.json, and each Kubernetes core object's
required fields; plus the project's own rules (GPU requests = limits, dashboards on localhost, token auth, the
shared volume, secrets that exist). Each validator is shown to reject a broken manifest."""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

jsonschema = pytest.importorskip("jsonschema")

REPO = Path(__file__).resolve().parent.parent
NARVL = [sys.executable, "-m", "pipeline"]  # the `narvl` command, this interpreter
K8S = REPO / "infra" / "k8s"
RAY = REPO / "infra" / "ray"
# ../shared/cluster-schemas beside the checkout (or beside a folder above it, for git worktrees)
SCHEMAS = next((p / "shared" / "cluster-schemas" / "kuberay" for p in REPO.parents
                if (p / "shared" / "cluster-schemas" / "kuberay").is_dir()),
               REPO.parent / "shared" / "cluster-schemas" / "kuberay")
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}


# ---- validators ----------------------------------------------------------------------------------------------
def _strip_k8s_extensions(node):
    if isinstance(node, dict):
        return {k: _strip_k8s_extensions(v) for k, v in node.items() if not k.startswith("x-kubernetes")}
    if isinstance(node, list):
        return [_strip_k8s_extensions(v) for v in node]
    return node


_CRD_CACHE: dict[str, dict] = {}


def crd_schema(kind: str) -> dict:
    if kind not in _CRD_CACHE:
        path = SCHEMAS / CRD_FILES[kind]
        if not path.exists():
            pytest.skip(f"KubeRay CRDs not found at {SCHEMAS} (../shared/cluster-schemas beside the checkout)")
        crd = yaml.safe_load(path.read_text())
        version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
        _CRD_CACHE[kind] = _strip_k8s_extensions(version["schema"]["openAPIV3Schema"])
    return _CRD_CACHE[kind]


# Required fields of the Kubernetes core kinds used here (from the API reference: the fields without which
# the API server rejects the object), checked as paths; "[]" means every element of a list.
CORE_REQUIRED = {
    ("v1", "Namespace"): ["metadata.name"],
    ("v1", "ConfigMap"): ["metadata.name"],
    ("v1", "Secret"): ["metadata.name"],
    ("v1", "Service"): ["metadata.name", "spec.ports", "spec.ports[].port"],
    ("v1", "PersistentVolumeClaim"): ["metadata.name", "spec.accessModes", "spec.resources.requests.storage"],
    ("apps/v1", "Deployment"): ["metadata.name", "spec.selector", "spec.template", "spec.template.spec.containers",
                                "spec.template.spec.containers[].name", "spec.template.spec.containers[].image"],
    ("apps/v1", "StatefulSet"): ["metadata.name", "spec.selector", "spec.serviceName", "spec.template",
                                 "spec.template.spec.containers", "spec.template.spec.containers[].name",
                                 "spec.template.spec.containers[].image"],
}


def _lookup(obj, path: str) -> list:
    """Values at a dotted path; a "[]" segment fans out over a list. Missing -> empty list."""
    values = [obj]
    for part in path.split("."):
        many = part.endswith("[]")
        key = part[:-2] if many else part
        nxt = []
        for v in values:
            if isinstance(v, dict) and key in v and v[key] not in (None, "", [], {}):
                if many:
                    nxt.extend(v[key] if isinstance(v[key], list) else [])
                else:
                    nxt.append(v[key])
        values = nxt
    return values


def _pod_templates(obj: dict) -> list[tuple[str, dict]]:
    kind, spec = obj["kind"], obj.get("spec", {})
    if kind == "RayJob":
        spec = spec.get("rayClusterSpec", {})
    if kind in ("RayCluster", "RayJob"):
        out = [("head", spec.get("headGroupSpec", {}).get("template", {}))]
        out += [(g.get("groupName", "?"), g.get("template", {})) for g in spec.get("workerGroupSpecs", [])]
        return out
    if kind in ("Deployment", "StatefulSet"):
        return [(obj["metadata"]["name"], spec.get("template", {}))]
    return []


def validate(obj: dict, where: str) -> list[str]:
    """Every problem found in one manifest, each naming the file, the object and the field."""
    name = f"{where}: {obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
    errors = []
    kind = obj.get("kind")
    if kind in CRD_FILES:
        validator = jsonschema.Draft7Validator(crd_schema(kind))
        for e in validator.iter_errors(obj):
            errors.append(f"{name}: {'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}")
    elif (obj.get("apiVersion"), kind) in CORE_REQUIRED:
        for path in CORE_REQUIRED[(obj["apiVersion"], kind)]:
            if not _lookup(obj, path):
                errors.append(f"{name}: required field {path} is missing")
    else:
        errors.append(f"{name}: unexpected kind {obj.get('apiVersion')}/{kind}")
    # project rules on every pod template
    for group, template in _pod_templates(obj):
        for c in template.get("spec", {}).get("containers", []) or []:
            res = c.get("resources", {})
            req, lim = res.get("requests", {}), res.get("limits", {})
            gpu_group = kind in CRD_FILES and group != "head"  # every Ray worker group here is a GPU group
            if gpu_group or "nvidia.com/gpu" in req or "nvidia.com/gpu" in lim:
                if str(req.get("nvidia.com/gpu")) != str(lim.get("nvidia.com/gpu")) or "nvidia.com/gpu" not in lim:
                    errors.append(f"{name}: group {group} container {c.get('name')}: a GPU worker needs "
                                  f"nvidia.com/gpu in both requests and limits, equal (got {req}, {lim})")
                tol = template.get("spec", {}).get("tolerations", [])
                if not any(t.get("key") == "nvidia.com/gpu" for t in tol):
                    errors.append(f"{name}: group {group}: GPU pods need a toleration for nvidia.com/gpu")
    return errors


def load_manifests(folder: Path) -> list[tuple[str, dict]]:
    out = []
    for path in sorted(folder.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                out.append((path.name, doc))
    return out


# ---- KubeRay and Kubernetes ---------------------------------------------------------------------------------
def test_every_manifest_is_valid():
    manifests = load_manifests(K8S)
    kinds = {doc["kind"] for _, doc in manifests}
    assert {"RayCluster", "RayJob", "Deployment", "Service", "StatefulSet", "PersistentVolumeClaim"} <= kinds
    errors = [e for where, doc in manifests for e in validate(doc, where)]
    assert errors == []


def test_kustomization_lists_existing_files_and_renders():
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    for res in kust["resources"]:
        assert (K8S / res).is_file(), res
    listed = set(kust["resources"]) | {"rayjob.yaml"}  # the RayJob is applied on its own
    assert listed == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (for its built-in kustomize) not installed")
    work = Path(os.environ.get("TMPDIR", "/tmp")) / f"narvl-kustomize-{os.getpid()}"
    shutil.copytree(K8S, work)
    try:
        shutil.copy(work / "secrets.env.example", work / "secrets.env")
        out = subprocess.run([kubectl, "kustomize", str(work)], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
    finally:
        shutil.rmtree(work)
    rendered = [d for d in yaml.safe_load_all(out.stdout) if d]
    assert all(d["metadata"].get("namespace") == "narvl" for d in rendered if d["kind"] != "Namespace")
    secret = next(d for d in rendered if d["kind"] == "Secret")
    assert secret["metadata"]["name"] == "narvl-secrets"  # no hash suffix: the CRDs refer to it by name
    errors = [e for d in rendered for e in validate(d, "kustomize output")]
    assert errors == []


def _secret_refs(node) -> set[tuple[str, str]]:
    refs = set()
    if isinstance(node, dict):
        if "secretKeyRef" in node:
            refs.add((node["secretKeyRef"]["name"], node["secretKeyRef"]["key"]))
        for v in node.values():
            refs |= _secret_refs(v)
    elif isinstance(node, list):
        for v in node:
            refs |= _secret_refs(v)
    return refs


def test_every_secret_reference_is_provided():
    keys = {line.split("=", 1)[0] for line in (K8S / "secrets.env.example").read_text().splitlines()
            if line.strip() and not line.startswith("#")}
    refs = set().union(*(_secret_refs(doc) for _, doc in load_manifests(K8S)))
    assert refs, "the manifests take their credentials from the Secret"
    assert {name for name, _ in refs} == {"narvl-secrets"}
    assert {key for _, key in refs} <= keys, {key for _, key in refs} - keys


def _docs(name: str) -> dict:
    return next(doc for where, doc in load_manifests(K8S) if where == name)


def test_rayjob_runs_the_paper_recipe_on_the_raycluster_spec():
    cluster, job = _docs("raycluster.yaml"), _docs("rayjob.yaml")
    assert job["spec"]["rayClusterSpec"] == cluster["spec"], "rayjob.yaml's rayClusterSpec drifted from raycluster.yaml"
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["activeDeadlineSeconds"] > 0
    assert yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["narvl", "run"]
    # the entrypoint's config and overrides resolve with the real CLI (the image's /opt/narvl is this checkout)
    args = [a.replace("/opt/narvl/", f"{REPO}/") for a in argv[2:]]
    keep, i = [], 0
    while i < len(args):  # `config show` takes --config and the overrides; drop run-only options
        if args[i] in ("--address", "--root", "--tracking-uri"):
            i += 2
            continue
        keep.append(args[i])
        i += 1
    out = subprocess.run(NARVL + ["config", "show", *keep], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    resolved = yaml.safe_load(out.stdout)
    assert resolved["name"] == "paper_base_caption" and resolved["data"]["shards_dir"] == "/mnt/narvl/data/coco"
    assert "--root" in argv and argv[argv.index("--root") + 1].startswith("/mnt/narvl/")


def test_gpu_workers_fit_the_paper_recipes():
    """The worker group holds the largest Ray Train group of the paper_* configs, one GPU per worker."""
    spec = _docs("raycluster.yaml")["spec"]
    need = 0
    for path in (REPO / "configs" / "pipelines").glob("paper_*.yaml"):
        cfg = yaml.safe_load(path.read_text())
        for stage in ("train_teacher", "train_nar"):
            if cfg.get(stage, {}).get("use_gpu"):
                need = max(need, int(cfg[stage]["num_workers"]))
    assert need >= 8
    capacity = 0
    for g in spec["workerGroupSpecs"]:
        gpus = int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
        capacity = max(capacity, gpus * g["maxReplicas"])
    assert capacity >= need
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert spec["authOptions"]["mode"] == "token"
    for _, template in _pod_templates(_docs("raycluster.yaml")):
        claims = {v["persistentVolumeClaim"]["claimName"] for v in template["spec"]["volumes"]
                  if "persistentVolumeClaim" in v}
        mounts = {m["mountPath"] for c in template["spec"]["containers"] for m in c["volumeMounts"]}
        assert claims == {"narvl-shared"} and "/mnt/narvl" in mounts
    pvc = _docs("storage.yaml")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]


def test_mlflow_manifest_proxies_artifacts_with_auth_on_postgres():
    docs = [d for w, d in load_manifests(K8S) if w == "mlflow.yaml"]
    dep = next(d for d in docs if d["kind"] == "Deployment")
    svc = next(d for d in docs if d["kind"] == "Service")
    env = {e["name"]: e for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["MLFLOW_BACKEND_STORE_URI"]["value"].startswith("postgresql+psycopg2://")
    assert env["MLFLOW_ARTIFACTS_DESTINATION"]["value"].startswith("s3://")
    assert "secretKeyRef" in env["MLFLOW_AUTH_ADMIN_PASSWORD"]["valueFrom"]
    assert svc["spec"].get("type", "ClusterIP") == "ClusterIP"
    probe = dep["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]
    assert probe["path"] == "/health"
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert labels | svc["spec"]["selector"] == labels  # the Service selects the pods
    # the RayJob's tracking URI is this Service
    job = _docs("rayjob.yaml")
    port = svc["spec"]["ports"][0]["port"]
    assert f"http://{svc['metadata']['name']}:{port}" in job["spec"]["entrypoint"]


def _worker_group(obj: dict) -> dict:
    return obj["spec"]["workerGroupSpecs"][0]


@pytest.mark.parametrize("breakage, expected", [
    (lambda o: _worker_group(o).pop("groupName"), "'groupName' is a required property"),
    (lambda o: _worker_group(o).pop("maxReplicas"), "'maxReplicas' is a required property"),
    (lambda o: o["spec"]["headGroupSpec"].pop("template"), "'template' is a required property"),
    (lambda o: _worker_group(o).__setitem__("minReplicas", "zero"), "'zero' is not of type 'integer'"),
    (lambda o: o["spec"].__setitem__("authOptions", {"mode": "password"}), "'password' is not one of"),
    (lambda o: _worker_group(o)["template"]["spec"]["containers"][0]["resources"]["limits"].pop("nvidia.com/gpu"),
     "needs nvidia.com/gpu in both requests and limits"),
    (lambda o: _worker_group(o)["template"]["spec"].pop("tolerations"), "toleration for nvidia.com/gpu"),
])
def test_broken_raycluster_is_rejected(breakage, expected):
    broken = copy.deepcopy(_docs("raycluster.yaml"))
    breakage(broken)
    errors = validate(broken, "raycluster.yaml")
    assert any(expected in e for e in errors), errors
    assert all(e.startswith("raycluster.yaml: RayCluster/narvl") for e in errors)


def test_broken_rayjob_and_core_objects_are_rejected():
    job = copy.deepcopy(_docs("rayjob.yaml"))
    job["spec"]["shutdownAfterJobFinishes"] = "yes"
    assert any("'yes' is not of type 'boolean'" in e for e in validate(job, "rayjob.yaml"))
    dep = copy.deepcopy(next(d for w, d in load_manifests(K8S) if d["kind"] == "Deployment"))
    del dep["spec"]["template"]["spec"]["containers"][0]["image"]
    assert validate(dep, "mlflow.yaml") == [
        "mlflow.yaml: Deployment/narvl-mlflow: required field spec.template.spec.containers[].image is missing"]
    svc = copy.deepcopy(next(d for w, d in load_manifests(K8S) if d["kind"] == "Service"))
    del svc["spec"]["ports"][0]["port"]
    assert any("spec.ports[].port" in e for e in validate(svc, "x.yaml"))


# ---- ray up --------------------------------------------------------------------------------------------------
def ray_schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def validate_ray_config(cfg: dict, where: str) -> list[str]:
    errors = [f"{where}: {'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
              for e in jsonschema.Draft7Validator(ray_schema()).iter_errors(cfg)]
    if errors:
        return errors
    from ray.autoscaler._private.util import prepare_config, validate_config

    try:  # what `ray up` does before launching: fill in the provider's defaults, then Ray's own checks
        validate_config(prepare_config(copy.deepcopy(cfg)))
    except (ValueError, jsonschema.ValidationError) as e:
        errors.append(f"{where}: {e}")
    head = " && ".join(cfg.get("head_start_ray_commands", []))
    worker = " && ".join(cfg.get("worker_start_ray_commands", []))
    if not re.search(r"--dashboard-host[= ]127\.0\.0\.1", head):
        errors.append(f"{where}: head_start_ray_commands: the dashboard must bind 127.0.0.1 (--dashboard-host)")
    for field, cmds in (("head_start_ray_commands", head), ("worker_start_ray_commands", worker)):
        if "RAY_AUTH_MODE=token" not in cmds:
            errors.append(f"{where}: {field}: Ray token authentication must be on (RAY_AUTH_MODE=token)")
    if "MLFLOW_HOST=0.0.0.0" in head:
        errors.append(f"{where}: head_start_ray_commands: the MLflow server must bind 127.0.0.1")
    gpu_types = [n for n, t in cfg["available_node_types"].items() if n != cfg["head_node_type"]]
    if not any(re.match(r"(p[3-5]|g[4-6])", str(cfg["available_node_types"][n]["node_config"].get("InstanceType")))
               for n in gpu_types):
        errors.append(f"{where}: available_node_types: no GPU worker node type")
    return errors


def test_ray_cluster_configs_are_valid():
    files = sorted(RAY.glob("*.yaml"))
    assert [f.name for f in files] == ["aws.yaml"]
    for path in files:
        cfg = yaml.safe_load(path.read_text())
        assert validate_ray_config(cfg, path.name) == []
        assert cfg["docker"]["image"] and cfg["provider"]["type"] == path.stem
        run_options = " ".join(cfg["docker"]["run_options"])
        assert "-v /mnt/narvl:/mnt/narvl" in run_options  # the shared storage reaches the containers
        assert any("mount" in c and "/mnt/narvl" in c for c in cfg["initialization_commands"])
        assert "DS_ACCELERATOR=cuda" in " ".join(cfg["docker"]["worker_run_options"])
        assert any("infra/mlflow/server.sh start /mnt/narvl/" in c for c in cfg["head_start_ray_commands"])


@pytest.mark.parametrize("breakage, expected", [
    (lambda c: c["docker"].__setitem__("imagee", "x"), "'imagee' was unexpected"),
    (lambda c: c.pop("provider"), "'provider' is a required property"),
    (lambda c: c.__setitem__("max_workers", -1), "-1 is less than the minimum of 0"),
    (lambda c: c.__setitem__("head_node_type", "nope"), "head_node_type"),
    (lambda c: c["head_start_ray_commands"].__setitem__(1, "ray start --head --dashboard-host=0.0.0.0"),
     "must bind 127.0.0.1"),
    (lambda c: c["worker_start_ray_commands"].__setitem__(1, "ray start --address=$RAY_HEAD_IP:6379"),
     "token authentication must be on"),
])
def test_broken_ray_config_is_rejected(breakage, expected):
    cfg = yaml.safe_load((RAY / "aws.yaml").read_text())
    breakage(cfg)
    errors = validate_ray_config(cfg, "aws.yaml")
    assert any(expected in e for e in errors), errors
