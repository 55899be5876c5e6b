"""Wall time of the smoke pipeline on one machine: 1 Ray node vs a head + 2 worker nodes, local root vs an
S3-compatible root (moto's server on 127.0.0.1). Prints one row per configuration; every run starts on an empty
root, so every stage runs. Not a test: the figures are for the issue notes and the README.

    python bench/cluster_overhead.py [--tasks vqa] [--repeats 1]

The nodes of the multi-node cluster are separate raylets on 127.0.0.1 sharing this machine's cores, so 3 nodes
cannot be faster here: the row measures what the cluster machinery costs (inputs fetched per node, outputs
uploaded, one probe task per node), not a speedup.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # every node on 127.0.0.1
os.environ.setdefault("RAY_TQDM_PATCH_PRINT", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # private nodes on the loopback interface only


def _s3() -> tuple[object, str]:
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update(AWS_ENDPOINT_URL=f"http://{host}:{port}", AWS_ACCESS_KEY_ID="bench",
                      AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    boto3.client("s3").create_bucket(Bucket="bench")
    return server, "s3://bench"


def _run(cfg, root: str, address: str | None) -> float:
    from pipeline.dag import run_pipeline

    t = time.perf_counter()
    result = run_pipeline(cfg, root, address=address,
                          tracking_uri=f"sqlite:///{tempfile.mkdtemp(prefix='narvl-bench-')}/mlflow.db")
    if not result.ok:
        raise SystemExit(f"failed: {[(f.id, f.error) for f in result.failures]}")
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default="vqa", help="comma-separated tasks of the smoke profile")
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()

    import ray
    from ray.cluster_utils import Cluster

    from pipeline.config import load_config
    from pipeline.ray_utils import init_ray

    cfg = load_config(profile="smoke", overrides=[f"tasks=[{args.tasks}]"])
    server, bucket = _s3()
    rows: dict[str, list[float]] = {}
    try:
        init_ray(num_cpus=2)
        for _ in range(args.repeats):
            rows.setdefault("1 node, local root", []).append(
                _run(cfg, tempfile.mkdtemp(prefix="narvl-bench-root-"), None))
            rows.setdefault("1 node, s3 root", []).append(_run(cfg, f"{bucket}/{uuid.uuid4().hex[:8]}", None))
        ray.shutdown()
        c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "node_ip_address": "127.0.0.1"})
        for _ in range(2):
            c.add_node(num_cpus=1, node_ip_address="127.0.0.1")
        c.wait_for_nodes()
        ray.init(address=c.address, log_to_driver=False)
        for _ in range(args.repeats):
            rows.setdefault("3 nodes, s3 root", []).append(
                _run(cfg, f"{bucket}/{uuid.uuid4().hex[:8]}", c.address))
        ray.shutdown()
        c.shutdown()
    finally:
        server.stop()
    base = statistics.median(rows["1 node, local root"])
    print(f"\nsmoke pipeline ({args.tasks}), {args.repeats} run(s) each, median wall s "
          f"(ratio to 1 node + local root), {os.cpu_count()} cores:")
    for name, values in rows.items():
        med = statistics.median(values)
        print(f"  {name:22s} {med:7.1f} s   x{med / base:.2f}   runs: {', '.join(f'{v:.1f}' for v in values)}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
