"""How training workers are started, resolved from the config without a GPU: a GPU config gets NCCL, DeepSpeed's
CUDA accelerator in the workers' own environment and a GPU per worker; a CPU config gets gloo and the CPU
accelerator. Nothing is set process-wide (the workers' environment is per task)."""

from __future__ import annotations

import os

from pipeline.config import load_config
from pipeline.executor import training_launch


def test_gpu_training_gets_nccl_cuda_and_a_gpu_per_worker():
    cfg = load_config(profile="smoke", overrides=["train_teacher.use_gpu=true", "train_teacher.num_workers=4",
                                                   "train_teacher.precision=bf16", "train_teacher.zero_stage=2",
                                                   "resources.train_teacher={cpus: 4, custom: {gpu_node: 1}}"])
    launch = training_launch(cfg.train_teacher, cfg.resources.for_stage("train_teacher"))
    assert (launch.launcher, launch.workers, launch.backend, launch.ds_accelerator) == ("ray_train", 4, "nccl", "cuda")
    assert launch.per_worker == {"CPU": 4.0, "GPU": 1.0, "gpu_node": 1.0}


def test_cpu_training_gets_gloo_and_the_cpu_accelerator():
    cfg = load_config(profile="smoke")
    launch = training_launch(cfg.train_nar, cfg.resources.for_stage("train_nar"))
    assert (launch.launcher, launch.backend, launch.ds_accelerator) == ("task", "gloo", "cpu")
    assert launch.per_worker == {"CPU": 1.0}


def test_paper_configs_put_training_on_gpus():
    cfg = load_config(profile="paper_base_caption")
    for stage in ("train_teacher", "train_nar"):
        launch = training_launch(getattr(cfg, stage), cfg.resources.for_stage(stage))
        assert launch.backend == "nccl" and launch.ds_accelerator == "cuda" and launch.per_worker["GPU"] >= 1
    assert cfg.resources.for_stage("evaluate").gpus >= 1 and cfg.resources.for_stage("distill").gpus >= 1


def test_a_worker_on_cuda_overrides_an_inherited_cpu_accelerator(monkeypatch):
    """DS_ACCELERATOR=cpu left in the environment (this test session sets it) must not reach a CUDA worker: found on
    the H200, where DeepSpeed on its CPU accelerator beside an NCCL group failed its first broadcast."""
    from deepspeed.accelerator import get_accelerator, real_accelerator

    from stages.train import use_ds_accelerator

    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    assert get_accelerator()._name == "cpu"  # resolved once for this process
    monkeypatch.setattr(real_accelerator, "ds_accelerator", real_accelerator.ds_accelerator)  # restored after
    use_ds_accelerator("cuda")
    assert os.environ["DS_ACCELERATOR"] == "cuda" and real_accelerator.ds_accelerator is None
    use_ds_accelerator("cpu")
    assert os.environ["DS_ACCELERATOR"] == "cpu" and get_accelerator()._name == "cpu"


def test_batch_norm_trains_with_bf16_parameters_and_fp32_statistics():
    """DeepSpeed's bf16/fp16 engine casts parameters and keeps buffers in fp32; the backbone must train so (CUDA's
    batch-norm backward refuses the mix) and keep its statistics in fp32, matching an all-fp32 step closely."""
    import torch

    from narvl_model.model import SmallBackbone

    torch.manual_seed(0)
    ref = SmallBackbone(8)
    mixed = SmallBackbone(8)
    mixed.load_state_dict(ref.state_dict())
    for p in mixed.parameters():
        p.data = p.data.to(torch.bfloat16)
    image = torch.randn(4, 3, 32, 32)
    out = mixed(image.to(torch.bfloat16))
    out.float().square().mean().backward()
    ref(image).square().mean().backward()
    assert out.dtype == torch.bfloat16
    assert {b.dtype for n, b in mixed.named_buffers() if "running" in n} == {torch.float32}
    for (n, a), b in zip(ref.named_buffers(), mixed.buffers(), strict=True):
        if "running" in n:
            torch.testing.assert_close(a, b, rtol=0.05, atol=0.02, msg=n)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in mixed.parameters())
