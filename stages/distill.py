"""distill: the AR teacher decodes the whole training split (beam search); its outputs become NARVL's KD targets.

Decoding runs on a pool of Ray actors, each reading a disjoint part of the shards (the loader's rank/world split).
Writes `distilled.parquet` (id, target, reference, references, differs, length) and reports how many teacher
outputs differ from the references (caption: from all of them) and their length distribution.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import ray

from stages.common import StageLog, write_json_atomic
from stages.config import DistillStage

VERSION = 1


def decode_part(cfg_json: dict, data_dir: str, teacher_dir: str, rank: int, world_size: int) -> list[dict]:
    """Decode this part of the training split with the teacher; one row per sample."""
    import torch

    from narvl_model.checkpoint import load_model
    from narvl_model.tokenizer import Tokenizer
    from stages.data.shards import make_loader
    from stages.data.tasks import all_targets, eval_target
    from stages.evaluate import decode_batch, pick_device

    cfg = DistillStage.model_validate(cfg_json)
    dc = cfg.distill
    tok = Tokenizer.load(Path(data_dir) / "tokenizer")
    device = pick_device()
    model = load_model(Path(teacher_dir) / "checkpoint").to(device).eval()
    loader = make_loader(Path(data_dir) / "train", tok, cfg.task, dc.batch_size, train=False, num_workers=0,
                         rank=rank, world_size=world_size, image_size=model.cfg.image_size,
                         max_source_len=model.cfg.max_source_positions)
    rows = []
    with torch.no_grad():
        for batch in loader:
            outs = decode_batch(model, batch.image.to(device), batch.src_tokens.to(device), cfg.task, kind="ar",
                                beam_size=dc.beam_size, max_len=dc.max_len, no_repeat_ngram=dc.no_repeat_ngram)
            for key, sample, ids in zip(batch.ids, batch.samples, outs, strict=True):
                refs = all_targets(sample, tok.num_bins)
                rows.append({"id": key, "target": tok.decode(ids), "reference": eval_target(sample, tok.num_bins),
                             "references": json.dumps(refs),
                             "differs": all(tok.encode(r) != list(ids) for r in refs), "length": len(ids)})
    return rows


@ray.remote(num_cpus=1)
class _Decoder:
    """One actor of the pool: decodes its share of the shards."""

    def run(self, cfg_json: dict, data_dir: str, teacher_dir: str, rank: int, world_size: int) -> list[dict]:
        return decode_part(cfg_json, data_dir, teacher_dir, rank, world_size)


def run(cfg: DistillStage, inputs: dict[str, Path], out_dir: Path, log: StageLog) -> dict:
    """Decode the training split with the teacher on `cfg.distill.num_actors` Ray actors.

    Args:
        cfg: task and decoding settings (beam size, max length, no-repeat n-gram for captions, actors).
        inputs: {"prepare_data": data folder, "train_teacher": folder with checkpoint/}.
        out_dir: where distilled.parquet goes.
        log: the stage log.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from stages.data.shards import count_samples
    from stages.train import _ensure_ray

    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data_dir = str(Path(inputs["prepare_data"]).resolve())
    teacher_dir = str(Path(inputs["train_teacher"]).resolve())
    n = cfg.distill.num_actors
    _ensure_ray()
    actors = [_Decoder.remote() for _ in range(n)]
    parts = ray.get([a.run.remote(cfg.model_dump(mode="json"), data_dir, teacher_dir, i, n)
                     for i, a in enumerate(actors)])
    for a in actors:
        ray.kill(a)
    rows = sorted((r for part in parts for r in part), key=lambda r: r["id"])
    expected = count_samples(Path(data_dir) / "train")
    if len(rows) != expected or len({r["id"] for r in rows}) != len(rows):
        raise RuntimeError(f"distill: {len(rows)} rows ({len({r['id'] for r in rows})} distinct) for "
                           f"{expected} training samples")
    pq.write_table(pa.Table.from_pylist(rows), out_dir / "distilled.parquet")
    lengths = sorted(r["length"] for r in rows)
    differs = sum(r["differs"] for r in rows) / len(rows)
    summary = {
        "n": len(rows), "differs_share": differs, "empty_share": sum(x == 0 for x in lengths) / len(rows),
        "length_mean": sum(lengths) / len(rows), "length_p50": lengths[len(lengths) // 2],
        "length_p90": lengths[min(len(lengths) - 1, int(0.9 * len(lengths)))], "length_max": lengths[-1],
        "length_hist": {str(k): lengths.count(k) for k in sorted(set(lengths))},
        "num_actors": n, "wall_s": time.perf_counter() - t0,
    }
    summary["samples_per_s"] = len(rows) / summary["wall_s"]
    write_json_atomic(out_dir / "distill_report.json", summary)
    log.metrics({f"distill/{k}": float(v) for k, v in summary.items() if not isinstance(v, dict)})
    log.info(f"distill {cfg.task}: {len(rows)} targets, {100 * differs:.1f}% differ from the references, "
             f"mean length {summary['length_mean']:.1f} (max {lengths[-1]}), {summary['wall_s']:.1f} s")
    return summary
