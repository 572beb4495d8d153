"""Generation sharded over processes: same images as one process, calibration once, resume after a killed rank."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dgq_utils.generate.images import load_manifest
from dgq_utils.generate.sharding import Shard

ROOT = Path(__file__).resolve().parents[1]


@given(n=st.integers(0, 50), world=st.integers(1, 8))
def test_split_partitions_the_items_in_order_like_accelerate(n, world):
    items = list(range(n))
    parts = [Shard(r, world).split(items) for r in range(world)]
    assert sum(parts, []) == items  # every item once, in order
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_shard_rejects_bad_ranks():
    with pytest.raises(ValueError, match="rank"):
        Shard(2, 2)
    with pytest.raises(ValueError, match="world_size"):
        Shard(0, 0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(out: Path, nproc: int, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    mod = ["-m", "dgq_utils.testing.sharded_run", str(out), *extra]
    if nproc == 1:
        cmd = [sys.executable, *mod]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), *mod]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)


def _manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("one")
    r = _run(out, 1)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def test_two_processes_make_the_same_images_as_one_and_calibrate_once(single, tmp_path):
    r = _run(tmp_path, 2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert _manifest(tmp_path) == _manifest(single)  # bit-identical PNGs (sha256 per file)
    ranks = [json.loads((tmp_path / f"rank{k}.json").read_text()) for k in (0, 1)]
    assert [x["world_size"] for x in ranks] == [2, 2]
    assert ranks[0]["calibrated"] and not ranks[1]["calibrated"]  # rank 1 loaded rank 0's state
    done = ranks[0]["generated"] + ranks[1]["generated"]
    assert sorted(done) == sorted(_manifest(single)) and len(set(done)) == len(done)  # split, nothing twice
    images = sorted(p.name for p in (tmp_path / "cache").rglob("*.png"))
    assert len(images) == len(_manifest(single))


def test_a_killed_rank_resumes_with_nothing_lost_or_duplicated(single, tmp_path):
    killed = _run(tmp_path, 2, "--die-after", "2")
    assert killed.returncode != 0  # the launcher reports the dead rank
    # images with a manifest record survive the kill; a file written just before the kill but not yet recorded
    # is regenerated (the runner cannot know it is complete)
    (folder,) = [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]
    before = {Path(f).name for f in load_manifest(folder)["file"]}
    assert 0 < len(before) < len(_manifest(single))
    r = _run(tmp_path, 2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert _manifest(tmp_path) == _manifest(single)
    ranks = [json.loads((tmp_path / f"rank{k}.json").read_text()) for k in (0, 1)]
    regenerated = {Path(f).name for x in ranks for f in x["generated"]}
    assert not regenerated & before  # finished images were reused, not made again
    assert regenerated | before == {Path(f).name for f in _manifest(single)}
    assert not any(x["calibrated"] for x in ranks)  # the saved state was reused
