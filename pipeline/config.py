"""The pipeline configuration: YAML file or named profile, then dotted `key=value` overrides."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from narvl_model.config import PRESETS, ModelConfig
from stages.config import (
    TASKS,
    BenchmarkConfig,
    DataConfig,
    DistillConfig,
    EvalConfig,
    NARTrainConfig,
    OFAInit,
    PretrainConfig,
    ResourcesConfig,
    Seed,
    Strict,
    Task,
    TeacherTrainConfig,
)
from stages.data.shapes import SHAPES_MIN_QUERIES

# what narvl_model.model.build_backbone reads
BACKBONE_FIELDS = ("backbone", "resnet_layers", "backbone_width", "image_stride")
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
# ablation -> the train_nar fields it changes (paper Tables 8, 9, 6-7)
ABLATIONS: dict[str, dict[str, Any]] = {
    "ce": {"loss": "ce"},
    "ce_no_kd": {"loss": "ce", "kd": False},  # Table 8 compares the losses without KD: against no_kd
    "no_kd": {"kd": False},
    "encoder_input": {"decoder_input": "encoder"},
}
Ablation = Literal[*ABLATIONS]  # type: ignore[valid-type]  # the names above, checked by pydantic


class ModelSection(Strict):
    """A preset name plus field overrides, e.g. {preset: cpu-tiny, overrides: {d_model: 96}}, and per-task field
    overrides on top, e.g. {task_overrides: {vqa: {entangle_positions: false}}}."""

    preset: str = "cpu-tiny"
    overrides: dict[str, Any] = Field(default_factory=dict)
    task_overrides: dict[Task, dict[str, Any]] = Field(default_factory=dict)

    @field_validator("preset")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in PRESETS:
            raise ValueError(f"unknown model preset {v!r}; choose one of {sorted(PRESETS)}")
        return v

    def build(self, task: Task | None = None, **extra) -> ModelConfig:
        """The model config (of `task`, with its overrides), plus `extra` fields."""
        per_task = self.task_overrides.get(task, {}) if task is not None else {}
        return ModelConfig.from_name(self.preset, **{**self.overrides, **per_task, **extra})


class PipelineConfig(Strict):
    name: str = "narvl"
    profile: str = "custom"
    seed: Seed = 0
    tasks: list[Task] = Field(default_factory=lambda: list(TASKS))
    data: DataConfig = DataConfig()
    model: ModelSection = ModelSection()
    pretrain: PretrainConfig = PretrainConfig()
    train_teacher: TeacherTrainConfig = TeacherTrainConfig()
    distill: DistillConfig = DistillConfig()
    train_nar: NARTrainConfig = NARTrainConfig()
    evaluate: EvalConfig = EvalConfig()
    benchmark: BenchmarkConfig = BenchmarkConfig()
    # the same ablations for every task, or per task: {caption: [ce_no_kd, no_kd], vqa: [no_kd]}
    ablations: list[Ablation] | dict[Task, list[Ablation]] = Field(default_factory=list)
    resources: ResourcesConfig = ResourcesConfig()
    log_models: bool = Field(True, description="log each trained model to its MLflow run as a pyfunc model "
                             "(`narvl serve runs:/<id>/model`, the model registry); a few seconds per model")
    # the teacher starts from OFA's weights (the paper's recipe); NARVL then starts from the fine-tuned teacher
    init_from: OFAInit | None = None

    @model_validator(mode="before")
    @classmethod
    def _ofa_tokenizer(cls, data: Any) -> Any:
        """init_from.bpe_dir selects OFA's tokenizer: data.tokenizer=ofa, data.ofa_bpe_dir=bpe_dir."""
        init = data.get("init_from") if isinstance(data, dict) else None
        section = data.get("data", {}) if isinstance(data, dict) else None
        if not (isinstance(init, dict) and init.get("bpe_dir") and isinstance(section, dict)):
            return data
        if section.get("ofa_bpe_dir") not in (None, init["bpe_dir"]):
            raise ValueError(f"init_from.bpe_dir={init['bpe_dir']!r} and data.ofa_bpe_dir={section['ofa_bpe_dir']!r}"
                             " name different folders; set one of them")
        return {**data, "data": {**section, "tokenizer": "ofa", "ofa_bpe_dir": init["bpe_dir"]}}

    def task_ablations(self, task: Task) -> list[Ablation]:
        """The ablations that run for `task`."""
        return list(self.ablations.get(task, [])) if isinstance(self.ablations, dict) else list(self.ablations)

    @model_validator(mode="after")
    def _check(self) -> PipelineConfig:
        if not self.tasks:
            raise ValueError("tasks: at least one of " + ", ".join(TASKS))
        if self.data.source == "shapes":
            for task in self.tasks:
                n, need = self.train_nar.num_queries.get(task), SHAPES_MIN_QUERIES[task]
                if n is None:
                    raise ValueError(f"train_nar.num_queries has no entry for task {task!r}")
                if self.train_nar.loss == "qctc" and n < need and not self.train_nar.allow_infeasible_queries:
                    raise ValueError(
                        f"train_nar.num_queries.{task}={n} is too small: the built-in benchmark's longest {task} "
                        f"target needs at least {need} queries for Q-CTC (target length + EOS + repeats); set "
                        "train_nar.allow_infeasible_queries=true to train on the targets that fit anyway"
                    )
        if self.train_teacher.shared:
            if self.data.source != "shapes":
                raise ValueError("train_teacher.shared=true draws every task's samples from the built-in benchmark's "
                                 "scenes (data.source=shapes); with converted data train one teacher per task")
            if self.train_teacher.aux_tasks:
                raise ValueError("train_teacher.shared=true sets the task mix itself (equal shares of the run's "
                                 "tasks); leave train_teacher.aux_tasks empty")
            if self.model.task_overrides:
                raise ValueError("train_teacher.shared=true trains one model for every task; model.task_overrides "
                                 f"({', '.join(self.model.task_overrides)}) cannot apply to it")
        if self.pretrain.enabled and self.data.source != "shapes":
            raise ValueError("pretrain.enabled=true needs the built-in benchmark's object annotations "
                             "(data.source=shapes); with converted data set pretrain.enabled=false")
        if self.model.build().image_size != self.data.image_size:
            raise ValueError(
                f"model image_size={self.model.build().image_size} differs from data.image_size="
                f"{self.data.image_size}; set model.overrides.image_size or data.image_size to match"
            )
        shared = self.model.build()
        if self.init_from is not None:
            if shared.position_scheme != "ofa":
                raise ValueError(f"init_from.ofa needs an OFA model preset (tiny, medium, base, large, huge) of the "
                                 f"checkpoint's size, not {self.model.preset!r}")
            if self.data.tokenizer != "ofa" or self.data.num_bins != 1000:
                raise ValueError("init_from.ofa needs OFA's tokenizer so that ids are the checkpoint's rows: set "
                                 "init_from.bpe_dir (OFA's utils/BPE) and data.num_bins=1000 "
                                 f"(got tokenizer={self.data.tokenizer}, num_bins={self.data.num_bins})")
        for task in self.tasks:
            own = self.model.build(task)
            if own.image_size != self.data.image_size:
                raise ValueError(f"model.task_overrides.{task}: image_size must stay data.image_size")
            if self.pretrain.enabled:  # one pretrained backbone serves every task
                changed = [f for f in BACKBONE_FIELDS if getattr(shared, f) != getattr(own, f)]
                if changed:
                    raise ValueError(f"model.task_overrides.{task} changes the image backbone ({', '.join(changed)})"
                                     ", which the pretrain stage trains once for all tasks; set it in "
                                     "model.overrides, or pretrain.enabled=false")
        return self


def backbone_config(model: ModelConfig) -> ModelConfig:
    """What the pretrain stage reads of a model config (the backbone fields and the image size), the other fields
    at their defaults: the pretrain key then changes with the backbone only, not with d_model or dropout."""
    return ModelConfig(**{f: getattr(model, f) for f in (*BACKBONE_FIELDS, "image_size")})


class ConfigError(ValueError):
    """A config file or override that does not validate; the message names the field and the fix."""


def _parse_value(item: str, raw: str) -> Any:
    # YAML scalars/lists/dicts; nothing is evaluated as code.
    if raw == "":
        return ""
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: the value is not valid YAML ({_one_line(e)})") from None
    except RecursionError:
        raise ConfigError(f"override {item!r}: the value is nested too deeply") from None


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `a.b.c=value` overrides to a nested dict (values parsed as YAML)."""
    data = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. train_nar.lr=1e-4")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(p.strip() for p in parts):
            raise ConfigError(f"override {item!r}: {key.strip()!r} is not a dotted field name, e.g. train_nar.lr")
        node = data
        for p in parts[:-1]:
            if node.get(p) is None:  # absent, or an empty section (`data:` with nothing under it)
                node[p] = {}
            node = node[p]
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {p!r} is not a section")
        node[parts[-1]] = _parse_value(item, raw)
    return data


def read_yaml_mapping(path: str | Path, what: str = "config file") -> dict:
    """A YAML file whose top level is a mapping (empty file: {}); ConfigError naming the file otherwise."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{what} {path} is a folder; give a YAML file") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{what} {path} is not UTF-8 text ({e})") from None
    except OSError as e:
        raise ConfigError(f"{what} {path} cannot be read ({type(e).__name__}: {e})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    except RecursionError:
        raise ConfigError(f"{path}: YAML nested too deeply") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping (key: value lines) at the top level, got "
                          f"{type(data).__name__}")
    return data


def validation_message(e: ValidationError) -> str:
    """One line per error of a pydantic ValidationError: the dotted field, the problem, the value given."""
    lines = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "(top level)"
        got = err.get("input")
        got_s = "" if isinstance(got, dict) else f" (got {_short(got)})"
        lines.append(f"  {loc}: {err['msg']}{got_s}")
    return "\n".join(lines)


def _short(value: Any, limit: int = 80) -> str:
    r = repr(value)
    return r if len(r) <= limit else r[:limit] + "..."


def profile_path(profile: str) -> Path:
    path = CONFIG_DIR / "pipelines" / f"{profile}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in (CONFIG_DIR / "pipelines").glob("*.yaml"))
        raise ConfigError(f"unknown profile {profile!r}; known: {', '.join(known)}")
    return path


def load_config(path: str | Path | None = None, profile: str | None = None,
                overrides: list[str] | None = None) -> PipelineConfig:
    """Load a pipeline config from a YAML file (or a named profile, default 'default') and overrides."""
    if path is None:
        path = profile_path(profile or "default")
    path = Path(path)
    data = apply_overrides(read_yaml_mapping(path), overrides or [])
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"{path}: invalid config\n{validation_message(e)}") from None


def config_to_yaml(cfg: PipelineConfig | Strict) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def cache_dict(cfg: BaseModel) -> dict:
    """The config as a dict without fields marked cache=False (they do not change results); a path marked
    cache="content" (outside the root) shows only whether it is set: its content enters the key instead
    (pipeline/content.py).

    Recurses into every pydantic model (ModelConfig is not a Strict), lists, tuples and dicts.
    """
    out = {}
    for name, field in type(cfg).model_fields.items():
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        if extra.get("cache") is False:
            continue
        value = getattr(cfg, name)
        if extra.get("cache") == "content":  # unset stays None: the keys of configs without it do not move
            out[name] = None if value is None else "<content>"
            continue
        out[name] = _jsonable(value)
    return out


def _jsonable(v: Any) -> Any:
    if isinstance(v, BaseModel):
        return cache_dict(v)
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    return v
