"""FID, KID and the Inception Score on extracted features: torch-fidelity's functions, bootstrap CIs, and the
reference statistics file (pytorch-fid ``.npz`` layout)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from dgq_utils.atomic import atomic_save_npz
from dgq_utils.evaluate.confidence import CI, bootstrap_statistic
from dgq_utils.timing import timed_stage


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


@timed_stage("bootstrap_fid")
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


@timed_stage("bootstrap_kid")
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


@timed_stage("bootstrap_isc")
def isc_ci(logits, *, n_boot: int = 100, seed: int = 0, level: float = 0.95, splits: int = 10,
           method: str = "shifted") -> CI:
    f = np.asarray(logits)
    return bootstrap_statistic(lambda idx: inception_score(f[idx], splits=splits)[0], len(f), n_boot=n_boot,
                               seed=seed, level=level, method=method)
