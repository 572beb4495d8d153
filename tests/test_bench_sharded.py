"""Smoke test of benchmarks/bench_sharded.py on the tiny SD-v1.5-structured pipeline (CPU, one process)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_sharded_tiny_run_and_report(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_sharded.py"), str(tmp_path), "--tiny", "--device", "cpu",
           "--n-images", "4", "--n-calibration", "2", "--batch-size", "2", "--recipes", "fp", "baseline-w8a8"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    run = json.loads((tmp_path / "run-w1-run-tiny.json").read_text())
    assert set(run["recipes"]) == {"fp", "baseline-w8a8"}
    for v in run["recipes"].values():
        assert v["images"] == v["generated"] == 4 and v["images_per_s"] > 0
    assert run["recipes"]["fp"]["manifest_digest"] != run["recipes"]["baseline-w8a8"]["manifest_digest"]
    r = subprocess.run(cmd[:3] + ["--report"], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert all(row["same_images_as_1_process"] for row in summary["rows"])
    assert (tmp_path / "summary.md").read_text().startswith("| world_size")
