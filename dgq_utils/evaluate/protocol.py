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
from pathlib import Path
from typing import Any, Callable, Sequence

import pandas as pd

from dgq_utils.atomic import atomic_write_json
from dgq_utils.config import SamplerSettings
from dgq_utils.config import validation as V
from dgq_utils.evaluate import metrics as M
from dgq_utils.evaluate.compare import ComparisonResult, Reference, run_comparison

PAPER_N_IMAGES = 30_000
PAPER_N_CLIP = 3_000
PAPER_RESIZE = 256
PAPER_SEED = 42
PAPER_N_CALIBRATION = 64
PAPER_CLIP_MODEL = "ViT-g-14"

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


def run_paper_protocol(
    model_path: str | os.PathLike | None,
    coco_captions: str | os.PathLike,
    reference_stats_npz: str | os.PathLike,
    inception_weights: str | os.PathLike | None,
    clip_model_name: str,
    clip_weights: str | os.PathLike | None,
    out_dir: str | os.PathLike,
    *,
    recipes: Sequence[Any] = (),
    n_images: int = PAPER_N_IMAGES,
    n_clip: int = PAPER_N_CLIP,
    resize: int = PAPER_RESIZE,
    seed: int = PAPER_SEED,
    num_inference_steps: int = 25,
    guidance_scale: float = 7.5,
    height: int = 512,
    width: int = 512,
    batch_size: int = 8,
    image_format: str = "png",
    calibration_captions_file: str | os.PathLike | None = None,
    n_calibration: int = PAPER_N_CALIBRATION,
    fidelity_to_fp: bool = True,
    device: str = "cuda",
    pipe_factory: Callable[[], Any] | None = None,
    feature_extractor: str = M.INCEPTION,
    clip_scorer: M.ClipScorer | None = None,
    n_boot: int = 1000,
    n_boot_set: int = 50,
    progress: bool = True,
    **kwargs,
) -> ComparisonResult:
    """Run the paper's SD v1.4 MS-COCO protocol for FP and ``recipes``; returns the results tables.

    Args:
        model_path: local diffusers folder of SD v1.4 (``CompVis/stable-diffusion-v1-4`` downloaded beforehand).
        coco_captions: BK-SDM ``metadata.csv`` (or a COCO captions json); the first ``n_images`` rows are used.
        reference_stats_npz: BK-SDM ``real_im256.npz`` (``mu``/``sigma`` of Inception pool features).
        inception_weights: torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth`` (or ``None`` to use the
            copy in torch-fidelity's cache folder; it is never downloaded).
        clip_model_name, clip_weights: open_clip model (paper: ``"ViT-g-14"``) and its local weights file
            (``laion2b_s34b_b88k``).
        out_dir: results, images (``out_dir/images``, shared by FP and every recipe), features, quant states,
            ``protocol.json`` (every parameter and the quirks above).
        recipes: quantized recipes to compare with FP (preset names or ``QuantRecipe``; empty = FP only).
        n_images, n_clip, resize: 30,000 / 3,000 / 256 as in the paper.
        seed: 42 as in the paper (per-image generators, see the module docstring).
        image_format: ``"png"`` (default) or ``"jpg"`` (the official JPEG intermediates).
        calibration_captions_file: COCO ``captions_train2017.json`` for calibration (paper); default: captions of
            ``coco_captions`` after the first ``n_images`` rows.
        fidelity_to_fp: also PSNR/SSIM of each recipe vs FP (same captions and seeds).
        device: ``"cuda"`` for the real protocol; ``"cpu"`` works (slowly).
        pipe_factory: zero-argument callable returning the FP pipeline (tests use a tiny one); default loads
            ``model_path`` with :func:`dgq_utils.model.loading.load_pipeline`.
        feature_extractor, clip_scorer: override the Inception extractor / open_clip scorer (tests use stand-ins).
        n_boot, n_boot_set: bootstrap replicates for per-image means / for FID and IS.
        kwargs: passed on to :func:`run_comparison`.
    """
    V.check_protocol_numbers(n_images=n_images, n_clip=n_clip, resize=resize, n_calibration=n_calibration,
                             recipes=recipes)
    V.check_comparison_numbers(n_boot=n_boot, n_boot_set=n_boot_set, seed=seed, device=device)
    SamplerSettings(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, height=height,
                    width=width, batch_size=batch_size, image_format=image_format)  # checks them, before any work
    stats_path = Path(reference_stats_npz)
    ref_stats = M.load_reference_statistics(stats_path)  # fails early, naming the file
    M.resolve_weights(feature_extractor, inception_weights)  # idem
    if clip_scorer is None:
        clip_scorer = M.ClipScorer.from_open_clip(clip_model_name, clip_weights, device=device)
    caps = read_captions(coco_captions)
    if n_images < 1:
        raise ValueError(f"n_images must be >= 1, got {n_images}")
    if len(caps) < n_images:
        raise ValueError(f"{coco_captions} has {len(caps)} captions, fewer than n_images={n_images}")
    prompts = list(caps["caption"].iloc[:n_images])
    recipes = list(recipes)
    calib: list[str] = []
    if recipes:
        calib = calibration_captions(prompts, source=calibration_captions_file,
                                     pool=list(caps["caption"].iloc[n_images:]), n=n_calibration, seed=seed)
    if pipe_factory is None:
        from dgq_utils.model.loading import load_pipeline

        if model_path is None:
            raise ValueError("model_path is required (a local SD v1.4 diffusers folder) unless pipe_factory is given")

        def pipe_factory():
            return load_pipeline(model_path, device=device)

    metrics = ["fid", "isc", "clip_score"] + (["psnr", "ssim"] if fidelity_to_fp and recipes else [])
    settings = SamplerSettings(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, height=height,
                               width=width, batch_size=batch_size, image_format=image_format)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "protocol.json", {
        "model_path": str(model_path), "coco_captions": str(coco_captions), "reference_stats": str(stats_path),
        "inception_weights": str(inception_weights), "clip_model": clip_model_name, "clip_weights": str(clip_weights),
        "recipes": [getattr(r, "name", r) for r in recipes], "n_images": n_images, "n_clip": min(n_clip, n_images),
        "resize": resize, "seed": seed, "steps": num_inference_steps, "guidance": guidance_scale,
        "height": height, "width": width, "batch_size": batch_size, "image_format": image_format,
        "n_calibration": len(calib), "feature_extractor": feature_extractor, "clip_scorer": clip_scorer.name,
        "reference_dim": int(ref_stats["mu"].size), "quirks": QUIRKS,
    })
    return run_comparison(
        pipe_factory, recipes, prompts, [seed], out_dir, calibration_prompts=calib, metrics=metrics,
        settings=settings, reference=Reference(stats=ref_stats, name=stats_path.name), extractor=feature_extractor,
        extractor_weights=inception_weights, metric_size=resize, clip_scorer=clip_scorer, clip_first_n=n_clip,
        n_boot=n_boot, n_boot_set=n_boot_set, device=device if device in ("cpu", "cuda") else "cpu",
        progress=progress, title="Paper protocol (SD v1.4, MS-COCO)", **kwargs)
