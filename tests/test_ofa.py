"""Starting from OFA: forward parity with OFA's own outputs, exact key lists of all five sizes, safe loading.

Reference data (shared/ofa next to the repository, see its README): the state-dict names and shapes of every OFA
size as built by OFA's code, and a forward-parity fixture (a small OFA model, a deterministic weight fill checked
by sha256, fixed inputs, OFA's encoder outputs and logits). Tests that need it are skipped where it is absent.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
from pathlib import Path

import pytest
import torch

from narvl_model import ofa
from narvl_model.config import OFA_VOCAB_SIZE, ModelConfig
from narvl_model.model import ARModel, NARVLModel, count_parameters, image_rel_index_for, ofa_text_rel_index

pytestmark = pytest.mark.usefixtures("one_thread")

# ../shared/ofa from the main checkout, ../../shared/ofa from a worktree under wt/, or NARVL_SHARED_OFA
_CANDIDATES = [Path(__file__).resolve().parents[i] / "shared" / "ofa" for i in (2, 3)]
SHARED_OFA = Path(os.environ.get("NARVL_SHARED_OFA") or next((c for c in _CANDIDATES if c.is_dir()), _CANDIDATES[0]))
PARITY = SHARED_OFA / "parity"
needs_fixture = pytest.mark.skipif(not (PARITY / "ofa_parity_small.json").is_file(),
                                   reason=f"OFA reference data not found at {SHARED_OFA} (set NARVL_SHARED_OFA)")
SIZES = ("tiny", "medium", "base", "large", "huge")
# the fixture README's tolerances for an independent fp32 CPU implementation
LOGITS_ATOL, HIDDEN_ATOL, RESNET_ATOL = 2e-5, 5e-5, 1e-6


def sha256_of(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.contiguous().numpy().astype(t.numpy().dtype.newbyteorder("<")).tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def fixture_json() -> dict:
    return json.loads((PARITY / "ofa_parity_small.json").read_text())


@pytest.fixture(scope="module")
def fixture_tensors() -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(PARITY / "ofa_parity_small.safetensors"))


@pytest.fixture(scope="module")
def ofa_weights(fixture_json) -> dict[str, torch.Tensor]:
    """The fixture's weights under OFA's names, filled by its procedure (torch.rand, seed 1234, sorted keys)."""
    g = torch.Generator().manual_seed(1234)
    weights, drawn = {}, []
    for key, shape, _dtype, rule, _prefix in fixture_json["state_dict_sorted"]:
        if key.endswith("num_batches_tracked"):
            weights[key] = torch.tensor(0)
        if rule in ("keep", "alias"):
            continue
        w = (torch.rand(shape, generator=g, dtype=torch.float32) * 2 - 1) * 0.03125
        weights[key] = {"u": w, "one_plus_u": 1 + w, "one_plus_abs_u": 1 + w.abs()}[rule]
        drawn.append(weights[key])
    assert sha256_of(drawn) == fixture_json["weight_sha256"]
    for alias in ("decoder.embed_tokens.weight", "decoder.output_projection.weight"):
        weights[alias] = weights["encoder.embed_tokens.weight"]
    return weights


@pytest.fixture(scope="module")
def ofa_file(ofa_weights, tmp_path_factory) -> Path:
    """A fairseq-style checkpoint: weights under "model", training args as an argparse.Namespace."""
    path = tmp_path_factory.mktemp("ofa") / "ofa_parity.pt"
    args = argparse.Namespace(arch="ofa_tiny", disable_entangle=True, patch_image_size=480, dropout=0.1)
    torch.save({"args": args, "model": ofa_weights, "extra_state": {"epoch": 1}}, path)
    return path


def run_fixture(model: ARModel, t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    image, src, prev = t["input.patch_images"], t["input.src_tokens"], t["input.prev_output_tokens"]
    with torch.no_grad():
        enc = model.encode(image, src)
        hidden = model.decoder(model.embed_tokens(prev), enc)
        return {"resnet_out": model.encoder.backbone(image), "encoder_out": enc.states,
                "encoder_padding_mask": enc.padding_mask, "encoder_position_embeddings": enc.pos_embed[0],
                "decoder_features": hidden, "logits": model.output_logits(hidden)}


def parity_errors(model: ARModel, t: dict[str, torch.Tensor]) -> dict[str, tuple[float, float]]:
    """name -> (max |ours - OFA's|, tolerance) over the fixture's outputs (decoder: valid positions only)."""
    out, valid = run_fixture(model, t), t["decoder_valid_mask"]
    errors = {name: ((out[name] - t[name]).abs().max().item(), tol) for name, tol in (
        ("resnet_out", RESNET_ATOL), ("encoder_out", HIDDEN_ATOL), ("encoder_position_embeddings", HIDDEN_ATOL))}
    for name, tol in (("decoder_features", HIDDEN_ATOL), ("logits", LOGITS_ATOL)):
        errors[name] = ((out[name] - t[name])[valid].abs().max().item(), tol)
    errors["argmax"] = (float((out["logits"].argmax(-1) != t["logits_argmax"])[valid].sum()), 0.0)
    errors["encoder_padding_mask"] = (float((out["encoder_padding_mask"] != t["encoder_padding_mask"]).sum()), 0.0)
    return errors


def failed_checks(errors: dict[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
    return {name: (err, tol) for name, (err, tol) in errors.items() if err > tol}


# ---- positions --------------------------------------------------------------------------------------------------


@needs_fixture
def test_relative_buckets_equal_ofa_buffers(fixture_json):
    sha = fixture_json["integer_buffers"]["sha256_int64_le"]
    token = ofa_text_rel_index(1024, 1024, 256, 1024)
    assert sha256_of([token]) == sha["encoder.token_rp_bucket"]
    cfg = ModelConfig.from_name("tiny")
    image = torch.empty(1765, 1765, dtype=torch.long)
    image[1:, 1:] = image_rel_index_for(cfg, 42, 42)  # OFA: slot p = h*42 + w + 1; slot 0 is its CLS slot
    image[0, :], image[1:, 0], image[0, 0] = 6889, 6890, 6891
    assert sha256_of([image]) == sha["encoder.image_rp_bucket"]


# ---- forward parity ---------------------------------------------------------------------------------------------


@needs_fixture
def test_forward_parity_with_ofa(ofa_file, fixture_tensors):
    model, cfg = ofa.load_ofa_checkpoint(ofa_file)
    assert (cfg.d_model, cfg.encoder_layers, cfg.heads, cfg.ffn_dim, cfg.vocab_size) == (256, 2, 4, 512, 59457)
    assert count_parameters(model) == 28_617_480  # the fixture's OFA model
    t = fixture_tensors
    errors = parity_errors(model, t)
    assert failed_checks(errors) == {}, errors
    valid = t["decoder_valid_mask"]
    # the model's own teacher-forcing forward and KV-cached decoding give the same logits
    with torch.no_grad():
        full = model(t["input.patch_images"], t["input.src_tokens"], t["input.prev_output_tokens"])
        enc = model.encode(t["input.patch_images"], t["input.src_tokens"])
        state = model.init_state(enc, 9)
        steps = torch.stack([model.decode_step(t["input.prev_output_tokens"][:, i], enc, state)
                             for i in range(3)], 1)
    assert (full - t["logits"])[valid].abs().max() <= LOGITS_ATOL
    assert (steps - t["logits"][:, :3]).abs().max() <= LOGITS_ATOL


@needs_fixture
def test_forward_parity_entangled_decoder(ofa_weights, fixture_tensors):
    """OFA without --disable-entangle adds raw target positions in the decoder: read from the file's args."""
    cfg = ofa.config_from_ofa(ofa_weights, {"disable_entangle": False})
    assert cfg.decoder_entangled and not cfg.entangle_positions
    with pytest.raises(ValueError, match="attn_scale_factor=1"):
        ofa.config_from_ofa(ofa_weights, {"attn_scale_factor": 1})
    model = ARModel(cfg).eval()
    model.load_state_dict(ofa.ofa_to_ours(ofa_weights, cfg, ofa.expected_shapes(cfg)))
    t = fixture_tensors
    logits = run_fixture(model, t)["logits"][..., t["logits_selected_ids"]]
    valid = t["decoder_valid_mask"]
    assert (logits - t["variant_entangle.logits_selected"])[valid].abs().max() <= LOGITS_ATOL


@needs_fixture
@pytest.mark.parametrize("a, b", [
    ("encoder.patch_layernorm_embedding.weight", "encoder.layernorm_embedding.weight"),  # image LN <-> text LN
    ("encoder.layers.0.attn_ln.bias", "encoder.layers.0.self_attn_layer_norm.bias"),
    ("decoder.layers.1.final_layer_norm.bias", "decoder.layers.1.encoder_attn_layer_norm.bias"),
])
def test_parity_fails_when_one_key_is_mapped_wrongly(a, b, ofa_weights, fixture_tensors, monkeypatch):
    cfg = ofa.config_from_ofa(ofa_weights)
    # a mapping that sends OFA's `a` to our place of `b` and back: every key is still placed, shapes agree
    wrong = [(rf"^{re.escape(a)}$", ofa.ofa_key_to_ours(b)), (rf"^{re.escape(b)}$", ofa.ofa_key_to_ours(a))]
    monkeypatch.setattr(ofa, "_RENAMES", wrong + ofa._RENAMES)
    model = ARModel(cfg).eval()
    model.load_state_dict(ofa.ofa_to_ours(ofa_weights, cfg, ofa.expected_shapes(cfg)))  # every key still placed
    failed = failed_checks(parity_errors(model, fixture_tensors))
    assert failed["logits"][0] > 100 * LOGITS_ATOL  # measured: 7e-3 .. 2e-2


@needs_fixture
def test_init_model_from_ofa_adds_the_blank_row(ofa_file, fixture_tensors):
    _, ofa_cfg = ofa.load_ofa_checkpoint(ofa_file)
    cfg = ofa_cfg.model_copy(update=dict(vocab_size=OFA_VOCAB_SIZE + 1, blank_id=OFA_VOCAB_SIZE))
    torch.manual_seed(0)
    model = ofa.init_model_from_ofa(cfg, ofa_file).eval()
    assert model.embed_tokens.weight.shape == (OFA_VOCAB_SIZE + 1, 256)
    assert model.embed_tokens.weight[-1].abs().sum() > 0  # the CTC blank keeps its fresh initialisation
    logits = run_fixture(model, fixture_tensors)["logits"][..., :OFA_VOCAB_SIZE]
    valid = fixture_tensors["decoder_valid_mask"]
    assert (logits - fixture_tensors["logits"])[valid].abs().max() <= LOGITS_ATOL
    nar = NARVLModel.from_ar(model, num_queries=8)  # the student starts from the teacher, as in the paper
    with torch.no_grad():
        assert nar.eval()(fixture_tensors["input.patch_images"], fixture_tensors["input.src_tokens"]).shape == \
            (2, 8, OFA_VOCAB_SIZE + 1)
    with pytest.raises(ValueError, match="heads: config 8 vs checkpoint 4"):
        ofa.init_model_from_ofa(cfg.model_copy(update=dict(heads=8)), ofa_file)
    with pytest.raises(ValueError, match="vocab_size: config 100"):
        ofa.init_model_from_ofa(cfg.model_copy(update=dict(vocab_size=100, blank_id=99)), ofa_file)


@needs_fixture
def test_bucket_buffers_are_checked_when_present(ofa_weights, fixture_json):
    cfg = ofa.config_from_ofa(ofa_weights)
    shapes = ofa.expected_shapes(cfg)
    token = ofa_text_rel_index(1024, 1024, 256, 1024)
    ofa.ofa_to_ours({**ofa_weights, "decoder.token_rp_bucket": token, "encoder.version": torch.tensor([3.0])},
                    cfg, shapes)
    with pytest.raises(ValueError, match="decoder.token_rp_bucket"):
        ofa.ofa_to_ours({**ofa_weights, "decoder.token_rp_bucket": token.T.contiguous()}, cfg, shapes)


# ---- every OFA size ---------------------------------------------------------------------------------------------


@needs_fixture
@pytest.mark.parametrize("size", SIZES)
def test_real_ofa_key_lists_load_exactly_into_presets(size):
    spec = json.loads((SHARED_OFA / f"ofa_{size}.json").read_text())
    cfg = ModelConfig.from_name(size, vocab_size=OFA_VOCAB_SIZE)
    with torch.device("meta"):
        model = ARModel(cfg)
    assert count_parameters(model) == spec["num_parameters"]
    state = {k: torch.empty(shape, device="meta") for k, shape in spec["state_dict"].items()}
    mapped = ofa.ofa_to_ours(state, cfg, {k: v.shape for k, v in model.state_dict().items()})
    assert set(mapped) == set(model.state_dict())
    assert ofa.config_from_ofa(state) == cfg.model_copy(update=dict(
        scale_attn=True, scale_fc=True, scale_heads=True, entangle_decoder_positions=False))


@needs_fixture
def test_mapping_errors_name_the_keys():
    spec = json.loads((SHARED_OFA / "ofa_tiny.json").read_text())
    cfg = ModelConfig.from_name("tiny", vocab_size=OFA_VOCAB_SIZE)
    shapes = ofa.expected_shapes(cfg)
    state = {k: torch.empty(shape, device="meta") for k, shape in spec["state_dict"].items()}
    with pytest.raises(ValueError, match=r"no place in our model: \['encoder.extra.weight'\]"):
        ofa.ofa_to_ours({**state, "encoder.extra.weight": torch.empty(3, device="meta")}, cfg, shapes)
    with pytest.raises(ValueError, match=r"encoder.layers.0.attn_ln.bias \[7\]"):
        ofa.ofa_to_ours({**state, "encoder.layers.0.attn_ln.bias": torch.empty(7, device="meta")}, cfg, shapes)
    del state["decoder.layers.3.ffn_layernorm.weight"]
    with pytest.raises(ValueError, match=r"does not fill: \['decoder.layers.3.ffn_layernorm.weight'\]"):
        ofa.ofa_to_ours(state, cfg, shapes)


def test_cpu_presets_keep_their_layout():
    cfg = ModelConfig.from_name("cpu-tiny", vocab_size=50)
    assert cfg.position_scheme == "narvl" and not (cfg.image_pos_ln or cfg.code_embeddings or cfg.zero_pad_embeddings)
    keys = set(ARModel(cfg).state_dict())
    assert not any("image_pos_ln" in k or "code_layernorm" in k for k in keys)


# ---- safe loading -----------------------------------------------------------------------------------------------


class NotAllowed:
    pass


def test_checkpoint_with_other_pickled_objects_is_refused(tmp_path):
    path = tmp_path / "bad.pt"
    torch.save({"model": {"w": torch.zeros(1)}, "extra_state": NotAllowed()}, path)
    with pytest.raises(ValueError, match=r"refusing to unpickle \['[\w.]*NotAllowed'\]"):
        ofa.read_ofa_file(path)
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        ofa.read_ofa_file(tmp_path / "nowhere.pt")


def test_fairseq_meters_with_numpy_values_are_allowed(tmp_path):
    import numpy as np

    path = tmp_path / "meters.pt"
    torch.save({"args": argparse.Namespace(dropout=0.2), "model": {"w": torch.ones(2)},
                "extra_state": {"best": np.float64(0.5), "n": np.int64(3), "hist": np.zeros(2, np.float32)}}, path)
    state, args = ofa.read_ofa_file(path)
    assert torch.equal(state["w"], torch.ones(2)) and args == {"dropout": 0.2}


def test_plain_state_dict_and_namespace_args_are_read(tmp_path):
    state = {"encoder.version": torch.tensor([3.0])}
    torch.save(state, tmp_path / "plain.pt")
    read, args = ofa.read_ofa_file(tmp_path / "plain.pt")
    assert list(read) == ["encoder.version"] and torch.equal(read["encoder.version"], state["encoder.version"])
    assert args == {}
    torch.save({"args": argparse.Namespace(disable_entangle=False), "model": state}, tmp_path / "fairseq.pt")
    read, args = ofa.read_ofa_file(tmp_path / "fairseq.pt")
    assert list(read) == ["encoder.version"] and args == {"disable_entangle": False}
