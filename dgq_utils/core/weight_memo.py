"""Weight range searches remembered by content: the same weight and weight config give the same parameters.

Every W8 recipe of the report (baseline and DGQ, W8A8 and W8A6, and the ablation variants) searches the same
per-channel ranges of the same FP weights; the official MSE search scores 80 candidate ranges per channel with
``|Q(w) - w|^2.4`` and is most of a CPU calibration's weight time. :func:`memo_weight_qparams` answers a repeated
``(weight bytes, bits, granularity, symmetric, range_method)`` from memory instead.

Only CPU weights are remembered: the key is a hash of the weight's bytes (cheap next to the search on the CPU; on
a GPU it would cost a device-to-host copy of every weight, and the search there is fast). Results are returned as
fresh copies, so a caller that modifies them does not change the memo.
"""
from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict

import torch
from torch import Tensor

from dgq_utils.core.quantizers import weight_qparams

__all__ = ["MEMO_SIZE", "clear_weight_memo", "memo_weight_qparams", "weight_memo_info"]

#: remembered searches (one per layer and weight config); least recently used dropped first
MEMO_SIZE = 4096

_memo: OrderedDict[bytes, tuple[Tensor, Tensor]] = OrderedDict()
_lock = threading.Lock()
_counts = {"hits": 0, "misses": 0}


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


def weight_memo_info() -> dict:
    """``{"entries", "hits", "misses"}`` of this process's memo."""
    with _lock:
        return {"entries": len(_memo), **_counts}
