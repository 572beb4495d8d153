"""Weight range searches remembered by content: the same weight and weight config give the same parameters.

Every W8 recipe of the report (baseline and DGQ, W8A8 and W8A6, and the ablation variants) searches the same
per-channel ranges of the same FP weights; the official MSE search scores 80 candidate ranges per channel with
``|Q(w) - w|^2.4`` and is most of a CPU calibration's weight time. :func:`memo_weight_qparams` answers a repeated
``(weight bytes, bits, granularity, symmetric, range_method)`` from memory instead.

AdaRound results (:func:`memo_adaround`) are remembered the same way, keyed by everything the optimisation reads:
the weight bytes, its grid (scale / zero point bytes, bits, symmetric), the input rows' bytes and every AdaRound
setting -- so two recipes that differ only in what AdaRound does not see (e.g. W4A8 and W4A6, whose weights
are reconstructed on the same FP-upstream inputs) learn each layer's rounding once. Nearest-rounding parameters
do not depend on the rounding, so the range-search key does not name it.

Only CPU weights are remembered: the key is a hash of the weight's bytes (cheap next to the search on the CPU; on
a GPU it would cost a device-to-host copy of every weight, and the search there is fast). Results are returned as
fresh copies, so a caller that modifies them does not change the memo.
"""
from __future__ import annotations

import dataclasses
import hashlib
import threading
from collections import OrderedDict

import torch
from torch import Tensor

from dgq_utils.core.adaround import AdaRoundResult, adaround
from dgq_utils.core.quantizers import weight_qparams

__all__ = ["MEMO_SIZE", "ROUNDING_MEMO_ELEMENTS", "clear_weight_memo", "memo_adaround", "memo_weight_qparams",
           "weight_memo_info"]

#: remembered searches (one per layer and weight config); least recently used dropped first
MEMO_SIZE = 4096

_memo: OrderedDict[bytes, tuple[Tensor, Tensor]] = OrderedDict()
_lock = threading.Lock()
_counts = {"hits": 0, "misses": 0}
#: remembered AdaRound masks, at most this many weight elements in all (one bool each)
ROUNDING_MEMO_ELEMENTS = 2**27
_rounding: OrderedDict[bytes, AdaRoundResult] = OrderedDict()
_rounding_counts = {"rounding_hits": 0, "rounding_misses": 0}


def _bytes(t: Tensor) -> bytes:
    t = t.detach().contiguous()
    return t.view(torch.uint8).reshape(-1).numpy().tobytes() if t.numel() else b""


def memo_adaround(w: Tensor, scale: Tensor, zero_point: Tensor, bits: int, x: Tensor, *, symmetric: bool = False,
                  **settings) -> AdaRoundResult:
    """:func:`~dgq_utils.core.adaround.adaround` of ``w`` on rows ``x``, from memory when the same weight, grid,
    rows and settings were optimised before in this process (CPU tensors only). Returns a fresh copy."""
    if w.device.type != "cpu" or x.device.type != "cpu":
        return adaround(w, scale, zero_point, bits, x, symmetric=symmetric, **settings)
    h = hashlib.blake2b(digest_size=20)
    for t in (w, scale, zero_point, x):
        h.update(f"{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(_bytes(t))
    h.update(f"{int(bits)}|{bool(symmetric)}|{sorted(settings.items())}".encode())
    key = h.digest()
    with _lock:
        hit = _rounding.get(key)
        if hit is not None:
            _rounding.move_to_end(key)
            _rounding_counts["rounding_hits"] += 1
            return dataclasses.replace(hit, round_up=hit.round_up.clone())
    res = adaround(w, scale, zero_point, bits, x, symmetric=symmetric, **settings)
    with _lock:
        _rounding_counts["rounding_misses"] += 1
        _rounding[key] = dataclasses.replace(res, round_up=res.round_up.clone())
        while len(_rounding) > 1 and sum(r.round_up.numel() for r in _rounding.values()) > ROUNDING_MEMO_ELEMENTS:
            _rounding.popitem(last=False)
    return res


def _key(w: Tensor, bits: int, granularity: str, symmetric: bool, range_method: str) -> bytes:
    data = w.detach().contiguous()
    h = hashlib.blake2b(digest_size=20)
    h.update(data.view(torch.uint8).reshape(-1).numpy().tobytes() if data.numel() else b"")
    h.update(f"{tuple(data.shape)}|{data.dtype}|{int(bits)}|{granularity}|{bool(symmetric)}|{range_method}".encode())
    return h.digest()


def memo_weight_qparams(w: Tensor, bits: int, *, granularity: str = "per_channel", symmetric: bool = False,
                        range_method: str = "minmax") -> tuple[Tensor, Tensor]:
    """:func:`~dgq_utils.core.quantizers.weight_qparams` of ``w``, from memory when the same weight bytes were
    searched with the same settings before in this process (CPU weights only; others are searched each time)."""
    if w.device.type != "cpu":
        return weight_qparams(w, bits, granularity=granularity, symmetric=symmetric, range_method=range_method)
    key = _key(w, bits, granularity, symmetric, range_method)
    with _lock:
        hit = _memo.get(key)
        if hit is not None:
            _memo.move_to_end(key)
            _counts["hits"] += 1
            return hit[0].clone(), hit[1].clone()
    scale, zp = weight_qparams(w, bits, granularity=granularity, symmetric=symmetric, range_method=range_method)
    with _lock:
        _counts["misses"] += 1
        _memo[key] = (scale.clone(), zp.clone())
        while len(_memo) > MEMO_SIZE:
            _memo.popitem(last=False)
    return scale, zp


def clear_weight_memo() -> None:
    with _lock:
        _memo.clear()
        _counts.update(hits=0, misses=0)
        _rounding.clear()
        _rounding_counts.update(rounding_hits=0, rounding_misses=0)


def weight_memo_info() -> dict:
    """``{"entries", "hits", "misses", "rounding_entries", "rounding_hits", "rounding_misses"}`` of this
    process's memo."""
    with _lock:
        return {"entries": len(_memo), **_counts, "rounding_entries": len(_rounding), **_rounding_counts}
