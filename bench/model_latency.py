"""Batch-1 latency of AR (greedy, beam 5) vs NARVL (one pass) with random weights (paper section 4.1, table 1).

    python bench/model_latency.py --preset cpu-tiny --preset base --iters 5

Timing: CUDA when available (synchronised before reading the clock), else CPU; the first iteration is dropped
(warm-up). The AR searches are forced to run exactly --max-len steps (+ the eos step): EOS is banned before
max_len (min_len = max_len), so random weights cannot end a search early and both searches do the work of a
max_len-token output. NARVL runs one encoder + one decoder pass for each N in --queries; with --encoder-input
also with the encoder output (image + prompt tokens) as the decoder input instead of the queries.
Not a test: it prints a table.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from functools import partial

import torch

from narvl_model.config import OFA_VOCAB_SIZE, ModelConfig
from narvl_model.model import ARModel, NARVLModel, count_parameters
from narvl_model.search import beam_search, greedy_search


def timed(fn: Callable[[], object], iters: int, device: torch.device) -> list[float]:
    """Milliseconds per call for iters + 1 calls, the first (warm-up) dropped."""
    out = []
    for _ in range(iters + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        out.append((time.perf_counter() - t0) * 1e3)
    return out[1:]


def summary(ms: list[float]) -> tuple[float, float, float]:
    s = sorted(ms)
    p90 = s[min(len(s) - 1, round(0.9 * (len(s) - 1)))]
    return statistics.mean(s), statistics.median(s), p90


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", action="append", required=True, help="model preset (repeatable)")
    ap.add_argument("--iters", type=int, default=10, help="timed iterations per row (after one warm-up)")
    ap.add_argument("--max-len", type=int, default=16, help="AR output tokens (forced)")
    ap.add_argument("--queries", type=int, nargs="+", default=[10, 20, 100, 500, 1000])
    ap.add_argument("--prompt-len", type=int, default=10)
    ap.add_argument("--vocab-size", type=int, default=OFA_VOCAB_SIZE,
                    help="output vocabulary (default OFA's; the built-in benchmark's is about 1,100)")
    ap.add_argument("--encoder-input", action="store_true",
                    help="also time NARVL with the encoder output as decoder input (tables 6-7)")
    ap.add_argument("--image-size", type=int, default=None, help="default: the preset's image_size")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"device: {name}; batch 1; {args.iters} timed iterations after 1 warm-up; AR forced to "
          f"{args.max_len} tokens")
    header = f"{'preset':<10} {'params':>8} {'method':<16} {'mean ms':>9} {'p50 ms':>9} {'p90 ms':>9} " \
             f"{'speedup vs beam5':>17} {'vs greedy':>10}"
    print(header)
    print("-" * len(header))
    for preset in args.preset:
        bench_preset(preset, args, device)
        if device.type == "cuda":
            torch.cuda.empty_cache()


def bench_preset(preset: str, args: argparse.Namespace, device: torch.device) -> None:
    """Print one row per method for one preset."""
    cfg = ModelConfig.from_name(preset, vocab_size=args.vocab_size + 1, blank_id=args.vocab_size, dropout=0.0,
                                drop_path=0.0, max_queries=max(1024, *args.queries))
    size = args.image_size or cfg.image_size
    g = torch.Generator().manual_seed(0)
    image = torch.randn(1, 3, size, size, generator=g).to(device)
    src = torch.randint(4, args.vocab_size, (1, args.prompt_len), generator=g).to(device)
    torch.manual_seed(0)
    ar = ARModel(cfg).to(device).eval()
    greedy = partial(greedy_search, ar, image, src, args.max_len, min_len=args.max_len)
    beam = partial(beam_search, ar, image, src, 5, args.max_len, no_repeat_ngram=3, min_len=args.max_len)
    with torch.inference_mode():
        rows = [("AR greedy", timed(greedy, args.iters, device)), ("AR beam 5", timed(beam, args.iters, device))]
        for n in args.queries:
            nar = NARVLModel.from_ar(ar, n).eval()
            rows.append((f"NARVL N={n}", timed(partial(nar, image, src), args.iters, device)))
        if args.encoder_input:
            enc = NARVLModel.from_ar(ar, max(args.queries), decoder_input="encoder").eval()
            rows.append(("NARVL enc-input", timed(partial(enc, image, src), args.iters, device)))
    n_params = count_parameters(ar) / 1e6
    greedy_mean, beam_mean = summary(rows[0][1])[0], summary(rows[1][1])[0]
    for method, ms in rows:
        mean, p50, p90 = summary(ms)
        print(f"{preset:<10} {n_params:>7.1f}M {method:<16} {mean:>9.2f} {p50:>9.2f} {p90:>9.2f} "
              f"{beam_mean / mean:>16.2f}x {greedy_mean / mean:>9.2f}x", flush=True)

if __name__ == "__main__":
    main()
