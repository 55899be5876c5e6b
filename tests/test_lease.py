"""Leases on a local root and on an S3-compatible store (moto's server on 127.0.0.1): one owner at a time, a live
owner blocks, a dead owner's lease (old heartbeat) is taken over, and a release frees it."""

from __future__ import annotations

import json
import os
import time

import pytest

from pipeline.lease import Leases
from pipeline.storage import Storage


@pytest.fixture(scope="module")
def s3_root():
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "t", "AWS_SECRET_ACCESS_KEY": "t",
           "AWS_DEFAULT_REGION": "us-east-1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    boto3.client("s3").create_bucket(Bucket="leases")
    yield "s3://leases/root"
    server.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_one_owner_at_a_time_and_stale_takeover(kind, tmp_path, request):
    root = str(tmp_path) if kind == "local" else request.getfixturevalue("s3_root")
    storage = Storage(root)
    rel = "vqa/.lease-train_nar-0123456789ab.json"
    a, b = Leases(storage, stale_after_s=60), Leases(storage, stale_after_s=60)
    assert a.acquire(rel) and not b.acquire(rel)  # exactly one of two owners
    assert b.holder(rel) == a.owner
    a.release(rel)
    assert b.acquire(rel) and b.holder(rel) == b.owner
    # b dies without releasing: its heartbeat ages; a live check still blocks, a stale one is taken over
    storage.write_bytes(rel, json.dumps({"owner": b.owner, "heartbeat": time.time() - 3600}).encode())
    c = Leases(storage, stale_after_s=60)
    assert c.acquire(rel) and c.holder(rel) == c.owner
    assert not Leases(storage).acquire(rel)
    c.release_all()
    assert storage.read_bytes(rel) is None
    for leases in (a, b):
        leases.release_all()
