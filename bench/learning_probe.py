"""How fast and how well the teacher (and optionally NARVL) learns each task of the built-in benchmark, for one
pipeline config: the measurement behind the default profile's model and recipe (docs/REPRODUCTION.md, "Learning").

    python -m bench.learning_probe --root /tmp/probe --tasks caption entailment [--nar] [--threads 1] \
        [--profile default] [overrides ...]

Runs the stages in this process, one after another (no Ray, no MLflow), each output kept under --root by its cache
key, so a second probe with other training overrides reuses the prepared data and the backbone pretraining. Prints
per task and model: steps, training wall time and samples/s, the main metric, its image-blind baseline, and the
image-reading measures: caption object-set exact match / F1 (the objects parsed from the caption against the
scene's), entailment accuracy on the hypotheses that need the image (yes/no), VQA per question type, grounding
Acc@0.5. The figures of one run are comparable with each other; absolute times depend on the machine's load.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import pyarrow.parquet as pq
import torch

from pipeline.config import load_config
from pipeline.dag import build_graph
from pipeline.executor import load_stage
from stages.common import PrintLog


def run_node(node, folders: dict[str, Path], root: Path, quiet: bool) -> Path:
    """The node's output folder under root, computed unless it is there already (complete: renamed last)."""
    out = root / f"{node.stage}-{node.key[:16]}"
    if out.exists():
        return out
    stage = load_stage(node.stage_ref)
    inputs = stage.Inputs(**{name: folders[node.upstream_id(up)] for name, up in node.inputs.items()})
    tmp = root / f".tmp-{node.stage}-{node.key[:16]}"
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    t0 = time.perf_counter()
    stage.run(node.cfg, inputs, tmp, PrintLog(node.id) if not quiet else _Quiet())
    (tmp / "probe_wall_s.txt").write_text(f"{time.perf_counter() - t0:.1f}")
    tmp.rename(out)
    return out


class _Quiet(PrintLog):
    def info(self, msg: str) -> None:  # progress lines only
        if "done" in msg or "=" in msg:
            print(f"    {msg}", flush=True)


def _objects(text: str) -> set:
    from stages.data.shapes import parse_caption

    try:
        return parse_caption(text)
    except Exception:  # an unparsable caption names no object
        return set()


def image_measures(task: str, eval_dir: Path) -> dict[str, float]:
    """Measures of image reading from an evaluate stage's predictions.parquet."""
    rows = pq.read_table(eval_dir / "predictions.parquet").to_pylist()
    out: dict[str, float] = {}
    if task == "caption":
        exact, tp, fp, fn = 0, 0, 0, 0
        for r in rows:
            want, got = _objects(json.loads(r["references"])[0]), _objects(r["prediction"])
            exact += want == got
            tp, fp, fn = tp + len(want & got), fp + len(got - want), fn + len(want - got)
        out["object_exact"] = 100 * exact / len(rows)
        out["object_f1"] = 100 * 2 * tp / max(1, 2 * tp + fp + fn)
    elif task == "entailment":
        dep = [r for r in rows if json.loads(r["references"])[0] in ("yes", "no")]
        out["image_dependent_acc"] = 100 * sum(r["score"] for r in dep) / max(1, len(dep))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", type=Path, required=True)
    ap.add_argument("--profile", default="default")
    ap.add_argument("--tasks", nargs="+", default=["caption", "vqa", "grounding", "entailment"])
    ap.add_argument("--nar", action="store_true", help="also distil, train and evaluate NARVL")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(profile=args.profile, overrides=[*args.overrides, f"tasks=[{','.join(args.tasks)}]"])
    graph = build_graph(cfg)
    wanted = {"prepare_data", "pretrain", "train_teacher", "evaluate_ar"}
    if args.nar:
        wanted |= {"distill", "train_nar", "evaluate_narvl"}
    folders: dict[str, Path] = {}
    results: dict[str, dict] = defaultdict(dict)
    for node_id, node in graph.nodes.items():  # insertion order is a topological order
        if node.name not in wanted:
            continue
        folders[node_id] = run_node(node, folders, args.root, args.quiet)
        if node.stage in ("train_teacher", "train_nar"):
            m = json.loads((folders[node_id] / "metrics.json").read_text())
            results[node.task][node.name] = {"steps": m["steps"], "train_s": m["train_loop_s"],
                                             "samples_per_s": m["samples_per_s"], "final_loss": m["final_loss"]}
        if node.stage == "evaluate":
            m = json.loads((folders[node_id] / "metrics.json").read_text())
            blind = {k: v for k, v in m["metrics"].items() if k.startswith("blind_")}
            results[node.task][node.name] = {"metric": m["metric"], "value": m["value"],
                                             **{k: 100 * v for k, v in blind.items()},
                                             **image_measures(node.task, folders[node_id])}
    print(f"\nprobe: profile {args.profile}, overrides {args.overrides}")
    for task, r in results.items():
        print(f"  {task}: " + json.dumps(r, default=lambda x: round(x, 3) if isinstance(x, float) else x))
    print(json.dumps({"overrides": args.overrides, "results": results}), flush=True)


if __name__ == "__main__":
    main()
