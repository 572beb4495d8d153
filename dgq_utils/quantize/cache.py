"""The calibrated-state cache: calibrate a recipe once, load it everywhere after.

One file per calibrated state, ``<state_dir>/<recipe name>-<key>.safetensors`` (written by
:func:`~dgq_utils.quantize.state.save_quant_state`, atomically), where the key (:func:`state_key`) covers
everything that shapes the state:

* the **model** (:func:`dgq_utils.model.identity.model_identity`: an explicit id, a folder fingerprint, or a hash
  of the FP weights) and where it runs (**device type and UNet dtype**: a state calibrated in float16 on a GPU is
  not the float32 CPU state);
* the **recipe** (:func:`dgq_utils.config.recipe_hash`, name included);
* the **calibration set**: the prompts, the sampler settings they were run with (resolved to the pipeline's
  height/width; the image format is not part of it) and the seed;
* the extra calibration options (``on_timestep_mismatch``), if any.

:func:`dgq_utils.evaluate.compare.run_comparison` (and so the paper protocol and notebooks 04-06) quantize through
a :class:`StateCache`; share one folder between them and every calibration is computed and written once.
Processes sharing the folder (notebooks run side by side by the chain, sharded ranks) take a lock file
(``<state>.safetensors.lock``, :mod:`filelock`) per state: the first calibrates it, the others wait and load it.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

from filelock import FileLock

from dgq_utils.config import QuantRecipe, SamplerSettings, get_preset, recipe_hash
from dgq_utils.keys import stable_hash
from dgq_utils.model.identity import model_identity, runtime_identity
from dgq_utils.quantize.pipeline import dequantize_pipeline, is_quantized, quantize_pipeline
from dgq_utils.quantize.state import load_quant_state, save_quant_state

__all__ = ["StateCache", "state_key"]

#: sampler fields that do not change a calibrated state
_NOT_SHAPING = ("image_format",)


def _recipe(recipe: QuantRecipe | str) -> QuantRecipe:
    return get_preset(recipe) if isinstance(recipe, str) else recipe


def state_key(model_id: str, recipe: QuantRecipe | str, calibration_prompts: Sequence[str], sampler: SamplerSettings,
              seed: int, *, device: str = "cpu", dtype: str = "torch.float32", options: dict | None = None) -> str:
    """16 hex digits identifying a calibrated state (see the module docstring for what goes in)."""
    if not isinstance(sampler, SamplerSettings):
        raise TypeError(f"sampler must be a SamplerSettings, got {type(sampler).__name__}")
    shaping = {k: v for k, v in asdict(sampler).items() if k not in _NOT_SHAPING}
    return stable_hash({"model": str(model_id), "recipe": recipe_hash(_recipe(recipe)),
                        "prompts": [str(p) for p in calibration_prompts], "sampler": shaping, "seed": int(seed),
                        "device": str(device), "dtype": str(dtype), "options": dict(options or {})}, 16)


class StateCache:
    """Calibrated states under ``state_dir``, keyed by :func:`state_key`.

    ``options``: extra keyword arguments for :func:`~dgq_utils.quantize.pipeline.quantize_pipeline` (e.g.
    ``on_timestep_mismatch="nearest"``); they are part of the key. ``hits`` / ``calibrated`` list the file names
    loaded from the cache / calibrated and written by this object, in order.
    """

    def __init__(self, state_dir: str | os.PathLike, **options: Any):
        self.state_dir = Path(state_dir)
        self.options = dict(options)
        self.hits: list[str] = []
        self.calibrated: list[str] = []

    def __repr__(self) -> str:
        return f"StateCache({str(self.state_dir)!r}, hits={len(self.hits)}, calibrated={len(self.calibrated)})"

    def path(self, pipe, recipe: QuantRecipe | str, calibration_prompts: Sequence[str], sampler: SamplerSettings,
             *, seed: int = 0, model_id: str | None = None) -> Path:
        """Where the state of this (model, recipe, calibration set) lives (whether or not it exists yet).

        ``pipe`` must be the FP pipeline when ``model_id`` is not given (its weights may be hashed)."""
        r = _recipe(recipe)
        key = state_key(model_identity(pipe, model_id), r, calibration_prompts, sampler.resolved(pipe), seed,
                        **runtime_identity(pipe), options=self.options)
        return self.state_dir / f"{r.name}-{key}.safetensors"

    def quantize(self, pipe, recipe: QuantRecipe | str, calibration_prompts: Sequence[str],
                 sampler: SamplerSettings | None = None, *, seed: int = 0, model_id: str | None = None,
                 progress: bool = True) -> Path:
        """Quantize the FP ``pipe`` in place with ``recipe``: from the cached state if there is one, else calibrate
        on ``calibration_prompts`` with ``sampler`` and ``seed`` and store the state. Returns the state's path.

        A cached file that cannot be loaded (corrupt, or from another architecture) is recalibrated, with a
        warning, and overwritten.
        """
        sampler = (sampler or SamplerSettings()).resolved(pipe)
        path = self.path(pipe, recipe, calibration_prompts, sampler, seed=seed, model_id=model_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        # one process calibrates a state, the others wait and load it (notebooks run side by side, sharded ranks)
        with FileLock(str(path) + ".lock"):
            if path.is_file():
                try:
                    load_quant_state(pipe, path, **{k: v for k, v in self.options.items()
                                                    if k == "on_timestep_mismatch"})
                    self.hits.append(path.name)
                    return path
                except Exception as e:  # noqa: BLE001 - a corrupt / stale cache entry is recalibrated, not fatal
                    warnings.warn(f"could not load calibrated state {path} ({e}); recalibrating")
                    if is_quantized(pipe):
                        dequantize_pipeline(pipe)
                    path.unlink(missing_ok=True)
            quantize_pipeline(pipe, _recipe(recipe), list(calibration_prompts), sampler, seed, progress=progress,
                              **self.options)
            save_quant_state(pipe, path)  # atomic: an interrupted run leaves no half-written state
        self.calibrated.append(path.name)
        return path

    def dequantize(self, pipe) -> bool:
        """Put the FP modules back (see :func:`~dgq_utils.quantize.pipeline.dequantize_pipeline`)."""
        return dequantize_pipeline(pipe)
