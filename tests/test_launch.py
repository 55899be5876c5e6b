"""How training workers are started, resolved from the config without a GPU: a GPU config gets NCCL, DeepSpeed's
CUDA accelerator in the workers' own environment and a GPU per worker; a CPU config gets gloo and the CPU
accelerator. Nothing is set process-wide (the workers' environment is per task)."""

from __future__ import annotations

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
