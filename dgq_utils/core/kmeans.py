"""K-means for DGQ's groups: scikit-learn fits of (min, max) points, canonical labels, run many at once.

This module imports only numpy and scikit-learn (no torch), so the worker processes that
:func:`kmeans_many` starts are cheap to spawn. :func:`dgq_utils.core.grouping.assign_groups` and
:func:`~dgq_utils.core.grouping.assign_groups_many` are the entry points that take activation statistics.
Worker processes end with the process that started them (killed or interrupted) and exit after
:data:`WORKER_IDLE_TIMEOUT` idle seconds.
"""
from __future__ import annotations

import hashlib
import math
import os
import threading
import time
import warnings
from collections import OrderedDict
from typing import Sequence

import numpy as np

#: Fits remembered by :func:`kmeans_many` (input points, K, seed) -> labels; least recently used dropped first.
MEMO_SIZE = 50_000
_memo: OrderedDict[bytes, np.ndarray] = OrderedDict()


def _canonical_labels(labels: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Renumber cluster labels 0..k_eff-1 by (mean max, mean min, smallest member index) ascending."""
    uniq, inv = np.unique(labels, return_inverse=True)
    k_eff = len(uniq)
    counts = np.bincount(inv, minlength=k_eff).astype(np.float64)
    mean_min = np.bincount(inv, weights=points[:, 0].astype(np.float64), minlength=k_eff) / counts
    mean_max = np.bincount(inv, weights=points[:, 1].astype(np.float64), minlength=k_eff) / counts
    first = np.full(k_eff, len(labels), dtype=np.int64)
    np.minimum.at(first, inv, np.arange(len(labels)))
    order = np.lexsort((first, mean_min, mean_max))  # last key is primary
    rank = np.empty(k_eff, dtype=np.int64)
    rank[order] = np.arange(k_eff)
    return rank[inv]



def kmeans_ids(points: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Canonical K-means labels of ``points`` ((n, 2) float32): one k-means++ run, ``random_state=seed``."""
    # scikit-learn is heavy: imported by the process (or worker) that fits, not by importing this module
    from sklearn.cluster import KMeans
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings():
        # "Number of distinct clusters (m) found smaller than n_clusters (k)": the top ids simply stay empty.
        warnings.simplefilter("ignore", ConvergenceWarning)
        km = KMeans(n_clusters=k, random_state=seed, n_init=1, init="k-means++")
        labels = km.fit_predict(points)
    return _canonical_labels(np.asarray(labels), points)


def kmeans_chunk(chunk: Sequence[tuple[np.ndarray, int, int]]) -> list[np.ndarray]:
    """:func:`kmeans_ids` of every ``(points, k, seed)`` of ``chunk`` (the unit of work of one worker call)."""
    return [kmeans_ids(points, k, seed) for points, k, seed in chunk]


def _key(points: np.ndarray, k: int, seed: int) -> bytes:
    h = hashlib.blake2b(np.ascontiguousarray(points).tobytes(), digest_size=20)
    h.update(f"{points.shape}|{points.dtype}|{k}|{seed}".encode())
    return h.digest()


def clear_memo() -> None:
    _memo.clear()


# -- a folder that keeps the fits across processes -----------------------------------------------------------------
_store: dict = {"folder": None, "loaded": set()}


def set_store(folder: str | os.PathLike | None) -> None:
    """Keep every new fit of :func:`kmeans_many` in ``folder`` too (``None``: memory only), and answer from the
    fits stored there by earlier processes: notebooks 04 and 06 of the report fit the same groups (same
    statistics, K and seed give the same labels), and 06 runs in another process. One ``.npz`` file per call
    that made new fits, written atomically; a damaged file is ignored (its fits are simply made again)."""
    _store["folder"] = None if folder is None else os.fspath(folder)
    _store["loaded"] = set()


def _load_store() -> None:
    folder = _store["folder"]
    if folder is None or not os.path.isdir(folder):
        return
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".npz") or name in _store["loaded"]:
            continue
        try:
            with np.load(os.path.join(folder, name)) as z:
                keys, sizes, flat = z["keys"], z["sizes"], z["labels"]
            offsets = np.concatenate([[0], np.cumsum(sizes)])
            for i, key in enumerate(keys):
                _memo.setdefault(bytes(key), flat[offsets[i]:offsets[i + 1]].astype(np.int64))
        except Exception:  # noqa: BLE001 - a damaged or half-copied file: its fits are made again
            continue
        _store["loaded"].add(name)


def _save_store(fits: dict[bytes, np.ndarray]) -> None:
    folder = _store["folder"]
    if folder is None or not fits:
        return
    os.makedirs(folder, exist_ok=True)
    keys = list(fits)
    h = hashlib.blake2b(b"".join(keys), digest_size=16).hexdigest()
    name = f"{h}.npz"
    labels = [fits[k] for k in keys]
    tmp = os.path.join(folder, f".{h}.tmp-{os.getpid()}.npz")
    np.savez(tmp, keys=np.array(keys, dtype="S20"), sizes=np.array([len(x) for x in labels], dtype=np.int64),
             labels=np.concatenate(labels).astype(np.int16) if labels else np.zeros(0, np.int16))
    os.replace(tmp, os.path.join(folder, name))
    _store["loaded"].add(name)


#: idle worker processes exit after this many seconds (loky's default is 300: minutes of stray processes)
WORKER_IDLE_TIMEOUT = 10
#: how often a worker checks that the process that started it is still alive
PARENT_POLL_SECONDS = 0.25


def _exit_with_parent(parent_pid: int) -> None:
    """Worker initializer: a daemon thread ends this worker as soon as its parent is gone.

    loky's workers outlive a parent killed with SIGKILL (or one whose interpreter is torn down abruptly): they
    wait on the call queue until their idle timeout, holding the parent's stdout/stderr pipes open. The thread
    polls the parent pid and ``os._exit``-s when it no longer exists or this process was re-parented.
    (Hand-written because loky offers no parent-death option; ``prctl(PR_SET_PDEATHSIG)`` fires on the death of
    the *thread* that spawned the worker, which for loky can be its manager thread, and is Linux-only.)"""
    start_ppid = os.getppid()

    def watch():
        while True:
            try:
                os.kill(parent_pid, 0)
                alive = os.getppid() == start_ppid
            except ProcessLookupError:
                alive = False
            except PermissionError:  # exists, owned by someone else: cannot be ours, but do not guess
                alive = True
            if not alive:
                os._exit(1)
            time.sleep(PARENT_POLL_SECONDS)

    threading.Thread(target=watch, name="dgq-exit-with-parent", daemon=True).start()


def _run_in_workers(chunks: list, workers: int) -> list:
    """``kmeans_chunk`` of every chunk in loky worker processes that end with this process (see
    :func:`_exit_with_parent`); an interrupt (KeyboardInterrupt, any error) kills the workers before re-raising."""
    from joblib.externals.loky import get_reusable_executor

    executor = get_reusable_executor(max_workers=workers, timeout=WORKER_IDLE_TIMEOUT,
                                     initializer=_exit_with_parent, initargs=(os.getpid(),))
    try:
        return list(executor.map(kmeans_chunk, chunks))
    except BaseException:
        executor.shutdown(wait=False, kill_workers=True)
        raise


def _fit_new(jobs, keys: list[bytes], n_jobs: int, min_parallel: int) -> None:
    """Fit the jobs whose key is not in the memo (one fit per distinct key) and keep them (memo and store)."""
    new: dict[bytes, int] = {}
    for i, key in enumerate(keys):
        if key not in _memo:
            new.setdefault(key, i)
    if not new:
        return
    payload = [jobs[i] for i in new.values()]
    workers = min(int(n_jobs), max(1, len(payload) // 16))
    if workers <= 1 or len(payload) < min_parallel:
        labels = kmeans_chunk(payload)
    else:
        size = math.ceil(len(payload) / (4 * workers))
        chunks = [payload[a:a + size] for a in range(0, len(payload), size)]
        labels = [ids for part in _run_in_workers(chunks, workers) for ids in part]
    for key, ids in zip(new, labels):
        _memo[key] = ids
    _save_store({key: _memo[key] for key in new})


def kmeans_many(jobs: Sequence[tuple[np.ndarray, int, int]], *, n_jobs: int = 1,
                min_parallel: int = 64) -> list[np.ndarray]:
    """:func:`kmeans_ids` for every ``(points, k, seed)``, in order. Inputs seen before come from the memo (and
    the folder of :func:`set_store`, if set); the others run in ``n_jobs`` loky worker processes when there are
    at least ``min_parallel`` of them.

    With a store folder, two processes asking for the same new fits at the same time (notebooks 04 and 06 of the
    report in two lanes) do not both make them: the fits are made under a file lock named by the set of new
    inputs, and the process that waited answers from the store."""
    keys = [_key(p, k, s) for p, k, s in jobs]
    if any(key not in _memo for key in keys):
        _load_store()
    missing = sorted({key for key in keys if key not in _memo})
    folder = _store["folder"]
    if missing and folder is not None:
        from filelock import FileLock  # only with a store: the engine's other uses need no lock

        os.makedirs(os.path.join(folder, ".locks"), exist_ok=True)
        name = hashlib.blake2b(b"".join(missing), digest_size=16).hexdigest()
        with FileLock(os.path.join(folder, ".locks", f"{name}.lock")):
            _load_store()  # made by the process we waited for, if any
            _fit_new(jobs, keys, n_jobs, min_parallel)
    else:
        _fit_new(jobs, keys, n_jobs, min_parallel)
    out = []
    for key in keys:
        _memo.move_to_end(key)
        out.append(_memo[key].copy())
    while len(_memo) > MEMO_SIZE:
        _memo.popitem(last=False)
    return out  # type: ignore[return-value]
