"""K-means worker processes end with their parent: a calibration killed (SIGKILL) or interrupted (SIGINT) in the
middle leaves no process behind."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CALIBRATE_FOREVER = textwrap.dedent("""
    import os, sys
    os.environ["DGQ_KMEANS_JOBS"] = "2"
    import torch
    torch.set_num_threads(1)
    from dgq_utils.core import kmeans
    from dgq_utils.quantize.pipeline import dequantize_pipeline, quantize_pipeline
    from dgq_utils.testing.tiny import TINY_PROMPTS, build_tiny_pipeline
    pipe = build_tiny_pipeline(seed=0, scheduler="ddim")
    while True:
        kmeans.clear_memo()  # every round fits again, in worker processes
        quantize_pipeline(pipe, "dgq-w8a6", list(TINY_PROMPTS[:2]), sampler=SamplerSettings(num_inference_steps=3), progress=False)
        dequantize_pipeline(pipe)
""")


def _children(pid: int) -> set[int]:
    """Descendants of ``pid`` (Linux /proc)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    out, frontier = set(), {pid}
    while frontier:
        frontier = {c for c, p in parents.items() if p in frontier} - out
        out |= frontier
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc to list child processes")
@pytest.mark.parametrize("sig", [signal.SIGKILL, pytest.param(signal.SIGINT, marks=pytest.mark.slow)])
def test_killed_calibration_leaves_no_worker_processes(sig):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", CALIBRATE_FOREVER], env=env, cwd=str(ROOT),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        workers: set[int] = set()
        while time.monotonic() < deadline and proc.poll() is None:
            workers = _children(proc.pid)
            if len(workers) >= 2:           # two K-means workers (plus loky's resource tracker) are up
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the calibration subprocess ended on its own"
        assert len(workers) >= 2, f"no worker processes appeared (children: {workers})"
        time.sleep(0.5)
        workers |= _children(proc.pid)
        proc.send_signal(sig)
        proc.wait(timeout=30)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(_alive(p) for p in workers):
            time.sleep(0.1)
        survivors = [p for p in workers if _alive(p)]
        assert not survivors, f"processes survived their parent by 5 s: {survivors}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
