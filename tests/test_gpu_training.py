"""The GPU path of the stages, on CUDA (marker `gpu`, skipped without CUDA): the teacher trains in bf16 with
ZeRO-2 and its loss falls, a run killed after a checkpoint resumes on the GPU to the step and (within bf16
tolerance) the weights of the uninterrupted run, NARVL trains from it with Q-CTC, and evaluation and the benchmark
stage decode on the GPU.

The stages run directly, one worker in this process (what a Ray task of the executor runs), so the file needs
neither Ray nor MLflow: `python -m pytest -m gpu tests/test_gpu_training.py` on a bare GPU machine with torch and
DeepSpeed. NARVL_GPU_TEST_DEVICE=cpu runs the same checks on the CPU in fp32 (a dry run of this file).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from narvl_model.checkpoint import load_model
from narvl_model.config import ModelConfig
from stages.common import PrintLog
from stages.config import (
    BenchmarkConfig,
    BenchmarkStage,
    DataConfig,
    EvalConfig,
    EvaluateStage,
    NARTrainConfig,
    PrepareDataStage,
    TeacherTrainConfig,
    TrainNARStage,
    TrainStage,
)

ON_CPU = os.environ.get("NARVL_GPU_TEST_DEVICE") == "cpu"  # dry run of this file without a GPU
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not (ON_CPU or torch.cuda.is_available()), reason="needs CUDA")]
TASK = "vqa"
STEPS, KILL_AT = 40, 20
# bf16 on the GPU: the resumed run replays the same batches, but cuBLAS/cuDNN reductions are not bit-stable
LOSS_TOL = dict(rel=3e-2, abs=3e-2)
WEIGHT_TOL = dict(rtol=5e-2, atol=5e-3)


def _train(**kw) -> dict:
    gpu = dict(use_gpu=False, precision="fp32") if ON_CPU else dict(use_gpu=True, precision="bf16")
    return dict(max_steps=STEPS, batch_size=32, lr=3e-3, warmup_ratio=0.1, num_workers=1, zero_stage=2, log_every=5,
                val_every=1000, checkpoint_every=KILL_AT, shuffle_buffer=64, **gpu) | kw


def teacher_cfg() -> TrainStage:
    return TrainStage(task=TASK, seed=0, model=ModelConfig.from_name("cpu-nano"), train=TeacherTrainConfig(**_train()))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from stages import prepare_data

    out = tmp_path_factory.mktemp("data")
    prepare_data.run(PrepareDataStage(task=TASK, data=DataConfig(
        image_size=32, train_per_task=256, val_per_task=32, test_per_task=32, samples_per_shard=64,
        bpe_vocab_size=200, num_bins=16)), prepare_data.Inputs(), out, PrintLog())
    return out


@pytest.fixture(scope="module")
def teacher(data, tmp_path_factory) -> tuple[Path, dict]:
    from stages import train_teacher

    out = tmp_path_factory.mktemp("teacher")
    return out, train_teacher.run(teacher_cfg(), train_teacher.Inputs(data=data), out, PrintLog("teacher"))


def _curves(out: Path) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(out / "curves.parquet").to_pylist()


class _Killed(Exception):
    pass


def test_teacher_learns_on_cuda_in_bf16_with_zero2(teacher):
    out, m = teacher
    assert m["steps"] == STEPS and m["zero_stage"] == 2 and m["precision"] == ("fp32" if ON_CPU else "bf16")
    assert m["final_loss"] < 0.8 * m["first_loss"], m
    model = load_model(out / "checkpoint")
    assert all(torch.isfinite(p).all() for p in model.parameters())
    print(f"teacher on {'cpu' if ON_CPU else torch.cuda.get_device_name()}: loss {m['first_loss']:.3f} -> "
          f"{m['final_loss']:.3f}, {m['samples_per_s']:.0f} samples/s")


def test_killed_run_resumes_on_cuda_to_the_uninterrupted_run(data, teacher, tmp_path):
    from stages import train, train_teacher

    ref_dir, ref = teacher

    class DiesAfter(train.LocalWorkStore):
        def save_checkpoint(self, at: int, src: Path, *, final_part: bool) -> None:
            super().save_checkpoint(at, src, final_part=final_part)
            if final_part and at == KILL_AT:
                raise _Killed(f"killed after the checkpoint of step {at}")

    cfg = teacher_cfg()
    job, _ = train_teacher.job(cfg, train_teacher.Inputs(data=data), PrintLog())
    out = tmp_path / "resumed"
    out.mkdir()
    with pytest.raises(_Killed):
        train.run_local(job, DiesAfter(out), PrintLog("killed"))
    if not ON_CPU:  # the CUDA RNG state is saved beside the CPU one, as tensors
        rng = sorted(out.rglob("rng_rank0.pt"))
        assert rng, f"no RNG state under {out}"
        states = torch.load(rng[0], weights_only=True)
        assert "cuda" in states, sorted(states)
    second = train_teacher.run(cfg, train_teacher.Inputs(data=data), out, PrintLog("resumed"))
    assert second["resumed_from_step"] == KILL_AT and second["steps"] == STEPS == ref["steps"]

    want = {r["step"]: r["loss"] for r in _curves(ref_dir) if "loss" in r}
    got = [(r["step"], r["loss"]) for r in _curves(out) if "loss" in r]
    assert [s for s, _ in got] == sorted(want)  # no step logged twice after the resume
    for step, loss in got:
        assert loss == pytest.approx(want[step], **LOSS_TOL), step
    a = load_model(ref_dir / "checkpoint").state_dict()
    b = load_model(out / "checkpoint").state_dict()
    for k in a:
        torch.testing.assert_close(a[k].float(), b[k].float(), **WEIGHT_TOL, msg=k)


def test_narvl_trains_evaluates_and_benchmarks_on_cuda(data, teacher, tmp_path):
    from stages import benchmark, evaluate, train_nar

    teacher_dir, _ = teacher
    cfg = TrainNARStage(task=TASK, seed=0, model=ModelConfig.from_name("cpu-nano"), train=NARTrainConfig(
        **_train(checkpoint_every=1000), kd=False, num_queries={TASK: 8}, loss="qctc"))
    nar_dir = tmp_path / "nar"
    m = train_nar.run(cfg, train_nar.Inputs(data=data, teacher=teacher_dir), nar_dir, PrintLog("nar"))
    assert m["steps"] == STEPS and m["final_loss"] < m["first_loss"], m

    for kind, model in (("ar", teacher_dir), ("narvl", nar_dir)):
        ev = evaluate.run(EvaluateStage(task=TASK, kind=kind, eval=EvalConfig(batch_size=16, ar_beam_size=2)),
                          evaluate.Inputs(data=data, model=model), tmp_path / f"eval_{kind}", PrintLog(kind))
        assert ev["metric"] == "accuracy" and 0.0 <= ev["value"] <= 100.0, ev
        assert ev["device"].startswith("cpu" if ON_CPU else "cuda"), ev

    device = "cpu" if ON_CPU else "cuda"
    bench_dir = tmp_path / "bench"
    benchmark.run(BenchmarkStage(task=TASK, benchmark=BenchmarkConfig(num_samples=6, batch_sizes=[8], device=device)),
                  benchmark.Inputs(data=data, ar=teacher_dir, narvl=nar_dir), bench_dir, PrintLog("bench"))
    lat = json.loads((bench_dir / benchmark.OUTPUT).read_text())
    ar_ms, nar_ms = benchmark.mean_latency_ms(lat, "ar"), benchmark.mean_latency_ms(lat, "narvl")
    assert ar_ms and nar_ms, lat
    print(f"benchmark on {device}: AR beam {ar_ms:.2f} ms, NARVL {nar_ms:.2f} ms, {json.dumps(lat)[:400]}")
