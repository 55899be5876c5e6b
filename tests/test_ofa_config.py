"""init_from: {ofa, bpe_dir} in the pipeline config: checked at load time, OFA's tokenizer selected."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from pipeline.config import CONFIG_DIR, ConfigError, load_config
from stages.config import TrainStage

FIXTURES = Path(__file__).parent / "fixtures" / "ofa_bpe"
PAPER_PROFILES = sorted(p.stem for p in (CONFIG_DIR / "pipelines").glob("paper_*.yaml"))


@pytest.fixture()
def ofa_files(tmp_path) -> tuple[Path, Path]:
    ckpt = tmp_path / "ofa_tiny.pt"
    torch.save({"encoder.version": torch.tensor([3.0])}, ckpt)
    bpe = tmp_path / "BPE"
    shutil.copytree(FIXTURES, bpe)
    return ckpt, bpe


def init_override(ckpt: Path, bpe: Path) -> str:
    return f"init_from={{ofa: {ckpt}, bpe_dir: {bpe}}}"


@pytest.mark.parametrize("profile", PAPER_PROFILES)
def test_paper_configs_start_from_ofa_when_pointed_at_files(profile, ofa_files):
    ckpt, bpe = ofa_files
    assert load_config(profile=profile).init_from is None  # shipped commented out: users supply the files
    cfg = load_config(profile=profile, overrides=[init_override(ckpt, bpe)])
    assert cfg.init_from.ofa == str(ckpt.resolve()) and cfg.init_from.bpe_dir == str(bpe.resolve())
    assert cfg.data.tokenizer == "ofa" and cfg.data.ofa_bpe_dir == str(bpe)
    # the teacher stage's config carries it
    stage = TrainStage(task=cfg.tasks[0], model=cfg.model.build(cfg.tasks[0]), train=cfg.train_teacher,
                       init_from=cfg.init_from)
    assert stage.init_from.ofa == str(ckpt.resolve())


def test_missing_files_are_named(ofa_files, tmp_path):
    ckpt, bpe = ofa_files
    with pytest.raises(ConfigError, match=r"init_from.ofa.*nowhere\.pt not found"):
        load_config(profile="paper_tiny_vqa", overrides=[init_override(tmp_path / "nowhere.pt", bpe)])
    (bpe / "vocab.bpe").unlink()
    with pytest.raises(ConfigError, match=r"init_from.bpe_dir.*vocab\.bpe"):
        load_config(profile="paper_tiny_vqa", overrides=[init_override(ckpt, bpe)])


def test_init_from_needs_an_ofa_preset_and_tokenizer(ofa_files):
    ckpt, bpe = ofa_files
    with pytest.raises(ConfigError, match="needs an OFA model preset"):
        load_config(profile="smoke", overrides=[init_override(ckpt, bpe)])
    with pytest.raises(ConfigError, match="needs OFA's tokenizer"):
        load_config(profile="paper_tiny_vqa", overrides=[f"init_from={{ofa: {ckpt}}}"])
    with pytest.raises(ConfigError, match="different folders"):
        load_config(profile="paper_tiny_vqa", overrides=[init_override(ckpt, bpe), "data.ofa_bpe_dir=elsewhere"])
