"""The model context of the notebooks: which model, its family, device, prompts (embedded world or tiny word lists).

The prompts follow the model: the world's captions (:func:`dgq_utils.world.comparison.embedded_prompts`) for the
embedded model and for real checkpoints (whose BPE tokenizers spell any English), the tiny grammar
(:func:`tiny_prompts`) for the tiny random pipelines -- also when one is saved to a folder and loaded as a model
(the tiny SD 2.x / SDXL / SDXL-Turbo pipelines of :mod:`dgq_utils.testing.families`): a word-level tokenizer that
does not know the world's words but knows the grammar's gets the grammar (:func:`prompt_set_for`).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from dgq_utils.generate.images import model_fingerprint
from dgq_utils.model.loading import EMBEDDED_DIR, load_pipeline, model_family, resolve_model_path
from dgq_utils.model.tokenizer import is_word_level, unknown_words
from dgq_utils.quantize.cache import StateCache
from dgq_utils.report.folders import ROOT, WORK_ROOT, short_hash
from dgq_utils.testing.tiny import build_tiny_pipeline
from dgq_utils.world.comparison import embedded_calibration_prompts, embedded_prompts

__all__ = [
    "ModelContext",
    "open_model",
    "balanced_interleave",
    "locate_model",
    "model_family_of",
    "prompt_set_for",
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
    with ``pipeline/``, ``evaluator/``, ``clip/`` for the embedded kind. ``family``: ``"embedded"``, ``"sd1"``,
    ``"sd2"``, ``"sdxl"`` or ``"sdxl-turbo"`` (:func:`dgq_utils.model.loading.model_family`; the tiny pipeline is
    SD 1.x-like). ``prompt_set``: ``"world"`` or ``"tiny"``, the prompts drawn (:func:`prompt_set_for`).
    """

    model_id: str | None
    kind: str
    device: str
    pipe: Any
    model_key: str
    embedded_dir: Path | None = None
    work_root: Path = WORK_ROOT
    family: str = "sd1"
    prompt_set: str = "world"

    @property
    def label(self) -> str:
        return {"embedded": "embedded model", "tiny": "tiny random pipeline"}.get(self.kind, str(self.model_id))

    def prompts(self, n: int, *, seed: int = 0) -> list[str]:
        """``n`` evaluation prompts. Prompt set ``"world"``: the world's test captions (one-object, two-object and a
        quarter held-out colour-shape pairs, :func:`dgq_utils.world.comparison.embedded_prompts`), interleaved so every
        prefix is balanced. ``"tiny"``: :func:`tiny_prompts`."""
        if n < 1:
            raise ValueError(f"n must be >= 1; got {n}")
        if self.prompt_set == "tiny":
            return tiny_prompts(n, seed=seed)
        prompts, _ = embedded_prompts(n, seed=seed)
        n_held = int(round(n * 0.25))
        n_two = int(round((n - n_held) * 0.5))
        n_one = n - n_held - n_two
        return balanced_interleave([prompts[:n_one], prompts[n_one:n_one + n_two], prompts[n_one + n_two:]])

    def calibration_prompts(self, n: int, *, exclude: Sequence[str] = (), seed: int = 0) -> list[str]:
        """``n`` calibration prompts disjoint from ``exclude`` (world ``val`` captions; tiny: later grammar rows)."""
        if self.prompt_set == "tiny":
            banned = set(exclude)
            pool = tiny_prompts(min(1000, 2160), seed=seed + 1)
            out = [p for p in pool if p not in banned][:n]
            if len(out) < n:
                raise ValueError(f"not enough tiny calibration prompts disjoint from the evaluation prompts ({n})")
            return out
        return embedded_calibration_prompts(n, exclude=exclude, seed=seed)

    def work_dir(self, *parts: str) -> Path:
        """``<work_root>/<model_key>/<parts...>`` (created): caches shared by the notebooks of one model."""
        p = Path(self.work_root) / self.model_key
        for part in parts:
            p = p / part
        p.mkdir(parents=True, exist_ok=True)
        return p

    def state_cache(self) -> StateCache:
        """The calibrated-state cache shared by notebooks 04-06 of this model (``work_dir("quant_states")``):
        pass it as ``Workspace(..., states=ctx.state_cache())`` and each recipe is calibrated once."""
        return StateCache(self.work_dir("quant_states"))

    def run_dir(self, tag: str, **params) -> Path:
        """A folder for one notebook's comparison run, keyed by everything that changes its results."""
        return self.work_dir(f"{tag}-{short_hash(params)}")


def locate_model(model_id: str | os.PathLike) -> str:
    """``model_id`` as the notebooks find it: an absolute path as given; a relative path that exists in the working
    directory (a notebook's is ``notebooks/``) or the repository root made absolute there; anything else (a hub id)
    unchanged."""
    if Path(str(model_id)).expanduser().is_absolute():
        return str(model_id)
    for base in (Path.cwd(), ROOT):
        if (base / str(model_id)).exists():
            return str((base / str(model_id)).resolve())
    return str(model_id)


def _is_embedded_folder(path: Path) -> bool:
    """A pipeline folder whose parent holds the world's ``evaluator/`` and ``clip/`` (the embedded model, or a
    retrained copy of it)."""
    parent = Path(path).resolve().parent
    return (parent / "evaluator").is_dir() and (parent / "clip").is_dir()


def model_family_of(model_id: str | os.PathLike | None) -> str:
    """The family of a report ``model_id`` without loading it (``model_index.json`` and the UNet / scheduler
    configs): ``None`` and embedded-model folders -> ``"embedded"``, ``"tiny"`` -> ``"sd1"`` (the tiny random
    pipeline is SD 1.x-like), a folder or cached hub id -> :func:`dgq_utils.model.loading.model_family`. A model
    that cannot be found raises ``FileNotFoundError`` (``ModelNotAvailableOffline`` for a hub id)."""
    if model_id is None:
        return "embedded"
    if str(model_id) == "tiny":
        return "sd1"
    path = resolve_model_path(locate_model(model_id))
    return "embedded" if _is_embedded_folder(path) else model_family(path)


#: every word of the tiny grammar (:func:`tiny_prompts`), as one text to check a tokenizer against
_TINY_GRAMMAR_TEXT = " ".join(("a near the",) + TINY_ADJ + TINY_COLOURS + TINY_NOUNS + TINY_PLACES)


def prompt_set_for(pipe, kind: str) -> str:
    """Which prompts suit ``pipe`` (see the module docstring): ``"tiny"`` for the tiny kind, ``"world"`` for the
    embedded kind and for a real (BPE) tokenizer; a word-level tokenizer gets the set whose words it knows, and one
    that knows neither raises a ``ValueError`` listing the unknown words (the report would feed it character
    tokens and measure nothing meaningful)."""
    if kind == "tiny":
        return "tiny"
    tok = getattr(pipe, "tokenizer", None)
    if kind == "embedded" or tok is None or not is_word_level(tok):
        return "world"
    world = embedded_prompts(64)[0] + embedded_calibration_prompts(32)
    unknown_world = unknown_words(tok, world)
    if not unknown_world:
        return "world"
    unknown_tiny = unknown_words(tok, [_TINY_GRAMMAR_TEXT])
    if not unknown_tiny:
        return "tiny"
    raise ValueError(
        f"the model's word-level tokenizer ({tok.vocab_size} tokens) knows neither the world's captions (unknown: "
        f"{', '.join(unknown_world[:8])}) nor the tiny grammar (unknown: {', '.join(unknown_tiny[:8])}); the report "
        "has no prompts in its vocabulary. Use a model with a real CLIP tokenizer, the embedded model or 'tiny'.")


def open_model(model_id: str | os.PathLike | None = None, *, device: str = "cpu", threads: int | None = None,
               work_root: str | os.PathLike | None = None) -> ModelContext:
    """Load the report's FP pipeline.

    ``model_id``: ``None`` -- the embedded default model (``data/embedded``; raises with instructions if it is
    missing, never falls back silently); ``"tiny"`` -- the tiny random-weight pipeline (PNDM like SD, 32x32);
    anything else -- a local diffusers folder (SD 1.x / 2.x / SDXL / SDXL-Turbo) or a hub id in the local cache
    (``loading.load_pipeline``). ``threads``: ``torch.set_num_threads``. ``None``: torch's default, except on a CPU
    run on a machine with at most two cores, where it is 1 -- on small shared machines two OpenMP threads competing
    with another process were 3-10x slower than one (see ``benchmarks/README.md``); pass 2 explicitly on an idle
    two-core machine. The context's ``family`` and ``prompt_set`` follow the model (:class:`ModelContext`).
    """
    if threads is None and not str(device).startswith("cuda") and (os.cpu_count() or 1) <= 2:
        threads = 1
    if threads is not None:
        torch.set_num_threads(int(threads))
    work_root = Path(work_root) if work_root is not None else WORK_ROOT
    if model_id is not None and str(model_id) == "tiny":
        pipe = build_tiny_pipeline(seed=0, scheduler="pndm").to(device)
        return ModelContext("tiny", "tiny", device, pipe, "tiny-" + model_fingerprint(pipe).split(":")[-1][:12],
                            None, work_root, family=model_family(pipe), prompt_set="tiny")
    if model_id is not None:
        # notebooks run with cwd = notebooks/; a path given relative to the repository root is found there too
        model_id = locate_model(model_id)
    path = resolve_model_path(model_id)
    pipe = load_pipeline(model_id, device=device)
    pipe.set_progress_bar_config(disable=True)
    embedded = _is_embedded_folder(Path(path))
    kind = "embedded" if (model_id is None or embedded) else "external"
    prefix = "embedded" if model_id is None else re.sub(r"[^A-Za-z0-9]+", "-", Path(str(model_id)).name)[:40]
    key = f"{prefix}-{_folder_identity(Path(path))}"
    family = "embedded" if kind == "embedded" else model_family(pipe)
    return ModelContext(None if model_id is None else str(model_id), kind, device, pipe, key,
                        (EMBEDDED_DIR if model_id is None else Path(path).resolve().parent)
                        if kind == "embedded" else None, work_root, family=family,
                        prompt_set=prompt_set_for(pipe, kind))
