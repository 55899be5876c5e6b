"""Inputs from outside the artifact root enter cache keys by content (pipeline/content.py): converted shards replaced
in place are a MISS and the new data is used, the same shards at another path are a HIT, an OFA checkpoint is
hashed once per (path, size, mtime), and a missing input fails the plan naming it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline import cache
from pipeline.config import ConfigError, load_config
from pipeline.content import digest_cache_path, file_digest
from pipeline.dag import build_graph, make_plan
from pipeline.storage import Storage
from stages import prepare_data
from stages.common import PrintLog
from stages.config import DataConfig, OFAInit
from stages.data.shards import read_split_manifest

TINY = dict(image_size=32, train_per_task=4, val_per_task=2, test_per_task=2, samples_per_shard=4,
            bpe_vocab_size=100, num_bins=16)


@pytest.fixture(autouse=True)
def digest_cache(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "digests.json"
    monkeypatch.setenv("NARVL_DIGEST_CACHE", str(path))
    return path


def _synth(out: Path, seed: int) -> Path:
    if out.exists():
        shutil.rmtree(out)
    prepare_data.synth_all(DataConfig(**{**TINY, "seed": seed}), ["caption"], out, PrintLog())
    return out


def _cfg(shards: Path, *more: str):
    return load_config(profile="smoke", overrides=["tasks=[caption]", "pretrain.enabled=false", "data.source=shards",
                                                   f"data.shards_dir={shards}", *more])


def _prepare(root: Storage, cfg) -> tuple[str, Path]:
    """Run prepare_data of `cfg` into its cache folder, as the executor publishes it."""
    node = build_graph(cfg).nodes["caption/prepare_data"]
    scratch = cache.tmp_dir(root.local(), node.task, node.name, node.key)
    prepare_data.run(node.cfg, prepare_data.Inputs(), scratch, PrintLog())
    rel = cache.final_rel(node.task, node.name, node.key)
    cache.publish(root, scratch, rel, {"status": "succeeded", "key": node.key})
    return node.key, root.local(rel)


def _targets(folder: Path) -> list:
    return [json.dumps(s, sort_keys=True) for s in prepare_data.iter_split_samples(folder / "train", "caption")]


def test_shards_replaced_in_place_miss_and_the_same_shards_elsewhere_hit(tmp_path):
    root = Storage(tmp_path / "root")
    shards = _synth(tmp_path / "shards", seed=0)
    key_a, out_a = _prepare(root, _cfg(shards))
    assert make_plan(build_graph(_cfg(shards)), root)["caption/prepare_data"] == "hit"

    old = read_split_manifest(shards / "caption" / "train")
    _synth(shards, seed=1)  # same path, other content (new samples, new manifests)
    assert read_split_manifest(shards / "caption" / "train")["shards"] != old["shards"]
    graph = build_graph(_cfg(shards))
    assert graph.nodes["caption/prepare_data"].key != key_a
    plan = make_plan(graph, root)
    assert plan["caption/prepare_data"] == "run" and plan["caption/train_teacher"] == "run"  # and all downstream
    key_b, out_b = _prepare(root, _cfg(shards))
    new = read_split_manifest(shards / "caption" / "train")
    assert read_split_manifest(out_b / "train", verify=True)["shards"] == new["shards"]  # the new data is used
    assert read_split_manifest(out_a / "train", verify=True)["shards"] == old["shards"]
    assert _targets(out_b) != _targets(out_a)

    moved = tmp_path / "elsewhere" / "copy"
    shutil.copytree(shards, moved)
    graph = build_graph(_cfg(moved))
    assert graph.nodes["caption/prepare_data"].key == key_b  # the same content at another path
    assert make_plan(graph, root)["caption/prepare_data"] == "hit"
    # another task's shards are not this task's input
    prepare_data.synth_all(DataConfig(**TINY), ["vqa"], moved, PrintLog())
    assert build_graph(_cfg(moved)).nodes["caption/prepare_data"].key == key_b


def test_a_missing_input_fails_the_plan_naming_it(tmp_path):
    shards = _synth(tmp_path / "shards", seed=0)
    (shards / "caption" / "val" / "manifest.json").unlink()
    with pytest.raises(ConfigError, match=r"data.shards_dir: .*caption/val/manifest.json not found"):
        build_graph(_cfg(shards))
    (shards / "caption" / "train" / "train-000000.tar").unlink()
    with pytest.raises(ConfigError, match=r"data.shards_dir: shard .*train-000000.tar listed in .* is missing"):
        build_graph(_cfg(shards))

    from pipeline.cli import app

    res = CliRunner().invoke(app, ["plan", "-p", "smoke", "--tasks", "caption", "--root", str(tmp_path / "r"),
                                   "pretrain.enabled=false", "data.source=shards",
                                   f"data.shards_dir={tmp_path / 'nowhere'}"])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert "data.shards_dir" in res.output and "nowhere" in res.output


def test_an_ofa_checkpoint_enters_the_teacher_key_by_content_hashed_once(tmp_path, digest_cache):
    from pipeline.cache import node_key
    from stages.config import TrainStage

    ckpt = tmp_path / "ofa_tiny.pt"
    ckpt.write_bytes(b"weights-v1" * 1000)
    base = load_config(profile="smoke", overrides=["tasks=[caption]"])
    teacher = build_graph(base).nodes["caption/train_teacher"].cfg

    def key(path: Path) -> str:
        cfg = TrainStage.model_validate({**teacher.model_dump(), "init_from": OFAInit(ofa=str(path)).model_dump()})
        return node_key("train_teacher", 1, cfg, {"data": "d"})

    k1 = key(ckpt)
    assert k1 != node_key("train_teacher", 1, teacher, {"data": "d"})
    copy = tmp_path / "other" / "ofa_tiny.pt"
    copy.parent.mkdir()
    shutil.copy(ckpt, copy)
    assert key(copy) == k1  # same bytes, another path
    ckpt.write_bytes(b"weights-v2" * 1000)  # same size, replaced in place
    assert key(ckpt) != k1

    # the digest is remembered per (path, size, mtime, ...): a second plan does not read the file again
    entry = json.loads(digest_cache.read_text())[str(ckpt.resolve())]
    entry["sha256"] = "remembered"
    digest_cache.write_text(json.dumps({str(ckpt.resolve()): entry}))
    assert file_digest("init_from.ofa", ckpt) == "remembered"
    ckpt.write_bytes(b"weights-v3" * 1000)
    assert file_digest("init_from.ofa", ckpt) not in ("remembered", entry["sha256"])
    assert digest_cache_path() == digest_cache
    ckpt.unlink()
    with pytest.raises(ConfigError, match=r"init_from.ofa: .*ofa_tiny.pt cannot be read"):
        file_digest("init_from.ofa", ckpt)
