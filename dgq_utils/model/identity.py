"""Which model is this? A stable identity for cache keys: an explicit id, a local folder's path and fingerprint,
the pipeline's ``name_or_path``, or a hash of the weights in memory."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

__all__ = ["folder_fingerprint", "model_fingerprint", "model_identity", "runtime_identity"]


def model_fingerprint(pipe) -> str:
    """SHA-256 (16 hex digits) of every parameter and buffer of the pipeline's models, in name order.

    Used as the model id when the pipeline has no ``name_or_path`` (e.g. a tiny random pipeline built in
    memory). Call it on the *FP* pipeline: quantization may change weights in place.
    """
    h = hashlib.sha256()
    for comp_name in sorted(pipe.components):
        comp = pipe.components[comp_name]
        if not isinstance(comp, torch.nn.Module):
            continue
        for name, t in sorted(comp.state_dict().items()):
            h.update(f"{comp_name}.{name}:{tuple(t.shape)}:{t.dtype}".encode())
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return "fingerprint:" + h.hexdigest()[:16]


def folder_fingerprint(folder: str | os.PathLike) -> str:
    """16 hex digits over (relative path, size, mtime) of every file below ``folder`` — changes when a model
    folder is retrained or replaced, without reading gigabytes of weights."""
    root = Path(folder)
    h = hashlib.sha256()
    for p in sorted(q for q in root.rglob("*") if q.is_file()):
        st = p.stat()
        h.update(f"{p.relative_to(root)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def model_identity(pipe, model_id: str | None = None) -> str:
    """``model_id`` if given; else, for a pipeline loaded from a local folder, ``<absolute path>@<folder
    fingerprint>`` (so a retrained model never reuses old cached images); else the pipeline's ``name_or_path``;
    else :func:`model_fingerprint` of the weights in memory."""
    if model_id:
        return str(model_id)
    nop = getattr(pipe, "name_or_path", None) or getattr(getattr(pipe, "config", {}), "get", lambda k: None)(
        "_name_or_path")
    if nop:
        p = Path(nop)
        return f"{p.resolve()}@{folder_fingerprint(p)}" if p.is_dir() else str(nop)
    return model_fingerprint(pipe)


def runtime_identity(pipe) -> dict:
    """Where and in what precision the UNet runs (``{"device": "cpu"|"cuda"|..., "dtype": "torch.float32"}``):
    part of the image and calibrated-state cache keys, since the same model makes different numbers on another
    device or dtype."""
    unet = pipe.unet
    return {"device": unet.device.type, "dtype": str(unet.dtype)}
