"""Learning tests on the built-in benchmark (issue 16): a short teacher training must beat its task's image-blind
baseline by a clear margin, so a model that ignores the image fails here.

Each test trains one teacher for a minute or two on 2 cores, on a split small and easy enough for that budget, and
compares the evaluate stage's score with the blind baseline evaluate computes on the same test split (measured with
the settings below, seed 0):

- grounding, scenes of up to 4 objects, 300 steps from scratch: Acc@0.5 17.5 against 2.5 (the best fixed box);
- captions, one object per scene, a 300-step backbone pretraining then 600 steps: the object named exactly (size,
  colour, shape) in 22.5% of the captions against 1.0% for the best fixed caption;
- VQA, scenes of up to 2 objects, cross-attention fusion, 400 steps from scratch: accuracy 49.7 against the text
  prior's 40.1.

Entailment has no test here: its image-dependent hypotheses stay near chance in every budget of a few minutes that
was tried (docs/REPRODUCTION.md, "Learning").
"""

from __future__ import annotations

from pathlib import Path

import pytest

from narvl_model.config import ModelConfig
from stages.common import PrintLog
from stages.config import (
    DataConfig,
    EvalConfig,
    EvaluateStage,
    PrepareDataStage,
    PretrainConfig,
    PretrainStage,
    TeacherTrainConfig,
    TrainStage,
)


def _train_and_evaluate(tmp: Path, task: str, max_objects: int, steps: int, pretrain_steps: int = 0,
                        **model_overrides) -> dict:
    """Prepare a small split, optionally pretrain the backbone, train the teacher; evaluate's gap figures."""
    from stages import evaluate, prepare_data, pretrain, train_teacher

    data_cfg = DataConfig(image_size=64, train_per_task=2000, val_per_task=32, test_per_task=200,
                          samples_per_shard=500, bpe_vocab_size=300, num_bins=32, max_objects=max_objects)
    data = tmp / "data"
    prepare_data.run(PrepareDataStage(task=task, data=data_cfg), prepare_data.Inputs(), data, PrintLog())
    model = ModelConfig.from_name("cpu-tiny", image_stride=8, dropout=0.0, **model_overrides)
    backbone = None
    if pretrain_steps:
        backbone = tmp / "pretrain"
        backbone.mkdir()
        pretrain.run(PretrainStage(data=data_cfg, model=model, pretrain=PretrainConfig(enabled=True,
                                                                                        steps=pretrain_steps)),
                     pretrain.Inputs(data=data), backbone, PrintLog())
    cfg = TrainStage(task=task, seed=0, model=model, train=TeacherTrainConfig(
        max_steps=steps, batch_size=32, lr=2e-3, warmup_ratio=0.05, val_every=10_000, checkpoint_every=10_000,
        log_every=100))
    train_teacher.run(cfg, train_teacher.Inputs(data=data, pretrain=backbone), tmp / "teacher", PrintLog())
    result = evaluate.run(EvaluateStage(task=task, kind="ar", eval=EvalConfig(batch_size=64, ar_beam_size=1)),
                          evaluate.Inputs(data=data, model=tmp / "teacher"), tmp / "eval", PrintLog())
    return result["gap"]


@pytest.mark.timeout(300)
def test_grounding_teacher_beats_its_blind_baseline(tmp_path):
    gap = _train_and_evaluate(tmp_path, "grounding", max_objects=4, steps=300)
    assert gap["metric"] == "acc@0.5" and gap["blind"] < 5.0, gap  # no fixed box finds a random object
    assert gap["score"] >= gap["blind"] + 8.0 and gap["gap_closed"] >= 0.08, gap


@pytest.mark.timeout(420)
def test_caption_teacher_beats_its_blind_baseline(tmp_path):
    gap = _train_and_evaluate(tmp_path, "caption", max_objects=1, steps=600, pretrain_steps=300)
    assert gap["metric"] == "semantic_set_acc" and gap["blind"] < 3.0, gap  # one fixed caption: one object in 100
    assert gap["score"] >= gap["blind"] + 10.0 and gap["gap_closed"] >= 0.1, gap


@pytest.mark.timeout(300)
def test_vqa_teacher_beats_its_blind_baseline(tmp_path):
    gap = _train_and_evaluate(tmp_path, "vqa", max_objects=2, steps=400, fusion="cross")
    assert gap["metric"] == "accuracy" and gap["blind_predictor"] == "text prior", gap
    assert gap["score"] >= gap["blind"] + 5.0 and gap["gap_closed"] >= 0.08, gap
