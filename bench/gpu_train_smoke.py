"""GPU training smoke for bench/gpu_check.sh (issue 15 (a)): the smoke pipeline on one task with the training
stages on the GPU, then an interrupted teacher run that must resume and end at the same step.

    python3 -m bench.gpu_train_smoke --root /tmp/narvl-gpu-smoke [--timeout-s 300] [overrides ...]

1. `narvl run --profile smoke --tasks caption` with use_gpu=true, bf16 and ZeRO-2 for the teacher and NARVL
   training (plus any extra overrides): PASS when it succeeds and both training stages' loss fell
   (metrics.json: final_loss < first_loss).
2. The teacher alone (`--only train_teacher`, from the cached inputs of 1) with more steps (a new cache key),
   interrupted with SIGINT once its first checkpoint exists, then the same command again: PASS when the second
   run reports resumed_from_step > 0 and ends at max_steps.
Prints PASS/FAIL per check; exits 0 either way (the caller prints the verdicts).
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

GPU_OVERRIDES = ["train_teacher.use_gpu=true", "train_nar.use_gpu=true", "train_teacher.precision=bf16",
                 "train_nar.precision=bf16", "train_teacher.zero_stage=2", "train_nar.zero_stage=2",
                 # decoding stages on the GPU too (Ray hides GPUs from a task that asks for none)
                 "resources.distill={cpus: 1, gpus: 0.5}", "resources.evaluate={cpus: 1, gpus: 0.5}",
                 "resources.benchmark={cpus: 1, gpus: 0.5}", "benchmark.device=cuda"]
CPU_OVERRIDES = ["train_teacher.zero_stage=2", "train_nar.zero_stage=2"]  # --cpu: a dry run of this script
NARVL = [sys.executable, "-c", "from pipeline.cli import app; app()"]


def metrics_files(root: Path, stage: str, newer_than: float = 0.0) -> list[dict]:
    """The metrics.json of `stage` (train_teacher / train_nar) under root, oldest first."""
    found = [p for p in root.rglob("metrics.json") if stage in str(p) and p.stat().st_mtime > newer_than]
    found.sort(key=lambda p: p.stat().st_mtime)
    return [json.loads(p.read_text()) | {"path": str(p)} for p in found]


def run(cmd: list[str], timeout_s: float) -> int:
    """Run `narvl <args>` (cmd = NARVL + args) to its end; 124 when it times out."""
    print("$ narvl " + " ".join(cmd[len(NARVL):]), flush=True)
    try:
        return subprocess.run(cmd, timeout=timeout_s).returncode
    except subprocess.TimeoutExpired:
        print(f"timed out after {timeout_s:.0f} s", flush=True)
        return 124


def verdict(ok: bool, label: str, figures: str) -> None:
    print(f"  {'PASS' if ok else 'FAIL'} {label}: {figures}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", type=Path, required=True)
    ap.add_argument("--task", default="caption")
    ap.add_argument("--timeout-s", type=float, default=300, help="per pipeline run")
    ap.add_argument("--skip-resume", action="store_true")
    ap.add_argument("--cpu", action="store_true", help="train on the CPU (to try this script without a GPU)")
    ap.add_argument("overrides", nargs="*", help="extra dotted config overrides")
    args = ap.parse_args()
    base = NARVL + ["run", "--profile", "smoke", "--tasks", args.task, "--root", str(args.root)]
    overrides = (CPU_OVERRIDES if args.cpu else GPU_OVERRIDES) + args.overrides
    where = "CPU" if args.cpu else "GPU"
    results = []

    t0 = time.time()
    rc = run(base + overrides, args.timeout_s)
    print(f"(smoke pipeline: exit {rc}, {time.time() - t0:.0f} s)")
    for stage in ("train_teacher", "train_nar"):
        m = (metrics_files(args.root, stage) or [{}])[-1]
        first, final = m.get("first_loss"), m.get("final_loss")
        ok = rc == 0 and first is not None and final is not None and final < first
        figs = (f"loss {first:.3f} -> {final:.3f} in {m.get('steps')} steps, {m.get('precision')}, "
                f"ZeRO {m.get('zero_stage')}, world size {m.get('world_size')}" if first is not None else
                f"no metrics.json (exit {rc})")
        verdict(ok, f"{stage} on the {where}: the loss fell", figs)
        results.append(ok)

    if args.skip_resume or rc != 0:
        print("  n/a  resume after an interruption (skipped)")
        return
    steps = 60
    teacher = base + ["--only", "train_teacher"] + overrides + [
        f"train_teacher.max_steps={steps}", "train_teacher.checkpoint_every=10", "train_teacher.val_every=10"]
    mark = time.time()
    print("$ narvl " + " ".join(teacher[len(NARVL):]) + "   (interrupted at its first checkpoint)", flush=True)
    proc = subprocess.Popen(teacher)
    deadline = time.time() + args.timeout_s
    while proc.poll() is None and time.time() < deadline:
        if any(p.stat().st_mtime > mark for p in args.root.rglob("train_state.json")):
            time.sleep(1.0)  # let the report finish writing
            proc.send_signal(signal.SIGINT)
            break
        time.sleep(0.5)
    try:
        first_rc = proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        first_rc = proc.wait()
    rc2 = run(teacher, args.timeout_s)
    m = (metrics_files(args.root, "train_teacher", newer_than=mark) or [{}])[-1]
    ok = rc2 == 0 and (m.get("resumed_from_step") or 0) > 0 and m.get("steps") == steps
    verdict(ok, "teacher resumed after SIGINT and ended at the same step",
            f"first run exit {first_rc}, resumed from step {m.get('resumed_from_step')}, ended at step "
            f"{m.get('steps')} of {steps} (exit {rc2})")


if __name__ == "__main__":
    main()
