"""Every YAML under configs/ loads and validates; bad inputs fail with a message naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline.config import CONFIG_DIR, ConfigError, load_config

PIPELINES = sorted((CONFIG_DIR / "pipelines").glob("*.yaml"))
SWEEPS = sorted((CONFIG_DIR / "sweeps").glob("*.yaml"))
OTHER_YAML = sorted(p for p in CONFIG_DIR.rglob("*.y*ml") if p.parent.name not in ("pipelines", "sweeps"))


def test_profiles_exist():
    assert {p.stem for p in PIPELINES} >= {"smoke", "default"}


@pytest.mark.parametrize("path", PIPELINES, ids=lambda p: p.stem)
def test_pipeline_configs_validate(path: Path):
    cfg = load_config(path)
    assert cfg.tasks and cfg.profile
    assert load_config(profile=path.stem) == cfg


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_sweep_configs_validate_at_every_grid_point(path: Path):
    from pipeline.sweep import load_sweep_config, pipeline_for

    scfg = load_sweep_config(path)
    for task, values in scfg.num_queries.items():
        for n in values:
            assert pipeline_for(scfg, task, n).train_nar.num_queries[task] == n


def test_table10_sweep_runs_on_the_study_prefix_for_one_epoch():
    from pipeline.dag import build_graph
    from pipeline.sweep import load_sweep_config, pipeline_for

    scfg = load_sweep_config(CONFIG_DIR / "sweeps" / "query_length.yaml")
    trial = pipeline_for(scfg, "caption", 100)
    study = load_config(CONFIG_DIR / "studies" / "paper_tables.yaml")
    assert trial.train_nar.max_steps * trial.train_nar.batch_size >= trial.data.train_per_task  # one epoch
    a, b = build_graph(trial).nodes, build_graph(study).nodes
    assert a["caption/train_teacher"].key == b["caption/train_teacher"].key  # the study's teacher is reused
    assert a["caption/distill"].key == b["caption/distill"].key


@pytest.mark.parametrize("path", OTHER_YAML, ids=lambda p: str(p.relative_to(CONFIG_DIR)))
def test_other_configs_parse(path: Path):
    assert isinstance(yaml.safe_load(path.read_text()), dict)


def test_smoke_profile_is_small():
    cfg = load_config(profile="smoke")
    assert cfg.model.preset == "cpu-nano" and cfg.data.image_size == 32
    assert cfg.train_teacher.max_steps <= 100 and cfg.train_nar.max_steps <= 100
    assert cfg.data.train_per_task <= 500 and cfg.evaluate.max_samples <= 100


@pytest.mark.parametrize("override, field", [
    ("train_nar.foo=1", "train_nar.foo"),                       # unknown key
    ("train_nar.max_steps=abc", "train_nar.max_steps"),         # wrong type
    ("data.train_per_task=-5", "data.train_per_task"),          # negative size
    ("data.image_size=-1", "data.image_size"),
    ("train_nar.num_queries.caption=3", "train_nar.num_queries.caption"),  # too few queries for Q-CTC
    ("tasks=[caption,ocr]", "tasks"),
    ("model.preset=giant", "model.preset"),
])
def test_bad_overrides_name_the_field(override: str, field: str):
    with pytest.raises(ConfigError) as e:
        load_config(profile="smoke", overrides=[override])
    assert field in str(e.value)


def test_too_few_queries_only_when_asked_for_and_outside_the_key():
    from pipeline.dag import build_graph

    with pytest.raises(ConfigError, match="allow_infeasible_queries"):
        load_config(profile="smoke", overrides=["train_nar.num_queries.caption=10"])
    cfg = load_config(profile="smoke", overrides=["train_nar.num_queries.caption=10",
                                                  "train_nar.allow_infeasible_queries=true"])
    assert cfg.train_nar.num_queries["caption"] == 10
    same = load_config(profile="smoke", overrides=["train_nar.allow_infeasible_queries=true"])
    assert build_graph(same).nodes["caption/train_nar"].key == \
        build_graph(load_config(profile="smoke")).nodes["caption/train_nar"].key


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(tmp_path / "list.yaml")
    with pytest.raises(ConfigError, match="unknown profile"):
        load_config(profile="nope")
    with pytest.raises(ConfigError, match="key=value"):
        load_config(profile="smoke", overrides=["seed"])


def test_model_task_overrides_reach_every_stage_of_that_task_only():
    from pipeline.dag import build_graph

    cfg = load_config(profile="smoke", overrides=["model.task_overrides={vqa: {entangle_positions: false}}"])
    nodes = build_graph(cfg).nodes
    for name in ("train_teacher", "train_nar"):
        assert nodes[f"vqa/{name}"].cfg.model.entangle_positions is False
        assert nodes[f"caption/{name}"].cfg.model.entangle_positions is True  # the cpu-nano preset's value
    # one backbone pretraining for all tasks: a task may not change the backbone while it is on
    with pytest.raises(ConfigError, match="task_overrides.vqa changes the image backbone.*backbone_width"):
        load_config(profile="smoke", overrides=["model.task_overrides={vqa: {backbone_width: 4}}"])
    load_config(profile="smoke",
                overrides=["model.task_overrides={vqa: {backbone_width: 4}}", "pretrain.enabled=false"])
    assert nodes["vqa/train_teacher"].key != build_graph(load_config(profile="smoke")).nodes["vqa/train_teacher"].key
    with pytest.raises(ConfigError, match="entangle_position"):
        load_config(profile="smoke", overrides=["model.task_overrides={vqa: {entangle_position: false}}"])
