"""distill: the teacher decodes every training sample once, in parts (here in this process; the pipeline fans the
parts out over Ray workers: test_pipeline_e2e / test_cluster)."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
from test_train import TASK, shared_data, shared_teacher  # noqa: F401 (session fixtures)

from stages import distill
from stages.common import PrintLog
from stages.config import DistillConfig, DistillStage
from stages.train import load_target_override


@pytest.mark.timeout(240)
def test_distill_writes_one_row_per_train_sample(shared_data, shared_teacher, tmp_path):  # noqa: F811
    cfg = DistillStage(task=TASK, distill=DistillConfig(beam_size=3, max_len=8, batch_size=32, num_actors=2))
    report = distill.run(cfg, distill.Inputs(data=shared_data, teacher=shared_teacher), tmp_path, PrintLog())
    rows = pq.read_table(tmp_path / "distilled.parquet").to_pylist()
    assert len(rows) == report["n"] == 64
    assert len({r["id"] for r in rows}) == 64
    assert set(rows[0]) == {"id", "target", "reference", "references", "differs", "length"}
    assert all(isinstance(json.loads(r["references"]), list) and r["length"] <= 8 for r in rows)
    assert 0.0 <= report["differs_share"] <= 1.0 and report["num_parts"] == 2
    assert len(load_target_override(tmp_path / "distilled.parquet")) == 64
    # the parts are disjoint and cover the split: decoded apart, they give the same rows
    parts = [distill.decode_part(cfg, distill.Inputs(data=shared_data, teacher=shared_teacher), i, 2)
             for i in range(2)]
    assert not {r["id"] for r in parts[0]} & {r["id"] for r in parts[1]}
    assert sorted(r["id"] for p in parts for r in p) == sorted(r["id"] for r in rows)
