"""Image-quality, text-alignment and fidelity-to-FP metrics, each computed by the library made for it.

===================  ====================================================================  ======================
metric               what / how                                                            per image?
===================  ====================================================================  ======================
``fid``              Fréchet distance of extractor features to reference statistics        set (bootstrap CI)
                     (torch-fidelity's ``fid_features_to_statistics`` + ``fid_statistics_to_metric``)
``kid``              kernel (MMD²) distance to reference *features* (torch-fidelity)       set (bootstrap CI)
``isc``              Inception Score from the extractor's logits (torch-fidelity)          set (bootstrap CI)
``clip_score``       cosine of normalised CLIP image and text embeddings (open_clip, or    yes
                     the embedded world's small transformers CLIP); official convention:
                     not ×100, not clipped; ``convention="torchmetrics"`` gives 100·max(cos, 0)
``alignment``        embedded world only: attribute-classifier accuracy, per attribute,    yes
                     whole caption, held-out combinations (the world's evaluator)
``psnr``, ``ssim``   vs the FP image of the same prompt and seed (torchmetrics)            yes
``lpips``            vs FP (torchmetrics' LPIPS: its shipped linear layers + torchvision   yes
                     backbone weights that must already be on disk)
===================  ====================================================================  ======================

Feature extractors are torch-fidelity extractors chosen **by name** (:func:`available_extractors`):
``"inception-v3-compat"`` (the FID/IS network; its weights come from a local file or torch-fidelity's cache
folder — this module never lets torch-fidelity download, and says which file is missing and how to get it),
``"dgq-world-evaluator"`` (the embedded world's attribute-evaluator features, registered by
:mod:`dgq_utils.world.fidelity` when the world is imported),
``"pixels-debug"`` (a weight-free stand-in for tests and smoke runs), or any extractor you register with
:func:`register_extractor`. FID/KID/IS values always come from torch-fidelity's functions; only the bootstrap
*replicates* of FID use an exact, tested algebraic shortcut (:class:`FidReplicates`).
Features are extracted once and cached to ``.npz`` files keyed by the images' SHA-256s, the extractor and its
weights, so bootstrap CIs and paired comparisons reuse them instead of re-running the network.

Images are handled as ``uint8`` tensors ``(N, 3, H, W)`` (what torch-fidelity's extractors take); helpers load
them from paths or from a generation manifest, optionally resizing (PIL bicubic = PIL's default filter, which is
what the paper's evaluation used for its 512 → 256 resize).

One module per metric family: :mod:`.images` (image I/O), :mod:`.features` (extractor registry, feature cache),
:mod:`.fidelity` (FID / KID / IS), :mod:`.clip` (CLIP score), :mod:`.pairwise` (PSNR / SSIM / LPIPS vs FP) and
:mod:`.alignment` (attribute-classifier accuracy). Their public names are re-exported here, so
``from dgq_utils.evaluate import metrics as M; M.fid(...)`` reads as one namespace.
"""
from __future__ import annotations

from typing import Iterable

METRICS = ("fid", "kid", "isc", "clip_score", "alignment", "psnr", "ssim", "lpips")
SET_METRICS = ("fid", "kid", "isc")
FIDELITY_METRICS = ("psnr", "ssim", "lpips")


def check_metrics(metrics: Iterable[str]) -> list[str]:
    """Validate metric names (order kept, duplicates dropped); unknown names raise with the valid list."""
    if isinstance(metrics, str):
        metrics = [metrics]
    out = list(dict.fromkeys(metrics))
    bad = [m for m in out if m not in METRICS]
    if bad:
        raise ValueError(f"unknown metric(s) {bad}; valid metrics: {', '.join(METRICS)}")
    return out



from dgq_utils.evaluate.metrics.alignment import (  # noqa: E402
    ALIGNMENT_FLAGS,
    alignment_cis,
    alignment_columns,
    alignment_table,
)
from dgq_utils.evaluate.metrics.clip import CLIP_CONVENTIONS, ClipScorer, clip_score  # noqa: E402
from dgq_utils.evaluate.metrics.features import (  # noqa: E402
    INCEPTION,
    INCEPTION_WEIGHTS_FILE,
    INCEPTION_WEIGHTS_URL,
    PIXELS_DEBUG,
    ExtractorInfo,
    available_extractors,
    extract_features,
    extractor_info,
    register_extractor,
    register_lazy_extractor,
    resolve_weights,
)
from dgq_utils.evaluate.metrics.fidelity import (  # noqa: E402
    FidReplicates,
    fid,
    fid_ci,
    fid_from_statistics,
    fid_statistics,
    inception_score,
    isc_ci,
    kid,
    kid_ci,
    load_reference_statistics,
    save_reference_statistics,
)
from dgq_utils.evaluate.metrics.images import (  # noqa: E402
    ImageDataset,
    check_same_size,
    image_to_tensor,
    load_images,
    paths_from,
    to_pil,
)
from dgq_utils.evaluate.metrics.pairwise import (  # noqa: E402
    LPIPS_BACKBONES,
    PSNR_CAP_DB,
    LpipsScorer,
    LpipsUnavailable,
    lpips_backbone_file,
    lpips_per_image,
    psnr_per_image,
    ssim_per_image,
)
