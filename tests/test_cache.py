"""The stage cache: keys (exactly the fields that change results), hits, atomic publish."""

from __future__ import annotations

import json
import types
import typing
from pathlib import Path
from typing import Any, Literal

import pytest
from pydantic import BaseModel

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
from pipeline.config import PipelineConfig, cache_dict, load_config
from pipeline.dag import build_graph
from pipeline.storage import Storage
from stages.config import TrainConfig


def test_key_is_stable_and_ignores_nocache_fields():
    cfg = TrainConfig()
    k = node_key("train_teacher", 1, cfg, {"prepare_data": "abc"})
    assert k == node_key("train_teacher", 1, TrainConfig(), {"prepare_data": "abc"})
    assert len(k) == 64
    # log_every / checkpoint_every are cache=False: same key; loader_workers splits the data: another key
    assert k == node_key("train_teacher", 1, TrainConfig(log_every=3, checkpoint_every=7), {"prepare_data": "abc"})
    assert k != node_key("train_teacher", 1, TrainConfig(loader_workers=2), {"prepare_data": "abc"})
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
    store = Storage(tmp_path)
    assert not is_hit(store, "stage", "k")  # no manifest: a half-written folder is never a hit
    (d / "manifest.json").write_text("{not json")
    assert not is_hit(store, "stage", "k") and read_manifest(d) is None
    write_manifest(d, {"status": "failed", "key": "k"})
    assert not is_hit(store, "stage", "k")
    write_manifest(d, {"status": "succeeded", "key": "other"})
    assert not is_hit(store, "stage", "k")
    write_manifest(d, {"status": "succeeded", "key": "k"})
    assert is_hit(store, "stage", "k")
    assert not is_hit(store, "missing", "k")


def test_publish_replaces_stale_folder(tmp_path):
    final = tmp_path / "t" / "s-abc"
    final.mkdir(parents=True)
    (final / "stale.txt").write_text("old")
    scratch = tmp_path / "t" / ".tmp-s-abc-1"
    scratch.mkdir()
    publish(Storage(tmp_path), scratch, "t/s-abc", {"status": "succeeded", "key": "abc"})
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


# ---- cache keys are exactly the fields that change results --------------------------------------------------
# Fields that change no result (cache=False), by design: logging and retry/checkpoint cadence (resume is exact),
# the validation diagnostic, the switch that only permits a too-small query count (Q-CTC then counts and skips
# the infeasible targets as always). Changing this set is a decision about what reruns: update it on purpose.
NOT_IN_KEY = {"log_every", "checkpoint_every", "max_failures", "val_exact_batches", "allow_infeasible_queries"}


def _leaves(model: BaseModel, prefix: tuple = ()) -> list[tuple[tuple, Any, Any]]:
    """(path, field info, value) of every scalar-ish leaf of a pydantic config."""
    out = []
    for name, info in type(model).model_fields.items():
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            out += _leaves(value, (*prefix, name))
        else:
            out.append(((*prefix, name), info, value))
    return out


def _candidates(info: Any, value: Any) -> list[Any]:
    """Other values a field could take (the first one that validates is used)."""
    ann = info.annotation
    args = typing.get_args(ann)
    if typing.get_origin(ann) is Literal:
        return [a for a in args if a != value]
    if typing.get_origin(ann) in (typing.Union, types.UnionType) and any(typing.get_origin(a) is Literal for a in args):
        return [x for a in args if typing.get_origin(a) is Literal for x in typing.get_args(a) if x != value]
    if isinstance(value, bool):
        return [not value]
    if isinstance(value, int):
        return [value + 1, value + 2, value - 1, 2, value * 2, value // 2]
    if isinstance(value, float):
        return [value * 0.5 + 0.01, value + 0.05, value * 1.5 + 0.01]
    if isinstance(value, str):
        return [value + "x"]
    if value is None:  # an optional number, text or section (init_from: any existing file stands for a checkpoint)
        return [3, 0.5, "x", 0, {"ofa": __file__}]
    if isinstance(value, tuple):
        return [tuple(v * 0.5 if isinstance(v, float) else v + 1 for v in value)]
    if isinstance(value, list):
        return [[*value, value[-1]] if value else [1], value[:-1]]
    if isinstance(value, dict):
        if value:
            k = next(iter(value))
            v = value[k]
            return [{**value, k: (not v) if isinstance(v, bool) else v + 1 if isinstance(v, int | float) else v}]
        return [{"vqa": 1}, {"caption": 1}, {"caption": 0.5}]  # a count, a flag, or a share below 1
    return []


# a value that is only valid with a sibling set too (paths that exist: their content enters the key)
COUPLED = {"source": {"shards_dir": None}, "tokenizer": {"ofa_bpe_dir": str(Path(__file__).parent / "fixtures" /
                                                                          "ofa_bpe")}}


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    """Tiny converted shards of every task (data.source=shards reads them at plan time)."""
    from stages.common import PrintLog
    from stages.config import TASKS, DataConfig
    from stages.prepare_data import synth_all

    out = tmp_path_factory.mktemp("converted")
    synth_all(DataConfig(image_size=32, train_per_task=2, val_per_task=1, test_per_task=1), TASKS, out, PrintLog())
    COUPLED["source"]["shards_dir"] = str(out)
    return out


def _with(model: BaseModel, path: tuple, new: Any) -> BaseModel:
    data = model.model_dump()
    node = data
    for p in path[:-1]:
        node = node[p]
    node[path[-1]] = new
    node.update(COUPLED.get(path[-1], {}))
    return type(model).model_validate(data)


@pytest.mark.parametrize("node_id", ["shared/pretrain", "caption/prepare_data", "caption/train_teacher",
                                     "caption/distill", "caption/train_nar", "caption/evaluate_narvl",
                                     "caption/benchmark"])
def test_key_changes_iff_field_changes_results(node_id, converted):
    cfg: PipelineConfig = load_config(profile="smoke", overrides=["tasks=[caption]", "pretrain.enabled=true"])
    node = build_graph(cfg).nodes[node_id]
    base = node_key(node.stage, 1, node.cfg, {})
    flipped = 0
    for path, info, value in _leaves(node.cfg):
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        changed = None
        for cand in _candidates(info, value):
            try:
                changed = _with(node.cfg, path, cand)
            except ValueError:
                continue
            if changed != node.cfg:
                break
            changed = None
        assert changed is not None, f"{node_id}: no valid other value for {'.'.join(path)}"
        flipped += 1
        in_key = extra.get("cache") is not False
        assert in_key == (path[-1] not in NOT_IN_KEY), f"{'.'.join(path)}: marked {'in' if in_key else 'out of'} key"
        moved = node_key(node.stage, 1, changed, {}) != base
        what = "did not change" if in_key else "changed"
        assert moved == in_key, f"{node_id}: changing {'.'.join(path)} {what} the key"
    assert flipped >= 3
    assert cache_dict(node.cfg) == cache_dict(type(node.cfg).model_validate(node.cfg.model_dump()))
