"""Load test of `narvl serve`: AR (beam 5) vs NARVL on the same weights, under concurrent HTTP requests.

    python bench/serve_load.py --smoke /tmp/narvl-serve-models --preset cpu-tiny          # train a pair, then test
    python bench/serve_load.py --ar <train_teacher out> --narvl <train_nar out> --tokenizer <prepare_data>/tokenizer

For each model kind, a local Ray Serve application is started on 127.0.0.1 (same batching options for both), warmed
up, and driven by a bounded closed-loop client at each concurrency: C threads each send a request, wait for the
answer and send the next, until --requests answers or --time-cap seconds. Requests cycle over the tasks on built-in
benchmark images. Reported per (kind, concurrency): p50 / p90 / p99 latency as the client saw it, throughput
(answers / wall second), the model's own time per call (`model_ms` of the responses: one call per task present in a
batch) and the batch sizes the server formed (from each response's `batch_size`).
Prints a table and writes JSON. The client shares the machine with the server: on a small CPU box the figures
include that contention. Not a test.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import socket
import sys
import threading
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

TASK_TEXT = {"caption": None, "vqa": "question", "grounding": "expression", "entailment": "hypothesis"}


def make_requests(tasks: list[str], n: int, image_size: int) -> list[tuple[str, dict]]:
    """n (task, JSON body) pairs cycling over the tasks, on built-in benchmark test images."""
    from stages.data.shapes import make_sample

    out = []
    for i in range(n):
        task = tasks[i % len(tasks)]
        s, png = make_sample(task, "test", i, image_size, 11, 4)
        body = {"image": base64.b64encode(png).decode()}
        if TASK_TEXT[task]:
            body["text"] = s[TASK_TEXT[task]]
        if task == "entailment":
            body["premise"] = s["premise"]
        out.append((task, body))
    return out


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation between order statistics."""
    xs = sorted(values)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def closed_loop(url: str, reqs: list[tuple[str, dict]], concurrency: int, total: int, time_cap_s: float) -> dict:
    """C threads, each sending its next request when the previous one is answered; stops at `total` or the cap."""
    import requests

    lock = threading.Lock()
    state = {"next": 0}
    latencies: list[float] = []
    model_ms: list[float] = []
    batch_sizes: Counter[int] = Counter()
    errors: list[str] = []
    deadline = time.perf_counter() + time_cap_s

    def worker() -> None:
        session = requests.Session()
        while True:
            with lock:
                i = state["next"]
                if i >= total or time.perf_counter() > deadline:
                    return
                state["next"] = i + 1
            task, body = reqs[i % len(reqs)]
            t0 = time.perf_counter()
            try:
                r = session.post(f"{url}/v1/{task}", json=body, timeout=max(30.0, time_cap_s))
                ok = r.status_code == 200
                data = r.json() if ok else None
            except Exception as e:  # noqa: BLE001 - a failed request is counted, not fatal
                ok, data = False, None
                r = e
            dt = (time.perf_counter() - t0) * 1e3
            with lock:
                if ok:
                    latencies.append(dt)
                    model_ms.append(float(data["model_ms"]))
                    batch_sizes[int(data["batch_size"])] += 1
                else:
                    errors.append(str(getattr(r, "text", r))[:200])

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    n = len(latencies)
    return {"concurrency": concurrency, "answered": n, "errors": len(errors), "first_error": errors[0] if errors
            else None, "wall_s": wall, "throughput_rps": n / wall if wall > 0 else 0.0,
            "p50_ms": percentile(latencies, 50), "p90_ms": percentile(latencies, 90),
            "p99_ms": percentile(latencies, 99), "model_p50_ms": percentile(model_ms, 50),
            "mean_batch": sum(k * v for k, v in batch_sizes.items()) / max(n, 1),
            "max_batch": max(batch_sizes, default=0),
            "batch_sizes": {str(k): v for k, v in sorted(batch_sizes.items())}}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def device_label() -> str:
    import torch

    return f"GPU ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ar", help="train_teacher output (or checkpoint folder)")
    p.add_argument("--narvl", help="train_nar output (or checkpoint folder)")
    p.add_argument("--tokenizer", help="prepare_data's tokenizer/ folder")
    p.add_argument("--smoke", type=Path, help="train a smoke AR + NARVL pair into this folder and use it")
    p.add_argument("--preset", default="cpu-tiny", help="model preset for --smoke")
    p.add_argument("--tasks", default="caption,vqa,grounding,entailment")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--requests", type=int, default=128, help="answers per (kind, concurrency)")
    p.add_argument("--time-cap", type=float, default=60.0, help="seconds per (kind, concurrency)")
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--batch-wait", type=float, default=0.01, help="batch_wait_timeout_s")
    p.add_argument("--num-cpus", type=float, default=1.0, help="per replica")
    p.add_argument("--num-gpus", type=float, default=0.0, help="per replica")
    p.add_argument("--beam-size", type=int, default=5)
    p.add_argument("--out", type=Path, default=Path("serve_load.json"))
    args = p.parse_args()

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from ray import serve

    from pipeline.ray_utils import init_ray
    from pipeline.serving.app import ServeConfig, start
    from pipeline.serving.predictor import Predictor

    if args.smoke:
        import torch

        from pipeline.serving.smoke import train_smoke_models

        torch.set_num_threads(1)
        t0 = time.perf_counter()
        dirs = train_smoke_models(args.smoke, preset=args.preset, n_per_task=64, ar_steps=300, nar_steps=300)
        print(f"trained the smoke pair ({args.preset}) in {time.perf_counter() - t0:.0f} s: {args.smoke}")
        models, tokenizer = {"ar": dirs["ar"], "narvl": dirs["narvl"]}, dirs["tokenizer"]
    elif args.ar and args.narvl and args.tokenizer:
        models, tokenizer = {"ar": Path(args.ar), "narvl": Path(args.narvl)}, Path(args.tokenizer)
    else:
        p.error("give --smoke DIR, or --ar, --narvl and --tokenizer")

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    image_size = Predictor(models["narvl"], tokenizer, device="cpu").model.cfg.image_size
    reqs = make_requests(tasks, 64, image_size)
    init_ray()
    rows = []
    try:
        for kind, model_dir in models.items():
            cfg = ServeConfig(model=str(model_dir), tokenizer=str(tokenizer), beam_size=args.beam_size,
                              max_batch_size=args.max_batch_size, batch_wait_timeout_s=args.batch_wait,
                              num_cpus=args.num_cpus, num_gpus=args.num_gpus, port=_free_port())
            url = start(cfg, name=f"load-{kind}")
            closed_loop(url, reqs, 4, 16, 60.0)  # warm-up
            for c in args.concurrency:
                res = closed_loop(url, reqs, c, args.requests, args.time_cap)
                res["kind"] = kind if kind == "narvl" else f"ar-beam{args.beam_size}"
                rows.append(res)
                print(f"{res['kind']:>10} c={c:<3} {res['answered']} answers, p50 {res['p50_ms']:.1f} ms, "
                      f"{res['throughput_rps']:.1f} req/s, mean batch {res['mean_batch']:.1f}", flush=True)
            serve.delete(f"load-{kind}")
            serve.shutdown()  # a fresh proxy (and port) for the next model
    finally:
        serve.shutdown()

    header = (f"{'model':>10} | {'conc':>4} | {'p50 ms':>8} | {'p90 ms':>8} | {'p99 ms':>8} | {'req/s':>7} | "
              f"{'model p50 ms':>12} | {'mean batch':>10} | {'max batch':>9} | {'errors':>6}")
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r['kind']:>10} | {r['concurrency']:>4} | {r['p50_ms']:>8.1f} | {r['p90_ms']:>8.1f} | "
                     f"{r['p99_ms']:>8.1f} | {r['throughput_rps']:>7.1f} | {r['model_p50_ms']:>12.1f} | "
                     f"{r['mean_batch']:>10.2f} | {r['max_batch']:>9} | {r['errors']:>6}")
    label = device_label()
    print(f"\nserve load test on {label}: tasks {','.join(tasks)}, max_batch_size {args.max_batch_size}, "
          f"batch_wait_timeout_s {args.batch_wait}, {args.requests} requests per row\n")
    print("\n".join(lines))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"device": label, "tasks": tasks, "max_batch_size": args.max_batch_size,
                                    "batch_wait_timeout_s": args.batch_wait, "requests": args.requests,
                                    "time_cap_s": args.time_cap, "models": {k: str(v) for k, v in models.items()},
                                    "rows": rows}, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
