"""Feature extractors for FID / KID / IS, chosen by name: torch-fidelity extractors in a registry, local weights
only, and features cached to ``.npz`` keyed by the images, the extractor and its weights.

Built in: ``"inception-v3-compat"`` (the FID/IS network) and ``"pixels-debug"`` (weight-free stand-in for tests).
Other packages add theirs with :func:`register_extractor` or, to defer importing their model code until the name
is used, :func:`register_lazy_extractor` (the embedded world registers ``"dgq-world-evaluator"`` this way from
:mod:`dgq_utils.world.fidelity`).
"""
from __future__ import annotations

import contextlib
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from dgq_utils.atomic import atomic_save_npz
from dgq_utils.evaluate.metrics.images import ImageDataset, load_images, paths_from
from dgq_utils.keys import stable_hash

INCEPTION = "inception-v3-compat"
INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + INCEPTION_WEIGHTS_FILE)


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
        key = stable_hash({"extractor": extractor, "weights": _file_identity(weights), "layers": sorted(layers),
                           "size": size, "ids": ids}, 20)
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
    ds = ImageDataset(items, size)
    # torch-fidelity moves each batch with ``.cuda()`` (the current CUDA device): make that ``dev`` for "cuda:N"
    with torch.cuda.device(dev) if cuda else contextlib.nullcontext():
        feats = get_featuresdict_from_dataset(ds, fe, batch_size, cuda, True, verbose)
    out = {k: v.detach().cpu().numpy() for k, v in feats.items()}
    if cache_file is not None:
        atomic_save_npz(cache_file, **out)
    return out
