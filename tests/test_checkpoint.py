"""Safetensors round trip and the OFA (fairseq) key mapping."""

from __future__ import annotations

import json
import re

import pytest
import torch

from narvl_model.checkpoint import load_model, load_ofa_state_dict, ofa_key_to_ours, save_model
from narvl_model.config import OFA_VOCAB_SIZE, ModelConfig
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


def ofa_names(state: dict[str, torch.Tensor], vocab: int) -> dict[str, torch.Tensor]:
    """Our state dict under OFA's names and table layouts (written independently of checkpoint.py)."""
    out = {}
    for key, value in state.items():
        if key in ("embed_tokens.weight", "encoder.embed_tokens.weight"):
            for name in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight",
                         "decoder.output_projection.weight"):
                out[name] = value[:vocab].clone()
            continue
        if key.startswith("encoder.image_layernorm_embedding") or key == "queries.weight":
            continue  # OFA normalises both parts with one LayerNorm; it has no learnable queries
        if key == "encoder.embed_image_positions.weight":
            value = torch.cat([value.new_zeros(1, value.shape[1]), value])
        name = key.replace("encoder.backbone.", "encoder.embed_images.")
        name = re.sub(r"^decoder\.pos_(q|k)_linear", r"decoder.self_pos_\1_linear", name)
        name = re.sub(r"^encoder\.rel_pos_tables", "encoder.rel_pos_table_list", name)
        name = re.sub(r"^decoder\.rel_pos_tables", "decoder.token_rel_pos_table_list", name)
        name = name.replace("image_rel_pos_tables", "image_rel_pos_table_list")
        out[name] = value.clone()
    out["encoder.image_pos_ln.weight"] = torch.ones(1)
    out["decoder.embed_image_positions.weight"] = torch.ones(1)
    return out


def test_load_ofa_state_dict_maps_every_weight():
    torch.manual_seed(0)
    source = ARModel(cfg())
    with torch.no_grad():
        for p in source.parameters():
            p.normal_()
    ofa = ofa_names(source.state_dict(), vocab=29)
    target = ARModel(cfg())
    missing, unexpected = load_ofa_state_dict(target, ofa)
    assert missing == [] and sorted(unexpected) == ["decoder.embed_image_positions.weight",
                                                    "encoder.image_pos_ln.weight"]
    src_sd, tgt_sd = source.state_dict(), target.state_dict()
    for key, value in tgt_sd.items():
        if key.endswith("embed_tokens.weight"):
            assert torch.equal(value[:29], src_sd[key][:29])  # the blank row is not in OFA's vocabulary
        elif key.startswith("encoder.image_layernorm_embedding"):
            assert torch.equal(value, src_sd[key.replace("image_layernorm", "layernorm")])
        else:
            assert torch.equal(value, src_sd[key]), key


def test_ofa_key_coverage_for_tiny_preset():
    c = ModelConfig.from_name("tiny", vocab_size=OFA_VOCAB_SIZE + 1, blank_id=OFA_VOCAB_SIZE)
    with torch.device("meta"):
        model = NARVLModel(c)
    ofa = ofa_names(model.state_dict(), vocab=OFA_VOCAB_SIZE)
    covered = {ofa_key_to_ours(k) for k in ofa}
    ours = set(model.state_dict())
    assert ours - covered == {"encoder.embed_tokens.weight", "encoder.image_layernorm_embedding.weight",
                              "encoder.image_layernorm_embedding.bias", "queries.weight"}
    missing, _ = load_ofa_state_dict(model, ofa)
    assert missing == ["queries.weight"]
