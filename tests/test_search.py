"""Batched KV-cached greedy and beam search: beam 1 = greedy, batched = per sample, n-gram blocking, lengths."""

from __future__ import annotations

import pytest
import torch

from narvl_model.config import ModelConfig
from narvl_model.model import ARModel
from narvl_model.search import _no_repeat_ngram_mask, beam_search, greedy_search

V = 24


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model() -> ARModel:
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=32, encoder_layers=1, decoder_layers=2, heads=2, ffn_dim=64, backbone_width=8,
                      image_size=32, dropout=0.0, max_source_positions=16, max_target_positions=32,
                      rel_pos_buckets=8, image_rel_pos_max=4, vocab_size=V, blank_id=V - 1)
    m = ARModel(cfg).eval()
    with torch.no_grad():  # spread the random model's predictions so that hypotheses differ
        m.embed_tokens.weight.normal_(std=1.0)
    return m


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(1)
    image = torch.randn(4, 3, 32, 32, generator=g)
    src = torch.randint(4, 20, (4, 6), generator=g)
    src[1, 4:] = 1
    return image, src


def test_beam_one_equals_greedy(model, batch):
    assert beam_search(model, *batch, beam_size=1, max_len=10) == greedy_search(model, *batch, max_len=10)


@pytest.mark.parametrize("kw", [dict(beam_size=4), dict(beam_size=3, no_repeat_ngram=2, length_penalty=0.5)])
def test_batched_beam_equals_per_sample(model, batch, kw):
    image, src = batch
    batched = beam_search(model, image, src, max_len=12, **kw)
    single = []
    for i in range(4):
        s = src[i : i + 1]
        s = s[:, : int(s.ne(1).sum())]  # drop the padding
        single.append(beam_search(model, image[i : i + 1], s, max_len=12, **kw)[0])
    assert batched == single
    assert all(1 not in h and 0 not in h and 2 not in h and V - 1 not in h for h in batched)


def test_no_repeat_ngram_blocks_repeats(model, batch):
    out = beam_search(model, *batch, beam_size=3, max_len=16, no_repeat_ngram=2, min_len=16)
    for hyp in out:
        bigrams = list(zip(hyp, hyp[1:], strict=False))
        assert len(bigrams) == len(set(bigrams))


def test_min_and_max_len(model, batch):
    for out in (greedy_search(model, *batch, max_len=7, min_len=7),
                beam_search(model, *batch, beam_size=3, max_len=7, min_len=7)):
        assert all(len(h) == 7 for h in out)
    assert all(len(h) <= 5 for h in beam_search(model, *batch, beam_size=2, max_len=5))


def test_no_repeat_ngram_mask():
    hist = torch.tensor([[5, 6, 5, 7, 5], [1, 2, 3, 4, 2]])
    mask = _no_repeat_ngram_mask(hist, 2, 10)
    assert mask[0].nonzero().flatten().tolist() == [6, 7]
    assert mask[1].nonzero().flatten().tolist() == [3]
