"""train_teacher: the autoregressive (OFA-style) teacher, trained by the shared loop in `stages.train`."""

from __future__ import annotations

from pathlib import Path

from stages.common import StageLog
from stages.config import TrainStage
from stages.pretrain import WEIGHTS
from stages.train import fit

VERSION = 1


def run(cfg: TrainStage, inputs: dict[str, Path], out_dir: Path, log: StageLog) -> dict:
    """Train the AR model; writes checkpoint/ (best by val loss), curves.parquet, metrics.json.

    Args:
        cfg: the task, seed, model and training recipe.
        inputs: {"prepare_data": folder with tokenizer/ and the split shards, and optionally "pretrain": a
            folder with backbone.safetensors the encoder's backbone starts from}.
        out_dir: the stage's output folder (a rerun on the same folder resumes from its last checkpoint).
        log: the stage log.
    """
    backbone = Path(inputs["pretrain"]) / WEIGHTS if "pretrain" in inputs else None
    return fit("ar", cfg, Path(inputs["prepare_data"]), Path(out_dir), log, backbone_init=backbone)
