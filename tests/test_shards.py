"""Shards: writer + manifest, exactly-once reading across ranks and DataLoader workers, batches, bad input."""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from narvl_model.decoding import bins_to_box
from narvl_model.tokenizer import Tokenizer
from stages.data.shapes import generate
from stages.data.shards import DataError, ShardWriter, count_samples, make_loader, read_split_manifest, sha256_file
from stages.data.tasks import box_to_bins, eval_target, sample_texts, train_target, vqa_confidence

N = 30


def _write(split_dir: Path, task: str, n: int, per_shard: int, size: int = 32) -> dict:
    w = ShardWriter(split_dir, "train", per_shard)
    for sample, png in generate(task, "train", n, size, seed=0):
        w.write(sample, png, "png")
    return w.close({"name": "shapes", "version": 1, "seed": 0})


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    texts = [t for task in ("caption", "vqa", "grounding") for s, _ in generate(task, "train", 40, 32, 0)
             for t in sample_texts(s, 16)]
    return Tokenizer.train(texts, vocab_size=400, num_bins=16)


@pytest.fixture(scope="module")
def caption_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("shards")
    _write(root / "many", "caption", N, per_shard=4)  # 8 shards >= 2 ranks x 2 workers
    _write(root / "few", "caption", N, per_shard=20)  # 2 shards < 4 readers: split inside shards
    return {"many": root / "many", "few": root / "few"}


def test_manifest_and_deterministic_bytes(tmp_path, caption_dirs):
    m = read_split_manifest(caption_dirs["many"], verify=True)
    assert m["count"] == N == count_samples(caption_dirs["many"]) and m["task"] == "caption"
    assert [s["count"] for s in m["shards"]] == [4] * 7 + [2]
    assert m["dataset"] == {"name": "shapes", "version": 1, "seed": 0}
    again = _write(tmp_path / "again", "caption", N, per_shard=4)
    assert [s["sha256"] for s in again["shards"]] == [s["sha256"] for s in m["shards"]]
    assert not list((tmp_path / "again").glob(".*tmp"))


@pytest.mark.parametrize("layout", ["many", "few"])
def test_every_sample_exactly_once_over_ranks_and_workers(caption_dirs, tok, layout):
    ids: list[str] = []
    for rank in range(2):
        loader = make_loader(caption_dirs[layout], tok, "caption", 3, train=True, seed=1, shuffle_buffer=5,
                             num_workers=2, rank=rank, world_size=2)
        ids += [i for b in loader for i in b.ids]
    counts = Counter(ids)
    assert len(counts) == N and set(counts.values()) == {1}


def test_shuffle_depends_on_seed_and_epoch(caption_dirs, tok):
    def order(epoch: int) -> list[str]:
        loader = make_loader(caption_dirs["many"], tok, "caption", 8, train=True, seed=0, epoch=epoch,
                             shuffle_buffer=10)
        return [i for b in loader for i in b.ids]
    assert order(0) == order(0) and order(0) != order(1) and sorted(order(0)) == sorted(order(1))
    evaluation = make_loader(caption_dirs["many"], tok, "caption", 8)
    assert [i for b in evaluation for i in b.ids] == sorted(order(0))


def test_batch_contents(caption_dirs, tok):
    batch = next(iter(make_loader(caption_dirs["many"], tok, "caption", 4, image_size=48, max_source_len=5)))
    assert batch.image.shape == (4, 3, 48, 48) and batch.image.dtype == torch.float32
    assert -1.0 <= float(batch.image.min()) and float(batch.image.max()) <= 1.0
    assert batch.src_tokens.shape == (4, 5) and (batch.src_tokens[:, 0] == tok.bos_id).all()
    assert (batch.src_tokens[:, -1] == tok.eos_id).all()
    for row, length, sample in zip(batch.target, batch.target_lengths, batch.samples, strict=True):
        assert row[length - 1] == tok.eos_id and (row[length:] == tok.pad_id).all()
        assert tok.decode(row[: length - 1].tolist()) == sample["references"][0]
    assert torch.equal(batch.prev_output_tokens[:, 1:][batch.target[:, 1:] != tok.pad_id],
                       batch.target[:, :-1][batch.target[:, 1:] != tok.pad_id])
    assert (batch.prev_output_tokens[:, 0] == tok.bos_id).all() and (batch.weights == 1).all()
    override = {batch.ids[0]: "a large red star"}
    seen = 0
    for b2 in make_loader(caption_dirs["many"], tok, "caption", 4, train=True, target_override=override):
        for i, sid in enumerate(b2.ids):
            text = tok.decode(b2.target[i, : b2.target_lengths[i] - 1].tolist())
            if sid == batch.ids[0]:
                seen += 1
                assert text == "a large red star"
            else:
                assert text in b2.samples[i]["references"]
    assert seen == 1


def test_vqa_and_grounding_targets(tmp_path, tok):
    _write(tmp_path / "vqa", "vqa", 12, per_shard=12)
    batch = next(iter(make_loader(tmp_path / "vqa", tok, "vqa", 12, train=True, seed=3)))
    for w, sample, row, n in zip(batch.weights, batch.samples, batch.target, batch.target_lengths, strict=True):
        answer = tok.decode(row[: n - 1].tolist())
        assert answer in sample["answers"] and float(w) == pytest.approx(vqa_confidence(sample["answers"])[answer])
    _write(tmp_path / "gr", "grounding", 6, per_shard=6)
    batch = next(iter(make_loader(tmp_path / "gr", tok, "grounding", 6)))
    assert (batch.target_lengths == 5).all()
    for row, sample in zip(batch.target, batch.samples, strict=True):
        bins = [tok.bin_index(t) for t in row[:4].tolist()]
        assert bins == box_to_bins(sample["box"], sample["image_size"], 16)


def test_vqa_confidence_weights():
    weights = vqa_confidence(["net"] * 7 + ["netting", "mesh", "mesh"])
    assert weights == pytest.approx({"net": 1.0, "netting": 1 / 3, "mesh": 2 / 3})


def test_box_bins_round_trip():
    box, size = [3.0, 10.0, 31.0, 20.0], [32, 40]
    bins = box_to_bins(box, size, 64)
    assert bins == [round(3 / 32 * 63), round(10 / 40 * 63), round(31 / 32 * 63), round(20 / 40 * 63)]
    back = bins_to_box(bins, 0, 64, *size)  # raw bin indices: bin ids start at 0
    assert all(abs(a - b) <= max(size) / 63 / 2 + 1e-9 for a, b in zip(back, box, strict=True))
    assert box_to_bins([0, 0, 32, 40], size, 64) == [0, 0, 63, 63]
    sample = {"task": "vqa", "answers": ["2"] * 7 + ["two"] * 3}
    assert eval_target(sample, 64) == "2"
    rng = np.random.default_rng(0)
    picks = Counter(train_target(sample, rng, 64) for _ in range(300))
    assert set(picks) == {("2", 1.0), ("two", 1.0)} and picks[("2", 1.0)] > picks[("two", 1.0)]


# ---- bad input -------------------------------------------------------------------------------------------
def _raw_split(split_dir: Path, members: list[tuple[str, bytes]], task: str = "caption") -> Path:
    split_dir.mkdir(parents=True)
    path = split_dir / "train-000000.tar"
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    manifest = {"split": "train", "task": task, "count": len(members) // 2,
                "shards": [{"name": path.name, "sha256": sha256_file(path), "count": len(members) // 2}],
                "dataset": {"name": "test", "version": 0, "seed": 0}}
    (split_dir / "manifest.json").write_text(json.dumps(manifest))
    return split_dir


def _good(k: int) -> list[tuple[str, bytes]]:
    sample, png = next(generate("caption", "train", 1, 32, seed=k))
    sample["id"] = f"s{k}"
    return [(f"s{k}.json", json.dumps(sample).encode()), (f"s{k}.png", png)]


def test_missing_shard_and_sha_mismatch(tmp_path, tok):
    d = _raw_split(tmp_path / "a", _good(0) + _good(1))
    (d / "train-000000.tar").write_bytes((d / "train-000000.tar").read_bytes()[:-1] + b"x")
    read_split_manifest(d)  # presence only
    with pytest.raises(DataError, match="train-000000.tar: sha256"):
        make_loader(d, tok, "caption", 2, verify=True)
    (d / "train-000000.tar").unlink()
    with pytest.raises(DataError, match="train-000000.tar listed in .* is missing"):
        read_split_manifest(d)
    with pytest.raises(DataError, match="manifest.json not found"):
        read_split_manifest(tmp_path / "nowhere")
    with pytest.raises(DataError, match="holds task 'caption', expected 'vqa'"):
        make_loader(_raw_split(tmp_path / "b", _good(0)), tok, "vqa", 2)


def test_truncated_tar(tmp_path, tok):
    d = _raw_split(tmp_path / "t", _good(0) + _good(1) + _good(2))
    path = d / "train-000000.tar"
    path.write_bytes(path.read_bytes()[:2600])
    with pytest.raises(DataError, match="train-000000.tar"):
        list(make_loader(d, tok, "caption", 2))
    loader = make_loader(d, tok, "caption", 2, on_bad_sample="skip")
    ids = [i for b in loader for i in b.ids]
    assert len(loader.skipped) == 1 and "train-000000.tar" in loader.skipped[0] and len(ids) < 3


def test_bad_samples_raise_or_are_counted(tmp_path, tok):
    no_refs = json.loads(_good(1)[0][1])
    del no_refs["references"]
    members = (_good(0) + [("s1.json", json.dumps(no_refs).encode()), _good(1)[1]]
               + [_good(2)[0], ("s2.png", b"not a png")] + [_good(3)[0]] + _good(4))
    d = _raw_split(tmp_path / "bad", members)
    with pytest.raises(DataError, match=r"sample 's1': JSON lacks \['references'\]"):
        list(make_loader(d, tok, "caption", 10))
    for shuffled in (False, True):
        loader = make_loader(d, tok, "caption", 2, train=shuffled, on_bad_sample="skip", num_workers=0)
        ids = sorted(i for b in loader for i in b.ids)
        assert ids == ["s0", "s4"]
        assert len(loader.skipped) == 3
        text = "\n".join(loader.skipped)
        assert "sample 's1'" in text and "sample 's2': image does not decode" in text
        assert "sample 's3': no image member" in text
    d2 = _raw_split(tmp_path / "img", _good(0) + [_good(2)[0], ("s2.png", b"not a png")])
    with pytest.raises(DataError, match="sample 's2': image does not decode"):
        list(make_loader(d2, tok, "caption", 10))


def test_writer_rejects_bad_samples(tmp_path):
    w = ShardWriter(tmp_path / "w", "train", 4)
    sample, png = next(generate("caption", "train", 1, 32, 0))
    with pytest.raises(DataError, match="missing"):
        w.write({k: v for k, v in sample.items() if k != "references"}, png)
    w.write(sample, png)
    with pytest.raises(DataError, match="written twice"):
        w.write(sample, png)


def test_iter_split_json_reads_every_sample_json_but_no_image(tmp_path, caption_dirs):
    from stages.data.shards import iter_split_json
    from stages.prepare_data import iter_split_samples

    assert list(iter_split_json(caption_dirs["many"], "caption")) == list(iter_split_samples(caption_dirs["many"],
                                                                                                "caption"))
    no_refs = json.loads(_good(1)[0][1])
    del no_refs["references"]
    d = _raw_split(tmp_path / "bad", _good(0) + [_good(2)[0], ("s2.png", b"not a png")]
                   + [("s1.json", json.dumps(no_refs).encode()), _good(1)[1]])
    with pytest.raises(DataError, match=r"sample 's1': JSON lacks \['references'\]"):
        list(iter_split_json(d, "caption"))
    # images are not read: a broken image does not stop the JSON reader
    d2 = _raw_split(tmp_path / "img", _good(0) + [_good(2)[0], ("s2.png", b"x")])
    assert [s["id"] for s in iter_split_json(d2, "caption")] == ["s0", "s2"]


def test_aux_caption_trains_a_share_of_samples_as_captions_of_their_own_scene(tmp_path, tok):
    """train_teacher.aux_tasks {caption: 0.5}: about that share of an entailment split's training samples become
    caption examples whose target names exactly the objects of the sample's own image; evaluation never changes."""
    from stages.data.schema import task_prompt
    from stages.data.shapes import parse_caption

    d = tmp_path / "ent"
    _write(d, "entailment", 60, per_shard=20)
    caption_src = [tok.bos_id, *tok.encode(task_prompt("caption", {})), tok.eos_id]
    n = captions = 0
    for b in make_loader(d, tok, "entailment", 16, train=True, seed=3, aux_tasks={"caption": 0.5},
                         shuffle_buffer=0):
        for i, sample in enumerate(b.samples):
            n += 1
            src = [t for t in b.src_tokens[i].tolist() if t != tok.pad_id]
            if src != caption_src:
                continue
            captions += 1
            words = tok.decode([t for t in b.target[i].tolist() if t not in (tok.pad_id, tok.eos_id)])
            want = {tuple(o[:3]) for o in sample["meta"]["objects"]}
            assert parse_caption(words) == want, (sample["id"], words)
    assert n == 60 and 15 <= captions <= 45, captions
    for b in make_loader(d, tok, "entailment", 16, train=False, aux_tasks={"caption": 0.5}):  # evaluation: never
        for i, sample in enumerate(b.samples):
            src = [t for t in b.src_tokens[i].tolist() if t != tok.pad_id]
            assert src == [tok.bos_id, *tok.encode(sample["prompt"]), tok.eos_id], sample["id"]


def test_aux_tasks_name_a_sample_without_objects(tmp_path, tok):
    sample, png = next(generate("entailment", "train", 1, 32, seed=0))
    sample["id"], sample["meta"] = "no-objects", {}
    d = _raw_split(tmp_path / "a", [("k.json", json.dumps(sample).encode()), ("k.png", png)], task="entailment")
    with pytest.raises(DataError, match="k.*meta.objects"):
        list(make_loader(d, tok, "entailment", 4, train=True, aux_tasks={"caption": 0.99}, seed=0))


def _decoded(tok, row) -> str:
    return tok.decode([t for t in row.tolist() if t not in (tok.pad_id, tok.bos_id, tok.eos_id)])


def test_aux_tasks_draw_true_samples_of_every_task_over_their_own_scene(tmp_path, tok):
    """A VQA teacher's batches with aux_tasks over all four tasks: each auxiliary example is correct for the
    sample's own image: a grounding box is the box of the one object its expression names, a caption names the
    scene's objects, an entailment "yes"/"no" on "there is a ..." is the truth of its hypothesis."""
    from stages.data.shapes import Obj, parse_caption, referring_expressions
    from stages.data.tasks import box_text

    d = tmp_path / "vqa"
    _write(d, "vqa", 80, per_shard=20)
    seen: dict[str, int] = {}
    shares = {"caption": 0.15, "grounding": 0.25, "vqa": 0.2, "entailment": 0.2}
    for b in make_loader(d, tok, "vqa", 16, train=True, seed=5, aux_tasks=shares, shuffle_buffer=0):
        for i, sample in enumerate(b.samples):
            prompt, target = _decoded(tok, b.src_tokens[i]), _decoded(tok, b.target[i])
            objs = [Obj(a, c, s_, tuple(box)) for a, c, s_, *box in sample["meta"]["objects"]]
            if "which region" in prompt:
                kind = "grounding"
                expression = prompt.split('"')[1].strip()
                named = [o for o in objs if expression in referring_expressions(objs, o, sample["image_size"][0])]
                assert len(named) == 1, (sample["id"], expression)
                assert target.split() == box_text(list(named[0].box), sample["image_size"], tok.num_bins).split()
            elif "what does the image describe" in prompt:
                kind = "caption"
                assert parse_caption(target) == {o.triple() for o in objs}
            elif "imply text2" in prompt:
                kind = "entailment"
                hypothesis = prompt.split('"')[3].strip()
                if target != "maybe" and hypothesis.startswith("there is a"):
                    words = hypothesis.split()
                    truth = any(o.colour == words[-2] and o.shape == words[-1] for o in objs)
                    assert target == ("yes" if truth else "no"), (sample["id"], hypothesis, target)
            else:
                kind = "vqa"
                if prompt.strip() != sample["question"].strip():  # a new question; its answers are drawn and
                    kind = "vqa (fresh)"  # weighted as the split's (an annotator's answer, VQA confidence)
                    assert 0 < b.weights[i] <= 1
            seen[kind] = seen.get(kind, 0) + 1
    assert sum(seen.values()) == 80
    assert all(seen.get(k, 0) >= 3 for k in ("caption", "grounding", "entailment", "vqa (fresh)", "vqa")), seen


def test_aux_shares_must_leave_room_for_the_task():
    from stages.config import TeacherTrainConfig

    with pytest.raises(ValueError, match="add up to 1"):
        TeacherTrainConfig(aux_tasks={"caption": 0.5, "grounding": 0.5})
    with pytest.raises(ValueError, match="in \\[0, 1\\)"):
        TeacherTrainConfig(aux_tasks={"caption": -0.1})
    with pytest.raises(ValueError, match="aux_tasks"):
        TeacherTrainConfig(aux_tasks={"ocr": 0.1})
