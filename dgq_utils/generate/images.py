"""Seeded, cached, resumable image generation: prompts × seeds × recipe → PNG files + a manifest.

What this module guarantees
---------------------------
* **Same inputs ⇒ same pixels (on the CPU).** Every image gets its own initial latents, drawn from a
  ``torch.Generator`` seeded by :func:`image_seed` ``(prompt_index, seed)`` and passed to the pipeline as
  ``latents=``; samplers that add noise during sampling get a per-image generator too. So an image never depends
  on which other images shared its batch. One subtlety: on the CPU, PyTorch's kernels are not bit-identical
  across *batch sizes* (a batch of 1 can differ from a batch of 4 by ~2e-6, i.e. occasionally one 8-bit level),
  although they are bit-identical across batch *composition* and position. The runner therefore always runs
  full batches, padding the last one by repeating its first item, and the batch size is part of the cache key.
  (Recipes whose statistics are taken over the whole batch — the official code's "batch" softmax scale — are
  batch-dependent by definition; the runner cannot and does not hide that.)
* **Nothing half-written.** Images and manifest pieces are written with :mod:`dgq_utils.atomic` (temporary
  file in the same folder + ``os.replace``).
* **Resume.** Re-running with the same arguments skips every image that has a manifest record *and* a file whose
  SHA-256 matches it; a missing, truncated or corrupt file (or a record-less file left by a kill between the
  image write and the manifest write) is regenerated. Generation order is deterministic, so a resumed run ends
  with exactly the files and manifest a clean run produces.
* **Cache.** Each (model, sampler settings, recipe hash) gets its own folder under ``cache_root``:
  ``<recipe-name>-<key>/`` with ``meta.json``, ``images/`` and ``manifest.jsonl``. FP images are therefore
  generated once and reused by every comparison that shares the cache root. Inside a folder an image is keyed
  by (prompt index, prompt text, seed), so two prompt lists can share a folder without clashing.

Manifest (JSON lines, one record per image; also returned as a pandas DataFrame): ``recipe_name``,
``recipe_hash``, ``model_id``, ``sampler``, ``steps``, ``guidance``, ``height``, ``width``, ``eta``,
``negative_prompt``, ``batch_size``, ``prompt_index``, ``prompt``, ``seed``, ``image_seed``, ``file``
(relative to the cache folder), ``sha256``, ``bytes``.

While a run is in progress, each finished batch's records go to ``manifest.parts/<n>-<pid>.jsonl`` (one atomic
file per batch — appending to one big file would not be atomic, and rewriting it per batch is quadratic for 30k
images); at the end they are merged into ``manifest.jsonl`` (atomically) and the parts are removed. A reader
always merges both, so any kill point leaves a consistent state.

**Several processes may share a cache folder** (generation sharded over ranks, :mod:`dgq_utils.generate.
sharding`): part files carry the writer's pid so two writers never pick the same name, and merging the parts
(``consolidate``, exclusive) and reading them (shared) hold an ``fcntl`` lock on ``<folder>/.lock``, so a
merge never drops a part another process wrote meanwhile. (Locks and pids are per machine: share a cache folder
between processes of one host, as ``accelerate launch`` on one node does.)

**Device and dtype are part of the cache key**: CPU- and GPU-made images, or float32 and float16 ones, never mix.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import pandas as pd
import torch
from filelock import FileLock

from dgq_utils.atomic import (
    atomic_save_image,
    atomic_write_json,
    atomic_write_text,
    clean_stale_temp_files,
)
from dgq_utils import config
from dgq_utils.config import SamplerSettings
from dgq_utils.keys import stable_hash
from dgq_utils.model.identity import (  # noqa: F401  (public here too: the image cache's identities)
    folder_fingerprint,
    model_fingerprint,
    model_identity,
    runtime_identity,
)
from dgq_utils.config.validation import check_instance, check_prompts, check_seeds
from dgq_utils.model.tokenizer import warn_unknown_words

VERIFY_MODES = ("sha", "size", "decode")
MANIFEST_COLUMNS = [
    "recipe_name", "recipe_hash", "model_id", "sampler", "steps", "guidance", "height", "width", "eta",
    "negative_prompt", "batch_size", "prompt_index", "prompt", "seed", "image_seed", "file", "sha256", "bytes",
]


# --------------------------------------------------------------------------------------------------------------
# identities: seeds, recipes, models, settings
# --------------------------------------------------------------------------------------------------------------
def image_seed(prompt_index: int, seed: int) -> int:
    """The generator seed of the image for (prompt index, user seed): 63 bits of SHA-256 of ``"index:seed"``.

    Deterministic, independent of batching and of the other prompts, and distinct for every (index, seed) pair
    in practice, so ``seeds=[0]`` still gives every prompt its own noise.
    """
    digest = hashlib.sha256(f"{int(prompt_index)}:{int(seed)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & ((1 << 63) - 1)


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def prompt_key(prompt: str) -> str:
    """Eight hex digits of the prompt's SHA-256 (used in file names)."""
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:8]


def describe_recipe(recipe: Any) -> tuple[str, str, dict]:
    """``(name, hash, dict)`` for a recipe given as a ``QuantRecipe``, a preset name, ``None`` (FP) or a dict.

    Uses :func:`dgq_utils.config.recipe_hash` / ``get_preset`` (the core engine's config); a plain dict is
    hashed the same way (sorted-key JSON), so the key is stable whichever form the caller uses.
    """
    if recipe is None:
        recipe = "fp"
    if isinstance(recipe, str):
        recipe = config.get_preset(recipe)
    if isinstance(recipe, config.QuantRecipe):
        return recipe.name, config.recipe_hash(recipe), recipe.to_dict()
    if isinstance(recipe, dict):
        d = dict(recipe)
        name = str(d.get("name", "custom"))
        return name, stable_hash(d, 12), d
    raise TypeError(f"recipe must be a QuantRecipe, a preset name, a dict or None; got {type(recipe).__name__}")


def _scheduler_identity(pipe) -> dict:
    cfg = {k: v for k, v in dict(pipe.scheduler.config).items() if not k.startswith("_")}
    return {"class": type(pipe.scheduler).__name__, "config": cfg}


def cache_key(model_id: str, settings: SamplerSettings, recipe_hash: str, scheduler: dict | None = None,
              runtime: dict | None = None, calibration: str | None = None) -> str:
    """16 hex digits identifying (model, sampler settings, scheduler, recipe hash, device and dtype) and, for a
    quantized recipe, ``calibration``: the identity of its calibrated state (the same recipe calibrated on other
    prompts makes other images). ``None`` (FP, or a caller that does not know it) leaves it out of the key."""
    parts = {"model": model_id, "settings": asdict(settings), "scheduler": scheduler or {},
             "recipe": recipe_hash, "runtime": runtime or {}}
    if calibration is not None:
        parts["calibration"] = str(calibration)
    return stable_hash(parts, 16)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:60] or "recipe"


# --------------------------------------------------------------------------------------------------------------
# the cache folder
# --------------------------------------------------------------------------------------------------------------
class ImageCache:
    """One cache folder: ``meta.json``, ``images/``, ``manifest.jsonl`` and ``manifest.parts/``."""

    def __init__(self, folder: str | os.PathLike, meta: dict | None = None):
        self.folder = Path(folder)
        self.images = self.folder / "images"
        self.parts = self.folder / "manifest.parts"
        self.manifest_path = self.folder / "manifest.jsonl"
        self.locks = self.folder / ".locks"  # one lock file per batch being made (see generate_images)
        self.images.mkdir(parents=True, exist_ok=True)
        self.parts.mkdir(exist_ok=True)
        self.locks.mkdir(exist_ok=True)
        for d in (self.folder, self.images, self.parts):
            clean_stale_temp_files(d)
        meta_path = self.folder / "meta.json"
        if meta is not None:
            if meta_path.exists():
                try:
                    old = json.loads(meta_path.read_text())
                except (json.JSONDecodeError, UnicodeDecodeError):
                    old = None
                if old is not None and old.get("key") != meta.get("key"):
                    raise RuntimeError(f"cache folder {self.folder} belongs to key {old.get('key')}, "
                                       f"not {meta.get('key')}; use another cache_root")
            atomic_write_json(meta_path, meta)
        self.meta = meta if meta is not None else (
            json.loads(meta_path.read_text()) if meta_path.exists() else {})

    # records ------------------------------------------------------------------------------------------------
    @staticmethod
    def record_key(rec: dict) -> tuple:
        return (int(rec["prompt_index"]), prompt_key(rec["prompt"]), int(rec["seed"]))

    def _read_jsonl(self, path: Path) -> list[dict]:
        out = []
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            return out
        for line in text.splitlines():
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
                self.record_key(rec)
                out.append(rec)
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                continue  # a damaged line: its image will be regenerated
        return out

    @contextlib.contextmanager
    def _locked(self, exclusive: bool):
        """An ``fcntl`` lock on ``<folder>/.lock`` (shared for readers, exclusive for the merge); a no-op where
        ``fcntl`` does not exist."""
        try:
            import fcntl
        except ImportError:  # not POSIX: single-process use only
            yield
            return
        with open(self.folder / ".lock", "a+") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    def _records(self, parts: list[Path]) -> dict[tuple, dict]:
        recs: dict[tuple, dict] = {}
        sources = ([self.manifest_path] if self.manifest_path.exists() else []) + parts
        for src in sources:
            for rec in self._read_jsonl(src):
                recs[self.record_key(rec)] = rec
        return recs

    def records(self) -> dict[tuple, dict]:
        """All records (consolidated manifest + parts), last one wins per image key."""
        with self._locked(exclusive=False):
            return self._records(sorted(self.parts.glob("*.jsonl")))

    def is_valid(self, rec: dict, verify: str = "sha") -> bool:
        """Whether ``rec``'s file exists and matches it (``sha``: SHA-256; ``size``: byte count only;
        ``decode``: SHA-256 and PIL can decode it)."""
        if verify not in VERIFY_MODES:
            raise ValueError(f"unknown verify mode {verify!r}; valid: {', '.join(VERIFY_MODES)}")
        path = self.folder / rec.get("file", "")
        if not path.is_file():
            return False
        if verify == "size":
            return path.stat().st_size == int(rec.get("bytes", -1))
        if sha256_file(path) != rec.get("sha256"):
            return False
        if verify == "decode":
            from PIL import Image

            try:
                with Image.open(path) as im:
                    im.load()
            except Exception:
                return False
        return True

    def write_part(self, records: list[dict]) -> None:
        """One batch's records as a new part file (``<n>-<pid>.jsonl``: unique even with concurrent writers)."""
        stems = [p.stem.split("-", 1)[0] for p in self.parts.glob("*.jsonl")]
        n = max((int(s) for s in stems if s.isdigit()), default=-1) + 1
        atomic_write_text(self.parts / f"{n:08d}-{os.getpid()}.jsonl",
                          "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))

    def consolidate(self) -> None:
        """Merge parts into ``manifest.jsonl`` (sorted, one line per image), atomically; then drop the parts that
        were merged (a part written meanwhile by another process stays for the next merge)."""
        with self._locked(exclusive=True):
            parts = sorted(self.parts.glob("*.jsonl"))
            recs = self._records(parts)
            lines = [json.dumps(recs[k], sort_keys=True) + "\n" for k in sorted(recs)]
            atomic_write_text(self.manifest_path, "".join(lines))
            for p in parts:
                p.unlink(missing_ok=True)

    def manifest(self) -> pd.DataFrame:
        recs = self.records()
        df = pd.DataFrame([recs[k] for k in sorted(recs)], columns=MANIFEST_COLUMNS)
        return df


@dataclass
class GenerationResult:
    """What :func:`generate_images` returns: the manifest rows of the *requested* images, in request order."""

    folder: Path
    manifest: pd.DataFrame
    generated: int = 0
    reused: int = 0
    repaired: int = 0
    meta: dict = field(default_factory=dict)

    @property
    def paths(self) -> list[Path]:
        return [self.folder / f for f in self.manifest["file"]]

    def __len__(self) -> int:
        return len(self.manifest)


def open_cache(pipe, cache_root: str | os.PathLike, *, recipe: Any = None, model_id: str | None = None,
               settings: SamplerSettings | None = None, calibration: str | None = None) -> ImageCache:
    """The cache folder for (model, settings, recipe, calibrated state) under ``cache_root`` (created if needed);
    ``calibration``: see :func:`cache_key`."""
    settings = (settings or SamplerSettings()).resolved(pipe)
    name, rhash, rdict = describe_recipe(recipe)
    mid = model_identity(pipe, model_id)
    sched = _scheduler_identity(pipe)
    runtime = runtime_identity(pipe)
    key = cache_key(mid, settings, rhash, sched, runtime, calibration)
    meta = {"key": key, "model_id": mid, "recipe_name": name, "recipe_hash": rhash, "recipe": rdict,
            "settings": asdict(settings), "scheduler": sched, "runtime": runtime}
    if calibration is not None:
        meta["calibration"] = str(calibration)
    return ImageCache(Path(cache_root) / f"{_safe(name)}-{key}", meta)


@torch.no_grad()
def generate_images(
    pipe,
    prompts: Sequence[str],
    seeds: Iterable[int] | int,
    cache_root: str | os.PathLike,
    *,
    recipe: Any = None,
    model_id: str | None = None,
    settings: SamplerSettings | None = None,
    progress: bool = True,
    verify: str = "sha",
    on_image: Callable[[dict], None] | None = None,
    prompt_indices: Sequence[int] | None = None,
    require_cached: bool = False,
    calibration: str | None = None,
) -> GenerationResult:
    """Generate (or reuse) one image per (prompt, seed) with ``pipe`` and return the manifest.

    Args:
        pipe: a diffusers text-to-image pipeline, already quantized for ``recipe`` (this function only generates;
            ``recipe`` is the label that goes into the cache key and manifest).
        prompts: the prompts; image ``(i, seed)`` uses prompt ``i`` (``prompt_indices[i]`` if given — use that
            when ``prompts`` is a slice of a larger list, so indices and therefore noise stay those of the full list).
        seeds: user seeds; each (prompt index, seed) pair gets its own generator, see :func:`image_seed`.
        cache_root: folder holding one sub-folder per (model, settings, recipe).
        recipe: ``QuantRecipe``, preset name or ``None`` for FP.
        model_id: model identity for the cache key (default: the pipeline's path, else a weight fingerprint —
            pass it explicitly for quantized pipelines, whose weights may have been changed in place).
        settings: :class:`SamplerSettings` (steps, guidance, size, batch size, format).
        progress: show a tqdm bar over images.
        verify: how existing files are checked before reuse (``"sha"`` default, ``"size"``, ``"decode"``).
        on_image: called with each new record right after its image file is written (tests use it to simulate
            a kill; a progress hook can use it too).
        prompt_indices: see ``prompts``.
        require_cached: raise instead of generating if any image is missing (used to reuse a finished recipe
            without quantizing a pipeline for it).
        calibration: identity of the calibrated state ``pipe`` was quantized with (part of the cache key, see
            :func:`cache_key`); :func:`dgq_utils.evaluate.compare.run_comparison` passes the state file's name.
    """
    from tqdm.auto import tqdm

    if verify not in VERIFY_MODES:
        raise ValueError(f"unknown verify mode {verify!r}; valid: {', '.join(VERIFY_MODES)}")
    prompts = check_prompts(prompts)
    warn_unknown_words(pipe, prompts)
    cache, settings, keys, todo, reused, repaired = _plan(pipe, prompts, seeds, cache_root, recipe, model_id,
                                                          settings, verify, prompt_indices, calibration)
    if todo and require_cached:
        raise RuntimeError(f"{len(todo)} image(s) of {cache.meta['recipe_name']} are not in the cache {cache.folder}")
    meta = cache.meta
    ext = settings.image_format
    wanted_n = len(keys)
    sched = meta["scheduler"]["class"]
    base = {"recipe_name": meta["recipe_name"], "recipe_hash": meta["recipe_hash"], "model_id": meta["model_id"],
            "sampler": sched, "steps": settings.num_inference_steps, "guidance": settings.guidance_scale,
            "height": settings.height, "width": settings.width, "eta": settings.eta,
            "negative_prompt": settings.negative_prompt, "batch_size": settings.batch_size}
    bs = settings.batch_size
    generated = 0
    bar = tqdm(total=wanted_n, initial=wanted_n - len(todo), disable=not progress, unit="img",
               desc=f"generate {meta['recipe_name']}")
    try:
        for batch in _aligned_batches(keys, todo, bs):
            # another process sharing the cache (a notebook run beside this one, a sharded rank) may be making
            # the same batch: one makes it, the other waits and then finds the images cached
            with FileLock(str(cache.locks / f"batch-{prompt_key(repr(batch[0]))}.lock")):
                n_planned = len(batch)
                batch = _still_missing(cache, batch, verify, ext)
                bar.update(n_planned - len(batch))
                reused += n_planned - len(batch)
                if not batch:
                    continue
                images = _run_batch(pipe, batch, settings)
                records = []
                for (idx, prompt, seed), img in zip(batch, images):
                    rel = f"images/{_file_name(idx, prompt, seed, ext)}"
                    data = atomic_save_image(img, cache.folder / rel)
                    rec = {**base, "prompt_index": idx, "prompt": prompt, "seed": seed,
                           "image_seed": image_seed(idx, seed), "file": rel, "sha256": _sha256_bytes(data),
                           "bytes": len(data)}
                    records.append(rec)
                    generated += 1
                    bar.update(1)
                    if on_image is not None:
                        on_image(rec)
                cache.write_part(records)
    finally:
        bar.close()
    cache.consolidate()
    recs = cache.records()
    manifest = pd.DataFrame([recs[k] for k in keys], columns=MANIFEST_COLUMNS)
    return GenerationResult(cache.folder, manifest, generated, reused, repaired, meta)


def _aligned_batches(keys: list[tuple], todo: list[tuple], bs: int) -> list[list[tuple]]:
    """The missing items grouped by their position in the requested list: batch ``b`` holds the missing ones of
    requested items ``b*bs .. b*bs+bs-1``. A batch is then the same whichever prefix of the list was generated
    before, so processes sharing the cache agree on it (and can lock it)."""
    pos = {key: i for i, key in enumerate(keys)}
    groups: dict[int, list[tuple]] = {}
    for item in todo:
        idx, prompt, seed = item
        groups.setdefault(pos[(idx, prompt_key(prompt), seed)] // bs, []).append(item)
    return [groups[b] for b in sorted(groups)]


def _still_missing(cache: "ImageCache", batch: list[tuple], verify: str, ext: str) -> list[tuple]:
    """``batch`` minus the items made meanwhile by another process (their image file exists and its record is
    valid); the records are re-read only when some image file appeared."""
    if not any((cache.images / _file_name(*item, ext)).exists() for item in batch):
        return batch
    recs = cache.records()
    out = []
    for idx, prompt, seed in batch:
        rec = recs.get((idx, prompt_key(prompt), seed))
        if rec is None or not cache.is_valid(rec, verify):
            out.append((idx, prompt, seed))
    return out


def _plan(pipe, prompts, seeds, cache_root, recipe, model_id, settings, verify, prompt_indices, calibration=None):
    prompts = check_prompts(prompts)
    seeds = check_seeds(seeds)
    check_instance(settings, "settings", SamplerSettings, allow_none=True, fix="pass SamplerSettings(...).")
    indices = list(range(len(prompts))) if prompt_indices is None else [int(i) for i in prompt_indices]
    if len(indices) != len(prompts):
        raise ValueError(f"prompt_indices has {len(indices)} entries for {len(prompts)} prompts")
    settings = (settings or SamplerSettings()).resolved(pipe)
    cache = open_cache(pipe, cache_root, recipe=recipe, model_id=model_id, settings=settings,
                       calibration=calibration)
    wanted = [(idx, p, s) for idx, p in zip(indices, prompts) for s in seeds]
    keys = [(idx, prompt_key(p), s) for idx, p, s in wanted]
    if len(set(keys)) != len(keys):
        raise ValueError("duplicate (prompt index, prompt, seed) items requested")
    existing = cache.records()
    todo, reused, repaired = [], 0, 0
    for item, key in zip(wanted, keys):
        rec = existing.get(key)
        if rec is not None and cache.is_valid(rec, verify):
            reused += 1
        else:
            repaired += rec is not None or (cache.folder / "images" / _file_name(*item, settings.image_format)).exists()
            todo.append(item)
    return cache, settings, keys, todo, reused, int(repaired)


def count_missing(pipe, prompts, seeds, cache_root, *, recipe=None, model_id=None, settings=None, verify="sha",
                  prompt_indices=None, calibration=None) -> int:
    """How many of the requested images :func:`generate_images` would have to (re)generate."""
    return len(_plan(pipe, prompts, seeds, cache_root, recipe, model_id, settings, verify, prompt_indices,
                     calibration)[3])


def _file_name(idx: int, prompt: str, seed: int, ext: str) -> str:
    return f"p{int(idx):06d}-{prompt_key(prompt)}-s{int(seed)}.{ext}"


def initial_latents(pipe, idx: int, seed: int, settings: SamplerSettings) -> torch.Tensor:
    """The (1, C, h, w) float32 CPU initial noise of image (idx, seed) — the pipeline scales it by
    ``init_noise_sigma`` itself."""
    g = torch.Generator("cpu").manual_seed(image_seed(idx, seed))
    shape = (1, int(pipe.unet.config.in_channels), settings.height // int(pipe.vae_scale_factor),
             settings.width // int(pipe.vae_scale_factor))
    return torch.randn(shape, generator=g, dtype=torch.float32)


def batch_call_kwargs(pipe, batch, settings: SamplerSettings, *, output_type: str = "pil") -> dict:
    """The pipeline call of one cached batch: ``batch`` is a list of ``(prompt index, prompt, seed)``, padded to
    ``settings.batch_size`` by repeating its first item. Each item gets the initial noise of :func:`initial_latents`
    and a step-noise generator of its own (for ancestral / DDPM-like samplers and ``eta > 0``), so an image does not
    depend on its batch. ``settings`` must be resolved (height and width set). Returns the keyword arguments of
    ``pipe(**kwargs)``."""
    padded = list(batch) + [batch[0]] * (settings.batch_size - len(batch))
    device = pipe.unet.device if hasattr(pipe, "unet") else pipe.device
    dtype = pipe.unet.dtype
    latents = torch.cat([initial_latents(pipe, i, s, settings) for i, _, s in padded]).to(device, dtype)
    # step noise: one generator per image, offset from the latent seed
    gens = [torch.Generator("cpu").manual_seed((image_seed(i, s) + 1) & ((1 << 63) - 1)) for i, _, s in padded]
    kwargs = dict(
        prompt=[p for _, p, _ in padded],
        height=settings.height,
        width=settings.width,
        num_inference_steps=settings.num_inference_steps,
        guidance_scale=settings.guidance_scale,
        latents=latents,
        generator=gens,
        output_type=output_type,
    )
    if settings.negative_prompt is not None:
        kwargs["negative_prompt"] = [settings.negative_prompt] * len(padded)
    if settings.eta:
        kwargs["eta"] = settings.eta
    return kwargs


def _run_batch(pipe, batch, settings: SamplerSettings):
    """Run one full batch (:func:`batch_call_kwargs`) and return PIL images of the real items."""
    kwargs = batch_call_kwargs(pipe, batch, settings)
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    out = pipe(**kwargs)
    images = out.images if hasattr(out, "images") else out[0]
    return images[:len(batch)]


def load_manifest(folder: str | os.PathLike) -> pd.DataFrame:
    """The manifest of a cache folder (consolidated file + any parts) as a DataFrame."""
    return ImageCache(folder).manifest()
