"""Q-CTC against a brute-force sum over alignments and F.ctc_loss; smoothing, infeasible targets, CE losses."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from narvl_model.decoding import ctc_collapse
from narvl_model.losses import ar_ce_loss, ctc_min_length, is_ctc_feasible, nar_ce_loss, qctc_loss

BLANK = 0


pytestmark = pytest.mark.usefixtures("one_thread")


def brute_force_nll(log_probs: torch.Tensor, target: list[int]) -> float:
    """-log sum over every path (V^N of them) whose collapse equals the target."""
    n, v = log_probs.shape
    total = -math.inf
    for path in itertools.product(range(v), repeat=n):
        if ctc_collapse(path, BLANK) == target:
            total = float(torch.logaddexp(torch.tensor(total), log_probs[range(n), list(path)].sum()))
    return -total


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 5, 4, generator=g, dtype=torch.float64)  # B=4, N=5, V=4 (blank 0)
    targets = torch.tensor([[1, 2, 3], [2, 2, 0], [3, 1, 1], [1, 0, 0]])  # padding values arbitrary
    lengths = torch.tensor([3, 2, 3, 1])
    return logits, targets, lengths


def test_qctc_equals_brute_force_sum_over_alignments(batch):
    logits, targets, lengths = batch
    res = qctc_loss(logits, targets, lengths, BLANK)
    lp = logits.log_softmax(-1)
    for i in range(4):
        expected = brute_force_nll(lp[i], targets[i, : lengths[i]].tolist()) / lengths[i].item()
        assert res.per_sample[i].item() == pytest.approx(expected, rel=1e-6)
    assert res.n_infeasible == 0 and res.feasible_mask.all()


def test_qctc_equals_torch_ctc_mean(batch):
    logits, targets, lengths = batch
    res = qctc_loss(logits, targets, lengths, BLANK)
    ref = F.ctc_loss(logits.log_softmax(-1).transpose(0, 1), targets, torch.full((4,), 5), lengths,
                     blank=BLANK, reduction="mean")
    torch.testing.assert_close(res.loss, ref.float(), rtol=1e-5, atol=1e-6)
    assert res[0] is res.loss and res[1] == 0


def test_label_smoothing_formula(batch):
    logits, targets, lengths = batch
    eps = 0.1
    plain = qctc_loss(logits, targets, lengths, BLANK).loss
    smooth = qctc_loss(logits, targets, lengths, BLANK, label_smoothing=eps).loss
    expected = (1 - eps) * plain - eps * logits.float().log_softmax(-1).mean()
    torch.testing.assert_close(smooth, expected)


def test_per_sample_weights(batch):
    logits, targets, lengths = batch
    w = torch.tensor([1.0, 0.5, 0.0, 2.0])
    res = qctc_loss(logits, targets, lengths, BLANK)
    weighted = qctc_loss(logits, targets, lengths, BLANK, weights=w)
    torch.testing.assert_close(weighted.loss, (res.per_sample * w).mean())


def test_min_length_counts_equal_neighbours_within_length():
    targets = torch.tensor([[5, 5, 5, 7], [1, 2, 2, 2], [3, 3, 9, 9]])
    lengths = torch.tensor([4, 2, 3])  # the last pair of row 3 is padding
    assert ctc_min_length(targets, lengths).tolist() == [6, 2, 4]


def test_infeasible_counted_excluded_with_finite_zero_gradient():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 4, 5, generator=g, requires_grad=True)  # N = 4
    targets = torch.tensor([[1, 2, 0, 0, 0], [1, 1, 1, 0, 0], [1, 2, 3, 4, 2]])
    lengths = torch.tensor([2, 3, 5])  # sample 1 needs 5 frames (two repeats), sample 2 needs 5
    res = qctc_loss(logits, targets, lengths, BLANK, label_smoothing=0.1)
    assert res.n_infeasible == 2 and res.feasible_mask.tolist() == [True, False, False]
    alone = qctc_loss(logits[:1], targets[:1], lengths[:1], BLANK, label_smoothing=0.1)
    torch.testing.assert_close(res.loss, alone.loss)
    res.loss.backward()
    assert torch.isfinite(logits.grad).all()
    assert logits.grad[1:].abs().max() == 0 and logits.grad[0].abs().max() > 0


def test_all_infeasible_gives_zero_loss():
    logits = torch.randn(2, 2, 4, requires_grad=True)
    res = qctc_loss(logits, torch.tensor([[1, 2, 3], [1, 1, 2]]), torch.tensor([3, 3]), BLANK)
    res.loss.backward()
    assert res.loss.item() == 0 and res.n_infeasible == 2 and torch.isfinite(logits.grad).all()


def test_nar_ce_supervises_first_queries():
    logits = torch.randn(2, 5, 6)
    targets = torch.tensor([[3, 4, 2], [5, 2, 1]])
    lengths = torch.tensor([3, 2])
    got = nar_ce_loss(logits, targets, lengths, pad_id=1)
    picks = [logits[0, 0].log_softmax(-1)[3], logits[0, 1].log_softmax(-1)[4], logits[0, 2].log_softmax(-1)[2],
             logits[1, 0].log_softmax(-1)[5], logits[1, 1].log_softmax(-1)[2]]
    torch.testing.assert_close(got, -torch.stack(picks).mean())


def test_ar_ce_ignores_pad_and_weights():
    logits = torch.randn(2, 3, 6)
    target = torch.tensor([[3, 4, 2], [5, 2, 1]])
    ref = F.cross_entropy(logits.transpose(1, 2), target, ignore_index=1)
    torch.testing.assert_close(ar_ce_loss(logits, target, pad_id=1), ref)
    tok = F.cross_entropy(logits.transpose(1, 2), target, ignore_index=1, reduction="none")
    w = torch.tensor([2.0, 0.5])
    torch.testing.assert_close(ar_ce_loss(logits, target, 1, weights=w), (tok * w[:, None]).sum() / 5)


def test_is_ctc_feasible_iff_torch_ctc_loss_is_finite():
    """The one-target feasibility rule agrees with torch's CTC: a finite loss exactly when N outputs can emit it."""
    gen = torch.Generator().manual_seed(0)
    blank, vocab = 0, 4
    for _ in range(60):
        t = int(torch.randint(1, 6, (1,), generator=gen))
        tokens = torch.randint(1, vocab, (t,), generator=gen).tolist()  # 3 symbols: repeats are common
        for n in range(1, 10):
            log_probs = torch.randn(n, 1, vocab, generator=gen).log_softmax(-1)
            loss = F.ctc_loss(log_probs, torch.tensor([tokens]), torch.tensor([n]), torch.tensor([t]), blank=blank,
                              reduction="none", zero_infinity=False)
            assert is_ctc_feasible(tokens, n) == bool(torch.isfinite(loss).item()), (tokens, n)
    assert is_ctc_feasible([5, 6, 2], 3) and not is_ctc_feasible([5, 5, 2], 3) and is_ctc_feasible([5, 5, 2], 4)
