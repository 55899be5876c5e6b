"""`narvl tables`: mean +- std over the runs of a study, from their summary.json files."""

from __future__ import annotations

import json
import math

import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.study import StudyError, aggregate, find_runs, load_summaries, mean_std, render_tables


def summary(cider: float, vqa: float | None, ms: float, ce: float | None = None) -> dict:
    row = lambda v, lat, m: {"metric": m, "value": v, "latency_ms": lat, "metrics": {}}  # noqa: E731
    s = {"profile": "study",
         "tasks": {"caption": {"ar": row(cider + 50, 2 * ms, "CIDEr"), "narvl": row(cider, ms, "CIDEr"),
                               "speedup": 2.0},
                   "vqa": {"ar": row(60.0, 4.0, "accuracy"), "narvl": row(vqa, 2.0, "accuracy"), "speedup": 2.0}}}
    if ce is not None:
        s["ablations"] = {"caption": {"ce_no_kd": {"metric": "CIDEr", "value": ce, "metrics": {}}}}
    return s


def write_runs(tmp_path, summaries):
    folders = []
    for i, s in enumerate(summaries):
        f = tmp_path / "runs" / f"2026112{i}-run{i}"
        f.mkdir(parents=True)
        (f / "summary.json").write_text(json.dumps(s))
        folders.append(f)
    return folders


def test_mean_std_is_the_sample_statistic():
    m, sd, n = mean_std([1.0, 2.0, 4.0, None, float("nan")])
    assert n == 3 and m == pytest.approx(7 / 3)
    assert sd == pytest.approx(math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2))
    assert mean_std([5.0]) == (5.0, 0.0, 1) and mean_std([None]) == (None, None, 0)


def test_tables_aggregate_seeds_and_mark_missing_values(tmp_path):
    write_runs(tmp_path, [summary(100, 50, 10, ce=20), summary(110, 54, 12, ce=30), summary(120, None, 14)])
    folders = find_runs(tmp_path, [], last=3)
    agg = aggregate(load_summaries(folders))
    assert agg["tasks"]["caption"]["narvl"] == [100, 110, 120]
    text = render_tables(agg, folders)
    assert "| caption | CIDEr | 160.0 +- 10.0 | 110.0 +- 10.0 | 24.00 +- 4.00 | 12.00 +- 2.00 | 2.00 +- 0.00x |" in text
    assert "52.0 +- 2.8 (n=2)" in text  # the run without a VQA value is left out, and the cell says so
    assert "| caption | ce_no_kd | CIDEr | 25.0 +- 7.1 (n=2) | - |" in text
    # --last picks the newest folders
    assert [f.name for f in find_runs(tmp_path, [], last=2)] == [folders[1].name, folders[2].name]


def test_tables_cli_and_errors(tmp_path):
    folders = write_runs(tmp_path, [summary(100, 50, 10), summary(110, 54, 12)])
    out = tmp_path / "tables.md"
    result = CliRunner().invoke(app, ["tables", *map(str, folders), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "105.0 +- 7.1" in result.output and out.read_text() == result.output
    (folders[1] / "summary.json").write_text(json.dumps({**summary(1, 1, 1), "profile": "default"}))
    with pytest.raises(StudyError, match="different profiles"):
        load_summaries(folders)
    result = CliRunner().invoke(app, ["tables", "--root", str(tmp_path / "nowhere")])
    assert result.exit_code == 2 and "no run folders" in result.output


def test_tables_report_the_gap_closed_over_the_blind_baseline(tmp_path):
    def gap(score: float, blind: float) -> dict:
        return {"metric": "acc@0.5", "score": score, "blind": blind, "gap_closed": (score - blind) / (100 - blind)}

    runs = []
    for ar, nar in ((82.0, 79.0), (91.0, 88.0)):
        s = summary(100, 50, 10)
        s["tasks"]["grounding"] = {"ar": {"metric": "acc@0.5", "value": ar, "gap": gap(ar, 10.0)},
                                   "narvl": {"metric": "acc@0.5", "value": nar, "gap": gap(nar, 10.0)}}
        runs.append(s)
    agg = aggregate(load_summaries(write_runs(tmp_path, runs)))
    assert agg["tasks"]["grounding"]["ar_gap"] == pytest.approx([0.8, 0.9])
    text = render_tables(agg)
    # NARVL/AR = mean NARVL gap (0.8167) / mean AR gap (0.85)
    assert "| grounding | acc@0.5 | 10.0 +- 0.0 | 86.5 +- 6.4 | 83.5 +- 6.4 | 0.85 +- 0.07 | 0.82 +- 0.07 | 0.96 |" \
        in text, text
