"""One set-up call for a report notebook: model, output folders, prompts, sampler and the shared caches.

Every notebook of the report starts the same way: load the model (:func:`open_model`), pick the figure/result
folders (:func:`output_dirs`), draw the evaluation and calibration prompts, build the sampler settings and, in
04-06, open the calibrated-state cache they share. :func:`setup` does all of it from the notebook's
``parameters`` cell::

    S = A.setup(globals())                     # reads model_id, device, quick, seed, n_prompts, ...
    S = A.setup(globals(), n_prompts=n_attn_prompts)   # a notebook whose prompt count has another name

and the :class:`Session` it returns saves tables and figures, shows generated prose and runs the FP vs quantized
comparisons of 04-06 with the same keys, caches and sampler.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, fields
from functools import cached_property
from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd

from dgq_utils.calibrate.observe import collect_activation_stats
from dgq_utils.config import SamplerSettings
from dgq_utils.core import kmeans
from dgq_utils.evaluate.compare import run_comparison
from dgq_utils.evaluate.config import BootstrapConfig, EvaluationSet, MetricsConfig, Workspace
from dgq_utils.quantize.cache import StateCache
from dgq_utils.report.context import ModelContext, open_model
from dgq_utils.report.folders import output_dirs, write_table
from dgq_utils.report.sampling import report_sampling
from dgq_utils.timing import stage

__all__ = [
    "SetupConfig",
    "Session",
    "setup",
    "RECIPES",
]

#: the six recipes compared in notebooks 04 and 05 (baseline vs DGQ at the paper's three bit settings)
RECIPES = ["baseline-w8a8", "dgq-w8a8", "baseline-w8a6", "dgq-w8a6", "baseline-w4a8", "dgq-w4a8"]


@dataclass(frozen=True)
class SetupConfig:
    """What :func:`setup` needs; the field names are the notebooks' parameter names.

    ``n_prompts``: evaluation prompts (``None``: none); ``n_calibration``: calibration prompts disjoint from them
    (``None``: none). ``work_dir``: root of the caches shared by notebooks 04-06 (``None``: ``outputs/work``).
    ``num_inference_steps`` / ``guidance_scale``: ``None`` takes the model family's (SDXL-Turbo: 4 steps, guidance 0);
    ``quick`` caps the steps at 4 (:func:`dgq_utils.report.sampling.report_sampling`).
    """

    model_id: str | None = None
    device: str = "cpu"
    quick: bool = False
    seed: int = 0
    threads: int | None = None
    save_to: str | None = None
    work_dir: str | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    batch_size: int = 8
    n_prompts: int | None = None
    n_calibration: int | None = None

    @classmethod
    def from_namespace(cls, namespace: Mapping[str, Any], **overrides: Any) -> "SetupConfig":
        """The fields found in ``namespace`` (a notebook's ``globals()``), then ``overrides``; other names in the
        namespace are ignored, an override that is no field is an error."""
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(overrides) - set(names))
        if unknown:
            raise TypeError(f"setup: unknown setting(s) {', '.join(unknown)}; the settings are {', '.join(names)}.")
        values = {k: namespace[k] for k in names if k in namespace}
        values.update(overrides)
        return cls(**values)


@dataclass
class Session:
    """What a report notebook works with after :func:`setup`."""

    config: SetupConfig
    ctx: ModelContext
    figures: Path
    results: Path
    prompts: list[str]
    calibration: list[str]
    sampler: SamplerSettings

    @cached_property
    def states(self) -> StateCache:
        """The calibrated-state cache shared by notebooks 04-06 (:meth:`ModelContext.state_cache`): each recipe
        is calibrated once per model."""
        return self.ctx.state_cache()

    @property
    def seed(self) -> int:
        return self.config.seed

    # ---------------------------------------------------------------------------------------------- output
    def fig(self, name: str) -> Path:
        """Path of figure ``name`` in this run's figure folder (pass it as a plot's ``path=``)."""
        return self.figures / name

    def table(self, df: pd.DataFrame, name: str) -> pd.DataFrame:
        """Write ``df`` as ``name`` in this run's result folder (:func:`write_table`); returns ``df``."""
        write_table(df, self.results / name)
        return df

    @staticmethod
    def show(*items: Any) -> None:
        """Display each item: strings as Markdown (the generated prose), anything else as itself (tables)."""
        from IPython.display import Markdown, display

        for item in items:
            display(Markdown(item) if isinstance(item, str) else item)

    # ---------------------------------------------------------------------------------------------- compute
    def activation_stats(self, prompts: Sequence[str], **kwargs: Any):
        """:func:`dgq_utils.calibrate.observe.collect_activation_stats` on the FP pipeline with this sampler/seed."""
        with stage("statistics", n=len(prompts)):
            return collect_activation_stats(self.ctx.pipe, prompts, self.sampler, self.seed, **kwargs)

    def bootstrap(self, **kwargs: Any) -> BootstrapConfig:
        """A :class:`BootstrapConfig` seeded with this run's seed."""
        return BootstrapConfig(seed=self.seed, **kwargs)

    def calibration_set(self, n: int | None = None) -> list[str]:
        """The calibration prompts of a recipe calibrated on ``n`` prompts: this run's own list when ``n`` is
        ``None`` or ``n_calibration``, else ``n`` prompts drawn the same way (disjoint from the evaluation prompts,
        same seed), so ``calibration_set(16)`` in one notebook is ``n_calibration = 16`` in another and their
        calibrated states are one cache entry."""
        if n is None or (self.config.n_calibration is not None and int(n) == int(self.config.n_calibration)):
            return list(self.calibration)
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n_calibration: got {n!r}; allowed: an integer >= 1 (calibration prompts).")
        return self.ctx.calibration_prompts(n, exclude=self.prompts, seed=self.seed)

    def compare(self, recipes: Sequence[Any], prompts: Sequence[str], *, tag: str, metrics: Sequence[str],
                metric_setup: MetricsConfig, bootstrap: BootstrapConfig, title: str,
                n_calibration: int | None = None, **key: Any):
        """FP vs ``recipes`` on ``prompts`` (:func:`dgq_utils.evaluate.compare.run_comparison`) with this run's
        calibration prompts (or, with ``n_calibration``, :meth:`calibration_set` of that size), seed, sampler,
        image cache and calibrated-state cache.

        The run folder is ``ctx.run_dir(tag, ...)`` keyed by the prompts, calibration prompts, sampler, metrics,
        seed and ``key`` (whatever else changes the results, e.g. ``n_boot``). The calibrated states (and the
        images made with them) are keyed by the calibration prompts, hence by their number.
        """
        calibration = self.calibration_set(n_calibration)
        work = Workspace(self.ctx.run_dir(tag, prompts=list(prompts), calibration=calibration,
                                          settings=str(self.sampler), metrics=list(metrics), seed=self.seed, **key),
                         image_cache=self.ctx.work_dir("images"), states=self.states)
        data = EvaluationSet(list(prompts), calibration, [self.seed], calibration_seed=self.seed)
        return run_comparison(self.ctx.pipe, list(recipes), data, work, metrics=metric_setup, bootstrap=bootstrap,
                              title=title, sampler=self.sampler, model_id=self.ctx.model_key)


def setup(parameters: SetupConfig | Mapping[str, Any], **overrides: Any) -> Session:
    """Open the model and everything a notebook shares with the others; print what was chosen.

    ``parameters``: a :class:`SetupConfig`, or the notebook's namespace (``globals()``) from which the
    :class:`SetupConfig` fields are read (:meth:`SetupConfig.from_namespace`); ``overrides`` replace fields (a
    notebook whose prompt count has its own name passes ``n_prompts=...``).
    """
    if isinstance(parameters, SetupConfig):
        config = SetupConfig(**{**{f.name: getattr(parameters, f.name) for f in fields(SetupConfig)}, **overrides})
    elif isinstance(parameters, Mapping):
        config = SetupConfig.from_namespace(parameters, **overrides)
    else:
        raise TypeError(f"setup: parameters must be a SetupConfig or a mapping such as globals(); "
                        f"got {type(parameters).__name__}")
    ctx = open_model(config.model_id, device=config.device, threads=config.threads,
                     work_root=None if config.work_dir is None else os.fspath(config.work_dir))
    # no save_to (a notebook run by hand): a run folder named by this notebook's own settings, never the repo's
    figures, results = output_dirs(config.save_to, quick=config.quick, kind=ctx.kind,
                                   settings={f.name: getattr(config, f.name) for f in fields(SetupConfig)})
    # K-means fits kept beside the other caches: 06 fits the groups 04 fitted (same statistics), in another process
    kmeans.set_store(ctx.work_dir("kmeans"))
    prompts = ctx.prompts(config.n_prompts, seed=config.seed) if config.n_prompts else []
    calibration = (ctx.calibration_prompts(config.n_calibration, exclude=prompts, seed=config.seed)
                   if config.n_calibration else [])
    chosen = report_sampling(ctx.family, config.num_inference_steps, config.guidance_scale, quick=config.quick)
    sampler = SamplerSettings(num_inference_steps=chosen.num_inference_steps, guidance_scale=chosen.guidance_scale,
                              batch_size=config.batch_size)
    session = Session(config, ctx, figures, results, prompts, calibration, sampler)
    print(f"model: {ctx.label} ({ctx.kind}, family {ctx.family}, key {ctx.model_key}) on {config.device}")
    print(f"figures -> {figures}\nresults -> {results}")
    print(chosen.describe())
    example = f"; e.g. {(prompts or calibration)[0]!r}" if (prompts or calibration) else ""
    print(f"{len(prompts)} evaluation prompts, {len(calibration)} calibration prompts, "
          f"{sampler.num_inference_steps} steps, guidance {sampler.guidance_scale} ({ctx.prompt_set} prompts){example}")
    return session
