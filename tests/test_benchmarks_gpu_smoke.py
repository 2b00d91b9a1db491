"""benchmarks/gpu_bench.py (what benchmarks/gpu.sh runs on a lent GPU): every part runs on the
CPU with tiny settings and reports figures, no errors (no timing is asserted). The GPU is lent to
some sessions only, so this keeps the prepared script working between them."""

from __future__ import annotations

import json

import pytest
from benchmark_scripts import load_benchmark


@pytest.mark.slow
def test_every_part_runs_and_reports(tmp_path):
    mod = load_benchmark("gpu_bench.py", "bench_gpu")
    out = tmp_path / "gpu.json"
    assert mod.main(["--out", str(out), "--N", "64", "--batch-sizes", "8", "--n-filters-scale", "1", "--steps", "2",
                     "--predict-patterns", "16", "--fit-groups", "64", "--fit-batch", "16", "--refine-batches", "32",
                     "--refine-passes", "2", "--device-batches", "8", "--budget-s", "600"]) == 0
    doc = json.loads(out.read_text())
    parts = {p["part"]: p for p in doc["parts"]}
    assert set(parts) == {"inference_N64", "train_N64_B8", "fit_sharded", "refine"}, sorted(parts)
    assert "precision" in parts["inference_N64"]
    for name, part in parts.items():
        assert "error" not in part and "skipped" not in part, (name, part)
    assert doc["platform"] == "cpu"
