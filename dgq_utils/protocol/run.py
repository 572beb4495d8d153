"""One paper protocol, end to end and sharded: generate every image over all ranks, measure once, write Table 2.

:func:`run_protocol` (what ``python -m dgq_utils.protocol`` calls) does, on each of the launcher's processes
(``accelerate launch --num_processes N`` or ``torchrun``; one plain process works the same, with no-op barriers):

1. **check** every input file (before any model is loaded: a missing file fails at once, naming its option and
   where the paper's copy comes from) and that the model is of the protocol's family;
2. **generate**, for FP and then each recipe of the table: rank 0 calibrates and saves the state in the
   calibrated-state cache and the other ranks load it (:func:`dgq_utils.generate.sharding.quantize_once`); each
   rank then makes its contiguous share of the (caption index, seed) images into the shared, content-addressed
   image cache (:func:`~dgq_utils.generate.sharding.generate_sharded`), MS-COCO and, with PartiPrompts, the
   Parti images; a barrier closes each recipe;
3. **measure** on rank 0 only, after the last barrier: :func:`dgq_utils.evaluate.protocol.run_paper_protocol`
   (FID / IS / CLIP with bootstrap CIs; every image is found in the cache, nothing is generated or calibrated
   again) and the PartiPrompts CLIP score (:func:`~dgq_utils.evaluate.compare.run_comparison`);
4. **write** ``table2.md`` / ``table2.csv`` (:mod:`dgq_utils.protocol.table`) and ``run.json``.

Images are seeded by (caption index, seed), so an N-process run makes the same images, bit for bit on one
device, as one process; a killed rank loses nothing (its recorded images are reused on the rerun, the rest made;
the saved state is loaded, not recalibrated).
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import torch

from dgq_utils.atomic import atomic_write_json
from dgq_utils.config import SamplerSettings
from dgq_utils.config import validation as V
from dgq_utils.evaluate import metrics as M
from dgq_utils.evaluate.compare import run_comparison
from dgq_utils.evaluate.config import BootstrapConfig, EvaluationSet, MetricsConfig, Workspace
from dgq_utils.evaluate.protocol import (
    PAPER_BOOTSTRAP,
    PAPER_CLIP_MODEL,
    ProtocolConfig,
    ProtocolFiles,
    paper_evaluation_set,
    run_paper_protocol,
)
from dgq_utils.generate.sharding import Shard, generate_sharded, process_shard, quantize_once
from dgq_utils.model.identity import model_identity
from dgq_utils.model.loading import load_pipeline, model_family
from dgq_utils.protocol.inputs import INPUTS, MissingInput, check_inputs, check_model_folder
from dgq_utils.protocol.paper import (
    PAPER_N_PARTI_PROMPTS,
    PAPER_PARTI_IMAGES_PER_PROMPT,
    PROTOCOLS,
    TableEntry,
    plan_entries,
)
from dgq_utils.protocol.table import table2_long, write_table2
from dgq_utils.quantize.cache import StateCache
from dgq_utils.quantize.pipeline import dequantize_pipeline, is_quantized

__all__ = ["ProtocolRun", "ProtocolOutcome", "check_run", "read_partiprompts", "run_protocol"]

NOTES = (
    "TFMQ / Q-Diff columns (if any) are this repository's per-tensor stand-ins (baseline-wXaY: one parameter set "
    "per timestep; baseline-wXaY-shared: one for all timesteps), not the original methods.",
    "Seeds: one generator per image from (caption index, 42) instead of the official global RNG; see protocol.json "
    "for every departure from the official scripts.",
)


@dataclass(frozen=True)
class ProtocolRun:
    """Everything one protocol run needs (what the command line builds).

    Args:
        protocol: ``"sd-v1.4"`` or ``"sdxl-turbo"`` (:data:`dgq_utils.protocol.paper.PROTOCOLS`).
        out_dir: results, ``table2.md``/``.csv``, the image / feature / state caches.
        model: the local diffusers folder (ignored when :func:`run_protocol` gets a ``pipe_factory``).
        coco_captions, fid_reference, inception_weights, clip_weights, calibration_captions, partiprompts: local
            files (see :data:`dgq_utils.protocol.inputs.INPUTS`; ``inception_weights=None``: torch-fidelity's
            cache folder; ``partiprompts=None``: no PartiPrompts CLIP).
        clip_model: the open_clip model of the CLIP score (paper: ViT-g-14).
        entries: the table's cells (:func:`~dgq_utils.protocol.paper.plan_entries`; FP first).
        config: image counts, resize, seed, calibration count (:class:`~dgq_utils.evaluate.protocol.ProtocolConfig`).
        n_parti_prompts, parti_images_per_prompt: the PartiPrompts part (paper: first 1,000 prompts x 3 images).
        sampler: default: the protocol's (``PROTOCOLS[protocol].sampler``).
        bootstrap: default: 1000 replicates for CLIP, 50 for FID / IS.
        device, dtype: where and in what precision the pipeline runs (each rank uses its own GPU under a
            launcher); metrics run on rank 0's device.
    """

    protocol: str
    out_dir: str | os.PathLike
    coco_captions: str | os.PathLike
    fid_reference: str | os.PathLike
    model: str | os.PathLike | None = None
    inception_weights: str | os.PathLike | None = None
    clip_model: str = PAPER_CLIP_MODEL
    clip_weights: str | os.PathLike | None = None
    calibration_captions: str | os.PathLike | None = None
    partiprompts: str | os.PathLike | None = None
    entries: tuple[TableEntry, ...] = field(default_factory=lambda: tuple(plan_entries()))
    config: ProtocolConfig = field(default_factory=ProtocolConfig)
    n_parti_prompts: int = PAPER_N_PARTI_PROMPTS
    parti_images_per_prompt: int = PAPER_PARTI_IMAGES_PER_PROMPT
    sampler: SamplerSettings | None = None
    bootstrap: BootstrapConfig = PAPER_BOOTSTRAP
    device: str = "cuda"
    dtype: Any = torch.float32

    def __post_init__(self):
        V.check_choice(self.protocol, "protocol", tuple(PROTOCOLS))
        V.check_instance(self.config, "config", ProtocolConfig)
        V.check_instance(self.sampler, "sampler", SamplerSettings, allow_none=True)
        V.check_instance(self.bootstrap, "bootstrap", BootstrapConfig)
        V.check_count(self.n_parti_prompts, "n_parti_prompts", 1, fix="the paper scores the first 1000 prompts.")
        V.check_count(self.parti_images_per_prompt, "parti_images_per_prompt", 1, fix="the paper makes 3.")
        object.__setattr__(self, "dtype", V.check_dtype(self.dtype))
        entries = tuple(self.entries)
        if not entries or entries[0].recipe != "fp":
            raise V.fail("entries", entries, "a plan_entries(...) list (FP first)")
        object.__setattr__(self, "entries", entries)

    @property
    def spec(self):
        return PROTOCOLS[self.protocol]

    @property
    def the_sampler(self) -> SamplerSettings:
        return self.sampler or self.spec.sampler

    @property
    def recipes(self) -> list[str]:
        return [e.recipe for e in self.entries[1:]]

    def files(self) -> ProtocolFiles:
        return ProtocolFiles(coco_captions=self.coco_captions, reference_stats=self.fid_reference,
                             inception_weights=self.inception_weights, clip_model=self.clip_model,
                             clip_weights=self.clip_weights, model_path=self.model,
                             calibration_captions=self.calibration_captions)


@dataclass
class ProtocolOutcome:
    """What :func:`run_protocol` returns: on rank 0 the tables (``coco``, ``parti``: tidy results; ``table2``:
    the long Table 2) and the path of ``table2.md``; on other ranks only ``shard`` and ``generated``."""

    shard: Shard
    generated: int
    coco: pd.DataFrame | None = None
    parti: pd.DataFrame | None = None
    table2: pd.DataFrame | None = None
    table2_md: Path | None = None


def read_partiprompts(path: str | os.PathLike, n: int | None = None) -> list[str]:
    """The prompts of PartiPrompts.tsv (column ``Prompt``; a ``prompt``/``caption``/``text`` column also works),
    in file order, the first ``n`` if given."""
    p = Path(path)
    df = pd.read_csv(p, sep="\t" if p.suffix.lower() in (".tsv", ".txt") else ",")
    col = next((c for c in ("Prompt", "prompt", "caption", "text") if c in df.columns), None)
    if col is None:
        raise MissingInput(f"--partiprompts: {p} has no 'Prompt' column (columns: {list(df.columns)}). It should be "
                           f"{INPUTS['partiprompts'].what}. The paper's copy: {INPUTS['partiprompts'].source}.")
    prompts = [" ".join(str(x).split()) for x in df[col].dropna()]
    prompts = [x for x in prompts if x]
    if n is not None and len(prompts) < n:
        raise ValueError(f"--partiprompts: {p} has {len(prompts)} prompts, fewer than --n-parti-prompts={n}")
    return prompts[:n] if n is not None else prompts


def _check_everything(run: ProtocolRun, pipe_factory, feature_extractor: str, clip_scorer) -> None:
    """Every input, before any model is loaded (runs on every rank)."""
    check_inputs({"coco_captions": run.coco_captions, "fid_reference": run.fid_reference,
                  "inception_weights": run.inception_weights, "calibration_captions": run.calibration_captions,
                  "partiprompts": run.partiprompts,
                  "clip_weights": run.clip_weights if clip_scorer is None else None})
    if clip_scorer is None:
        if run.clip_weights is None:
            raise MissingInput(f"--clip-weights: not given. It should be {INPUTS['clip_weights'].what}. The paper's "
                               f"copy: {INPUTS['clip_weights'].source}.")
        import open_clip

        if run.clip_model not in open_clip.list_models():
            raise V.fail("--clip-model", run.clip_model, "an open_clip model name (open_clip.list_models())",
                         f"the paper uses {PAPER_CLIP_MODEL!r}.")
    M.load_reference_statistics(run.fid_reference)  # a wrong .npz fails here, naming the file
    M.resolve_weights(feature_extractor, run.inception_weights)  # no Inception weights: fails here
    if pipe_factory is None:
        _check_family(run, model_family(check_model_folder(run.model, run.spec.title, run.spec.model_source)),
                      run.model)


def check_run(run: ProtocolRun, *, pipe_factory: Callable[[], Any] | None = None,
              feature_extractor: str = M.INCEPTION, clip_scorer: M.ClipScorer | None = None) -> None:
    """Check every input of ``run`` without loading a model: the files (:data:`~dgq_utils.protocol.inputs.
    INPUTS`), the reference statistics, the Inception weights, the model folder and its family, that the captions
    file has ``n_images`` captions (plus calibration captions) and the PartiPrompts file ``n_parti_prompts``.
    Raises the first problem found (``MissingInput``, ``InvalidArgumentError`` or ``ValueError``, naming it)."""
    V.check_instance(run, "run", ProtocolRun, fix="pass ProtocolRun(...).")
    _check_everything(run, pipe_factory, feature_extractor, clip_scorer)
    paper_evaluation_set(run.files(), run.config, calibrate=bool(run.recipes))
    if run.partiprompts is not None:
        read_partiprompts(run.partiprompts, run.n_parti_prompts)


def _check_family(run: ProtocolRun, family: str, what) -> None:
    if family not in run.spec.families:
        raise V.fail("--model", what, f"a {' / '.join(run.spec.families)} pipeline for the {run.spec.title} "
                     f"protocol (this one is {family!r})", f"use the protocol that fits the model, or the paper's "
                     f"weights: {run.spec.model_source}.")


def _generation_device(run: ProtocolRun, shard: Shard) -> str:
    if str(run.device).startswith("cuda") and shard.state is not None and shard.world_size > 1:
        return str(shard.state.device)  # this rank's own GPU
    return str(run.device)


def run_protocol(run: ProtocolRun, *, pipe_factory: Callable[[], Any] | None = None,
                 feature_extractor: str = M.INCEPTION, clip_scorer: M.ClipScorer | None = None,
                 shard: Shard | None = None, on_image: Callable[[dict], None] | None = None,
                 progress: bool = True) -> ProtocolOutcome:
    """Run ``run`` on this process (see the module docstring); returns a :class:`ProtocolOutcome`.

    ``pipe_factory`` (a zero-argument callable giving the FP pipeline on ``device``), ``feature_extractor`` and
    ``clip_scorer`` replace the real model / Inception / open_clip (the tests pass tiny stand-ins); ``shard``
    defaults to the launcher's (:func:`~dgq_utils.generate.sharding.process_shard`); ``on_image`` is called after
    each new image (tests use it to kill a rank).
    """
    V.check_instance(run, "run", ProtocolRun, fix="pass ProtocolRun(...).")
    _check_everything(run, pipe_factory, feature_extractor, clip_scorer)
    shard = shard or process_shard(run.device)
    sampler = run.the_sampler
    out = Path(run.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = run.files()
    coco = paper_evaluation_set(files, run.config, calibrate=bool(run.recipes))
    parti = None
    if run.partiprompts is not None:
        seeds = [run.config.seed + i for i in range(run.parti_images_per_prompt)]
        parti = EvaluationSet(read_partiprompts(run.partiprompts, run.n_parti_prompts), coco.calibration, seeds,
                              coco.calibration_seed)

    device = _generation_device(run, shard)
    if pipe_factory is None:
        model_path = run.model

        def pipe_factory():
            return load_pipeline(model_path, device=device, dtype=run.dtype)

    pipe = pipe_factory()
    family = model_family(pipe)
    _check_family(run, family, run.model if run.model is not None else type(pipe).__name__)
    mid = model_identity(pipe)
    states = StateCache(out / "quant_states")
    images = Workspace(out).images
    generated = 0

    def count(rec):
        nonlocal generated
        generated += 1
        if on_image is not None:
            on_image(rec)

    for entry in run.entries:
        if is_quantized(pipe):
            dequantize_pipeline(pipe)
        state = None
        if entry.recipe != "fp":
            state = states.path(pipe, entry.recipe, coco.calibration, sampler, seed=coco.calibration_seed,
                                model_id=mid)
            state.parent.mkdir(parents=True, exist_ok=True)
            quantize_once(pipe, entry.recipe, list(coco.calibration), state, shard=shard,
                          sampler=sampler.resolved(pipe), seed=coco.calibration_seed, progress=progress)
        for data in (coco, parti):
            if data is not None:
                generate_sharded(pipe, list(data.prompts), list(data.seeds), images, shard=shard,
                                 recipe=entry.recipe, model_id=mid, settings=sampler, progress=progress,
                                 on_image=count, calibration=None if state is None else state.name)
    if is_quantized(pipe):
        dequantize_pipeline(pipe)
    if not shard.is_main:
        return ProtocolOutcome(shard, generated)

    # ---- rank 0: every image is in the cache; measure once ------------------------------------------------
    metric_device = "cuda" if str(run.device).startswith("cuda") else "cpu"
    if clip_scorer is None:
        clip_scorer = M.ClipScorer.from_open_clip(run.clip_model, run.clip_weights, device=metric_device)

    def fp_pipe():
        if is_quantized(pipe):
            dequantize_pipeline(pipe)
        return pipe

    res = run_paper_protocol(files, out, recipes=run.recipes, protocol=run.config, sampler=sampler,
                             bootstrap=run.bootstrap, device=metric_device, pipe_factory=fp_pipe,
                             feature_extractor=feature_extractor, clip_scorer=clip_scorer, states=states,
                             model_id=mid, progress=progress, title=f"Paper protocol ({run.spec.title})")
    parti_table = None
    if parti is not None:
        pres = run_comparison(fp_pipe, run.recipes, parti,
                              Workspace(out / "parti", image_cache=images, feature_cache=out / "features",
                                        states=states),
                              sampler=sampler, metrics=MetricsConfig(["clip_score"], clip_scorer=clip_scorer,
                                                                     device=metric_device),
                              bootstrap=run.bootstrap, model_id=mid, progress=progress,
                              title=f"Paper protocol ({run.spec.title}): PartiPrompts CLIP")
        parti_table = pres.table
    long = table2_long(run.protocol, run.entries, res.table, parti_table)
    md = write_table2(out, long, title=f"Table 2, {run.spec.title}: ours vs the paper", notes=NOTES)
    atomic_write_json(out / "run.json", {
        "protocol": run.protocol, "model": str(run.model), "model_id": mid, "family": family,
        "dtype": str(run.dtype), "device": str(run.device), "world_size": shard.world_size,
        "entries": [asdict(e) for e in run.entries], "sampler": asdict(sampler),
        "n_images": run.config.n_images, "n_clip": run.config.n_clip,
        "partiprompts": None if parti is None else {"file": str(run.partiprompts), "n_prompts": len(parti.prompts),
                                                    "seeds": list(parti.seeds)},
    })
    return ProtocolOutcome(shard, generated, res.table, parti_table, long, md)
