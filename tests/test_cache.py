"""The stage cache: keys, hits, atomic publish."""

from __future__ import annotations

import json

from pipeline.cache import (
    clean_stale,
    final_dir,
    folder_name,
    git_info,
    is_hit,
    node_key,
    publish,
    read_manifest,
    tmp_dir,
    work_dir,
    write_manifest,
)
from stages.config import TrainConfig


def test_key_is_stable_and_ignores_nocache_fields():
    cfg = TrainConfig()
    k = node_key("train_teacher", 1, cfg, {"prepare_data": "abc"})
    assert k == node_key("train_teacher", 1, TrainConfig(), {"prepare_data": "abc"})
    assert len(k) == 64
    # log_every / loader_workers are cache=False: same key
    assert k == node_key("train_teacher", 1, TrainConfig(log_every=3, loader_workers=2), {"prepare_data": "abc"})
    # anything else changes it: a field, the version, the stage name, an input key
    assert k != node_key("train_teacher", 1, TrainConfig(lr=0.5), {"prepare_data": "abc"})
    assert k != node_key("train_teacher", 2, cfg, {"prepare_data": "abc"})
    assert k != node_key("train_nar", 1, cfg, {"prepare_data": "abc"})
    assert k != node_key("train_teacher", 1, cfg, {"prepare_data": "abd"})
    # input order does not matter
    assert node_key("s", 1, cfg, {"a": "1", "b": "2"}) == node_key("s", 1, cfg, {"b": "2", "a": "1"})


def test_folders(tmp_path):
    key = "0123456789abcdef" * 4
    assert folder_name("train_nar[ce]", key) == "train_nar.ce-0123456789ab"
    assert final_dir(tmp_path, "vqa", "distill", key) == tmp_path / "vqa" / "distill-0123456789ab"
    assert work_dir(tmp_path, "vqa", "train_nar", key).name == ".work-train_nar-0123456789ab"
    a, b = tmp_dir(tmp_path, "vqa", "evaluate_ar", key), tmp_dir(tmp_path, "vqa", "evaluate_ar", key)
    assert a != b and a.name.startswith(".tmp-evaluate_ar-0123456789ab-")


def test_hit_needs_succeeded_manifest_with_same_key(tmp_path):
    d = tmp_path / "stage"
    d.mkdir()
    (d / "outputs.bin").write_bytes(b"x")
    assert not is_hit(d, "k")  # no manifest: a half-written folder is never a hit
    (d / "manifest.json").write_text("{not json")
    assert not is_hit(d, "k") and read_manifest(d) is None
    write_manifest(d, {"status": "failed", "key": "k"})
    assert not is_hit(d, "k")
    write_manifest(d, {"status": "succeeded", "key": "other"})
    assert not is_hit(d, "k")
    write_manifest(d, {"status": "succeeded", "key": "k"})
    assert is_hit(d, "k")
    assert not is_hit(tmp_path / "missing", "k")


def test_publish_replaces_stale_folder(tmp_path):
    final = tmp_path / "t" / "s-abc"
    final.mkdir(parents=True)
    (final / "stale.txt").write_text("old")
    scratch = tmp_path / "t" / ".tmp-s-abc-1"
    scratch.mkdir()
    write_manifest(scratch, {"status": "succeeded", "key": "abc"})
    publish(scratch, final)
    assert not scratch.exists() and not (final / "stale.txt").exists()
    assert json.loads((final / "manifest.json").read_text())["key"] == "abc"
    assert [p.name for p in (tmp_path / "t").iterdir()] == ["s-abc"]


def test_clean_stale_keeps_work_dir(tmp_path):
    key = "f" * 64
    (tmp_path / "t" / f".tmp-{folder_name('evaluate_ar', key)}-1234").mkdir(parents=True)
    work_dir(tmp_path, "t", "evaluate_ar", key).mkdir()
    clean_stale(tmp_path, "t", "evaluate_ar", key)
    assert [p.name for p in (tmp_path / "t").iterdir()] == [work_dir(tmp_path, "t", "evaluate_ar", key).name]


def test_git_info_without_git(tmp_path):
    info = git_info(tmp_path)
    assert set(info) == {"sha", "dirty"}
    assert info["sha"] == "unknown" or len(info["sha"]) == 40
