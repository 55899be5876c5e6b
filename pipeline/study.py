"""Aggregate several pipeline runs (the seeds of a study) into mean +- std tables: `narvl tables`.

Reads each run's summary.json (the contract of pipeline/report.py) and writes the paper-style tables of
docs/REPRODUCTION.md: AR vs NARVL per task (Table 1) and the NARVL ablations beside the main NARVL row
(Tables 6-9). A value missing from a run (a stage that failed, an ablation not run) is left out of that cell's
statistics, and the cell says over how many runs it was taken when that is fewer than all.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from pipeline.report import read_json


class StudyError(ValueError):
    """Runs that cannot be aggregated (no summary.json, different profiles); the message says which."""


def find_runs(root: Path, runs: list[Path], last: int) -> list[Path]:
    """The run folders to aggregate: `runs` as given, else the `last` newest folders under <root>/runs."""
    if runs:
        folders = [Path(r) for r in runs]
    else:
        base = Path(root) / "runs"
        folders = sorted(p for p in base.glob("*") if (p / "summary.json").is_file())[-last:] if base.is_dir() else []
        if not folders:
            raise StudyError(f"no run folders with a summary.json under {base}")
    for f in folders:
        if not (f / "summary.json").is_file():
            raise StudyError(f"{f}: no summary.json (not a finished pipeline run folder)")
    return folders


def load_summaries(folders: list[Path]) -> list[dict]:
    summaries = []
    for f in folders:
        s = read_json(f / "summary.json")
        if s is None or not isinstance(s.get("tasks"), dict):
            raise StudyError(f"{f / 'summary.json'}: not a pipeline summary (expected a 'tasks' mapping)")
        summaries.append(s)
    profiles = sorted({str(s.get("profile")) for s in summaries})
    if len(profiles) > 1:
        raise StudyError(f"the runs come from different profiles ({', '.join(profiles)}); aggregate one at a time")
    return summaries


def mean_std(values: list[float | None]) -> tuple[float | None, float | None, int]:
    """Mean, sample standard deviation (0 for one value) and count of the values that are there."""
    xs = [float(v) for v in values if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)]
    if not xs:
        return None, None, 0
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return m, sd, len(xs)


def _cell(values: list[float | None], digits: int = 1, suffix: str = "") -> str:
    m, sd, n = mean_std(values)
    if m is None:
        return "-"
    out = f"{m:.{digits}f} +- {sd:.{digits}f}{suffix}"
    return out if n == len(values) else f"{out} (n={n})"


def aggregate(summaries: list[dict]) -> dict[str, Any]:
    """{"runs": n, "tasks": {task: {"metric", "ar": [..], "narvl": [..], "ar_ms", "narvl_ms", "speedup",
    "gap_metric", "blind", "ar_score", "narvl_score", "ar_gap", "narvl_gap"}}, "ablations": {task: {variant:
    {"metric", "values": [..], "gap": [..]}}}}: per-run values, in run order (gap figures: summary rows' "gap")."""
    tasks: dict[str, Any] = {}
    ablations: dict[str, Any] = {}
    for s in summaries:
        for task in s["tasks"]:
            tasks.setdefault(task, {"metric": None, "ar": [], "narvl": [], "ar_ms": [], "narvl_ms": [],
                                    "speedup": [], "gap_metric": None, "blind": [], "ar_score": [],
                                    "narvl_score": [], "ar_gap": [], "narvl_gap": []})
        for task in s.get("ablations", {}):
            for variant in s["ablations"][task]:
                ablations.setdefault(task, {}).setdefault(variant, {"metric": None, "values": [], "gap": []})
    for s in summaries:
        for task, agg in tasks.items():
            row = s["tasks"].get(task) or {}
            ar, nar = row.get("ar") or {}, row.get("narvl") or {}
            agg["metric"] = agg["metric"] or ar.get("metric") or nar.get("metric")
            agg["ar"].append(ar.get("value"))
            agg["narvl"].append(nar.get("value"))
            agg["ar_ms"].append(ar.get("latency_ms"))
            agg["narvl_ms"].append(nar.get("latency_ms"))
            agg["speedup"].append(row.get("speedup"))
            ar_gap, nar_gap = ar.get("gap") or {}, nar.get("gap") or {}
            agg["gap_metric"] = agg["gap_metric"] or ar_gap.get("metric") or nar_gap.get("metric")
            agg["blind"].append(ar_gap.get("blind", nar_gap.get("blind")))
            agg["ar_score"].append(ar_gap.get("score"))
            agg["narvl_score"].append(nar_gap.get("score"))
            agg["ar_gap"].append(ar_gap.get("gap_closed"))
            agg["narvl_gap"].append(nar_gap.get("gap_closed"))
        for task, variants in ablations.items():
            for variant, agg in variants.items():
                r = (s.get("ablations", {}).get(task) or {}).get(variant) or {}
                agg["metric"] = agg["metric"] or r.get("metric")
                agg["values"].append(r.get("value"))
                agg["gap"].append((r.get("gap") or {}).get("gap_closed"))
    return {"runs": len(summaries), "tasks": tasks, "ablations": ablations}


def render_tables(agg: dict[str, Any], folders: list[Path] | None = None) -> str:
    """Markdown: Table 1 (AR vs NARVL) and the ablations, mean +- std over the runs."""
    n = agg["runs"]
    lines = [f"Mean +- sample std over {n} run(s)" + (": " + ", ".join(f.name for f in folders) if folders else "")
             + ". Latency: batch 1, AR with beam search.", "",
             "| task | metric | AR | NARVL | AR ms | NARVL ms | speedup |", "|---|---|---|---|---|---|---|"]
    for task, t in agg["tasks"].items():
        lines.append(f"| {task} | {t['metric'] or '-'} | {_cell(t['ar'])} | {_cell(t['narvl'])} | "
                     f"{_cell(t['ar_ms'], 2)} | {_cell(t['narvl_ms'], 2)} | {_cell(t['speedup'], 2, 'x')} |")
    if any(t["gap_metric"] for t in agg["tasks"].values()):
        lines += ["", "Gap closed over the image-blind baseline, (score - blind) / (100 - blind), on each task's gap "
                  "metric; NARVL/AR is the ratio of the mean gaps closed.", "",
                  "| task | gap metric | blind | AR | NARVL | AR closed | NARVL closed | NARVL/AR |",
                  "|---|---|---|---|---|---|---|---|"]
        for task, t in agg["tasks"].items():
            if not t["gap_metric"]:
                continue
            ar_m, nar_m = mean_std(t["ar_gap"])[0], mean_std(t["narvl_gap"])[0]
            ratio = f"{nar_m / ar_m:.2f}" if ar_m and nar_m is not None and ar_m > 0 else "-"
            lines.append(f"| {task} | {t['gap_metric']} | {_cell(t['blind'])} | {_cell(t['ar_score'])} | "
                         f"{_cell(t['narvl_score'])} | {_cell(t['ar_gap'], 2)} | {_cell(t['narvl_gap'], 2)} | "
                         f"{ratio} |")
    if agg["ablations"]:
        lines += ["", "| task | NARVL variant | metric | value | gap closed |", "|---|---|---|---|---|"]
        for task, variants in agg["ablations"].items():
            main = agg["tasks"].get(task, {})
            lines.append(f"| {task} | main (Q-CTC, KD, queries) | {main.get('metric') or '-'} | "
                         f"{_cell(main.get('narvl', []))} | {_cell(main.get('narvl_gap', []), 2)} |")
            for variant, v in variants.items():
                lines.append(f"| {task} | {variant} | {v['metric'] or '-'} | {_cell(v['values'])} | "
                             f"{_cell(v['gap'], 2)} |")
    return "\n".join(lines) + "\n"
