"""The paper's Stable Diffusion v1.4 evaluation protocol in one call, from local files only.

What the DGQ paper reports (Table 2; see ``shared/dgq-official-code.md`` §6–7): on MS-COCO, **FID** of 30,000
images generated from the 30k val2014 captions of BK-SDM's ``metadata.csv`` (one image per caption), resized to
256×256, against BK-SDM's ``real_im256.npz`` (Inception pool statistics of the val2014 images at 256); **IS** on
the same 30k images; **CLIP score** with open_clip ``ViT-g-14`` (``laion2b_s34b_b88k``), plain cosine, over the
first 3,000 captions' images. Sampler: SD's default PNDM/PLMS, 25 steps, guidance 7.5, 512×512. Quantized models
are calibrated on 64 COCO *train2017* captions (``pandas.sample(64)`` after seeding 42).

:func:`run_paper_protocol` reproduces that, on top of :func:`dgq_utils.evaluate.compare.run_comparison` (so it is seeded,
cached, resumable and every number has a bootstrap CI), with these deliberate differences from the official code:

============================  ====================================  =============================================
official code                 here (default)                        why / option
============================  ====================================  =============================================
every shard seeded 42, noise  per-image generator seeded from       an image no longer depends on batch size,
from the global RNG in order  (caption index, seed 42)              shard count or position; ``seed`` is kept
JPEG intermediates (PIL       PNG                                   lossless; ``image_format="jpg"`` reproduces
quality 75), resized in place                                       the JPEG step (PIL default quality)
pytorch-fid 0.3.0 features    torch-fidelity's Inception-v3         same TF-FID weights ported by both; the
                              (``inception-v3-compat``)             resize inside the network differs slightly
                                                                    (torch-fidelity reproduces TF1 bilinear), so
                                                                    FID vs the pytorch-fid ``.npz`` can differ a
                                                                    little from pytorch-fid's own number
IS: torch-fidelity 0.3.0      torch-fidelity 0.4.0 (10 splits)      same definition
(no CI)                       bootstrap CIs, paired diffs vs FP
============================  ====================================  =============================================

Nothing is downloaded. Every input is a local path; a missing one raises ``FileNotFoundError`` saying what the
file is and where the paper's copy comes from. Resizing to 256 uses PIL bicubic (PIL's default filter, which
the official ``change_img_size`` used).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import pandas as pd

from dgq_utils.atomic import atomic_write_json
from dgq_utils.config import SamplerSettings
from dgq_utils.config import validation as V
from dgq_utils.evaluate import metrics as M
from dgq_utils.evaluate.compare import ComparisonResult, run_comparison
from dgq_utils.evaluate.config import (
    BootstrapConfig,
    EvaluationSet,
    MetricsConfig,
    Reference,
    Workspace,
)
from dgq_utils.model.loading import load_pipeline
from dgq_utils.quantize.cache import StateCache

PAPER_N_IMAGES = 30_000
PAPER_N_CLIP = 3_000
PAPER_RESIZE = 256
PAPER_SEED = 42
PAPER_N_CALIBRATION = 64
PAPER_CLIP_MODEL = "ViT-g-14"
#: SD's default sampler as the paper ran it: PNDM/PLMS, 25 steps, guidance 7.5, 512x512 (batch size: ours)
PAPER_SAMPLER = SamplerSettings(num_inference_steps=25, guidance_scale=7.5, height=512, width=512, batch_size=8)
#: the paper's bootstrap here: 1000 replicates for per-image means, 50 for FID / IS (30k images each)
PAPER_BOOTSTRAP = BootstrapConfig(n_boot=1000, n_set=50)


@dataclass(frozen=True)
class ProtocolFiles:
    """The protocol's local inputs (nothing is downloaded; a missing file raises, naming it).

    Args:
        coco_captions: BK-SDM ``metadata.csv`` (or a COCO captions json); the first ``n_images`` rows are used.
        reference_stats: BK-SDM ``real_im256.npz`` (``mu``/``sigma`` of Inception pool features).
        inception_weights: torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth`` (or ``None`` to use the
            copy in torch-fidelity's cache folder; it is never downloaded).
        clip_model, clip_weights: open_clip model (paper: ``"ViT-g-14"``) and its local weights file
            (``laion2b_s34b_b88k``).
        model_path: local diffusers folder of SD v1.4 (``CompVis/stable-diffusion-v1-4`` downloaded beforehand);
            may be ``None`` when :func:`run_paper_protocol` gets a ``pipe_factory``.
        calibration_captions: COCO ``captions_train2017.json`` for calibration (paper); default: captions of
            ``coco_captions`` after the first ``n_images`` rows.
    """

    coco_captions: str | os.PathLike
    reference_stats: str | os.PathLike
    inception_weights: str | os.PathLike | None = None
    clip_model: str = PAPER_CLIP_MODEL
    clip_weights: str | os.PathLike | None = None
    model_path: str | os.PathLike | None = None
    calibration_captions: str | os.PathLike | None = None


@dataclass(frozen=True)
class ProtocolConfig:
    """How much of the protocol to run: ``n_images`` captions (one image each) / ``n_clip`` of them CLIP-scored /
    ``resize`` before every metric / caption ``seed`` / ``n_calibration`` captions -- 30,000 / 3,000 / 256 / 42 / 64
    as in the paper -- and ``fidelity_to_fp``: also PSNR/SSIM of each recipe vs FP (same captions and seeds)."""

    n_images: int = PAPER_N_IMAGES
    n_clip: int = PAPER_N_CLIP
    resize: int = PAPER_RESIZE
    seed: int = PAPER_SEED
    n_calibration: int = PAPER_N_CALIBRATION
    fidelity_to_fp: bool = True

    def __post_init__(self):
        V.check_protocol_numbers(n_images=self.n_images, n_clip=self.n_clip, resize=self.resize,
                                 n_calibration=self.n_calibration)
        V.check_seed(self.seed, "seed")

QUIRKS = {
    "seeding": "official: every shard seeds the global RNG with 42 and draws latents in order; here: one generator "
               "per image seeded from (caption index, seed), so images do not depend on batching or sharding",
    "image_format": "official: JPEG (PIL default quality 75) at 512, resized in place to 256; here: PNG unless "
                    "image_format='jpg'",
    "fid_backend": "official: pytorch-fid 0.3.0; here: torch-fidelity's inception-v3-compat (same TF weights, "
                   "TF1-compatible resize) against the same pytorch-fid reference .npz",
    "calibration": "official: 64 train2017 captions, pandas .sample(64) after seed_everything(42); here: "
                   ".sample(64, random_state=42) from the calibration captions file (or from captions outside the "
                   "evaluation rows), always disjoint from the evaluation captions",
    "ci": "not in the paper: bootstrap 95% CIs for every number and paired differences vs FP",
}


def read_captions(path: str | os.PathLike) -> pd.DataFrame:
    """Captions as a DataFrame with ``caption`` (and ``file_name`` when known), in file order.

    Accepts BK-SDM's ``metadata.csv`` (columns ``file_name``, ``caption``), any CSV/TSV with a ``caption`` or
    ``text`` column, or a COCO ``captions_*.json`` (one caption per image: the first annotation of each
    ``image_id``, in file order).
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"captions file not found: {p}. The paper uses BK-SDM's "
                                "data/mscoco_val2014_30k/metadata.csv (30k COCO val2014 captions; BK-SDM's "
                                "scripts/get_mscoco_files.sh fetches it) or a COCO captions_*.json.")
    if p.suffix.lower() == ".json":
        data = json.loads(p.read_text(encoding="utf-8"))
        ann = data.get("annotations") if isinstance(data, dict) else None
        if not ann:
            raise ValueError(f"{p}: a COCO captions file needs an 'annotations' list")
        df = pd.DataFrame(ann)
        if "caption" not in df or "image_id" not in df:
            raise ValueError(f"{p}: annotations need 'image_id' and 'caption'")
        df = df.drop_duplicates("image_id", keep="first")
        names = {im["id"]: im.get("file_name") for im in data.get("images", []) if "id" in im}
        df["file_name"] = df["image_id"].map(names)
    else:
        df = pd.read_csv(p, sep="\t" if p.suffix.lower() == ".tsv" else ",")
        if "caption" not in df.columns and "text" in df.columns:
            df = df.rename(columns={"text": "caption"})
        if "caption" not in df.columns:
            raise ValueError(f"{p}: no 'caption' column (columns: {list(df.columns)})")
    df = df.dropna(subset=["caption"])
    df["caption"] = df["caption"].astype(str).str.strip().str.replace(r"\s+", " ", regex=True)
    df = df[df["caption"] != ""]
    if df.empty:
        raise ValueError(f"{p}: no captions")
    return df.reset_index(drop=True)


def calibration_captions(eval_captions: Sequence[str], *, source: str | os.PathLike | None = None,
                         pool: Sequence[str] = (), n: int = PAPER_N_CALIBRATION, seed: int = PAPER_SEED) -> list[str]:
    """``n`` calibration captions disjoint from the evaluation captions: sampled (``random_state=seed``) from
    ``source`` (e.g. COCO ``captions_train2017.json``, as the paper) or else from ``pool``."""
    cand = read_captions(source)["caption"] if source is not None else pd.Series(list(pool), dtype=object)
    banned = set(eval_captions)
    cand = cand[~cand.isin(banned)].drop_duplicates()
    if len(cand) < n:
        raise ValueError(f"only {len(cand)} calibration captions disjoint from the evaluation captions; need {n}")
    return list(cand.sample(n, random_state=seed))


def paper_evaluation_set(files: ProtocolFiles, protocol: ProtocolConfig | None = None, *,
                         calibrate: bool = True) -> EvaluationSet:
    """The protocol's prompts (the first ``n_images`` captions of ``files.coco_captions``), seed and, when
    ``calibrate``, its ``n_calibration`` calibration captions: what :func:`run_paper_protocol` evaluates (the
    sharded command generates exactly these images before it runs)."""
    V.check_instance(files, "files", ProtocolFiles, fix="pass ProtocolFiles(coco_captions, reference_stats, ...).")
    V.check_instance(protocol, "protocol", ProtocolConfig, allow_none=True, fix="pass ProtocolConfig(...).")
    protocol = protocol or ProtocolConfig()
    n_images, seed = int(protocol.n_images), int(protocol.seed)
    caps = read_captions(files.coco_captions)
    if len(caps) < n_images:
        raise ValueError(f"{files.coco_captions} has {len(caps)} captions, fewer than n_images={n_images}")
    prompts = list(caps["caption"].iloc[:n_images])
    calib: list[str] = []
    if calibrate:
        calib = calibration_captions(prompts, source=files.calibration_captions,
                                     pool=list(caps["caption"].iloc[n_images:]), n=protocol.n_calibration, seed=seed)
    return EvaluationSet(prompts, calib, [seed])


def run_paper_protocol(
    files: ProtocolFiles,
    out_dir: str | os.PathLike,
    *,
    recipes: Sequence[Any] = (),
    protocol: ProtocolConfig | None = None,
    sampler: SamplerSettings | None = None,
    bootstrap: BootstrapConfig | None = None,
    device: str = "cuda",
    pipe_factory: Callable[[], Any] | None = None,
    feature_extractor: str = M.INCEPTION,
    clip_scorer: M.ClipScorer | None = None,
    states: StateCache | None = None,
    model_id: str | None = None,
    progress: bool = True,
    title: str = "Paper protocol (SD v1.4, MS-COCO)",
) -> ComparisonResult:
    """Run the paper's SD v1.4 MS-COCO protocol for FP and ``recipes``; returns the results tables.

    Args:
        files: :class:`ProtocolFiles` (captions, reference statistics, Inception and CLIP weights, SD folder).
        out_dir: results, images (``out_dir/images``, shared by FP and every recipe), features, quant states,
            ``protocol.json`` (every parameter and the quirks above).
        recipes: quantized recipes to compare with FP (preset names or ``QuantRecipe``; empty = FP only).
        protocol: :class:`ProtocolConfig` (default: the paper's sizes; per-image generators, see the module
            docstring).
        sampler: default :data:`PAPER_SAMPLER`; ``image_format="jpg"`` reproduces the official JPEG intermediates.
        bootstrap: default :data:`PAPER_BOOTSTRAP`.
        device: ``"cuda"`` for the real protocol; ``"cpu"`` works (slowly).
        pipe_factory: zero-argument callable returning the FP pipeline (tests use a tiny one); default loads
            ``files.model_path`` with :func:`dgq_utils.model.loading.load_pipeline`.
        feature_extractor, clip_scorer: override the Inception extractor / open_clip scorer (tests use stand-ins).
        states: the calibrated-state cache (default: on ``out_dir/quant_states``); pass the notebooks' shared one
            to calibrate each recipe once.
        model_id: the model's identity in the cache keys (default: from the FP pipeline).
        title: the results tables' title.
    """
    V.check_instance(files, "files", ProtocolFiles, fix="pass ProtocolFiles(coco_captions, reference_stats, ...).")
    V.check_instance(protocol, "protocol", ProtocolConfig, allow_none=True, fix="pass ProtocolConfig(...).")
    V.check_instance(sampler, "sampler", SamplerSettings, allow_none=True, fix="pass SamplerSettings(...).")
    V.check_instance(bootstrap, "bootstrap", BootstrapConfig, allow_none=True, fix="pass BootstrapConfig(...).")
    V.check_recipes(recipes)
    V.check_device(device)
    protocol = protocol or ProtocolConfig()
    sampler = sampler or PAPER_SAMPLER
    bootstrap = bootstrap or PAPER_BOOTSTRAP
    n_images, n_clip, seed = int(protocol.n_images), int(protocol.n_clip), int(protocol.seed)
    stats_path = Path(files.reference_stats)
    ref_stats = M.load_reference_statistics(stats_path)  # fails early, naming the file
    M.resolve_weights(feature_extractor, files.inception_weights)  # idem
    if clip_scorer is None:
        clip_scorer = M.ClipScorer.from_open_clip(files.clip_model, files.clip_weights, device=device)
    recipes = list(recipes)
    data = paper_evaluation_set(files, protocol, calibrate=bool(recipes))
    calib = list(data.calibration)
    if pipe_factory is None:
        if files.model_path is None:
            raise ValueError("ProtocolFiles.model_path is required (a local SD v1.4 diffusers folder) unless "
                             "pipe_factory is given")

        def pipe_factory():
            return load_pipeline(files.model_path, device=device)

    metrics = ["fid", "isc", "clip_score"] + (["psnr", "ssim"] if protocol.fidelity_to_fp and recipes else [])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "protocol.json", {
        "model_path": str(files.model_path), "coco_captions": str(files.coco_captions),
        "reference_stats": str(stats_path), "inception_weights": str(files.inception_weights),
        "clip_model": files.clip_model, "clip_weights": str(files.clip_weights),
        "recipes": [getattr(r, "name", r) for r in recipes], "n_images": n_images, "n_clip": min(n_clip, n_images),
        "resize": protocol.resize, "seed": seed, "steps": sampler.num_inference_steps,
        "guidance": sampler.guidance_scale, "height": sampler.height, "width": sampler.width,
        "batch_size": sampler.batch_size, "image_format": sampler.image_format,
        "n_calibration": len(calib), "feature_extractor": feature_extractor, "clip_scorer": clip_scorer.name,
        "reference_dim": int(ref_stats["mu"].size), "title": title, "quirks": QUIRKS,
    })
    cfg = MetricsConfig(metrics, reference=Reference(stats=ref_stats, name=stats_path.name),
                        extractor=feature_extractor, extractor_weights=files.inception_weights,
                        resize=protocol.resize, clip_scorer=clip_scorer, clip_first_n=n_clip,
                        device=device if device in ("cpu", "cuda") else "cpu")
    return run_comparison(pipe_factory, recipes, data, Workspace(out_dir, states=states), sampler=sampler,
                          metrics=cfg, bootstrap=bootstrap, model_id=model_id, progress=progress, title=title)
