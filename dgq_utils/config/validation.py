"""Argument checks for the public entry points, in one message style.

Every check takes the value and the argument's name and returns the normalised value, or raises
:class:`InvalidArgumentError` with a message of the form::

    prompts: got a single str ('a small red circle'); allowed: a list of strings; wrap it: ['a small red circle'].

-- the argument, what was given, what is allowed, what to do. The entry points (``quantize_pipeline``,
``calibrate``, ``collect_activation_stats``, ``generate_images``, ``SamplerSettings``, ``run_comparison``,
``run_paper_protocol``, the report chain) call these before any work starts, so a wrong input never produces a
result and never fails half-way with an unrelated error.

:class:`InvalidArgumentError` is both a ``ValueError`` and a ``TypeError``: a wrong type and a wrong value are
the same mistake to a caller ("this argument is wrong"), and code written against either built-in keeps working.
This module is at the bottom of the package (it imports nothing from ``dgq_utils``).
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Iterable, Sequence

__all__ = [
    "InvalidArgumentError",
    "fail",
    "check_prompts",
    "check_seed",
    "check_seeds",
    "check_count",
    "check_steps",
    "check_batch_size",
    "check_size",
    "check_number",
    "check_sampling",
    "check_comparison_numbers",
    "check_protocol_numbers",
    "check_recipes",
    "check_choice",
    "check_instance",
    "check_device",
    "check_dtype",
]


class InvalidArgumentError(ValueError, TypeError):
    """An argument of a public entry point is wrong; the message names it, says what was given, what is allowed
    and what to do."""


def _show(value: Any, limit: int = 60) -> str:
    text = repr(value)
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(value).__name__} ({text})" if value is not None else "None"


def fail(name: str, given: Any, allowed: str, fix: str = "") -> InvalidArgumentError:
    """The error for argument ``name`` (raise it): ``name: got ...; allowed: ...; fix``."""
    msg = f"{name}: got {_show(given)}; allowed: {allowed}"
    return InvalidArgumentError(msg + (f"; {fix}" if fix else "."))


# ----------------------------------------------------------------------------------------------------------
# prompts and seeds
# ----------------------------------------------------------------------------------------------------------
def check_prompts(prompts: Any, name: str = "prompts", *, allow_empty: bool = False) -> list[str]:
    """A list of strings (any iterable of ``str`` is accepted; a single string, ``None``, non-strings or an empty
    list -- unless ``allow_empty`` -- are refused: iterating a string would silently give one-character prompts)."""
    allowed = "a list of strings (prompts)"
    if isinstance(prompts, str):
        short = prompts if len(prompts) <= 40 else prompts[:37] + "..."
        raise fail(name, prompts, allowed, f"pass a list, not a single string (iterating it would give "
                   f"one-character prompts); wrap it: [{short!r}].")
    if prompts is None:
        raise fail(name, prompts, allowed, "pass a list such as ['a red circle'].")
    if isinstance(prompts, (bytes, dict)) or not isinstance(prompts, Iterable):
        raise fail(name, prompts, allowed, "pass a list such as ['a red circle'].")
    out = list(prompts)
    bad = [i for i, p in enumerate(out) if not isinstance(p, str)]
    if bad:
        i = bad[0]
        raise fail(name, out, allowed, f"item {i} is {_show(out[i])}"
                   + (f" (and {len(bad) - 1} more non-strings)" if len(bad) > 1 else "") + "; give only strings.")
    if not out and not allow_empty:
        raise fail(name, out, "a non-empty list of strings", "the prompt list is empty: give at least one prompt.")
    return out


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def check_seed(seed: Any, name: str = "seed") -> int:
    """One integer seed >= 0 (``bool`` and floats refused)."""
    if not _is_int(seed) or int(seed) < 0:
        raise fail(name, seed, "an integer >= 0", "pass a seed such as 0.")
    return int(seed)


def check_seeds(seeds: Any, name: str = "seeds", *, unique: bool = True) -> list[int]:
    """A non-empty list of distinct integer seeds >= 0 (a single int is accepted as ``[seed]``)."""
    allowed = "a non-empty list of distinct integers >= 0 (or one integer)"
    if _is_int(seeds):
        seeds = [seeds]
    if seeds is None or isinstance(seeds, (str, bytes)) or not isinstance(seeds, Iterable):
        raise fail(name, seeds, allowed, "pass e.g. [0] or [0, 1, 2].")
    out = list(seeds)
    bad = [s for s in out if not _is_int(s) or int(s) < 0]
    if bad:
        raise fail(name, out, allowed, f"{_show(bad[0])} is not an integer >= 0.")
    if not out:
        raise fail(name, out, allowed, "the seed list is empty: give at least one seed.")
    out = [int(s) for s in out]
    if unique and len(set(out)) != len(out):
        dup = sorted({s for s in out if out.count(s) > 1})
        raise fail(name, out, allowed, f"duplicate seeds {dup}; each seed gives one image per prompt, list it once.")
    return out


# ----------------------------------------------------------------------------------------------------------
# counts and sizes
# ----------------------------------------------------------------------------------------------------------
def check_count(value: Any, name: str, minimum: int = 1, maximum: int | None = None, fix: str = "") -> int:
    """An integer in ``[minimum, maximum]`` (integral floats such as ``8.0`` are accepted; ``bool``, strings and
    fractional numbers are refused)."""
    allowed = f"an integer >= {minimum}" + (f" and <= {maximum}" if maximum is not None else "")
    ok = _is_int(value) or (isinstance(value, float) and value.is_integer())
    if not ok or int(value) < minimum or (maximum is not None and int(value) > maximum):
        raise fail(name, value, allowed, fix)
    return int(value)


def check_steps(value: Any, name: str = "num_inference_steps") -> int:
    """Sampling steps: an integer >= 1."""
    return check_count(value, name, 1, fix="e.g. 25 (calibrate and generate with the same number).")


def check_batch_size(value: Any, name: str = "batch_size") -> int:
    """Prompts per pipeline call: an integer >= 1."""
    return check_count(value, name, 1, fix="e.g. 4 (larger is faster but needs more memory).")


def check_size(value: Any, name: str, multiple: int = 8, *, allow_none: bool = True) -> int | None:
    """An image side in pixels: ``None`` (the pipeline's default) or a positive multiple of ``multiple``."""
    if value is None and allow_none:
        return None
    allowed = f"a positive multiple of {multiple}" + (" or None (the model's default size)" if allow_none else "")
    ok = _is_int(value) or (isinstance(value, float) and value.is_integer())
    if not ok or int(value) <= 0 or int(value) % multiple:
        raise fail(name, value, allowed, "the VAE works on blocks of 8 pixels.")
    return int(value)


def check_number(value: Any, name: str, *, minimum: float | None = None, maximum: float | None = None,
                 fix: str = "") -> float:
    """A finite real number in ``[minimum, maximum]``."""
    parts = ["a finite number"]
    if minimum is not None:
        parts.append(f">= {minimum}")
    if maximum is not None:
        parts.append(f"<= {maximum}")
    allowed = " ".join(parts)
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(float(value)):
        raise fail(name, value, allowed, fix)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise fail(name, value, allowed, fix)
    return float(value)


def check_instance(value: Any, name: str, cls: type | tuple, *, allow_none: bool = False, fix: str = "") -> Any:
    """An instance of ``cls`` (or ``None`` if ``allow_none``)."""
    if value is None and allow_none:
        return None
    if not isinstance(value, cls):
        names = " or ".join(c.__name__ for c in (cls if isinstance(cls, tuple) else (cls,)))
        raise fail(name, value, f"a {names}" + (" or None" if allow_none else ""), fix)
    return value


def check_choice(value: Any, name: str, choices: Sequence[Any]) -> Any:
    """One of ``choices``."""
    if value not in choices:
        raise fail(name, value, "one of " + ", ".join(repr(c) for c in choices))
    return value


def check_sampling(*, num_inference_steps: Any = 25, guidance_scale: Any = 7.5, seed: Any = 0,
                   batch_size: Any = 1, height: Any = None, width: Any = None) -> None:
    """The sampler arguments of the calibration / statistics entry points, each checked under its own name."""
    check_steps(num_inference_steps)
    check_number(guidance_scale, "guidance_scale", fix="e.g. 7.5 (1 = no classifier-free guidance).")
    check_seed(seed)
    check_batch_size(batch_size)
    check_size(height, "height")
    check_size(width, "width")


def check_comparison_numbers(*, n_boot: Any = 1000, n_boot_set: Any = 100, seed: Any = 0, ci_level: Any = 0.95,
                             device: Any = "cpu") -> None:
    """The evaluation arguments of ``run_comparison`` / ``run_paper_protocol``, each under its own name."""
    check_count(n_boot, "n_boot", 1, fix="bootstrap replicates, e.g. 1000.")
    check_count(n_boot_set, "n_boot_set", 1, fix="bootstrap replicates for FID/KID/IS, e.g. 100.")
    check_seed(seed)
    check_number(ci_level, "ci_level", minimum=0.5, maximum=0.999, fix="e.g. 0.95.")
    check_device(device)


def check_protocol_numbers(*, n_images: Any, n_clip: Any, resize: Any, n_calibration: Any,
                           recipes: Any = ()) -> None:
    """The counts of ``run_paper_protocol`` (and its recipe list: a list, not one preset string)."""
    check_count(n_images, "n_images", 1, fix="the paper uses 30000.")
    check_count(n_clip, "n_clip", 1, fix="the paper uses 3000.")
    check_count(resize, "resize", 1, fix="the paper uses 256.")
    check_count(n_calibration, "n_calibration", 1, fix="the paper uses 256 calibration captions.")
    check_recipes(recipes)


def check_recipes(recipes: Any, name: str = "recipes") -> list:
    """A list of recipes (preset names or recipe objects); a single preset string is refused (it would be
    iterated character by character)."""
    if isinstance(recipes, str):
        raise fail(name, recipes, "a list of preset names or QuantRecipes", f"wrap it: [{recipes!r}].")
    if recipes is None or not isinstance(recipes, Iterable):
        raise fail(name, recipes, "a list of preset names or QuantRecipes", "e.g. ['dgq-w8a8'].")
    return list(recipes)


# ----------------------------------------------------------------------------------------------------------
# devices and dtypes
# ----------------------------------------------------------------------------------------------------------
def check_device(device: Any, name: str = "device"):
    """A ``torch.device`` that exists on this machine (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``, ...)."""
    import torch

    allowed = "a torch device available here, e.g. 'cpu' or 'cuda'"
    try:
        dev = device if isinstance(device, torch.device) else torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise fail(name, device, allowed) from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise fail(name, device, "'cpu' (this machine has no usable CUDA device)", "pass device='cpu'.")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise fail(name, device, f"cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    elif dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise fail(name, device, "'cpu' (MPS is not available here)", "pass device='cpu'.")
    return dev


_DTYPE_NAMES = {"float32": "float32", "fp32": "float32", "float": "float32", "float16": "float16",
                "fp16": "float16", "half": "float16", "bfloat16": "bfloat16", "bf16": "bfloat16",
                "float64": "float64", "fp64": "float64", "double": "float64"}


def check_dtype(dtype: Any, name: str = "dtype", *, floating: bool = True):
    """A ``torch.dtype`` (or its name: ``"float32"``, ``"fp16"``, ``"bfloat16"``, ...); floating point unless
    ``floating=False``."""
    import torch

    allowed = "a floating-point torch dtype: torch.float32, torch.float16, torch.bfloat16 (or their names)"
    if isinstance(dtype, str) and dtype.lower().removeprefix("torch.") in _DTYPE_NAMES:
        dtype = getattr(torch, _DTYPE_NAMES[dtype.lower().removeprefix("torch.")])
    if not isinstance(dtype, torch.dtype) or (floating and not dtype.is_floating_point):
        raise fail(name, dtype, allowed)
    return dtype
