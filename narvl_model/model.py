"""OFA-style encoder-decoder with an autoregressive (AR) and a non-autoregressive (NARVL) decoder.

Paper: Shi et al., "Non-autoregressive Sequence-to-Sequence Vision-Language Models", CVPR 2024.
Section 3 (figure 2): the encoder is OFA's (ResNet features + BPE text, positions as attention biases);
section 3.1 / figure 3(c): the NARVL decoder replaces the shifted target tokens by learnable query tokens (LQT)
and decodes all outputs in one pass without a causal mask; figure 3(b) / tables 6-7: the ablation that feeds the
encoder output to the decoder instead. The AR decoder (figure 3(a)) is the teacher and the speed baseline.

Notation: B batch, N queries, T target tokens, S source text tokens, I image tokens, L = I + S encoder tokens,
D d_model, H heads, V vocab (incl. location bins and the CTC blank).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from narvl_model.config import ModelConfig

NEG_INF = float("-inf")


# ----------------------------------------------------------------------------------------------------------------
# Image backbones


class BatchNorm2d(nn.BatchNorm2d):
    """nn.BatchNorm2d that normalises in float32 when its statistics are float32 and the rest is not.

    Mixed-precision training (DeepSpeed bf16/fp16) casts the parameters and leaves the buffers in float32; CUDA's
    batch-norm backward refuses that mix, and running statistics are best kept in float32 anyway. With one dtype
    throughout (fp32 training, a model cast whole for inference) this is plain nn.BatchNorm2d.
    """

    def forward(self, x: Tensor) -> Tensor:
        if self.running_mean is None or self.running_mean.dtype == x.dtype == self.weight.dtype:
            return super().forward(x)
        if self.training:
            self.num_batches_tracked.add_(1)
        return F.batch_norm(x.float(), self.running_mean, self.running_var, self.weight.float(), self.bias.float(),
                            self.training, self.momentum, self.eps).to(x.dtype)


class Bottleneck(nn.Module):
    """ResNet bottleneck block (1x1 -> 3x3 (stride) -> 1x1, expansion 4)."""

    expansion = 4

    def __init__(self, in_ch: int, width: int, stride: int):
        super().__init__()
        out_ch = width * self.expansion
        self.conv1 = nn.Conv2d(in_ch, width, 1, bias=False)
        self.bn1 = BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_ch, 1, bias=False)
        self.bn3 = BatchNorm2d(out_ch)
        self.downsample = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False),
                                            BatchNorm2d(out_ch))

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + identity)


class ResNetBackbone(nn.Module):
    """OFA's image backbone: stem (conv7x7/2, BN, maxpool) + ResNet stages 1-3; 16*width channels at stride 16."""

    def __init__(self, layers: tuple[int, int, int], width: int = 64):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = BatchNorm2d(width)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        stages, in_ch = [], width
        for i, (n_blocks, stride) in enumerate(zip(layers, (1, 2, 2), strict=True)):
            w = width * 2**i
            blocks = [Bottleneck(in_ch, w, stride)] + [Bottleneck(w * 4, w, 1) for _ in range(n_blocks - 1)]
            stages.append(nn.Sequential(*blocks))
            in_ch = w * 4
        self.layer1, self.layer2, self.layer3 = stages
        self.out_channels = in_ch

    def forward(self, image: Tensor) -> Tensor:
        x = self.maxpool(F.relu(self.bn1(self.conv1(image))))
        return self.layer3(self.layer2(self.layer1(x)))  # (B, 16*width, H/16, W/16)


class SmallBackbone(nn.Module):
    """Four 3x3 convs for 32-128 px images in tests and CPU profiles: stride 16 overall (four strided), or 8 (the
    last one unstrided), which gives an 8x8 grid of image tokens on 64 px images instead of 4x4."""

    def __init__(self, width: int, stride: int = 16):
        super().__init__()
        if stride not in (8, 16):
            raise ValueError(f"SmallBackbone stride must be 8 or 16, got {stride}")
        chans = [3, width, 2 * width, 4 * width, 8 * width]
        strides = (2, 2, 2, 2 if stride == 16 else 1)
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 3, stride=st, padding=1, bias=False)
                                   for a, b, st in zip(chans[:-1], chans[1:], strides, strict=True))
        self.norms = nn.ModuleList(BatchNorm2d(c) for c in chans[1:])
        self.out_channels = chans[-1]

    def forward(self, image: Tensor) -> Tensor:
        x = image
        for conv, norm in zip(self.convs, self.norms, strict=True):
            x = F.gelu(norm(conv(x)))
        return x  # (B, 8*width, H/stride, W/stride)


def build_backbone(cfg: ModelConfig) -> ResNetBackbone | SmallBackbone:
    """The image backbone the config asks for (the encoder's, and what stages/pretrain.py trains)."""
    if cfg.backbone == "resnet":
        return ResNetBackbone(cfg.resnet_layers, cfg.backbone_width)
    return SmallBackbone(cfg.backbone_width, cfg.image_stride)


# ----------------------------------------------------------------------------------------------------------------
# Positions as attention biases


def text_rel_buckets(q_len: int, k_len: int, num_buckets: int, device=None, max_distance: int = 128) -> Tensor:
    """Bucket index (q_len, k_len) of the signed distance key - query: exact near 0, log-spaced further away."""
    rel = torch.arange(k_len, device=device)[None, :] - torch.arange(q_len, device=device)[:, None]
    half = num_buckets // 2
    exact = max(half // 2, 1)
    n = rel.abs()
    log_part = exact + (torch.log(n.float().clamp(min=1) / exact) / math.log(max_distance / exact)
                        * (half - exact)).long()
    bucket = torch.where(n < exact, n, log_part.clamp(max=half - 1))
    return bucket + (rel > 0).long() * half  # (q_len, k_len) in [0, num_buckets)


def image_grid_index(h: int, w: int, size: int, device=None) -> Tensor:
    """Index (h*w,) of each image token in a size x size absolute-position table (row-major)."""
    if h > size or w > size:
        raise ValueError(f"image grid {h}x{w} exceeds image_rel_pos_max={size}; raise it in the model config")
    rows = torch.arange(h, device=device)[:, None]
    cols = torch.arange(w, device=device)[None, :]
    return (rows * size + cols).reshape(-1)


def image_rel_index(h: int, w: int, size: int, device=None) -> Tensor:
    """Index (h*w, h*w) of the 2-D offset (dy, dx) between image tokens in a (2*size-1)^2 table."""
    rows = torch.arange(h, device=device).repeat_interleave(w)
    cols = torch.arange(w, device=device).repeat(h)
    dy = rows[None, :] - rows[:, None] + size - 1
    dx = cols[None, :] - cols[:, None] + size - 1
    return dy * (2 * size - 1) + dx


def ofa_text_rel_index(q_len: int, k_len: int, num_buckets: int, max_position: int, device=None) -> Tensor:
    """OFA's text relative-position index (q_len, k_len) into a (2*num_buckets - 1)-row table.

    rel = query - key; |rel| <= num_buckets/2 keeps its value, further ones are log-spaced up to max_position
    (computed in float32 as OFA does); index = bucket + num_buckets - 1.
    """
    mid = num_buckets // 2
    rel = torch.arange(q_len, device=device)[:, None] - torch.arange(k_len, device=device)[None, :]
    n = rel.abs()
    far = torch.ceil(torch.log(n.float() / mid) / math.log((max_position - 1) / mid) * (mid - 1)) + mid
    bucket = torch.where(n <= mid, rel, (far * rel.sign()).long())
    return bucket + num_buckets - 1


def text_rel_index(cfg: ModelConfig, q_len: int, k_len: int, max_position: int, device=None) -> Tensor:
    """Index (q_len, k_len) into the text relative table of cfg.position_scheme (see text_rel_table_size)."""
    if cfg.position_scheme == "ofa":
        return ofa_text_rel_index(q_len, k_len, cfg.rel_pos_buckets, max_position, device)
    return text_rel_buckets(q_len, k_len, cfg.rel_pos_buckets, device)


def text_rel_table_size(cfg: ModelConfig) -> int:
    return 2 * cfg.rel_pos_buckets - 1 if cfg.position_scheme == "ofa" else cfg.rel_pos_buckets


def image_rel_table_size(cfg: ModelConfig) -> int:
    """(2*size - 1)**2 offsets; OFA adds 3 rows for its CLS slot (unused here: no CLS token)."""
    return (2 * cfg.image_rel_pos_max - 1) ** 2 + (3 if cfg.position_scheme == "ofa" else 0)


def image_pos_ids(cfg: ModelConfig, h: int, w: int, device=None) -> Tensor:
    """Rows of the image position table for an h x w grid (OFA: h*size + w + 1; row 0 is its CLS slot)."""
    idx = image_grid_index(h, w, cfg.image_rel_pos_max, device)
    return idx + 1 if cfg.position_scheme == "ofa" else idx


def image_rel_index_for(cfg: ModelConfig, h: int, w: int, device=None) -> Tensor:
    """Image relative index (h*w, h*w): key - query in this repo's layout, query - key in OFA's."""
    idx = image_rel_index(h, w, cfg.image_rel_pos_max, device)
    return idx.T if cfg.position_scheme == "ofa" else idx


def position_table_rows(cfg: ModelConfig, n: int) -> int:
    """Rows of a text/target position table for n positions (OFA: fairseq's n + 2; positions still start at 0)."""
    return n + 2 if cfg.position_scheme == "ofa" else n


def absolute_bias(pos_q: nn.Linear, pos_k: nn.Linear, q_pos: Tensor, k_pos: Tensor, heads: int) -> Tensor:
    """Content-free position bias (1, H, Tq, Tk): scaled q-projection of query positions . k-projection of keys."""
    tq, tk, d = q_pos.shape[0], k_pos.shape[0], q_pos.shape[1]
    hd = d // heads
    q = pos_q(q_pos).view(tq, heads, hd).transpose(0, 1) * (hd * 2) ** -0.5  # (H, Tq, hd)
    k = pos_k(k_pos).view(tk, heads, hd).transpose(0, 1)  # (H, Tk, hd)
    return (q @ k.transpose(1, 2)).unsqueeze(0)  # (1, H, Tq, Tk)


def padding_bias(padding_mask: Tensor, dtype: torch.dtype) -> Tensor:
    """(B, L) bool (True = pad) -> additive key mask (B, 1, 1, L)."""
    bias = torch.zeros(padding_mask.shape, dtype=dtype, device=padding_mask.device)
    return bias.masked_fill(padding_mask, NEG_INF)[:, None, None, :]


# ----------------------------------------------------------------------------------------------------------------
# Transformer layers


def drop_path(x: Tensor, p: float, training: bool) -> Tensor:
    """Stochastic depth: drop the whole residual branch per sample with probability p."""
    if p == 0.0 or not training:
        return x
    keep = torch.empty(x.shape[0], *([1] * (x.dim() - 1)), device=x.device, dtype=x.dtype).bernoulli_(1 - p)
    return x * keep / (1 - p)


class Attention(nn.Module):
    """Multi-head attention with an additive float bias, scale (head_dim*2)**-0.5 and NormFormer head scales."""

    def __init__(self, d: int, heads: int, dropout: float, head_scale: bool):
        super().__init__()
        self.heads, self.head_dim, self.dropout = heads, d // heads, dropout
        self.scale = (self.head_dim * 2) ** -0.5
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))
        self.c_attn = nn.Parameter(torch.ones(heads)) if head_scale else None

    def split(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.heads, self.head_dim).transpose(1, 2)  # (B, H, t, hd)

    def project_kv(self, src: Tensor) -> tuple[Tensor, Tensor]:
        return self.split(self.k_proj(src)), self.split(self.v_proj(src))

    def attend(self, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None) -> Tensor:
        """q (B, H, Tq, hd), k/v (B, H, Tk, hd), bias broadcastable to (B, H, Tq, Tk) -> (B, Tq, D)."""
        p = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=p, scale=self.scale)
        if self.c_attn is not None:
            out = out * self.c_attn[None, :, None, None]
        b, _, t, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, t, -1))


@dataclass
class LayerCache:
    """One decoder layer's KV cache: self-attention buffers (B, H, T_max, hd), cross K/V (B, H, L, hd)."""

    k: Tensor
    v: Tensor
    cross_k: Tensor | None = None
    cross_v: Tensor | None = None


class TransformerLayer(nn.Module):
    """Pre-LN layer: self-attention [+ cross-attention] + GELU FFN; NormFormer LNs after attention, FFN hidden."""

    def __init__(self, cfg: ModelConfig, cross: bool, drop_path_rate: float):
        super().__init__()
        d, (scale_attn, scale_fc, scale_heads) = cfg.d_model, cfg.scale_parts
        self.dropout, self.drop_path = cfg.dropout, drop_path_rate
        self.self_attn_layer_norm = nn.LayerNorm(d)
        self.self_attn = Attention(d, cfg.heads, cfg.attention_dropout, scale_heads)
        self.self_attn_ln = nn.LayerNorm(d) if scale_attn else nn.Identity()
        self.cross = cross
        if cross:
            self.encoder_attn_layer_norm = nn.LayerNorm(d)
            self.encoder_attn = Attention(d, cfg.heads, cfg.attention_dropout, scale_heads)
            self.cross_attn_ln = nn.LayerNorm(d) if scale_attn else nn.Identity()
        self.final_layer_norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, cfg.ffn_dim)
        self.ffn_layernorm = nn.LayerNorm(cfg.ffn_dim) if scale_fc else nn.Identity()
        self.fc2 = nn.Linear(cfg.ffn_dim, d)

    def _residual(self, x: Tensor, branch: Tensor) -> Tensor:
        branch = F.dropout(branch, self.dropout, self.training)
        return x + drop_path(branch, self.drop_path, self.training)

    def forward(self, x: Tensor, self_bias: Tensor | None, memory: Tensor | None = None,
                cross_bias: Tensor | None = None, cache: LayerCache | None = None, step: int | Tensor = 0) -> Tensor:
        """x (B, T, D); memory (B, L, D) encoder states; with a cache, x holds positions step..step+T-1."""
        h = self.self_attn_layer_norm(x)
        attn = self.self_attn
        q, k, v = attn.split(attn.q_proj(h)), *attn.project_kv(h)
        if isinstance(step, Tensor):  # static shapes (narvl_model/inference.py): step is a (1,) position tensor
            # x holds one position; the bias masks the unwritten tail (-inf). A select, not index_copy_: inductor
            # (torch 2.13) miscompiles index_copy_ followed by the in-place beam reorder of the same buffer.
            at = torch.arange(cache.k.shape[2], device=step.device).eq(step)[:, None]  # (T_max, 1)
            cache.k.copy_(torch.where(at, k, cache.k))
            cache.v.copy_(torch.where(at, v, cache.v))
            k, v = cache.k, cache.v
        elif cache is not None:
            t = x.shape[1]
            cache.k[:, :, step:step + t] = k
            cache.v[:, :, step:step + t] = v
            k, v = cache.k[:, :, :step + t], cache.v[:, :, :step + t]
        x = self._residual(x, self.self_attn_ln(attn.attend(q, k, v, self_bias)))
        if self.cross:
            h = self.encoder_attn_layer_norm(x)
            attn = self.encoder_attn
            if cache is not None and cache.cross_k is not None:
                k, v = cache.cross_k, cache.cross_v
            else:
                k, v = attn.project_kv(memory)
                if cache is not None:
                    cache.cross_k, cache.cross_v = k, v
            x = self._residual(x, self.cross_attn_ln(attn.attend(attn.split(attn.q_proj(h)), k, v, cross_bias)))
        h = self.fc2(F.dropout(self.ffn_layernorm(F.gelu(self.fc1(self.final_layer_norm(x)))),
                               self.dropout, self.training))
        return self._residual(x, h)


def _drop_path_rates(n: int, p: float) -> list[float]:
    return [p * i / max(n - 1, 1) for i in range(n)]


# ----------------------------------------------------------------------------------------------------------------
# Encoder


@dataclass
class EncoderOut:
    """Encoder states (B, L, D) = [image ; text], key padding mask (B, L) (True = pad), positions (1, L, D)."""

    states: Tensor
    padding_mask: Tensor
    pos_embed: Tensor


class Encoder(nn.Module):
    """Image backbone + text embeddings -> pre-LN transformer with absolute + relative position biases."""

    def __init__(self, cfg: ModelConfig, embed_tokens: nn.Embedding):
        super().__init__()
        d, self.cfg = cfg.d_model, cfg
        self.backbone = build_backbone(cfg)
        self.image_proj = nn.Linear(self.backbone.out_channels, d)
        self.embed_tokens = embed_tokens
        self.type_embedding = nn.Embedding(2, d)  # 0 text, 1 image
        self.layernorm_embedding = nn.LayerNorm(d)  # text part
        self.image_layernorm_embedding = nn.LayerNorm(d)
        self.embed_positions = nn.Embedding(position_table_rows(cfg, cfg.max_source_positions), d)
        self.embed_image_positions = nn.Embedding(cfg.image_rel_pos_max ** 2 + (cfg.position_scheme == "ofa"), d)
        self.pos_ln = nn.LayerNorm(d)
        self.image_pos_ln = nn.LayerNorm(d) if cfg.image_pos_ln else None  # None: pos_ln serves both
        self.pos_q_linear, self.pos_k_linear = nn.Linear(d, d), nn.Linear(d, d)
        n = cfg.encoder_layers
        self.rel_pos_tables = nn.ModuleList(nn.Embedding(text_rel_table_size(cfg), cfg.heads) for _ in range(n))
        self.image_rel_pos_tables = nn.ModuleList(
            nn.Embedding(image_rel_table_size(cfg), cfg.heads) for _ in range(n))
        self.layers = nn.ModuleList(TransformerLayer(cfg, cross=cfg.fusion == "cross", drop_path_rate=r)
                                    for r in _drop_path_rates(n, cfg.drop_path))
        self.layer_norm = nn.LayerNorm(d)

    def _rel_index(self, gh: int, gw: int, s: int, device) -> Tensor:
        """Index (L, L) into cat(text table, image table, zero row): text-text, image-image, else zero."""
        cfg, i = self.cfg, gh * gw
        nb, ni = text_rel_table_size(cfg), image_rel_table_size(cfg)
        idx = torch.full((i + s, i + s), nb + ni, dtype=torch.long, device=device)
        idx[:i, :i] = nb + image_rel_index_for(cfg, gh, gw, device)
        idx[i:, i:] = text_rel_index(cfg, s, s, cfg.max_source_positions, device)
        return idx

    def forward(self, image: Tensor, src_tokens: Tensor) -> EncoderOut:
        cfg, dev = self.cfg, src_tokens.device
        feats = self.backbone(image)  # (B, C, h, w)
        gh, gw = feats.shape[-2:]
        b, s = src_tokens.shape
        if s > cfg.max_source_positions:
            raise ValueError(f"{s} source tokens exceed max_source_positions={cfg.max_source_positions}")
        img_pos = self.embed_image_positions(image_pos_ids(cfg, gh, gw, dev))  # (I, D)
        txt_pos = self.embed_positions.weight[:s]  # (S, D)
        img = self.image_proj(feats.flatten(2).transpose(1, 2)) + self.type_embedding.weight[1]  # (B, I, D)
        txt = self.embed_tokens(src_tokens) + self.type_embedding.weight[0]  # (B, S, D)
        if cfg.entangle_positions:
            img, txt = img + img_pos, txt + txt_pos
        x = torch.cat([self.image_layernorm_embedding(img), self.layernorm_embedding(txt)], dim=1)  # (B, L, D)
        pad = torch.cat([torch.zeros(b, gh * gw, dtype=torch.bool, device=dev), src_tokens.eq(cfg.pad_id)], 1)
        if cfg.zero_pad_embeddings:
            x = x.masked_fill(pad[..., None], 0.0)
        x = F.dropout(x, cfg.dropout, self.training)

        img_ln = self.pos_ln if self.image_pos_ln is None else self.image_pos_ln
        pos = torch.cat([img_ln(img_pos), self.pos_ln(txt_pos)])  # (L, D)
        abs_bias = absolute_bias(self.pos_q_linear, self.pos_k_linear, pos, pos, cfg.heads).to(x.dtype)
        pad_bias = padding_bias(pad, x.dtype)  # (B, 1, 1, L)
        rel_idx = self._rel_index(gh, gw, s, dev)
        zero = x.new_zeros(1, cfg.heads)
        i = gh * gw
        cross_bias = None
        if cfg.fusion == "cross":  # self-attention within each modality; the image is read by cross-attention
            cross_bias = abs_bias[:, :, :, :i]  # (1, H, L, I): every token to the image tokens, by position
            split = torch.arange(i + s, device=dev) < i
            abs_bias = abs_bias.masked_fill(split[:, None] != split[None, :], NEG_INF)
        tables = zip(self.layers, self.rel_pos_tables, self.image_rel_pos_tables, strict=True)
        for layer, text_t, image_t in tables:
            table = torch.cat([text_t.weight, image_t.weight, zero]).to(x.dtype)  # (nb + ni + 1, H)
            rel = table[rel_idx].permute(2, 0, 1).unsqueeze(0)  # (1, H, L, L)
            if cross_bias is None:
                x = layer(x, abs_bias + rel + pad_bias)
            else:
                x = layer(x, abs_bias + rel + pad_bias, x[:, :i], cross_bias)
        return EncoderOut(self.layer_norm(x), pad, pos.unsqueeze(0))


# ----------------------------------------------------------------------------------------------------------------
# Decoder (shared by AR and NARVL)


class Decoder(nn.Module):
    """Pre-LN decoder stack; positions enter as self- and cross-attention biases; causal for AR only."""

    def __init__(self, cfg: ModelConfig, num_positions: int, causal: bool):
        super().__init__()
        d, self.cfg, self.causal = cfg.d_model, cfg, causal
        self.num_positions = num_positions
        self.embed_positions = nn.Embedding(position_table_rows(cfg, num_positions), d)
        self.layernorm_embedding = nn.LayerNorm(d)
        self.pos_ln = nn.LayerNorm(d)
        self.pos_q_linear, self.pos_k_linear = nn.Linear(d, d), nn.Linear(d, d)
        self.cross_pos_q_linear, self.cross_pos_k_linear = nn.Linear(d, d), nn.Linear(d, d)
        n = cfg.decoder_layers
        self.rel_pos_tables = nn.ModuleList(nn.Embedding(text_rel_table_size(cfg), cfg.heads) for _ in range(n))
        if cfg.code_embeddings:  # OFA's image-code decoding parameters: held for checkpoints, not used, frozen
            self.code_layernorm_embedding = nn.LayerNorm(d)
            self.embed_image_positions = nn.Embedding(cfg.image_rel_pos_max ** 2 + 1, d)
            self.image_pos_ln = nn.LayerNorm(d)
            self.image_rel_pos_tables = nn.ModuleList(
                nn.Embedding(image_rel_table_size(cfg), cfg.heads) for _ in range(n))
            for module in (self.code_layernorm_embedding, self.embed_image_positions, self.image_pos_ln,
                           self.image_rel_pos_tables):
                module.requires_grad_(False)
        self.layers = nn.ModuleList(TransformerLayer(cfg, cross=True, drop_path_rate=r)
                                    for r in _drop_path_rates(n, cfg.drop_path))
        self.layer_norm = nn.LayerNorm(d)

    def biases(self, t: int, enc: EncoderOut, dtype: torch.dtype) -> tuple[list[Tensor], Tensor]:
        """Per-layer self-attention biases [(1, H, T, T)] and the cross-attention bias (B, H, T, L)."""
        cfg = self.cfg
        if t > self.num_positions:
            raise ValueError(f"{t} decoder positions exceed the position table "
                             f"({self.num_positions}); raise max_target_positions / max_queries")
        pos = self.pos_ln(self.embed_positions.weight[:t])  # (T, D)
        self_abs = absolute_bias(self.pos_q_linear, self.pos_k_linear, pos, pos, cfg.heads)
        if self.causal:
            self_abs = self_abs + torch.full((t, t), NEG_INF, device=pos.device).triu(1)
        buckets = text_rel_index(cfg, t, t, self.num_positions, pos.device)
        self_biases = [(self_abs + table(buckets).permute(2, 0, 1).unsqueeze(0)).to(dtype)
                       for table in self.rel_pos_tables]
        cross = absolute_bias(self.cross_pos_q_linear, self.cross_pos_k_linear, pos, enc.pos_embed[0], cfg.heads)
        return self_biases, cross.to(dtype) + padding_bias(enc.padding_mask, dtype)

    def add_positions(self, x: Tensor, start: int) -> Tensor:
        """x (B, T, D) at positions start..start+T-1, plus their embeddings when cfg.entangle_positions."""
        if not self.cfg.decoder_entangled:
            return x
        return x + self.embed_positions.weight[start:start + x.shape[1]]

    def forward(self, x: Tensor, enc: EncoderOut, self_padding: Tensor | None = None) -> Tensor:
        """x (B, T, D) input embeddings (tokens or queries) -> hidden states (B, T, D) after the final LN."""
        self_biases, cross_bias = self.biases(x.shape[1], enc, x.dtype)
        pad_bias = 0.0 if self_padding is None else padding_bias(self_padding, x.dtype)
        x = F.dropout(self.layernorm_embedding(self.add_positions(x, 0)), self.cfg.dropout, self.training)
        for layer, self_bias in zip(self.layers, self_biases, strict=True):
            x = layer(x, self_bias + pad_bias, enc.states, cross_bias)
        return self.layer_norm(x)


@dataclass
class DecoderState:
    """Incremental-decoding state: per-layer caches and the biases for every step up to T_max."""

    caches: list[LayerCache]
    self_biases: list[Tensor]  # [(1, H, T_max, T_max)]
    cross_bias: Tensor  # (B, H, T_max, L)
    step: int = 0

    def reorder(self, index: Tensor, cross: bool = False) -> None:
        """Select rows (beams) of the caches in place. The cross-attention K/V and bias only need reordering
        when `index` moves rows across samples (beam search reorders within a sample: pass cross=False)."""
        for c in self.caches:
            c.k, c.v = c.k.index_select(0, index), c.v.index_select(0, index)
            if cross and c.cross_k is not None:
                c.cross_k, c.cross_v = c.cross_k.index_select(0, index), c.cross_v.index_select(0, index)
        if cross:
            self.cross_bias = self.cross_bias.index_select(0, index)


# ----------------------------------------------------------------------------------------------------------------
# Top-level models


def _init_weights(module: nn.Module, linear_std: float | None) -> None:
    """Linear: N(0, linear_std) (None: fan_in**-0.5), zero bias; embeddings N(0, 0.02), zero padding row.

    Why fan-in on small models: with OFA's fixed 0.02 on d_model=64, q.k attention scores start ~40x smaller
    than with fan-in scaling and their gradients with them, and the model stays at the language prior for
    thousands of steps (measured: a two-object "which colour is the <shape>" task is solved in 200 steps with
    fan-in init and not in 600 with 0.02).
    """
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=linear_std or module.in_features ** -0.5)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)
        if module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()


class _EncoderDecoder(nn.Module):
    """Shared parts: token embeddings (tied encoder input / decoder input / output projection), encoder."""

    def __init__(self, cfg: ModelConfig, decoder_positions: int, causal: bool):
        super().__init__()
        if cfg.vocab_size is None:
            raise ValueError("ModelConfig.vocab_size is unset: fill vocab_size/blank_id from the tokenizer")
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model, padding_idx=cfg.pad_id)
        self.encoder = Encoder(cfg, self.embed_tokens)
        self.decoder = Decoder(cfg, decoder_positions, causal)
        self.apply(lambda m: _init_weights(m, cfg.init_std))

    def encode(self, image: Tensor, src_tokens: Tensor) -> EncoderOut:
        """image (B, 3, H, W), src_tokens (B, S) -> EncoderOut with states (B, L, D)."""
        return self.encoder(image, src_tokens)

    def output_logits(self, hidden: Tensor) -> Tensor:
        return F.linear(hidden, self.embed_tokens.weight)  # (B, T, V): tied output projection


class ARModel(_EncoderDecoder):
    """OFA: causal decoder over the shifted target tokens (teacher forcing), KV-cached incremental decoding."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg, cfg.max_target_positions, causal=True)

    def forward(self, image: Tensor, src_tokens: Tensor, prev_output_tokens: Tensor,
                enc: EncoderOut | None = None) -> Tensor:
        """Teacher forcing: prev_output_tokens (B, T) (bos + target[:-1]) -> logits (B, T, V)."""
        enc = self.encode(image, src_tokens) if enc is None else enc
        x = self.embed_tokens(prev_output_tokens)  # (B, T, D)
        return self.output_logits(self.decoder(x, enc))

    def init_state(self, enc: EncoderOut, max_len: int) -> DecoderState:
        """An empty KV cache for up to max_len decoder positions (bos included)."""
        cfg, st = self.cfg, enc.states
        b, hd = st.shape[0], cfg.d_model // cfg.heads
        self_biases, cross_bias = self.decoder.biases(max_len, enc, st.dtype)
        caches = [LayerCache(st.new_zeros(b, cfg.heads, max_len, hd), st.new_zeros(b, cfg.heads, max_len, hd))
                  for _ in range(cfg.decoder_layers)]
        return DecoderState(caches, self_biases, cross_bias)

    def decode_step(self, tokens: Tensor, enc: EncoderOut, state: DecoderState) -> Tensor:
        """Next-token logits (B, V) for tokens (B,) at position state.step; advances the state."""
        t = state.step
        if t >= state.self_biases[0].shape[-1]:
            raise ValueError(f"decode_step beyond the cache length {state.self_biases[0].shape[-1]}")
        x = self.decoder.layernorm_embedding(self.decoder.add_positions(self.embed_tokens(tokens[:, None]), t))
        cross_bias = state.cross_bias[:, :, t:t + 1]  # (B, H, 1, L)
        for layer, cache, sb in zip(self.decoder.layers, state.caches, state.self_biases, strict=True):
            x = layer(x, sb[:, :, t:t + 1, :t + 1], enc.states, cross_bias, cache=cache, step=t)
        state.step = t + 1
        return self.output_logits(self.decoder.layer_norm(x))[:, 0]  # (B, V)


class NARVLModel(_EncoderDecoder):
    """NARVL: learnable query tokens (LQT) decoded in one bidirectional pass; outputs for Q-CTC.

    decoder_input="queries" (the paper's model): N = cfg.num_queries queries, each an N(0, 0.02) vector, go
    through the decoder embedding LayerNorm (no token embedding added); their positions (rows of a table of
    cfg.max_queries, so models with different N share positions) enter as attention biases.
    decoder_input="encoder" (ablation, tables 6-7): the decoder input is the encoder output itself; the output
    length is the encoder length L (image + text tokens; padded text positions are masked as keys and
    still emit predictions, which Q-CTC aligns to blanks since they are trailing).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg, cfg.max_queries, causal=False)
        self.queries = nn.Embedding(cfg.num_queries, cfg.d_model)
        nn.init.normal_(self.queries.weight, std=0.02)

    def forward(self, image: Tensor, src_tokens: Tensor, enc: EncoderOut | None = None) -> Tensor:
        """image (B, 3, H, W), src_tokens (B, S) -> logits (B, N, V) (N = L for decoder_input="encoder")."""
        enc = self.encode(image, src_tokens) if enc is None else enc
        if self.cfg.decoder_input == "encoder":
            hidden = self.decoder(enc.states, enc, self_padding=enc.padding_mask)  # (B, L, D)
        else:
            b = enc.states.shape[0]
            x = self.queries.weight.to(enc.states.dtype).unsqueeze(0).expand(b, -1, -1)  # (B, N, D)
            hidden = self.decoder(x, enc)
        return self.output_logits(hidden)

    @classmethod
    def from_ar(cls, ar: ARModel, num_queries: int, decoder_input: str = "queries") -> NARVLModel:
        """A NARVL model initialised from an AR model: every shared weight copied, fresh query tokens.

        The decoder position table copies the AR rows it has in common (min(max_target_positions, max_queries)).
        """
        cfg = ar.cfg.model_copy(update=dict(num_queries=num_queries, decoder_input=decoder_input,
                                            max_queries=max(ar.cfg.max_queries, num_queries)))
        cfg = ModelConfig(**cfg.model_dump())  # re-validate
        nar = cls(cfg).to(next(ar.parameters()).device)
        ar_state = ar.state_dict()
        pos_key = "decoder.embed_positions.weight"
        state = {k: v for k, v in ar_state.items() if k != pos_key}
        missing, unexpected = nar.load_state_dict(state, strict=False)
        if unexpected or set(missing) != {pos_key, "queries.weight"}:
            raise RuntimeError(f"AR -> NARVL weight transfer mismatch: missing {missing}, unexpected {unexpected}")
        with torch.no_grad():
            n = min(ar_state[pos_key].shape[0], cfg.max_queries)
            nar.decoder.embed_positions.weight[:n] = ar_state[pos_key][:n]
        nar.train(ar.training)
        return nar


def count_parameters(model: nn.Module) -> int:
    """Number of distinct parameters (tied tensors counted once)."""
    return sum(p.numel() for p in model.parameters())
