"""Text-image alignment accuracy from an attribute classifier (``evaluator(images, prompts) -> DataFrame``), per
attribute and per caption, with bootstrap CIs. The embedded world supplies such an evaluator
(:func:`dgq_utils.world.comparison.embedded_alignment_evaluator`)."""
from __future__ import annotations

from typing import Sequence

import pandas as pd
import torch

from dgq_utils.evaluate.confidence import CI, bootstrap_mean
from dgq_utils.evaluate.metrics.images import load_images


ALIGNMENT_FLAGS = ("held_out", "two_objects")


def alignment_table(images, prompts: Sequence[str], evaluator) -> pd.DataFrame:
    """Per-image alignment from the embedded world's attribute classifier.

    ``evaluator(images uint8 (N,3,H,W), prompts) -> DataFrame`` with one column per attribute (bool, or a
    fraction in [0, 1]; NaN where the attribute does not apply to that prompt, e.g. ``relation`` for a one-object
    prompt), ``caption`` (every stated attribute right) and flags ``held_out`` (the prompt uses a held-out
    colour-shape combination) / ``two_objects``. The world's evaluator is wrapped to this signature by
    :func:`dgq_utils.world.comparison.embedded_alignment_evaluator`.
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
