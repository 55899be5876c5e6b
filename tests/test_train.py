"""The shared training loop (Ray Train + DeepSpeed): the teacher learns on 2 workers with ZeRO-2, a stopped run
resumes to the same weights, and NARVL (from the teacher, Q-CTC) learns and reports infeasible targets.

The prepared data, the teacher and the NARVL model are built once per session (`shared_*` below) and reused by
test_distill.py, test_evaluate.py and test_benchmark.py, which import these fixtures.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from narvl_model.checkpoint import load_model
from narvl_model.config import ModelConfig
from narvl_model.model import ARModel, NARVLModel
from stages.common import PrintLog
from stages.config import DataConfig, NARTrainConfig, PrepareDataStage, TrainConfig, TrainNARStage, TrainStage

TASK = "vqa"  # short targets: the tiny models learn something within a few dozen steps
_BUILT: dict[str, Path] = {}  # session-wide cache shared by the importing test modules


def teacher_cfg() -> TrainStage:
    # val/checkpoint only at the end: the best model is the final one, comparable across resumed runs
    return TrainStage(task=TASK, seed=0, model=ModelConfig.from_name("cpu-nano"), train=TrainConfig(
        max_steps=24, batch_size=8, lr=6e-3, warmup_ratio=0.1, num_workers=2, zero_stage=2, log_every=4,
        val_every=1000, checkpoint_every=1000, shuffle_buffer=32))


def nar_cfg() -> TrainNARStage:
    # 3 queries: answers of 2+ tokens (+ eos) or with repeats cannot be emitted -> infeasible targets get counted
    return TrainNARStage(task=TASK, seed=0, model=ModelConfig.from_name("cpu-nano"), train=NARTrainConfig(
        max_steps=20, batch_size=16, lr=3e-3, warmup_ratio=0.1, num_workers=1, log_every=4, val_every=10,
        checkpoint_every=1000, shuffle_buffer=32, kd=False, num_queries={TASK: 3}, loss="qctc"))


@pytest.fixture(scope="session")
def shared_data(tmp_path_factory) -> Path:
    if "data" not in _BUILT:
        from stages import prepare_data

        out = tmp_path_factory.mktemp("data")
        prepare_data.run(PrepareDataStage(task=TASK, data=DataConfig(
            image_size=32, train_per_task=64, val_per_task=16, test_per_task=16, samples_per_shard=16,
            bpe_vocab_size=200, num_bins=16)), {}, out, PrintLog())
        _BUILT["data"] = out
    return _BUILT["data"]


@pytest.fixture(scope="session")
def shared_teacher(shared_data, tmp_path_factory, ray_session) -> Path:
    if "teacher" not in _BUILT:
        from stages import train_teacher

        out = tmp_path_factory.mktemp("teacher")
        train_teacher.run(teacher_cfg(), {"prepare_data": shared_data}, out, PrintLog("teacher"))
        _BUILT["teacher"] = out
    return _BUILT["teacher"]


@pytest.fixture(scope="session")
def shared_nar(shared_data, shared_teacher, tmp_path_factory, ray_session) -> tuple[Path, dict, PrintLog]:
    if "nar" not in _BUILT:
        from stages import train_nar

        out = tmp_path_factory.mktemp("nar")
        log = PrintLog("nar")
        inputs = {"prepare_data": shared_data, "train_teacher": shared_teacher}
        metrics = train_nar.run(nar_cfg(), inputs, out, log)
        _BUILT["nar"] = out
        _BUILT["nar_metrics"] = metrics  # type: ignore[assignment]
        _BUILT["nar_log"] = log  # type: ignore[assignment]
    return _BUILT["nar"], _BUILT["nar_metrics"], _BUILT["nar_log"]  # type: ignore[return-value]


def _curves(out: Path) -> list[dict]:
    return pq.read_table(out / "curves.parquet").to_pylist()


@pytest.mark.timeout(240)
def test_teacher_learns_on_two_workers_with_zero2(shared_teacher):
    m = json.loads((shared_teacher / "metrics.json").read_text())
    assert m["world_size"] == 2 and m["zero_stage"] == 2 and m["steps"] == 24
    assert m["final_loss"] < 0.8 * m["first_loss"], m
    assert math.isfinite(m["best_val_loss"]) and m["samples_per_s"] > 0
    assert isinstance(load_model(shared_teacher / "checkpoint"), ARModel)
    steps = [r["step"] for r in _curves(shared_teacher)]
    assert steps == [4, 8, 12, 16, 20, 24]
    assert not (shared_teacher / "ray_train").exists()  # Ray Train checkpoints are dropped after success


@pytest.mark.timeout(240)
def test_stopped_run_resumes_to_the_same_weights(shared_data, shared_teacher, tmp_path, ray_session):
    from stages.train import fit

    out = tmp_path / "resumed"
    first = fit("ar", teacher_cfg(), shared_data, out, PrintLog("stopped"), stop_after_steps=12)
    assert first == {"stopped": True, "step": 12}
    assert not (out / "metrics.json").exists()
    second = fit("ar", teacher_cfg(), shared_data, out, PrintLog("resumed"))
    assert second["resumed_from_step"] == 12 and second["steps"] == 24

    # same data order: every logged window loss matches the uninterrupted run's
    ref = {r["step"]: r["loss"] for r in _curves(shared_teacher)}
    got = {r["step"]: r["loss"] for r in _curves(out)}
    assert sorted(got) == sorted(ref)
    for step in ref:
        assert got[step] == pytest.approx(ref[step], rel=1e-4, abs=1e-5), step
    a = load_model(shared_teacher / "checkpoint").state_dict()
    b = load_model(out / "checkpoint").state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.timeout(240)
def test_nar_from_teacher_learns_with_qctc_and_counts_infeasible(shared_nar):
    out, m, log = shared_nar
    model = load_model(out / "checkpoint")
    assert isinstance(model, NARVLModel) and model.cfg.num_queries == 3
    assert m["final_loss"] < 0.8 * m["first_loss"], m
    scan = m["feasibility"]
    assert scan["samples"] == 64 and scan["infeasible_targets"] > 0
    assert m["n_infeasible_total"] > 0  # counted by the loss during training as well
    assert json.loads((out / "metrics.json").read_text())["feasibility"] == scan
    assert log.last("n_infeasible") is not None


def test_lr_schedule_warms_up_then_decays_linearly():
    from stages.train import _lr_lambda

    f = _lr_lambda(100, 0.1)
    assert [round(f(s), 3) for s in (0, 4, 9, 10, 55, 100)] == [0.1, 0.5, 1.0, 1.0, 0.5, 0.0]


def test_ctc_feasibility_counts_repeats():
    from stages.train import is_ctc_infeasible

    assert not is_ctc_infeasible([5, 6, 2], 3)
    assert is_ctc_infeasible([5, 5, 2], 3)  # needs a blank between the two 5s
    assert not is_ctc_infeasible([5, 5, 2], 4)
