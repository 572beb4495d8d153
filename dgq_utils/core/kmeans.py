"""K-means for DGQ's groups: scikit-learn fits of (min, max) points, canonical labels, run many at once.

This module imports only numpy and scikit-learn (no torch), so the worker processes that
:func:`kmeans_many` starts are cheap to spawn. :func:`dgq_utils.core.grouping.assign_groups` and
:func:`~dgq_utils.core.grouping.assign_groups_many` are the entry points that take activation statistics.
Worker processes end with the process that started them (killed or interrupted) and exit after
:data:`WORKER_IDLE_TIMEOUT` idle seconds; :func:`prestart_workers` starts them ahead of time (calibration does
while the GPU runs its passes), so a later :func:`kmeans_many` does not wait for their start and imports.

Threads: every fit runs with **one OpenMP thread** (in the workers and in-process). scikit-learn's Lloyd iterations
sum each cluster's points in per-thread buffers and add the buffers up in whatever order the threads finish, so
with several threads the centres (and, at a near-tie, a label) can differ from run to run; one thread gives the
single-threaded result every time -- the same labels as ``OMP_NUM_THREADS=1`` -- and, with one fit per core in
the worker processes, no oversubscription (16 workers x 16 OpenMP threads spinning on 16 cores made every fit
several times slower; on 2 cores, 2 workers x 8 threads ran 256 fits 16-19x slower than 2 x 1 -- the "stall" of
the K-means calibration seen on the 16-CPU GPU machine before this cap).

Never a hang: the workers get ``OMP_NUM_THREADS=1`` (and the BLAS equivalents) in their environment before any
library loads, on top of the runtime limit their initializer sets; they are started by loky's own context
(fork + exec, so a parent that has initialised CUDA is never forked as is); and a call whose workers finish no
chunk of fits for :func:`stall_timeout` seconds (``DGQ_KMEANS_TIMEOUT``, default :data:`STALL_TIMEOUT`) kills
them and raises :class:`KMeansStalled`, which says how to fit in-process instead.
"""
from __future__ import annotations

import concurrent.futures
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


def _load_sklearn() -> None:
    """Import scikit-learn's K-means (and so its OpenMP runtime): thread limits apply to loaded libraries only."""
    import sklearn.cluster  # noqa: F401


def single_threaded():
    """A context manager limiting the loaded OpenMP and BLAS runtimes to one thread (scikit-learn loaded first)."""
    from threadpoolctl import threadpool_limits

    _load_sklearn()
    return threadpool_limits(limits=1)


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


def _worker_init(parent_pid: int) -> None:
    """Worker initializer: end with the parent (:func:`_exit_with_parent`); import scikit-learn now and keep
    every fit of this worker on one thread (see the module docstring)."""
    _exit_with_parent(parent_pid)
    single_threaded()  # not restored: the limit holds for the worker's life


def _warm() -> int:
    return os.getpid()


#: environment of every worker process, set before any module loads (one thread per fit, from the start)
WORKER_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
              "BLIS_NUM_THREADS": "1", "VECLIB_MAXIMUM_THREADS": "1", "NUMEXPR_NUM_THREADS": "1"}

#: default seconds a worker call may go without one chunk of fits finishing before it is declared stalled
STALL_TIMEOUT = 300.0


class KMeansStalled(RuntimeError):
    """The K-means worker processes finished no chunk of fits within :func:`stall_timeout` seconds."""


def stall_timeout() -> float | None:
    """Seconds :func:`run_in_workers` waits for the next chunk before raising :class:`KMeansStalled`: the
    ``DGQ_KMEANS_TIMEOUT`` environment variable (``0``: wait forever), else :data:`STALL_TIMEOUT`."""
    env = os.environ.get("DGQ_KMEANS_TIMEOUT", "").strip()
    if not env:
        return STALL_TIMEOUT
    try:
        value = float(env)
    except ValueError:
        raise ValueError(f"DGQ_KMEANS_TIMEOUT must be a number of seconds (0: no timeout); got {env!r}.") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"DGQ_KMEANS_TIMEOUT must be a number of seconds >= 0 (0: no timeout); got {env!r}.")
    return value or None


def _executor(workers: int):
    from joblib.externals.loky import get_reusable_executor
    from joblib.externals.loky.backend.context import get_context

    # "loky": fork + exec (a fresh interpreter, like spawn), whatever the multiprocessing default is; the only
    # context where ``env`` applies
    return get_reusable_executor(max_workers=workers, timeout=WORKER_IDLE_TIMEOUT, context=get_context("loky"),
                                 initializer=_worker_init, initargs=(os.getpid(),), env=dict(WORKER_ENV))


def prestart_workers(n_jobs: int) -> None:
    """Start ``n_jobs`` worker processes now (scikit-learn imported in each), without waiting for them; calling it
    again keeps them from their idle exit. No-op for ``n_jobs <= 1``. A later :func:`kmeans_many` with as many
    workers reuses them."""
    if int(n_jobs) <= 1:
        return
    executor = _executor(int(n_jobs))
    for _ in range(int(n_jobs)):
        executor.submit(_warm)


def run_in_workers(fn, chunks: list, workers: int, *, timeout: float | None = None) -> list:
    """``fn(chunk)`` of every chunk, in order, in ``workers`` loky worker processes that end with this process
    (see :func:`_exit_with_parent`). ``timeout``: seconds without any chunk finishing (default
    :func:`stall_timeout`; ``None`` or 0 from there: no limit) before the workers are killed and
    :class:`KMeansStalled` is raised. An interrupt (KeyboardInterrupt, any error) kills the workers before
    re-raising."""
    limit = stall_timeout() if timeout is None else (float(timeout) or None)
    executor = _executor(workers)
    try:
        futures = [executor.submit(fn, chunk) for chunk in chunks]
        pending = set(futures)
        while pending:
            done, pending = concurrent.futures.wait(pending, timeout=limit,
                                                    return_when=concurrent.futures.FIRST_COMPLETED)
            if not done:
                raise KMeansStalled(
                    f"K-means worker processes ({workers}) finished no chunk of fits in {limit:g} s "
                    f"({len(futures) - len(pending)} of {len(futures)} chunks done); they were stopped. Fit in "
                    "this process with DGQ_KMEANS_JOBS=1 (or n_jobs=1), use fewer workers, or raise the limit "
                    "with DGQ_KMEANS_TIMEOUT=<seconds> (0: none).")
            for f in done:
                f.result()  # a worker's error, raised now
        return [f.result() for f in futures]
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
        with single_threaded():
            labels = kmeans_chunk(payload)
    else:
        size = math.ceil(len(payload) / (4 * workers))
        chunks = [payload[a:a + size] for a in range(0, len(payload), size)]
        labels = [ids for part in run_in_workers(kmeans_chunk, chunks, workers) for ids in part]
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
