"""The shared training loop (DeepSpeed): the teacher learns on 2 Ray Train workers with ZeRO-2, a run killed after a
checkpoint resumes to the same weights, and NARVL (from the teacher, Q-CTC) learns and reports infeasible targets.

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
from stages.config import DataConfig, NARTrainConfig, PrepareDataStage, TeacherTrainConfig, TrainNARStage, TrainStage

TASK = "vqa"  # short targets: the tiny models learn something within a few dozen steps
_BUILT: dict[str, Path] = {}  # session-wide cache shared by the importing test modules


def teacher_cfg() -> TrainStage:
    # val/checkpoint only at the end: the best model is the final one, comparable across resumed runs
    return TrainStage(task=TASK, seed=0, model=ModelConfig.from_name("cpu-nano"), train=TeacherTrainConfig(
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
            bpe_vocab_size=200, num_bins=16)), prepare_data.Inputs(), out, PrintLog())
        _BUILT["data"] = out
    return _BUILT["data"]


@pytest.fixture(scope="session")
def shared_teacher(shared_data, tmp_path_factory) -> Path:
    if "teacher" not in _BUILT:
        import ray

        from pipeline.executor import train_stage_on_ray
        from pipeline.ray_utils import init_ray

        if not ray.is_initialized():  # two Ray Train workers (the module-scoped ray_session cannot serve a session)
            init_ray()
        from stages import train_teacher

        out = tmp_path_factory.mktemp("teacher")
        train_stage_on_ray(train_teacher, teacher_cfg(), train_teacher.Inputs(data=shared_data), out,
                           PrintLog("teacher"))
        _BUILT["teacher"] = out
    return _BUILT["teacher"]


@pytest.fixture(scope="session")
def shared_nar(shared_data, shared_teacher, tmp_path_factory) -> tuple[Path, dict, PrintLog]:
    if "nar" not in _BUILT:
        from stages import train_nar

        out = tmp_path_factory.mktemp("nar")
        log = PrintLog("nar")
        inputs = train_nar.Inputs(data=shared_data, teacher=shared_teacher)
        metrics = train_nar.run(nar_cfg(), inputs, out, log)  # one worker, in this process
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
    assert m["launcher"] == "ray_train"
    assert not (shared_teacher / "ckpt").exists()  # checkpoints are dropped after success, the best model stays


class _Killed(Exception):
    pass


def _dies_after(step: int):
    """A work store whose worker is killed right after the checkpoint of `step` is complete."""
    from stages.train import LocalWorkStore

    class DiesAfter(LocalWorkStore):
        def save_checkpoint(self, at: int, src: Path, *, final_part: bool) -> None:
            super().save_checkpoint(at, src, final_part=final_part)
            if final_part and at == step:
                raise _Killed(f"killed after the checkpoint of step {at}")

    return DiesAfter


@pytest.mark.timeout(240)
def test_killed_run_resumes_to_the_same_weights(shared_data, tmp_path):
    from stages import train, train_teacher

    # one worker in this process; checkpoint_every changes no result (it is outside the cache key)
    cfg = teacher_cfg().model_copy(update={"train": teacher_cfg().train.model_copy(
        update={"num_workers": 1, "zero_stage": 0, "checkpoint_every": 6})})
    ref_dir, out = tmp_path / "ref", tmp_path / "resumed"
    ref = train_teacher.run(cfg, train_teacher.Inputs(data=shared_data), ref_dir, PrintLog("ref"))
    job, _ = train_teacher.job(cfg, train_teacher.Inputs(data=shared_data), PrintLog())
    out.mkdir()
    with pytest.raises(_Killed):
        train.run_local(job, _dies_after(12)(out), PrintLog("killed"))
    assert not (out / "metrics.json").exists()
    with pytest.raises(train.TrainingIncomplete):  # a stopped run is never a result
        train.finish(job, train.LocalWorkStore(out), out, PrintLog(), 0.0)
    second = train_teacher.run(cfg, train_teacher.Inputs(data=shared_data), out, PrintLog("resumed"))
    assert second["resumed_from_step"] == 12 and second["steps"] == 24 == ref["steps"]

    # same data order: every logged window loss matches the uninterrupted run's, and no point is repeated
    want = {r["step"]: r["loss"] for r in _curves(ref_dir) if "loss" in r}
    got = [(r["step"], r["loss"]) for r in _curves(out) if "loss" in r]
    assert [s for s, _ in got] == sorted(want)
    for step, loss in got:
        assert loss == pytest.approx(want[step], rel=1e-4, abs=1e-5), step
    a = load_model(ref_dir / "checkpoint").state_dict()
    b = load_model(out / "checkpoint").state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("target", ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                                    "rng_rank0.pt"])
def test_resume_refuses_a_pickle_payload_in_the_checkpoint(shared_data, tmp_path, target):
    import os
    import shutil

    from stages import train, train_teacher

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    marker = tmp_path / "payload-ran"
    cfg = teacher_cfg().model_copy(update={"train": teacher_cfg().train.model_copy(
        update={"num_workers": 1, "zero_stage": 2, "max_steps": 8, "checkpoint_every": 4})})
    job, _ = train_teacher.job(cfg, train_teacher.Inputs(data=shared_data), PrintLog())
    work = _BUILT.get("killed_at_4")
    if work is None:  # one killed run serves every target
        work = _BUILT["killed_at_4"] = tmp_path / "work"
        work.mkdir()
        with pytest.raises(_Killed):
            train.run_local(job, _dies_after(4)(work), PrintLog("killed"))
    out = tmp_path / "out"
    shutil.copytree(work, out)
    step_dir = out / "ckpt" / "step_00000004"
    found = [p for p in step_dir.rglob(target)]
    assert len(found) == 1, sorted(p.name for p in step_dir.rglob("*"))
    torch.save({"module": Payload()}, found[0])  # what an attacker with write access to the root could leave
    with pytest.raises(train.CheckpointRefused) as e:
        train.run_local(job, train.LocalWorkStore(out), PrintLog("resume"))
    assert f"ckpt/step_00000004/{found[0].relative_to(step_dir).as_posix()}" in str(e.value)
    assert not marker.exists()  # refused without unpickling
    assert not (out / "summary.json").exists()


def test_rng_state_round_trips_without_pickle(tmp_path):
    from stages.train import load_rng_state, save_rng_state

    torch.manual_seed(3)
    save_rng_state(tmp_path / "rng.pt")
    want = torch.rand(5)
    torch.manual_seed(99)
    load_rng_state(tmp_path / "rng.pt")  # torch.load(weights_only=True): tensors only
    assert torch.equal(torch.rand(5), want)


@pytest.mark.timeout(240)
def test_nar_from_teacher_learns_with_qctc_and_counts_infeasible(shared_nar):
    out, m, log = shared_nar
    model = load_model(out / "checkpoint")
    assert isinstance(model, NARVLModel) and model.cfg.num_queries == 3 and model.cfg.nar_loss == "qctc"
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


def test_backbone_lr_scale_zero_keeps_the_backbone_weights(shared_data, tmp_path):
    """train.backbone_lr_scale=0: the backbone's weights stay at their start whatever lr the rest learns with;
    scale 1 moves them."""
    from stages import train_teacher

    def trained(scale: float, lr: float) -> dict[str, torch.Tensor]:
        tc = teacher_cfg().train.model_copy(update={"num_workers": 1, "zero_stage": 0, "max_steps": 6, "lr": lr,
                                                    "backbone_lr_scale": scale})
        out = tmp_path / f"s{scale}-lr{lr}"
        train_teacher.run(teacher_cfg().model_copy(update={"train": tc}), train_teacher.Inputs(data=shared_data),
                          out, PrintLog())
        return load_model(out / "checkpoint").state_dict()

    a, b, moved = trained(0.0, 6e-3), trained(0.0, 2e-3), trained(1.0, 6e-3)
    conv = [k for k in a if k.startswith("encoder.backbone.") and k.endswith("weight") and a[k].ndim == 4]
    assert conv
    for k in conv:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    assert any(not torch.equal(a[k], moved[k]) for k in conv)
    rest = [k for k in a if k.startswith("decoder.") and a[k].ndim == 2]
    assert any(not torch.equal(a[k], b[k]) for k in rest)  # the transformer learned at its own lr
