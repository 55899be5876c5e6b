"""NARVL inference (paper section 3.2.3): per-query argmax, CTC collapse; a CTC prefix beam search; and the
task post-processing of decoded tokens (grounding boxes from location bins).

Notation: B batch, N queries, V vocab (incl. the CTC blank).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence

from torch import Tensor


def ctc_collapse(ids: Iterable[int] | Tensor, blank_id: int) -> list[int]:
    """The collapse B: merge equal neighbours, then drop blanks ("a - b b - a a" -> "a b a")."""
    ids = ids.tolist() if isinstance(ids, Tensor) else list(ids)
    out, prev = [], None
    for i in ids:
        if i != prev and i != blank_id:
            out.append(i)
        prev = i
    return out


def strip_special(ids: Sequence[int], eos_id: int, drop: Iterable[int] = ()) -> list[int]:
    """Cut at the first eos, then drop the ids in `drop` (pad, bos, blank)."""
    drop = set(drop)
    out = []
    for i in ids:
        if i == eos_id:
            break
        if i not in drop:
            out.append(i)
    return out


def ctc_greedy(logits: Tensor, blank_id: int, eos_id: int, pad_id: int = 1, bos_id: int = 0) -> list[list[int]]:
    """Greedy CTC decoding of (B, N, V) logits: argmax per query, collapse, cut at eos, drop pad/bos."""
    best = logits.argmax(-1).cpu()  # (B, N)
    return [strip_special(ctc_collapse(row, blank_id), eos_id, (pad_id, bos_id, blank_id)) for row in best]


def nar_ce_greedy(logits: Tensor, eos_id: int, blank_id: int, pad_id: int = 1, bos_id: int = 0) -> list[list[int]]:
    """Decoding for the position-wise CE baseline: argmax per query, cut at eos (no merging)."""
    best = logits.argmax(-1).cpu().tolist()
    return [strip_special(row, eos_id, (pad_id, bos_id, blank_id)) for row in best]


def _logaddexp(a: float, b: float) -> float:
    if a == -math.inf:
        return b
    if b == -math.inf:
        return a
    m = max(a, b)
    return m + math.log(math.exp(a - m) + math.exp(b - m))


def ctc_prefix_beam_search(log_probs: Tensor, blank_id: int, beam_size: int, prune_top_k: int | None = None
                           ) -> list[int]:
    """CTC prefix beam search over one sample's (N, V) log-probabilities; the most probable collapsed prefix.

    Each prefix keeps (log p ending in blank, log p ending in its last token); at each query only the
    prune_top_k best tokens (default beam_size + 1) are extended.
    """
    k = prune_top_k or beam_size + 1
    lp = log_probs.float().cpu()
    beams: dict[tuple[int, ...], tuple[float, float]] = {(): (0.0, -math.inf)}
    for frame in lp:
        top_v, top_i = frame.topk(min(k, frame.numel()))
        cand: dict[tuple[int, ...], list[float]] = defaultdict(lambda: [-math.inf, -math.inf])
        for prefix, (p_b, p_nb) in beams.items():
            total = _logaddexp(p_b, p_nb)
            for v, c in zip(top_v.tolist(), top_i.tolist(), strict=True):
                if c == blank_id:
                    e = cand[prefix]
                    e[0] = _logaddexp(e[0], total + v)
                elif prefix and prefix[-1] == c:
                    e = cand[prefix]  # repeat merges into the same prefix
                    e[1] = _logaddexp(e[1], p_nb + v)
                    e = cand[prefix + (c,)]  # a blank in between emits the token again
                    e[1] = _logaddexp(e[1], p_b + v)
                else:
                    e = cand[prefix + (c,)]
                    e[1] = _logaddexp(e[1], total + v)
        ranked = sorted(cand.items(), key=lambda kv: _logaddexp(*kv[1]), reverse=True)[:beam_size]
        beams = {p: (s[0], s[1]) for p, s in ranked}
    return list(max(beams.items(), key=lambda kv: _logaddexp(*kv[1]))[0])


def bins_to_box(tokens: Sequence[int], bin_ids_start: int, num_bins: int, width: float, height: float
                ) -> tuple[float, float, float, float] | None:
    """Exactly four location tokens <bin_k> (x0 y0 x1 y1) -> a box in pixels, k / (num_bins - 1) * size.

    Anything else (another count, a non-bin token) is None: a miss.
    """
    if len(tokens) != 4:
        return None
    ks = [t - bin_ids_start for t in tokens]
    if any(not 0 <= k < num_bins for k in ks):
        return None
    sizes = (width, height, width, height)
    x0, y0, x1, y1 = (k / (num_bins - 1) * s for k, s in zip(ks, sizes, strict=True))
    return x0, y0, x1, y1
