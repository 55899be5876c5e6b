"""The real-image captioning pipeline (configs/pipelines/real_smoke.yaml) end to end: COCO images and captions from
../shared/realdata converted to shards, then the whole DAG with evaluation against the real references.
Slow (a few minutes): `pytest -m slow tests/test_real_smoke.py`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.realdata, pytest.mark.timeout(1200)]


def test_real_smoke_pipeline(ray_session, realdata, tmp_path, monkeypatch):
    from pipeline.config import CONFIG_DIR, load_config
    from pipeline.dag import run_pipeline
    from stages.data.converters import convert

    coco = realdata / "coco"
    out = tmp_path / "real_coco"
    convert("coco-caption", {"images": coco / "images",
                             "captions": {"train": coco / "annotations/captions_train2017.json",
                                          "val": coco / "annotations/captions_val2017.json"},
                             "on_bad": "skip"}, out)
    cfg = load_config(CONFIG_DIR / "pipelines" / "real_smoke.yaml", overrides=[f"data.shards_dir={out}"])
    result = run_pipeline(cfg, tmp_path / "artifacts")
    assert result.ok, [(f.id, f.error) for f in result.failures]
    row = json.loads((Path(result.report_dir) / "summary.json").read_text())["tasks"]["caption"]
    assert row["ar"]["metric"] == "CIDEr" and "BLEU-4" in row["ar"]["metrics"]
    assert row["narvl"]["latency_ms"] > 0 and row["speedup"] > 0
