"""train_nar: the NARVL student (LQT decoder, Q-CTC or CE loss), initialised from the AR teacher, optionally
trained on the teacher's decodes (KD). Uses the shared loop in `stages.train`."""

from __future__ import annotations

from pathlib import Path

from stages.common import StageLog
from stages.config import TrainNARStage
from stages.train import fit, is_ctc_infeasible, load_target_override

VERSION = 1


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
                bad += is_ctc_infeasible(ids, n_q)
            samples += 1
            targets += len(texts)
            infeasible_targets += bad
            infeasible_samples += bad > 0
    return {"num_queries": n_q, "samples": samples, "targets": targets, "infeasible_targets": infeasible_targets,
            "infeasible_samples": infeasible_samples, "max_target_len_with_eos": max_len}


def run(cfg: TrainNARStage, inputs: dict[str, Path], out_dir: Path, log: StageLog) -> dict:
    """Train NARVL; writes checkpoint/ (best by val loss), curves.parquet, metrics.json (with the feasibility
    scan).

    Args:
        cfg: task, seed, model and the NAR recipe (num_queries, loss, kd, decoder_input, init_from_teacher).
        inputs: {"prepare_data", "train_teacher", and with kd=true "distill" (distilled.parquet)}.
        out_dir: the stage's output folder (a rerun on the same folder resumes from its last checkpoint).
        log: the stage log.
    """
    data_dir = Path(inputs["prepare_data"])
    override_path = None
    if cfg.train.kd:
        if "distill" not in inputs:
            raise ValueError("train_nar.kd=true needs the distill stage's output in inputs['distill']")
        override_path = Path(inputs["distill"]) / "distilled.parquet"
    scan = scan_feasibility(cfg, data_dir, load_target_override(override_path))
    if cfg.train.loss == "qctc" and scan["infeasible_targets"]:
        log.info(f"WARNING: {scan['infeasible_targets']} of {scan['targets']} training targets "
                 f"({scan['infeasible_samples']} samples) cannot be emitted by {scan['num_queries']} queries "
                 f"under Q-CTC (longest target {scan['max_target_len_with_eos']} tokens with eos); they get no "
                 f"gradient. Raise train_nar.num_queries.{cfg.task}.")
    else:
        log.info(f"Q-CTC feasibility: all {scan['targets']} targets fit {scan['num_queries']} queries")
    teacher = Path(inputs["train_teacher"]) if "train_teacher" in inputs else None
    metrics = fit("nar", cfg, data_dir, Path(out_dir), log, teacher_dir=teacher,
                  target_override_path=override_path)
    if metrics.get("stopped"):
        return metrics
    metrics["feasibility"] = scan
    metrics["kd"] = cfg.train.kd
    metrics["loss"] = cfg.train.loss
    from stages.common import write_json_atomic

    write_json_atomic(Path(out_dir) / "metrics.json", metrics)
    return metrics
