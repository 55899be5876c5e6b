"""pretrain: the backbone learns the benchmark's objects from dense labels, and the teacher starts from it."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from narvl_model.config import ModelConfig
from narvl_model.model import ARModel
from pipeline.config import ConfigError, load_config
from stages import prepare_data, pretrain
from stages.common import PrintLog
from stages.config import DataConfig, PrepareDataStage, PretrainConfig, PretrainStage

pytestmark = pytest.mark.usefixtures("one_thread")


DATA = DataConfig(image_size=64, train_per_task=2048, val_per_task=128, test_per_task=16, samples_per_shard=256,
                  bpe_vocab_size=200, num_bins=16)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrain-data")
    prepare_data.run(PrepareDataStage(task="vqa", data=DATA), prepare_data.Inputs(), out, PrintLog())
    return out


def test_dense_targets_put_each_object_in_its_centre_cell():
    sample = {"id": "s", "image_size": [64, 64],
              "meta": {"objects": [["large", "red", "star", 0, 0, 20, 20], ["small", "blue", "cross", 40, 44, 51, 55]]}}
    classes, objectness = pretrain.dense_targets([sample], (4, 4))
    assert objectness[0].nonzero().tolist() == [[0, 0], [3, 2]]  # centres (10, 10) and (45.5, 49.5)
    assert classes[0, :, 0, 0].tolist() == [5, 0, 1]  # star, red, large
    assert classes[0, :, 3, 2].tolist() == [4, 2, 0]  # cross, blue, small
    assert (classes[0, 0] >= 0).sum() == 2
    with pytest.raises(ValueError, match="'bare'.*meta.objects"):
        pretrain.dense_targets([{"id": "bare", "image_size": [64, 64]}], (4, 4))


def test_pretrain_learns_objects_and_teacher_backbone_loads_it(data, tmp_path):
    cfg = PretrainStage(data=DATA, model=ModelConfig.from_name("cpu-tiny"),
                        pretrain=PretrainConfig(enabled=True, steps=300, batch_size=32, log_every=50))
    out = pretrain.run(cfg, pretrain.Inputs(data=data), tmp_path, PrintLog())
    assert json.loads((tmp_path / "metrics.json").read_text()) == pytest.approx(out)
    # chance: colour 1/6, shape 1/6, size 1/2 (at the cells holding an object centre)
    assert out["val_colour_acc"] > 0.9, out
    assert out["val_size_acc"] > 0.75, out
    assert out["val_shape_acc"] > 0.4, out
    weights = load_file(str(tmp_path / pretrain.WEIGHTS))
    model = ARModel(ModelConfig.from_name("cpu-tiny", vocab_size=300, blank_id=299))
    model.encoder.backbone.load_state_dict(weights)  # strict: the same module the teacher builds
    assert all(torch.equal(v, model.encoder.backbone.state_dict()[k]) for k, v in weights.items())


def test_pretrain_needs_the_builtin_benchmark():
    with pytest.raises(ConfigError, match="pretrain.enabled=true needs"):
        load_config(profile="smoke", overrides=["pretrain.enabled=true", "data.source=shards",
                                                       "data.shards_dir=/nowhere"])
