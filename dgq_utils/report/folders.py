"""Where the report writes: run folders named by their settings, figure/result folders, table writer.

A full run of a real model writes into ``<outputs>/runs/<model>-n<prompts>-c<calibration>-<device>-<hash>/``
(:func:`default_run_folder`), quick runs into ``<outputs>/quick/``, the tiny pipeline into ``<outputs>/tiny/``.
The repository's ``figures/`` and ``results/`` are never a default: they hold one declared run
(``results/RUN.json``) and change only through :mod:`dgq_utils.report.publish`.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Mapping

import pandas as pd

from dgq_utils import paths
from dgq_utils.atomic import atomic_write_text
from dgq_utils.keys import stable_hash

__all__ = [
    "NOT_IN_NAME",
    "ROOT",
    "default_run_folder",
    "output_dirs",
    "run_folder_name",
    "runs_dir",
    "write_table",
]

ROOT = paths.REPO_ROOT
WORK_ROOT = paths.output_dir() / "work"


# ==============================================================================================================
# files
# ==============================================================================================================
#: parameters that do not change what a run computes (where files go, torch threads): not in a run folder's hash
NOT_IN_NAME = ("save_to", "work_dir", "threads")


def runs_dir() -> Path:
    """``<outputs>/runs`` (:func:`dgq_utils.paths.output_dir`, so ``DGQ_OUTPUT_DIR`` moves it)."""
    return paths.output_dir() / "runs"


def _model_label(model_id: Any) -> str:
    if model_id is None:
        return "embedded"
    return re.sub(r"[^A-Za-z0-9]+", "-", Path(str(model_id)).name).strip("-")[:40] or "model"


def run_folder_name(model_id: Any, n_prompts: Any, n_calibration: Any, device: Any, settings: Any) -> str:
    """``<model>-n<prompts>-c<calibration>-<device>-<hash>``, e.g. ``embedded-n64-c16-cpu-3f2a9c01d4``; the hash
    is :func:`short_hash` of ``settings`` (everything else that changes the results)."""
    dev = re.sub(r"[^A-Za-z0-9]+", "", str(device)) or "cpu"
    return f"{_model_label(model_id)}-n{n_prompts}-c{n_calibration}-{dev}-{short_hash(settings)}"


def default_run_folder(settings: Mapping[str, Any], *, quick: bool = False) -> Path:
    """Where a run with ``settings`` (parameter name -> value) writes when no ``save_to`` is given.

    ``quick`` -> ``<outputs>/quick``; ``model_id == "tiny"`` -> ``<outputs>/tiny``; else
    ``<outputs>/runs/<run_folder_name>``, hashed over ``settings`` less :data:`NOT_IN_NAME`. Never the
    repository's own folders.
    """
    if quick:
        return paths.output_dir() / "quick"
    model_id = settings.get("model_id")
    if model_id is not None and str(model_id) == "tiny":
        return paths.output_dir() / "tiny"
    keyed = {k: v for k, v in settings.items() if k not in NOT_IN_NAME}
    return runs_dir() / run_folder_name(model_id, settings.get("n_prompts"), settings.get("n_calibration"),
                                        settings.get("device", "cpu"), keyed)


def output_dirs(save_to: str | os.PathLike | None, *, quick: bool, kind: str,
                settings: Mapping[str, Any] | None = None) -> tuple[Path, Path]:
    """``(figures_dir, results_dir)`` for a notebook run (created): ``figures/`` and ``results/`` inside the run
    folder.

    The run folder is ``save_to`` when given (the chain passes its run folder this way); else
    ``<outputs>/quick`` for quick runs, ``<outputs>/tiny`` for the tiny test pipeline, and for a full run of a real
    model :func:`default_run_folder` of ``settings`` (a notebook run by hand: its own set-up settings). A run never
    writes into the repository's ``figures/`` and ``results/`` unless ``save_to`` names the repository itself.
    """
    if save_to is not None:
        base = Path(save_to)
    elif quick:
        base = paths.output_dir() / "quick"
    elif kind == "tiny":
        base = paths.output_dir() / "tiny"
    else:
        base = default_run_folder(dict(settings or {}), quick=False)
    figs, res = base / "figures", base / "results"
    figs.mkdir(parents=True, exist_ok=True)
    res.mkdir(parents=True, exist_ok=True)
    return figs, res


def write_table(df: pd.DataFrame, path: str | os.PathLike, *, float_format: str = "%.6g") -> Path:
    """Write ``df`` as CSV atomically (a reader never sees half a file); floats with 6 significant digits."""
    text = df.to_csv(index=False, float_format=float_format)
    return atomic_write_text(Path(path), text)


def short_hash(obj: Any, n: int = 10) -> str:
    """``n`` hex digits of :func:`dgq_utils.keys.stable_hash` (the one key function), for run-folder names."""
    return stable_hash(obj, n)
