"""Stage prepare_data: the shards of one task's train/val/test splits and the tokenizer trained on train texts.

data.source = "shapes" generates the built-in benchmark; "shards" copies the task's split folders written by
`narvl data convert` (or `narvl data synth`) after verifying their manifests.
"""

from __future__ import annotations

import io
import json
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from narvl_model.tokenizer import Tokenizer
from stages.common import StageLog
from stages.config import TASKS, DataConfig, PrepareDataStage
from stages.data import shapes
from stages.data.shards import (
    IMAGE_EXTS,
    DataError,
    ShardWriter,
    iter_tar,
    parse_sample,
    parse_sample_json,
    read_split_manifest,
)
from stages.data.tasks import all_targets, sample_texts

VERSION = 4  # 3: shapes generator 3 (VQA annotator disagreement, image-dependent entailment); 4: one BPE for all tasks
MAX_LOGGED_SKIPS = 20  # skipped samples named one per log line; the rest are counted


@dataclass(frozen=True)
class Inputs:
    """prepare_data reads no other stage."""
SPLITS = ("train", "val", "test")


def _split_sizes(data: DataConfig) -> dict[str, int]:
    return {"train": data.train_per_task, "val": data.val_per_task, "test": data.test_per_task}


def write_shapes_split(task: str, split: str, n: int, data: DataConfig, split_dir: Path) -> dict:
    """Generate one split of the built-in benchmark into shards; returns its manifest."""
    writer = ShardWriter(split_dir, split, data.samples_per_shard)
    for sample, png in shapes.generate(task, split, n, data.image_size, data.seed, data.max_objects):
        writer.write(sample, png, "png")
    return writer.close({"name": "shapes", "version": shapes.GENERATOR_VERSION, "seed": data.seed,
                         "image_size": data.image_size, "max_objects": data.max_objects})


def iter_split_samples(split_dir: Path, task: str):
    """The JSON of every sample of a split folder, in manifest order."""
    manifest = read_split_manifest(split_dir)
    for shard in manifest["shards"]:
        path = split_dir / shard["name"]
        for key, parts in iter_tar(path):
            yield parse_sample(path, key, parts, task)[0]


def sample_problem(shard: Path, key: str, parts: dict[str, bytes], task: str) -> str | None:
    """Why one sample of a shard cannot be used (schema, value types, image header and size), or None."""
    try:
        sample, image = parse_sample(shard, key, parts, task)
    except DataError as e:
        return str(e)
    try:
        with Image.open(io.BytesIO(image)) as im:
            size = list(im.size)
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bytes that are not an image
        return f"{shard}: sample {key!r}: image does not open ({type(e).__name__}: {e})"
    if size != sample["image_size"]:
        return f"{shard}: sample {key!r}: image is {size[0]}x{size[1]}, its JSON says image_size {sample['image_size']}"
    return None


def _checked_samples(split_dir: Path, manifest: dict, task: str, on_bad: str, skipped: list[str]
                     ) -> Iterator[tuple[dict, bytes, str]]:
    """(json, image bytes, ext) of every usable sample of a split; a bad one raises DataError (on_bad=error) or is
    appended to `skipped` (on_bad=skip). A duplicate id is a bad sample; a shard holding another count of samples
    than its manifest entry is an error either way."""
    seen: set[str] = set()
    for shard in manifest["shards"]:
        path, n = split_dir / shard["name"], 0
        for key, parts in iter_tar(path):
            n += 1
            problem = sample_problem(path, key, parts, task)
            if problem is None:
                sample = parse_sample_json(f"{path}: sample {key!r}", parts["json"], task)
                if sample["id"] in seen:
                    problem = f"{path}: sample {key!r}: id {sample['id']!r} appears twice in the split"
            if problem is not None:
                if on_bad != "skip":
                    raise DataError(f"{problem} (data.on_bad_sample=skip leaves it out)")
                skipped.append(problem)
                continue
            seen.add(sample["id"])
            ext = next(e for e in IMAGE_EXTS if e in parts)
            yield sample, parts[ext], ext
        if n != shard["count"]:
            raise DataError(f"{path}: holds {n} samples, its manifest entry says {shard['count']}")


def copy_split(src: Path, dst: Path, task: str, on_bad: str) -> tuple[dict, list[str]]:
    """Copy a split folder written by `narvl data convert` / `synth` after verifying its manifest (sha256 of every
    shard) and checking every sample. Returns (the copy's manifest, the skipped samples' messages): with
    on_bad=skip a split holding bad samples is rewritten without them; otherwise the shards are copied as they
    are."""
    manifest = read_split_manifest(src, verify=True)
    if manifest["task"] not in (None, task):
        raise DataError(f"{src}/manifest.json holds task {manifest['task']!r}, expected {task!r}")
    skipped: list[str] = []
    usable = sum(1 for _ in _checked_samples(src, manifest, task, on_bad, skipped))
    if usable == 0:
        raise DataError(f"{src}: no usable sample ({len(skipped)} bad, e.g. {skipped[0] if skipped else '-'})")
    if dst.exists():
        shutil.rmtree(dst)
    if skipped:
        per_shard = max((s["count"] for s in manifest["shards"]), default=1) or 1
        writer = ShardWriter(dst, manifest["split"], per_shard)
        for sample, image, ext in _checked_samples(src, manifest, task, on_bad, []):
            writer.write(sample, image, ext)
        info = manifest.get("dataset") or {}
        return writer.close({**info, "skipped_by_prepare_data": len(skipped)}), skipped
    dst.mkdir(parents=True)
    for shard in manifest["shards"]:
        shutil.copy2(src / shard["name"], dst / shard["name"])
    shutil.copy2(src / "manifest.json", dst / "manifest.json")  # last: the folder is complete
    return manifest, skipped


def build_tokenizer(data: DataConfig, train_dir: Path, task: str) -> Tokenizer:
    """OFA's vocabulary from data.ofa_bpe_dir, or a BPE trained on the prompts and targets of the train split."""
    if data.tokenizer == "ofa":
        d = Path(data.ofa_bpe_dir)
        return Tokenizer.from_ofa_files(d / "encoder.json", d / "vocab.bpe", d / "dict.txt",
                                        num_bins=data.num_bins)
    if data.source == "shapes":
        # One vocabulary for the whole benchmark: trained on the texts of all four tasks over the training scenes,
        # the same whichever task this folder holds, so that one teacher can serve every task (a multi-task
        # teacher, train_teacher.shared) and auxiliary tasks (train_teacher.aux_tasks) tokenise as well as the
        # task's own texts.
        texts = (t for i in range(data.train_per_task) for tk in TASKS
                 for t in sample_texts(shapes.sample_json(tk, "train", i, data.image_size, data.seed,
                                                          data.max_objects), data.num_bins))
    else:
        texts = (t for s in iter_split_samples(train_dir, task) for t in sample_texts(s, data.num_bins))
    return Tokenizer.train(texts, vocab_size=data.bpe_vocab_size, num_bins=data.num_bins)


def token_stats(split_dir: Path, task: str, tok: Tokenizer) -> dict[str, int]:
    """Longest target (any reference / answer; without EOS) and longest prompt (without bos/eos), in tokens."""
    max_t = max_s = 0
    for s in iter_split_samples(split_dir, task):
        max_t = max([max_t, *(len(tok.encode(t)) for t in all_targets(s, tok.num_bins))])
        max_s = max(max_s, len(tok.encode(s["prompt"])))
    return {"max_target_tokens": max_t, "max_prompt_tokens": max_s}


def run(cfg: PrepareDataStage, inputs: Inputs, out_dir: Path, log: StageLog) -> dict:
    """Write out_dir/{train,val,test}/ shards + manifests and out_dir/tokenizer/; return counts and timings."""
    out_dir = Path(out_dir)
    data, task = cfg.data, cfg.task
    t0 = time.perf_counter()
    report: dict = {"task": task, "source": data.source, "splits": {}}
    if data.source == "shapes":
        for split, n in _split_sizes(data).items():
            t = time.perf_counter()
            manifest = write_shapes_split(task, split, n, data, out_dir / split)
            dt = time.perf_counter() - t
            report["splits"][split] = {"count": manifest["count"], "shards": len(manifest["shards"]),
                                       "seconds": round(dt, 3), "samples_per_s": round(manifest["count"] / dt, 1)}
            log.info(f"prepare_data {task}/{split}: {manifest['count']} samples in {dt:.1f}s")
            log.progress(len(report["splits"]), len(SPLITS))
    else:
        src = Path(data.shards_dir) / task
        for split in SPLITS:
            t = time.perf_counter()
            if split == "test" and not (src / split).exists():
                # real datasets often come as train/val only (COCO 2017): evaluate with evaluate.split=val
                log.info(f"prepare_data {task}: {src / split} absent; no test split (set evaluate.split=val)")
                continue
            manifest, skipped = copy_split(src / split, out_dir / split, task, data.on_bad_sample)
            dt = time.perf_counter() - t
            report["splits"][split] = {"count": manifest["count"], "shards": len(manifest["shards"]),
                                       "seconds": round(dt, 3), "dataset": manifest.get("dataset"),
                                       "skipped": len(skipped)}
            for msg in skipped[:MAX_LOGGED_SKIPS]:
                log.info(f"prepare_data {task}/{split}: skipped bad sample: {msg}")
            if len(skipped) > MAX_LOGGED_SKIPS:
                log.info(f"prepare_data {task}/{split}: ... and {len(skipped) - MAX_LOGGED_SKIPS} more")
            log.info(f"prepare_data {task}/{split}: copied {manifest['count']} samples from {src / split}"
                     + (f", skipped {len(skipped)} bad ones (data.on_bad_sample=skip)" if skipped else ""))
    t = time.perf_counter()
    tok = build_tokenizer(data, out_dir / "train", task)
    tok.save(out_dir / "tokenizer")
    report["tokenizer"] = {"kind": tok.kind, "vocab_size": tok.vocab_size, "num_bins": tok.num_bins,
                           "blank_id": tok.blank_id, "seconds": round(time.perf_counter() - t, 3)}
    for split in report["splits"]:
        report["splits"][split].update(token_stats(out_dir / split, task, tok))
    report["seconds"] = round(time.perf_counter() - t0, 3)
    total = sum(s["count"] for s in report["splits"].values())
    report["samples_per_s"] = round(total / max(report["seconds"], 1e-9), 1)
    report["skipped"] = sum(s.get("skipped", 0) for s in report["splits"].values())
    log.metrics({"prepare_data/samples": float(total), "prepare_data/seconds": report["seconds"],
                 "prepare_data/skipped": float(report["skipped"]),
                 "prepare_data/vocab_size": float(tok.vocab_size),
                 **{f"prepare_data/{s}_max_target_tokens": float(v["max_target_tokens"])
                    for s, v in report["splits"].items()}})
    (out_dir / "prepare_report.json").write_text(json.dumps(report, indent=2))
    return report


def synth_all(data_cfg: DataConfig, tasks: list[str] | tuple[str, ...], out_dir: Path, log: StageLog) -> dict:
    """Write the built-in benchmark as out_dir/<task>/{train,val,test}/ shards (input for data.source=shards)."""
    out_dir = Path(out_dir)
    report: dict = {}
    for task in tasks:
        report[task] = {}
        for split, n in _split_sizes(data_cfg).items():
            t = time.perf_counter()
            manifest = write_shapes_split(task, split, n, data_cfg, out_dir / task / split)
            dt = time.perf_counter() - t
            report[task][split] = {"count": manifest["count"], "shards": len(manifest["shards"]),
                                   "samples_per_s": round(manifest["count"] / dt, 1)}
            log.info(f"synth {task}/{split}: {manifest['count']} samples in {dt:.1f}s -> {out_dir / task / split}")
    return report
