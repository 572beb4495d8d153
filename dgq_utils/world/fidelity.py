"""torch-fidelity integration: the evaluator's penultimate features as a registered feature extractor.

``register()`` adds the feature extractor ``"dgq-world-evaluator"`` to torch-fidelity's registry; then
``torch_fidelity.calculate_metrics(input1=..., input2=..., fid=True, kid=True, isc=True,
feature_extractor="dgq-world-evaluator")`` computes FID/KID on the 256-d penultimate features and an
IS-style score on the 40 (colour, shape) log-probabilities of slot 0 (``logits_unbiased``; torch-fidelity
applies the softmax). Inputs are uint8 tensors (B, 3, H, W), resized to 64x64 inside.
"""
from __future__ import annotations

import torch

from dgq_utils import paths
from dgq_utils.world.evaluator import AttributeEvaluator, images_to_tensor, is_logits

NAME = "dgq-world-evaluator"
DEFAULT_EVALUATOR_DIR = paths.embedded_dir() / "evaluator"


def _extractor_class():
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase  # optional dependency, used here only

    class WorldEvaluatorFeatures(FeatureExtractorBase):
        def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
            super().__init__(name, features_list)
            path = feature_extractor_weights_path or DEFAULT_EVALUATOR_DIR
            self.model = AttributeEvaluator.load(path).model
            self.requires_grad_(False)
            self.eval()

        @staticmethod
        def get_provided_features_list():
            return ("penultimate", "logits_unbiased")

        @staticmethod
        def get_default_feature_layer_for_metric(metric):
            return {"isc": "logits_unbiased", "fid": "penultimate", "kid": "penultimate",
                    "prc": "penultimate"}[metric]

        @staticmethod
        def can_be_compiled():
            return False

        @staticmethod
        def get_dummy_input_for_compile():
            return torch.zeros(1, 3, 64, 64, dtype=torch.uint8)

        def forward(self, x):
            x = images_to_tensor(x).to(next(self.model.parameters()).device)
            f = self.model.penultimate(x)
            out = {"penultimate": f, "logits_unbiased": is_logits({k: h(f) for k, h in self.model.heads.items()})}
            return tuple(out[k] for k in self.features_list)

    return WorldEvaluatorFeatures


def register() -> str:
    """Register the feature extractor with torch-fidelity (idempotent); returns its name."""
    from torch_fidelity.registry import (
        FEATURE_EXTRACTORS_REGISTRY,
        register_feature_extractor,
    )

    if NAME not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(NAME, _extractor_class())
    return NAME


class _Uint8Dataset(torch.utils.data.Dataset):
    def __init__(self, images: torch.Tensor):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i]


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    return images if images.dtype == torch.uint8 else (images.clamp(0, 1) * 255).round().to(torch.uint8)


def fidelity_metrics(generated: torch.Tensor, real: torch.Tensor, evaluator_dir=None, cuda: bool = False,
                     kid_subset_size: int = 500) -> dict:
    """FID, KID (mean, std) and the IS-style score of ``generated`` vs ``real`` (uint8 or [0,1] tensors)."""
    import torch_fidelity

    register()
    n = min(len(generated), len(real))
    m = torch_fidelity.calculate_metrics(
        input1=_Uint8Dataset(to_uint8(generated).cpu()), input2=_Uint8Dataset(to_uint8(real).cpu()),
        fid=True, kid=True, isc=True, feature_extractor=NAME, cuda=cuda, verbose=False,
        kid_subset_size=min(kid_subset_size, n), batch_size=250,
        feature_extractor_weights_path=str(evaluator_dir or DEFAULT_EVALUATOR_DIR), save_cpu_ram=True,
    )
    return {"fid": m["frechet_inception_distance"], "kid_mean": m["kernel_inception_distance_mean"],
            "kid_std": m["kernel_inception_distance_std"], "isc_mean": m["inception_score_mean"],
            "isc_std": m["inception_score_std"]}


def frechet_distance(f1: torch.Tensor, f2: torch.Tensor) -> float:
    """Own FID on given features (float64, scipy sqrtm) -- a fallback when torch-fidelity is missing."""
    import numpy as np
    from scipy import linalg

    a, b = f1.detach().double().cpu().numpy(), f2.detach().double().cpu().numpy()
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean, _ = linalg.sqrtm(s1 @ s2, disp=False)
    covmean = covmean.real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))
