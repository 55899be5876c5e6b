"""Training losses: Q-CTC for NARVL (paper section 3.2.1, eq. 1), the position-wise CE baseline (table 8),
and the AR teacher-forcing cross-entropy.

Notation: B batch, N queries, T target tokens, V vocab (incl. the CTC blank).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


class QCTCResult(NamedTuple):
    """loss: scalar to minimise; n_infeasible: samples that cannot be aligned to N queries (excluded);
    per_sample: (B,) CTC loss / target length (0 where infeasible); feasible_mask: (B,) bool."""

    loss: Tensor
    n_infeasible: int
    per_sample: Tensor
    feasible_mask: Tensor


def ctc_min_length(targets: Tensor, target_lengths: Tensor) -> Tensor:
    """Fewest CTC frames that can emit each target: its length + the number of equal adjacent tokens (B,)."""
    t = targets.shape[1]
    if t < 2:
        return target_lengths.clone()
    pos = torch.arange(1, t, device=targets.device)[None, :]  # (1, T-1): index of the right neighbour
    repeats = (targets[:, 1:] == targets[:, :-1]) & (pos < target_lengths[:, None])
    return target_lengths + repeats.sum(1)



def is_ctc_feasible(tokens: Sequence[int], num_queries: int) -> bool:
    """True when `num_queries` CTC outputs can emit the target `tokens` (N >= length + equal adjacent tokens): the
    rule `qctc_loss` applies per sample, for one target given as a list of ids (include eos if it is trained)."""
    row = torch.tensor([list(tokens)], dtype=torch.long)  # (1, T)
    return bool(ctc_min_length(row, torch.tensor([row.shape[1]])).item() <= num_queries)


def qctc_loss(logits: Tensor, targets: Tensor, target_lengths: Tensor, blank_id: int,
              label_smoothing: float = 0.0, weights: Tensor | None = None) -> QCTCResult:
    """Query CTC loss: CTC over the query axis, marginalising all alignments of the N outputs to the target.

    Each sample's CTC loss is divided by its target length and the feasible samples are averaged (the public
    code's reduction='mean'). Label smoothing: (1 - eps) * ctc - eps * mean(log_probs) (mean over queries and
    vocab, averaged over the feasible samples). Infeasible samples (N < target length + equal adjacent tokens)
    are counted and excluded; their gradient is zero.

    Args:
        logits: (B, N, V) raw decoder scores.
        targets: (B, T) int64 target ids (incl. eos), padded with anything beyond target_lengths.
        target_lengths: (B,) lengths (>= 1).
        blank_id: the CTC blank index.
        label_smoothing: eps.
        weights: optional (B,) per-sample weights (VQA answer confidence) multiplying each sample's loss.

    Returns:
        QCTCResult(loss, n_infeasible, per_sample, feasible_mask).
    """
    b, n, _ = logits.shape
    log_probs = logits.float().log_softmax(-1)  # (B, N, V)
    target_lengths = target_lengths.to(device=logits.device, dtype=torch.long)
    feasible = ctc_min_length(targets, target_lengths) <= n  # (B,)
    input_lengths = torch.full((b,), n, dtype=torch.long, device=logits.device)
    ctc = F.ctc_loss(log_probs.transpose(0, 1), targets, input_lengths, target_lengths, blank=blank_id,
                     reduction="none", zero_infinity=True)  # (B,)
    per_sample = ctc / target_lengths.clamp(min=1)
    if label_smoothing > 0:
        per_sample = (1 - label_smoothing) * per_sample - label_smoothing * log_probs.mean(dim=(1, 2))
    if weights is not None:
        per_sample = per_sample * weights.to(per_sample)
    per_sample = torch.where(feasible, per_sample, torch.zeros_like(per_sample))
    n_feasible = feasible.sum()
    loss = per_sample.sum() / n_feasible.clamp(min=1)
    return QCTCResult(loss, int(b - n_feasible.item()), per_sample.detach(), feasible)


def nar_ce_loss(logits: Tensor, targets: Tensor, target_lengths: Tensor, pad_id: int,
                label_smoothing: float = 0.0) -> Tensor:
    """Position-wise CE baseline (paper table 8): query i predicts target token i for i < target length; the
    remaining queries are unsupervised. Targets longer than N are truncated to N. Mean over supervised tokens.

    Args:
        logits: (B, N, V); targets: (B, T) (incl. eos); target_lengths: (B,); pad_id: unused padding value.
    """
    n = logits.shape[1]
    t = min(n, targets.shape[1])
    supervised = torch.arange(t, device=logits.device)[None, :] < target_lengths[:, None].to(logits.device)
    labels = targets[:, :t].masked_fill(~supervised, -100)  # (B, t)
    return F.cross_entropy(logits[:, :t].float().transpose(1, 2), labels, ignore_index=-100,
                           label_smoothing=label_smoothing)


def ar_ce_loss(logits: Tensor, target: Tensor, pad_id: int, label_smoothing: float = 0.0,
               weights: Tensor | None = None) -> Tensor:
    """Teacher-forcing cross-entropy, mean over non-pad target tokens (optionally weighted per sample).

    Args:
        logits: (B, T, V); target: (B, T) (target + eos, pad_id padded); weights: optional (B,).
    """
    tok = F.cross_entropy(logits.float().transpose(1, 2), target, ignore_index=pad_id,
                          label_smoothing=label_smoothing, reduction="none")  # (B, T)
    mask = target.ne(pad_id)
    if weights is not None:
        tok = tok * weights.to(tok)[:, None]
    return (tok * mask).sum() / mask.sum().clamp(min=1)
