"""Notebook-level computations of the report (everything the notebooks compute that is not plotting).

The notebooks (``notebooks/01_...`` to ``06_...``) stay thin: a ``parameters`` cell, calls into this module and
:mod:`dgq_utils.plots`, and sentences generated from the numbers. What lives here:

* **Model and prompts** -- :func:`open_model` gives a :class:`ModelContext`: the FP pipeline (the embedded default,
  a local folder / cached hub id such as SD v1.4, or ``"tiny"``: the random test pipeline), the evaluation and
  calibration prompts that suit it, and a work folder for caches keyed by the model's identity.
* **Where the outliers are** (notebook 01) -- :func:`outlier_table`: per layer and timestep, how far the widest
  channel / pixel range sticks out of the median one, and the heavy-tail ratio ``absmax / p99.9``.
* **Grouping decisions** (02) -- :func:`axis_decision_table` (channel- vs pixel-wise per layer under the official
  spread rule and the outlier-ratio alternative) and :func:`group_error_sweep` (quantization error of *held-out*
  activations with groups calibrated on other prompts, from per-tensor to K groups, contiguous vs sorted vs
  K-means, channel vs pixel axis).
* **Attention** (03) -- :func:`capture_attention` (softmax probabilities and values of chosen layers and
  timesteps, and per-key mass of all of them), :func:`prob_error_table` (log2 vs uniform, per-prompt vs batch
  scale, ``<start>`` FP or not, measured on the attention *output*), :func:`scale_table`.
* **Evaluation** (04-06) -- :class:`CachedQuantizer` (calibrated states shared by notebooks 04, 05 and 06),
  :func:`comparison_setup` (metrics and references for the model at hand), :func:`ablation_recipes`,
  :func:`paired_vs`, the paper's Table 2 (:data:`PAPER_TABLE2`) and :func:`paper_comparison`.

Everything is deterministic for fixed arguments (seeded generators, seeded K-means and bootstrap); CSVs are
written atomically (:func:`write_table`).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd
import torch

from .atomic import atomic_write_text
from .attention import attention_epilogue, attention_prologue

ROOT = Path(__file__).resolve().parents[1]
WORK_ROOT = ROOT / "outputs" / "work"

__all__ = [
    "ROOT", "output_dirs", "write_table", "ModelContext", "open_model", "balanced_interleave", "tiny_prompts",
    "outlier_ratio", "block_of", "unet_rank", "quantized_inputs", "short_name", "outlier_table", "outlier_summary", "describe_outliers", "axis_decision_table",
    "decision_summary", "group_error_sweep", "error_curve", "axis_rule_accuracy", "example_groups",
    "AttentionCapture", "capture_attention", "start_mass_table", "prob_error_table", "scale_table",
    "CachedQuantizer", "comparison_setup", "ablation_recipes", "paired_vs", "PAPER_TABLE2", "paper_comparison",
    "ci_halfwidths", "wide_table",
]


# ==============================================================================================================
# files
# ==============================================================================================================
def output_dirs(save_to: str | os.PathLike | None, *, quick: bool, kind: str) -> tuple[Path, Path]:
    """``(figures_dir, results_dir)`` for a notebook run (created).

    ``save_to=None``: the repository's ``figures/`` and ``results/`` for a full run of a real model (the embedded
    default or an external one); ``outputs/quick/`` for quick runs and ``outputs/tiny/`` for the tiny test
    pipeline, so smoke runs never overwrite the committed report. An explicit ``save_to`` folder gets
    ``figures/`` and ``results/`` inside it.
    """
    if save_to is not None:
        base = Path(save_to)
    elif quick:
        base = ROOT / "outputs" / "quick"
    elif kind == "tiny":
        base = ROOT / "outputs" / "tiny"
    else:
        base = ROOT
    figs, res = base / "figures", base / "results"
    figs.mkdir(parents=True, exist_ok=True)
    res.mkdir(parents=True, exist_ok=True)
    return figs, res


def write_table(df: pd.DataFrame, path: str | os.PathLike, *, float_format: str = "%.6g") -> Path:
    """Write ``df`` as CSV atomically (a reader never sees half a file); floats with 6 significant digits."""
    text = df.to_csv(index=False, float_format=float_format)
    return atomic_write_text(Path(path), text)


def _hash(obj: Any, n: int = 10) -> str:
    blob = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:n]


# ==============================================================================================================
# model and prompts
# ==============================================================================================================
TINY_COLOURS = ("red", "blue", "green", "yellow", "white", "black")
TINY_NOUNS = ("dog", "bird", "horse", "car", "bus", "house", "flower", "cup", "apple", "clock")
TINY_PLACES = ("river", "beach", "forest", "city", "snow", "sky")
TINY_ADJ = ("small", "large", "old", "new", "bright", "dark")


def tiny_prompts(n: int, *, seed: int = 0, offset: int = 0) -> list[str]:
    """``n`` distinct prompts in the tiny pipeline's vocabulary (a seeded permutation of a fixed grammar).

    ``offset`` starts further down the same permutation: ``tiny_prompts(n, offset=m)`` is disjoint from
    ``tiny_prompts(m)`` (calibration vs evaluation prompts).
    """
    grid = [f"a {a} {c} {noun} near the {p}" for a in TINY_ADJ for c in TINY_COLOURS for noun in TINY_NOUNS
            for p in TINY_PLACES]
    if offset + n > len(grid):
        raise ValueError(f"the tiny grammar has {len(grid)} prompts; asked for {n} after {offset}")
    order = np.random.default_rng(seed).permutation(len(grid))
    return [grid[i] for i in order[offset:offset + n]]


def balanced_interleave(groups: Sequence[Sequence[Any]]) -> list[Any]:
    """Merge lists so that every prefix holds each list in proportion to its length (order within a list kept).

    Position ``j`` takes the next item of the list whose next item has the smallest ``(index + 0.5) / length``
    (ties: the earlier list). So ``P[:k]`` of a one-object / two-object / held-out prompt list is a balanced
    sample -- notebooks 04 and 06 use prefixes of notebook 05's evaluation prompts.
    """
    groups = [list(g) for g in groups if len(g)]
    taken = [0] * len(groups)
    out = []
    for _ in range(sum(len(g) for g in groups)):
        best, key = None, None
        for i, g in enumerate(groups):
            if taken[i] < len(g):
                k = (taken[i] + 0.5) / len(g)
                if key is None or k < key:
                    best, key = i, k
        out.append(groups[best][taken[best]])
        taken[best] += 1
    return out


def _folder_identity(path: Path) -> str:
    """Cheap identity of a model folder: relative path, size and mtime of every file (retraining changes it)."""
    items = []
    for p in sorted(path.rglob("*")):
        if p.is_file():
            st = p.stat()
            items.append((str(p.relative_to(path)), st.st_size, st.st_mtime_ns))
    return _hash(items, 12)


@dataclass
class ModelContext:
    """The FP pipeline of a report run and what goes with it.

    ``kind``: ``"embedded"`` (the default model, or any pipeline folder whose parent holds the world's
    ``evaluator/`` and ``clip/``), ``"tiny"`` (random test pipeline) or ``"external"`` (e.g. SD v1.4).
    ``model_key``: identity used in cache keys (changes when the weights change). ``embedded_dir``: the folder
    with ``pipeline/``, ``evaluator/``, ``clip/`` for the embedded kind.
    """

    model_id: str | None
    kind: str
    device: str
    pipe: Any
    model_key: str
    embedded_dir: Path | None = None
    work_root: Path = WORK_ROOT

    @property
    def label(self) -> str:
        return {"embedded": "embedded model", "tiny": "tiny random pipeline"}.get(self.kind, str(self.model_id))

    def prompts(self, n: int, *, seed: int = 0) -> list[str]:
        """``n`` evaluation prompts. Embedded / external: the world's test captions (one-object, two-object and a
        quarter held-out colour-shape pairs, :func:`dgq_utils.evaluate.embedded_prompts`), interleaved so every
        prefix is balanced. Tiny: :func:`tiny_prompts`."""
        if n < 1:
            raise ValueError(f"n must be >= 1; got {n}")
        if self.kind == "tiny":
            return tiny_prompts(n, seed=seed)
        from .evaluate import embedded_prompts

        prompts, _ = embedded_prompts(n, seed=seed)
        n_held = int(round(n * 0.25))
        n_two = int(round((n - n_held) * 0.5))
        n_one = n - n_held - n_two
        return balanced_interleave([prompts[:n_one], prompts[n_one:n_one + n_two], prompts[n_one + n_two:]])

    def calibration_prompts(self, n: int, *, exclude: Sequence[str] = (), seed: int = 0) -> list[str]:
        """``n`` calibration prompts disjoint from ``exclude`` (world ``val`` captions; tiny: later grammar rows)."""
        if self.kind == "tiny":
            banned = set(exclude)
            pool = tiny_prompts(min(1000, 2160), seed=seed + 1)
            out = [p for p in pool if p not in banned][:n]
            if len(out) < n:
                raise ValueError(f"not enough tiny calibration prompts disjoint from the evaluation prompts ({n})")
            return out
        from .evaluate import embedded_calibration_prompts

        return embedded_calibration_prompts(n, exclude=exclude, seed=seed)

    def work_dir(self, *parts: str) -> Path:
        """``<work_root>/<model_key>/<parts...>`` (created): caches shared by the notebooks of one model."""
        p = Path(self.work_root) / self.model_key
        for part in parts:
            p = p / part
        p.mkdir(parents=True, exist_ok=True)
        return p

    def run_dir(self, tag: str, **params) -> Path:
        """A folder for one notebook's comparison run, keyed by everything that changes its results."""
        return self.work_dir(f"{tag}-{_hash(params)}")


def open_model(model_id: str | os.PathLike | None = None, *, device: str = "cpu", threads: int | None = None,
               work_root: str | os.PathLike | None = None) -> ModelContext:
    """Load the report's FP pipeline.

    ``model_id``: ``None`` -- the embedded default model (``data/embedded``; raises with instructions if it is
    missing, never falls back silently); ``"tiny"`` -- the tiny random-weight pipeline (PNDM like SD, 32x32);
    anything else -- a local diffusers folder or a hub id in the local cache (``loading.load_pipeline``).
    ``threads``: ``torch.set_num_threads``. ``None``: torch's default, except on a CPU run on a machine with at
    most two cores, where it is 1 -- on small shared machines two OpenMP threads competing with another process
    were 3-10x slower than one (see ``benchmarks/README.md``); pass 2 explicitly on an idle two-core machine.
    """
    if threads is None and not str(device).startswith("cuda") and (os.cpu_count() or 1) <= 2:
        threads = 1
    if threads is not None:
        torch.set_num_threads(int(threads))
    from .loading import EMBEDDED_DIR, load_pipeline, resolve_model_path

    work_root = Path(work_root) if work_root is not None else WORK_ROOT
    if model_id is not None and str(model_id) == "tiny":
        from .generate import model_fingerprint
        from .tiny import build_tiny_pipeline

        pipe = build_tiny_pipeline(seed=0, scheduler="pndm").to(device)
        return ModelContext("tiny", "tiny", device, pipe, "tiny-" + model_fingerprint(pipe).split(":")[-1][:12],
                            None, work_root)
    if model_id is not None and not Path(str(model_id)).expanduser().is_absolute():
        # notebooks run with cwd = notebooks/; a path given relative to the repository root is found there too
        for base in (Path.cwd(), ROOT):
            if (base / str(model_id)).exists():
                model_id = str((base / str(model_id)).resolve())
                break
    path = resolve_model_path(model_id)
    pipe = load_pipeline(model_id, device=device)
    pipe.set_progress_bar_config(disable=True)
    parent = Path(path).resolve().parent
    embedded = (parent / "evaluator").is_dir() and (parent / "clip").is_dir()
    kind = "embedded" if (model_id is None or embedded) else "external"
    prefix = "embedded" if model_id is None else re.sub(r"[^A-Za-z0-9]+", "-", Path(str(model_id)).name)[:40]
    key = f"{prefix}-{_folder_identity(Path(path))}"
    return ModelContext(None if model_id is None else str(model_id), kind, device, pipe, key,
                        (EMBEDDED_DIR if model_id is None else parent) if kind == "embedded" else None, work_root)


# ==============================================================================================================
# names
# ==============================================================================================================
def block_of(name: str) -> str:
    """The UNet block a module belongs to: ``down_blocks.1``, ``mid_block``, ``up_blocks.0``, ``time_embedding``,
    ``conv_in`` ..."""
    m = re.match(r"^((?:down|up)_blocks\.\d+|mid_block)", name)
    return m.group(1) if m else name.split(".")[0]


def unet_rank(name: str) -> tuple:
    """Sort key putting UNet module names in forward order: conv_in, time embedding, down blocks, mid block,
    up blocks, conv_out (then by name)."""
    b = block_of(name)
    m = re.match(r"^(down|up)_blocks\.(\d+)", b)
    if b == "conv_in":
        r = (0, 0)
    elif b == "time_embedding":
        r = (1, 0)
    elif m and m.group(1) == "down":
        r = (2, int(m.group(2)))
    elif b == "mid_block":
        r = (3, 0)
    elif m:
        r = (4, int(m.group(2)))
    elif b.startswith("conv_norm") or b == "conv_out":
        r = (5, 0)
    else:
        r = (6, 0)
    return r + (name,)


def quantized_inputs(names: Iterable[str], recipe: str = "dgq-w8a6") -> list[str]:
    """``names`` without the modules a recipe keeps in FP (``skip_layers``: ``conv_in``, ``conv_out``; an
    attention's ``.q/.k/.v`` follow their attention module)."""
    import fnmatch

    from .config import get_preset

    pats = get_preset(recipe).skip_layers
    out = []
    for n in names:
        base = n.rsplit(".", 1)[0] if n.endswith((".q", ".k", ".v")) else n
        if not any(fnmatch.fnmatchcase(n, p) or fnmatch.fnmatchcase(base, p) for p in pats):
            out.append(n)
    return out


def short_name(name: str) -> str:
    """A compact label for plots: ``down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k`` ->
    ``down1.attn0.attn2.to_k``."""
    s = re.sub(r"transformer_blocks\.(\d+)\.", lambda m: "" if m.group(1) == "0" else f"tb{m.group(1)}.", name)
    s = re.sub(r"down_blocks\.(\d+)", r"down\1", s)
    s = re.sub(r"up_blocks\.(\d+)", r"up\1", s)
    s = s.replace("mid_block", "mid").replace("attentions.", "attn").replace("resnets.", "res")
    s = s.replace("downsamplers.0", "down").replace("upsamplers.0", "up").replace("time_embedding", "temb")
    return s


# ==============================================================================================================
# 01: where the outliers are
# ==============================================================================================================
def outlier_ratio(s) -> float:
    """``max(range_i) / median(range_i)`` of one axis's :class:`~dgq_utils.grouping.AxisStats` (NaN for None)."""
    if s is None:
        return math.nan
    r = s.ranges.double()
    top, med = float(r.max()), float(r.median())
    if top <= 0:
        return 1.0
    return top / max(med, top * 1e-12)


def _kind(cr: float, pr: float, threshold: float) -> str:
    c = not math.isnan(cr) and cr >= threshold
    p = not math.isnan(pr) and pr >= threshold
    return "both" if c and p else "channel" if c else "pixel" if p else "none"


def outlier_table(stats, *, threshold: float = 4.0, quantized_only: bool = True) -> pd.DataFrame:
    """Per (layer, timestep index): how outlier-ridden the activation is, and along which axis.

    Columns: ``layer``, ``short``, ``block``, ``layer_type``, ``timestep_index``, ``timestep``, ``n_channels``,
    ``n_pixels``, ``channel_ratio`` / ``pixel_ratio`` (``max range / median range`` over channels / pixels, where
    ``range = max - min`` of an index over the batch and the other axis), ``absmax``, ``p99.9`` (approximate, of
    ``|x|``), ``tail_ratio`` = ``absmax / p99.9`` (heavy tail: large), ``outliers`` -- ``"channel"``,
    ``"pixel"``, ``"both"`` or ``"none"`` (ratio >= ``threshold``). Rows in UNet forward order;
    ``quantized_only`` drops the inputs every recipe keeps FP (``conv_in``, ``conv_out``).
    """
    rows = []
    for st, row in _stats_rows(stats, quantized_only, with_timestep=True):
        cr, pr = outlier_ratio(st.channel), outlier_ratio(st.pixel)
        calls = max(st.calls, 1)
        p999 = st.abs_percentiles.get(99.9, math.nan) / calls if st.abs_percentiles else math.nan
        absmax = max(abs(st.min), abs(st.max))
        rows.append({**row, "channel_ratio": cr, "pixel_ratio": pr, "absmax": absmax, "p99.9": p999,
                     "tail_ratio": absmax / p999 if p999 and p999 > 0 else math.nan,
                     "outliers": _kind(cr, pr, threshold)})
    return pd.DataFrame(rows)


def _stats_rows(stats, quantized_only: bool, *, with_timestep: bool = False):
    """``(TensorStats, identity columns)`` per (layer, timestep index) of collected statistics, layers in UNet
    forward order: ``layer``, ``short``, ``block``, ``layer_type``, ``timestep_index`` (, ``timestep``),
    ``n_channels``, ``n_pixels``."""
    names = sorted(stats.layers, key=unet_rank)
    if quantized_only:
        names = quantized_inputs(names)
    for name in names:
        lt, per_t = stats.layers[name]
        for ti, st in sorted(per_t.items()):
            row = {"layer": name, "short": short_name(name), "block": block_of(name), "layer_type": lt,
                   "timestep_index": ti}
            if with_timestep:
                row["timestep"] = stats.timesteps[ti] if ti < len(stats.timesteps) else math.nan
            row["n_channels"] = st.channel.n if st.channel is not None else 0
            row["n_pixels"] = st.pixel.n if st.pixel is not None else 0
            yield st, row


def outlier_summary(table: pd.DataFrame, *, threshold: float = 4.0) -> pd.DataFrame:
    """One row per layer: median ratios over timesteps, the timestep spread of ``absmax`` (max / min over
    timesteps) and the outlier kind of the median ratios."""
    g = table.groupby("layer", sort=False)
    out = g.agg(short=("short", "first"), block=("block", "first"), layer_type=("layer_type", "first"),
                n_channels=("n_channels", "first"), n_pixels=("n_pixels", "first"),
                channel_ratio=("channel_ratio", "median"), pixel_ratio=("pixel_ratio", "median"),
                tail_ratio=("tail_ratio", "median"), absmax_max=("absmax", "max"), absmax_min=("absmax", "min"))
    out["absmax_over_time"] = out["absmax_max"] / out["absmax_min"].where(out["absmax_min"] > 0)
    out["outliers"] = [_kind(c, p, threshold) for c, p in zip(out["channel_ratio"], out["pixel_ratio"])]
    return out.reset_index()


def describe_outliers(summary: pd.DataFrame, *, threshold: float = 4.0) -> str:
    """Markdown sentences describing :func:`outlier_summary` (every number computed, nothing assumed)."""
    n = len(summary)
    counts = summary["outliers"].value_counts().to_dict()
    top_c = summary.sort_values("channel_ratio", ascending=False).iloc[0]
    lines = [
        f"Of {n} quantized inputs, **{counts.get('channel', 0)}** have outlier channels only, "
        f"**{counts.get('pixel', 0)}** outlier pixels only, **{counts.get('both', 0)}** both and "
        f"**{counts.get('none', 0)}** neither (widest index range ≥ {threshold:g}× the median one, median over "
        "timesteps).",
        f"The most channel-outlier-ridden input is `{top_c['layer']}`: its widest channel range is "
        f"{top_c['channel_ratio']:.1f}× the median channel's.",
    ]
    px = summary.dropna(subset=["pixel_ratio"])
    if len(px):
        top_p = px.sort_values("pixel_ratio", ascending=False).iloc[0]
        lines.append(f"The strongest pixel outliers are in `{top_p['layer']}` ({top_p['pixel_ratio']:.1f}× the "
                     "median pixel's range).")
    tr = summary["tail_ratio"].dropna()
    if len(tr):
        heavy = float((tr >= 2).mean())
        lines.append(f"Heavy tails: the largest |activation| is a median {tr.median():.1f}× the 99.9th percentile "
                     f"(up to {tr.max():.1f}×); for {_pct(heavy)} of the inputs it is at least 2×, i.e. a range set "
                     "by the extremes spends at least half of its levels on values rarer than 1 in 1,000.")
    ot = summary["absmax_over_time"].dropna()
    if len(ot):
        lines.append(f"Across timesteps a layer's absmax varies by a median factor of {ot.median():.2f} "
                     f"(max {ot.max():.1f}), which is what per-timestep parameters absorb.")
    return " ".join(lines)


# ==============================================================================================================
# 02: grouping decisions
# ==============================================================================================================
RULES = ("official_spread", "outlier_ratio")


def axis_decision_table(stats, rules: Sequence[str] = RULES, *, quantized_only: bool = True) -> pd.DataFrame:
    """Channel- vs pixel-wise decision per (layer, timestep) under each rule (:func:`grouping.decide_axis`).

    Columns: ``layer``, ``short``, ``block``, ``layer_type``, ``timestep_index``, ``n_channels``, ``n_pixels``,
    per rule ``<rule>_channel`` / ``<rule>_pixel`` (the two scores) and ``<rule>`` (the decision). An input
    with one axis only (the 2-D time-embedding inputs) is ``"channel (only axis)"``: it is quantized per tensor
    in group mode anyway.
    """
    from .grouping import axis_scores, decide_axis

    rows = []
    for st, row in _stats_rows(stats, quantized_only):
        for rule in rules:
            if st.channel is not None and st.pixel is not None:
                c, p = axis_scores(st.channel, st.pixel, rule)
                row[f"{rule}_channel"], row[f"{rule}_pixel"] = c, p
                row[rule] = decide_axis(st.channel, st.pixel, rule)
            else:
                row[f"{rule}_channel"] = row[f"{rule}_pixel"] = math.nan
                row[rule] = "channel (only axis)"
        rows.append(row)
    return pd.DataFrame(rows)


def decision_summary(decisions: pd.DataFrame, rules: Sequence[str] = RULES) -> pd.DataFrame:
    """Per layer: share of timesteps grouped channel-wise under each rule, the majority axis, and how often the
    two rules agree."""
    d = decisions[decisions[rules[0]] != "channel (only axis)"]
    g = d.groupby("layer", sort=False)
    out = g.agg(short=("short", "first"), block=("block", "first"), layer_type=("layer_type", "first"),
                n_channels=("n_channels", "first"), n_pixels=("n_pixels", "first"))
    for rule in rules:
        out[f"{rule}_channel_share"] = g[rule].apply(lambda s: float((s == "channel").mean()))
        out[f"{rule}_majority"] = np.where(out[f"{rule}_channel_share"] >= 0.5, "channel", "pixel")
    if len(rules) >= 2:
        out["rules_agree"] = g.apply(lambda x: float((x[rules[0]] == x[rules[1]]).mean()), include_groups=False)
    return out.reset_index()


@torch.no_grad()
def group_error_sweep(
    pipe,
    calib,
    prompts: Sequence[str],
    *,
    bits: int = 6,
    ks: Sequence[int] = (1, 2, 4, 8, 16),
    methods: Sequence[str] = ("contiguous", "sorted", "kmeans"),
    layers: Sequence[str] | None = None,
    timestep_indices: Sequence[int] | None = None,
    num_inference_steps: int = 25,
    guidance_scale: float = 7.5,
    seed: int = 1,
    batch_size: int = 8,
    height: int | None = None,
    width: int | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Quantization error of held-out activations, per layer, from per-tensor to ``K`` groups.

    Groups and ranges come from the calibration statistics ``calib`` (an
    :class:`~dgq_utils.observers.ActivationStats` of *other* prompts, same sampler settings); the error is
    measured on the inputs every ``nn.Linear`` / ``nn.Conv2d`` of the FP UNet sees while ``prompts`` are sampled
    (``layers``: names to include, default all in ``calib``; ``timestep_indices``: UNet-call indices, default
    all), so clipping of values outside the calibrated ranges counts -- this is how a calibrated quantizer is
    used. For each input: per tensor (min/max with 0 included, as the baseline's range), and for each axis
    (channel / pixel), method (``contiguous``, ``sorted``, ``kmeans``: :func:`grouping.assign_groups`) and
    ``K`` in ``ks`` (clamped to the axis size) the DGQ group ranges (min / max of the members, 0 not forced in).

    Returns one row per (layer, timestep_index, axis, method, k): ``mse``, ``rel_mse`` (vs per tensor),
    ``sqnr_db`` (``10 log10(E[x^2] / mse)``), ``k_used``, ``official_axis`` / ``ratio_axis`` (what the two
    rules pick on the calibration statistics).
    """
    from tqdm.auto import tqdm

    from .grouping import assign_groups, decide_axis, fake_quant_along_axis, per_index_qparams
    from .observers import _run_prompts, axes_for
    from .quantizers import fake_quant_uniform, uniform_qparams
    from .timesteps import TimestepController

    unet = pipe.unet
    names = quantized_inputs(sorted((n for n, (lt, _) in calib.layers.items() if lt in ("linear", "conv")),
                                    key=unet_rank))
    if layers is not None:
        wanted = set(layers)
        missing = wanted - set(names)
        if missing:
            raise KeyError(f"no calibration statistics for {sorted(missing)[:3]}")
        names = [n for n in names if n in wanted]
    modules = dict(unet.named_modules())
    all_ti = sorted({ti for n in names for ti in calib.layers[n][1]})
    tis = set(all_ti if timestep_indices is None else timestep_indices)
    acc: dict[tuple, list[float]] = {}  # (layer, ti, axis, method, k) -> [sum sq err, count]
    energy: dict[tuple, list[float]] = {}
    plans: dict[tuple, tuple] = {}
    controller = TimestepController(mapping="exact")
    state = controller.state

    def plan(name, ti, axis, method, k, st_axis):
        key = (name, ti, axis, method, k)
        if key not in plans:
            k_used = min(k, st_axis.n)
            ids = assign_groups(st_axis, k_used, method=method, seed=0)
            scale, zp = per_index_qparams(st_axis, ids, k_used, bits, include_zero=False)
            plans[key] = (scale, zp, k_used)
        return plans[key]

    def add(key, err):
        a = acc.setdefault(key, [0.0, 0])
        a[0] += err

    def hook(mod, args, _name, _lt):
        ti = state.set_index
        if ti not in tis:
            return
        x = args[0].detach().float()
        st = calib.stats(_name, ti)
        ch, px = axes_for(x, "linear" if _lt == "linear" else "conv")
        e = energy.setdefault((_name, ti), [0.0, 0])
        e[0] += float(x.double().pow(2).sum())
        e[1] += x.numel()
        s, z = uniform_qparams(torch.tensor(st.min, device=x.device), torch.tensor(st.max, device=x.device), bits,
                               include_zero=True)
        add((_name, ti, "tensor", "per-tensor", 1), float((fake_quant_uniform(x, s, z, bits) - x).double().pow(2).sum()))
        for axis, dims in (("channel", ch), ("pixel", px)):
            st_axis = st.axis(axis)
            if dims is None or st_axis is None:
                continue
            for method in methods:
                for k in ks:
                    if k <= 1:
                        continue
                    scale, zp, _ = plan(_name, ti, axis, method, k, st_axis)
                    err = fake_quant_along_axis(x, scale.to(x.device), zp.to(x.device), bits, dims) - x
                    add((_name, ti, axis, method, k), float(err.double().pow(2).sum()))

    handles = []
    for name in names:
        lt = calib.layers[name][0]
        handles.append(modules[name].register_forward_pre_hook(
            lambda mod, args, _n=name, _lt=lt: hook(mod, args, _n, _lt)))
    controller.install(unet, pipe)
    try:
        _run_prompts(pipe, list(prompts), num_inference_steps, guidance_scale, seed, batch_size, height, width,
                     progress, desc="group-error sweep", tqdm=tqdm)
    finally:
        controller.remove()
        for h in handles:
            h.remove()
    schedule = list(controller.schedule)
    if calib.timesteps and schedule[: len(calib.timesteps)] != list(calib.timesteps)[: len(schedule)]:
        raise ValueError("the sweep's sampling schedule differs from the calibration statistics' schedule; use "
                         "the same scheduler and num_inference_steps for both")

    rows = []
    for (name, ti, axis, method, k), (sq, _) in acc.items():
        e_sum, count = energy[(name, ti)]
        st = calib.stats(name, ti)
        two_axes = st.channel is not None and st.pixel is not None
        rows.append({
            "layer": name, "short": short_name(name), "block": block_of(name), "layer_type": calib.layers[name][0],
            "timestep_index": ti, "timestep": schedule[ti] if ti < len(schedule) else math.nan,
            "axis": axis, "method": method, "k": k,
            "k_used": plans[(name, ti, axis, method, k)][2] if axis != "tensor" else 1,
            "mse": sq / count, "energy": e_sum / count,
            "official_axis": decide_axis(st.channel, st.pixel, "official_spread") if two_axes else "channel",
            "ratio_axis": decide_axis(st.channel, st.pixel, "outlier_ratio") if two_axes else "channel",
        })
    df = pd.DataFrame(rows)
    base = df[df["axis"] == "tensor"].set_index(["layer", "timestep_index"])["mse"]
    df["rel_mse"] = df["mse"] / base.reindex(pd.MultiIndex.from_frame(df[["layer", "timestep_index"]])).to_numpy()
    df["sqnr_db"] = 10 * np.log10(df["energy"] / df["mse"].clip(lower=1e-30))
    return df.sort_values(["layer", "timestep_index", "axis", "method", "k"], kind="stable").reset_index(drop=True)


def error_curve(sweep: pd.DataFrame, *, axis: str = "official") -> pd.DataFrame:
    """Geometric-mean relative MSE over (layer, timestep) per method and K, on the axis chosen by
    ``axis``: ``"official"`` / ``"ratio"`` (the rule's choice, per input), ``"oracle"`` (the axis with the lower
    error at that K) or ``"channel"`` / ``"pixel"`` (forced; inputs without that axis are skipped)."""
    base = sweep[sweep["axis"] == "tensor"]
    grouped = sweep[sweep["axis"] != "tensor"]
    if axis in ("official", "ratio"):
        sel = grouped[grouped["axis"] == grouped[f"{axis}_axis"]]
    elif axis == "oracle":
        idx = grouped.groupby(["layer", "timestep_index", "method", "k"])["mse"].idxmin()
        sel = grouped.loc[idx]
    elif axis in ("channel", "pixel"):
        sel = grouped[grouped["axis"] == axis]
    else:
        raise ValueError(f"axis must be official, ratio, oracle, channel or pixel; got {axis!r}")
    rows = [{"method": "per-tensor", "k": 1, "gmean_rel_mse": 1.0, "median_sqnr_db": float(base["sqnr_db"].median()),
             "inputs": len(base)}]
    for (method, k), g in sel.groupby(["method", "k"], sort=True):
        rows.append({"method": method, "k": int(k),
                     "gmean_rel_mse": float(np.exp(np.log(g["rel_mse"].clip(lower=1e-30)).mean())),
                     "median_sqnr_db": float(g["sqnr_db"].median()), "inputs": len(g)})
    out = pd.DataFrame(rows)
    out["axis_choice"] = axis
    return out


def axis_rule_accuracy(sweep: pd.DataFrame, *, method: str = "kmeans", k: int | None = None) -> pd.DataFrame:
    """How often each rule picks the axis with the lower measured error (``method``, largest ``k`` by default),
    over inputs that have both axes; also the mean error penalty (in dB) of the rule's wrong picks."""
    g = sweep[(sweep["method"] == method) & (sweep["axis"].isin(["channel", "pixel"]))]
    k = int(g["k"].max()) if k is None else k
    g = g[g["k"] == k]
    wide = g.pivot_table(index=["layer", "timestep_index"], columns="axis", values="sqnr_db").dropna()
    axes = g.drop_duplicates(["layer", "timestep_index"]).set_index(["layer", "timestep_index"])
    best = np.where(wide["channel"] > wide["pixel"], "channel", "pixel")
    rows = []
    for rule, col in (("official_spread", "official_axis"), ("outlier_ratio", "ratio_axis")):
        pick = axes.loc[wide.index, col].to_numpy()
        right = pick == best
        loss = np.abs(wide["channel"] - wide["pixel"]).to_numpy()
        rows.append({"rule": rule, "method": method, "k": k, "inputs": len(wide),
                     "picks_better_axis": float(right.mean()) if len(right) else math.nan,
                     "mean_sqnr_loss_db_when_wrong": float(loss[~right].mean()) if (~right).any() else 0.0,
                     "share_channel_picked": float((pick == "channel").mean()) if len(pick) else math.nan,
                     "share_channel_better": float((best == "channel").mean()) if len(best) else math.nan})
    return pd.DataFrame(rows)


def example_groups(stats_axis, k: int = 8, methods: Sequence[str] = ("contiguous", "sorted", "kmeans"),
                   seed: int = 0) -> pd.DataFrame:
    """Per index of one axis: ``min``, ``max`` and the group id under each method (for the groups figure)."""
    from .grouping import assign_groups

    k = min(k, stats_axis.n)
    df = pd.DataFrame({"index": np.arange(stats_axis.n), "min": stats_axis.mins.cpu().numpy(),
                       "max": stats_axis.maxs.cpu().numpy()})
    for m in methods:
        df[m] = assign_groups(stats_axis, k, method=m, seed=seed).cpu().numpy()
    return df


# ==============================================================================================================
# 03: attention
# ==============================================================================================================
class _CaptureProcessor:
    """Explicit attention (``softmax(QK^T * scale) V``, softmax in float32) that records what it computes.

    Built on diffusers' public ``Attention`` helpers; numerically the same attention as the default processor
    up to float rounding. ``sink`` receives per-key mass for every call and full probabilities / values for the
    selected layers and timesteps.
    """

    def __init__(self, name: str, kind: str, sink: "AttentionCapture", state, full: bool, full_timesteps):
        self.name, self.kind, self.sink, self.state = name, kind, sink, state
        self.full, self.full_timesteps = full, set(full_timesteps)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        residual, hidden_states, ctx, spatial = attention_prologue(attn, hidden_states, encoder_hidden_states, temb)
        batch = hidden_states.shape[0]
        query = attn.to_q(hidden_states)
        key, value = attn.to_k(ctx), attn.to_v(ctx)
        heads = attn.heads
        d = key.shape[-1] // heads
        q = query.view(batch, -1, heads, d).transpose(1, 2)
        k = key.view(batch, -1, heads, d).transpose(1, 2)
        v = value.view(batch, -1, heads, d).transpose(1, 2)
        scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * attn.scale
        if attention_mask is not None:
            mask = attn.prepare_attention_mask(attention_mask, k.shape[2], batch)
            scores = scores + mask.view(batch, heads, -1, mask.shape[-1]).float()
        probs = scores.softmax(dim=-1)
        ti = self.state.set_index
        self.sink._record(self.name, self.kind, ti, probs, v, self.full and ti in self.full_timesteps)
        out = torch.matmul(probs.to(v.dtype), v).transpose(1, 2).reshape(batch, -1, heads * d)
        return attention_epilogue(attn, out, residual, spatial)


@dataclass
class AttentionCapture:
    """What :func:`capture_attention` recorded.

    ``kinds[layer]``: ``"self"`` / ``"cross"``. ``key_mass[(layer, ti)]``: ``(B, Nk)`` mean probability each key
    receives (over heads and queries) for every sample. ``probs[(layer, ti)]`` / ``values[(layer, ti)]``:
    ``(B, heads, Nq, Nk)`` probabilities and ``(B, heads, Nk, d)`` values, for the selected layers and timesteps.
    Batch layout under classifier-free guidance: samples ``0..n-1`` are the unconditional halves of the
    ``n`` prompts of a batch, ``n..2n-1`` the conditional ones (diffusers' order), batches concatenated;
    ``sample_prompt`` / ``sample_half`` give the prompt index and ``"uncond"``/``"cond"`` of every sample.
    ``tokens[i]``: the token strings of prompt ``i`` (77 positions, ``<start>`` first).
    """

    prompts: list[str]
    kinds: dict[str, str] = field(default_factory=dict)
    key_mass: dict[tuple, torch.Tensor] = field(default_factory=dict)
    probs: dict[tuple, torch.Tensor] = field(default_factory=dict)
    values: dict[tuple, torch.Tensor] = field(default_factory=dict)
    timesteps: list[float] = field(default_factory=list)
    sample_prompt: list[int] = field(default_factory=list)
    sample_half: list[str] = field(default_factory=list)
    tokens: list[list[str]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    _parts: dict = field(default_factory=dict, repr=False)

    def _record(self, name, kind, ti, probs, v, full):
        self.kinds[name] = kind
        self._parts.setdefault(("mass", name, ti), []).append(probs.mean(dim=(1, 2)).detach().cpu())
        if full:
            self._parts.setdefault(("probs", name, ti), []).append(probs.detach().cpu().clone())
            self._parts.setdefault(("values", name, ti), []).append(v.detach().float().cpu().clone())

    def _finish(self):
        for (what, name, ti), parts in self._parts.items():
            target = {"mass": self.key_mass, "probs": self.probs, "values": self.values}[what]
            target[(name, ti)] = torch.cat(parts)
        self._parts.clear()

    def layers(self, kind: str | None = None) -> list[str]:
        return [n for n, k in self.kinds.items() if kind is None or k == kind]


@torch.no_grad()
def capture_attention(
    pipe,
    prompts: Sequence[str],
    *,
    num_inference_steps: int = 25,
    guidance_scale: float = 7.5,
    seed: int = 0,
    batch_size: int = 8,
    full_layers: Sequence[str] | None = None,
    full_timesteps: Sequence[int] | None = None,
    max_elements_per_sample: int = 2**23,
    height: int | None = None,
    width: int | None = None,
    progress: bool = True,
) -> AttentionCapture:
    """Run ``prompts`` through the FP pipeline and record the attention of every UNet attention layer.

    Per-key mass is kept for every layer, timestep and sample (small). Full probabilities and values are kept for
    ``full_layers`` (default: every attention) at ``full_timesteps`` (UNet-call indices; default: first, middle,
    last), except layers whose probabilities exceed ``max_elements_per_sample`` per sample (e.g. SD v1.4's
    64x64 self-attention, 8 x 4096^2 values) unless named explicitly -- those are listed in ``skipped``.
    The pipeline's processors are restored afterwards.
    """
    from tqdm.auto import tqdm

    from .observers import _run_prompts
    from .timesteps import TimestepController

    unet = pipe.unet
    prompts = list(prompts)
    cap = AttentionCapture(prompts)
    original = dict(unet.attn_processors)
    controller = TimestepController(mapping="exact")
    state = controller.state
    n_calls = num_inference_steps + (1 if type(pipe.scheduler).__name__ == "PNDMScheduler" else 0)
    tis = set(full_timesteps) if full_timesteps is not None else {0, n_calls // 2, n_calls - 1}
    lat = int(pipe.unet.config.sample_size) if height is None else height // int(pipe.vae_scale_factor)
    procs = {}
    for key in original:
        name = key[: -len(".processor")]
        attn = unet.get_submodule(name)
        kind = "cross" if attn.is_cross_attention else "self"
        explicit = full_layers is not None and name in set(full_layers)
        full = full_layers is None or explicit
        if full and not explicit:
            # queries at this layer: the latent side of its resolution level, squared
            level = _attention_level(name, len(unet.config.block_out_channels))
            nq = (lat // 2**level) ** 2
            nk = 77 if kind == "cross" else nq
            if attn.heads * nq * nk > max_elements_per_sample:
                full = False
                cap.skipped.append(name)
        procs[key] = _CaptureProcessor(name, kind, cap, state, full, tis)
    unet.set_attn_processor(procs)
    controller.install(unet, pipe)
    try:
        _run_prompts(pipe, prompts, num_inference_steps, guidance_scale, seed, batch_size, height, width,
                     progress, desc="capturing attention", tqdm=tqdm)
    finally:
        controller.remove()
        unet.set_attn_processor(original)
    cap._finish()
    cap.timesteps = list(controller.schedule)
    cfg = guidance_scale > 1
    for start in range(0, len(prompts), batch_size):
        idx = list(range(start, min(start + batch_size, len(prompts))))
        if cfg:
            cap.sample_prompt += idx + idx
            cap.sample_half += ["uncond"] * len(idx) + ["cond"] * len(idx)
        else:
            cap.sample_prompt += idx
            cap.sample_half += ["cond"] * len(idx)
    tok = pipe.tokenizer
    ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True).input_ids
    cap.tokens = [tok.convert_ids_to_tokens(r) for r in ids]
    return cap


def _attention_level(name: str, n_levels: int) -> int:
    """Resolution level (0 = full latent size) of an attention module from its name."""
    m = re.match(r"^down_blocks\.(\d+)", name)
    if m:
        return int(m.group(1))
    m = re.match(r"^up_blocks\.(\d+)", name)
    if m:
        return n_levels - 1 - int(m.group(1))
    return n_levels - 1  # mid block


def start_mass_table(stats) -> pd.DataFrame:
    """From ``ActivationStats.attention_frame()``: per (attention layer, timestep) the mean probability on key 0
    (``<start>`` in cross-attention; the top-left latent pixel in self-attention), averaged over heads, and the
    uniform share ``1 / num_keys`` for comparison."""
    af = stats.attention_frame()
    if af.empty:
        return af
    g = af.groupby(["layer", "kind", "timestep_index", "timestep"], sort=False).agg(
        start_mass=("start_mass", "mean"), start_mass_max=("start_mass_max", "max"),
        max_prob=("max_prob", "max"), max_prob_excl_start=("max_prob_excl_start", "max"),
        num_keys=("num_keys", "first")).reset_index()
    g["uniform_share"] = 1.0 / g["num_keys"]
    g["start_over_uniform"] = g["start_mass"] / g["uniform_share"]
    g["short"] = g["layer"].map(short_name)
    g = g.iloc[sorted(range(len(g)), key=lambda i: unet_rank(g["layer"].iat[i]))]
    return g.reset_index(drop=True)


def _prob_quant(p: torch.Tensor, quantizer: str, bits: int, scale: str, keep_start: bool) -> torch.Tensor:
    from .attention import ProbQuantizer

    pq = ProbQuantizer("analysis", bits, quantizer=quantizer, scale=scale, keep_start=keep_start, zero_level=True)
    pq.mode = "quant"
    return pq.quantize(p)


def prob_error_table(cap: AttentionCapture, *, bits: Sequence[int] = (4, 6, 8),
                     quantizers: Sequence[str] = ("uniform", "log2"),
                     scales: Sequence[str] = ("per_prompt", "batch")) -> pd.DataFrame:
    """Error of quantizing the captured softmax probabilities, per (layer, timestep, quantizer, bits, scale,
    ``<start>`` FP).

    Quantization uses the engine's :class:`dgq_utils.attention.ProbQuantizer` (what the quantized model runs).
    Columns: ``prob_mse`` (mean squared error of the probabilities), ``out_rel_err`` (``||(P^ - P) V|| / ||P V||``,
    the relative error of the attention output, the quantity that matters downstream), ``zeroed`` (share of
    nonzero probabilities that became exactly 0), ``row_sum`` (mean row sum after quantization; 1 before).
    ``keep_start=True`` is only evaluated in cross-attention (where ``<start>`` is a text token).
    """
    rows = []
    for (name, ti), p in cap.probs.items():
        v = cap.values[(name, ti)]
        kind = cap.kinds[name]
        ref = torch.matmul(p, v)
        ref_norm = float(ref.double().norm())
        nz = p > 0
        for q in quantizers:
            for b in bits:
                for s in scales:
                    for keep in ((False, True) if kind == "cross" else (False,)):
                        pq = _prob_quant(p, q, b, s, keep)
                        out = torch.matmul(pq, v)
                        rows.append({
                            "layer": name, "short": short_name(name), "kind": kind, "timestep_index": ti,
                            "timestep": cap.timesteps[ti] if ti < len(cap.timesteps) else math.nan,
                            "quantizer": q, "bits": b, "scale": s, "start_fp": keep,
                            "prob_mse": float((pq - p).double().pow(2).mean()),
                            "out_rel_err": float((out - ref).double().norm()) / max(ref_norm, 1e-30),
                            "zeroed": float(((pq == 0) & nz).sum()) / max(int(nz.sum()), 1),
                            "row_sum": float(pq.sum(-1).mean()),
                        })
    return pd.DataFrame(rows)


def scale_table(cap: AttentionCapture, *, bits: int = 6) -> pd.DataFrame:
    """Per-prompt vs batch max: per (layer, timestep, sample) the sample's own max probability (excluding
    ``<start>`` in cross-attention, as DGQ's scale does), the batch max, their ratio, and the output error of
    one sample under each scale for the log2 and uniform quantizers at ``bits``.

    The batch is the whole capture batch (both CFG halves, all prompts of a ``batch_size`` chunk), which is what
    the official code's ``x.max()`` sees.
    """
    rows = []
    n_batch = None
    for (name, ti), p in cap.probs.items():
        v = cap.values[(name, ti)]
        kind = cap.kinds[name]
        keep = kind == "cross"
        rest = p[..., 1:] if keep else p
        own = rest.amax(dim=(1, 2, 3))
        batch_max = float(rest.amax())
        ref = torch.matmul(p, v)
        errs = {}
        for q in ("log2", "uniform"):
            for s in ("per_prompt", "batch"):
                out = torch.matmul(_prob_quant(p, q, bits, s, keep), v)
                errs[(q, s)] = ((out - ref).flatten(1).double().norm(dim=1)
                                / ref.flatten(1).double().norm(dim=1).clamp_min(1e-30))
        n_batch = p.shape[0]
        for i in range(n_batch):
            row = {"layer": name, "short": short_name(name), "kind": kind, "timestep_index": ti,
                   "sample": i, "prompt_index": cap.sample_prompt[i] if i < len(cap.sample_prompt) else -1,
                   "half": cap.sample_half[i] if i < len(cap.sample_half) else "cond",
                   "sample_max": float(own[i]), "batch_max": batch_max,
                   "batch_over_sample": batch_max / max(float(own[i]), 1e-30)}
            for (q, s), e in errs.items():
                row[f"{q}_{s}_err"] = float(e[i])
            rows.append(row)
    return pd.DataFrame(rows)


# ==============================================================================================================
# 04-06: evaluation
# ==============================================================================================================
class CachedQuantizer:
    """The ``quantizer=`` object for :func:`dgq_utils.evaluate.run_comparison`, with a calibration cache.

    A calibrated state is stored under ``state_dir`` keyed by the model, the recipe (its content hash), the
    calibration prompts and every calibration setting, so notebooks 04, 05 and 06 calibrate each recipe once.
    Calibration itself is :func:`dgq_utils.pipeline.quantize_pipeline`.
    """

    def __init__(self, state_dir: str | os.PathLike, model_key: str):
        self.state_dir = Path(state_dir)
        self.model_key = model_key
        self.hits: list[str] = []
        self.calibrated: list[str] = []

    def _path(self, recipe, calibration_prompts, kw) -> Path:
        from .config import get_preset, recipe_hash

        r = get_preset(recipe) if isinstance(recipe, str) else recipe
        key = _hash({"model": self.model_key, "recipe": recipe_hash(r), "prompts": list(calibration_prompts),
                     "kw": {k: v for k, v in kw.items() if k != "progress"}}, 16)
        return self.state_dir / f"{r.name}-{key}.safetensors"

    def quantize(self, pipe, recipe, calibration_prompts, **kw) -> None:
        from .pipeline import dequantize_pipeline, load_quant_state, quantize_pipeline, save_quant_state

        path = self._path(recipe, calibration_prompts, kw)
        if path.is_file():
            try:
                load_quant_state(pipe, path)
                self.hits.append(path.name)
                return
            except Exception:  # noqa: BLE001 - a stale / corrupt cache entry is recalibrated
                dequantize_pipeline(pipe)
                path.unlink(missing_ok=True)
        quantize_pipeline(pipe, recipe, list(calibration_prompts), **kw)
        save_quant_state(pipe, path)  # atomic: an interrupted run leaves no half-written state
        self.calibrated.append(path.name)

    def save(self, pipe, path) -> None:
        from .pipeline import save_quant_state

        save_quant_state(pipe, path)

    def load(self, pipe, recipe, path) -> None:
        from .pipeline import load_quant_state

        load_quant_state(pipe, path)

    def dequantize(self, pipe) -> None:
        from .pipeline import dequantize_pipeline

        dequantize_pipeline(pipe)


def comparison_setup(ctx: ModelContext, metrics: Sequence[str] | None = None, *, n_reference: int = 512,
                     seed: int = 0) -> tuple[list[str], dict]:
    """``(metrics, run_comparison keyword arguments)`` for the model at hand.

    * embedded: FID / KID on the world's attribute-evaluator features against rendered test scenes, the world's
      small CLIP score, attribute alignment accuracy, PSNR / SSIM vs FP (and LPIPS when its backbone weights are
      on disk) -- exactly :func:`dgq_utils.evaluate.run_embedded_comparison`'s set-up;
    * tiny / external: fidelity to FP only (PSNR, SSIM, LPIPS if available): no offline reference or scorer
      exists for them (for SD v1.4 the paper protocol is :func:`dgq_utils.protocol.run_paper_protocol`).

    ``metrics`` filters the set (names the model cannot support are dropped).
    """
    from . import metrics as M

    lpips_ok = M.lpips_backbone_file("alex")[1].is_file()
    fidelity = ["psnr", "ssim"] + (["lpips"] if lpips_ok else [])
    if ctx.kind == "embedded":
        from .evaluate import Reference, embedded_alignment_evaluator, embedded_reference_images

        d = Path(ctx.embedded_dir)
        available = ["fid", "kid", "clip_score", "alignment"] + fidelity
        chosen = [m for m in (metrics or available) if m in available]
        kw: dict = {}
        if "clip_score" in chosen:
            kw["clip_scorer"] = M.ClipScorer.from_embedded(d / "clip", device=ctx.device)
        if "alignment" in chosen:
            kw["alignment_evaluator"] = embedded_alignment_evaluator(d / "evaluator", device=ctx.device)
        if any(m in chosen for m in M.SET_METRICS):
            kw["extractor"] = M.EMBEDDED_EXTRACTOR
            kw["extractor_weights"] = str(d / "evaluator")
            kw["reference"] = Reference(images=embedded_reference_images(n_reference, seed=seed),
                                        name="rendered test scenes")
        return chosen, kw
    chosen = [m for m in (metrics or fidelity) if m in fidelity]
    return chosen, {}


def ablation_recipes(base: str = "dgq-w8a6") -> list:
    """DGQ with one component switched off at a time (each a named recipe), plus MixDQ's BOS-aware variant and
    the official-code variant of ``base``. Order: the full method first."""
    from .config import get_preset

    r = get_preset(base)
    tag = base[len("dgq-"):] if base.startswith("dgq-") else base
    variants = [
        r,
        r.replace(name=f"{base}-per-tensor", activations={"granularity": "per_tensor"}),
        r.replace(name=f"{base}-contiguous", activations={"grouping": "contiguous"}),
        r.replace(name=f"{base}-uniform-softmax", attention={"quantizer": "uniform"}),
        r.replace(name=f"{base}-no-start-fp", attention={"keep_start_fp": False, "keep_start_key_fp": False}),
        r.replace(name=f"{base}-batch-scale", attention={"scale": "batch"}),
        r.replace(name=f"{base}-shared-timesteps", per_timestep=False),
        r.replace(name=f"{base}-mixdq-bos", attention={"bos_kv_fp": True}),
    ]
    official = f"dgq-official-{tag}"
    try:
        variants.append(get_preset(official))
    except ValueError:
        pass
    return variants


ABLATION_LABELS = {
    "": "DGQ (all components)",
    "-per-tensor": "grouping → per-tensor",
    "-contiguous": "K-means → contiguous groups",
    "-uniform-softmax": "log2 softmax → uniform",
    "-no-start-fp": "<start> FP → quantized",
    "-batch-scale": "per-prompt → batch softmax scale",
    "-shared-timesteps": "per-timestep → shared parameters",
    "-mixdq-bos": "+ MixDQ BOS-aware (K, V of <start> FP)",
}


def ablation_label(name: str, base: str = "dgq-w8a6") -> str:
    if name.startswith("dgq-official"):
        return "official-code variant"
    if name.startswith(base):
        return ABLATION_LABELS.get(name[len(base):], name)
    return name


def paired_vs(per_image: dict[str, pd.DataFrame], reference: str, metrics: Sequence[str], *, n_boot: int = 2000,
              seed: int = 0) -> pd.DataFrame:
    """Paired bootstrap difference ``recipe - reference`` per metric on the same prompts and seeds, from
    :func:`run_comparison`'s per-image tables (rows aligned by prompt index and seed)."""
    from .confidence import paired_difference

    ref = per_image[reference]
    rows = []
    for name, df in per_image.items():
        if name == reference:
            continue
        a = df.set_index(["prompt_index", "seed"])
        b = ref.set_index(["prompt_index", "seed"]).reindex(a.index)
        for m in metrics:
            if m not in a.columns or m not in b.columns:
                continue
            x, y = a[m].to_numpy(dtype=float), b[m].to_numpy(dtype=float)
            ok = ~(np.isnan(x) | np.isnan(y))
            if ok.sum() < 2:
                continue
            ci = paired_difference(x[ok], y[ok], n_boot=n_boot, seed=seed)
            rows.append({"recipe": name, "metric": m, "diff": ci.value, "ci_low": ci.low, "ci_high": ci.high,
                         "n": int(ok.sum()), "p_value": getattr(ci, "p_value", math.nan)})
    return pd.DataFrame(rows, columns=["recipe", "metric", "diff", "ci_low", "ci_high", "n", "p_value"])


def wide_table(table: pd.DataFrame, metrics: Sequence[str], recipes: Sequence[str] | None = None,
               digits: int = 4) -> pd.DataFrame:
    """Recipe x metric table with cells ``value [lo, hi]`` (a thin wrapper of :func:`results.report_view`)."""
    from .results import report_view

    t = table[table["metric"].isin(metrics)]
    return report_view(t, digits=digits, recipe_order=list(recipes) if recipes else None, metric_order=list(metrics))


def ci_halfwidths(table: pd.DataFrame) -> pd.DataFrame:
    """Median CI half-width per metric over recipes (what the chosen N buys)."""
    t = table.dropna(subset=["ci_low", "ci_high"]).copy()
    t["halfwidth"] = (t["ci_high"] - t["ci_low"]) / 2
    return t.groupby("metric", sort=False).agg(n=("n", "max"), median_halfwidth=("halfwidth", "median"),
                                               median_value=("value", "median")).reset_index()


# The paper's Table 2, SD v1.4 on MS-COCO (IS, FID, CLIP) and PartiPrompts CLIP, read from the project page image
# (see shared/dgq-official-code.md section 7; "Q-Diff"/"TFMQ" are the paper's per-tensor baselines).
PAPER_TABLE2 = pd.DataFrame(
    [
        ("W32A32", "FP", None, 36.52, 14.44, 0.298, 0.293),
        ("W8A8", "Q-Diff", None, 27.65, 26.12, 0.273, 0.275),
        ("W8A8", "TFMQ", None, 32.79, 18.85, 0.286, 0.286),
        ("W8A8", "DGQ", 8, 35.38, 13.26, 0.297, 0.292),
        ("W8A8", "DGQ", 16, 35.22, 13.15, 0.297, 0.292),
        ("W8A6", "Q-Diff", None, 4.12, 221.76, 0.080, 0.120),
        ("W8A6", "TFMQ", None, 6.57, 175.16, 0.146, 0.178),
        ("W8A6", "DGQ", 8, 22.65, 37.76, 0.268, 0.277),
        ("W8A6", "DGQ", 16, 24.77, 31.36, 0.273, 0.279),
        ("W4A8", "Q-Diff", None, 26.52, 28.06, 0.269, 0.271),
        ("W4A8", "TFMQ", None, 30.85, 19.98, 0.281, 0.281),
        ("W4A8", "DGQ", 8, 33.91, 13.28, 0.294, 0.289),
        ("W4A8", "DGQ", 16, 33.56, 13.74, 0.294, 0.288),
    ],
    columns=["bits", "method", "k", "is", "fid", "clip_score", "parti_clip"],
)


def paper_comparison(table: pd.DataFrame, *, metrics: Sequence[str] = ("fid", "clip_score"),
                     settings: Sequence[str] = ("w8a8", "w8a6", "w4a8"),
                     paired: pd.DataFrame | None = None) -> pd.DataFrame:
    """Side by side, per bit setting and metric: FP, the per-tensor baseline and DGQ (K = 16) in the paper (the
    TFMQ row, the paper's per-timestep per-tensor baseline) and here, and whether DGQ beats the baseline and
    how much of the baseline's gap to FP it closes, in each.

    ``gap_closed`` = ``(baseline - DGQ) / (baseline - FP)`` in the metric's better direction (1 = DGQ at FP
    level, 0 = no better than the baseline, < 0 worse). Numbers are not comparable across models; the *shape*
    of the result (DGQ vs baseline, gap to FP) is. With ``paired`` (``run_comparison``'s paired-vs-FP table), our
    ``gap_closed`` is left NaN where the baseline's own difference to FP is not resolved (its CI contains 0): a
    share of a gap that may not exist is meaningless (``ours_baseline_gap_resolved`` says which).
    """
    resolved = {}
    if paired is not None and len(paired):
        for r in paired.itertuples():
            resolved[(r.recipe, r.metric)] = not (r.ci_low <= 0 <= r.ci_high)
    higher_better = {"fid": False, "kid": False, "clip_score": True, "is": True, "isc": True}
    ours = table.set_index(["recipe", "metric"])["value"]
    rows = []
    for s in settings:
        bits = s.upper()
        for m in metrics:
            hb = higher_better.get(m, True)
            paper_col = {"isc": "is"}.get(m, m)
            pr = PAPER_TABLE2
            p_fp = pr.loc[pr["method"] == "FP", paper_col]
            p_base = pr.loc[(pr["bits"] == bits) & (pr["method"] == "TFMQ"), paper_col]
            p_dgq = pr.loc[(pr["bits"] == bits) & (pr["method"] == "DGQ") & (pr["k"] == 16), paper_col]
            o_fp = ours.get(("fp", m), math.nan)
            o_base = ours.get((f"baseline-{s}", m), math.nan)
            o_dgq = ours.get((f"dgq-{s}", m), math.nan)

            def closed(fp, base, dgq):
                gap = (base - fp) if not hb else (fp - base)
                gain = (base - dgq) if not hb else (dgq - base)
                return gain / gap if gap and not math.isnan(gap) and abs(gap) > 1e-12 else math.nan

            def beats(base, dgq):
                if math.isnan(base) or math.isnan(dgq):
                    return None
                return bool(dgq > base) if hb else bool(dgq < base)

            pf = float(p_fp.iloc[0]) if len(p_fp) else math.nan
            pb = float(p_base.iloc[0]) if len(p_base) else math.nan
            pd_ = float(p_dgq.iloc[0]) if len(p_dgq) else math.nan
            gap_ok = resolved.get((f"baseline-{s}", m), True)
            rows.append({"setting": bits, "metric": m, "higher_is_better": hb,
                         "paper_fp": pf, "paper_baseline": pb, "paper_dgq": pd_,
                         "paper_dgq_beats_baseline": beats(pb, pd_), "paper_gap_closed": closed(pf, pb, pd_),
                         "ours_fp": o_fp, "ours_baseline": o_base, "ours_dgq": o_dgq,
                         "ours_dgq_beats_baseline": beats(o_base, o_dgq),
                         "ours_baseline_gap_resolved": gap_ok,
                         "ours_gap_closed": closed(o_fp, o_base, o_dgq) if gap_ok else math.nan})
    return pd.DataFrame(rows)


# ==============================================================================================================
# sentences computed from the numbers (the notebooks print these instead of asserting results in prose)
# ==============================================================================================================
HIGHER_IS_BETTER = {"fid": False, "kid": False, "lpips": False, "clip_score": True, "isc": True, "psnr": True,
                    "ssim": True}


def higher_is_better(metric: str) -> bool:
    """Direction of a metric (alignment accuracies and unknown metrics: higher is better)."""
    return HIGHER_IS_BETTER.get(metric, True)


def headline_metrics(available: Iterable[str]) -> list[str]:
    """The few metrics the report leads with, among ``available`` (in this order)."""
    pref = ["alignment_caption", "clip_score", "fid", "kid", "psnr", "ssim", "lpips", "isc"]
    avail = list(available)
    return [m for m in pref if m in avail]


def prompt_length(tokens: Sequence[str]) -> int:
    """Number of leading tokens worth showing: ``<start>``, the words and the first end token."""
    for i, t in enumerate(tokens):
        if i > 0 and "endoftext" in t:
            return i + 1
    return len(tokens)


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def describe_decisions(summary: pd.DataFrame, accuracy: pd.DataFrame | None = None,
                       decisions: pd.DataFrame | None = None) -> str:
    """Sentences about :func:`decision_summary` (and :func:`axis_rule_accuracy`)."""
    n = len(summary)
    parts = []
    for rule in RULES:
        col = f"{rule}_majority"
        if col in summary:
            c = int((summary[col] == "channel").sum())
            parts.append(f"the {rule.replace('_', ' ')} rule groups **{c} of {n}** inputs channel-wise and "
                         f"{n - c} pixel-wise (majority over timesteps)")
    text = "Per layer, " + "; ".join(parts) + "."
    if decisions is not None and all(r in decisions for r in RULES):
        d = decisions[decisions[RULES[0]] != "channel (only axis)"]
        if len(d):
            agree = float((d[RULES[0]] == d[RULES[1]]).mean())
            flips = d.groupby("layer")[RULES[0]].nunique()
            text += (f" The two rules agree on {_pct(agree)} of the (layer, timestep) decisions; "
                     f"{int((flips > 1).sum())} inputs change axis between timesteps under the official rule.")
    if accuracy is not None and len(accuracy):
        a = accuracy.set_index("rule")
        k = int(a["k"].iloc[0])
        s = [f"{r.replace('_', ' ')} {_pct(a.loc[r, 'picks_better_axis'])}" for r in a.index]
        text += (f" Measured on held-out activations with {k} K-means groups, the rule's axis is the one with the "
                 f"lower error for: {', '.join(s)} of {int(a['inputs'].iloc[0])} inputs (channel-wise is the "
                 f"better axis for {_pct(a['share_channel_better'].iloc[0])} of them).")
    return text


def describe_error_curve(curves: pd.DataFrame, *, axis_choice: str = "official") -> str:
    """Sentences about :func:`error_curve` tables (relative MSE vs K, per method)."""
    c = curves[curves["axis_choice"] == axis_choice]
    g = c[c["method"] != "per-tensor"]
    if g.empty:
        return "No grouped errors were measured."
    kmax = int(g["k"].max())
    at = g[g["k"] == kmax].set_index("method")["gmean_rel_mse"]
    best = at.idxmin()
    parts = [f"{m} {at[m]:.2f}×" for m in at.index]
    text = (f"With {kmax} groups on the axis the {axis_choice} rule picks, the held-out quantization MSE is "
            f"{', '.join(parts)} that of per-tensor quantization (geometric mean over inputs); **{best}** is lowest "
            "here.")
    km = g[g["method"] == "kmeans"].sort_values("k")
    if len(km):
        kbest = int(km.loc[km["gmean_rel_mse"].idxmin(), "k"])
        if kbest < kmax:
            text += (f" K-means error is lowest at K = {kbest} and grows again towards K = {kmax}: ranges fitted on "
                     "few calibration prompts per group clip held-out values that fall outside them (0 is not "
                     "forced into a group's range).")
        else:
            text += " K-means error keeps falling up to the largest K measured."
    return text


def describe_attention(start: pd.DataFrame, err: pd.DataFrame, scales: pd.DataFrame, *, bits: int = 6) -> str:
    """Sentences about the ``<start>`` sink, log2 vs uniform and per-prompt vs batch scale."""
    out = []
    if len(start):
        s = start.groupby("kind").agg(mass=("start_mass", "mean"), ratio=("start_over_uniform", "mean"))
        if "cross" in s.index:
            out.append(f"In cross-attention, key 0 (`<start>`) receives on average **{s.loc['cross', 'mass']:.2f}** "
                       f"of each query's probability ({s.loc['cross', 'ratio']:.1f}× a uniform share).")
        if "self" in s.index:
            out.append(f"In self-attention key 0 is just the top-left latent pixel; it receives "
                       f"{s.loc['self', 'ratio']:.1f}× a uniform share.")
    if len(err):
        e = err[(err["bits"] == bits) & (err["scale"] == "per_prompt") & ((err["kind"] == "self") | err["start_fp"])]
        m = e.groupby(["kind", "quantizer"])["out_rel_err"].median()
        z = e.groupby(["kind", "quantizer"])["zeroed"].median()
        for kind in ("cross", "self"):
            if (kind, "log2") in m and (kind, "uniform") in m:
                lg, un = m[(kind, "log2")], m[(kind, "uniform")]
                better = "log2" if lg < un else "uniform"
                out.append(f"{kind.capitalize()}-attention at {bits} bits (per-prompt scale"
                           f"{', <start> FP' if kind == 'cross' else ''}): median relative output error "
                           f"{lg:.3g} with log2 vs {un:.3g} with uniform → **{better}** is "
                           f"{max(lg, un) / max(min(lg, un), 1e-30):.1f}× better; uniform rounds "
                           f"{_pct(z[(kind, 'uniform')])} of the nonzero probabilities to 0 (log2: "
                           f"{_pct(z[(kind, 'log2')])}).")
        c = err[(err["kind"] == "cross") & (err["bits"] == bits) & (err["scale"] == "per_prompt")
                & (err["quantizer"] == "log2")]
        if len(c):
            w = c.groupby("start_fp")["out_rel_err"].median()
            if True in w and False in w:
                out.append(f"Keeping `<start>` FP changes the median log2 cross-attention error from {w[False]:.3g} "
                           f"to {w[True]:.3g}.")
    if len(scales):
        r = scales["batch_over_sample"]
        out.append(f"A batch-wide scale (official code) exceeds a sample's own maximum by a median factor "
                   f"{r.median():.2f} (up to {r.max():.1f}×).")
        for q in ("log2", "uniform"):
            a, b = f"{q}_per_prompt_err", f"{q}_batch_err"
            if a in scales and b in scales:
                out.append(f"{q}: median error {scales[a].median():.3g} per-prompt vs {scales[b].median():.3g} "
                           "batch-wide.")
    return " ".join(out)


def dgq_vs_baseline(per_image: dict[str, pd.DataFrame], metrics: Sequence[str],
                    settings: Sequence[str] = ("w8a8", "w8a6", "w4a8"), *, n_boot: int = 2000,
                    seed: int = 0) -> pd.DataFrame:
    """Paired difference DGQ − baseline per bit setting and per-image metric (same prompts and seeds)."""
    rows = []
    for s in settings:
        b, d = f"baseline-{s}", f"dgq-{s}"
        if b in per_image and d in per_image:
            t = paired_vs({b: per_image[b], d: per_image[d]}, b, metrics, n_boot=n_boot, seed=seed)
            t.insert(0, "setting", s.upper())
            rows.append(t)
    if not rows:
        return pd.DataFrame(columns=["setting", "recipe", "metric", "diff", "ci_low", "ci_high", "n", "p_value"])
    return pd.concat(rows, ignore_index=True)


def _verdict(metric: str, lo: float, hi: float) -> str:
    if lo > 0 or hi < 0:
        up = lo > 0
        return "better" if up == higher_is_better(metric) else "worse"
    return "not resolved"


def describe_comparison(table: pd.DataFrame, versus: pd.DataFrame, metrics: Sequence[str]) -> str:
    """Per bit setting: is DGQ better than the baseline (paired CI excludes 0), and how far both are from FP."""
    vals = table.set_index(["recipe", "metric"])["value"]
    out = []
    for s in ("W8A8", "W8A6", "W4A8"):
        v = versus[versus["setting"] == s]
        bits = []
        for m in metrics:
            r = v[v["metric"] == m]
            if len(r):
                r = r.iloc[0]
                verdict = _verdict(m, r["ci_low"], r["ci_high"])
                bits.append(f"{m} {r['diff']:+.3g} [{r['ci_low']:+.3g}, {r['ci_high']:+.3g}] ({verdict})")
            elif m in ("fid", "kid"):
                b, d = vals.get((f"baseline-{s.lower()}", m)), vals.get((f"dgq-{s.lower()}", m))
                if b is not None and d is not None and not (math.isnan(b) or math.isnan(d)):
                    bits.append(f"{m} {d:.3g} vs {b:.3g} (no paired CI)")
        if bits:
            out.append(f"- **{s}**, DGQ − baseline: " + "; ".join(bits))
    return "\n".join(out)


def describe_ablations(versus: pd.DataFrame, metrics: Sequence[str], *, base: str = "dgq-w8a6") -> str:
    """One line per variant: which metrics change resolvably (paired CI excludes 0) when a component is off."""
    out = []
    for name in dict.fromkeys(versus["recipe"]):
        v = versus[(versus["recipe"] == name) & versus["metric"].isin(metrics)]
        changed = [f"{r.metric} {r.diff:+.3g} [{r.ci_low:+.3g}, {r.ci_high:+.3g}] (variant "
                   f"{_verdict(r.metric, r.ci_low, r.ci_high)})"
                   for r in v.itertuples() if _verdict(r.metric, r.ci_low, r.ci_high) != "not resolved"]
        label = ablation_label(name, base)
        out.append(f"- **{label}**: " + ("; ".join(changed) if changed else "no change resolved at this N"))
    return "\n".join(out)


def pixel_shape(stats, layer: str, timestep_index: int):
    """``(H, W)`` of a conv input's pixel axis (for drawing it as an image), else ``None``."""
    lt, per_t = stats.layers[layer]
    shape = per_t[timestep_index].shape
    return tuple(shape[1:]) if lt == "conv" and shape is not None and len(shape) == 3 else None


def evenly_spaced(n_total: int, k: int) -> list[int]:
    """``k`` indices spread evenly over ``range(n_total)``, first and last included."""
    if k <= 1 or n_total <= 1:
        return [0]
    return sorted({int(round(i * (n_total - 1) / (k - 1))) for i in range(k)})
