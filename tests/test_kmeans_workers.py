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
    from dgq_utils.config import SamplerSettings
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


def _thread_counts(_chunk):
    """In a worker: the thread count of every loaded OpenMP / BLAS runtime, and the OpenMP environment."""
    from threadpoolctl import threadpool_info

    return os.environ.get("OMP_NUM_THREADS"), sorted({i["num_threads"] for i in threadpool_info()})


def _loky_workers() -> list[int]:
    """This process's live loky worker processes."""
    out = []
    for p in _children(os.getpid()):
        try:
            if _alive(p) and b"LokyProcess" in Path(f"/proc/{p}/cmdline").read_bytes():
                out.append(p)
        except OSError:
            pass
    return out


def test_workers_run_one_thread_per_fit_from_their_start():
    # 16 workers x 16 OpenMP threads on 16 CPUs made the GPU machine's K-means calibration crawl (the "stall")
    from dgq_utils.core import kmeans

    out = kmeans.run_in_workers(_thread_counts, [None, None], 2)
    assert out == [("1", [1]), ("1", [1])]


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc to list child processes")
def test_stalled_workers_raise_a_clear_error_and_are_stopped():
    from dgq_utils.core import kmeans

    t0 = time.monotonic()
    with pytest.raises(kmeans.KMeansStalled, match=r"no chunk of fits in 1 s \(0 of 2 chunks done\).*"
                                                  r"DGQ_KMEANS_JOBS=1.*DGQ_KMEANS_TIMEOUT"):
        kmeans.run_in_workers(time.sleep, [60, 60], 2, timeout=1)
    assert time.monotonic() - t0 < 30
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _loky_workers():
        time.sleep(0.1)
    assert not _loky_workers(), "the stalled workers were not stopped"
    # the next call gets fresh workers
    assert kmeans.run_in_workers(_thread_counts, [None], 2)[0][0] == "1"


def test_stall_timeout_reads_the_environment(monkeypatch):
    from dgq_utils.core import kmeans

    monkeypatch.delenv("DGQ_KMEANS_TIMEOUT", raising=False)
    assert kmeans.stall_timeout() == kmeans.STALL_TIMEOUT
    monkeypatch.setenv("DGQ_KMEANS_TIMEOUT", "0")
    assert kmeans.stall_timeout() is None
    monkeypatch.setenv("DGQ_KMEANS_TIMEOUT", "12.5")
    assert kmeans.stall_timeout() == 12.5
    for bad in ("soon", "-1", "inf"):
        monkeypatch.setenv("DGQ_KMEANS_TIMEOUT", bad)
        with pytest.raises(ValueError, match="DGQ_KMEANS_TIMEOUT"):
            kmeans.stall_timeout()
