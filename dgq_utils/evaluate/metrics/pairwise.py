"""Fidelity of each image to its FP counterpart (same prompt and seed): PSNR, SSIM and LPIPS (torchmetrics)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from dgq_utils.evaluate.metrics.images import check_same_size, load_images

PSNR_CAP_DB = 100.0  # PSNR of identical images is +inf; it is reported as this cap so means stay finite


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
