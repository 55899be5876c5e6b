"""CTC collapse, greedy and prefix beam decoding, box parsing."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from narvl_model.decoding import bins_to_box, ctc_collapse, ctc_greedy, ctc_prefix_beam_search, strip_special

pytestmark = pytest.mark.usefixtures("one_thread")


def test_collapse_merges_then_drops_blanks():
    assert ctc_collapse([0, 5, 5, 0, 5, 7, 7, 0], blank_id=0) == [5, 5, 7]
    assert ctc_collapse(torch.tensor([3, 3, 3]), blank_id=0) == [3]
    assert ctc_collapse([], blank_id=0) == []


def test_ctc_greedy_cuts_at_eos_and_drops_specials():
    v, blank, eos = 10, 9, 2
    rows = [[9, 5, 5, 9, 5, 2, 7], [0, 6, 1, 6, 6, 9, 9]]
    logits = torch.nn.functional.one_hot(torch.tensor(rows), v).float()
    assert ctc_greedy(logits, blank_id=blank, eos_id=eos) == [[5, 5], [6, 6]]
    assert strip_special([4, 1, 2, 5], eos_id=2, drop=[1]) == [4]


def test_prefix_beam_search_finds_most_probable_collapsed_sequence():
    g = torch.Generator().manual_seed(3)
    n, v, blank = 4, 3, 0
    lp = (torch.randn(n, v, generator=g) * 2).log_softmax(-1)
    totals: dict[tuple, float] = {}
    for path in itertools.product(range(v), repeat=n):
        key = tuple(ctc_collapse(path, blank))
        p = math.exp(lp[range(n), list(path)].sum().item())
        totals[key] = totals.get(key, 0.0) + p
    best = max(totals, key=totals.get)
    assert tuple(ctc_prefix_beam_search(lp, blank, beam_size=16)) == best


def test_bins_to_box():
    start, bins = 100, 1000
    assert bins_to_box([100, 100 + 999, 100 + 999, 100], start, bins, 640, 480) == (0.0, 480.0, 640.0, 0.0)
    assert bins_to_box([100, 101, 102], start, bins, 10, 10) is None
    assert bins_to_box([100, 101, 102, 5], start, bins, 10, 10) is None
    assert bins_to_box([100, 101, 102, 103, 104], start, bins, 10, 10) is None
