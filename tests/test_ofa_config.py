"""init_from: {ofa, bpe_dir} in the pipeline config: checked at load time, OFA's tokenizer selected."""

from __future__ import annotations

import json
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


def test_teacher_model_from_init_from(tmp_path):
    """What train_teacher does with init_from: the stage's model config with OFA's tokenizer ids, OFA's weights."""
    from narvl_model.ofa import init_model_from_ofa
    from narvl_model.tokenizer import Tokenizer
    from stages.train import build_model_config
    from tests.test_ofa import SHARED_OFA
    from tests.test_tokenizer import ofa_sized_bpe_dir

    spec_path = SHARED_OFA / "ofa_tiny.json"
    if not spec_path.is_file():
        pytest.skip(f"OFA key lists not found at {SHARED_OFA}")
    spec = json.loads(spec_path.read_text())
    g = torch.Generator().manual_seed(0)
    integer = spec["non_float32_dtypes"]  # BN counters (kept, zero) and the optional bucket buffers (left out)
    state = {k: torch.zeros(shape, dtype=torch.long) if k in integer else torch.randn(shape, generator=g)
             for k, shape in spec["state_dict"].items() if k not in integer or k.endswith("num_batches_tracked")}
    for alias in ("decoder.embed_tokens.weight", "decoder.output_projection.weight"):
        state[alias] = state["encoder.embed_tokens.weight"]
    ckpt = tmp_path / "ofa_tiny.pt"
    torch.save({"model": state}, ckpt)
    bpe = ofa_sized_bpe_dir(tmp_path)
    cfg = load_config(profile="paper_tiny_caption", overrides=[init_override(ckpt, bpe)])
    stage = TrainStage(task="caption", model=cfg.model.build("caption"), train=cfg.train_teacher,
                       init_from=cfg.init_from)
    model_cfg = build_model_config("ar", stage, Tokenizer.from_ofa_bpe_dir(cfg.data.ofa_bpe_dir))
    model = init_model_from_ofa(model_cfg, stage.init_from.ofa)
    assert model.cfg.vocab_size == 59458 and model.cfg.blank_id == 59457
    ours = model.state_dict()
    assert torch.equal(ours["embed_tokens.weight"][:59457], state["encoder.embed_tokens.weight"])
    assert torch.equal(ours["encoder.layers.3.self_attn_ln.bias"], state["encoder.layers.3.attn_ln.bias"])
    assert torch.equal(ours["encoder.backbone.layer3.5.bn3.running_var"],
                       state["encoder.embed_images.layer3.5.bn3.running_var"])
