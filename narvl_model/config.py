"""Model configuration and named presets.

The OFA sizes follow the OFA paper / public configs (see shared IMPLEMENTATION-NOTES): layers, d_model, heads,
FFN width and the ResNet depth of stages 1-3, with OFA's layer options, so that they are OFA's models key for key
(narvl_model.ofa loads OFA's checkpoints into them; tests/test_ofa.py checks names, shapes, counts and logits).
The `cpu-*` presets are small models for tests and the CPU profiles (a small conv backbone for 32-128 px images).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

OFA_VOCAB_SIZE = 59457  # OFA's embedding rows: 4 specials + 50,260 dict.txt lines + <mask> + 8,192 codes + 1,000 bins


class ModelConfig(BaseModel):
    """Architecture of the encoder-decoder. Token ids are filled from the tokenizer before building a model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # sizes
    d_model: int = Field(64, gt=0)
    encoder_layers: int = Field(2, ge=1)
    decoder_layers: int = Field(2, ge=1)
    heads: int = Field(4, ge=1)
    ffn_dim: int = Field(256, gt=0)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    attention_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    drop_path: float = Field(0.0, ge=0.0, lt=1.0, description="max stochastic depth, rising linearly over layers")
    normformer: bool = True
    # NormFormer parts one by one (None: follow `normformer`): LayerNorm on each attention output (OFA's
    # --scale-attn: attn_ln / self_attn_ln / cross_attn_ln), LayerNorm on the FFN hidden (--scale-fc:
    # ffn_layernorm), per-head output scales (--scale-heads: c_attn).
    scale_attn: bool | None = None
    scale_fc: bool | None = None
    scale_heads: bool | None = None
    init_std: float | None = Field(None, gt=0, description="std of the Linear weights at init; None = fan_in**-0.5. "
                                   "OFA's 0.02 suits d_model >= 256: on narrow models it starves attention learning")
    # image backbone: 'resnet' is OFA's (stem + stages 1-3, bottleneck blocks, stride 16);
    # 'small' is a 4-conv stride-16 net for 32-128 px images.
    backbone: Literal["resnet", "small"] = "small"
    resnet_layers: tuple[int, int, int] = (3, 4, 6)
    backbone_width: int = Field(32, gt=0, description="channels of the first stage (ResNet: 64)")
    image_stride: Literal[8, 16] = Field(16, description="'small' backbone: pixels per image token (16 as OFA's "
                                         "ResNet; 8 gives 4x the image tokens); 'resnet' is always 16")
    image_size: int = Field(64, ge=32, le=1024)
    fusion: Literal["joint", "cross"] = Field(
        "joint", description="how the encoder mixes image and text: 'joint' (OFA) is one self-attention over image + "
                             "text tokens; 'cross' keeps a self-attention per modality and adds to every layer a "
                             "cross-attention of each token to the image tokens (a dedicated path from a word to "
                             "the image regions it names; docs/REPRODUCTION.md, 'Learning')")
    # positions
    max_source_positions: int = Field(64, gt=0, description="max encoder text tokens")
    max_target_positions: int = Field(64, gt=0, description="max AR target tokens")
    max_queries: int = Field(1024, gt=0, description="size of the query-position table")
    rel_pos_buckets: int = Field(32, gt=0)
    entangle_positions: bool = Field(False, description="also add the position embeddings to the token vectors "
                                     "(OFA's entangle_position_embedding); off in OFA, where positions are biases only")
    image_rel_pos_max: int = Field(16, gt=0, description="max |dx|,|dy| of the 2-D relative image bias table")
    entangle_decoder_positions: bool | None = Field(
        None, description="decoder only (None: follow entangle_positions); OFA without --disable-entangle adds the "
                          "raw target position embeddings in the decoder but not in the encoder")
    # OFA's exact position layout ("ofa"): text relative buckets sign(i-j) * (|i-j| if <= buckets/2, else log-spaced
    # up to max positions) in a (2*rel_pos_buckets - 1)-row table; image offsets (query - key) in a
    # (2*image_rel_pos_max - 1)**2 + 3 table; image position ids h*image_rel_pos_max + w + 1 in a
    # image_rel_pos_max**2 + 1 table; text position tables with 2 spare rows (fairseq's max_positions + 2).
    # "narvl": this repo's own layout (T5-style buckets over rel_pos_buckets rows; smaller tables).
    position_scheme: Literal["narvl", "ofa"] = "narvl"
    image_pos_ln: bool = Field(False, description="a LayerNorm of its own for the image position embeddings "
                               "(OFA's image_pos_ln); off: the text position LayerNorm serves both")
    zero_pad_embeddings: bool = Field(False, description="zero the encoder input at text padding positions after "
                                      "the embedding LayerNorm (OFA does)")
    code_embeddings: bool = Field(False, description="hold OFA's decoder image-code parameters (code LayerNorm, "
                                  "image position table and LayerNorm, image relative tables) so OFA checkpoints "
                                  "load exactly; unused by the forward pass (no image generation here), frozen")
    # NARVL
    num_queries: int = Field(20, ge=1, description="learnable query tokens (LQT)")
    decoder_input: Literal["queries", "encoder"] = "queries"
    nar_loss: Literal["qctc", "ce"] = Field("qctc", description="NARVL: the loss it is trained with, which decides "
                                            "its decoding (qctc: CTC collapse; ce: position-wise up to EOS)")
    # vocabulary (from the tokenizer)
    vocab_size: int | None = Field(None, gt=0, description="including location bins and the CTC blank")
    pad_id: int = 1
    bos_id: int = 0
    eos_id: int = 2
    blank_id: int | None = None

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if self.d_model % self.heads:
            raise ValueError(f"d_model={self.d_model} must be divisible by heads={self.heads}")
        if self.fusion == "cross" and self.position_scheme == "ofa":
            raise ValueError("fusion='cross' is this repo's encoder variant; OFA's layout (position_scheme='ofa') is "
                             "a joint encoder")
        if self.backbone == "resnet" and self.image_stride != 16:
            raise ValueError("image_stride applies to the 'small' backbone; OFA's ResNet has stride 16")
        if self.num_queries > self.max_queries:
            raise ValueError(f"num_queries={self.num_queries} exceeds max_queries={self.max_queries}")
        if self.vocab_size is not None and self.blank_id is not None and not 0 <= self.blank_id < self.vocab_size:
            raise ValueError(f"blank_id={self.blank_id} outside the vocabulary of size {self.vocab_size}")
        return self

    @property
    def scale_parts(self) -> tuple[bool, bool, bool]:
        """(scale_attn, scale_fc, scale_heads) with the unset ones taken from `normformer`."""
        nf = self.normformer
        return tuple(nf if v is None else v for v in (self.scale_attn, self.scale_fc, self.scale_heads))

    @property
    def decoder_entangled(self) -> bool:
        """Whether the decoder adds its position embeddings to its input vectors."""
        return self.entangle_positions if self.entangle_decoder_positions is None else self.entangle_decoder_positions

    @classmethod
    def from_name(cls, name: str, **overrides) -> ModelConfig:
        """A named preset (see PRESETS), with field overrides."""
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


def _ofa(layers: tuple[int, int], d: int, heads: int, resnet: tuple[int, int, int], size: int = 480) -> dict:
    return dict(
        encoder_layers=layers[0], decoder_layers=layers[1], d_model=d, heads=heads, ffn_dim=4 * d,
        backbone="resnet", resnet_layers=resnet, backbone_width=64, image_size=size, dropout=0.1,
        max_source_positions=1024, max_target_positions=1024, rel_pos_buckets=256, image_rel_pos_max=42,
        drop_path=0.1, init_std=0.02,
        # OFA's exact layer structure (its caption / pretraining flags: --scale-attn --scale-fc --scale-heads
        # --patch-layernorm-embedding --code-layernorm-embedding --add-type-embedding --share-all-embeddings
        # --disable-entangle), so OFA checkpoints load key for key (narvl_model.ofa)
        normformer=True, position_scheme="ofa", image_pos_ln=True, zero_pad_embeddings=True, code_embeddings=True,
        entangle_positions=False,
    )


PRESETS: dict[str, dict] = {
    # CPU presets (tests, smoke and default profiles). entangle_positions: trained from scratch on a 4x4 image grid,
    # a model with positions as attention biases only cannot tell where an object is (grounding, "left of").
    "cpu-nano": dict(d_model=32, encoder_layers=1, decoder_layers=1, heads=2, ffn_dim=64, backbone_width=8,
                     image_size=32, dropout=0.0, max_queries=64, entangle_positions=True),
    "cpu-tiny": dict(d_model=64, encoder_layers=2, decoder_layers=2, heads=4, ffn_dim=256, backbone_width=16,
                     image_size=64, entangle_positions=True),
    "cpu-small": dict(d_model=128, encoder_layers=3, decoder_layers=3, heads=4, ffn_dim=512, backbone_width=32,
                      image_size=64, entangle_positions=True),
    # OFA sizes (resnet50 = (3,4,6), resnet101 = (3,4,23), resnet152 = (3,8,36))
    "tiny": _ofa((4, 4), 256, 4, (3, 4, 6)),
    "medium": _ofa((4, 4), 512, 8, (3, 4, 23)),
    "base": _ofa((6, 6), 768, 12, (3, 4, 23)),
    "large": _ofa((12, 12), 1024, 16, (3, 8, 36)),
    "huge": _ofa((24, 12), 1280, 16, (3, 8, 36)),
}
