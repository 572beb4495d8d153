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
``"dgq-world-evaluator"`` (the embedded world's attribute-evaluator features, :mod:`dgq_utils.world.fidelity`),
``"pixels-debug"`` (a weight-free stand-in for tests and smoke runs), or any extractor you register with
:func:`register_extractor`. FID/KID/IS values always come from torch-fidelity's functions; only the bootstrap
*replicates* of FID use an exact, tested algebraic shortcut (:class:`FidReplicates`).
Features are extracted once and cached to ``.npz`` files keyed by the images' SHA-256s, the extractor and its
weights, so bootstrap CIs and paired comparisons reuse them instead of re-running the network.

Images are handled as ``uint8`` tensors ``(N, 3, H, W)`` (what torch-fidelity's extractors take); helpers load
them from paths or from a generation manifest, optionally resizing (PIL bicubic = PIL's default filter, which is
what the paper's evaluation used for its 512 → 256 resize).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import pandas as pd
import torch

from dgq_utils.atomic import atomic_save_npz
from dgq_utils.evaluate.confidence import CI, bootstrap_mean, bootstrap_statistic

#: every metric name this module knows (``evaluate.run_comparison`` accepts these)
METRICS = ("fid", "kid", "isc", "clip_score", "alignment", "psnr", "ssim", "lpips")
SET_METRICS = ("fid", "kid", "isc")
FIDELITY_METRICS = ("psnr", "ssim", "lpips")

INCEPTION = "inception-v3-compat"
INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + INCEPTION_WEIGHTS_FILE)

PSNR_CAP_DB = 100.0  # PSNR of identical images is +inf; it is reported as this cap so means stay finite


def check_metrics(metrics: Iterable[str]) -> list[str]:
    """Validate metric names (order kept, duplicates dropped); unknown names raise with the valid list."""
    if isinstance(metrics, str):
        metrics = [metrics]
    out = list(dict.fromkeys(metrics))
    bad = [m for m in out if m not in METRICS]
    if bad:
        raise ValueError(f"unknown metric(s) {bad}; valid metrics: {', '.join(METRICS)}")
    return out


# --------------------------------------------------------------------------------------------------------------
# images
# --------------------------------------------------------------------------------------------------------------
def _to_pil(img):
    from PIL import Image

    if isinstance(img, Image.Image):
        return img.convert("RGB")
    if isinstance(img, (str, os.PathLike)):
        if not Path(img).is_file():
            raise FileNotFoundError(f"image file not found: {img}")
        with Image.open(img) as im:
            return im.convert("RGB")
    if torch.is_tensor(img):
        arr = img.detach().cpu()
        if arr.dtype != torch.uint8:
            raise TypeError("image tensors must be uint8 (3, H, W)")
        return Image.fromarray(arr.permute(1, 2, 0).numpy())
    if isinstance(img, np.ndarray):
        return Image.fromarray(img.astype(np.uint8))
    raise TypeError(f"cannot read an image from {type(img).__name__}")


def image_to_tensor(img, size: int | tuple[int, int] | None = None) -> torch.Tensor:
    """One image (path, PIL, uint8 array/tensor) → ``uint8`` tensor ``(3, H, W)``, optionally resized."""
    from PIL import Image

    pil = _to_pil(img)
    if size is not None:
        wh = (size, size) if isinstance(size, int) else (int(size[1]), int(size[0]))
        if pil.size != wh:
            pil = pil.resize(wh, Image.BICUBIC)
    return torch.from_numpy(np.asarray(pil, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


def paths_from(images) -> list:
    """Accept a manifest DataFrame (``file`` column, plus ``folder`` attribute or absolute files), a
    ``GenerationResult``, or a list of paths/images."""
    if hasattr(images, "paths") and hasattr(images, "manifest"):
        return list(images.paths)
    if isinstance(images, pd.DataFrame):
        if "path" in images.columns:
            return list(images["path"])
        raise ValueError("a manifest DataFrame needs a 'path' column (use GenerationResult.paths)")
    return list(images)


def load_images(images, size: int | tuple[int, int] | None = None) -> torch.Tensor:
    """Images → one ``uint8`` tensor ``(N, 3, H, W)``. Without ``size`` all images must have the same size."""
    items = paths_from(images) if not torch.is_tensor(images) else images
    if torch.is_tensor(items):
        if items.dtype != torch.uint8 or items.dim() != 4 or items.shape[1] != 3:
            raise TypeError(f"expected a uint8 (N, 3, H, W) tensor, got {items.dtype} {tuple(items.shape)}")
        return items
    if len(items) == 0:
        raise ValueError("no images given")
    tensors = [image_to_tensor(x, size) for x in items]
    shapes = sorted({tuple(t.shape) for t in tensors})
    if len(shapes) > 1:
        raise ValueError(f"images have different sizes {shapes[:4]}; pass size=... to resize them to one size")
    return torch.stack(tensors)


def check_same_size(a: torch.Tensor, b: torch.Tensor, what: str = "images") -> None:
    if a.shape != b.shape:
        raise ValueError(f"{what}: shapes differ {tuple(a.shape)} vs {tuple(b.shape)} — compare images of the same "
                         "prompts/seeds at the same resolution (resize both with size=...)")


class _ImageDataset(torch.utils.data.Dataset):
    """Lazily loaded uint8 images for torch-fidelity's dataset path (30k images do not fit in RAM at once)."""

    def __init__(self, items, size=None):
        self.items, self.size = list(items), size
        self._shape = None

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        t = self.items[i] if torch.is_tensor(self.items[i]) else image_to_tensor(self.items[i], self.size)
        if self._shape is None:
            self._shape = t.shape
        elif t.shape != self._shape:
            raise ValueError(f"image {i} has shape {tuple(t.shape)}, earlier ones {tuple(self._shape)}; "
                             "pass size=... to resize")
        return t


# --------------------------------------------------------------------------------------------------------------
# feature extractors (torch-fidelity)
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ExtractorInfo:
    """How to use a registered torch-fidelity extractor: which feature layer each metric reads."""

    name: str
    fid_layer: str
    kid_layer: str
    isc_layer: str | None = None
    needs_weights: bool = False
    weights_hint: str = ""
    default_weights: Callable[[], str | None] | None = field(default=None, compare=False)


_EXTRACTORS: dict[str, ExtractorInfo] = {}
_LAZY: dict[str, Callable[[], None]] = {}


def _inception_default_weights() -> str | None:
    p = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE
    return str(p) if p.is_file() else None


_EXTRACTORS[INCEPTION] = ExtractorInfo(
    INCEPTION, fid_layer="2048", kid_layer="2048", isc_layer="logits_unbiased", needs_weights=True,
    weights_hint=(f"torch-fidelity's InceptionV3 FID weights '{INCEPTION_WEIGHTS_FILE}' (~92 MB). On a machine with "
                  f"internet access download {INCEPTION_WEIGHTS_URL} and either pass its path "
                  f"(inception_weights=...) or copy it to <torch hub dir>/checkpoints/ "
                  f"(currently {Path(torch.hub.get_dir()) / 'checkpoints'})."),
    default_weights=_inception_default_weights,
)


def _pixel_extractor_class():
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase

    class PixelStatsExtractor(FeatureExtractorBase):
        """WEIGHT-FREE STAND-IN, for tests and smoke runs only — not a perceptual metric.

        ``"pixels"``: the image area-resized to 8×8, as 192 values in [0, 1]; ``"logits"``: a fixed (seeded)
        random projection of those to 16 values, so the Inception-Score code path can run without weights.
        """

        def __init__(self, name, features_list, **kwargs):
            super().__init__(name, features_list)
            g = torch.Generator().manual_seed(1234)
            self.register_buffer("proj", torch.randn(192, 16, generator=g) * 4.0)

        @staticmethod
        def get_provided_features_list():
            return ("pixels", "logits")

        @staticmethod
        def get_default_feature_layer_for_metric(metric):
            return {"isc": "logits", "fid": "pixels", "kid": "pixels", "prc": "pixels"}[metric]

        @staticmethod
        def can_be_compiled():
            return False

        @staticmethod
        def get_dummy_input_for_compile():
            return (torch.rand([1, 3, 32, 32]) * 255).to(torch.uint8)

        def forward(self, x):
            if not (torch.is_tensor(x) and x.dtype == torch.uint8 and x.dim() == 4 and x.shape[1] == 3):
                raise ValueError("expected uint8 (N, 3, H, W) images")
            px = torch.nn.functional.adaptive_avg_pool2d(x.float() / 255.0, 8).flatten(1)
            out = {"pixels": px, "logits": (px - 0.5) @ self.proj}
            return tuple(out[k] for k in self.features_list)

    return PixelStatsExtractor


#: name of the weight-free stand-in extractor (see ``_pixel_extractor_class``)
PIXELS_DEBUG = "pixels-debug"


def register_extractor(name: str, cls, *, fid_layer: str, kid_layer: str | None = None, isc_layer: str | None = None,
                       needs_weights: bool = False, weights_hint: str = "",
                       default_weights: Callable[[], str | None] | None = None, replace: bool = False) -> ExtractorInfo:
    """Register a torch-fidelity ``FeatureExtractorBase`` subclass under ``name`` (also in torch-fidelity's
    registry) and say which layer FID/KID/IS read. Registering the same class twice is a no-op."""
    from torch_fidelity.registry import (
        FEATURE_EXTRACTORS_REGISTRY,
        register_feature_extractor,
    )

    if name in FEATURE_EXTRACTORS_REGISTRY:
        if FEATURE_EXTRACTORS_REGISTRY[name] is not cls and not replace:
            raise ValueError(f"a different feature extractor is already registered as {name!r}")
        FEATURE_EXTRACTORS_REGISTRY[name] = cls
    else:
        register_feature_extractor(name, cls)
    info = ExtractorInfo(name, fid_layer, kid_layer or fid_layer, isc_layer, needs_weights, weights_hint,
                         default_weights)
    _EXTRACTORS[name] = info
    return info


def register_lazy_extractor(name: str, loader: Callable[[], None]) -> None:
    """Make ``name`` valid now and call ``loader()`` (which must call :func:`register_extractor`) on first use."""
    _LAZY[name] = loader


register_lazy_extractor(PIXELS_DEBUG, lambda: register_extractor(
    PIXELS_DEBUG, _pixel_extractor_class(), fid_layer="pixels", kid_layer="pixels", isc_layer="logits"))

#: the embedded world's extractor: the attribute evaluator's 256-d penultimate features (FID/KID) and 40
#: (colour, shape) log-probabilities (IS-style score); registered by :mod:`dgq_utils.world.fidelity`
EMBEDDED_EXTRACTOR = "dgq-world-evaluator"


def _register_embedded() -> None:
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    from dgq_utils.world import fidelity as wf

    wf.register()
    register_extractor(
        EMBEDDED_EXTRACTOR, FEATURE_EXTRACTORS_REGISTRY[wf.NAME], fid_layer="penultimate", kid_layer="penultimate",
        isc_layer="logits_unbiased", needs_weights=True,
        weights_hint=(f"the embedded attribute evaluator (model.safetensors + config.json), by default in "
                      f"{wf.DEFAULT_EVALUATOR_DIR}; it ships with the repository (data/embedded) or is retrained "
                      "by scripts/train_embedded.py."),
        default_weights=lambda: str(wf.DEFAULT_EVALUATOR_DIR)
        if (wf.DEFAULT_EVALUATOR_DIR / "model.safetensors").is_file() else None,
        replace=True)


register_lazy_extractor(EMBEDDED_EXTRACTOR, _register_embedded)


def available_extractors() -> list[str]:
    return sorted(set(_EXTRACTORS) | set(_LAZY))


def extractor_info(name: str) -> ExtractorInfo:
    """The :class:`ExtractorInfo` of ``name``; an unknown name raises with the list of valid ones."""
    if name not in _EXTRACTORS and name in _LAZY:
        _LAZY.pop(name)()
    if name not in _EXTRACTORS:
        raise ValueError(f"unknown feature extractor {name!r}; valid: {', '.join(available_extractors())}")
    return _EXTRACTORS[name]


def resolve_weights(extractor: str, weights_path: str | os.PathLike | None) -> str | None:
    """The weights file to hand torch-fidelity, checked to exist — so torch-fidelity never falls back to a download.

    Raises ``FileNotFoundError`` naming the file and how to get it.
    """
    info = extractor_info(extractor)
    if weights_path is not None:
        p = Path(weights_path).expanduser()
        if not p.exists():  # a file (Inception) or a folder (the embedded evaluator)
            raise FileNotFoundError(f"weights file for feature extractor {extractor!r} not found: {p}. "
                                    f"{info.weights_hint}")
        return str(p)
    if info.needs_weights:
        found = info.default_weights() if info.default_weights else None
        if found is None:
            raise FileNotFoundError(f"no local weights for feature extractor {extractor!r} (nothing is downloaded). "
                                    f"{info.weights_hint}")
        return found
    return None


def _file_identity(path: str | None) -> str:
    if path is None:
        return ""
    p = Path(path)
    files = sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p]
    return ";".join(f"{q.name}:{q.stat().st_size}:{int(q.stat().st_mtime)}" for q in files)


def _items_identity(items) -> list[str]:
    """Per-image identities for the feature cache key: file SHA-256s (via a manifest) or tensor hashes."""
    out = []
    for x in items:
        if torch.is_tensor(x):
            out.append(hashlib.sha256(x.detach().cpu().contiguous().numpy().tobytes()).hexdigest())
        else:
            p = Path(x)
            st = p.stat()
            out.append(f"{p.resolve()}:{st.st_size}:{st.st_mtime_ns}")
    return out


def extract_features(
    images,
    extractor: str = INCEPTION,
    *,
    weights_path: str | os.PathLike | None = None,
    layers: Sequence[str] | None = None,
    size: int | tuple[int, int] | None = None,
    batch_size: int = 64,
    device: str = "cpu",
    cache_dir: str | os.PathLike | None = None,
    image_ids: Sequence[str] | None = None,
    verbose: bool = False,
) -> dict[str, np.ndarray]:
    """Features of ``images`` from a registered torch-fidelity extractor, as ``{layer: float array (N, D)}``.

    ``images``: paths, PIL images, a ``uint8`` tensor, or a ``GenerationResult``. ``size`` resizes first.
    ``cache_dir``: store/reuse the features as ``.npz`` keyed by (extractor, weights file, layers, size, image
    identities). ``image_ids`` overrides the identities (the generation manifest's SHA-256 column is ideal);
    default: path + size + mtime for files, a content hash for tensors.
    """
    from torch_fidelity.utils import (
        create_feature_extractor,
        get_featuresdict_from_dataset,
    )

    info = extractor_info(extractor)
    weights = resolve_weights(extractor, weights_path)
    layers = list(dict.fromkeys(layers or [info.fid_layer, info.kid_layer] + ([info.isc_layer] if info.isc_layer else [])))
    if torch.is_tensor(images):
        items = list(load_images(images))
    else:
        items = paths_from(images)
    if len(items) == 0:
        raise ValueError("no images given to extract features from")
    if hasattr(images, "manifest") and image_ids is None:
        image_ids = list(images.manifest["sha256"])

    cache_file = None
    if cache_dir is not None:
        ids = list(image_ids) if image_ids is not None else _items_identity(items)
        key = hashlib.sha256(json.dumps({"extractor": extractor, "weights": _file_identity(weights),
                                         "layers": sorted(layers), "size": size, "ids": ids}).encode()).hexdigest()[:20]
        cache_file = Path(cache_dir) / f"features-{extractor}-{key}.npz"
        if cache_file.is_file():
            try:
                with np.load(cache_file) as z:
                    got = {k: z[k] for k in layers}
                if all(len(v) == len(items) for v in got.values()):
                    return got
            except (OSError, KeyError, ValueError, EOFError):
                pass  # corrupt cache entry: recompute below and overwrite it
    kwargs = {"feature_extractor_weights_path": weights, "verbose": verbose}
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    fe = create_feature_extractor(extractor, layers, cuda=cuda, **kwargs)
    if dev.type not in ("cpu", "cuda") or dev.index is not None:
        fe = fe.to(dev)
    ds = _ImageDataset(items, size)
    # torch-fidelity moves each batch with ``.cuda()`` (the current CUDA device): make that ``dev`` for "cuda:N"
    with torch.cuda.device(dev) if cuda else contextlib.nullcontext():
        feats = get_featuresdict_from_dataset(ds, fe, batch_size, cuda, True, verbose)
    out = {k: v.detach().cpu().numpy() for k, v in feats.items()}
    if cache_file is not None:
        atomic_save_npz(cache_file, **out)
    return out


# --------------------------------------------------------------------------------------------------------------
# FID / KID / IS (torch-fidelity's functions on cached features)
# --------------------------------------------------------------------------------------------------------------
def _as_tensor(feats) -> torch.Tensor:
    return feats if torch.is_tensor(feats) else torch.from_numpy(np.ascontiguousarray(feats))


def fid_statistics(features) -> dict[str, np.ndarray]:
    """``{"mu", "sigma"}`` of features (torch-fidelity's ``fid_features_to_statistics``), float64."""
    from torch_fidelity.metric_fid import fid_features_to_statistics

    f = _as_tensor(features)
    if f.dim() != 2 or len(f) < 2:
        raise ValueError(f"need a (N >= 2, D) feature matrix for FID statistics, got {tuple(f.shape)}")
    st = fid_features_to_statistics(f.float().cpu())
    return {"mu": np.asarray(st["mu"], dtype=np.float64), "sigma": np.asarray(st["sigma"], dtype=np.float64)}


def save_reference_statistics(path: str | os.PathLike, stats: dict, **meta) -> Path:
    """Write ``mu``/``sigma`` (the pytorch-fid ``.npz`` layout) atomically, plus optional string metadata."""
    extra = {f"meta_{k}": np.array(str(v)) for k, v in meta.items()}
    return atomic_save_npz(path, mu=np.asarray(stats["mu"]), sigma=np.asarray(stats["sigma"]), **extra)


def load_reference_statistics(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read ``mu``/``sigma`` from an ``.npz`` (pytorch-fid's ``--save-stats`` layout, e.g. BK-SDM's
    ``real_im256.npz``, or :func:`save_reference_statistics`)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"reference statistics file not found: {p}. For the paper protocol this is BK-SDM's "
                                "real_im256.npz (COCO val2014 at 256 px, Inception pool features; see "
                                "dgq-official-code.md §6); for the embedded world it is written by "
                                "evaluate.reference_statistics_for_world.")
    try:
        with np.load(p) as z:
            mu, sigma = np.asarray(z["mu"], dtype=np.float64), np.asarray(z["sigma"], dtype=np.float64)
    except KeyError as e:
        raise ValueError(f"{p} has no {e} array; expected 'mu' and 'sigma' (pytorch-fid layout)") from None
    if mu.ndim != 1 or sigma.shape != (mu.size, mu.size):
        raise ValueError(f"{p}: mu {mu.shape} / sigma {sigma.shape} are not a (D,) / (D, D) pair")
    return {"mu": mu, "sigma": sigma}


def fid_from_statistics(stats_gen: dict, stats_ref: dict) -> float:
    """FID between two ``mu``/``sigma`` pairs (torch-fidelity's ``fid_statistics_to_metric``)."""
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    a = {k: np.asarray(v, dtype=np.float64) for k, v in stats_gen.items()}
    b = {k: np.asarray(v, dtype=np.float64) for k, v in stats_ref.items()}
    if a["mu"].shape != b["mu"].shape:
        raise ValueError(f"feature dimensions differ: generated {a['mu'].shape} vs reference {b['mu'].shape} — "
                         "were both computed with the same extractor and layer?")
    return float(fid_statistics_to_metric(a, b, False)[KEY_METRIC_FID])


def fid(features_gen, stats_ref: dict) -> float:
    return fid_from_statistics(fid_statistics(features_gen), stats_ref)


class FidReplicates:
    """FID of many resampled feature sets against one fixed reference — for bootstrap replicates only.

    The reported FID always comes from torch-fidelity (:func:`fid`). Bootstrap needs it 100-odd times per recipe,
    and torch-fidelity's ``eigvals`` of the non-symmetric ``sigma_gen @ sigma_ref`` (d×d) costs ~0.1–0.3 s at
    d = 256 on this CPU. This class evaluates the *same* formula through exact identities. With ``P`` the
    replicate's features (n×d), ``C = I − 11ᵀ/n`` the centring matrix and ``S = sigma_ref``: the non-zero
    eigenvalues of ``sigma_gen S`` are those of the symmetric PSD ``C (P S Pᵀ) C / (n − 1)`` (n×n), and
    ``P S Pᵀ`` is a sub-matrix of ``X S Xᵀ`` (all n_total images), computed once — so a replicate costs one
    gather, a double centring and an n×n ``eigvalsh``. When n > d it uses ``S½ sigma_gen S½`` (d×d) instead.
    A test checks both branches against torch-fidelity to 1e-6 relative.
    """

    def __init__(self, features: np.ndarray, stats_ref: dict):
        self.f = np.asarray(features, dtype=np.float64)
        self.mu_r = np.asarray(stats_ref["mu"], dtype=np.float64)
        self.s_r = np.asarray(stats_ref["sigma"], dtype=np.float64)
        if self.f.ndim != 2 or self.f.shape[1] != self.mu_r.size:
            raise ValueError(f"features {self.f.shape} do not match reference dimension {self.mu_r.size}")
        self.tr_r = float(np.trace(self.s_r))
        self.small = len(self.f) <= self.f.shape[1]
        if self.small:  # Gram matrices of all images, once
            self.g_s = self.f @ self.s_r @ self.f.T
            self.g_i = self.f @ self.f.T
        else:
            w, v = np.linalg.eigh((self.s_r + self.s_r.T) / 2)
            self.sqrt_r = (v * np.sqrt(np.clip(w, 0, None))) @ v.T

    @staticmethod
    def _centre(k: np.ndarray) -> np.ndarray:
        return k - k.mean(0, keepdims=True) - k.mean(1, keepdims=True) + k.mean()

    def __call__(self, idx: np.ndarray) -> float:
        idx = np.asarray(idx)
        n = len(idx)
        mu = self.f[idx].mean(0)
        diff = mu - self.mu_r
        if self.small:
            tr_g = float(np.trace(self._centre(self.g_i[np.ix_(idx, idx)])) / (n - 1))
            m = self._centre(self.g_s[np.ix_(idx, idx)]) / (n - 1)
        else:
            xc = self.f[idx] - mu
            tr_g = float((xc * xc).sum() / (n - 1))
            m = self.sqrt_r @ (xc.T @ xc / (n - 1)) @ self.sqrt_r
        ev = np.linalg.eigvalsh((m + m.T) / 2)
        tr_cov = float(np.sqrt(np.clip(ev, 0, None)).sum())
        return float(diff @ diff + tr_g + self.tr_r - 2 * tr_cov)


def fid_ci(features_gen, stats_ref: dict, *, n_boot: int = 100, seed: int = 0, level: float = 0.95,
           method: str = "shifted") -> CI:
    """FID (torch-fidelity) with a bootstrap CI over the generated images (reference statistics fixed)."""
    f = np.asarray(features_gen)
    est = fid(f, stats_ref)
    ci = bootstrap_statistic(FidReplicates(f, stats_ref), len(f), n_boot=n_boot, seed=seed, level=level,
                             method=method)
    return CI(est, ci.low, ci.high, ci.n, ci.n_boot, ci.level, ci.method)


def kid(features_gen, features_ref, *, subsets: int = 100, subset_size: int = 1000, seed: int = 2020) -> tuple[float, float]:
    """KID mean and std over subsets (torch-fidelity's ``kid_features_to_metric``; subset size clipped to n)."""
    from torch_fidelity.metric_kid import (
        KEY_METRIC_KID_MEAN,
        KEY_METRIC_KID_STD,
        kid_features_to_metric,
    )

    a, b = _as_tensor(features_gen).double(), _as_tensor(features_ref).double()
    size = min(subset_size, len(a), len(b))
    if size < 2:
        raise ValueError("KID needs at least 2 generated and 2 reference images")
    out = kid_features_to_metric(a, b, kid_subsets=subsets, kid_subset_size=size, rng_seed=seed, verbose=False)
    return float(out[KEY_METRIC_KID_MEAN]), float(out[KEY_METRIC_KID_STD])


def kid_ci(features_gen, features_ref, *, n_boot: int = 100, seed: int = 0, level: float = 0.95, subsets: int = 100,
           boot_subsets: int = 2, subset_size: int = 1000, method: str = "shifted") -> CI:
    """KID (torch-fidelity, ``subsets`` subsets) with a bootstrap CI over the generated images; each replicate
    uses ``boot_subsets`` subsets (the bootstrap supplies the spread, so a few keep it affordable)."""
    f = np.asarray(features_gen)
    ref = np.asarray(features_ref)
    est = kid(f, ref, subsets=subsets, subset_size=subset_size)[0]
    ci = bootstrap_statistic(lambda idx: kid(f[idx], ref, subsets=boot_subsets, subset_size=subset_size)[0],
                             len(f), n_boot=n_boot, seed=seed, level=level, method=method)
    return CI(est, ci.low, ci.high, ci.n, ci.n_boot, ci.level, ci.method)


def inception_score(logits, *, splits: int = 10, seed: int = 2020) -> tuple[float, float]:
    """IS mean and std over splits (torch-fidelity's ``isc_features_to_metric``; splits clipped to n)."""
    from torch_fidelity.metric_isc import (
        KEY_METRIC_ISC_MEAN,
        KEY_METRIC_ISC_STD,
        isc_features_to_metric,
    )

    t = _as_tensor(logits)
    out = isc_features_to_metric(t, splits=max(1, min(splits, len(t))), shuffle=True, rng_seed=seed)
    return float(out[KEY_METRIC_ISC_MEAN]), float(out[KEY_METRIC_ISC_STD])


def isc_ci(logits, *, n_boot: int = 100, seed: int = 0, level: float = 0.95, splits: int = 10,
           method: str = "shifted") -> CI:
    f = np.asarray(logits)
    return bootstrap_statistic(lambda idx: inception_score(f[idx], splits=splits)[0], len(f), n_boot=n_boot,
                               seed=seed, level=level, method=method)


# --------------------------------------------------------------------------------------------------------------
# CLIP score
# --------------------------------------------------------------------------------------------------------------
CLIP_CONVENTIONS = ("cosine", "torchmetrics")


class ClipScorer:
    """Image–text cosine similarity with one interface for open_clip models and transformers ``CLIPModel``s.

    ``encode_images(uint8 (N,3,H,W)) -> (N, D)`` and ``encode_texts(list[str]) -> (N, D)`` return L2-normalised
    embeddings; :meth:`scores` gives the per-image cosine of image *i* with text *i*.

    Conventions: ``"cosine"`` (default; the official DGQ/BK-SDM evaluation: plain cosine, not ×100, not clipped,
    so a score can be negative) or ``"torchmetrics"`` (``100 * max(cosine, 0)``, torchmetrics' ``CLIPScore``).
    """

    def __init__(self, encode_images: Callable, encode_texts: Callable, name: str, batch_size: int = 32):
        self._enc_img, self._enc_txt = encode_images, encode_texts
        self.name, self.batch_size = name, batch_size

    # constructors --------------------------------------------------------------------------------------------
    @classmethod
    def from_open_clip(cls, model_name: str, weights_path: str | os.PathLike, *, device: str = "cpu",
                       batch_size: int = 32) -> "ClipScorer":
        """An open_clip model (e.g. ``"ViT-g-14"``, the paper's, with the ``laion2b_s34b_b88k`` weights file)
        from a *local* weights file. Nothing is downloaded: a missing file raises, naming it."""
        import open_clip

        if model_name not in open_clip.list_models():
            raise ValueError(f"unknown open_clip model {model_name!r}; see open_clip.list_models() "
                             "(the paper uses 'ViT-g-14')")
        p = Path(weights_path).expanduser() if weights_path else None
        if p is None or not p.is_file():
            raise FileNotFoundError(
                f"open_clip weights file not found: {weights_path}. For the paper's CLIP score this is "
                "ViT-g-14 'laion2b_s34b_b88k' (open_clip_pytorch_model.bin, ~5.5 GB, from the Hugging Face repo "
                "laion/CLIP-ViT-g-14-laion2B-s34B-b88K); download it on a connected machine and pass its path.")
        model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=str(p), device=device)
        return cls.from_open_clip_like(model.eval(), preprocess, open_clip.get_tokenizer(model_name),
                                       name=f"open_clip:{model_name}", device=device, batch_size=batch_size)

    @classmethod
    def from_open_clip_like(cls, model, preprocess, tokenizer, *, name: str, device: str = "cpu",
                            batch_size: int = 32, pil_input: bool = True) -> "ClipScorer":
        """Any model with open_clip's interface: ``model.encode_image(preprocessed batch)``,
        ``model.encode_text(tokenizer(list_of_str))``; ``preprocess`` maps one image (PIL if ``pil_input``, else a
        uint8 (3, H, W) tensor) to a tensor."""

        @torch.no_grad()
        def enc_img(x):
            batch = torch.stack([preprocess(_to_pil(im) if pil_input else im) for im in x]).to(device)
            return model.encode_image(batch).float()

        @torch.no_grad()
        def enc_txt(texts):
            return model.encode_text(tokenizer(list(texts)).to(device)).float()

        return cls(enc_img, enc_txt, name, batch_size)

    @classmethod
    def from_transformers(cls, model, tokenizer, *, image_size: int | None = None, mean=None, std=None,
                          device: str = "cpu", batch_size: int = 32, name: str = "transformers-clip") -> "ClipScorer":
        """A transformers ``CLIPModel`` + tokenizer. Images are resized (bicubic) and centre-cropped to the vision
        tower's ``image_size`` and normalised with CLIP's mean/std (or those given)."""
        import torch.nn.functional as F

        vcfg = model.config.vision_config
        size = int(image_size or vcfg.image_size)
        mean = torch.tensor(mean or (0.48145466, 0.4578275, 0.40821073)).view(1, 3, 1, 1)
        std = torch.tensor(std or (0.26862954, 0.26130258, 0.27577711)).view(1, 3, 1, 1)
        model = model.to(device).eval()
        max_len = int(getattr(model.config.text_config, "max_position_embeddings", 77))

        def _pooled(out):
            return out if torch.is_tensor(out) else out.pooler_output

        @torch.no_grad()
        def enc_img(x):
            x = x.float() / 255.0
            h, w = x.shape[-2:]
            s = size / min(h, w)
            if (h, w) != (size, size):
                x = F.interpolate(x, size=(max(size, round(h * s)), max(size, round(w * s))), mode="bicubic",
                                  align_corners=False, antialias=True).clamp(0, 1)
                top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
                x = x[..., top:top + size, left:left + size]
            x = ((x - mean) / std).to(device)
            return _pooled(model.get_image_features(pixel_values=x)).float()

        @torch.no_grad()
        def enc_txt(texts):
            tok = tokenizer(list(texts), padding="max_length", truncation=True, max_length=max_len,
                            return_tensors="pt")
            kw = {"input_ids": tok["input_ids"].to(device)}
            if "attention_mask" in tok:
                kw["attention_mask"] = tok["attention_mask"].to(device)
            return _pooled(model.get_text_features(**kw)).float()

        return cls(enc_img, enc_txt, name, batch_size)

    @classmethod
    def from_embedded(cls, path: str | os.PathLike | None = None, *, device: str = "cpu",
                      batch_size: int = 256) -> "ClipScorer":
        """The embedded world's small CLIP (a transformers ``CLIPModel`` behind open_clip's interface,
        :func:`dgq_utils.world.clip.load_world_clip`), from ``data/embedded/clip`` or ``path``."""
        from dgq_utils.world.clip import load_world_clip

        model, preprocess, tokenizer = load_world_clip(path, device=device)
        return cls.from_open_clip_like(model, preprocess, tokenizer, name="embedded-clip", device=device,
                                       batch_size=batch_size, pil_input=False)

    # use -----------------------------------------------------------------------------------------------------
    def encode_images(self, images) -> torch.Tensor:
        x = load_images(images) if not torch.is_tensor(images) else images
        out = [self._enc_img(x[i:i + self.batch_size]) for i in range(0, len(x), self.batch_size)]
        return torch.nn.functional.normalize(torch.cat(out), dim=-1)

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        texts = list(texts)
        out = [self._enc_txt(texts[i:i + self.batch_size]) for i in range(0, len(texts), self.batch_size)]
        return torch.nn.functional.normalize(torch.cat(out), dim=-1)

    def scores(self, images, texts: Sequence[str], convention: str = "cosine") -> np.ndarray:
        """Per-image score of image *i* with text *i*."""
        if convention not in CLIP_CONVENTIONS:
            raise ValueError(f"unknown CLIP-score convention {convention!r}; valid: {', '.join(CLIP_CONVENTIONS)}")
        texts = list(texts)
        x = load_images(images) if not torch.is_tensor(images) else images
        if len(texts) != len(x):
            raise ValueError(f"{len(x)} images but {len(texts)} texts; CLIP score pairs image i with text i")
        if len(texts) == 0:
            raise ValueError("no images/texts to score")
        cos = (self.encode_images(x) * self.encode_texts(texts)).sum(-1).double().cpu().numpy()
        return 100.0 * np.clip(cos, 0, None) if convention == "torchmetrics" else cos


def clip_score(scorer: ClipScorer, images, texts, *, convention: str = "cosine", n_boot: int = 2000,
               seed: int = 0) -> tuple[CI, np.ndarray]:
    """Mean CLIP score with a bootstrap CI, and the per-image scores."""
    s = scorer.scores(images, texts, convention)
    return bootstrap_mean(s, n_boot=n_boot, seed=seed), s


# --------------------------------------------------------------------------------------------------------------
# fidelity to the FP image: PSNR / SSIM / LPIPS (torchmetrics)
# --------------------------------------------------------------------------------------------------------------
def _torchmetrics():
    try:
        import torchmetrics.functional.image as tmi
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("PSNR/SSIM/LPIPS use torchmetrics, which is not installed: pip install 'torchmetrics==1.9.0' "
                          "(it belongs in pyproject.toml and environment.yml)") from e
    return tmi


def _pair(gen, ref, size=None) -> tuple[torch.Tensor, torch.Tensor]:
    a = load_images(gen, size) if not torch.is_tensor(gen) else gen
    b = load_images(ref, size) if not torch.is_tensor(ref) else ref
    check_same_size(a, b, "generated vs FP images")
    return a.float() / 255.0, b.float() / 255.0


def psnr_per_image(gen, ref, *, size=None, cap_db: float = PSNR_CAP_DB) -> np.ndarray:
    """PSNR (dB, data range 1) of each generated image vs its FP counterpart; identical images → ``cap_db``."""
    tmi = _torchmetrics()
    a, b = _pair(gen, ref, size)
    v = tmi.peak_signal_noise_ratio(a, b, data_range=1.0, reduction="none", dim=(1, 2, 3)).double().numpy()
    return np.minimum(np.nan_to_num(v, posinf=cap_db), cap_db)


def ssim_per_image(gen, ref, *, size=None) -> np.ndarray:
    """SSIM (Gaussian window 11, σ 1.5, data range 1) of each image vs its FP counterpart (torchmetrics)."""
    tmi = _torchmetrics()
    a, b = _pair(gen, ref, size)
    k = 11 if min(a.shape[-2:]) >= 11 else (min(a.shape[-2:]) // 2) * 2 - 1
    v = tmi.structural_similarity_index_measure(a, b, data_range=1.0, reduction="none", kernel_size=k)
    return v.double().numpy().reshape(-1)


LPIPS_BACKBONES = {"alex": ("alexnet", "AlexNet_Weights"), "vgg": ("vgg16", "VGG16_Weights"),
                   "squeeze": ("squeezenet1_1", "SqueezeNet1_1_Weights")}


class LpipsUnavailable(RuntimeError):
    """LPIPS cannot run here: the torchvision backbone weights are not on disk (nothing is downloaded)."""


def lpips_backbone_file(net: str = "alex") -> tuple[str, Path]:
    """(file name, expected path in the torch hub cache) of the ImageNet backbone LPIPS needs."""
    import torchvision

    if net not in LPIPS_BACKBONES:
        raise ValueError(f"unknown LPIPS network {net!r}; valid: {', '.join(LPIPS_BACKBONES)}")
    arch, weights_enum = LPIPS_BACKBONES[net]
    url = getattr(torchvision.models, weights_enum).DEFAULT.url
    fname = url.rsplit("/", 1)[-1]
    return fname, Path(torch.hub.get_dir()) / "checkpoints" / fname


class LpipsScorer:
    """LPIPS (torchmetrics' implementation with its shipped linear layers) on a torchvision backbone loaded from a
    **local** file — the default hub-cache location, or ``backbone_weights``. If neither exists,
    :meth:`create` raises :class:`LpipsUnavailable` naming the file (callers skip the metric and say so)."""

    def __init__(self, net_module, name: str):
        self.net, self.name = net_module, name

    @classmethod
    def create(cls, net: str = "alex", backbone_weights: str | os.PathLike | None = None) -> "LpipsScorer":
        _torchmetrics()
        from torchmetrics.functional.image.lpips import _NoTrainLpips

        fname, default = lpips_backbone_file(net)
        path = Path(backbone_weights).expanduser() if backbone_weights else default
        if not path.is_file():
            raise LpipsUnavailable(
                f"LPIPS skipped: its {net} backbone weights '{fname}' are not on disk (looked at {path}). "
                f"Download torchvision's {LPIPS_BACKBONES[net][1]}.DEFAULT weights on a connected machine "
                f"({getattr(__import__('torchvision').models, LPIPS_BACKBONES[net][1]).DEFAULT.url}) and put the file "
                f"at {default} or pass lpips_weights=<path>.")
        module = _NoTrainLpips(net=net, pretrained=True, pnet_rand=True)  # random backbone: no download
        backbone = torch.load(path, map_location="cpu", weights_only=True)
        feats = {k[len("features."):]: v for k, v in backbone.items() if k.startswith("features.")}
        own = module.net.state_dict()
        mapped = {}
        for key in own:  # "slice{k}.{idx}.{param}" ↔ torchvision "features.{idx}.{param}"
            _, rest = key.split(".", 1)
            if rest in feats:
                mapped[key] = feats[rest]
        missing = set(own) - set(mapped)
        if missing:
            raise LpipsUnavailable(f"LPIPS backbone file {path} does not match torchvision's {net} layout "
                                   f"(missing {sorted(missing)[:3]})")
        module.net.load_state_dict(mapped)
        return cls(module.eval(), f"lpips-{net}")

    @torch.no_grad()
    def per_image(self, gen, ref, *, size=None, batch_size: int = 32) -> np.ndarray:
        a, b = _pair(gen, ref, size)
        out = [self.net(a[i:i + batch_size], b[i:i + batch_size], normalize=True).reshape(-1)
               for i in range(0, len(a), batch_size)]
        return torch.cat(out).double().numpy()


def lpips_per_image(gen, ref, *, net: str = "alex", backbone_weights=None, size=None) -> np.ndarray:
    return LpipsScorer.create(net, backbone_weights).per_image(gen, ref, size=size)


# --------------------------------------------------------------------------------------------------------------
# alignment accuracy (embedded world)
# --------------------------------------------------------------------------------------------------------------
ALIGNMENT_FLAGS = ("held_out", "two_objects")


def alignment_table(images, prompts: Sequence[str], evaluator) -> pd.DataFrame:
    """Per-image alignment from the embedded world's attribute classifier.

    ``evaluator(images uint8 (N,3,H,W), prompts) -> DataFrame`` with one column per attribute (bool, or a
    fraction in [0, 1]; NaN where the attribute does not apply to that prompt, e.g. ``relation`` for a one-object
    prompt), ``caption`` (every stated attribute right) and flags ``held_out`` (the prompt uses a held-out
    colour-shape combination) / ``two_objects``. The world's evaluator is wrapped to this signature by
    :func:`dgq_utils.evaluate.embedded_alignment_evaluator`.
    """
    x = load_images(images) if not torch.is_tensor(images) else images
    prompts = list(prompts)
    if len(prompts) != len(x):
        raise ValueError(f"{len(x)} images but {len(prompts)} prompts")
    df = evaluator(x, prompts)
    if len(df) != len(x):
        raise ValueError("the alignment evaluator returned a table of the wrong length")
    return df.reset_index(drop=True)


def alignment_columns(table: pd.DataFrame) -> list[str]:
    """The accuracy columns of an alignment table (numeric, not a flag)."""
    return [c for c in table.columns if c not in ALIGNMENT_FLAGS
            and (table[c].dtype == bool or pd.api.types.is_numeric_dtype(table[c]))]


def alignment_cis(table: pd.DataFrame, *, n_boot: int = 2000, seed: int = 0) -> dict[str, CI]:
    """Accuracy CIs: ``alignment_<attribute>`` for each accuracy column (over the images where it applies),
    ``alignment_caption`` (whole caption) and ``alignment_caption_heldout`` / ``_seen`` when a ``held_out``
    column splits the prompts."""
    out: dict[str, CI] = {}
    for c in alignment_columns(table):
        v = table[c].astype(float).dropna()
        if len(v):
            out[f"alignment_{c}"] = bootstrap_mean(v, n_boot=n_boot, seed=seed)
    if "caption" in table.columns and "held_out" in table.columns:
        for flag, label in ((True, "heldout"), (False, "seen")):
            sub = table.loc[table["held_out"].astype(bool) == flag, "caption"].astype(float).dropna()
            if len(sub):
                out[f"alignment_caption_{label}"] = bootstrap_mean(sub, n_boot=n_boot, seed=seed)
    return out
