"""Our shards against the `webdataset` library, both ways: ShardWriter's output read by `webdataset.WebDataset`
(same samples, same bytes, same order), and `webdataset.TarWriter`'s output (plain and gzip tars, keys with a
folder prefix, jpg and png) read by our reader, indexed by `index_shards` and loaded into batches."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from narvl_model.tokenizer import Tokenizer
from stages.data.shapes import generate
from stages.data.shards import (
    DataError,
    ShardWriter,
    decode_image,
    index_shards,
    iter_split_json,
    iter_tar,
    make_loader,
    read_split_manifest,
)
from stages.data.tasks import eval_target, sample_texts

INFO = {"name": "shapes", "version": 1, "seed": 0}


def _wds_samples(urls: list[str]) -> list[dict]:
    # shardshuffle explicit (webdataset 1.0 warns otherwise); one process, one node: no splitters needed
    return list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> tuple[Path, list[tuple[dict, bytes]]]:
    d = tmp_path_factory.mktemp("ours") / "train"
    samples = list(generate("vqa", "train", 23, 32, seed=4))
    w = ShardWriter(d, "train", samples_per_shard=5)
    for sample, png in samples:
        w.write(sample, png, "png")
    w.close(INFO)
    return d, samples


def test_our_shards_read_by_webdataset(written):
    d, samples = written
    manifest = read_split_manifest(d, verify=True)
    assert [s["count"] for s in manifest["shards"]] == [5, 5, 5, 5, 3]
    got = _wds_samples([str(d / s["name"]) for s in manifest["shards"]])
    assert [g["__key__"] for g in got] == [s["id"] for s, _ in samples]  # every sample, in writing order
    for g, (sample, png) in zip(got, samples, strict=True):
        assert {k for k in g if not k.startswith("__")} == {"json", "png"}
        assert g["png"] == png  # the image bytes as written
        assert g["json"] == json.dumps(sample, sort_keys=True).encode()
        assert json.loads(g["json"]) == sample
    # webdataset's own decoders see the same image and JSON
    decoded = list(wds.WebDataset([str(d / manifest["shards"][0]["name"])], shardshuffle=False)
                   .decode("rgb8").to_tuple("png", "json"))
    for (image, meta), (sample, png) in zip(decoded, samples[:5], strict=True):
        assert meta == sample
        assert np.array_equal(image, np.asarray(Image.open(io.BytesIO(png)).convert("RGB")))


@pytest.fixture(scope="module")
def by_webdataset(tmp_path_factory) -> tuple[Path, list[tuple[str, dict, str, bytes]]]:
    """12 caption samples written by webdataset.TarWriter into a plain and a gzip tar: png and jpg images,
    half of the keys under a folder prefix (as webdataset keys may be)."""
    d = tmp_path_factory.mktemp("theirs") / "val"
    d.mkdir()
    rows = []
    for i, (sample, png) in enumerate(generate("caption", "val", 12, 32, seed=7)):
        ext, data = "png", png
        if i % 3 == 1:
            buf = io.BytesIO()
            Image.open(io.BytesIO(png)).convert("RGB").save(buf, format="JPEG", quality=90)
            ext, data = "jpg", buf.getvalue()
        key = f"part{i % 2}/{sample['id']}" if i >= 6 else sample["id"]
        rows.append((key, sample, ext, data))
    for name, part in (("val-000000.tar", rows[:6]), ("val-000001.tar.gz", rows[6:])):
        with wds.TarWriter(str(d / name)) as sink:
            for key, sample, ext, data in part:
                sink.write({"__key__": key, "json": json.dumps(sample).encode(), ext: data})
    return d, rows


def test_webdataset_tars_read_by_ours(by_webdataset):
    d, rows = by_webdataset
    names = ["val-000000.tar", "val-000001.tar.gz"]
    ours = [(key, parts) for name in names for key, parts in iter_tar(d / name)]
    theirs = _wds_samples([str(d / n) for n in names])
    assert [k for k, _ in ours] == [t["__key__"] for t in theirs] == [r[0] for r in rows]  # same grouping
    for (_, parts), t, (_, sample, ext, data) in zip(ours, theirs, rows, strict=True):
        assert parts == {"json": json.dumps(sample).encode(), ext: data}
        assert {k: v for k, v in t.items() if not k.startswith("__")} == parts  # byte for byte the same


def test_webdataset_tars_indexed_and_loaded(by_webdataset):
    d, rows = by_webdataset
    manifest = index_shards(d, "val", INFO)
    assert manifest["task"] == "caption" and manifest["count"] == 12
    assert [s["count"] for s in manifest["shards"]] == [6, 6]
    assert read_split_manifest(d, verify=True) == manifest
    assert list(iter_split_json(d, "caption")) == [r[1] for r in rows]
    tok = Tokenizer.train([t for _, s, _, _ in rows for t in sample_texts(s, 16)], vocab_size=300, num_bins=16)
    batches = list(make_loader(d, tok, "caption", 5))
    assert [len(b) for b in batches] == [5, 5, 2]
    ids = [i for b in batches for i in b.ids]
    assert ids == [r[1]["id"] for r in rows]
    images = np.concatenate([b.image.numpy() for b in batches])
    for image, (key, _, _, data) in zip(images, rows, strict=True):
        assert np.array_equal(image, decode_image(data, None, key))  # the jpg members decode as jpg
    targets = [tok.decode(row[: n - 1].tolist()) for b in batches for row, n in zip(b.target, b.target_lengths,
                                                                                     strict=True)]
    assert targets == [tok.decode(tok.encode(eval_target(r[1], 16))) for r in rows]


def test_index_shards_rejects_mixed_tasks_and_foreign_tars(tmp_path):
    d = tmp_path / "mixed"
    d.mkdir()
    with wds.TarWriter(str(d / "a.tar")) as sink:
        for task in ("caption", "vqa"):
            sample, png = next(iter(generate(task, "train", 1, 32, seed=1)))
            sink.write({"__key__": f"{task}_0", "json": json.dumps(sample).encode(), "png": png})
    with pytest.raises(DataError, match=r"a\.tar: sample 'vqa_0': task 'vqa', expected 'caption'"):
        index_shards(d, "train", INFO)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    with wds.TarWriter(str(foreign / "b.tar")) as sink:
        sink.write({"__key__": "x", "txt": b"a caption", "png": b"\x89PNG"})
    with pytest.raises(DataError, match=r"b\.tar: sample 'x': no \.json with a known task"):
        index_shards(foreign, "train", INFO)


def test_a_sample_with_two_members_of_one_extension_is_an_error(tmp_path):
    # webdataset raises on this too ("duplicate file name"); ours names the shard, the sample and the member
    import tarfile

    path = tmp_path / "dup.tar"
    with tarfile.open(path, "w") as tar:
        for name in ("s1.json", "s1.JSON"):
            info = tarfile.TarInfo(name)
            info.size = 2
            tar.addfile(info, io.BytesIO(b"{}"))
    with pytest.raises(DataError, match=r"dup\.tar: sample 's1' has two 'json' members"):
        list(iter_tar(path))
    with pytest.raises(ValueError, match="duplicate file name"):
        _wds_samples([str(path)])
