"""Smoke test of benchmarks/bench_sd_scale.py on the CPU (--tiny): it runs end to end and writes its files."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_sd_scale", ROOT / "benchmarks" / "bench_sd_scale.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_sd_scale_tiny_runs_and_writes_results(tmp_path):
    bench = _bench()
    out = tmp_path / "sd_scale_tiny"
    rc = bench.main(["--tiny", "--no-compile", "--steps", "3", "--warmup-calls", "1", "--step-calls", "2",
                     "--presets", "dgq-w8a8", "--calib-prompts", "1", "2", "--gen-batch", "1", "--out", str(out)])
    res = json.loads(out.with_suffix(".json").read_text())
    assert rc == 0 and not res["errors"], res["errors"]
    assert res["fp"]["eager_b1"]["median_ms"] > 0 and res["presets"]["dgq-w8a8"]["eager_b2"]["calls"] == 2
    cal = res["calibration"]["dgq-w8a8"]
    assert set(cal) == {"1", "2"} and all(c["seconds_passes"] >= 0 for c in cal.values())
    assert res["profile"]["dgq-w8a8"] and res["summary"]["dgq-w8a8"]["eager_vs_fp"] > 0
    md = out.with_suffix(".md").read_text()
    assert "| dgq-w8a8 |" in md and "## Profile" in md


def test_sd15_config_is_the_v15_architecture():
    bench = _bench()
    cfg = bench.SD15_UNET
    assert cfg["block_out_channels"] == (320, 640, 1280, 1280) and cfg["cross_attention_dim"] == 768
    assert bench.prompts(3) == bench.prompts(3) and len(set(bench.prompts(64))) == 64
