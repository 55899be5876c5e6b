"""Dataset converters on the real samples in ../shared/realdata: round trips through the shards, bad records,
resume, and the paper/real-smoke YAMLs."""

from __future__ import annotations

import base64
import io
import json
import pickle
import tarfile
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from pipeline.config import load_config
from stages.data.converters import ConversionError, convert
from stages.data.converters.coco_caption import convert_coco_caption
from stages.data.converters.refcoco import convert_refcoco, load_refs_pickle
from stages.data.schema import REQUIRED_KEYS

pytestmark = pytest.mark.realdata
REPO = Path(__file__).resolve().parent.parent
FAST = dict(progress=False, workers=1, samples_per_shard=16)


def read_split(split_dir: Path) -> tuple[dict, list[tuple[dict, bytes, str]]]:
    """The manifest and every (json, image bytes, ext) sample of a split, read with tarfile only."""
    manifest = json.loads((split_dir / "manifest.json").read_text())
    samples = []
    for shard in manifest["shards"]:
        with tarfile.open(split_dir / shard["name"]) as tar:
            files: dict[str, dict[str, bytes]] = {}
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                files.setdefault(key, {})[ext] = tar.extractfile(m).read()
        for parts in files.values():
            ext = next(e for e in parts if e != "json")
            samples.append((json.loads(parts["json"]), parts[ext], ext))
    assert manifest["count"] == len(samples) == sum(s["count"] for s in manifest["shards"])
    return manifest, samples


def by_id(samples: list[tuple[dict, bytes, str]]) -> dict[str, tuple[dict, bytes, str]]:
    ids = Counter(s[0]["id"] for s in samples)
    assert max(ids.values()) == 1, "a record appears twice"
    return {s[0]["id"]: s for s in samples}


def check_schema(sample: dict) -> None:
    for k in ("id", "task", "image_size", "prompt", *REQUIRED_KEYS[sample["task"]]):
        assert k in sample, k


def write_jpeg(path: Path, size: tuple[int, int] = (48, 40)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (120, 30, 200)).save(path, format="JPEG")


def coco_images(realdata: Path) -> dict[int, Path]:
    return {int(p.stem): p for p in (realdata / "coco" / "images").glob("*/*.jpg")}


def merged_instances(realdata: Path, tmp_path: Path) -> Path:
    images, anns = [], []
    for split in ("train2017", "val2017"):
        d = json.loads((realdata / "coco" / "annotations" / f"instances_{split}.json").read_text())
        images += d["images"]
        anns += d["annotations"]
    path = tmp_path / "instances.json"
    path.write_text(json.dumps({"images": images, "annotations": anns}))
    return path


def refcoco_rows(realdata: Path) -> dict[str, list[dict]]:
    """RefCOCO (unc) expressions whose image is among the real COCO JPEGs, per split."""
    have = coco_images(realdata)
    return {split: [r for line in (realdata / "refcoco" / f"unc_{split}.jsonl").open()
                    if (r := json.loads(line))["image_id"] in have]
            for split in ("val", "testA", "testB")}


# ---- round trips ------------------------------------------------------------------------------------------
def test_coco_caption_official_roundtrip(realdata, tmp_path):
    ann = json.loads((realdata / "coco/annotations/captions_train2017.json").read_text())
    report = convert_coco_caption(tmp_path / "out", images=realdata / "coco/images",
                                  captions={"train": realdata / "coco/annotations/captions_train2017.json"},
                                  progress=False, workers=2, samples_per_shard=32)
    manifest, samples = read_split(tmp_path / "out/caption/train")
    assert manifest["dataset"]["name"] == "coco-caption" and manifest["task"] == "caption"
    got = by_id(samples)
    refs: dict[int, list[str]] = {}
    for a in ann["annotations"]:
        refs.setdefault(a["image_id"], []).append(a["caption"].strip())
    assert set(got) == {f"coco_{im['id']}" for im in ann["images"]}
    files = coco_images(realdata)
    for im in ann["images"]:
        sample, data, ext = got[f"coco_{im['id']}"]
        check_schema(sample)
        assert sample["references"] == refs[im["id"]]
        assert sample["image_size"] == [im["width"], im["height"]]
        assert ext == "jpg" and data == files[im["id"]].read_bytes()  # original bytes, not re-encoded
    assert report["count"] == 80 and report["skipped"] == {}
    print(f"coco-caption: {report['samples_per_s']} images/s ({report['summary']})")


def test_coco_caption_val_skips_missing_images(realdata, tmp_path):
    val = realdata / "coco/annotations/captions_val2017.json"
    n_images = len(json.loads(val.read_text())["images"])
    kwargs = dict(images=realdata / "coco/images/val2017", captions={"val": val})
    expected = r"captions_val2017\.json: record \d+ \(id 'coco_\d+'\): missing_image"
    with pytest.raises(ConversionError, match=expected):
        convert_coco_caption(tmp_path / "a", **kwargs, **FAST)
    report = convert_coco_caption(tmp_path / "b", **kwargs, **{**FAST, "on_bad": "skip"})
    _, samples = read_split(tmp_path / "b/caption/val")
    assert len(samples) == report["count"] > 50
    assert report["skipped"] == {"missing_image": n_images - len(samples)}
    assert "missing_image=" in report["summary"]


def test_coco_caption_karpathy_restval_goes_to_train(realdata, tmp_path):
    ann = json.loads((realdata / "coco/annotations/captions_train2017.json").read_text())
    split_of = ["train", "restval", "val", "test"]
    images = []
    for i, im in enumerate(ann["images"][:20]):
        sents = [{"raw": a["caption"], "tokens": a["caption"].lower().split()}
                 for a in ann["annotations"] if a["image_id"] == im["id"]]
        images.append({"filepath": "train2017", "filename": im["file_name"], "cocoid": im["id"], "imgid": i,
                       "split": split_of[i % 4], "sentences": sents})
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps({"images": images, "dataset": "coco"}))
    args = {"images": realdata / "coco/images", "karpathy": path, **FAST}
    report = convert("coco-caption", args, tmp_path / "o")
    assert {s: v["count"] for s, v in report["splits"].items()} == {"train": 10, "val": 5, "test": 5}
    got = by_id(read_split(tmp_path / "o/caption/train")[1])
    for im in images[:2]:
        assert got[f"coco_{im['cocoid']}"][0]["references"] == [s["raw"].strip() for s in im["sentences"]]


def test_vqa_official_layout_both_image_namings(realdata, tmp_path):
    vqa = realdata / "vqa"
    # train: the 5 official questions; their images are not in realdata -> small JPEGs in the 2014 naming.
    q5 = json.loads((vqa / "v2_OpenEnded_mscoco_train2014_questions_5q.json").read_text())
    for q in q5["questions"]:
        write_jpeg(tmp_path / "images/train2014" / f"COCO_train2014_{q['image_id']:012d}.jpg")
    # val: 40 of the 1k questions, images in the 2017 naming ({id:012d}.jpg).
    q1k = json.loads((vqa / "vqa_format_questions_1k.json").read_text())
    a1k = json.loads((vqa / "vqa_format_annotations_1k.json").read_text())
    q1k["questions"] = q1k["questions"][:40]
    keep = {q["question_id"] for q in q1k["questions"]}
    a1k["annotations"] = [a for a in a1k["annotations"] if a["question_id"] in keep]
    (tmp_path / "q.json").write_text(json.dumps(q1k))
    (tmp_path / "a.json").write_text(json.dumps(a1k))
    for q in q1k["questions"]:
        write_jpeg(tmp_path / "images/val2017" / f"{q['image_id']:012d}.jpg", (64, 48))
    report = convert("vqa", {
        "images": tmp_path / "images",
        "questions": {"train2014": vqa / "v2_OpenEnded_mscoco_train2014_questions_5q.json",
                      "val": tmp_path / "q.json"},
        "annotations": {"train2014": vqa / "v2_mscoco_train2014_annotations_5q.json", "val": tmp_path / "a.json"},
        **FAST, "workers": 2}, tmp_path / "out")
    assert report["splits"]["train"]["count"] == 5 and report["splits"]["val"]["count"] == 40
    anns = {a["question_id"]: a for a in json.loads((vqa / "v2_mscoco_train2014_annotations_5q.json").read_text())[
        "annotations"] + a1k["annotations"]}
    questions = {q["question_id"]: q for q in q5["questions"] + q1k["questions"]}
    for split in ("train", "val"):
        for sample, _, _ in read_split(tmp_path / "out/vqa" / split)[1]:
            check_schema(sample)
            qid = sample["meta"]["question_id"]
            ann = anns[qid]
            assert sample["question"] == questions[qid]["question"] and sample["prompt"] == sample["question"]
            assert sample["answers"] == [a["answer"] for a in ann["answers"]] and len(sample["answers"]) == 10
            assert sample["meta"]["answer_type"] == ann["answer_type"]
            assert sample["meta"]["question_type"] == ann["question_type"]
            # the VQA confidence of the majority answer is derivable from the 10 answers
            conf = min(sample["answers"].count(ann["multiple_choice_answer"]) / 3, 1.0)
            assert conf > 0


def test_refcoco_jsonl_and_refs_pickle(realdata, tmp_path):
    rows = refcoco_rows(realdata)
    assert sum(map(len, rows.values())) > 20
    files = {}
    for split, rs in rows.items():
        files[split] = tmp_path / f"unc_{split}.jsonl"
        files[split].write_text("".join(json.dumps(r) + "\n" for r in rs))
    instances = merged_instances(realdata, tmp_path)
    report = convert_refcoco(tmp_path / "j", images=realdata / "coco/images", jsonl=files, instances=instances,
                             **{**FAST, "workers": 2})
    assert report["skipped"] == {} and report["count"] == sum(map(len, rows.values()))
    for split, rs in rows.items():
        got = read_split(tmp_path / "j/grounding" / split)[1]
        assert len(got) == len(rs)
        expected = sorted((r["sentence"], tuple(r["bbox_xywh"])) for r in rs)
        seen = sorted((s["expression"], (s["box"][0], s["box"][1], s["box"][2] - s["box"][0],
                                         s["box"][3] - s["box"][1])) for s, _, _ in got)
        for (e_text, e_box), (g_text, g_box) in zip(expected, seen, strict=True):
            assert e_text == g_text
            assert all(abs(a - b) < 1e-3 for a, b in zip(e_box, g_box, strict=True))
        for s, _, _ in got:
            check_schema(s)
            w, h = s["image_size"]
            assert 0 <= s["box"][0] < s["box"][2] <= w and 0 <= s["box"][1] < s["box"][3] <= h

    # the official refs(unc).p layout (a protocol-2 pickle of plain dicts) with instances.json
    refs, sent_id = [], 0
    for split, rs in rows.items():
        per_ann: dict[int, dict] = {}
        for r in rs:
            ref = per_ann.setdefault(r["ann_id"], {
                "ref_id": len(refs) + len(per_ann), "ann_id": r["ann_id"], "image_id": r["image_id"],
                "file_name": r["file_name"], "split": split, "category_id": 1, "sentences": [], "sent_ids": []})
            ref["sentences"].append({"raw": r["sentence"], "sent": r["sentence"], "sent_id": sent_id,
                                     "tokens": r["sentence"].split()})
            ref["sent_ids"].append(sent_id)
            sent_id += 1
        refs += per_ann.values()
    (tmp_path / "refs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))
    report = convert("refcoco", {"images": realdata / "coco/images", "refs": tmp_path / "refs(unc).p",
                                 "instances": instances, **FAST}, tmp_path / "p")
    assert {s: v["count"] for s, v in report["splits"].items()} == {s: len(r) for s, r in rows.items()}

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (tmp_path / "evil.p").write_bytes(pickle.dumps([Evil()]))
    with pytest.raises(ConversionError, match="refusing to load builtins.print"):
        load_refs_pickle(tmp_path / "evil.p")


def test_snli_ve_sample(realdata, tmp_path):
    src = realdata / "snli_ve/sample_data.jsonl"
    rows = [json.loads(line) for line in src.open()]
    report = convert("snli-ve", {"images": realdata / "snli_ve", "jsonl": {"test": src}, **FAST}, tmp_path)
    got = by_id(read_split(tmp_path / "entailment/test")[1])
    assert report["count"] == len(rows) == len(got)
    words = {"entailment": "yes", "neutral": "maybe", "contradiction": "no"}
    for r in rows:
        sample, data, ext = got["snli_" + r["pairID"].replace(".", "_").replace("#", "_")]
        check_schema(sample)
        assert (sample["premise"], sample["hypothesis"]) == (r["sentence1"], r["sentence2"])
        assert sample["label"] == words[r["gold_label"]]
        assert data == (realdata / "snli_ve" / r["Flikr30kID"]).read_bytes()


def test_ofa_tsv_all_tasks(realdata, tmp_path):
    ann = json.loads((realdata / "coco/annotations/captions_train2017.json").read_text())
    files = coco_images(realdata)
    b64 = {i: base64.b64encode(p.read_bytes()).decode() for i, p in files.items()}
    ims = [im["id"] for im in ann["images"][:6]]
    refs = {i: [a["caption"].strip() for a in ann["annotations"] if a["image_id"] == i] for i in ims}
    rows_ref = [r for rs in refcoco_rows(realdata).values() for r in rs][:6]
    lines = {
        "caption": [f"{k}\t{i}\t{'&&'.join(refs[i])}\tdog,cat\t{b64[i]}" for k, i in enumerate(ims)],
        "vqa": [f"{k}\t{i}\twhat is this?\t1.0|!+dog&&0.6|!+cat&&0.3|!+pet\tdog\t{b64[i]}"
                for k, i in enumerate(ims)],
        "grounding": [f"{k}\t{r['image_id']}\t{r['sentence']}\t"
                      f"{r['bbox_xywh'][0]},{r['bbox_xywh'][1]},{r['bbox_xywh'][0] + r['bbox_xywh'][2]},"
                      f"{r['bbox_xywh'][1] + r['bbox_xywh'][3]}\t{b64[r['image_id']]}"
                      for k, r in enumerate(rows_ref)],
        "entailment": [f"{k}\t{i}\t{b64[i]}\ta thing\t{refs[i][0]}\t{lab}"
                       for k, (i, lab) in enumerate(zip(ims, ["entailment", "neutral", "contradiction", "yes",
                                                              "maybe", "no"], strict=True))],
    }
    for task, ls in lines.items():
        path = tmp_path / f"{task}_test.tsv"
        path.write_text("\n".join(ls) + "\n")
        report = convert("ofa-tsv", {"task": task, "tsv": {"test": path}, **FAST}, tmp_path / "out")
        assert report["count"] == len(ls), report["summary"]
        got = by_id(read_split(tmp_path / "out" / task / "test")[1])
        for k, line in enumerate(ls):
            sample, data, _ = got[f"ofa_{k}"]
            check_schema(sample)
            assert sample["task"] == task
            cols = line.split("\t")
            if task == "caption":
                assert sample["references"] == refs[ims[k]]
            elif task == "vqa":
                assert Counter(sample["answers"]) == {"dog": 3, "cat": 2, "pet": 1}
                assert sample["meta"]["answer_confidence"] == {"dog": 1.0, "cat": 0.6, "pet": 0.3}
            elif task == "grounding":
                r = rows_ref[k]
                x, y, w, h = r["bbox_xywh"]
                assert sample["expression"] == r["sentence"]
                assert all(abs(a - b) < 1e-3 for a, b in zip(sample["box"], [x, y, x + w, y + h], strict=True))
            else:
                assert sample["label"] == ["yes", "maybe", "no"][k % 3]
                assert (sample["premise"], sample["hypothesis"]) == (refs[ims[k]][0], "a thing")
            assert data == base64.b64decode(cols[-1] if task != "entailment" else cols[2])


# ---- bad records ------------------------------------------------------------------------------------------
def test_bad_records_error_or_counted_skip(realdata, tmp_path):
    rows = [r for rs in refcoco_rows(realdata).values() for r in rs][:4]
    (tmp_path / "img").mkdir()
    (tmp_path / "img/000000999999.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg at all")
    good = rows[0]
    bad = {
        "missing_image": {**good, "image_id": 123, "file_name": "COCO_train2014_000000000123.jpg"},
        "bad_image": {**good, "image_id": 999999, "file_name": "000000999999.jpg"},
        "bad_box": {**good, "bbox_xywh": [10, 10, 5000, 20]},
        "degenerate": {**good, "bbox_xywh": [10, 10, 0, 20]},
        "empty_text": {**good, "sentence": "  "},
    }
    images = tmp_path / "imgs"
    images.mkdir()
    for r in rows:  # a folder holding the real images that the rows need, plus the broken one
        target = images / f"{r['image_id']:012d}.jpg"
        if not target.exists():
            target.symlink_to(coco_images(realdata)[r["image_id"]])
    (images / "000000999999.jpg").symlink_to(tmp_path / "img/000000999999.jpg")
    reasons = {"degenerate": "bad_box"}
    for name, row in bad.items():
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in [*rows, row]))
        reason = reasons.get(name, name)
        with pytest.raises(ConversionError, match=rf"{name}\.jsonl: record 4 \(id '[^']+'\): {reason}"):
            convert_refcoco(tmp_path / f"e_{name}", images=images, jsonl={"val": path}, **FAST)
        report = convert_refcoco(tmp_path / f"s_{name}", images=images, jsonl={"val": path},
                                 **{**FAST, "on_bad": "skip"})
        assert report["skipped"] == {reason: 1} and report["count"] == len(rows), name
        assert f"{reason}=1" in report["summary"]
    # unknown label and duplicate id (SNLI-VE)
    src = [json.loads(line) for line in (realdata / "snli_ve/sample_data.jsonl").open()]
    for name, extra in {"unknown_label": {**src[0], "pairID": "x", "gold_label": "-"},
                        "duplicate_id": src[1]}.items():
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in [*src, extra]))
        args = {"images": realdata / "snli_ve", "jsonl": {"test": path}, **FAST}
        with pytest.raises(ConversionError, match=rf"{name}\.jsonl: record 5 .*{name}"):
            convert("snli-ve", args, tmp_path / f"e_{name}")
        report = convert("snli-ve", {**args, "on_bad": "skip"}, tmp_path / f"s_{name}")
        assert report["skipped"] == {name: 1} and report["count"] == len(src)


# ---- resume -----------------------------------------------------------------------------------------------
def test_resume_skips_finished_split_and_redoes_interrupted(realdata, tmp_path):
    args = {"images": realdata / "snli_ve", "jsonl": {"train": realdata / "snli_ve/sample_data.jsonl"}, **FAST}
    convert("snli-ve", args, tmp_path)
    assert (tmp_path / "entailment/train/manifest.json").exists()
    stamp = (tmp_path / "entailment/train/manifest.json").stat().st_mtime_ns
    report = convert("snli-ve", args, tmp_path)
    assert report["splits"]["train"]["status"] == "finished earlier"
    assert (tmp_path / "entailment/train/manifest.json").stat().st_mtime_ns == stamp
    # an interrupted split (no manifest, a stray partial file) is converted again from scratch
    (tmp_path / "entailment/train/manifest.json").unlink()
    (tmp_path / "entailment/train/partial.tmp").write_bytes(b"x")
    report = convert("snli-ve", args, tmp_path)
    assert report["splits"]["train"] == {**report["splits"]["train"], "status": "converted", "count": 5}
    assert not (tmp_path / "entailment/train/partial.tmp").exists()
    assert len(read_split(tmp_path / "entailment/train")[1]) == 5


def test_decoded_image_bytes_open(realdata, tmp_path):
    """Stored bytes decode to the size recorded in the JSON (the loader resizes them)."""
    convert("snli-ve", {"images": realdata / "snli_ve", "jsonl": {"val": realdata / "snli_ve/sample_data.jsonl"},
                        **FAST}, tmp_path)
    for sample, data, _ in read_split(tmp_path / "entailment/val")[1]:
        assert list(Image.open(io.BytesIO(data)).size) == sample["image_size"]


# ---- configs ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", [f"paper_{p}_{t}" for p in ("tiny", "base", "huge")
                                  for t in ("caption", "vqa", "grounding", "entailment")] + ["real_smoke"])
def test_pipeline_yaml_validates(name):
    cfg = load_config(REPO / "configs/pipelines" / f"{name}.yaml")
    assert cfg.data.source == "shards" and cfg.name == name
    if name.startswith("paper_"):
        task = cfg.tasks[0]
        assert cfg.data.image_size == (512 if task == "grounding" else 480) and cfg.data.num_bins == 1000
        assert cfg.train_nar.num_queries[task] == {"caption": 20, "vqa": 6, "grounding": 5, "entailment": 2}[task]
        assert cfg.train_teacher.label_smoothing == (0.0 if task == "entailment" else 0.1)
