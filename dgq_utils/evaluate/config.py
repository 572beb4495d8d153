"""What an evaluation is made of, as objects: the prompts, what to measure, the bootstrap, where to write.

:func:`dgq_utils.evaluate.compare.run_comparison` and :func:`dgq_utils.evaluate.protocol.run_paper_protocol` take
these (plus a :class:`~dgq_utils.config.SamplerSettings` and a
:class:`~dgq_utils.quantize.cache.StateCache`) instead of thirty keywords:

* :class:`EvaluationSet` -- evaluation prompts × seeds, and the calibration prompts (disjoint) and seed;
* :class:`MetricsConfig` -- metric names and the models behind them (feature extractor, CLIP scorer, alignment
  evaluator, LPIPS backbone), the FID/KID :class:`Reference`, the resize before measuring, the device;
* :class:`BootstrapConfig` -- replicates, confidence level and seed of every CI;
* :class:`Workspace` -- the output folder and the image / feature / calibrated-state caches.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from dgq_utils.config import validation as V
from dgq_utils.evaluate.metrics import INCEPTION, METRICS, check_metrics
from dgq_utils.quantize.cache import StateCache

__all__ = ["BootstrapConfig", "DEFAULT_METRICS", "EvaluationSet", "MetricsConfig", "Reference", "Workspace"]

#: every metric the comparison can measure, in report order
DEFAULT_METRICS = METRICS


class _Replace:
    def replace(self, **changes):
        """A copy with ``changes`` applied (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)


@dataclass
class Reference:
    """Real-image reference for FID/KID.

    * ``stats``: a ``{"mu", "sigma"}`` dict or an ``.npz`` path (pytorch-fid layout) — FID only;
    * ``images``: real images (paths / uint8 tensor) — features extracted (and cached) with the same extractor,
      enabling FID *and* KID;
    * ``features``: precomputed features of real images (``(N, D)`` array, from the same extractor/layer).
    * ``"fp"`` (pass the string as ``MetricsConfig(reference="fp")``): the FP model's own images — FID-to-FP,
      a proxy for "how far did quantization move the image distribution" when no real images exist.
    """

    stats: Any = None
    images: Any = None
    features: Any = None
    name: str = "reference"


@dataclass(frozen=True)
class EvaluationSet(_Replace):
    """Evaluation ``prompts`` × ``seeds`` (one image per pair) and the ``calibration`` prompts of quantized
    recipes (disjoint from the evaluation prompts), calibrated with ``calibration_seed``."""

    prompts: Sequence[str]
    calibration: Sequence[str] = ()
    seeds: Sequence[int] = (0,)
    calibration_seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "prompts", tuple(V.check_prompts(self.prompts, "prompts")))
        object.__setattr__(self, "calibration", tuple(V.check_prompts(self.calibration, "calibration",
                                                                      allow_empty=True)))
        object.__setattr__(self, "seeds", tuple(V.check_seeds(self.seeds, "seeds")))
        object.__setattr__(self, "calibration_seed", V.check_seed(self.calibration_seed, "calibration_seed"))


@dataclass(frozen=True)
class MetricsConfig(_Replace):
    """What to measure and with which models.

    Args:
        metrics: any of :data:`DEFAULT_METRICS` (checked).
        reference: :class:`Reference` for FID/KID, or ``"fp"`` (FID/KID to the FP images).
        extractor, extractor_weights: torch-fidelity feature extractor name and its local weights.
        resize: resize images to this side before every metric (the paper: 256).
        clip_scorer, clip_convention, clip_first_n: a :class:`~dgq_utils.evaluate.metrics.ClipScorer`;
            ``"cosine"`` or ``"torchmetrics"``; score only the first n images (the paper: 3,000 of 30,000).
        alignment_evaluator: ``(uint8 images, prompts) -> DataFrame`` (see ``metrics.alignment_table``).
        lpips_net, lpips_weights: LPIPS backbone and its local weights (skipped, with a note row, if absent).
        device: where features are extracted (and where a model given by id is loaded).
    """

    metrics: Sequence[str] = DEFAULT_METRICS
    reference: Reference | str | None = None
    extractor: str = INCEPTION
    extractor_weights: str | os.PathLike | None = None
    resize: int | None = None
    clip_scorer: Any = None
    clip_convention: str = "cosine"
    clip_first_n: int | None = None
    alignment_evaluator: Callable | None = field(default=None, compare=False)
    lpips_net: str = "alex"
    lpips_weights: str | os.PathLike | None = None
    device: str = "cpu"

    def __post_init__(self):
        object.__setattr__(self, "metrics", tuple(check_metrics(self.metrics)))
        V.check_device(self.device, "device")
        V.check_choice(self.clip_convention, "clip_convention", ("cosine", "torchmetrics"))
        if self.resize is not None:
            V.check_count(self.resize, "resize", 1, fix="a side in pixels, e.g. 256 (or None: no resize).")
        if self.clip_first_n is not None:
            V.check_count(self.clip_first_n, "clip_first_n", 1, fix="e.g. 3000 (or None: every image).")


@dataclass(frozen=True)
class BootstrapConfig(_Replace):
    """Bootstrap CIs: ``n_boot`` replicates for per-image means, ``n_set`` for set metrics (FID, KID, IS),
    confidence ``level``, and the ``seed`` of the resampling."""

    n_boot: int = 1000
    n_set: int = 100
    level: float = 0.95
    seed: int = 0

    def __post_init__(self):
        V.check_count(self.n_boot, "n_boot", 1, fix="bootstrap replicates, e.g. 1000.")
        V.check_count(self.n_set, "n_set", 1, fix="bootstrap replicates for FID/KID/IS, e.g. 100.")
        V.check_number(self.level, "level", minimum=0.5, maximum=0.999, fix="e.g. 0.95.")
        V.check_seed(self.seed, "seed")


@dataclass(frozen=True)
class Workspace(_Replace):
    """Where a comparison writes (``out_dir``: tables, per-image values) and its caches: generated images
    (default ``<out_dir>/images``), extracted features (``<out_dir>/features``) and calibrated states (a
    :class:`~dgq_utils.quantize.cache.StateCache`, default on ``<out_dir>/quant_states``). The image, feature and
    state keys include model, sampler and recipe, so sharing caches between comparisons is safe."""

    out_dir: str | os.PathLike
    image_cache: str | os.PathLike | None = None
    feature_cache: str | os.PathLike | None = None
    states: StateCache | None = None

    @classmethod
    def of(cls, work: "Workspace | str | os.PathLike") -> "Workspace":
        """``work`` itself, or a :class:`Workspace` on the folder ``work``."""
        if isinstance(work, Workspace):
            return work
        if isinstance(work, (str, os.PathLike)):
            return cls(work)
        raise TypeError(f"work must be a Workspace or a folder path, got {type(work).__name__}")

    @property
    def root(self) -> Path:
        return Path(self.out_dir)

    @property
    def images(self) -> Path:
        return Path(self.image_cache) if self.image_cache is not None else self.root / "images"

    @property
    def features(self) -> Path:
        return Path(self.feature_cache) if self.feature_cache is not None else self.root / "features"

    def state_cache(self) -> StateCache:
        """The calibrated-state cache: ``states``, or a :class:`StateCache` on ``<out_dir>/quant_states``."""
        return self.states if self.states is not None else StateCache(self.root / "quant_states")
