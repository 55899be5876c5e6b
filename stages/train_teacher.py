"""train_teacher: the autoregressive (OFA-style) teacher, trained by the shared loop in `stages.train`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from stages.common import StageLog
from stages.config import TrainStage
from stages.pretrain import WEIGHTS
from stages.train import TrainInputs, TrainJob, train

VERSION = 2


@dataclass(frozen=True)
class Inputs:
    data: Path  # prepare_data
    pretrain: Path | None = None  # shared/pretrain: backbone.safetensors the encoder's backbone starts from


def job(cfg: TrainStage, inputs: Inputs, log: StageLog) -> tuple[TrainJob, dict]:
    """What every worker runs, and the stage's own figures to add to metrics.json (none here)."""
    return TrainJob("ar", cfg.model_dump(mode="json"), TrainInputs(data=inputs.data, pretrain=inputs.pretrain),
                    backbone_weights=WEIGHTS), {}


def run(cfg: TrainStage, inputs: Inputs, out_dir: Path, log: StageLog) -> dict:
    """Train the AR model as one worker in this process; writes checkpoint/ (best by val loss), curves.parquet,
    metrics.json. A rerun on the same out_dir resumes from its last checkpoint."""
    the_job, extra = job(cfg, inputs, log)
    return train(the_job, out_dir, log, extra)
