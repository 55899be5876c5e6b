"""benchmark: batch-1 latency of AR (beam, greedy) and NARVL on the same device, and batched throughput."""

from __future__ import annotations

import json

import pytest
from test_train import TASK, shared_data, shared_nar, shared_teacher  # noqa: F401 (session fixtures)

from stages import benchmark
from stages.common import PrintLog
from stages.config import BenchmarkConfig, BenchmarkStage


@pytest.mark.timeout(240)
def test_benchmark_writes_latency_and_speedups(shared_data, shared_teacher, shared_nar, tmp_path):  # noqa: F811
    cfg = BenchmarkStage(task=TASK, benchmark=BenchmarkConfig(num_samples=6, ar_beam_size=3, ar_max_len=8,
                                                              batch_sizes=[4], threads=1))
    benchmark.run(cfg, benchmark.Inputs(data=shared_data, ar=shared_teacher, narvl=shared_nar[0]), tmp_path,
                  PrintLog())
    res = json.loads((tmp_path / "latency.json").read_text())
    assert res["device"] == "cpu (1 threads)" and res["num_samples_timed"] == 5
    for name in ("ar_beam", "ar_greedy", "narvl"):
        lat = res["latency"][name]
        assert lat["n"] == 5 and 0 < lat["p50_ms"] <= lat["p90_ms"]
        assert res["throughput_samples_per_s"]["4"][name] > 0
    assert res["speedup_vs_beam"] > 0 and res["speedup_vs_greedy"] > 0
