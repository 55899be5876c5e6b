"""Typed, strict configuration of every stage.

Fields marked `cache=False` (via `NoCache`) do not change results and stay out of the stage cache key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from narvl_model.config import ModelConfig

Task = Literal["caption", "vqa", "grounding", "entailment"]
TASKS: tuple[Task, ...] = ("caption", "vqa", "grounding", "entailment")
NoCache = {"cache": False}
# a path outside the artifact root: the key covers what the stage reads there by content, not the path
# (pipeline/content.py), so the same files at another path are a hit and files replaced in place a miss
ByContent = {"cache": "content"}
# numpy's generators refuse negative seeds and torch.manual_seed takes at most 64 bits: refuse both at load time
Seed = Annotated[int, Field(ge=0, lt=2**63, description="random seed, a whole number >= 0")]


class Strict(BaseModel):
    # unknown keys are errors; so are inf and nan, which pass range checks such as ge=0 and train nothing sensible
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class DataConfig(Strict):
    """Where samples come from and how they are sharded and tokenised."""

    source: Literal["shapes", "shards"] = "shapes"
    shards_dir: str | None = Field(None, description="with source=shards: a folder from `narvl data convert`",
                                   json_schema_extra=ByContent)
    image_size: int = Field(64, ge=32, le=1024)
    train_per_task: int = Field(2000, gt=0)
    val_per_task: int = Field(200, gt=0)
    test_per_task: int = Field(200, gt=0)
    samples_per_shard: int = Field(512, gt=0)
    max_objects: int = Field(4, ge=1, le=4)
    seed: Seed = 0
    bpe_vocab_size: int = Field(1000, ge=64, description="BPE merges target size (before bins and specials)")
    num_bins: int = Field(64, ge=2, description="location tokens <bin_0>..<bin_{B-1}> (OFA: 1000)")
    tokenizer: Literal["bpe", "ofa"] = "bpe"
    ofa_bpe_dir: str | None = Field(None, description="tokenizer=ofa: dir of encoder.json, vocab.bpe, dict.txt",
                                    json_schema_extra=ByContent)
    on_bad_sample: Literal["error", "skip"] = "error"

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        if self.source == "shards" and not self.shards_dir:
            raise ValueError("data.source=shards needs data.shards_dir (a folder written by `narvl data convert`)")
        if self.tokenizer == "ofa" and not self.ofa_bpe_dir:
            raise ValueError("data.tokenizer=ofa needs data.ofa_bpe_dir (encoder.json, vocab.bpe, dict.txt)")
        return self


class OFAInit(Strict):
    """Start the AR teacher from OFA's released weights, as the paper does (README: "Starting from OFA").

    The model preset must be the checkpoint's size (ofa_base.pt -> base) and the tokenizer OFA's, so that token
    ids are the checkpoint's embedding rows; the pipeline config sets data.tokenizer=ofa from bpe_dir. Paths are
    checked when the config loads and stored resolved (absolute).
    """

    ofa: str = Field(description="OFA checkpoint: fairseq .pt (ofa_tiny.pt .. ofa_huge.pt) or a state dict "
                                 "(.pt / .safetensors) with OFA's key names", json_schema_extra=ByContent)
    bpe_dir: str | None = Field(None, description="OFA's BPE folder (OFA's utils/BPE: encoder.json, vocab.bpe, "
                                                  "dict.txt)", json_schema_extra=ByContent)

    @field_validator("ofa")
    @classmethod
    def _checkpoint_exists(cls, v: str) -> str:
        path = Path(v).expanduser().resolve()
        if not path.is_file():
            raise ValueError(f"init_from.ofa: OFA checkpoint {path} not found (download e.g. ofa_base.pt, see the "
                             "README section 'Starting from OFA')")
        return str(path)

    @field_validator("bpe_dir")
    @classmethod
    def _bpe_files_exist(cls, v: str | None) -> str | None:
        if v is None:
            return v
        path = Path(v).expanduser().resolve()
        missing = [str(path / f) for f in ("encoder.json", "vocab.bpe", "dict.txt") if not (path / f).is_file()]
        if missing:
            raise ValueError(f"init_from.bpe_dir: OFA BPE files not found: {missing} (OFA's utils/BPE folder)")
        return str(path)


class TrainConfig(Strict):
    """One training loop for the AR teacher and the NARVL student (Ray Train + DeepSpeed)."""

    max_steps: int = Field(200, gt=0, description="optimizer steps")
    batch_size: int = Field(32, gt=0, description="per worker, per micro-step")
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    backbone_lr_scale: float = Field(1.0, ge=0, description="the image backbone's learning rate as a share of lr "
                                     "(a pretrained backbone can learn slower than the fresh transformer; 0 freezes "
                                     "its weights, not its batch-norm statistics)")
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_ratio: float = Field(0.06, ge=0, lt=1)
    clip_grad: float = Field(1.0, gt=0)
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    num_workers: int = Field(1, ge=1, description="Ray Train workers")
    use_gpu: bool = False
    zero_stage: int = Field(0, ge=0, le=3)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    val_every: int = Field(100, gt=0)
    shuffle_buffer: int = Field(1000, ge=0)
    # DataLoader processes per worker: the shards are split between them, so they change the data order
    loader_workers: int = Field(0, ge=0)
    # where and how often the run is saved and retried: no effect on the result (resume is exact)
    checkpoint_every: Annotated[int, Field(100, gt=0, json_schema_extra=NoCache)]
    max_failures: Annotated[int, Field(0, ge=0, json_schema_extra=NoCache,
                                       description="restarts after a worker or node is lost")]
    log_every: Annotated[int, Field(10, gt=0, json_schema_extra=NoCache)]
    val_exact_batches: Annotated[int, Field(2, ge=0, json_schema_extra=NoCache,
                                            description="validation batches decoded for val_exact (a diagnostic)")]

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.precision == "fp16" and not self.use_gpu:
            raise ValueError("precision=fp16 needs use_gpu=true; use fp32 (or bf16) on CPU")
        return self


class TeacherTrainConfig(TrainConfig):
    """The AR teacher's training: TrainConfig plus what only the teacher does (NARVL's queries are sized for its
    own task's targets, so the auxiliary tasks are the teacher's alone)."""

    aux_tasks: dict[Task, float] = Field(
        default_factory=dict, description="built-in benchmark: task -> the share of training samples trained as a "
        "fresh sample of that task over their own image (drawn from the scene the sample carries) instead of the "
        "split's sample: a multi-task teacher over the same images, as OFA is trained multi-task. The teacher's "
        "own task may be listed too (new questions about the same images)")

    shared: bool = Field(False, description="one teacher for every task of the run, as OFA is trained multi-task "
                         "(built-in benchmark): it trains on the first task's images, each sample drawn as any of "
                         "the run's tasks with equal shares over its scene, and every task's distillation, NARVL "
                         "and evaluation use it. max_steps is its total: the per-task teachers' steps summed is "
                         "the like-for-like budget")

    @field_validator("aux_tasks")
    @classmethod
    def _check_aux(cls, v: dict[str, float]) -> dict[str, float]:
        bad = {t: p for t, p in v.items() if not 0 <= p < 1}
        if bad:
            raise ValueError(f"aux_tasks shares must be in [0, 1): {bad}")
        if sum(v.values()) >= 1:
            raise ValueError(f"aux_tasks shares add up to {sum(v.values()):g}: the split's own samples need a share "
                             "(the sum must stay below 1)")
        return v


class NARTrainConfig(TrainConfig):
    loss: Literal["qctc", "ce"] = "qctc"
    num_queries: dict[Task, int] = Field(
        default_factory=lambda: {"caption": 24, "vqa": 6, "grounding": 5, "entailment": 2},
        description="LQT count per task (paper: caption 20, vqa 6, grounding 5, entailment 2)",
    )
    kd: bool | dict[Task, bool] = Field(
        True, description="train on the teacher's decodes (knowledge distillation): for every task, or per task (a "
                          "task left out: no KD); the paper distils for captioning and VQA only")
    decoder_input: Literal["queries", "encoder"] = "queries"
    init_from_teacher: bool = True
    label_smoothing_by_task: dict[Task, float] = Field(default_factory=lambda: {"entailment": 0.0})
    # Fewer queries than the built-in benchmark's longest target: the pipeline config refuses that unless this is
    # set (the Table-10 sweep's "too few queries" point); the infeasible targets are then left out of the loss
    # and counted (n_infeasible) as always. It changes no result by itself, so it stays out of cache keys.
    allow_infeasible_queries: Annotated[bool, Field(False, json_schema_extra=NoCache)]

    def kd_for(self, task: str) -> bool:
        """Whether `task`'s NARVL trains on the teacher's decodes."""
        return self.kd if isinstance(self.kd, bool) else self.kd.get(task, False)

    @model_validator(mode="after")
    def _check_queries(self) -> NARTrainConfig:
        for task, n in self.num_queries.items():
            if n < 1:
                raise ValueError(f"train_nar.num_queries.{task}={n}: must be >= 1")
        return self


class PretrainConfig(Strict):
    """Backbone pretraining on the built-in benchmark's object annotations (stages/pretrain.py): the stand-in for
    the ImageNet-initialised backbone OFA starts from. The AR teacher's backbone starts from its weights."""

    enabled: bool = False
    steps: int = Field(500, gt=0)
    batch_size: int = Field(32, gt=0)
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup_ratio: float = Field(0.06, ge=0, lt=1)
    shuffle_buffer: int = Field(1000, ge=0)
    log_every: Annotated[int, Field(25, gt=0, json_schema_extra=NoCache)]


class DistillConfig(Strict):
    beam_size: int = Field(5, ge=1)
    max_len: int = Field(24, ge=1)
    batch_size: int = Field(64, ge=1)
    num_actors: int = Field(1, ge=1)
    no_repeat_ngram: int = Field(3, ge=0)


class EvalConfig(Strict):
    split: Literal["val", "test"] = "test"
    ar_beam_size: int = Field(5, ge=1)
    ar_max_len: int = Field(24, ge=1)
    no_repeat_ngram: int = Field(3, ge=0, description="AR caption search only (OFA: 3)")
    nar_decode: Literal["greedy", "beam"] = "greedy"
    nar_beam_size: int = Field(5, ge=1)
    batch_size: int = Field(64, ge=1)
    max_samples: int | None = Field(None, gt=0)
    blind_baseline: bool = Field(True, description="also score an image-blind baseline built from the training "
                                 "split and the gap closed over it (reads every training sample's JSON once, not its "
                                 "image)")


class BenchmarkConfig(Strict):
    num_samples: int = Field(50, ge=2, description="batch-1 samples timed; the first is dropped (warm-up)")
    ar_beam_size: int = Field(5, ge=1)
    ar_max_len: int = Field(24, ge=1)
    batch_sizes: list[int] = Field(default_factory=lambda: [32, 64])
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int | None = Field(None, ge=1, description="torch threads on CPU (default: torch's)")


class StageResources(Strict):
    """What one piece of work of a stage asks Ray for (a training stage: each of its workers)."""

    cpus: float = Field(1.0, ge=0)
    gpus: float = Field(0.0, ge=0)
    memory_gb: float | None = Field(None, gt=0, description="Ray memory reservation (GiB); None reserves none")
    custom: dict[str, float] = Field(default_factory=dict, description="Ray custom resources, e.g. {gpu_node: 1} "
                                     "to pin a stage to the nodes started with that resource")
    labels: dict[str, str] = Field(default_factory=dict, description="Ray node labels the work must run on "
                                   "(label_selector), e.g. {ray.io/accelerator-type: H100}")


class ResourcesConfig(Strict):
    """Ray resources per stage; a stage without its own entry takes `default`. Training stages ask this per worker
    (train_*.num_workers of them) and at least one GPU each when train_*.use_gpu is set."""

    max_concurrent_tasks: int = Field(2, ge=1, description="nodes of the DAG running at once")
    default: StageResources = StageResources()
    prepare_data: StageResources | None = None
    pretrain: StageResources | None = None
    train_teacher: StageResources | None = None
    distill: StageResources | None = Field(None, description="each of the distill.num_actors decoders")
    train_nar: StageResources | None = None
    evaluate: StageResources | None = None
    benchmark: StageResources | None = None

    def for_stage(self, stage: str) -> StageResources:
        own = getattr(self, stage, None) if stage in type(self).model_fields and stage != "default" else None
        return own if isinstance(own, StageResources) else self.default


# ---- what each stage receives (the pipeline builds these from PipelineConfig; their cache_dict is the key) ----
class PrepareDataStage(Strict):
    task: Task
    data: DataConfig


class PretrainStage(Strict):
    """pretrain: the teachers' image backbone on dense object labels, once for all tasks (the data config fixes
    the images and objects, the same in every task's shards)."""

    seed: Seed = 0
    data: DataConfig
    model: ModelConfig
    pretrain: PretrainConfig


class TrainStage(Strict):
    """train_teacher: the AR model."""

    task: Task
    seed: Seed = 0
    model: ModelConfig
    train: TeacherTrainConfig
    on_bad_sample: Literal["error", "skip"] = "error"
    init_from: OFAInit | None = Field(None, description="start from OFA's weights (narvl_model.ofa."
                                                        "init_model_from_ofa) instead of a random init")


class TrainNARStage(Strict):
    """train_nar: NARVL fine-tuned from the teacher (num_queries / loss / kd / decoder_input in `train`)."""

    task: Task
    seed: Seed = 0
    model: ModelConfig
    train: NARTrainConfig
    on_bad_sample: Literal["error", "skip"] = "error"


class DistillStage(Strict):
    task: Task
    distill: DistillConfig


class EvaluateStage(Strict):
    task: Task
    kind: Literal["ar", "narvl"]
    eval: EvalConfig


class BenchmarkStage(Strict):
    task: Task
    benchmark: BenchmarkConfig
