"""NARVL vs the AR baseline with the fast inference paths of narvl_model/inference.py, eager and compiled, and
the targets of issue 15 (paper section 4.1 / table 1 speed-ups, table 10 query scaling).

    python3 -m bench.gpu_latency --preset base                       # a GPU, bf16: what bench/gpu_check.sh runs
    python3 -m bench.gpu_latency --preset cpu-small --tasks caption --sections latency   # CPU: eager vs compile

Prints (b) batch-1 latency per task (AR beam 5, AR greedy, NARVL; one row per mode; mean / p50 / p90 ms and
speed-ups), with one raw encoder pass and one raw decoder pass for the overhead target; (c) NARVL latency vs the
number of queries; (d) batched throughput; then PASS/FAIL per target (ratios first, they carry across GPUs).
Modes: eager; cuda-graph (the eager kernels captured once by hand and replayed); reduce-overhead
(torch.compile with CUDA graphs); compile (torch.compile, default mode: the CPU variant). The torch.compile
modes run last and only for --inductor-tasks (captioning by default): each variant compiles for a minute or more.

Random weights. The AR searches are forced to the task's output length (EOS banned before max_len, as in
bench/model_latency.py) and run without early-stop checks, so every mode does the same number of steps; beam
search bans repeated 3-grams as OFA does. Every timed call ends with the tokens read to the host. A variant that
fails prints its error and the run goes on; --budget-s skips what is left once the time is spent.
"""

from __future__ import annotations

import argparse
import json
import time
import traceback
from collections.abc import Callable

import torch

from bench.model_latency import summary, timed
from narvl_model.config import OFA_VOCAB_SIZE, ModelConfig
from narvl_model.inference import NARVLRunner, StaticBeamSearch, StaticGreedySearch, compile_step
from narvl_model.model import ARModel, NARVLModel, count_parameters
from narvl_model.search import beam_search

# task -> (AR output tokens: ar_max_len of configs/pipelines/paper_base_*.yaml; LQT queries: the paper's;
#          prompt tokens: about the length of the task's instruction + input text in BPE tokens)
TASKS = {"caption": (16, 20, 8), "vqa": (8, 6, 14), "grounding": (4, 5, 16), "entailment": (2, 2, 28)}
PAPER_SPEEDUP = {"caption": 7.2, "grounding": 2.4, "entailment": 1.4}  # NARVL vs AR beam 5 (issue 15, table 1)
OVERHEAD_MAX, QUERY_SCALING_MAX, H_CLASS_CAPTION_MS = 1.10, 1.18, 10.0


class Budget:
    """Wall-clock budget: `ok()` is False once the deadline has passed (what is left is skipped)."""

    def __init__(self, seconds: float):
        self.deadline = time.perf_counter() + seconds

    def ok(self) -> bool:
        return time.perf_counter() < self.deadline


def measure(name: str, build: Callable[[], Callable[[], object]], iters: int, device: torch.device,
            budget: Budget, warmup: int = 3) -> list[float] | None:
    """Build a variant (compiling it), call it `warmup` times, then time `iters` calls; None when it fails."""
    if not budget.ok():
        print(f"  {name}: skipped (time budget spent)", flush=True)
        return None
    try:
        t0 = time.perf_counter()
        fn = build()
        for _ in range(warmup):
            fn()
        setup_s = time.perf_counter() - t0
        ms = timed(fn, iters, device)
    except Exception as e:  # a variant that fails on this machine must not hide the others
        print(f"  {name}: FAILED {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", flush=True)
        traceback.print_exc(limit=3)
        return None
    if setup_s > 5:
        print(f"  ({name}: build + warm-up {setup_s:.0f} s)", flush=True)
    return ms


def row(label: str, ms: list[float] | None, ref: dict[str, float | None] | None = None) -> None:
    """One table row; `ref` maps a name to a reference mean (ms): printed as the speed-up reference / this row."""
    if ms is None:
        print(f"  {label:<34} {'-':>9}", flush=True)
        return
    mean, p50, p90 = summary(ms)
    extra = "".join(f"  {k} {v / mean:.2f}x" for k, v in (ref or {}).items() if v)
    print(f"  {label:<34} {mean:>9.2f} {p50:>9.2f} {p90:>9.2f}{extra}", flush=True)


def mean_of(ms: list[float] | None) -> float | None:
    return None if ms is None else summary(ms)[0]


class Bench:
    """The models and inputs of one preset on one device, and the variants built from them."""

    def __init__(self, args: argparse.Namespace, device: torch.device, dtype: torch.dtype):
        self.args, self.device, self.dtype = args, device, dtype
        self.cfg = ModelConfig.from_name(args.preset, vocab_size=args.vocab_size + 1, blank_id=args.vocab_size,
                                         dropout=0.0, drop_path=0.0, max_queries=max(1024, *args.queries))
        self.size = args.image_size or self.cfg.image_size
        torch.manual_seed(0)
        self.ar = ARModel(self.cfg).to(device, dtype).eval()
        self._nar: dict[int, NARVLModel] = {}

    def inputs(self, batch: int, src_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(batch * 1000 + src_len)
        image = torch.randn(batch, 3, self.size, self.size, generator=g).to(self.device, self.dtype)
        src = torch.randint(4, self.args.vocab_size, (batch, src_len), generator=g).to(self.device)
        return image, src

    def nar(self, n: int) -> NARVLModel:
        if n not in self._nar:
            self._nar[n] = NARVLModel.from_ar(self.ar, n).to(self.dtype).eval()  # from_ar builds in fp32
        return self._nar[n]

    # variants: each returns a builder of a no-argument callable that ends with the result on the host
    def beam(self, batch: int, task: str, mode: str) -> Callable[[], Callable[[], object]]:
        max_len, _, s = TASKS[task]
        image, src = self.inputs(batch, s)

        def build():
            search = StaticBeamSearch(self.ar, batch, self.size, s, 5, max_len, 1.0, 3, min_len=max_len, mode=mode)
            return lambda: search(image, src, sync_every=0)[0].cpu()
        return build

    def beam_reference(self, task: str) -> Callable[[], Callable[[], object]]:
        """narvl_model.search.beam_search (growing cache slices, host checks every step): the pre-issue baseline."""
        max_len, _, s = TASKS[task]
        image, src = self.inputs(1, s)
        return lambda: lambda: beam_search(self.ar, image, src, 5, max_len, no_repeat_ngram=3, min_len=max_len)

    def greedy(self, batch: int, task: str, mode: str) -> Callable[[], Callable[[], object]]:
        max_len, _, s = TASKS[task]
        image, src = self.inputs(batch, s)

        def build():
            search = StaticGreedySearch(self.ar, batch, self.size, s, max_len, min_len=max_len, mode=mode)
            return lambda: search(image, src, sync_every=0)[0].cpu()
        return build

    def narvl(self, batch: int, task: str, mode: str, n: int | None = None) -> Callable[[], Callable[[], object]]:
        _, n_task, s = TASKS[task]
        image, src = self.inputs(batch, s)

        def build():
            runner = NARVLRunner(self.nar(n or n_task), batch, self.size, s, mode=mode)
            return lambda: runner(image, src)[0].cpu()
        return build

    def raw_passes(self, task: str, mode: str) -> tuple[Callable, Callable]:
        """One encoder pass and one decoder pass (+ output projection) of the task's NARVL, no decoding."""
        _, n, s = TASKS[task]
        image, src = self.inputs(1, s)
        model = self.nar(n)

        def build_encoder():
            with torch.no_grad():
                states = model.encode(image, src).states.clone()

            @torch.no_grad()
            def step() -> None:
                states.copy_(model.encode(image, src).states)
            torch._dynamo.mark_static_address(states)
            return compile_step(step, mode)

        def build_decoder():
            with torch.no_grad():
                enc = model.encode(image, src)
                queries = model.queries.weight.unsqueeze(0).clone()  # (1, N, D)
                logits = model.output_logits(model.decoder(queries, enc)).clone()

            @torch.no_grad()
            def step() -> None:
                logits.copy_(model.output_logits(model.decoder(queries, enc)))
            for t in (logits, queries, enc.states, enc.padding_mask, enc.pos_embed):
                torch._dynamo.mark_static_address(t)
            return compile_step(step, mode)
        return build_encoder, build_decoder


def latency_table(b: Bench, budget: Budget, results: dict, modes: list[str], tasks: list[str], title: str) -> None:
    """Rows per task and mode; then each compiled mode's speed-up over eager (when eager was measured)."""
    args, dev = b.args, b.device
    print(f"\n{title}, preset {args.preset} ({count_parameters(b.ar) / 1e6:.0f}M parameters, {b.size} px, "
          f"vocab {b.cfg.vocab_size}, {str(b.dtype).removeprefix('torch.')}), {args.iters} timed calls after warm-up")
    print(f"  {'task / method / mode':<34} {'mean ms':>9} {'p50 ms':>9} {'p90 ms':>9}  speed-ups of this row")
    for task in tasks:
        max_len, n, s = TASKS[task]
        print(f"  -- {task}: AR {max_len} tokens + eos, NARVL {n} queries, prompt {s} tokens")
        res = results.setdefault(task, {})
        if "eager" in modes:
            ms = measure("AR beam 5 search.py", b.beam_reference(task), args.iters, dev, budget, warmup=1)
            res["beam5_search_py"] = mean_of(ms)
            row("AR beam 5 (search.py) eager", ms)
        for mode in modes:
            beam = measure(f"{task} beam {mode}", b.beam(1, task, mode), args.iters, dev, budget)
            greedy = measure(f"{task} greedy {mode}", b.greedy(1, task, mode), args.iters, dev, budget)
            nar = measure(f"{task} NARVL {mode}", b.narvl(1, task, mode), args.iters, dev, budget)
            build_enc, build_dec = b.raw_passes(task, mode)
            enc = measure(f"{task} encoder {mode}", build_enc, args.iters, dev, budget)
            dec = measure(f"{task} decoder {mode}", build_dec, args.iters, dev, budget)
            res[mode] = {k: mean_of(v) for k, v in
                         dict(beam5=beam, greedy=greedy, narvl=nar, encoder=enc, decoder=dec).items()}
            row(f"AR beam 5 {mode}", beam)
            row(f"AR greedy {mode}", greedy, {"beam5/this": mean_of(beam)})
            row(f"NARVL {mode}", nar, {"beam5/this": mean_of(beam), "greedy/this": mean_of(greedy)})
            row(f"raw encoder pass {mode}", enc)
            row(f"raw decoder pass {mode}", dec)
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        for mode in (m for m in modes if m != "eager"):
            e, c = res.get("eager", {}), res[mode]
            parts = [f"{k} {e[k] / c[k]:.2f}x" for k in ("beam5", "greedy", "narvl") if e.get(k) and c.get(k)]
            print(f"  {mode} vs eager: " + (", ".join(parts) or "-"))


def query_sweep(b: Bench, budget: Budget, results: dict) -> None:
    args = b.args
    print(f"\n(c) NARVL latency vs the number of queries (caption prompt, batch 1, {args.iters} calls)")
    print(f"  {'queries / mode':<34} {'mean ms':>9} {'p50 ms':>9} {'p90 ms':>9}  vs the fewest queries")
    sweep = results.setdefault("queries", {})
    for mode in args.sweep_modes:
        first = None
        for n in args.queries:
            ms = measure(f"NARVL N={n} {mode}", b.narvl(1, "caption", mode, n), args.iters, b.device, budget)
            sweep.setdefault(mode, {})[n] = mean_of(ms)
            first = first or mean_of(ms)
            slower = f"  {mean_of(ms) / first:.3f}x" if ms and first else ""
            if ms is None:
                row(f"N={n} {mode}", ms)
            else:
                print(f"  {f'N={n} {mode}':<34} {summary(ms)[0]:>9.2f} {summary(ms)[1]:>9.2f} {summary(ms)[2]:>9.2f}"
                      f"{slower}", flush=True)
            if b.device.type == "cuda":
                torch.cuda.empty_cache()


def throughput(b: Bench, budget: Budget, results: dict) -> None:
    args = b.args
    mode = args.throughput_mode
    print(f"\n(d) captioning throughput, samples/s ({mode}; {args.throughput_iters} timed calls per cell)")
    print(f"  {'batch':>6} {'AR beam 5':>12} {'AR greedy':>12} {'NARVL':>12}  NARVL vs beam5")
    tp = results.setdefault("throughput", {})
    for batch in args.batches:
        cells = {}
        for name, build in (("beam5", b.beam(batch, "caption", mode)), ("greedy", b.greedy(batch, "caption", mode)),
                            ("narvl", b.narvl(batch, "caption", mode))):
            ms = measure(f"batch {batch} {name}", build, args.throughput_iters, b.device, budget, warmup=2)
            cells[name] = None if ms is None else batch / (summary(ms)[0] / 1e3)
        tp[batch] = cells
        f = [f"{cells[k]:>12.1f}" if cells[k] else f"{'-':>12}" for k in ("beam5", "greedy", "narvl")]
        ratio = f"{cells['narvl'] / cells['beam5']:.1f}x" if cells["narvl"] and cells["beam5"] else "-"
        print(f"  {batch:>6} {' '.join(f)}  {ratio}", flush=True)
        if b.device.type == "cuda":
            torch.cuda.empty_cache()


def targets(b: Bench, results: dict) -> list[tuple[str, bool | None, str]]:
    """(name, passed or None when not measured / not applicable, figures) for each issue-15 target."""
    args, out = b.args, []
    compiled = [m for m in args.modes if m != "eager"] or args.modes

    def best(task: str, key: str, modes: list[str]) -> tuple[float | None, str]:
        vals = [(results[task][m][key], m) for m in modes if results.get(task, {}).get(m, {}).get(key)]
        return min(vals) if vals else (None, "-")

    for task, factor in PAPER_SPEEDUP.items():
        if task not in args.tasks:
            continue
        beam, bm = best(task, "beam5", compiled)
        nar, nm = best(task, "narvl", args.modes)
        ok = None if not (beam and nar) else beam / nar >= factor
        figs = f"{beam / nar:.2f}x (AR beam 5 {bm} {beam:.2f} ms / NARVL {nm} {nar:.2f} ms)" if ok is not None else "-"
        out.append((f"{task}: NARVL vs compiled AR beam 5 >= {factor}x", ok, figs))
    for task in args.tasks:
        nar, m = best(task, "narvl", args.modes)
        r = results.get(task, {}).get(m, {})
        raw = (r.get("encoder") or 0) + (r.get("decoder") or 0)
        ok = None if not (nar and r.get("encoder") and r.get("decoder")) else nar / raw <= OVERHEAD_MAX
        figs = f"{nar / raw:.3f}x (NARVL {m} {nar:.2f} ms / encoder + decoder {raw:.2f} ms)" if ok is not None else "-"
        out.append((f"{task}: NARVL <= {OVERHEAD_MAX}x raw encoder + decoder pass", ok, figs))
    lo, hi = min(args.queries), max(args.queries)
    for mode, sweep in results.get("queries", {}).items():
        a, z = sweep.get(lo), sweep.get(hi)
        ok = None if not (a and z) else z / a <= QUERY_SCALING_MAX
        figs = f"{z / a:.3f}x ({z:.2f} / {a:.2f} ms)" if ok is not None else "-"
        out.append((f"NARVL N={hi} <= {QUERY_SCALING_MAX}x N={lo} ({mode})", ok, figs))
    name = torch.cuda.get_device_name() if b.device.type == "cuda" else "cpu"
    nar, m = best("caption", "narvl", args.modes) if "caption" in args.tasks else (None, "-")
    if args.preset == "base" and any(h in name for h in ("H100", "H200")) and nar:
        out.append((f"base captioning NARVL batch 1 <= {H_CLASS_CAPTION_MS} ms on an H100/H200",
                    nar <= H_CLASS_CAPTION_MS, f"{nar:.2f} ms ({m})"))
    else:
        out.append((f"base captioning NARVL batch 1 <= {H_CLASS_CAPTION_MS} ms on an H100/H200", None,
                    f"n/a here ({name}, preset {args.preset})"))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    cuda = torch.cuda.is_available()
    ap.add_argument("--preset", default="base")
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    ap.add_argument("--modes", nargs="+", default=["eager", "cuda-graph", "reduce-overhead"] if cuda
                    else ["eager", "compile"], help="the first is the reference for the compiled-vs-eager ratios")
    ap.add_argument("--inductor-tasks", nargs="+", default=["caption"], choices=list(TASKS),
                    help="tasks timed with the torch.compile modes (each compile takes a minute or more)")
    ap.add_argument("--sweep-modes", nargs="+", default=["eager", "cuda-graph"] if cuda else ["eager"])
    ap.add_argument("--throughput-mode", default="cuda-graph" if cuda else "eager")
    ap.add_argument("--queries", type=int, nargs="+", default=[10, 20, 100, 500, 1000])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 128] if cuda else [1, 8])
    ap.add_argument("--iters", type=int, default=30 if cuda else 5)
    ap.add_argument("--throughput-iters", type=int, default=5 if cuda else 2)
    ap.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16" if cuda else "fp32")
    ap.add_argument("--vocab-size", type=int, default=OFA_VOCAB_SIZE, help="output vocabulary (+1 for the blank)")
    ap.add_argument("--image-size", type=int, default=None, help="default: the preset's (base: 480)")
    ap.add_argument("--sections", nargs="+", default=["latency", "queries", "throughput"],
                    choices=["latency", "queries", "throughput"])
    ap.add_argument("--budget-s", type=float, default=1e9, help="skip what is left after this many seconds")
    ap.add_argument("--json", default=None, help="also write the figures here")
    args = ap.parse_args()

    device = torch.device("cuda" if cuda else "cpu")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    if cuda:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    name = torch.cuda.get_device_name() if cuda else f"cpu ({torch.get_num_threads()} threads)"
    print(f"device: {name}; torch {torch.__version__}; modes {args.modes}")
    budget, b, results = Budget(args.budget_s), Bench(args, device, dtype), {}
    with torch.no_grad():
        cheap = [m for m in args.modes if m in ("eager", "cuda-graph")]
        inductor = [m for m in args.modes if m not in cheap]
        if "latency" in args.sections:
            latency_table(b, budget, results, cheap, args.tasks, "(b) batch-1 latency")
        if "queries" in args.sections:
            query_sweep(b, budget, results)
        if "throughput" in args.sections:
            throughput(b, budget, results)
        if "latency" in args.sections and inductor:  # last: compiling is the slow part
            latency_table(b, budget, results, inductor, [t for t in args.tasks if t in args.inductor_tasks],
                          "(b, continued) batch-1 latency with torch.compile")
    print("\ntargets (issue 15)")
    checks = targets(b, results)
    for label, ok, figs in checks:
        verdict = "n/a " if ok is None else ("PASS" if ok else "FAIL")
        print(f"  {verdict} {label}: {figs}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "args": vars(args), "results": results,
                       "targets": [dict(target=t, passed=ok, figures=fi) for t, ok, fi in checks]}, f, indent=1,
                      default=str)


if __name__ == "__main__":
    main()
