"""Fake stages with the real stage contract, for testing the orchestration without models or data.

They live in the package (not in a test module) so Ray workers can import them. Use `FAKE_STAGES` as
`pipeline.dag.STAGES`. Each execution appends a line to `<root>/executions.jsonl` (root = out_dir's grandparent).
A training stage checkpoints every step into out_dir (`ckpt.json`) and resumes from it; it crashes at step N when
`<root>/crash-<task>-<stage>` holds N. Every stage sleeps `<root>/slow-s` seconds first when that file exists.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from stages.common import StageLog, write_json_atomic

FAKE_STAGES: dict[str, str] = {
    name: f"pipeline.testing:{name}"
    for name in ("prepare_data", "pretrain", "train_teacher", "distill", "train_nar", "evaluate", "benchmark")
}
EXPECTED_INPUTS = {
    "prepare_data": set(),
    "pretrain": {"data"},
    "distill": {"data", "teacher"},
    "evaluate": {"data", "model"},
    "benchmark": {"data", "ar", "narvl"},
}
METRIC = {"caption": "CIDEr", "vqa": "accuracy", "grounding": "acc@0.5", "entailment": "accuracy"}


def _root(out_dir: Path) -> Path:
    return Path(out_dir).resolve().parent.parent


def _record(stage: str, cfg: Any, out_dir: Path, **extra: Any) -> None:
    # the node name is in the scratch folder name: .work-<name>-<key12> or .tmp-<name>-<key12>-<id>
    folder = Path(out_dir).name.split("-", 1)[1]
    node = folder.rsplit("-", 2)[0] if Path(out_dir).name.startswith(".tmp-") else folder.rsplit("-", 1)[0]
    line = json.dumps({"task": getattr(cfg, "task", "shared"), "stage": stage, "node": node, **extra}) + "\n"
    fd = os.open(_root(out_dir) / "executions.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def executions(root: Path) -> list[dict]:
    """Every fake-stage execution recorded under `root`, in order."""
    path = Path(root) / "executions.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def _check_inputs(stage: str, inputs: dict[str, Path]) -> None:
    expected = EXPECTED_INPUTS.get(stage)
    if expected is not None and set(inputs) != expected:
        raise ValueError(f"{stage}: inputs {sorted(inputs)} != {sorted(expected)}")
    for name, d in inputs.items():
        if not (Path(d) / "manifest.json").exists():
            raise ValueError(f"{stage}: input {name} at {d} has no manifest")


def _inputs(**folders: Path) -> dict[str, Path]:
    return folders


class FakeStage:
    """An object with the stage module interface (VERSION, Inputs, run); its inputs arrive as a dict."""

    Inputs = staticmethod(_inputs)

    def __init__(self, name: str, version: int = 1) -> None:
        self.name = name
        self.VERSION = version

    def run(self, cfg: Any, inputs: dict[str, Path], out_dir: Path, log: StageLog) -> dict:
        _check_inputs(self.name, inputs)
        slow = _root(out_dir) / "slow-s"  # every execution takes this long (to overlap two drivers)
        if slow.exists():
            import time

            time.sleep(float(slow.read_text()))
        return getattr(self, f"_{self.name}")(cfg, inputs, Path(out_dir), log)

    def _prepare_data(self, cfg, inputs, out_dir, log) -> dict:
        _record("prepare_data", cfg, out_dir)
        write_json_atomic(out_dir / "train" / "manifest.json", {"count": cfg.data.train_per_task})
        return {"train": cfg.data.train_per_task}

    def _train(self, stage: str, cfg, inputs, out_dir, log) -> dict:
        import pyarrow as pa
        import pyarrow.parquet as pq

        ckpt = out_dir / "ckpt.json"
        start = json.loads(ckpt.read_text())["step"] if ckpt.exists() else 0
        _record(stage, cfg, out_dir, resumed_from=start)
        crash_file = _root(out_dir) / f"crash-{cfg.task}-{stage}"
        crash_at = int(crash_file.read_text()) if crash_file.exists() else None
        total = cfg.train.max_steps
        for step in range(start, total):
            if step == crash_at:
                raise RuntimeError(f"simulated crash at step {step}")
            loss = 1.0 / (step + 1)
            log.metrics({"train/loss": loss}, step=step)
            log.progress(step + 1, total)
            write_json_atomic(ckpt, {"step": step + 1})
        steps = list(range(total))
        curves = pa.table({"step": steps, "loss": [1.0 / (s + 1) for s in steps]})
        pq.write_table(curves, out_dir / "curves.parquet")
        (out_dir / "checkpoint").mkdir(exist_ok=True)
        write_json_atomic(out_dir / "metrics.json", {"final_loss": 1.0 / total})
        log.info(f"trained {total} steps (resumed from {start})")
        return {"steps": total, "resumed_from": start}

    def _pretrain(self, cfg, inputs, out_dir, log) -> dict:
        _record("pretrain", cfg, out_dir)
        (out_dir / "backbone.safetensors").write_bytes(b"")
        return {"val_shape_acc": 0.9}

    def _train_teacher(self, cfg, inputs, out_dir, log) -> dict:
        if set(inputs) not in ({"data"}, {"data", "pretrain"}):
            raise ValueError(f"train_teacher: inputs {sorted(inputs)}: expected data [+ pretrain]")
        return self._train("train_teacher", cfg, inputs, out_dir, log)

    def _train_nar(self, cfg, inputs, out_dir, log) -> dict:
        expected = {"data", "teacher"} | ({"distill"} if cfg.train.kd_for(cfg.task) else set())
        if set(inputs) != expected:
            raise ValueError(f"train_nar: inputs {sorted(inputs)} != {sorted(expected)}")
        return self._train("train_nar", cfg, inputs, out_dir, log)

    def _distill(self, cfg, inputs, out_dir, log) -> dict:
        _record("distill", cfg, out_dir)
        (out_dir / "distilled.parquet").write_bytes(b"")
        return {"differs": 0.1}

    def _evaluate(self, cfg, inputs, out_dir, log) -> dict:
        _record("evaluate", cfg, out_dir, kind=cfg.kind)
        value = 80.0 if cfg.kind == "ar" else 75.0
        gap = {"metric": "gap_metric", "score": value / 2, "blind": 20.0, "gap_closed": (value / 2 - 20.0) / 80.0,
               "blind_predictor": "constant"}
        metrics = {"metric": METRIC[cfg.task], "value": value, "metrics": {METRIC[cfg.task]: value, "n": 10},
                   "gap": gap}
        write_json_atomic(out_dir / "metrics.json", metrics)
        log.metrics({METRIC[cfg.task]: value})
        return {"value": value}

    def _benchmark(self, cfg, inputs, out_dir, log) -> dict:
        _record("benchmark", cfg, out_dir)
        lat = {"task": cfg.task, "latency": {"ar_beam": {"mean_ms": 50.0, "p50_ms": 49.0, "p90_ms": 60.0},
                                             "ar_greedy": {"mean_ms": 20.0, "p50_ms": 19.0, "p90_ms": 25.0},
                                             "narvl": {"mean_ms": 5.0, "p50_ms": 4.9, "p90_ms": 6.0}},
               "speedup_vs_beam": 10.0, "speedup_vs_greedy": 4.0}
        write_json_atomic(out_dir / "latency.json", lat)
        return {"speedup": 10.0}


prepare_data = FakeStage("prepare_data")
pretrain = FakeStage("pretrain")
train_teacher = FakeStage("train_teacher")
distill = FakeStage("distill")
train_nar = FakeStage("train_nar")
evaluate = FakeStage("evaluate")
benchmark = FakeStage("benchmark")
