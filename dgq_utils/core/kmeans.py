"""K-means for DGQ's groups: scikit-learn fits of (min, max) points, canonical labels, run many at once.

This module imports only numpy and scikit-learn (no torch), so the worker processes that
:func:`kmeans_many` starts are cheap to spawn. :func:`dgq_utils.core.grouping.assign_groups` and
:func:`~dgq_utils.core.grouping.assign_groups_many` are the entry points that take activation statistics.
"""
from __future__ import annotations

import hashlib
import math
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


def kmeans_many(jobs: Sequence[tuple[np.ndarray, int, int]], *, n_jobs: int = 1,
                min_parallel: int = 64) -> list[np.ndarray]:
    """:func:`kmeans_ids` for every ``(points, k, seed)``, in order. Inputs seen before come from the memo;
    the others run in ``n_jobs`` loky worker processes when there are at least ``min_parallel`` of them."""
    keys = [_key(p, k, s) for p, k, s in jobs]
    out: list[np.ndarray | None] = [None] * len(jobs)
    new: dict[bytes, list[int]] = {}
    for i, key in enumerate(keys):
        hit = _memo.get(key)
        if hit is not None:
            _memo.move_to_end(key)
            out[i] = hit.copy()
        else:
            new.setdefault(key, []).append(i)
    payload = [jobs[idx[0]] for idx in new.values()]
    workers = min(int(n_jobs), max(1, len(payload) // 16))
    if workers <= 1 or len(payload) < min_parallel:
        labels = kmeans_chunk(payload)
    else:
        from joblib import Parallel, delayed

        size = math.ceil(len(payload) / (4 * workers))
        chunks = [payload[a:a + size] for a in range(0, len(payload), size)]
        labels = [ids for part in Parallel(n_jobs=workers, backend="loky")(delayed(kmeans_chunk)(c) for c in chunks)
                  for ids in part]
    for (key, idx), ids in zip(new.items(), labels):
        _memo[key] = ids
        for i in idx:
            out[i] = ids.copy()
    while len(_memo) > MEMO_SIZE:
        _memo.popitem(last=False)
    return out  # type: ignore[return-value]
