"""benchmark: batch-1 latency of the AR teacher (beam and greedy) and NARVL (one pass + greedy CTC) on the same
device, as in the paper's section 4.1, plus batched throughput.

Batch-1 latency: `num_samples` test samples one at a time, the first dropped (warm-up); on a GPU the clock is read
after `torch.cuda.synchronize()`. Throughput: samples/s at each of `batch_sizes` (the test samples tiled to fill
a batch). Writes `latency.json`.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from stages.common import StageLog, write_json_atomic
from stages.config import BenchmarkStage

VERSION = 2  # 2: the NARVL decoding from the model's config


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Callable[[], object], device: torch.device) -> float:
    """Milliseconds of one call, synchronised on GPUs."""
    _sync(device)
    t = time.perf_counter()
    fn()
    _sync(device)
    return (time.perf_counter() - t) * 1000.0


def _stats(ms: list[float]) -> dict[str, float]:
    s = sorted(ms)
    return {"mean_ms": statistics.fmean(s), "p50_ms": s[len(s) // 2],
            "p90_ms": s[min(len(s) - 1, int(0.9 * len(s)))], "n": len(s)}


OUTPUT = "latency.json"
PAPER_AR = "ar_beam"  # the paper's AR latency is beam search


def mean_latency_ms(latency: dict, kind: str) -> float | None:
    """Batch-1 mean latency (ms) of "ar" (beam search, as in the paper) or "narvl" from a latency.json."""
    entry = latency.get("latency", {}).get(PAPER_AR if kind == "ar" else kind, {})
    value = entry.get("mean_ms") if isinstance(entry, dict) else None
    return float(value) if isinstance(value, int | float) else None


@dataclass(frozen=True)
class Inputs:
    data: Path  # prepare_data
    ar: Path  # train_teacher
    narvl: Path  # train_nar


def run(cfg: BenchmarkStage, inputs: Inputs, out_dir: Path, log: StageLog) -> dict:
    """Time the AR teacher and the NARVL model on the test split.

    Args:
        cfg: task and benchmark settings (samples, AR beam/max length, batch sizes, device, threads).
        inputs: the data, the AR teacher and the NARVL model.
        out_dir: where latency.json goes.
        log: the stage log.
    """
    from narvl_model.checkpoint import load_model
    from narvl_model.tokenizer import Tokenizer
    from stages.data.shards import make_loader
    from stages.evaluate import decode_batch, pick_device

    bc = cfg.benchmark
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if bc.threads:
        torch.set_num_threads(bc.threads)
    device = pick_device(bc.device)
    label = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"cpu ({torch.get_num_threads()} threads)")
    data_dir = Path(inputs.data)
    tok = Tokenizer.load(data_dir / "tokenizer")
    ar = load_model(Path(inputs.ar) / "checkpoint").to(device).eval()
    nar = load_model(Path(inputs.narvl) / "checkpoint").to(device).eval()
    if ar.cfg.image_size != nar.cfg.image_size:
        raise ValueError(f"AR image size {ar.cfg.image_size} != NARVL {nar.cfg.image_size}")
    split = "test" if (data_dir / "test").exists() else "val"  # converted real data may have no test split
    loader = make_loader(data_dir / split, tok, cfg.task, 1, train=False, num_workers=0, rank=0, world_size=1,
                         image_size=ar.cfg.image_size, max_source_len=ar.cfg.max_source_positions)
    singles = []
    for b in loader:
        singles.append((b.image.to(device), b.src_tokens.to(device)))
        if len(singles) >= bc.num_samples:
            break
    if len(singles) < 2:
        raise ValueError(f"benchmark: need >= 2 test samples, found {len(singles)}")

    def runners(image, src) -> dict[str, Callable[[], object]]:
        return {
            "ar_beam": lambda: decode_batch(ar, image, src, cfg.task, kind="ar", beam_size=bc.ar_beam_size,
                                            max_len=bc.ar_max_len, no_repeat_ngram=3),
            "ar_greedy": lambda: decode_batch(ar, image, src, cfg.task, kind="ar", greedy=True,
                                              max_len=bc.ar_max_len),
            "narvl": lambda: decode_batch(nar, image, src, cfg.task, kind="narvl"),
        }

    t0 = time.perf_counter()
    ms: dict[str, list[float]] = {"ar_beam": [], "ar_greedy": [], "narvl": []}
    out_lens: dict[str, list[int]] = {k: [] for k in ms}
    with torch.inference_mode():
        for i, (image, src) in enumerate(singles):
            for name, fn in runners(image, src).items():
                holder: list = []
                t = _time(lambda fn=fn, holder=holder: holder.append(fn()), device)
                if i > 0:  # the first sample warms up allocators and kernels
                    ms[name].append(t)
                    out_lens[name].append(len(holder[0][0]))
        latency = {name: {**_stats(v), "mean_output_tokens": statistics.fmean(out_lens[name])}
                   for name, v in ms.items()}

        throughput: dict[str, dict[str, float]] = {}
        images = torch.cat([s[0] for s in singles])
        width = max(s[1].shape[1] for s in singles)
        srcs = torch.cat([torch.nn.functional.pad(s[1], (0, width - s[1].shape[1]), value=tok.pad_id)
                          for s in singles])
        for bs in bc.batch_sizes:
            idx = torch.arange(bs, device=device) % len(singles)
            fns = runners(images[idx], srcs[idx])
            throughput[str(bs)] = {}
            for name, fn in fns.items():
                fn()  # warm-up at this shape
                reps = [_time(fn, device) for _ in range(2)]
                throughput[str(bs)][name] = bs / (statistics.fmean(reps) / 1000.0)

    nar_ms = latency["narvl"]["mean_ms"]
    result = {
        "task": cfg.task, "device": label, "num_samples_timed": len(singles) - 1,
        "latency": latency,
        "speedup_vs_beam": latency["ar_beam"]["mean_ms"] / nar_ms,
        "speedup_vs_greedy": latency["ar_greedy"]["mean_ms"] / nar_ms,
        "throughput_samples_per_s": throughput,
        "ar_beam_size": bc.ar_beam_size, "ar_max_len": bc.ar_max_len,
        "wall_s": time.perf_counter() - t0,
    }
    write_json_atomic(out_dir / OUTPUT, result)
    log.metrics({**{f"latency/{k}_mean_ms": v["mean_ms"] for k, v in latency.items()},
                 **{f"latency/{k}_p90_ms": v["p90_ms"] for k, v in latency.items()},
                 "latency/speedup_vs_beam": result["speedup_vs_beam"],
                 "latency/speedup_vs_greedy": result["speedup_vs_greedy"]})
    log.info(f"benchmark {cfg.task} on {label}: AR beam {latency['ar_beam']['mean_ms']:.1f} ms, AR greedy "
             f"{latency['ar_greedy']['mean_ms']:.1f} ms, NARVL {nar_ms:.1f} ms -> speedup "
             f"{result['speedup_vs_beam']:.1f}x (beam), {result['speedup_vs_greedy']:.1f}x (greedy)")
    return result
