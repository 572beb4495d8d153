"""Load a Stable-Diffusion text-to-image pipeline: the embedded default shipped in ``data/embedded``, or a real
SD 1.x / 2.x (epsilon or v-prediction) / SDXL / SDXL-Turbo checkpoint folder.

``load_pipeline()`` with no argument returns the small SD-architecture model trained on the synthetic
captioned world (see ``data/embedded/README.md``), fully offline. ``load_pipeline("CompVis/stable-diffusion-
v1-4")`` or ``load_pipeline("/path/to/sd-v1-4")`` loads a real checkpoint. Nothing here downloads: hub ids
are resolved with ``local_files_only=True`` (the Hugging Face cache under ``HF_HOME`` only), and a model
that is not available locally fails at once with :class:`ModelNotAvailableOffline` (a
``FileNotFoundError``) saying how to point at local weights. No environment variable or other global
setting is changed.

Which pipeline class is built comes from the folder's ``model_index.json``: ``StableDiffusionPipeline`` (SD 1.x
and 2.x) or ``StableDiffusionXLPipeline`` (SDXL and SDXL-Turbo), always with a ``UNet2DConditionModel`` denoiser
-- the network DGQ quantizes. Anything else (a DiT/MMDiT such as SD3, Flux or PixArt, an image-to-image or
inpainting pipeline, a UNet of another class) is refused with :class:`UnsupportedPipeline` saying why.
:func:`model_family` names the family (``sd1``, ``sd2``, ``sdxl``, ``sdxl-turbo``, ``embedded``) and
:data:`FAMILY_SAMPLER_DEFAULTS` the sampler settings each is normally run with (SDXL-Turbo: 4 steps, guidance 0).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from dgq_utils import paths
from dgq_utils.config import validation as V

EMBEDDED_DIR = paths.embedded_dir()
EMBEDDED_PIPELINE_DIR = EMBEDDED_DIR / "pipeline"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


#: the text-to-image pipeline classes whose UNet the engine quantizes
SUPPORTED_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")

#: sampler settings each family is normally run with (what the paper and the model cards use)
FAMILY_SAMPLER_DEFAULTS = {
    "embedded": {"num_inference_steps": 25, "guidance_scale": 7.5},
    "sd1": {"num_inference_steps": 25, "guidance_scale": 7.5},
    "sd2": {"num_inference_steps": 25, "guidance_scale": 7.5},
    "sdxl": {"num_inference_steps": 25, "guidance_scale": 5.0},
    "sdxl-turbo": {"num_inference_steps": 4, "guidance_scale": 0.0},
}

#: dtypes a pipeline may be loaded in
LOAD_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class ModelNotAvailableOffline(FileNotFoundError):
    """The requested model is neither a local folder nor in the local Hugging Face cache."""


class UnsupportedPipeline(ValueError):
    """The folder holds a diffusers pipeline whose denoiser this toolkit does not quantize."""


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise FileNotFoundError(f"{path} is missing or not valid JSON ({err}); the pipeline folder is incomplete.") from err


def pipeline_class_name(path: str | Path) -> str:
    """The pipeline class of a diffusers folder, checked to be supported (see :data:`SUPPORTED_PIPELINES`)."""
    path = Path(path)
    index = _read_json(path / "model_index.json")
    cls = index.get("_class_name", "?")
    denoiser = "unet" if "unet" in index else ("transformer" if "transformer" in index else None)
    if cls not in SUPPORTED_PIPELINES:
        why = ("its denoiser is a transformer (DiT/MMDiT), not a UNet2DConditionModel; DGQ's grouping, attention "
               "and timestep handling are implemented for the SD UNet" if denoiser == "transformer" else
               "only text-to-image Stable Diffusion pipelines are supported")
        raise UnsupportedPipeline(f"{path} holds a {cls}, which is not supported: {why}. Supported: "
                                  f"{', '.join(SUPPORTED_PIPELINES)} (SD 1.x, SD 2.x, SDXL, SDXL-Turbo).")
    unet_cls = _read_json(path / "unet" / "config.json").get("_class_name")
    if unet_cls != "UNet2DConditionModel":
        raise UnsupportedPipeline(f"{path}/unet is a {unet_cls}, not a UNet2DConditionModel; it is not supported.")
    return cls


def _family_from_configs(pipeline_cls: str, unet_config: dict, scheduler_config: dict) -> str:
    if pipeline_cls == "StableDiffusionXLPipeline":
        turbo = (scheduler_config.get("_class_name") == "EulerAncestralDiscreteScheduler"
                 and scheduler_config.get("timestep_spacing") == "trailing")
        return "sdxl-turbo" if turbo else "sdxl"
    # SD 2.x uses Linear proj_in/proj_out in its transformers (SD 1.x: 1x1 convolutions)
    return "sd2" if unet_config.get("use_linear_projection") else "sd1"


def model_family(pipe_or_path) -> str:
    """``"embedded"``, ``"sd1"``, ``"sd2"``, ``"sdxl"`` or ``"sdxl-turbo"`` for a pipeline or a folder."""
    if isinstance(pipe_or_path, (str, Path)):
        path = Path(pipe_or_path)
        if path.resolve() == EMBEDDED_PIPELINE_DIR.resolve():
            return "embedded"
        cls = pipeline_class_name(path)
        return _family_from_configs(cls, _read_json(path / "unet" / "config.json"),
                                    _read_json(path / "scheduler" / "scheduler_config.json"))
    pipe = pipe_or_path
    source = getattr(getattr(pipe, "config", None), "_name_or_path", None)
    if source and Path(str(source)).exists() and Path(str(source)).resolve() == EMBEDDED_PIPELINE_DIR.resolve():
        return "embedded"
    cls = type(pipe).__name__
    if cls not in SUPPORTED_PIPELINES:
        raise UnsupportedPipeline(f"a {cls} is not supported; supported: {', '.join(SUPPORTED_PIPELINES)}.")
    # a scheduler built in code has no "_class_name" in its config (only a loaded one has): use its class
    scheduler_config = {**dict(pipe.scheduler.config), "_class_name": type(pipe.scheduler).__name__}
    return _family_from_configs(cls, dict(pipe.unet.config), scheduler_config)


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
    from huggingface_hub import snapshot_download  # only for a hub id (a cache lookup); keeps import light

    try:
        return Path(snapshot_download(name, local_files_only=True))
    except Exception as err:  # LocalEntryNotFoundError, OfflineModeIsEnabled, ... : all mean "not cached"
        raise ModelNotAvailableOffline(_offline_message(name)) from err


def load_pipeline(model_id_or_path: str | Path | None = None, *, device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.float32, **kwargs):
    """A ``StableDiffusionPipeline`` or ``StableDiffusionXLPipeline`` on ``device`` in ``dtype``.

    ``model_id_or_path``: None (embedded model), a local diffusers folder, or a hub id already in the local
    cache. ``dtype``: float32 (default; what the CPU needs), float16 or bfloat16 (for real models on a GPU). Extra
    keyword arguments go to ``from_pretrained`` (e.g. ``variant="fp16"``); the safety checker is not loaded
    unless the caller passes one. A folder holding another kind of pipeline raises :class:`UnsupportedPipeline`.
    """
    import diffusers  # heavy (~2 s): imported when a pipeline is loaded, not when the package is

    V.check_device(device)
    if dtype not in LOAD_DTYPES:
        raise TypeError(f"load_pipeline(dtype=...) must be one of {', '.join(map(str, LOAD_DTYPES))}; got {dtype!r}.")
    path = resolve_model_path(model_id_or_path)
    cls = pipeline_class_name(path)
    if cls == "StableDiffusionPipeline":
        kwargs.setdefault("safety_checker", None)
        kwargs.setdefault("requires_safety_checker", False)
    try:
        pipe = getattr(diffusers, cls).from_pretrained(str(path), dtype=dtype, local_files_only=True, **kwargs)
    except (OSError, EnvironmentError) as err:
        if model_id_or_path is not None and not Path(str(model_id_or_path)).expanduser().exists():
            raise ModelNotAvailableOffline(_offline_message(str(model_id_or_path))) from err
        raise
    return pipe.to(device)
