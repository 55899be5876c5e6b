"""distill: the AR teacher decodes the whole training split (beam search); its outputs become NARVL's KD targets.
It decodes the validation split too: a student trained on the teacher's outputs is validated against them (its
checkpoint is picked by that loss), not against annotations whose wording it was never asked to follow.

The split is decoded in `cfg.distill.num_actors` disjoint parts (the loader's rank/world split): `decode_part` is
one part, which the pipeline fans out over Ray workers with the stage's resources; `run` decodes the parts it is not
given in this process and writes the result.

Writes `distilled.parquet` (id, split, target, reference, references, differs, length; train and val rows) and
reports how many teacher outputs on the training split differ from the references (caption: from all of them) and
their length distribution.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from stages.common import StageLog, write_json_atomic
from stages.config import DistillStage

VERSION = 3  # 3: the validation split is decoded too
OUTPUT = "distilled.parquet"


@dataclass(frozen=True)
class Inputs:
    data: Path  # prepare_data
    teacher: Path  # train_teacher (checkpoint/)


def decode_part(cfg: DistillStage, inputs: Inputs, rank: int, world_size: int, device: str = "auto",
                split: str = "train") -> list[dict]:
    """Decode part `rank` of `world_size` of `split` with the teacher; one row per sample."""
    import torch

    from narvl_model.checkpoint import load_model
    from narvl_model.tokenizer import Tokenizer
    from stages.data.shards import make_loader
    from stages.data.tasks import all_targets, eval_target
    from stages.evaluate import decode_batch, pick_device

    dc = cfg.distill
    tok = Tokenizer.load(Path(inputs.data) / "tokenizer")
    dev = pick_device(device)
    model = load_model(Path(inputs.teacher) / "checkpoint").to(dev).eval()
    loader = make_loader(Path(inputs.data) / split, tok, cfg.task, dc.batch_size, train=False, num_workers=0,
                         rank=rank, world_size=world_size, image_size=model.cfg.image_size,
                         max_source_len=model.cfg.max_source_positions)
    rows = []
    with torch.no_grad():
        for batch in loader:
            outs = decode_batch(model, batch.image.to(dev), batch.src_tokens.to(dev), cfg.task, kind="ar",
                                beam_size=dc.beam_size, max_len=dc.max_len, no_repeat_ngram=dc.no_repeat_ngram)
            for key, sample, ids in zip(batch.ids, batch.samples, outs, strict=True):
                refs = all_targets(sample, tok.num_bins)
                rows.append({"id": key, "split": split, "target": tok.decode(ids),
                             "reference": eval_target(sample, tok.num_bins), "references": json.dumps(refs),
                             "differs": all(tok.encode(r) != list(ids) for r in refs), "length": len(ids)})
    return rows


def run(cfg: DistillStage, inputs: Inputs, out_dir: Path, log: StageLog,
        parts: list[list[dict]] | None = None) -> dict:
    """Decode the training split (the parts not given, here) and the validation split with the teacher; write
    distilled.parquet.

    Args:
        cfg: task and decoding settings (beam size, max length, no-repeat n-gram for captions, parts).
        inputs: the data and the teacher.
        out_dir: where distilled.parquet goes.
        log: the stage log.
        parts: the `decode_part` results of all `cfg.distill.num_actors` parts, when decoded elsewhere.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from stages.data.shards import count_samples

    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n = cfg.distill.num_actors
    if parts is None:
        parts = [decode_part(cfg, inputs, i, n) for i in range(n)]
    if len(parts) != n:
        raise ValueError(f"distill: {len(parts)} decoded parts given, expected {n}")
    rows = sorted((r for part in parts for r in part), key=lambda r: r["id"])
    val = decode_part(cfg, inputs, 0, 1, split="val")  # a few hundred samples: here, not fanned out
    for split, got in (("train", rows), ("val", val)):
        expected = count_samples(Path(inputs.data) / split)
        if len(got) != expected or len({r["id"] for r in got}) != len(got) or any(r["split"] != split for r in got):
            raise RuntimeError(f"distill: {len(got)} rows ({len({r['id'] for r in got})} distinct) for "
                               f"{expected} {split} samples")
    if {r["id"] for r in rows} & {r["id"] for r in val}:
        raise RuntimeError("distill: sample ids shared by the training and validation splits: the KD targets of "
                           "one would replace the other's")
    pq.write_table(pa.Table.from_pylist(rows + val), out_dir / OUTPUT)
    lengths = sorted(r["length"] for r in rows)
    differs = sum(r["differs"] for r in rows) / len(rows)
    summary = {
        "n": len(rows), "differs_share": differs, "empty_share": sum(x == 0 for x in lengths) / len(rows),
        "length_mean": sum(lengths) / len(rows), "length_p50": lengths[len(lengths) // 2],
        "length_p90": lengths[min(len(lengths) - 1, int(0.9 * len(lengths)))], "length_max": lengths[-1],
        "length_hist": {str(k): lengths.count(k) for k in sorted(set(lengths))},
        "num_parts": n, "n_val": len(val), "wall_s": time.perf_counter() - t0,
    }
    summary["samples_per_s"] = (len(rows) + len(val)) / summary["wall_s"]
    write_json_atomic(out_dir / "distill_report.json", summary)
    log.metrics({f"distill/{k}": float(v) for k, v in summary.items() if not isinstance(v, dict)})
    log.info(f"distill {cfg.task}: {len(rows)} targets, {100 * differs:.1f}% differ from the references, "
             f"mean length {summary['length_mean']:.1f} (max {lengths[-1]}), {summary['wall_s']:.1f} s")
    return summary
