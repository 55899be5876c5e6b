"""Model configuration and named presets.

The OFA sizes follow the OFA paper / public configs (see shared IMPLEMENTATION-NOTES): layers, d_model, heads,
FFN width and the ResNet depth of stages 1-3. The `cpu-*` presets are small models for tests and the CPU
profiles (a small conv backbone for 32-128 px images).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

OFA_VOCAB_SIZE = 59457  # GPT-2 BPE 50,257 + 4 specials + <mask> + 8,192 image codes + 1,000 bins - 1 (OFA's dict)


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
    init_std: float | None = Field(None, gt=0, description="std of the Linear weights at init; None = fan_in**-0.5. "
                                   "OFA's 0.02 suits d_model >= 256: on narrow models it starves attention learning")
    # image backbone: 'resnet' is OFA's (stem + stages 1-3, bottleneck blocks, stride 16);
    # 'small' is a 4-conv stride-16 net for 32-128 px images.
    backbone: Literal["resnet", "small"] = "small"
    resnet_layers: tuple[int, int, int] = (3, 4, 6)
    backbone_width: int = Field(32, gt=0, description="channels of the first stage (ResNet: 64)")
    image_size: int = Field(64, ge=32, le=1024)
    # positions
    max_source_positions: int = Field(64, gt=0, description="max encoder text tokens")
    max_target_positions: int = Field(64, gt=0, description="max AR target tokens")
    max_queries: int = Field(1024, gt=0, description="size of the query-position table")
    rel_pos_buckets: int = Field(32, gt=0)
    entangle_positions: bool = Field(False, description="also add the position embeddings to the token vectors "
                                     "(OFA's entangle_position_embedding); off in OFA, where positions are biases only")
    image_rel_pos_max: int = Field(16, gt=0, description="max |dx|,|dy| of the 2-D relative image bias table")
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
        if self.num_queries > self.max_queries:
            raise ValueError(f"num_queries={self.num_queries} exceeds max_queries={self.max_queries}")
        if self.vocab_size is not None and self.blank_id is not None and not 0 <= self.blank_id < self.vocab_size:
            raise ValueError(f"blank_id={self.blank_id} outside the vocabulary of size {self.vocab_size}")
        return self

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
