"""Autoregressive search for the AR baseline (paper section 4.1 speed comparison; OFA beam 5, no repeated 3-grams).

Both searches are batched and KV-cached: one `decode_step` per time step for the whole batch (x beams); the
only Python loop is over time steps. Hypotheses are returned without bos/eos.

Notation: B batch, K beams, V vocab.
"""

from __future__ import annotations

import torch
from torch import Tensor

from narvl_model.model import ARModel, EncoderOut

NEG_INF = float("-inf")


def _banned(cfg) -> list[int]:
    ids = [cfg.pad_id, cfg.bos_id]
    if cfg.blank_id is not None:
        ids.append(cfg.blank_id)
    return ids


def _expand(enc: EncoderOut, k: int) -> EncoderOut:
    return EncoderOut(enc.states.repeat_interleave(k, 0), enc.padding_mask.repeat_interleave(k, 0), enc.pos_embed)


@torch.no_grad()
def greedy_search(model: ARModel, image: Tensor, src_tokens: Tensor, max_len: int, min_len: int = 0
                  ) -> list[list[int]]:
    """Greedy decoding of up to max_len tokens (+ eos). EOS is banned before min_len tokens (for timing runs).

    Returns:
        One list of token ids per sample, without bos/eos.
    """
    cfg = model.cfg
    enc = model.encode(image, src_tokens)
    b, dev = src_tokens.shape[0], src_tokens.device
    state = model.init_state(enc, max_len + 1)
    tokens = torch.full((b, max_len + 1), cfg.pad_id, dtype=torch.long, device=dev)
    prev = torch.full((b,), cfg.bos_id, dtype=torch.long, device=dev)
    finished = torch.zeros(b, dtype=torch.bool, device=dev)
    banned = torch.tensor(_banned(cfg), device=dev)
    for t in range(max_len + 1):
        logits = model.decode_step(prev, enc, state).float()  # (B, V)
        logits[:, banned] = NEG_INF
        if t < min_len:
            logits[:, cfg.eos_id] = NEG_INF
        if t == max_len:
            nxt = torch.full_like(prev, cfg.eos_id)
        else:
            nxt = logits.argmax(-1)
        nxt = nxt.masked_fill(finished, cfg.pad_id)
        tokens[:, t] = nxt
        finished |= nxt.eq(cfg.eos_id)
        prev = nxt
        if bool(finished.all()):
            break
    out = []
    for row in tokens.tolist():
        out.append(row[:row.index(cfg.eos_id)] if cfg.eos_id in row else row)
    return out


def _no_repeat_ngram_mask(hist: Tensor, n: int, vocab: int) -> Tensor:
    """Bool (R, V): tokens that would complete an n-gram already present in each row of hist (R, t)."""
    r, t = hist.shape
    mask = torch.zeros(r, vocab, dtype=torch.bool, device=hist.device)
    if t < n:
        return mask
    grams = hist.unfold(1, n, 1)  # (R, t-n+1, n)
    match = (grams[:, :, :-1] == hist[:, None, t - n + 1:]).all(-1)  # (R, t-n+1): prefix equals the last n-1
    rows = torch.arange(r, device=hist.device)[:, None].expand_as(match)
    mask[rows[match], grams[:, :, -1][match]] = True
    return mask


@torch.no_grad()
def beam_search(model: ARModel, image: Tensor, src_tokens: Tensor, beam_size: int, max_len: int,
                length_penalty: float = 1.0, no_repeat_ngram: int = 0, min_len: int = 0) -> list[list[int]]:
    """Batched beam search with a KV cache.

    Each step scores the 2K best continuations per sample; eos candidates ranked in the top K are finished
    (score / length ** length_penalty, length counting eos), the K best non-eos candidates continue. A sample
    stops once K hypotheses have finished; at max_len tokens eos is forced. EOS is banned before min_len tokens.

    Returns:
        The best finished hypothesis per sample, without bos/eos.
    """
    cfg, k = model.cfg, beam_size
    enc = _expand(model.encode(image, src_tokens), k)
    b, dev = src_tokens.shape[0], src_tokens.device
    bk = b * k
    state = model.init_state(enc, max_len + 1)
    hist = torch.full((bk, max_len + 1), cfg.pad_id, dtype=torch.long, device=dev)  # generated tokens
    scores = torch.zeros(b, k, device=dev)
    scores[:, 1:] = NEG_INF  # all beams start identical: keep one
    prev = torch.full((bk,), cfg.bos_id, dtype=torch.long, device=dev)
    best_score = torch.full((b,), NEG_INF, device=dev)
    best_tokens = torch.full((b, max_len + 1), cfg.pad_id, dtype=torch.long, device=dev)
    n_finished = torch.zeros(b, dtype=torch.long, device=dev)
    banned = torch.tensor(_banned(cfg), device=dev)
    base = (torch.arange(b, device=dev) * k)[:, None]  # (B, 1)
    for t in range(max_len + 1):
        lprobs = model.decode_step(prev, enc, state).float().log_softmax(-1)  # (BK, V)
        v = lprobs.shape[1]
        lprobs[:, banned] = NEG_INF
        if t < min_len:
            lprobs[:, cfg.eos_id] = NEG_INF
        if t == max_len:  # force eos
            eos_col = lprobs[:, cfg.eos_id].clone()
            lprobs.fill_(NEG_INF)
            lprobs[:, cfg.eos_id] = eos_col
        if no_repeat_ngram > 0:
            lprobs.masked_fill_(_no_repeat_ngram_mask(hist[:, :t], no_repeat_ngram, v), NEG_INF)
        cand = (scores[:, :, None] + lprobs.view(b, k, v)).view(b, k * v)  # (B, K*V)
        top_s, top_i = cand.topk(2 * k, dim=1)  # (B, 2K)
        beam, tok = top_i // v, top_i % v
        is_eos = tok.eq(cfg.eos_id) & top_s.ne(NEG_INF)

        # finish eos candidates ranked in the top K
        fin = is_eos[:, :k] & (n_finished < k)[:, None]
        norm = (top_s[:, :k] / float(t + 1) ** length_penalty).masked_fill(~fin, NEG_INF)  # (B, K)
        cand_best, cand_j = norm.max(1)
        better = cand_best > best_score
        if bool(better.any()):
            src_rows = (base[:, 0] + beam.gather(1, cand_j[:, None])[:, 0])  # (B,)
            best_tokens[better] = hist[src_rows[better]]
            best_tokens[better, t] = cfg.eos_id
            best_score = torch.where(better, cand_best, best_score)
        n_finished += fin.sum(1)
        if bool((n_finished >= k).all()) or t == max_len:
            break

        # continue with the K best non-eos candidates
        cont_s = top_s.masked_fill(is_eos, NEG_INF)
        scores, j = cont_s.topk(k, dim=1)  # (B, K)
        rows = (base + beam.gather(1, j)).view(-1)  # (BK,)
        prev = tok.gather(1, j).view(-1)
        hist = hist.index_select(0, rows)
        hist[:, t] = prev
        state.reorder(rows)
    out = []
    for row in best_tokens.tolist():
        out.append(row[:row.index(cfg.eos_id)] if cfg.eos_id in row else row)
    return out
