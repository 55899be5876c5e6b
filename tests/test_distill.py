"""distill: the teacher decodes every training sample once, in parts (here in this process; the pipeline fans the
parts out over Ray workers: test_pipeline_e2e / test_cluster), and the validation split."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from test_train import TASK, shared_data, shared_teacher  # noqa: F401 (session fixtures)

from stages import distill
from stages.common import PrintLog
from stages.config import DistillConfig, DistillStage
from stages.data.shards import count_samples
from stages.train import load_target_override


@pytest.mark.timeout(240)
def test_distill_writes_one_row_per_train_sample(shared_data, shared_teacher, tmp_path):  # noqa: F811
    cfg = DistillStage(task=TASK, distill=DistillConfig(beam_size=3, max_len=8, batch_size=32, num_actors=2))
    report = distill.run(cfg, distill.Inputs(data=shared_data, teacher=shared_teacher), tmp_path, PrintLog())
    table = pq.read_table(tmp_path / "distilled.parquet").to_pylist()
    rows = [r for r in table if r["split"] == "train"]
    val = [r for r in table if r["split"] == "val"]
    n_val = count_samples(shared_data / "val")
    assert len(rows) == report["n"] == 64 and len(val) == report["n_val"] == n_val > 0
    assert len({r["id"] for r in table}) == 64 + n_val
    assert set(rows[0]) == {"id", "split", "target", "reference", "references", "differs", "length"}
    assert all(isinstance(json.loads(r["references"]), list) and r["length"] <= 8 for r in table)
    assert 0.0 <= report["differs_share"] <= 1.0 and report["num_parts"] == 2
    # the validation split's KD targets are there for the student's validation loss
    assert len(load_target_override(tmp_path / "distilled.parquet")) == 64 + n_val
    # the parts are disjoint and cover the split: decoded apart, they give the same rows
    parts = [distill.decode_part(cfg, distill.Inputs(data=shared_data, teacher=shared_teacher), i, 2)
             for i in range(2)]
    assert not {r["id"] for r in parts[0]} & {r["id"] for r in parts[1]}
    assert sorted(r["id"] for p in parts for r in p) == sorted(r["id"] for r in rows)


@pytest.mark.timeout(240)
def test_kd_student_validates_against_the_teachers_val_decodes(shared_data, shared_teacher, tmp_path):  # noqa: F811
    """With KD, NARVL's validation loss (which picks its checkpoint) is measured against the teacher's decodes of the
    validation split: replacing only those changes the validation loss and nothing of the training."""
    import pyarrow as pa
    from test_train import nar_cfg

    from stages import train_nar

    cfg = DistillStage(task=TASK, distill=DistillConfig(beam_size=2, max_len=8, batch_size=32))
    distill.run(cfg, distill.Inputs(data=shared_data, teacher=shared_teacher), tmp_path / "kd", PrintLog())
    rows = pq.read_table(tmp_path / "kd" / "distilled.parquet").to_pylist()
    other = tmp_path / "kd-other-val"
    other.mkdir()
    pq.write_table(pa.Table.from_pylist([{**r, "target": "no"} if r["split"] == "val" else r for r in rows]),
                   other / "distilled.parquet")
    assert any(r["split"] == "val" and r["target"] != "no" for r in rows)

    def curves(distilled: Path) -> list[dict]:
        base = nar_cfg()
        stage = base.model_copy(update={"train": base.train.model_copy(update={
            "kd": True, "max_steps": 4, "val_every": 2, "log_every": 2, "num_workers": 1})})
        out = tmp_path / f"nar-{distilled.name}"
        train_nar.run(stage, train_nar.Inputs(data=shared_data, teacher=shared_teacher, distill=distilled), out,
                      PrintLog())
        return pq.read_table(out / "curves.parquet").to_pylist()

    a, b = curves(tmp_path / "kd"), curves(other)
    assert [r["loss"] for r in a] == [r["loss"] for r in b]  # the same training targets
    val_a = [r["val_loss"] for r in a if "val_loss" in r]
    val_b = [r["val_loss"] for r in b if "val_loss" in r]
    assert len(val_a) == 2 and all(abs(x - y) > 1e-3 for x, y in zip(val_a, val_b, strict=True)), (val_a, val_b)
