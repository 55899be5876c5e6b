"""Bad input gives a named error (file / record / field and what was expected) or a counted skip, never a
traceback; the console prints user strings literally. Small hand-written records: no ../shared/realdata needed."""

from __future__ import annotations

import io
import json
import os
import re
from pathlib import Path

import pytest
import typer
from PIL import Image
from rich.console import Console
from typer.testing import CliRunner

from pipeline.cli import app, summary_table
from pipeline.config import ConfigError, load_config
from pipeline.executor import NodeStatus
from pipeline.progress import ProgressView, status_table
from stages import prepare_data
from stages.common import PrintLog
from stages.config import DataConfig, PrepareDataStage
from stages.data.converters import ConversionError, convert
from stages.data.shards import DataError, ShardWriter, read_split_manifest

runner = CliRunner(env={"COLUMNS": "240"})  # wide: rich wraps help and errors at the terminal width
FAST = {"progress": False, "workers": 1, "samples_per_shard": 4}


def jpeg(path: Path, size: tuple[int, int] = (48, 40)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (90, 160, 30)).save(path, format="JPEG")
    return path


def write_json(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data))
    return path


def write_jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def images(tmp_path: Path) -> Path:
    for i in (1, 2, 3):
        jpeg(tmp_path / "images" / f"{i:012d}.jpg")
    return tmp_path / "images"


# ---- converters: a malformed record is a named error, or a counted skip that keeps every good record ----------
def coco(tmp_path: Path, images: Path, bad: str) -> tuple[dict, int]:
    ims = [{"id": i, "file_name": f"{i:012d}.jpg"} for i in (1, 2, 3)]
    anns = [{"image_id": i, "caption": f"caption {i}.{k}"} for i in (1, 2, 3) for k in (0, 1)]
    if bad == "annotation_without_image_id":
        del anns[1]["image_id"]
    else:  # an image without id: its captions reach no image either (counted apart)
        del ims[2]["id"]
    path = write_json(tmp_path / "captions.json", {"images": ims, "annotations": anns})
    return {"images": images, "captions": {"train": path}}, 3 if bad == "annotation_without_image_id" else 2


def refcoco(tmp_path: Path, images: Path, bad: str) -> tuple[dict, int]:
    rows = [{"file_name": f"{i:012d}.jpg", "bbox_xywh": [2, 3, 10, 12], "sentence": f"thing {i}", "image_id": i,
             "ann_id": 100 + i} for i in (1, 2, 3)]
    if bad == "box_with_three_numbers":
        rows[1]["bbox_xywh"] = [2, 3, 10]
    else:
        del rows[1]["bbox_xywh"]
    return {"images": images, "jsonl": {"val": write_jsonl(tmp_path / "refs.jsonl", rows)}}, 2


def vqa(tmp_path: Path, images: Path, bad: str) -> tuple[dict, int]:
    qs = [{"question_id": 10 + i, "image_id": i, "question": f"what is {i}?"} for i in (1, 2, 3)]
    qs[1]["image_id"] = "2"  # bad == "string_image_id"
    anns = [{"question_id": 10 + i, "answers": [{"answer": "yes", "answer_confidence": "yes"}] * 10}
            for i in (1, 2, 3)]
    return {"images": images, "questions": {"val": write_json(tmp_path / "q.json", {"questions": qs})},
            "annotations": {"val": write_json(tmp_path / "a.json", {"annotations": anns})}}, 2


CASES = {  # (format, make the inputs, the bad record, the error's pattern, the skip counts)
    "annotation_without_image_id": ("coco-caption", coco, r"captions\.json: annotations\[1\]: malformed: "
                                    r"no 'image_id' field \(expected an integer\)", {"malformed": 1}),
    "image_without_id": ("coco-caption", coco, r"captions\.json: images\[2\]: malformed: no 'id' field",
                         {"malformed": 3}),  # the image and its two captions
    "box_with_three_numbers": ("refcoco", refcoco, r"refs\.jsonl: record 1: malformed: 'bbox_xywh' is \[2, 3, 10\] "
                               r"\(list\), expected \[x, y, width, height\]", {"malformed": 1}),
    "record_without_box": ("refcoco", refcoco, r"refs\.jsonl: record 1: malformed: no 'bbox_xywh' field",
                           {"malformed": 1}),
    "string_image_id": ("vqa", vqa, r"q\.json: questions\[1\] \(id 'vqa_12'\): malformed: 'image_id' is '2' "
                        r"\(str\), expected an integer", {"malformed": 1}),
}


@pytest.mark.parametrize("bad", list(CASES))
def test_malformed_record_is_named_or_counted(tmp_path, images, bad):
    fmt, make, pattern, skipped = CASES[bad]
    args, good = make(tmp_path, images, bad)
    with pytest.raises(ConversionError, match=pattern):
        convert(fmt, {**args, **FAST}, tmp_path / "error")
    report = convert(fmt, {**args, **FAST, "on_bad": "skip"}, tmp_path / "skip")
    assert report["skipped"] == skipped and report["count"] == good
    split = next(iter(report["splits"]))
    manifest = read_split_manifest(tmp_path / "skip" / report["task"] / split, verify=True)
    assert manifest["count"] == good and manifest["dataset"]["skipped"] == skipped


def test_coco_skip_keeps_the_other_captions_of_an_image(tmp_path, images):
    from stages.data.shards import iter_split_json

    args, _ = coco(tmp_path, images, "annotation_without_image_id")
    report = convert("coco-caption", {**args, **FAST, "on_bad": "skip"}, tmp_path / "o")
    refs = {s["id"]: s["references"] for s in iter_split_json(tmp_path / "o/caption/train", "caption")}
    assert refs == {"coco_1": ["caption 1.0"], "coco_2": ["caption 2.0", "caption 2.1"],
                    "coco_3": ["caption 3.0", "caption 3.1"]}
    assert "malformed=1" in report["summary"]


def test_unreadable_sources_are_named(tmp_path, images):
    (tmp_path / "binary.jsonl").write_bytes(b'{"a": 1}\n\xff\xfe\x00garbage\n')
    with pytest.raises(ConversionError, match=r"binary\.jsonl: record 0: malformed: no 'ann_id'"):
        convert("refcoco", {"images": images, "jsonl": {"val": tmp_path / "binary.jsonl"}, **FAST}, tmp_path / "a")
    with pytest.raises(ConversionError, match=r"captions\.json: not valid JSON"):
        (tmp_path / "captions.json").write_text('{"images": [')
        convert("coco-caption", {"images": images, "captions": {"train": tmp_path / "captions.json"}, **FAST},
                tmp_path / "b")
    with pytest.raises(ConversionError, match=r"captions\.json: expected a JSON object holding the 'images' list"):
        write_json(tmp_path / "captions.json", [1, 2])
        convert("coco-caption", {"images": images, "captions": {"train": tmp_path / "captions.json"}, **FAST},
                tmp_path / "c")
    with pytest.raises(ConversionError, match=r"\.json: cannot read \(IsADirectoryError"):
        (tmp_path / "dir.json").mkdir()
        convert("coco-caption", {"images": images, "captions": {"train": tmp_path / "dir.json"}, **FAST},
                tmp_path / "d")
    for key, value, pattern in (("on_bad", "ignore", "on_bad='ignore'"), ("workers", 0, "workers=0"),
                                ("samples_per_shard", 0, "samples_per_shard=0")):
        with pytest.raises(ConversionError, match=pattern):
            convert("refcoco", {"images": images, "jsonl": {"val": tmp_path / "binary.jsonl"}, **FAST, key: value},
                    tmp_path / "e")
    assert not (tmp_path / "e").exists()  # refused before anything is written


# ---- command line -----------------------------------------------------------------------------------------
def _user_error(args: list[str], needle: str) -> str:
    res = runner.invoke(app, args)
    assert res.exit_code == 2, res.output
    text = " ".join(re.sub(r"[│╭╮╰╯─]", " ", res.output).split())  # without the frame rich draws around errors
    assert needle in text and "Traceback" not in res.output, res.output
    return text


def test_convert_options_are_checked_by_the_command_line(tmp_path, images):
    refs, _ = refcoco(tmp_path, images, "record_without_box")
    base = ["data", "convert", "refcoco", "--out", str(tmp_path / "o"), "--images", str(images),
            "--jsonl", f"val={refs['jsonl']['val']}"]
    _user_error([*base, "--on-bad", "ignore"], "'ignore' is not one of 'error', 'skip'")
    _user_error([*base, "--samples-per-shard", "0"], "--samples-per-shard")
    _user_error([*base, "--workers", "0"], "--workers")
    _user_error([*base, "--tsv", "val=x.tsv"], "No such option: --tsv")  # another format's input
    _user_error(["data", "convert", "nope", "--out", str(tmp_path / "o")], "unknown format 'nope'")
    _user_error(base, "record 1: malformed: no 'bbox_xywh' field")
    res = runner.invoke(app, [*base, "--on-bad", "skip"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["skipped"] == {"malformed": 1}


FORMAT_INPUTS = {
    "coco-caption": ("--captions", "--karpathy", "--images"),
    "vqa": ("--questions", "--annotations", "--images"),
    "refcoco": ("--jsonl", "--refs", "--instances", "--images"),
    "snli-ve": ("--jsonl", "--images"),
    "ofa-tsv": ("--task", "--tsv"),
}


@pytest.mark.parametrize("fmt", list(FORMAT_INPUTS))
def test_convert_help_lists_that_formats_inputs(fmt):
    res = runner.invoke(app, ["data", "convert", fmt, "--help"])
    assert res.exit_code == 0, res.output
    options = set(re.findall(r"(--[a-z][a-z-]+)", res.output))
    others = {o for f, opts in FORMAT_INPUTS.items() if f != fmt for o in opts} - set(FORMAT_INPUTS[fmt])
    assert set(FORMAT_INPUTS[fmt]) <= options and not others & options, (fmt, options)
    assert {"--out", "--on-bad", "--samples-per-shard", "--split-map"} <= options


def test_config_and_sweep_files(tmp_path):
    _user_error(["config", "show", "--config", str(tmp_path)], "is a folder; give a YAML file")
    _user_error(["run", "--config", str(tmp_path), "--root", str(tmp_path / "r")], "is a folder")
    (tmp_path / "sweep.yaml").write_text("name: x\npipeline: smoke\nnum_queries: {vqa: [4, 6\n")
    _user_error(["sweep", "--config", str(tmp_path / "sweep.yaml"), "--root", str(tmp_path / "r")],
                "sweep.yaml: not valid YAML")
    (tmp_path / "list.yaml").write_text("- pipeline: smoke\n")
    _user_error(["sweep", "--config", str(tmp_path / "list.yaml")], "expected a mapping (key: value lines)")
    _user_error(["sweep", "--config", str(tmp_path)], "sweep config")
    (tmp_path / "grid.yaml").write_text("pipeline: smoke\nnum_queries: {vqa: [0]}\n")
    _user_error(["sweep", "--config", str(tmp_path / "grid.yaml")], "num_queries.vqa")
    _user_error(["config", "show", "-p", "smoke", "train_nar.lr=[1"], "the value is not valid YAML")
    _user_error(["config", "show", "-p", "smoke", "train_nar..lr=1"], "not a dotted field name")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("override", ["seed=-1", "data.seed=-3"])
def test_negative_seeds_fail_validation(override):
    with pytest.raises(ConfigError, match=rf"{override.split('=')[0]}: Input should be greater than or equal to 0"):
        load_config(profile="smoke", overrides=[override])


@pytest.mark.parametrize("override", ["train_nar.weight_decay=.inf", "train_teacher.warmup_ratio=.nan"])
def test_infinite_and_nan_numbers_fail_validation(override):
    with pytest.raises(ConfigError, match=rf"{override.split('=')[0]}: Input should be a finite number"):
        load_config(profile="smoke", overrides=[override])


def test_output_and_root_paths(tmp_path):
    (tmp_path / "file").write_text("x")
    synth = ["data", "synth", "-p", "smoke", "--tasks", "caption", "data.train_per_task=2", "data.val_per_task=1",
             "data.test_per_task=1"]
    _user_error([*synth, "--out", str(tmp_path / "file")], "is a file; give a folder")
    _user_error([*synth, "--out", str(tmp_path / "file" / "sub")], "is not a writable folder")
    if Path("/sys").is_dir():  # sysfs refuses new folders even to root
        _user_error([*synth, "--out", "/sys/narvl-never"], "is not a writable folder")
    if os.geteuid() != 0:  # root writes through permission bits
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        _user_error([*synth, "--out", str(ro)], "is not a writable folder")
    _user_error(["run", "-p", "smoke", "--tasks", "caption", "--root", str(tmp_path / "file")], "is a file")
    _user_error(["plan", "-p", "smoke", "--tasks", "caption", "--root", str(tmp_path / "file")], "is a file")
    res = runner.invoke(app, [*synth, "--out", str(tmp_path / "ok")])
    assert res.exit_code == 0, res.output


# ---- prepare_data honours data.on_bad_sample ---------------------------------------------------------------
def _png(size: tuple[int, int] = (32, 32)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (1, 2, 3)).save(buf, format="PNG")
    return buf.getvalue()


def test_prepare_data_skips_and_counts_or_names_bad_samples(tmp_path):
    tiny = dict(image_size=32, train_per_task=8, val_per_task=4, test_per_task=4, samples_per_shard=4,
                bpe_vocab_size=300, num_bins=16)
    prepare_data.synth_all(DataConfig(**tiny), ["caption"], tmp_path / "src", PrintLog())
    val = tmp_path / "src/caption/val"
    good = [{"id": f"ok{i}", "task": "caption", "image_size": [32, 32], "prompt": " what does the image describe?",
             "references": [f"a thing number {i}"]} for i in range(3)]
    writer = ShardWriter(val, "val", 2)
    for s in good:
        writer.write(s, _png(), "png")
    writer.write({**good[0], "id": "broken_image"}, b"not an image", "png")
    writer.write({**good[0], "id": "wrong_type", "references": "one string"}, _png(), "png")
    writer.write({**good[0], "id": "wrong_size"}, _png((40, 30)), "png")
    writer.close({"name": "hand-made"})

    def run(on_bad: str, out: str) -> tuple[dict, PrintLog]:
        cfg = PrepareDataStage(task="caption", data=DataConfig(**tiny, source="shards", on_bad_sample=on_bad,
                                                               shards_dir=str(tmp_path / "src")))
        log = PrintLog()
        return prepare_data.run(cfg, prepare_data.Inputs(), tmp_path / out, log), log

    with pytest.raises(DataError, match=r"val-000001\.tar: sample 'broken_image': image does not open"):
        run("error", "e")
    report, log = run("skip", "s")
    assert report["splits"]["val"]["skipped"] == 3 and report["skipped"] == 3 and log.last("prepare_data/skipped") == 3
    manifest = read_split_manifest(tmp_path / "s/val", verify=True)
    assert manifest["count"] == report["splits"]["val"]["count"] == 3
    assert manifest["dataset"]["skipped_by_prepare_data"] == 3
    from stages.data.shards import iter_split_json

    assert [s["id"] for s in iter_split_json(tmp_path / "s/val", "caption")] == ["ok0", "ok1", "ok2"]
    assert report["splits"]["train"]["skipped"] == 0 and report["splits"]["train"]["count"] == 8


# ---- console: names and messages are printed literally ---------------------------------------------------------
def _render(renderable) -> str:
    console = Console(file=io.StringIO(), width=200, color_system=None)
    console.print(renderable)
    return console.file.getvalue()


def test_summary_table_keeps_ablation_names():
    row = {"metric": "CIDEr", "value": 1.0}
    summary = {"profile": "[/x]", "tasks": {"caption": {"ar": row, "narvl": row}},
               "ablations": {"caption": {"ce": {**row, "value": 3.0}, "no_kd": {**row, "value": 4.0},
                                         "ce_no_kd": {**row, "value": 5.0}}}}
    out = _render(summary_table(summary))
    assert "AR vs NARVL ([/x])" in out
    for name in ("ce", "no_kd", "ce_no_kd"):
        assert f"CIDEr [{name}]" in out


def test_progress_and_errors_print_brackets_literally(tmp_path, capsys):
    statuses = [NodeStatus("caption/evaluate_narvl[ce]", "caption", "evaluate_narvl[ce]", "evaluate", "k" * 12,
                           "run", "failed", started=1.0, finished=2.0),
                NodeStatus("caption/train_nar[/x]", "caption", "train_nar[/x]", "train_nar", "k" * 12, "run",
                           "running")]
    out = _render(status_table(statuses))
    assert "caption/evaluate_narvl[ce]" in out and "caption/train_nar[/x]" in out
    console = Console(file=io.StringIO(), width=200, color_system=None)
    with ProgressView(console) as view:
        view.update(statuses)
    assert "caption/evaluate_narvl[ce]: failed (1.0s)" in console.file.getvalue()
    assert "caption/train_nar[/x]: running" in console.file.getvalue()

    from pipeline import cli

    with pytest.raises(typer.Exit) as exc:
        raise cli._err("a message with [/x] and [bold]not bold[/bold]")
    assert exc.value.exit_code == 2
    assert "error: a message with [/x] and [bold]not bold[/bold]" in capsys.readouterr().err

    root = ["--root", str(tmp_path / "root"), "-p", "smoke", "--tasks", "caption", "ablations=[ce, no_kd, ce_no_kd]"]
    res = runner.invoke(app, ["plan", *root])
    assert res.exit_code == 0, res.output
    for name in ("train_nar[ce]", "evaluate_narvl[no_kd]", "train_nar[ce_no_kd]"):
        assert name in res.output
    _user_error(["run", *root, "--only", "evaluate_narvl[ce]"], "caption/evaluate_narvl[ce] needs its input")
    # an error quoting a user's path that holds "[/"
    _user_error(["data", "convert", "snli-ve", "--out", str(tmp_path / "o"), "--images", str(tmp_path),
                 "--jsonl", f"test={tmp_path}/[/x]none.jsonl"], "[/x]none.jsonl: file not found")


# ---- shards: a changed byte inside a member's data is seen by the streaming reader ----------------------------
def test_loader_sees_a_changed_byte_that_the_tar_format_cannot(tmp_path):
    from narvl_model.tokenizer import Tokenizer
    from stages.data.shards import make_loader

    writer = ShardWriter(tmp_path / "val", "val", 8)
    for i in range(3):
        writer.write({"id": f"s{i}", "task": "caption", "image_size": [32, 32], "prompt": " what does the image "
                      "describe?", "references": [f"a red square number {i}"]}, _png(), "png")
    manifest = writer.close({"name": "hand-made"})
    shard = tmp_path / "val" / manifest["shards"][0]["name"]
    data = shard.read_bytes()
    shard.write_bytes(data.replace(b"a red square number 1", b"a red square number 7"))  # valid JSON, wrong text
    tok = Tokenizer.train(["a red square number 0 1 7", " what does the image describe?"], vocab_size=300,
                          num_bins=16)
    with pytest.raises(DataError, match=r"val-000000\.tar: sha256 differs from the manifest's"):
        list(make_loader(tmp_path / "val", tok, "caption", 2))
    loader = make_loader(tmp_path / "val", tok, "caption", 2, on_bad_sample="skip")
    list(loader)
    assert any("sha256 differs" in s for s in loader.skipped)
