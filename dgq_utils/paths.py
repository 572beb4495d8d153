"""Where things are on disk: the shipped data (the embedded model) and the folders a run writes.

One place decides, so that nothing walks up from a source file on its own. Two environment variables override
the defaults (useful for a non-editable install, where the package lives in ``site-packages`` apart from the
repository):

* ``DGQ_DATA_DIR`` -- the folder holding ``embedded/`` (default: ``data/`` of the repository checkout).
* ``DGQ_OUTPUT_DIR`` -- the folder runs write into (default: ``outputs/`` of the checkout, else ``./outputs``).
"""
from __future__ import annotations

import os
from pathlib import Path

__all__ = ["REPO_ROOT", "data_dir", "embedded_dir", "output_dir"]

#: The repository checkout this package sits in (for an editable install or a source tree on ``sys.path``).
REPO_ROOT = Path(__file__).resolve().parents[1]


def data_dir() -> Path:
    """The data folder: ``$DGQ_DATA_DIR``, else ``<repo>/data``."""
    env = os.environ.get("DGQ_DATA_DIR")
    return Path(env).expanduser().resolve() if env else REPO_ROOT / "data"


def embedded_dir() -> Path:
    """The embedded model's folder (pipeline, evaluator, small CLIP): ``data_dir() / "embedded"``."""
    return data_dir() / "embedded"


def output_dir() -> Path:
    """Where runs write: ``$DGQ_OUTPUT_DIR``, else ``<repo>/outputs`` (``./outputs`` outside a checkout)."""
    env = os.environ.get("DGQ_OUTPUT_DIR")
    if env:
        return Path(env).expanduser().resolve()
    if (REPO_ROOT / "pyproject.toml").exists():
        return REPO_ROOT / "outputs"
    return Path.cwd() / "outputs"
