"""Where things are on disk: the shipped data (the embedded model) and the folders a run writes.

One place decides, so that nothing walks up from a source file on its own. In order:

* ``DGQ_DATA_DIR`` -- the folder holding ``embedded/``, if set;
* ``dgq_utils/data/`` inside the installed package -- a wheel (``pip install .``, not ``-e``) ships the embedded
  model there (``setup.py`` copies ``data/embedded`` into the wheel), so an installed package finds it from any
  working directory;
* ``data/`` of the repository checkout (a source tree or an editable install).

``DGQ_OUTPUT_DIR`` is the folder runs write into (default: ``outputs/`` of the checkout, else ``./outputs`` of the
working directory). Caches that the embedded comparison shares (:func:`cache_dir`) live in the checkout's
``data/cache`` or, for an installed package (never write into ``site-packages``), in ``<output dir>/cache``.
"""
from __future__ import annotations

import os
from pathlib import Path

__all__ = ["PACKAGE_DATA", "REPO_ROOT", "cache_dir", "data_dir", "embedded_dir", "in_checkout", "output_dir"]

#: The repository checkout this package sits in (for an editable install or a source tree on ``sys.path``).
REPO_ROOT = Path(__file__).resolve().parents[1]
#: Where a wheel puts the shipped data (absent in a checkout)
PACKAGE_DATA = Path(__file__).resolve().parent / "data"


def in_checkout() -> bool:
    """True when the package runs from a repository checkout (source tree or editable install)."""
    return (REPO_ROOT / "pyproject.toml").is_file()


def data_dir() -> Path:
    """The data folder: ``$DGQ_DATA_DIR``, else the installed package's ``data/``, else ``<repo>/data``."""
    env = os.environ.get("DGQ_DATA_DIR")
    if env:
        return Path(env).expanduser().resolve()
    if (PACKAGE_DATA / "embedded").is_dir():
        return PACKAGE_DATA
    return REPO_ROOT / "data"


def embedded_dir() -> Path:
    """The embedded model's folder (pipeline, evaluator, small CLIP): ``data_dir() / "embedded"``."""
    return data_dir() / "embedded"


def output_dir() -> Path:
    """Where runs write: ``$DGQ_OUTPUT_DIR``, else ``<repo>/outputs`` (``./outputs`` outside a checkout)."""
    env = os.environ.get("DGQ_OUTPUT_DIR")
    if env:
        return Path(env).expanduser().resolve()
    if in_checkout():
        return REPO_ROOT / "outputs"
    return Path.cwd() / "outputs"


def cache_dir() -> Path:
    """Image / feature caches shared by every embedded comparison: ``$DGQ_DATA_DIR/cache`` or the checkout's
    ``data/cache``; for an installed package ``<output dir>/cache``."""
    if os.environ.get("DGQ_DATA_DIR") or not (PACKAGE_DATA / "embedded").is_dir():
        return data_dir() / "cache"
    return output_dir() / "cache"
