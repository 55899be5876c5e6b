"""Start from OFA's released checkpoints: safe reading, exact key mapping, the config a checkpoint implies.

OFA (OFA-Sys/OFA) checkpoints are fairseq trainer files: the weights under "model", next to "args" (a pickled
argparse.Namespace) or "cfg", "optimizer_history", "extra_state" ... A plain state dict (.pt or .safetensors) with
OFA's key names works too. With the OFA layer options of narvl_model.config (the `tiny` .. `huge` presets) our
ARModel is OFA's encoder-decoder key for key; tests/test_ofa.py proves it by forward parity against logits that
OFA's own code produced (the fixture described in the README, "Starting from OFA").

Key mapping (OFA name -> ours; `N` a layer index; every other key has the same name in both):

| OFA                                                                  | ours                                 |
|----------------------------------------------------------------------|--------------------------------------|
| encoder.embed_tokens, decoder.embed_tokens, decoder.output_projection | embed_tokens (one tied tensor)       |
| encoder.embed_images.*  (ResNet stem + layer1-3)                      | encoder.backbone.*                   |
| encoder.patch_layernorm_embedding                                     | encoder.image_layernorm_embedding    |
| encoder.layers.N.attn_ln                                              | encoder.layers.N.self_attn_ln        |
| decoder.self_pos_{q,k}_linear                                         | decoder.pos_{q,k}_linear             |
| {encoder,decoder}.token_rel_pos_table_list.N                          | {encoder,decoder}.rel_pos_tables.N   |
| {encoder,decoder}.image_rel_pos_table_list.N                          | {encoder,decoder}.image_rel_pos_tables.N |

OPTIONAL_BUFFERS lists the OFA buffers we recompute instead of loading (real files may lack them, see the shared
OFA README); the relative-position bucket buffers, when present, must equal ours or loading fails.
"""

from __future__ import annotations

import argparse
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from narvl_model.config import ModelConfig
from narvl_model.model import ARModel, image_rel_index_for, ofa_text_rel_index

_RENAMES: list[tuple[str, str]] = [
    (r"^(?:encoder\.embed_tokens|decoder\.embed_tokens|decoder\.output_projection)\.weight$", "embed_tokens.weight"),
    (r"^encoder\.embed_images\.", "encoder.backbone."),
    (r"^encoder\.patch_layernorm_embedding\.", "encoder.image_layernorm_embedding."),
    (r"^encoder\.layers\.(\d+)\.attn_ln\.", r"encoder.layers.\1.self_attn_ln."),
    (r"^decoder\.self_pos_(q|k)_linear\.", r"decoder.pos_\1_linear."),
    (r"^(encoder|decoder)\.token_rel_pos_table_list\.(\d+)\.", r"\1.rel_pos_tables.\2."),
    (r"^(encoder|decoder)\.image_rel_pos_table_list\.(\d+)\.", r"\1.image_rel_pos_tables.\2."),
]

# OFA buffers not loaded: fairseq's version counters, the bucket tables (recomputed; checked when present) and the
# image-code position ids (image generation only; their length depends on --code-image-size).
OPTIONAL_BUFFERS = ("encoder.version", "decoder.version", "encoder.token_rp_bucket", "decoder.token_rp_bucket",
                    "encoder.image_rp_bucket", "decoder.image_rp_bucket", "decoder.image_position_idx")

# Globals a fairseq checkpoint may pickle besides tensors and plain containers (which weights_only allows): the
# argparse Namespace of its training arguments, and numpy scalars / arrays of numbers in its meters (their numeric
# dtype classes are allowed with them). Anything else is refused.
ALLOWED_PICKLE_GLOBALS = ("argparse.Namespace", "numpy.dtype", "numpy.ndarray",
                          "numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar",
                          "numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct")
_NUMPY_DTYPES = ("bool", "int8", "int16", "int32", "int64", "uint8", "float16", "float32", "float64")

# Fields that must agree between a model config and the checkpoint it starts from.
ARCH_FIELDS = ("d_model", "encoder_layers", "decoder_layers", "heads", "ffn_dim", "backbone", "resnet_layers",
               "backbone_width", "max_source_positions", "max_target_positions", "rel_pos_buckets",
               "image_rel_pos_max", "position_scheme", "image_pos_ln", "zero_pad_embeddings", "code_embeddings",
               "scale_parts", "entangle_positions", "decoder_entangled")


def ofa_key_to_ours(key: str) -> str:
    """Our parameter name for an OFA key (unchanged where the names agree)."""
    for pattern, repl in _RENAMES:
        new = re.sub(pattern, repl, key)
        if new != key:
            return new
    return key


# ---- reading files ----------------------------------------------------------------------------------------------


def _allowed_global(name: str) -> Any:
    if name == "argparse.Namespace":
        return argparse.Namespace
    import importlib

    module, _, attr = name.rpartition(".")
    return getattr(importlib.import_module(module), attr)


def safe_torch_load(path: Path) -> Any:
    """torch.load(weights_only=True), allowing only ALLOWED_PICKLE_GLOBALS on top; anything else is refused."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        needed = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    refused = [g for g in needed if g not in ALLOWED_PICKLE_GLOBALS]
    if refused:
        raise ValueError(f"{path}: refusing to unpickle {refused}. Besides tensors and plain containers only "
                         f"{list(ALLOWED_PICKLE_GLOBALS)} are allowed. If you trust the file, re-save its weights "
                         f"alone: torch.save(torch.load(f, weights_only=False)['model'], 'state.pt')")
    objects = []
    for name in needed:
        try:
            objects.append(_allowed_global(name))
        except (ImportError, AttributeError):
            continue  # a numpy path of another numpy major version
    if any(name.startswith("numpy") for name in needed):
        import numpy as np

        objects += [type(np.dtype(t)) for t in _NUMPY_DTYPES]
    with torch.serialization.safe_globals(objects):
        return torch.load(path, map_location="cpu", weights_only=True)


def read_ofa_file(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(state dict with OFA's names, training args as a dict ({} if the file has none)) of a checkpoint file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"OFA checkpoint {path} not found (expected a fairseq .pt such as ofa_base.pt, "
                                f"or a state dict in .pt/.safetensors)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path)), {}
    obj = safe_torch_load(path)
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a fairseq checkpoint dict or a state dict, got {type(obj).__name__}")
    args: dict[str, Any] = {}
    if isinstance(obj.get("model"), dict):
        raw = obj.get("args")
        if raw is None and isinstance(obj.get("cfg"), dict):
            raw = obj["cfg"].get("model")
        args = vars(raw) if isinstance(raw, argparse.Namespace) else dict(raw or {})
        obj = obj["model"]
    bad = [k for k, v in obj.items() if not isinstance(v, Tensor)]
    if bad:
        raise ValueError(f"{path}: not a state dict, non-tensor entries {bad[:5]}")
    return obj, args


# ---- the config a checkpoint implies ----------------------------------------------------------------------------


def _count(state: dict[str, Tensor], prefix: str) -> int:
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    return len({int(m.group(1)) for k in state if (m := pat.match(k))})


def config_from_ofa(state: dict[str, Tensor], args: dict[str, Any] | None = None, **overrides) -> ModelConfig:
    """The ModelConfig of our OFA-layout model that holds exactly these OFA weights."""
    args = args or {}
    need = ("encoder.embed_tokens.weight", "encoder.layers.0.fc1.weight", "encoder.embed_images.conv1.weight",
            "encoder.embed_positions.weight", "decoder.embed_positions.weight", "encoder.embed_image_positions.weight",
            "encoder.token_rel_pos_table_list.0.weight")
    absent = [k for k in need if k not in state]
    if absent:
        raise ValueError(f"not an OFA state dict: keys {absent} are missing")
    for flag, ours in (("attn_scale_factor", 2), ("scale_resids", False)):
        if flag in args and args[flag] != ours:
            raise ValueError(f"checkpoint trained with {flag}={args[flag]!r}: this model implements {ours!r} only")
    if args.get("entangle_position_embedding"):
        raise ValueError("checkpoint trained with --entangle-position-embedding (encoder-side entangled positions): "
                         "not supported, no OFA script uses it")
    vocab, d = state["encoder.embed_tokens.weight"].shape
    image_rows = state["encoder.embed_image_positions.weight"].shape[0]
    image_size = round((image_rows - 1) ** 0.5)
    if image_size ** 2 + 1 != image_rows:
        raise ValueError(f"encoder.embed_image_positions has {image_rows} rows, expected bucket**2 + 1")
    layer = "encoder.layers.0."
    fields = dict(
        d_model=d, vocab_size=vocab, heads=state["encoder.token_rel_pos_table_list.0.weight"].shape[1],
        encoder_layers=_count(state, "encoder.layers."), decoder_layers=_count(state, "decoder.layers."),
        ffn_dim=state[layer + "fc1.weight"].shape[0], backbone="resnet",
        resnet_layers=tuple(_count(state, f"encoder.embed_images.layer{i}.") for i in (1, 2, 3)),
        backbone_width=state["encoder.embed_images.conv1.weight"].shape[0],
        image_size=int(args.get("patch_image_size", 480)),
        max_source_positions=state["encoder.embed_positions.weight"].shape[0] - 2,
        max_target_positions=state["decoder.embed_positions.weight"].shape[0] - 2,
        rel_pos_buckets=(state["encoder.token_rel_pos_table_list.0.weight"].shape[0] + 1) // 2,
        image_rel_pos_max=image_size, position_scheme="ofa", zero_pad_embeddings=True,
        image_pos_ln="encoder.image_pos_ln.weight" in state,
        code_embeddings="decoder.code_layernorm_embedding.weight" in state,
        normformer=True, scale_attn=layer + "attn_ln.weight" in state,
        scale_fc=layer + "ffn_layernorm.weight" in state, scale_heads=layer + "self_attn.c_attn" in state,
        entangle_positions=False, entangle_decoder_positions=not args.get("disable_entangle", True),
        dropout=float(args.get("dropout", 0.1)), drop_path=float(args.get("encoder_drop_path_rate", 0.1)),
        init_std=0.02, pad_id=int(args.get("pad", 1)), bos_id=int(args.get("bos", 0)), eos_id=int(args.get("eos", 2)),
    )
    return ModelConfig(**{**fields, **overrides})


# ---- mapping ----------------------------------------------------------------------------------------------------


def _check_buckets(key: str, value: Tensor, cfg: ModelConfig) -> None:
    """A bucket buffer of the checkpoint must equal the buckets our model computes (else positions differ)."""
    if value.is_meta:
        return
    if key.endswith("token_rp_bucket"):
        n = value.shape[0]  # OFA stores the table index (bucket + buckets - 1), as we compute it
        ours = ofa_text_rel_index(n, n, cfg.rel_pos_buckets, n)
    elif key.endswith("image_rp_bucket"):
        b = cfg.image_rel_pos_max
        grid = image_rel_index_for(cfg, b, b)
        ours, value = grid, value[1:, 1:]  # row/column 0: OFA's CLS slot, unused here
    else:
        return
    if tuple(value.shape) != tuple(ours.shape) or not torch.equal(value.long(), ours):
        raise ValueError(f"OFA buffer {key} {list(value.shape)} differs from the buckets this model computes: "
                         f"the checkpoint uses another relative-position layout")


def ofa_to_ours(state: dict[str, Tensor], cfg: ModelConfig, expected: dict[str, torch.Size],
                extra_vocab_rows: Tensor | None = None) -> dict[str, Tensor]:
    """Map an OFA state dict onto our names, exactly.

    Args:
        state: OFA names -> tensors.
        cfg: our model config (for the bucket checks).
        expected: our state dict's names -> shapes (e.g. from a model built on the meta device).
        extra_vocab_rows: rows appended to OFA's embedding when our vocabulary is larger (the CTC blank).

    Raises:
        ValueError listing every unmapped OFA key, shape mismatch, missing key of ours and tied-key disagreement.
    """
    out: dict[str, Tensor] = {}
    unmapped, mismatched, tied = [], [], []
    for key, value in state.items():
        if key in OPTIONAL_BUFFERS:
            _check_buckets(key, value, cfg)
            continue
        name = ofa_key_to_ours(key)
        if name == "embed_tokens.weight" and extra_vocab_rows is not None:
            value = torch.cat([value, extra_vocab_rows.to(value.dtype)])
        if name not in expected:
            unmapped.append(key)
        elif tuple(value.shape) != tuple(expected[name]):
            mismatched.append(f"{key} {list(value.shape)} -> {name} {list(expected[name])}")
        elif name in out:
            if not (value.is_meta or torch.equal(out[name], value)):
                tied.append(key)
        else:
            out[name] = value
    if "embed_tokens.weight" in out:
        out["encoder.embed_tokens.weight"] = out["embed_tokens.weight"]  # the encoder's reference to the same table
    missing = [k for k in expected if k not in out]
    problems = []
    if unmapped:
        problems.append(f"OFA keys with no place in our model: {unmapped}")
    if mismatched:
        problems.append(f"shape mismatches: {mismatched}")
    if missing:
        problems.append(f"our keys the checkpoint does not fill: {missing}")
    if tied:
        problems.append(f"keys that should equal encoder.embed_tokens.weight (tied) but differ: {tied}")
    if problems:
        raise ValueError("OFA checkpoint does not match the model exactly: " + "; ".join(problems))
    return out


def expected_shapes(cfg: ModelConfig) -> dict[str, torch.Size]:
    """Our state dict's names and shapes for cfg, without allocating weights."""
    with torch.device("meta"):
        return {k: v.shape for k, v in ARModel(cfg).state_dict().items()}


# ---- entry points -----------------------------------------------------------------------------------------------


def load_ofa_checkpoint(path: str | Path, **overrides) -> tuple[ARModel, ModelConfig]:
    """OFA checkpoint -> (our ARModel holding its weights exactly, in eval mode; the ModelConfig it implies).

    `overrides` set non-architecture fields of the config (dropout, drop_path, image_size, ...).
    """
    state, args = read_ofa_file(path)
    cfg = config_from_ofa(state, args, **overrides)
    model = ARModel(cfg)
    model.load_state_dict(ofa_to_ours(state, cfg, {k: v.shape for k, v in model.state_dict().items()}), strict=True)
    return model.eval(), cfg


def init_model_from_ofa(model_cfg: ModelConfig, ckpt_path: str | Path) -> ARModel:
    """An ARModel for model_cfg whose weights are OFA's (the teacher's starting point in the paper's recipe).

    model_cfg must have the checkpoint's architecture (use the matching preset: ofa_tiny.pt -> `tiny`, ...) and a
    vocabulary at least as large as the checkpoint's (OFA's tokenizer adds the CTC blank as one extra last row,
    which keeps its fresh initialisation). Raises ValueError naming each field that disagrees.
    """
    state, args = read_ofa_file(ckpt_path)
    ofa_cfg = config_from_ofa(state, args)
    diff = [f"{f}: config {getattr(model_cfg, f)!r} vs checkpoint {getattr(ofa_cfg, f)!r}"
            for f in ARCH_FIELDS if getattr(model_cfg, f) != getattr(ofa_cfg, f)]
    if model_cfg.vocab_size is None or model_cfg.vocab_size < ofa_cfg.vocab_size:
        diff.append(f"vocab_size: config {model_cfg.vocab_size} < checkpoint {ofa_cfg.vocab_size} (use OFA's "
                    f"tokenizer: data.ofa_bpe_dir / init_from.bpe_dir)")
    if diff:
        raise ValueError(f"model config does not match the OFA checkpoint {ckpt_path}: " + "; ".join(diff))
    model = ARModel(model_cfg)
    extra = model.embed_tokens.weight.detach()[ofa_cfg.vocab_size:] if model_cfg.vocab_size > ofa_cfg.vocab_size \
        else None
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    model.load_state_dict(ofa_to_ours(state, model_cfg, shapes, extra_vocab_rows=extra), strict=True)
    return model
