"""Model checkpoints: safetensors weights + the resolved config, and loading OFA (fairseq) state dicts.

`save_model(model, dir)` writes `model.safetensors` and `model_config.json` ({"kind": "ar" | "narvl",
"config": {...}}); `load_model(dir)` rebuilds the model from those two files only (no pickles).

OFA key mapping (`load_ofa_state_dict`; OFA name on the left, ours on the right, `{i}` a layer index):

| OFA (fairseq unify_transformer)                                  | ours                                        |
|------------------------------------------------------------------|---------------------------------------------|
| encoder.embed_tokens / decoder.embed_tokens /                    | embed_tokens (tied; rows copied up to the   |
|   decoder.output_projection                                      |   smaller vocab, the NARVL blank row is new)|
| encoder.embed_images.{conv1,bn1,layer1-3}.*                      | encoder.backbone.*                          |
| encoder.image_proj                                               | encoder.image_proj                          |
| encoder.type_embedding                                           | encoder.type_embedding (rows 0-1)           |
| encoder.layernorm_embedding                                      | encoder.layernorm_embedding (and            |
|                                                                  |   image_layernorm_embedding if OFA has none)|
| encoder.image_layernorm_embedding (if present)                   | encoder.image_layernorm_embedding           |
| encoder.embed_positions                                          | encoder.embed_positions (first rows)        |
| encoder.embed_image_positions (row 0 unused: OFA ids start at 1) | encoder.embed_image_positions (OFA rows 1..)|
| {encoder,decoder}.pos_ln                                         | {encoder,decoder}.pos_ln                    |
| encoder.pos_{q,k}_linear, decoder.self_pos_{q,k}_linear          | {encoder,decoder}.pos_{q,k}_linear          |
| decoder.cross_pos_{q,k}_linear                                   | decoder.cross_pos_{q,k}_linear              |
| {encoder,decoder}.{token_,}rel_pos_table_list.{i}                | {encoder,decoder}.rel_pos_tables.{i}        |
| encoder.image_rel_pos_table_list.{i}                             | encoder.image_rel_pos_tables.{i}            |
| X.layers.{i}.self_attn.{q,k,v,out}_proj, .c_attn (head scale)    | X.layers.{i}.self_attn.*                    |
| X.layers.{i}.{self_attn_layer_norm, self_attn_ln | attn_ln,      | same names (attn_ln -> self_attn_ln)        |
|   final_layer_norm, fc1, fc2, ffn_layernorm}                     |                                             |
| decoder.layers.{i}.encoder_attn.*, encoder_attn_layer_norm,      | same names                                  |
|   cross_attn_ln                                                  |                                             |
| {encoder,decoder}.layer_norm                                     | {encoder,decoder}.layer_norm                |
| decoder.embed_positions                                          | decoder.embed_positions (first rows)        |

Not used (reported as unexpected): OFA's image_pos_ln, the decoder's image position tables and image relative
tables, `version` buffers, and any tensor whose shape cannot be matched (e.g. relative tables with another
bucket count). The mapping was written from the public OFA naming as remembered; keys the real checkpoint
names differently show up in the returned lists, so check them when loading one.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_model as st_load_model
from safetensors.torch import save_model as st_save_model
from torch import Tensor, nn

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


_RENAMES: list[tuple[str, str]] = [
    (r"^(encoder|decoder)\.embed_tokens\.weight$", "embed_tokens.weight"),
    (r"^decoder\.output_projection\.weight$", "embed_tokens.weight"),
    (r"^encoder\.embed_images\.", "encoder.backbone."),
    (r"^decoder\.self_pos_(q|k)_linear\.", r"decoder.pos_\1_linear."),
    (r"^(encoder|decoder)\.(?:token_)?rel_pos_table_list\.(\d+)\.", r"\1.rel_pos_tables.\2."),
    (r"^encoder\.image_rel_pos_table_list\.(\d+)\.", r"encoder.image_rel_pos_tables.\1."),
    (r"^(encoder|decoder)\.layers\.(\d+)\.attn_ln\.", r"\1.layers.\2.self_attn_ln."),
]
_ROW_SLICED = ("embed_tokens.weight", "encoder.embed_positions.weight", "decoder.embed_positions.weight",
               "encoder.type_embedding.weight")


def ofa_key_to_ours(key: str) -> str:
    """Our parameter name for an OFA/fairseq key (unchanged where the names agree)."""
    for pattern, repl in _RENAMES:
        new = re.sub(pattern, repl, key)
        if new != key:
            return new
    return key


def load_ofa_state_dict(model: nn.Module, state_dict: dict[str, Tensor]) -> tuple[list[str], list[str]]:
    """Copy an OFA (fairseq) state dict into our model in place, mapping names as in the module docstring.

    Position and vocabulary tables are copied row-wise up to the smaller size. Tensors of other mismatched
    shapes are skipped.

    Returns:
        (missing, unexpected): our keys that received nothing, OFA keys that were not used.
    """
    ours = model.state_dict()
    loaded: set[str] = set()
    unexpected: list[str] = []
    with torch.no_grad():
        for key, value in state_dict.items():
            name = ofa_key_to_ours(key)
            if key == "encoder.embed_image_positions.weight":
                value = value[1:]  # OFA image position ids start at 1
            targets = [name]
            if name == "encoder.layernorm_embedding.weight" or name == "encoder.layernorm_embedding.bias":
                alt = name.replace("layernorm_embedding", "image_layernorm_embedding")
                if f"encoder.image_layernorm_embedding.{name.rsplit('.', 1)[1]}" not in map(
                        ofa_key_to_ours, state_dict):
                    targets.append(alt)
            used = False
            for tgt in targets:
                if tgt not in ours:
                    continue
                dst = ours[tgt]
                if dst.shape == value.shape:
                    dst.copy_(value)
                elif tgt in _ROW_SLICED and dst.dim() == 2 and dst.shape[1] == value.shape[1]:
                    n = min(dst.shape[0], value.shape[0])
                    dst[:n].copy_(value[:n])
                else:
                    continue
                loaded.add(tgt)
                used = True
            if not used:
                unexpected.append(key)
    # state_dict() tensors share storage with the parameters, so the copies above already landed in the model;
    # tied names (embed_tokens / encoder.embed_tokens) count as loaded together.
    if "embed_tokens.weight" in loaded:
        loaded.add("encoder.embed_tokens.weight")
    missing = [k for k in ours if k not in loaded]
    return missing, unexpected
