"""Static-shape inference for the speed comparison (paper section 4.1, table 1; section 3.2.3 for NARVL decoding).

NARVL: one encoder pass, one decoder pass, argmax per query and the CTC collapse, all as tensor ops on the
model's device: the result is padded token ids (B, N) and lengths (B,), and the host waits only when it reads
them. AR baseline: greedy and beam search with a static KV cache (preallocated to max_len + 1 positions, written
at a position tensor, attention over the whole cache with the causal bias masking the unwritten
tail, exp(-inf) = 0), cache rows reordered in place, and the beam bookkeeping in tensors.

Every searcher keeps all of its state in tensors allocated once (inputs included) and exposes steps that take no
arguments and return nothing, so that each step can run eagerly, under `torch.compile` (`mode="reduce-overhead"`
captures it as a CUDA graph) or be captured by hand with `torch.cuda.CUDAGraph`: shapes never change and nothing
inside a step reads a value back to the host. The searches give the tokens of `narvl_model.search` and
`narvl_model.decoding.ctc_greedy` (tests/test_fast_inference.py checks both, eager and compiled).

Notation: B batch, K beams, R = B*K rows, N queries, M max_len (output tokens before eos), T = M + 1 cache
positions, L encoder tokens, V vocab.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from narvl_model.model import ARModel, EncoderOut, LayerCache, NARVLModel

NEG_INF = float("-inf")
MODES = ("eager", "compile", "reduce-overhead", "cuda-graph")


def ctc_collapse_padded(ids: Tensor, blank_id: int, eos_id: int, drop: tuple[int, ...] = ()) -> tuple[Tensor, Tensor]:
    """Batched CTC collapse of per-query ids (B, N) on their device, no host sync.

    Keeps a query's id when it differs from the previous query's id and is not the blank, cuts at the first eos
    and drops the ids in `drop` (pad, bos): the same tokens as `decoding.ctc_greedy` row by row.

    Returns:
        tokens (B, N), kept ids moved to the front, the rest `drop[0]` (or blank_id when drop is empty);
        lengths (B,) the number of kept ids.
    """
    b, n = ids.shape
    prev = torch.cat([torch.full_like(ids[:, :1], -1), ids[:, :-1]], 1)
    keep = ids.ne(prev) & ids.ne(blank_id)  # (B, N)
    keep &= ids.eq(eos_id).long().cumsum(1).eq(0)  # before the first eos
    for d in drop:
        keep &= ids.ne(d)
    slot = torch.where(keep, keep.long().cumsum(1) - 1, n)  # (B, N): target column, n = discard
    fill = drop[0] if drop else blank_id
    out = torch.full((b, n + 1), fill, dtype=ids.dtype, device=ids.device).scatter_(1, slot, ids)
    out[:, n] = fill  # the discard column took every dropped id
    return out[:, :n], keep.sum(1)


def padded_to_lists(tokens: Tensor, lengths: Tensor) -> list[list[int]]:
    """(B, N) padded ids + (B,) lengths -> one list per row (the only host read)."""
    return [row[:n] for row, n in zip(tokens.tolist(), lengths.tolist(), strict=True)]


def compile_step(fn: Callable[[], None], mode: str, reset: Callable[[], None] | None = None) -> Callable[[], None]:
    """Wrap a no-argument step that reads and writes only preallocated tensors.

    mode: "eager"; "compile" (torch.compile, default mode); "reduce-overhead" (torch.compile with CUDA graphs
    on CUDA, plain compiled code on CPU); "cuda-graph" (captured by hand with torch.cuda.CUDAGraph, CUDA only:
    captures after three warm-up calls on a side stream, each after `reset()` when given, so that a step
    that advances a position stays inside its tensors).
    """
    if mode == "eager":
        return fn
    if mode in ("compile", "reduce-overhead"):
        # every step compiled in a process goes through one wrapper code object of torch's, so each is one more
        # cache entry of it: allow as many as a benchmark builds (torch's default of 8 falls back to eager)
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
        torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit, 1024)
        compiled = torch.compile(fn, mode=None if mode == "compile" else mode, fullgraph=True, dynamic=False)
        if mode == "compile":
            return compiled

        def run() -> None:
            torch.compiler.cudagraph_mark_step_begin()
            compiled()
        return run
    if mode == "cuda-graph":
        if not torch.cuda.is_available():
            raise ValueError("mode='cuda-graph' needs a CUDA device")
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                if reset is not None:
                    reset()
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return graph.replay
    raise ValueError(f"unknown mode {mode!r}; choose one of {MODES}")


def _static(*tensors: Tensor) -> None:
    """Tell torch.compile these tensors keep their address (CUDA graphs may read and write them in place)."""
    for t in tensors:
        torch._dynamo.mark_static_address(t)


class NARVLRunner:
    """NARVL greedy decoding for a fixed (batch, image size, prompt length): one pass + CTC collapse on device."""

    def __init__(self, model: NARVLModel, batch: int, image_size: int, src_len: int, mode: str = "eager",
                 record_logits: bool = False):
        cfg, p = model.cfg, next(model.parameters())
        if cfg.blank_id is None:
            raise ValueError("NARVLRunner: ModelConfig.blank_id is unset (fill it from the tokenizer)")
        self.model, self.cfg = model, cfg
        self.image = torch.zeros(batch, 3, image_size, image_size, dtype=p.dtype, device=p.device)
        self.src = torch.full((batch, src_len), cfg.pad_id, dtype=torch.long, device=p.device)
        with torch.no_grad():  # outputs: one per query, or per encoder token for decoder_input="encoder"
            n = cfg.num_queries if cfg.decoder_input == "queries" else model(self.image, self.src).shape[1]
        self.tokens = torch.zeros(batch, n, dtype=torch.long, device=p.device)
        self.lengths = torch.zeros(batch, dtype=torch.long, device=p.device)
        self.logits = None  # (B, N, V) float, the last call's logits when record_logits (for tests)
        if record_logits:
            self.logits = torch.zeros(*self.tokens.shape, cfg.vocab_size, device=p.device)
        _static(self.image, self.src, self.tokens, self.lengths, *([self.logits] if record_logits else []))
        self._run = compile_step(self.forward_step, mode)

    @torch.no_grad()
    def forward_step(self) -> None:
        cfg = self.cfg
        logits = self.model(self.image, self.src)  # (B, N, V)
        if self.logits is not None:
            self.logits.copy_(logits)
        ids = logits.argmax(-1)  # (B, N)
        tokens, lengths = ctc_collapse_padded(ids, cfg.blank_id, cfg.eos_id, (cfg.pad_id, cfg.bos_id))
        self.tokens.copy_(tokens)
        self.lengths.copy_(lengths)

    @torch.no_grad()
    def __call__(self, image: Tensor, src_tokens: Tensor) -> tuple[Tensor, Tensor]:
        """image (B, 3, H, W), src_tokens (B, S) -> tokens (B, N) padded with pad_id, lengths (B,), on device."""
        self.image.copy_(image)
        self.src.copy_(src_tokens)
        self._run()
        return self.tokens.clone(), self.lengths.clone()


class _StaticAR:
    """Shared by the searches: input, encoder-side and KV-cache tensors for R = B*K rows and T positions."""

    def __init__(self, model: ARModel, batch: int, beams: int, image_size: int, src_len: int, max_len: int,
                 record_logits: bool):
        cfg, p = model.cfg, next(model.parameters())
        self.model, self.cfg, self.k, self.max_len = model, cfg, beams, max_len
        dev, dt = p.device, p.dtype
        b, r, t = batch, batch * beams, max_len + 1
        self.image = torch.zeros(b, 3, image_size, image_size, dtype=dt, device=dev)
        self.src = torch.full((b, src_len), cfg.pad_id, dtype=torch.long, device=dev)
        with torch.no_grad():
            enc = model.encode(self.image, self.src)
        l_enc, h, hd = enc.states.shape[1], cfg.heads, cfg.d_model // cfg.heads
        self.caches = [LayerCache(torch.zeros(r, h, t, hd, dtype=dt, device=dev),
                                  torch.zeros(r, h, t, hd, dtype=dt, device=dev),
                                  torch.zeros(r, h, l_enc, hd, dtype=dt, device=dev),
                                  torch.zeros(r, h, l_enc, hd, dtype=dt, device=dev))
                       for _ in range(cfg.decoder_layers)]
        self.self_biases = [torch.zeros(1, h, t, t, dtype=dt, device=dev) for _ in range(cfg.decoder_layers)]
        self.cross_bias = torch.zeros(r, h, t, l_enc, dtype=dt, device=dev)
        self.t = torch.zeros(1, dtype=torch.long, device=dev)  # the position the next step decodes
        self.prev = torch.full((r,), cfg.bos_id, dtype=torch.long, device=dev)
        banned = [cfg.pad_id, cfg.bos_id] + ([cfg.blank_id] if cfg.blank_id is not None else [])
        self.banned = torch.zeros(cfg.vocab_size, dtype=torch.bool, device=dev)
        self.banned[banned] = True
        self.is_eos = torch.arange(cfg.vocab_size, device=dev).eq(cfg.eos_id)  # (V,)
        self.logits = None  # (T, R, V) float, every step's logits when record_logits (for tests)
        if record_logits:
            self.logits = torch.zeros(t, r, cfg.vocab_size, device=dev)
            _static(self.logits)
        _static(self.image, self.src, self.cross_bias, self.t, self.prev, *self.self_biases,
                *(x for c in self.caches for x in (c.k, c.v, c.cross_k, c.cross_v)))

    def _prefill_cache(self) -> EncoderOut:
        """Encode the inputs, write the cross K/V and biases for every row, empty the self-attention cache."""
        model, k = self.model, self.k
        enc = model.encode(self.image, self.src)
        if k > 1:
            enc = EncoderOut(enc.states.repeat_interleave(k, 0), enc.padding_mask.repeat_interleave(k, 0),
                             enc.pos_embed)
        self_biases, cross_bias = model.decoder.biases(self.max_len + 1, enc, enc.states.dtype)
        for dst, src in zip(self.self_biases, self_biases, strict=True):
            dst.copy_(src)
        self.cross_bias.copy_(cross_bias)
        for cache, layer in zip(self.caches, model.decoder.layers, strict=True):
            ck, cv = layer.encoder_attn.project_kv(enc.states)
            cache.cross_k.copy_(ck)
            cache.cross_v.copy_(cv)
            cache.k.zero_()
            cache.v.zero_()
        self.t.zero_()
        self.prev.fill_(self.cfg.bos_id)
        return enc

    def _logits(self) -> Tensor:
        """Next-token logits (R, V) float for self.prev at position self.t (ARModel.decode_step, static shapes)."""
        model, dec, t = self.model, self.model.decoder, self.t
        x = model.embed_tokens(self.prev[:, None])  # (R, 1, D)
        if self.cfg.decoder_entangled:
            x = x + dec.embed_positions.weight.index_select(0, t)
        x = dec.layernorm_embedding(x)
        cross_bias = self.cross_bias.index_select(2, t)  # (R, H, 1, L)
        for layer, cache, sb in zip(dec.layers, self.caches, self.self_biases, strict=True):
            x = layer(x, sb.index_select(2, t), None, cross_bias, cache=cache, step=t)
        logits = model.output_logits(dec.layer_norm(x))[:, 0].float()  # (R, V)
        if self.logits is not None:
            self.logits.index_copy_(0, t, logits[None])
        return logits

    def _mask(self, scores: Tensor) -> Tensor:
        """Ban pad/bos/blank, and eos while t < min_len (scores (R, V))."""
        scores = scores.masked_fill(self.banned, NEG_INF)
        return scores.masked_fill(self.is_eos & (self.t < self.min_len), NEG_INF)

    def _run(self, image: Tensor, src_tokens: Tensor, sync_every: int) -> None:
        self.image.copy_(image)
        self.src.copy_(src_tokens)
        self._prefill()
        for i in range(self.max_len + 1):
            self._step()
            if sync_every and (i + 1) % sync_every == 0 and bool(self.done().all()):
                break


class StaticGreedySearch(_StaticAR):
    """Greedy search with a static KV cache; the tokens of `search.greedy_search`."""

    def __init__(self, model: ARModel, batch: int, image_size: int, src_len: int, max_len: int, min_len: int = 0,
                 mode: str = "eager", record_logits: bool = False):
        super().__init__(model, batch, 1, image_size, src_len, max_len, record_logits)
        dev = self.t.device
        self.min_len = min_len
        self.tokens = torch.full((batch, max_len + 1), self.cfg.pad_id, dtype=torch.long, device=dev)
        self.finished = torch.zeros(batch, dtype=torch.bool, device=dev)
        _static(self.tokens, self.finished)
        self._prefill = compile_step(self.prefill, mode)
        self._step = compile_step(self.step, mode, reset=self.prefill)

    @torch.no_grad()
    def prefill(self) -> None:
        self._prefill_cache()
        self.tokens.fill_(self.cfg.pad_id)
        self.finished.zero_()

    @torch.no_grad()
    def step(self) -> None:
        cfg = self.cfg
        nxt = self._mask(self._logits()).argmax(-1)  # (B,)
        nxt = torch.where(self.t.eq(self.max_len), cfg.eos_id, nxt).masked_fill(self.finished, cfg.pad_id)
        self.tokens.index_copy_(1, self.t, nxt[:, None])
        self.finished |= nxt.eq(cfg.eos_id)
        self.prev.copy_(nxt)
        self.t += 1

    def done(self) -> Tensor:
        return self.finished

    @torch.no_grad()
    def __call__(self, image: Tensor, src_tokens: Tensor, sync_every: int = 8) -> tuple[Tensor, Tensor]:
        """-> tokens (B, M + 1) (eos, then pad after the output), lengths (B,) (tokens before eos), on device.

        sync_every: read `finished` on the host every this many steps to stop early (0: always M + 1 steps).
        """
        self._run(image, src_tokens, sync_every)
        return self.tokens.clone(), _length_before_eos(self.tokens, self.cfg.eos_id)


class StaticBeamSearch(_StaticAR):
    """Batched beam search with a static KV cache; the hypotheses of `search.beam_search` (same arguments)."""

    def __init__(self, model: ARModel, batch: int, image_size: int, src_len: int, beam_size: int, max_len: int,
                 length_penalty: float = 1.0, no_repeat_ngram: int = 0, min_len: int = 0, mode: str = "eager",
                 record_logits: bool = False):
        super().__init__(model, batch, beam_size, image_size, src_len, max_len, record_logits)
        dev, k, t = self.t.device, beam_size, max_len + 1
        self.min_len, self.no_repeat_ngram = min_len, no_repeat_ngram
        self.hist = torch.full((batch * k, t), self.cfg.pad_id, dtype=torch.long, device=dev)
        self.scores = torch.zeros(batch, k, device=dev)
        self.best_score = torch.zeros(batch, device=dev)
        self.best_tokens = torch.zeros(batch, t, dtype=torch.long, device=dev)
        self.n_finished = torch.zeros(batch, dtype=torch.long, device=dev)
        self.base = (torch.arange(batch, device=dev) * k)[:, None]  # (B, 1)
        # eager search divides by the Python float (t + 1) ** length_penalty: the same values, as float32
        self.length_norm = torch.tensor([float(i + 1) ** length_penalty for i in range(t)], device=dev)
        _static(self.hist, self.scores, self.best_score, self.best_tokens, self.n_finished)
        self._prefill = compile_step(self.prefill, mode)
        self._step = compile_step(self.step, mode, reset=self.prefill)

    @torch.no_grad()
    def prefill(self) -> None:
        self._prefill_cache()
        self.hist.fill_(self.cfg.pad_id)
        self.scores.zero_()
        self.scores[:, 1:] = NEG_INF  # all beams start identical: keep one
        self.best_score.fill_(NEG_INF)
        self.best_tokens.fill_(self.cfg.pad_id)
        self.n_finished.zero_()

    def _ngram_ban(self) -> Tensor:
        """Bool (R, V): tokens completing an n-gram already in each row's first t tokens (n = no_repeat_ngram)."""
        n, hist, t = self.no_repeat_ngram, self.hist, self.t
        r, tmax = hist.shape
        grams = hist.unfold(1, n, 1)  # (R, T-n+1, n)
        starts = torch.arange(grams.shape[1], device=hist.device)
        valid = (starts + n <= t) & (t >= n)  # (T-n+1,): gram inside hist[:, :t], and t >= n as in search.py
        last_idx = (t - n + 1 + torch.arange(n - 1, device=hist.device)).clamp(0, tmax - 1)
        last = hist.index_select(1, last_idx)  # (R, n-1): the last n-1 tokens
        match = (grams[:, :, :-1] == last[:, None]).all(-1) & valid  # (R, T-n+1)
        hits = torch.zeros(r, self.cfg.vocab_size, device=hist.device)
        return hits.scatter_add_(1, grams[:, :, -1], match.float()).gt(0)

    @torch.no_grad()
    def step(self) -> None:
        cfg, k, t = self.cfg, self.k, self.t
        b = self.scores.shape[0]
        lprobs = self._mask(self._logits().log_softmax(-1))  # (R, V)
        v = lprobs.shape[1]
        lprobs = lprobs.masked_fill(~self.is_eos & t.eq(self.max_len), NEG_INF)  # force eos at max_len
        if self.no_repeat_ngram > 0:
            lprobs = lprobs.masked_fill(self._ngram_ban(), NEG_INF)
        cand = (self.scores[:, :, None] + lprobs.view(b, k, v)).view(b, k * v)  # (B, K*V)
        top_s, top_i = cand.topk(2 * k, dim=1)  # (B, 2K)
        beam, tok = top_i // v, top_i % v
        is_eos = tok.eq(cfg.eos_id) & top_s.ne(NEG_INF)

        # finish eos candidates ranked in the top K
        fin = is_eos[:, :k] & (self.n_finished < k)[:, None]
        norm = (top_s[:, :k] / self.length_norm.index_select(0, t)).masked_fill(~fin, NEG_INF)  # (B, K)
        cand_best, cand_j = norm.max(1)
        better = cand_best > self.best_score  # (B,)
        src_rows = self.base[:, 0] + beam.gather(1, cand_j[:, None])[:, 0]  # (B,)
        new_best = self.hist.index_select(0, src_rows).index_fill(1, t, cfg.eos_id)  # (B, T)
        self.best_tokens.copy_(torch.where(better[:, None], new_best, self.best_tokens))
        self.best_score.copy_(torch.where(better, cand_best, self.best_score))
        self.n_finished += fin.sum(1)

        # continue with the K best non-eos candidates
        scores, j = top_s.masked_fill(is_eos, NEG_INF).topk(k, dim=1)  # (B, K)
        rows = (self.base + beam.gather(1, j)).view(-1)  # (R,)
        prev = tok.gather(1, j).view(-1)
        self.scores.copy_(scores)
        at = torch.arange(self.hist.shape[1], device=t.device).eq(t)  # (T,): written with a select, see model.py
        self.hist.copy_(torch.where(at, prev[:, None], self.hist.index_select(0, rows)))
        self.prev.copy_(prev)
        for cache in self.caches:  # in place: the cache keeps its address
            cache.k.copy_(cache.k.index_select(0, rows))
            cache.v.copy_(cache.v.index_select(0, rows))
        self.t += 1

    def done(self) -> Tensor:
        return self.n_finished >= self.k

    @torch.no_grad()
    def __call__(self, image: Tensor, src_tokens: Tensor, sync_every: int = 8) -> tuple[Tensor, Tensor]:
        """-> best hypothesis tokens (B, M + 1) (eos, then pad), lengths (B,) (tokens before eos), on device.

        sync_every: read the finished counts on the host every this many steps to stop early (0: never).
        """
        self._run(image, src_tokens, sync_every)
        return self.best_tokens.clone(), _length_before_eos(self.best_tokens, self.cfg.eos_id)


def _length_before_eos(tokens: Tensor, eos_id: int) -> Tensor:
    """(B, T) -> (B,) index of the first eos (T when none)."""
    is_eos = tokens.eq(eos_id)
    first = is_eos.long().argmax(1)
    return torch.where(is_eos.any(1), first, tokens.shape[1])
