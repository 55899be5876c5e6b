"""train_nar: the NARVL student (LQT decoder, Q-CTC or CE loss), initialised from the AR teacher, optionally
trained on the teacher's decodes (KD). Uses the shared loop in `stages.train`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from narvl_model.losses import is_ctc_feasible
from stages.common import StageLog
from stages.config import TrainNARStage
from stages.train import TrainInputs, TrainJob, load_target_override, train

VERSION = 2
DISTILLED = "distilled.parquet"


@dataclass(frozen=True)
class Inputs:
    data: Path  # prepare_data
    teacher: Path  # train_teacher (checkpoint/)
    distill: Path | None = None  # with kd=true: distilled.parquet


def scan_feasibility(cfg: TrainNARStage, data_dir: Path, target_override: dict[str, str] | None) -> dict:
    """Count training targets that N = num_queries outputs cannot emit under CTC (N < length + eos + repeats).

    Every text a sample can be trained on is checked (all caption references / distinct VQA answers), or the
    distilled target where one replaces it.
    """
    from narvl_model.tokenizer import Tokenizer
    from stages.data.shards import iter_tar, parse_sample, read_split_manifest
    from stages.data.tasks import all_targets

    tok = Tokenizer.load(data_dir / "tokenizer")
    n_q = cfg.train.num_queries[cfg.task]
    split = data_dir / "train"
    manifest = read_split_manifest(split)
    samples = targets = infeasible_samples = infeasible_targets = 0
    max_len = 0
    for shard in manifest["shards"]:
        path = split / shard["name"]
        for key, parts in iter_tar(path):
            sample, _ = parse_sample(path, key, parts, cfg.task)
            texts = ([target_override[sample["id"]]] if target_override and sample["id"] in target_override
                     else all_targets(sample, tok.num_bins))
            bad = 0
            for text in texts:
                ids = tok.encode(text) + [tok.eos_id]
                max_len = max(max_len, len(ids))
                bad += not is_ctc_feasible(ids, n_q)
            samples += 1
            targets += len(texts)
            infeasible_targets += bad
            infeasible_samples += bad > 0
    return {"num_queries": n_q, "samples": samples, "targets": targets, "infeasible_targets": infeasible_targets,
            "infeasible_samples": infeasible_samples, "max_target_len_with_eos": max_len}


def job(cfg: TrainNARStage, inputs: Inputs, log: StageLog) -> tuple[TrainJob, dict]:
    """What every worker runs, and the stage's own figures for metrics.json (the Q-CTC feasibility scan)."""
    kd = cfg.train.kd_for(cfg.task)
    if kd and inputs.distill is None:
        raise ValueError(f"train_nar.kd: KD for {cfg.task} needs the distill stage's output (inputs.distill)")
    distill = inputs.distill if kd else None
    override = load_target_override(Path(distill) / DISTILLED) if distill else None
    scan = scan_feasibility(cfg, Path(inputs.data), override)
    if cfg.train.loss == "qctc" and scan["infeasible_targets"]:
        log.info(f"WARNING: {scan['infeasible_targets']} of {scan['targets']} training targets "
                 f"({scan['infeasible_samples']} samples) cannot be emitted by {scan['num_queries']} queries "
                 f"under Q-CTC (longest target {scan['max_target_len_with_eos']} tokens with eos); they get no "
                 f"gradient. Raise train_nar.num_queries.{cfg.task}.")
    else:
        log.info(f"Q-CTC feasibility: all {scan['targets']} targets fit {scan['num_queries']} queries")
    the_job = TrainJob("narvl", cfg.model_dump(mode="json"),
                       TrainInputs(data=inputs.data, teacher=inputs.teacher, distill=distill))
    return the_job, {"feasibility": scan, "kd": kd, "loss": cfg.train.loss}


def run(cfg: TrainNARStage, inputs: Inputs, out_dir: Path, log: StageLog) -> dict:
    """Train NARVL as one worker in this process; writes checkpoint/ (best by val loss), curves.parquet,
    metrics.json (with the feasibility scan). A rerun on the same out_dir resumes from its last checkpoint."""
    the_job, extra = job(cfg, inputs, log)
    return train(the_job, out_dir, log, extra)
