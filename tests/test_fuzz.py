"""Property-based bad-input tests (hypothesis; derandomized, a fixed number of cases each, so CI is stable).

- the config loader, over random YAML documents and dotted overrides: a config, or ConfigError; never another
  exception, and a config that loads dumps and loads back to itself;
- the converters, over random corruptions of real-looking records (a field dropped or renamed, a value of
  another type, a number out of range, the file truncated): ConversionError, or shards in which every record is
  one of the clean conversion's records (a skipped one counted); never a crash, never a silently wrong record;
- the shard reader, over byte flips and truncations of a real small shard: DataError or the exact original
  records, both through the verifying reader (sha256 of every shard first) and the streaming one the loaders use
  (each shard hashed as it is read).

CASES holds the number of cases per property.
"""

from __future__ import annotations

import base64
import copy
import io
import json
import math
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from pipeline.config import CONFIG_DIR, ConfigError, PipelineConfig, config_to_yaml, load_config
from stages.data.converters import ConversionError, convert
from stages.data.shards import (
    DataError,
    ShardWriter,
    decode_image,
    iter_split_json,
    iter_tar,
    parse_sample,
    read_split_manifest,
)

CASES = {"config_loader": 300, "converters": 250, "shard_reader_verified": 150, "shard_reader_streaming": 150}


def fuzz(name: str):
    return settings(max_examples=CASES[name], derandomize=True, database=None, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def workdir():
    with tempfile.TemporaryDirectory(prefix="narvl-fuzz-") as d:
        yield Path(d)


# ---- values -----------------------------------------------------------------------------------------------
leaves = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True),
                   st.text(max_size=12))
values = st.recursive(leaves, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=10)


def paths(obj: Any, prefix: tuple = ()) -> list[tuple]:
    """Every key path into nested dicts / lists (the root excluded)."""
    out = []
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else []
    for k, v in items:
        out.append((*prefix, k))
        out += paths(v, (*prefix, k))
    return out


def parent(obj: Any, path: tuple) -> Any:
    for k in path[:-1]:
        obj = obj[k]
    return obj


# ---- the config loader ------------------------------------------------------------------------------------
SMOKE = yaml.safe_load((CONFIG_DIR / "pipelines" / "smoke.yaml").read_text())
FIELDS = [".".join(map(str, p)) for p in paths(SMOKE) if all(isinstance(k, str) for k in p)]
NASTY_YAML = ["a: &x [*x]", "!!python/object/apply:os.system ['true']", "{", "- 1\n- 2", "seed: 2020-01-01",
              "? [a, b]\n: c", "data: !!binary aGVsbG8=", "tasks: !!set {caption}", "\x00", "<<: {seed: 1}",
              "seed:\t1", "data:\n  seed: 1\n data: 2", "train_nar: {lr: .inf}", "seed: 0x10", "'" * 3,
              "[" * 200, "data:"]


@st.composite
def config_documents(draw) -> str:
    kind = draw(st.sampled_from(["text", "nasty", "random", "mutated", "smoke"]))
    if kind == "smoke":  # the overrides do the damage
        return yaml.safe_dump(SMOKE)
    if kind == "text":
        return draw(st.text(max_size=200))
    if kind == "nasty":
        return draw(st.sampled_from(NASTY_YAML))
    if kind == "random":
        return yaml.safe_dump(draw(values))
    doc = copy.deepcopy(SMOKE)
    for _ in range(draw(st.integers(1, 3))):
        ps = paths(doc)
        if not ps:
            break
        path = draw(st.sampled_from(ps))
        holder = parent(doc, path)
        if isinstance(holder, dict) and draw(st.booleans()):
            del holder[path[-1]]
        else:
            holder[path[-1]] = draw(values)
    return yaml.safe_dump(doc)


override_values = st.one_of(st.text(max_size=20), values.map(json.dumps), st.integers(-5, 2**64).map(str),
                            st.floats().map(repr), st.sampled_from(["true", "false", "null", "[]", "{}", "[caption]",
                                                                    "cpu-tiny", "shards", "ce", "bf16"]))
LEAVES = {".".join(map(str, p)): parent(SMOKE, p)[p[-1]] for p in paths(SMOKE)
          if all(isinstance(k, str) for k in p) and not isinstance(parent(SMOKE, p)[p[-1]], dict | list)}


@st.composite
def typed_override(draw) -> str:
    """A field of the smoke profile set to another value of its own type (ranges and cross-field checks)."""
    key = draw(st.sampled_from(sorted(LEAVES)))
    old = LEAVES[key]
    if isinstance(old, bool):
        new = draw(st.booleans())
    elif isinstance(old, int):
        new = draw(st.integers(-3, 5000))
    elif isinstance(old, float):
        new = draw(st.floats(-1, 10))
    else:
        new = draw(st.sampled_from(sorted({str(v) for v in LEAVES.values() if isinstance(v, str)})))
    return f"{key}={json.dumps(new)}"


overrides = st.lists(st.one_of(
    typed_override(), typed_override(), typed_override(),
    st.builds(lambda k, v: f"{k}={v}", st.sampled_from(FIELDS), override_values),
    st.builds(lambda k, v: f"{k}.{v}", st.sampled_from(FIELDS), st.text(max_size=10)),  # a field below a leaf
    st.text(max_size=30)), max_size=3)


@fuzz("config_loader")
@given(doc=config_documents(), ovs=overrides)
def test_config_loader_gives_a_config_or_config_error(workdir, doc, ovs):
    path = workdir / "pipeline.yaml"
    path.write_text(doc, encoding="utf-8", errors="surrogatepass")
    try:
        cfg = load_config(path, overrides=ovs)
    except ConfigError as e:
        assert str(e)
        event("ConfigError")
        return
    event("loaded")
    assert isinstance(cfg, PipelineConfig)
    path.write_text(config_to_yaml(cfg))
    assert load_config(path) == cfg  # what loads is what is written beside the artifacts


# ---- the converters ---------------------------------------------------------------------------------------
OUT_OF_RANGE = [-7, -1e6, 1e15, math.nan, math.inf, -math.inf]
TSV_BAD = {0: ["", "x", "1"], 1: ["", "x"], 2: ["", "   "],  # uniq-id (a reused one is a duplicate), image-id, text
           3: ["", "x", "1,2,3", "nan,0,1,1", "1e999,0,5,5", "1,2,3,4,5", "5,5,1,1"], 4: ["", "!!!!", "x", "AAAA"]}
OTHER_TYPES = [None, True, 3, 2.5, "text", "", [], [1, 2, 3], {"a": 1}]


def kind(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return repr(v)
    if isinstance(v, int | float):
        return "number"
    return type(v).__name__


def jpeg_bytes(size: tuple[int, int], color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG")
    return buf.getvalue()


IMAGES = {i: jpeg_bytes((64, 48), (40 * i, 90, 200 - 30 * i)) for i in (139, 285, 632)}


def coco_doc() -> dict:  # records shaped like COCO's captions_val2017.json
    ims = [{"license": 4, "file_name": f"{i:012d}.jpg", "height": 48, "width": 64, "id": i} for i in IMAGES]
    caps = {139: ["A woman stands in the dining area at the table.", "A room with chairs, a table, and a woman."],
            285: ["A big burly grizzly bear is show with grass in the background."],
            632: ["Bedroom scene with a bookcase, blue comforter and window.", "A bedroom with a bookshelf."]}
    anns = [{"image_id": i, "id": 1000 + k, "caption": c} for k, (i, c) in
            enumerate((i, c) for i, cs in caps.items() for c in cs)]
    return {"info": {"year": 2017}, "licenses": [], "images": ims, "annotations": anns}


def refcoco_rows() -> list[dict]:  # lines of RefCOCO's unc_val.jsonl
    return [{"file_name": f"COCO_train2014_{i:012d}.jpg", "bbox_xywh": box, "sentence": s, "image_id": i,
             "ann_id": a} for i, box, s, a in [(139, [10.5, 8.0, 30.25, 20.0], "man on right", 225429),
                                                (285, [0.0, 4.0, 50.0, 40.0], "big bear", 588011),
                                                (632, [20.0, 10.0, 12.0, 30.0], "bookcase left", 1120)]]


def vqa_docs() -> list[dict]:  # VQA v2 questions / annotations
    qs = [{"image_id": i, "question": q, "question_id": i * 1000 + 1} for i, q in
          [(139, "What is the woman doing?"), (285, "What animal is this?"), (632, "What color is the blanket?")]]
    anns = [{"question_type": "what", "multiple_choice_answer": a, "image_id": q["image_id"], "answer_type": "other",
             "question_id": q["question_id"], "answers": [{"answer": a if k < 8 else "other", "answer_confidence":
                                                           "yes", "answer_id": k + 1} for k in range(10)]}
            for q, a in zip(qs, ["standing", "bear", "blue"], strict=True)]
    return [{"data_subtype": "val2014", "questions": qs}, {"data_subtype": "val2014", "annotations": anns}]


def snli_rows() -> list[dict]:  # lines of SNLI-VE
    return [{"Flikr30kID": f"{i}.jpg", "gold_label": g, "pairID": f"{i}.jpg#2r1{g[0]}",
             "sentence1": "A man taking his son's bicycle to a repair shop.", "sentence2": h,
             "annotator_labels": [g]}
            for i, g, h in [(139, "entailment", "A man walks with a bike."),
                            (285, "neutral", "The bike has a flat tire."),
                            (632, "contradiction", "A woman sleeps.")]]


def tsv_rows() -> list[list[str]]:  # OFA's grounding TSV columns
    return [[str(k), str(i), text, box, base64.b64encode(IMAGES[i]).decode()]
            for k, (i, text, box) in enumerate([(139, "man on right", "10.5,8.0,40.75,28.0"),
                                                (285, "big bear", "0,4,50,44"), (632, "bookcase", "20,10,32,40")])]


def write_inputs(fmt: str, doc: Any, root: Path, truncate: int | None) -> dict:
    """Write `doc` as the format's input file(s) under root; cut the first file at `truncate` bytes."""
    def dump(name: str, data: Any, lines: bool = False) -> Path:
        if fmt == "ofa-tsv":
            text = "".join("\t".join(str(c) for c in row) + "\n" for row in data)
        elif lines:
            text = "".join(json.dumps(r) + "\n" for r in data)
        else:
            text = json.dumps(data)
        raw = text.encode()
        (root / name).write_bytes(raw[:truncate] if truncate is not None and name == first else raw)
        return root / name

    images = root / "images"
    if fmt == "coco-caption":
        first = "captions.json"
        return {"images": images, "captions": {"val": dump(first, doc)}}
    if fmt == "refcoco":
        first = "unc_val.jsonl"
        return {"images": images, "jsonl": {"val": dump(first, doc, lines=True)}}
    if fmt == "vqa":
        first = "questions.json"
        return {"images": images, "questions": {"val": dump(first, doc[0])},
                "annotations": {"val": dump("annotations.json", doc[1])}}
    if fmt == "snli-ve":
        first = "snli_ve_dev.jsonl"
        return {"images": images, "jsonl": {"dev": dump(first, doc, lines=True)}}
    first = "grounding_val.tsv"
    return {"task": "grounding", "tsv": {"val": dump(first, doc)}}


BASE = {"coco-caption": coco_doc, "refcoco": refcoco_rows, "vqa": vqa_docs, "snli-ve": snli_rows,
        "ofa-tsv": tsv_rows}
TASK = {"coco-caption": "caption", "refcoco": "grounding", "vqa": "vqa", "snli-ve": "entailment",
        "ofa-tsv": "grounding"}


def outputs(out: Path, fmt: str) -> list[dict]:
    task_dir = out / TASK[fmt]
    return [s for split in sorted(p.name for p in task_dir.iterdir()) for s in iter_split_json(task_dir / split,
                                                                                              TASK[fmt])]


def content(sample: dict) -> tuple:
    """What a sample says (not its id or meta, which follow optional source fields)."""
    return tuple(sorted((k, json.dumps(v, sort_keys=True)) for k, v in sample.items()
                        if k not in ("id", "meta", "references")))


def one_of_the_clean_records(sample: dict, clean: list[dict]) -> bool:
    """The sample says what one clean record says; a caption may lack references whose annotation was skipped."""
    for c in clean:
        if content(c) == content(sample) and Counter(sample.get("references", [])) <= Counter(
                c.get("references", [])):
            return True
    return False


@pytest.fixture(scope="module")
def clean(workdir):
    """The clean conversion of every format (the reference for the corrupted ones)."""
    images = workdir / "conv" / "images"
    images.mkdir(parents=True)
    for i, data in IMAGES.items():
        (images / f"{i:012d}.jpg").write_bytes(data)
    ref = {}
    for fmt, base in BASE.items():
        args = write_inputs(fmt, base(), workdir / "conv", None)
        report = convert(fmt, {**args, "progress": False, "workers": 1}, workdir / "conv" / f"clean-{fmt}")
        assert report["skipped"] == {} and report["count"] == 3
        ref[fmt] = outputs(workdir / "conv" / f"clean-{fmt}", fmt)
    return ref


@st.composite
def corruptions(draw) -> tuple[str, Any, str, int | None]:
    fmt = draw(st.sampled_from(list(BASE)))
    doc = BASE[fmt]()
    op = draw(st.sampled_from(["drop", "rename", "other_type", "out_of_range", "truncate"]))
    if op == "truncate":
        return fmt, doc, op, draw(st.integers(0, 4000))
    ps = [p for p in paths(doc) if len(p) == 2] if fmt == "ofa-tsv" else paths(doc)  # TSV: the columns
    if op in ("drop", "rename"):
        ps = [p for p in ps if isinstance(parent(doc, p), dict)] or ps
    if op == "out_of_range":  # TSV: the numbers are in the box column
        numbers = [p for p in ps if (p[-1] == 3 if fmt == "ofa-tsv" else kind(parent(doc, p)[p[-1]]) == "number")]
        ps, op = (numbers, op) if numbers else (ps, "other_type")  # SNLI-VE has no number
    path = draw(st.sampled_from(ps))
    holder, key = parent(doc, path), path[-1]
    if fmt == "ofa-tsv" and op in ("drop", "rename") and isinstance(holder, list) and len(path) == 2:
        del holder[key]  # a missing column
    elif op in ("drop", "rename") and isinstance(holder, dict):
        value = holder.pop(key)
        if op == "rename":
            holder[f"{key}_x"] = value
    elif op == "out_of_range" and fmt == "ofa-tsv":
        holder[key] = draw(st.sampled_from(["-7,0,10,10", "0,0,1e15,5", "0,0,inf,5", "0,-1e6,5,5", "10,10,70,20"]))
    elif op == "out_of_range":
        holder[key] = draw(st.sampled_from(OUT_OF_RANGE))
    elif fmt == "ofa-tsv":  # a column that is not what its position needs
        holder[key] = draw(st.sampled_from(TSV_BAD[key]))
    else:
        holder[key] = draw(st.sampled_from([v for v in OTHER_TYPES if kind(v) != kind(holder[key])]))
    return fmt, doc, op, None


@fuzz("converters")
@given(case=corruptions(), on_bad=st.sampled_from(["error", "skip"]))
def test_converters_give_named_errors_or_counted_skips(workdir, clean, case, on_bad):
    fmt, doc, op, truncate = case
    root = workdir / "case"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir()
    (root / "images").symlink_to(workdir / "conv" / "images")
    args = write_inputs(fmt, doc, root, truncate)
    try:
        report = convert(fmt, {**args, "progress": False, "workers": 1, "on_bad": on_bad}, root / "out")
    except ConversionError as e:
        assert str(e)
        event(f"{op}: ConversionError")
        return
    got = outputs(root / "out", fmt)
    wrong = [s for s in got if not one_of_the_clean_records(s, clean[fmt])]
    assert not wrong, f"{fmt} {op}: silently wrong records {wrong}"
    assert report["count"] == len(got)
    if op != "truncate" and len(got) < len(clean[fmt]):  # a record went missing: it must be counted
        assert sum(report["skipped"].values()) >= 1, f"{fmt} {op}: a record lost without a count"
    if on_bad == "error":
        assert report["skipped"] == {}
    event(f"{op}: " + ("counted skips" if report["skipped"] else "converted, every record a clean one"))


# ---- the shard reader -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shard_split(workdir):
    """A real small split: 4 caption samples in 2 shards (JPEG images), with its manifest."""
    split = workdir / "shards" / "val"
    writer = ShardWriter(split, "val", 2)
    doc = coco_doc()
    for sid, image_id in [("coco_139", 139), ("coco_285", 285), ("coco_632", 632), ("coco_139_crop", 139)]:
        refs = [a["caption"] for a in doc["annotations"] if a["image_id"] == image_id]
        writer.write({"id": sid, "task": "caption", "image_size": [64, 48], "prompt": " what does the image describe?",
                      "references": refs, "meta": {"image_id": image_id}}, IMAGES[image_id], "jpg")
    manifest = writer.close({"name": "fuzz"})
    return split, manifest, read_all(split, manifest)


def read_all(split: Path, manifest: dict) -> list[tuple[dict, bytes]]:
    return [parse_sample(split / s["name"], key, parts, "caption") for s in manifest["shards"]
            for key, parts in iter_tar(split / s["name"])]


# damage to one shard: byte flips (offset, xor mask) and / or a truncation, offsets taken modulo the shard's size
damage = st.tuples(
    st.sampled_from([0, 1]),
    st.sampled_from(["flip", "flips", "truncate", "flip_and_truncate"]).flatmap(lambda op: st.tuples(
        st.just([]) if op == "truncate" else st.lists(st.tuples(st.integers(0, 2**20), st.integers(1, 255)),
                                                      min_size=1, max_size=1 if op == "flip" else 8),
        st.integers(0, 2**20) if "truncate" in op else st.none())))


def apply_damage(split: Path, manifest: dict, target: Path, case: tuple) -> None:
    which, (flips, cut) = case
    name = manifest["shards"][which]["name"]
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(split, target)
    data = bytearray((split / name).read_bytes())
    for at, mask in flips:
        data[at % len(data)] ^= mask
    (target / name).write_bytes(bytes(data[:cut % len(data)] if cut is not None else data))


@fuzz("shard_reader_verified")
@given(case=damage)
def test_verified_reader_gives_data_error_or_the_exact_records(workdir, shard_split, case):
    split, manifest, originals = shard_split
    target = workdir / "damaged_verified"
    apply_damage(split, manifest, target, case)
    try:
        manifest = read_split_manifest(target, verify=True)
        got = read_all(target, manifest)
    except DataError as e:
        assert str(target) in str(e)
        event("DataError")
        return
    event("the original records")
    assert got == originals


@fuzz("shard_reader_streaming")
@given(case=damage)
def test_streaming_reader_gives_data_error_or_the_exact_records(workdir, shard_split, case):
    """The training loader's path: no sha256 pass first, each shard hashed while it streams (its manifest's
    sha256 checked after its last sample), every sample parsed and its image decoded."""
    split, manifest, originals = shard_split
    target = workdir / "damaged_streaming"
    apply_damage(split, manifest, target, case)
    got = []
    try:
        for shard in manifest["shards"]:
            for key, parts in iter_tar(target / shard["name"], shard["sha256"]):
                sample, image = parse_sample(target / shard["name"], key, parts, "caption")
                decode_image(image, 32, f"{target / shard['name']}: {key}")
                got.append((sample, image))
    except DataError as e:
        assert str(target) in str(e)
        event("DataError")
        return
    event("the original records")
    assert got == originals
