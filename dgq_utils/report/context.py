"""The model context of the notebooks: which model, device, prompts (embedded world or tiny word lists).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from dgq_utils.report.folders import ROOT, WORK_ROOT, short_hash

__all__ = [
    "ModelContext",
    "open_model",
    "balanced_interleave",
    "tiny_prompts",
]


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
    return short_hash(items, 12)


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
        quarter held-out colour-shape pairs, :func:`dgq_utils.evaluate.compare.embedded_prompts`), interleaved so every
        prefix is balanced. Tiny: :func:`tiny_prompts`."""
        if n < 1:
            raise ValueError(f"n must be >= 1; got {n}")
        if self.kind == "tiny":
            return tiny_prompts(n, seed=seed)
        from dgq_utils.evaluate.compare import embedded_prompts

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
        from dgq_utils.evaluate.compare import embedded_calibration_prompts

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
        return self.work_dir(f"{tag}-{short_hash(params)}")


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
    from dgq_utils.model.loading import EMBEDDED_DIR, load_pipeline, resolve_model_path

    work_root = Path(work_root) if work_root is not None else WORK_ROOT
    if model_id is not None and str(model_id) == "tiny":
        from dgq_utils.generate.images import model_fingerprint
        from dgq_utils.testing.tiny import build_tiny_pipeline

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
