"""narvl_model/inference.py: static-shape NARVL and AR searches give the tokens of the reference decoders
(search.py, decoding.ctc_greedy), eagerly, under torch.compile, and (marker `gpu`) on CUDA in bf16.

Tolerances: CPU fp32, compiled vs eager logits atol = rtol = 1e-4 (inductor reorders reductions); static-cache vs
growing-cache logits atol = rtol = 1e-5 (attention over the masked full cache sums the same terms plus zeros).
CUDA bf16: compiled vs eager logits atol = rtol = 5e-2 (bf16 keeps 8 significant bits and inductor fuses
differently); a hand-captured CUDA graph replays the eager kernels: tokens equal, logits atol = rtol = 1e-2.
CUDA fp32 (TF32 off): compiled and captured searches give search.py's and ctc_greedy's tokens.

Time on the 2-core CPU: 63 s with an empty inductor cache (up to 3 minutes when the machine is busy), almost
all of it compiling the three compiled variants (beam 5, greedy, NARVL).
"""

from __future__ import annotations

import pytest
import torch

from narvl_model.config import ModelConfig
from narvl_model.decoding import ctc_greedy
from narvl_model.inference import (
    NARVLRunner,
    StaticBeamSearch,
    StaticGreedySearch,
    ctc_collapse_padded,
    padded_to_lists,
)
from narvl_model.model import ARModel, NARVLModel
from narvl_model.search import beam_search, greedy_search

V, B, S, SIZE, MAX_LEN = 40, 3, 5, 32, 6  # vocab (blank = V - 1), batch, prompt tokens, pixels, AR output tokens


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_models(seed: int, eos_boost: float = 1.0, device: str = "cpu", dtype=torch.float32):
    """A random cpu-nano AR model (eos made likelier by eos_boost, so some outputs end early), its NARVL copy,
    and a batch whose second prompt is padded."""
    cfg = ModelConfig.from_name("cpu-nano", vocab_size=V, blank_id=V - 1, num_queries=12)
    torch.manual_seed(seed)
    ar = ARModel(cfg).eval()
    with torch.no_grad():
        ar.embed_tokens.weight[cfg.eos_id] *= eos_boost  # tied output projection: a larger eos logit
    nar = NARVLModel.from_ar(ar, 12).eval()
    image = torch.randn(B, 3, SIZE, SIZE)
    src = torch.randint(4, V - 1, (B, S))
    src[1, 3:] = cfg.pad_id
    return (ar.to(device, dtype), nar.to(device, dtype), image.to(device, dtype), src.to(device))


def test_ctc_collapse_padded_equals_ctc_greedy():
    g = torch.Generator().manual_seed(0)
    blank, eos, pad, bos = 9, 2, 1, 0
    ids = torch.randint(0, 10, (200, 12), generator=g)  # many repeats, blanks, eos, pad and bos
    ids[:5] = torch.tensor([[3, 3, 9, 3, 4, 4, 2, 5, 5, 9, 6, 6],  # "3 3 - 3 4 4 eos ..." -> 3 3 4
                            [9] * 12, [2] * 12, [1, 3, 1, 3, 0, 3, 3, 9, 9, 3, 4, 2],
                            [5, 6, 7, 8, 3, 4, 5, 6, 7, 8, 3, 4]])
    tokens, lengths = ctc_collapse_padded(ids, blank, eos, (pad, bos))
    expected = ctc_greedy(torch.nn.functional.one_hot(ids, 10).float(), blank, eos, pad, bos)
    assert padded_to_lists(tokens, lengths) == expected
    assert expected[:5] == [[3, 3, 4], [], [], [3, 3, 3, 3, 4], [5, 6, 7, 8, 3, 4, 5, 6, 7, 8, 3, 4]]
    assert (tokens.gather(1, lengths.clamp(max=11)[:, None])[lengths < 12] == pad).all()  # padded with pad


@pytest.mark.parametrize("seed,eos_boost,min_len", [(0, 1.0, 0), (0, 2.0, 0), (1, 1.5, 3)])
def test_static_greedy_equals_greedy_search(seed, eos_boost, min_len):
    ar, _, image, src = tiny_models(seed, eos_boost)
    expected = greedy_search(ar, image, src, MAX_LEN, min_len=min_len)
    search = StaticGreedySearch(ar, B, SIZE, S, MAX_LEN, min_len=min_len, record_logits=True)
    for sync_every in (0, 1, 4):
        assert padded_to_lists(*search(image, src, sync_every=sync_every)) == expected
    if eos_boost > 1 and min_len == 0:
        assert min(map(len, expected)) < MAX_LEN, "the eos boost should end some outputs early"

    # step logits against ARModel.decode_step (a growing slice of the cache) on the same tokens
    search(image, src, sync_every=0)
    with torch.no_grad():
        enc = ar.encode(image, src)
        state = ar.init_state(enc, MAX_LEN + 1)
        prev = torch.full((B,), ar.cfg.bos_id)
        for t in range(MAX_LEN + 1):
            ref = ar.decode_step(prev, enc, state)
            torch.testing.assert_close(search.logits[t], ref, atol=1e-5, rtol=1e-5)
            prev = search.tokens[:, t]


@pytest.mark.parametrize("seed,eos_boost,ngram,penalty,min_len", [(0, 1.5, 3, 1.0, 0), (2, 2.5, 2, 0.5, 0),
                                                                   (3, 2.5, 0, 1.0, 2), (0, 2.0, 3, 2.0, 0)])
def test_static_beam_equals_beam_search(seed, eos_boost, ngram, penalty, min_len):
    ar, _, image, src = tiny_models(seed, eos_boost)
    expected = beam_search(ar, image, src, 5, MAX_LEN, length_penalty=penalty, no_repeat_ngram=ngram,
                           min_len=min_len)
    search = StaticBeamSearch(ar, B, SIZE, S, 5, MAX_LEN, penalty, ngram, min_len)
    for sync_every in (0, 1, 3):
        assert padded_to_lists(*search(image, src, sync_every=sync_every)) == expected
    if min_len == 0:
        assert len(set(map(len, expected))) > 1, "outputs of different lengths: some beams finish early"


def test_narvl_runner_equals_ctc_greedy():
    _, nar, image, src = tiny_models(0)
    runner = NARVLRunner(nar, B, SIZE, S, record_logits=True)
    tokens, lengths = runner(image, src)
    with torch.no_grad():
        logits = nar(image, src)
    torch.testing.assert_close(runner.logits, logits)
    assert padded_to_lists(tokens, lengths) == ctc_greedy(logits, V - 1, nar.cfg.eos_id)
    assert tokens.device == image.device and lengths.shape == (B,)

    enc_input = NARVLModel.from_ar(tiny_models(0)[0], 12, decoder_input="encoder").eval()  # tables 6-7 ablation
    tokens, lengths = NARVLRunner(enc_input, B, SIZE, S)(image, src)
    with torch.no_grad():
        assert padded_to_lists(tokens, lengths) == ctc_greedy(enc_input(image, src), V - 1, nar.cfg.eos_id)
    assert tokens.shape == (B, (SIZE // 16) ** 2 + S)


def test_unknown_mode_is_an_error():
    ar, _, _, _ = tiny_models(0)
    with pytest.raises(ValueError, match="unknown mode 'fast'"):
        StaticGreedySearch(ar, B, SIZE, S, MAX_LEN, mode="fast")


# ---- compiled (torch.compile; "reduce-overhead" is plain inductor code on CPU) ----------------------------------


def test_compiled_beam5_equals_eager():
    ar, _, image, src = tiny_models(0, eos_boost=1.5)  # outputs of 3, 6 and 2 tokens
    args = (ar, B, SIZE, S, 5, MAX_LEN, 1.0, 3)
    eager = StaticBeamSearch(*args, record_logits=True)
    compiled = StaticBeamSearch(*args, mode="reduce-overhead", record_logits=True)
    out = compiled(image, src, sync_every=0)
    assert padded_to_lists(*out) == padded_to_lists(*eager(image, src, sync_every=0))
    assert padded_to_lists(*out) == beam_search(ar, image, src, 5, MAX_LEN, no_repeat_ngram=3)
    torch.testing.assert_close(compiled.logits, eager.logits, atol=1e-4, rtol=1e-4)
    image2 = torch.randn_like(image)  # a second input through the same compiled steps
    assert padded_to_lists(*compiled(image2, src)) == beam_search(ar, image2, src, 5, MAX_LEN, no_repeat_ngram=3)


def test_compiled_greedy_equals_eager():
    ar, _, image, src = tiny_models(0, eos_boost=2.0)  # outputs of 0, 6 and 1 tokens
    eager = StaticGreedySearch(ar, B, SIZE, S, MAX_LEN, record_logits=True)
    compiled = StaticGreedySearch(ar, B, SIZE, S, MAX_LEN, mode="compile", record_logits=True)
    out = compiled(image, src, sync_every=0)
    assert padded_to_lists(*out) == padded_to_lists(*eager(image, src, sync_every=0))
    assert padded_to_lists(*out) == greedy_search(ar, image, src, MAX_LEN)
    torch.testing.assert_close(compiled.logits, eager.logits, atol=1e-4, rtol=1e-4)


def test_compiled_narvl_equals_eager():
    _, nar, image, src = tiny_models(3)
    eager = NARVLRunner(nar, B, SIZE, S, record_logits=True)
    compiled = NARVLRunner(nar, B, SIZE, S, mode="reduce-overhead", record_logits=True)
    tokens, lengths = compiled(image, src)
    assert padded_to_lists(tokens, lengths) == padded_to_lists(*eager(image, src))
    torch.testing.assert_close(compiled.logits, eager.logits, atol=1e-4, rtol=1e-4)
    assert lengths.sum() > 0


# ---- CUDA (marker gpu) -------------------------------------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("mode", ["reduce-overhead", "cuda-graph"])
def test_cuda_fp32_searches_equal_reference(mode, monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    ar, nar, image, src = tiny_models(0, eos_boost=1.5, device="cuda")
    beam = StaticBeamSearch(ar, B, SIZE, S, 5, MAX_LEN, 1.0, 3, mode=mode)
    greedy = StaticGreedySearch(ar, B, SIZE, S, MAX_LEN, mode=mode)
    narvl = NARVLRunner(nar, B, SIZE, S, mode=mode)
    for _ in range(2):  # the second call replays the recorded graphs
        assert padded_to_lists(*beam(image, src)) == beam_search(ar, image, src, 5, MAX_LEN, no_repeat_ngram=3)
        assert padded_to_lists(*greedy(image, src)) == greedy_search(ar, image, src, MAX_LEN)
        with torch.no_grad():
            assert padded_to_lists(*narvl(image, src)) == ctc_greedy(nar(image, src), V - 1, nar.cfg.eos_id)


@pytest.mark.gpu
@cuda
def test_cuda_bf16_compiled_and_graphs_match_eager():
    ar, nar, image, src = tiny_models(0, eos_boost=1.5, device="cuda", dtype=torch.bfloat16)
    for make in (lambda mode: StaticBeamSearch(ar, B, SIZE, S, 5, MAX_LEN, 1.0, 3, mode=mode, record_logits=True),
                 lambda mode: StaticGreedySearch(ar, B, SIZE, S, MAX_LEN, mode=mode, record_logits=True),
                 lambda mode: NARVLRunner(nar, B, SIZE, S, mode=mode, record_logits=True)):
        eager, graph, compiled = make("eager"), make("cuda-graph"), make("reduce-overhead")
        ref = padded_to_lists(*eager(image, src))
        assert padded_to_lists(*graph(image, src)) == ref  # the eager kernels, replayed
        torch.testing.assert_close(graph.logits, eager.logits, atol=1e-2, rtol=1e-2)
        compiled(image, src)
        first = slice(None) if isinstance(eager, NARVLRunner) else 0  # AR: later steps follow the chosen tokens
        torch.testing.assert_close(compiled.logits[first], eager.logits[first], atol=5e-2, rtol=5e-2)
