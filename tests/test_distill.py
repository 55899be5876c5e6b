"""distill: the teacher decodes every training sample once, on a pool of Ray actors."""

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
def test_distill_writes_one_row_per_train_sample(shared_data, shared_teacher, tmp_path, ray_session):  # noqa: F811
    cfg = DistillStage(task=TASK, distill=DistillConfig(beam_size=3, max_len=8, batch_size=32, num_actors=2))
    report = distill.run(cfg, {"prepare_data": shared_data, "train_teacher": shared_teacher}, tmp_path, PrintLog())
    rows = pq.read_table(tmp_path / "distilled.parquet").to_pylist()
    assert len(rows) == report["n"] == 64
    assert len({r["id"] for r in rows}) == 64
    assert set(rows[0]) == {"id", "target", "reference", "references", "differs", "length"}
    assert all(isinstance(json.loads(r["references"]), list) and r["length"] <= 8 for r in rows)
    assert 0.0 <= report["differs_share"] <= 1.0 and report["num_actors"] == 2
    assert len(load_target_override(tmp_path / "distilled.parquet")) == 64
