"""Model checkpoints: safetensors weights + the resolved config.

`save_model(model, dir)` writes `model.safetensors` and `model_config.json` ({"kind": "ar" | "narvl",
"config": {...}}); `load_model(dir)` rebuilds the model from those two files only (no pickles).

OFA checkpoints (fairseq) are read by narvl_model.ofa (exact key mapping, proven by forward parity).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_model as st_load_model
from safetensors.torch import save_model as st_save_model

from narvl_model.config import ModelConfig
from narvl_model.model import ARModel, NARVLModel

WEIGHTS = "model.safetensors"
CONFIG = "model_config.json"


def save_model(model: ARModel | NARVLModel, directory: str | Path) -> Path:
    """Write model.safetensors (tied tensors stored once) and model_config.json with its kind and config."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    kind = "narvl" if isinstance(model, NARVLModel) else "ar"
    st_save_model(model, str(directory / WEIGHTS))
    (directory / CONFIG).write_text(json.dumps({"kind": kind, "config": model.cfg.model_dump(mode="json")},
                                               indent=2))
    return directory


def load_model(directory: str | Path, device: str | torch.device = "cpu") -> ARModel | NARVLModel:
    """Rebuild a model saved by save_model (safetensors only), in eval mode."""
    directory = Path(directory)
    meta = json.loads((directory / CONFIG).read_text())
    cfg = ModelConfig(**meta["config"])
    model = {"ar": ARModel, "narvl": NARVLModel}[meta["kind"]](cfg)
    st_load_model(model, str(directory / WEIGHTS), strict=True, device=str(device))
    return model.to(device).eval()
