"""Load a Stable-Diffusion pipeline: the embedded default shipped in ``data/embedded``, or any SD v1.x.

``load_pipeline()`` with no argument returns the small SD-architecture model trained on the synthetic
captioned world (see ``data/embedded/README.md``), fully offline. ``load_pipeline("CompVis/stable-diffusion-
v1-4")`` or ``load_pipeline("/path/to/sd-v1-4")`` loads a real checkpoint. Nothing here downloads: hub ids
are resolved with ``local_files_only=True`` (the Hugging Face cache under ``HF_HOME`` only), and a model
that is not available locally fails at once with :class:`ModelNotAvailableOffline` (a
``FileNotFoundError``) saying how to point at local weights. No environment variable or other global
setting is changed.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from dgq_utils import paths

EMBEDDED_DIR = paths.embedded_dir()
EMBEDDED_PIPELINE_DIR = EMBEDDED_DIR / "pipeline"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


class ModelNotAvailableOffline(FileNotFoundError):
    """The requested model is neither a local folder nor in the local Hugging Face cache."""


def _offline_message(model_id: str) -> str:
    return (
        f"'{model_id}' is not available offline. Download it on a machine with internet "
        f"(huggingface-cli download {model_id}) and pass the local folder path, or set HF_HOME to a cache "
        f"that has it. (load_pipeline() with no argument loads the embedded model shipped in data/embedded.)"
    )


def resolve_model_path(model_id_or_path: str | Path | None = None) -> Path:
    """The local folder holding the pipeline (embedded default, a local path, or a cached hub snapshot)."""
    if model_id_or_path is None:
        if not (EMBEDDED_PIPELINE_DIR / "model_index.json").exists():
            raise ModelNotAvailableOffline(
                f"The embedded model is missing: {EMBEDDED_PIPELINE_DIR} has no model_index.json. Restore "
                f"data/embedded from the repository or retrain it with `python scripts/train_embedded.py "
                f"--out data/embedded --device cuda`."
            )
        return EMBEDDED_PIPELINE_DIR
    p = Path(model_id_or_path).expanduser()
    if p.exists():
        if not (p / "model_index.json").exists():
            raise FileNotFoundError(f"{p} exists but is not a diffusers pipeline folder (no model_index.json).")
        return p
    name = str(model_id_or_path)
    if not _HUB_ID.match(name):
        raise FileNotFoundError(f"No such pipeline folder: {p}")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, local_files_only=True))
    except Exception as err:  # LocalEntryNotFoundError, OfflineModeIsEnabled, ... : all mean "not cached"
        raise ModelNotAvailableOffline(_offline_message(name)) from err


def load_pipeline(model_id_or_path: str | Path | None = None, *, device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.float32, **kwargs):
    """A ``StableDiffusionPipeline`` on ``device`` in ``dtype`` (float32 on the CPU by default).

    ``model_id_or_path``: None (embedded model), a local diffusers folder, or a hub id already in the local
    cache. Extra keyword arguments go to ``from_pretrained``; the safety checker is not loaded unless the
    caller passes one.
    """
    from diffusers import StableDiffusionPipeline

    path = resolve_model_path(model_id_or_path)
    kwargs.setdefault("safety_checker", None)
    kwargs.setdefault("requires_safety_checker", False)
    try:
        pipe = StableDiffusionPipeline.from_pretrained(str(path), dtype=dtype, local_files_only=True,
                                                       **kwargs)
    except (OSError, EnvironmentError) as err:
        if model_id_or_path is not None and not Path(str(model_id_or_path)).expanduser().exists():
            raise ModelNotAvailableOffline(_offline_message(str(model_id_or_path))) from err
        raise
    return pipe.to(device)
