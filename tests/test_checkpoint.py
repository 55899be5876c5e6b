"""Safetensors round trip (the OFA key mapping is tested in tests/test_ofa.py)."""

from __future__ import annotations

import json

import pytest
import torch

from narvl_model.checkpoint import load_model, save_model
from narvl_model.config import ModelConfig
from narvl_model.model import ARModel, NARVLModel

pytestmark = pytest.mark.usefixtures("one_thread")


def cfg(**kw) -> ModelConfig:
    return ModelConfig.from_name("cpu-nano", vocab_size=30, blank_id=29, num_queries=6, **kw)


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    image, src = torch.randn(2, 3, 32, 32), torch.randint(4, 20, (2, 4))
    for model in (ARModel(cfg()).eval(), NARVLModel(cfg()).eval()):
        out = save_model(model, tmp_path / type(model).__name__)
        assert sorted(p.name for p in out.iterdir()) == ["model.safetensors", "model_config.json"]
        kind = json.loads((out / "model_config.json").read_text())["kind"]
        assert kind == ("ar" if isinstance(model, ARModel) else "narvl")
        loaded = load_model(out)
        assert type(loaded) is type(model) and loaded.cfg == model.cfg
        assert loaded.embed_tokens.weight.data_ptr() == loaded.encoder.embed_tokens.weight.data_ptr()
        with torch.no_grad():
            if isinstance(model, ARModel):
                prev = torch.randint(4, 20, (2, 3))
                assert torch.equal(model(image, src, prev), loaded(image, src, prev))
            else:
                assert torch.equal(model(image, src), loaded(image, src))
