"""The run report: summary.json (a contract), report.md (like the paper's Table 1) and plots.

Written to `<root>/runs/<timestamp>-<parent_run_id8>/` and logged to the pipeline's parent MLflow run.

summary.json: {"profile", "tasks": {task: {"ar": {"metric", "value", "latency_ms", "metrics", "gap"}, "narvl": {...},
"speedup", "blind"}}} plus "ablations": {task: {ablation: {"metric", "value", "metrics", "gap"}}} when ablations
ran. Values come from each evaluate stage's metrics.json ({"metric", "value", "metrics", "gap"}, already on the
paper's scale: CIDEr x100, accuracies in %) and the benchmark's latency.json (batch-1 mean ms of AR beam search and
of NARVL). "gap" is {"metric", "score", "blind", "gap_closed", "blind_predictor"} (or null): the model's score on
the task's gap metric, the image-blind baseline's (both in %) and the share of the gap to 100 it closes; the
task's "blind" is {"metric", "value", "predictor"}, the same baseline once per task.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.tracking import run_rel
from stages.benchmark import OUTPUT as LATENCY_FILE
from stages.benchmark import mean_latency_ms
from stages.common import write_json_atomic

if TYPE_CHECKING:
    from pipeline.config import PipelineConfig
    from pipeline.dag import Graph
    from pipeline.executor import Executor, NodeStatus


def read_json(path: Path) -> dict | None:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


def evaluation_row(metrics: dict | None) -> dict[str, Any]:
    metrics = metrics or {}
    gap = metrics.get("gap")
    if isinstance(gap, dict):
        gap = {"metric": gap.get("metric"), "score": _num(gap.get("score")), "blind": _num(gap.get("blind")),
               "gap_closed": _num(gap.get("gap_closed")), "blind_predictor": gap.get("blind_predictor")}
    return {"metric": metrics.get("metric"), "value": _num(metrics.get("value")),
            "metrics": metrics.get("metrics") if isinstance(metrics.get("metrics"), dict) else {},
            "gap": gap if isinstance(gap, dict) else None}


def task_blind(row: dict[str, Any]) -> dict[str, Any] | None:
    """The task's image-blind baseline from its AR (else NARVL) evaluation: {"metric", "value" (%), "predictor"}."""
    for kind in ("ar", "narvl"):
        gap = (row.get(kind) or {}).get("gap")
        if isinstance(gap, dict) and gap.get("blind") is not None:
            return {"metric": gap.get("metric"), "value": gap["blind"], "predictor": gap.get("blind_predictor")}
    return None


def build_summary(cfg: PipelineConfig, graph: Graph, statuses: dict[str, NodeStatus],
                  folder_of: Callable[[str], Path]) -> dict[str, Any]:
    """The summary.json contract from the finished (or cached) evaluate and benchmark folders."""

    def folder(task: str, name: str) -> Path | None:
        st = statuses.get(f"{task}/{name}")
        return folder_of(st.rel) if st is not None and st.rel and st.state in ("hit", "succeeded") else None

    def load(task: str, name: str, file: str) -> dict | None:
        d = folder(task, name)
        return read_json(d / file) if d else None

    tasks: dict[str, Any] = {}
    ablations: dict[str, Any] = {}
    for task in cfg.tasks:
        lat = load(task, "benchmark", LATENCY_FILE) or {}
        row: dict[str, Any] = {}
        for kind in ("ar", "narvl"):
            row[kind] = {**evaluation_row(load(task, f"evaluate_{kind}", "metrics.json")),
                         "latency_ms": mean_latency_ms(lat, kind)}
        ar_ms, nar_ms = row["ar"]["latency_ms"], row["narvl"]["latency_ms"]
        speedup = _num(lat.get("speedup_vs_beam"))
        if speedup is None and ar_ms and nar_ms:
            speedup = ar_ms / nar_ms
        row["speedup"] = speedup
        row["blind"] = task_blind(row)
        tasks[task] = row
        for ablation in cfg.task_ablations(task):
            m = load(task, f"evaluate_narvl[{ablation}]", "metrics.json")
            if m is not None:
                ablations.setdefault(task, {})[ablation] = evaluation_row(m)
    summary: dict[str, Any] = {"profile": cfg.profile, "tasks": tasks}
    if ablations:
        summary["ablations"] = ablations
    return summary


def _fmt(v: Any, digits: int = 2) -> str:
    return f"{v:.{digits}f}" if isinstance(v, int | float) and not isinstance(v, bool) else "-"


def render_markdown(summary: dict, statuses: dict[str, NodeStatus], info: dict[str, str], plots: list[str]) -> str:
    lines = [f"# NARVL pipeline report ({summary['profile']})", ""]
    lines += [f"- {k}: `{v}`" for k, v in info.items()] + [""]
    lines += ["## AR vs NARVL (paper Table 1)", "",
              "| task | metric | AR | NARVL | AR ms (beam, batch 1) | NARVL ms | speedup |",
              "|---|---|---|---|---|---|---|"]
    for task, row in summary["tasks"].items():
        ar, nar = row["ar"], row["narvl"]
        metric = ar["metric"] or nar["metric"] or "-"
        lines.append(f"| {task} | {metric} | {_fmt(ar['value'])} | {_fmt(nar['value'])}"
                     f" | {_fmt(ar['latency_ms'])} | {_fmt(nar['latency_ms'])} | {_fmt(row['speedup'])}x |")
    gaps = {task: row for task, row in summary["tasks"].items() if row.get("blind")}
    if gaps:
        lines += ["", "## Image use: the share of the gap to a perfect score closed over an image-blind baseline", "",
                  "| task | gap metric | blind (predictor) | AR | NARVL | AR gap closed | NARVL gap closed |",
                  "|---|---|---|---|---|---|---|"]
        for task, row in gaps.items():
            ar, nar = row["ar"].get("gap") or {}, row["narvl"].get("gap") or {}
            lines.append(f"| {task} | {row['blind']['metric']} | {_fmt(row['blind']['value'])}"
                         f" ({row['blind']['predictor'] or '-'}) | {_fmt(ar.get('score'))} | {_fmt(nar.get('score'))}"
                         f" | {_fmt(ar.get('gap_closed'))} | {_fmt(nar.get('gap_closed'))} |")
        lines += ["", "Blind: the best of a few predictors that never see the image (the most frequent training "
                  "answer for the same text or its first words, a constant answer, a fixed caption, the best fixed "
                  "box), chosen on the evaluated samples. Gap closed = (score - blind) / (100 - blind). Gap metrics: "
                  "caption, the object-set exact match of the parsed captions; VQA, the official accuracy; "
                  "grounding, Acc@0.5; entailment, the accuracy on the yes/no hypotheses (only the image decides "
                  "them)."]
    if summary.get("ablations"):
        lines += ["", "## Ablations (NARVL variants)", "",
                  "| task | variant | metric | value |", "|---|---|---|---|"]
        for task, rows in summary["ablations"].items():
            main = summary["tasks"][task]["narvl"]
            lines.append(f"| {task} | main | {main['metric'] or '-'} | {_fmt(main['value'])} |")
            for name, r in rows.items():
                lines.append(f"| {task} | {name} | {r['metric'] or '-'} | {_fmt(r['value'])} |")
    lines += ["", "## Stages", "", "| node | state | key | seconds | folder |", "|---|---|---|---|---|"]
    for st in statuses.values():
        lines.append(f"| {st.id} | {st.state} | {st.key[:12]} | {_fmt(st.elapsed, 1)} | {st.rel or '-'} |")
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def plot_metric_vs_latency(summary: dict, out: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t, r in summary["tasks"].items()
             if any(r[k]["value"] is not None and r[k]["latency_ms"] for k in ("ar", "narvl"))]
    if not tasks:
        return None
    fig, axes = plt.subplots(1, len(tasks), figsize=(4 * len(tasks), 3.5), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        row = summary["tasks"][task]
        for kind, color in (("ar", "tab:blue"), ("narvl", "tab:orange")):
            r = row[kind]
            if r["value"] is not None and r["latency_ms"]:
                ax.scatter([r["latency_ms"]], [r["value"]], color=color, label=kind.upper(), s=60)
        ax.set_xscale("log")
        ax.set_xlabel("batch-1 latency (ms)")
        ax.set_ylabel(row["ar"]["metric"] or row["narvl"]["metric"] or "metric")
        ax.set_title(task + (f" ({row['speedup']:.1f}x)" if row["speedup"] else ""))
        ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def plot_curves(task: str, folders: dict[str, Path], out: Path) -> Path | None:
    """Training curves (every numeric column of curves.parquet against `step`) of a task's training nodes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pyarrow.parquet as pq

    tables = {}
    for name, d in folders.items():
        path = d / "curves.parquet"
        if path.exists():
            try:
                tables[name] = pq.read_table(path).to_pydict()
            except Exception:  # noqa: BLE001 - a plot is not worth failing the report for
                continue
    series = sorted({c for t in tables.values() for c in t if c != "step"
                     and any(isinstance(v, int | float) and not isinstance(v, bool) for v in t[c])})
    if not tables or not series or not all("step" in t for t in tables.values()):
        return None
    fig, axes = plt.subplots(1, len(series), figsize=(4 * len(series), 3.2), squeeze=False)
    for ax, col in zip(axes[0], series, strict=True):
        for name, t in tables.items():
            if col in t:
                pts = [(s, v) for s, v in zip(t["step"], t[col], strict=False) if v is not None]
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], label=name)
        ax.set_title(f"{task}: {col}")
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def write_report(cfg: PipelineConfig, graph: Graph, statuses: dict[str, NodeStatus], executor: Executor,
                 parent_run_id: str | None, git: dict, stamp: str) -> tuple[Path, dict]:
    """Write summary.json, report.md and the plots to `<root>/runs/<stamp>-<run8>/`; return (a local copy of that
    folder, summary). On an object-store root the local copy is in ./artifacts/runs/ and the folder is uploaded."""
    storage = executor.storage
    rel = run_rel(stamp, parent_run_id)
    out = Path("artifacts").resolve() / rel if storage.remote else storage.local(rel)
    out.mkdir(parents=True, exist_ok=True)
    summary = build_summary(cfg, graph, statuses, executor.view)
    write_json_atomic(out / "summary.json", summary)
    plots, notes = [], []
    try:  # a plot is not worth losing the report for
        if plot_metric_vs_latency(summary, out / "metric_vs_latency.png"):
            plots.append("metric_vs_latency.png")
        for task in cfg.tasks:
            folders = {st.name: executor.view(st.rel) for st in statuses.values()
                       if st.task in (task, "shared") and st.stage in ("train_teacher", "train_nar") and st.rel
                       and st.state in ("hit", "succeeded")}
            if plot_curves(task, folders, out / f"curves_{task}.png"):
                plots.append(f"curves_{task}.png")
    except Exception as e:  # noqa: BLE001
        notes.append(f"plots failed: {type(e).__name__}: {e}")
    info = {"profile": cfg.profile, "name": cfg.name, "mlflow parent run": parent_run_id or "-",
            "git": f"{git.get('sha')} (dirty: {git.get('dirty')})", "artifact root": storage.uri,
            **({"note": "; ".join(notes)} if notes else {})}
    (out / "report.md").write_text(render_markdown(summary, statuses, info, plots))
    if storage.remote:
        storage.upload_dir(out, rel)
    return out, summary
