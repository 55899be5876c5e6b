"""How fast and how well the teacher (and optionally NARVL) learns each task of the built-in benchmark, for one
pipeline config: the measurement behind the default profile's model and recipe (docs/REPRODUCTION.md, "Learning").

    python -m bench.learning_probe --root /tmp/probe --tasks caption entailment [--nar] [--threads 1] \
        [--profile default] [overrides ...]

Runs the stages in this process, one after another (no Ray, no MLflow), each output kept under --root by its cache
key, so a second probe with other training overrides reuses the prepared data and the backbone pretraining. Prints
per task and model: steps, training wall time and samples/s, the main metric, and the evaluate stage's gap
figures: the task's gap metric (caption: object-set exact match; VQA: accuracy; grounding: Acc@0.5; entailment:
accuracy on the hypotheses that need the image), its image-blind baseline and the share of the gap closed.
The figures of one run are comparable with each other; absolute times depend on the machine's load.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", type=Path, required=True)
    ap.add_argument("--profile", default="default")
    ap.add_argument("--tasks", nargs="+", default=["caption", "vqa", "grounding", "entailment"])
    ap.add_argument("--nar", action="store_true", help="also distil, train and evaluate NARVL")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--data-only", action="store_true", help="only prepare the data and pretrain the backbone (before "
                    "probes that run side by side and share them)")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(profile=args.profile, overrides=[*args.overrides, f"tasks=[{','.join(args.tasks)}]"])
    graph = build_graph(cfg)
    wanted = {"prepare_data", "pretrain", "train_teacher", "evaluate_ar"}
    if args.nar:
        wanted |= {"distill", "train_nar", "evaluate_narvl"}
    if args.data_only:
        wanted = {"prepare_data", "pretrain"}
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
            gap = m.get("gap") or {}
            keep = ("semantic_set_acc", "semantic_object_f1", "accuracy_image_dependent", "accuracy_yes_no",
                    "accuracy_number", "accuracy_other", "acc@0.5")
            results[node.task][node.name] = {
                "metric": m["metric"], "value": m["value"], "gap_metric": gap.get("metric"),
                "score": gap.get("score"), "blind": gap.get("blind"), "gap_closed": gap.get("gap_closed"),
                **{k: 100 * v for k, v in m["metrics"].items() if k in keep}}
    print(f"\nprobe: profile {args.profile}, overrides {args.overrides}")
    for task, r in results.items():
        print(f"  {task}: " + json.dumps(r, default=lambda x: round(x, 3) if isinstance(x, float) else x))
    print(json.dumps({"overrides": args.overrides, "results": results}), flush=True)


if __name__ == "__main__":
    main()
