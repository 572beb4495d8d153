"""The one key function for every cache: a short SHA-256 of an object's sorted-key compact JSON.

Calibrated states (:mod:`dgq_utils.quantize.cache`), recipe hashes (:func:`dgq_utils.config.recipe_hash`), the
image cache (:func:`dgq_utils.generate.images.cache_key`) and the report's run folders all key through
:func:`stable_hash`, so one object always gives one key whichever module asks.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any

__all__ = ["stable_hash"]


def stable_hash(obj: Any, length: int = 16) -> str:
    """``length`` hex digits of the SHA-256 of ``obj`` as sorted-key, compact JSON (non-JSON values via ``str``).

    Stable across runs, processes and machines for the same (JSON-able) content; dict order does not matter.
    """
    if not 1 <= int(length) <= 64:
        raise ValueError(f"length must be between 1 and 64 hex digits, got {length}")
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:int(length)]
