"""Leases on a local root and on an S3-compatible store (moto's server on 127.0.0.1): one owner at a time, a live
owner blocks, a dead owner's lease (old heartbeat) is taken over, and a release frees it."""

from __future__ import annotations

import json
import time

import pytest

from pipeline.lease import Leases
from pipeline.storage import Storage


@pytest.fixture(scope="module")
def s3_root(s3_server):
    import boto3

    boto3.client("s3").create_bucket(Bucket="leases")
    return "s3://leases/root"


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
