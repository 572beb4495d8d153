"""Where the report writes: figure/result folders for full, quick and tiny runs; table writer.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pandas as pd

from dgq_utils import paths
from dgq_utils.atomic import atomic_write_text

__all__ = [
    "ROOT",
    "output_dirs",
    "write_table",
]

ROOT = paths.REPO_ROOT
WORK_ROOT = paths.output_dir() / "work"


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
        base = paths.output_dir() / "quick"
    elif kind == "tiny":
        base = paths.output_dir() / "tiny"
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


def short_hash(obj: Any, n: int = 10) -> str:
    blob = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:n]
