"""Where the time goes: named stages timed into a JSON-lines log, read back as a table.

The report chain (:mod:`dgq_utils.report.chain`) sets :data:`LOG_ENV` to a file and :data:`NOTEBOOK_ENV` to
the notebook's name before each notebook runs; every :func:`stage` entered in that process (the notebook's
kernel inherits the environment) then appends one line when it ends::

    {"notebook": "05_evaluation.ipynb", "stage": "generate", "seconds": 41.2, "info": {"recipe": "dgq-w8a6"},
     "depth": 0, "pid": 123, "end": 1733200000.1}

Stages nest (``depth`` counts the enclosing stages of the same process, so ``calibrate`` > ``kmeans`` can be
summed without counting twice: :func:`summarise` adds depth 0 only unless asked). Without :data:`LOG_ENV` a
stage costs one ``perf_counter`` call and writes nothing. Each line is written with one ``write`` call in append
mode, so lines of concurrent processes do not interleave.

Written here rather than taken from a profiler: the question is "which stage of which notebook", across the
processes papermill starts, and at no cost when nobody asks; cProfile/torch.profiler answer "which function".
"""
from __future__ import annotations

import functools
import json
import os
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

__all__ = ["LOG_ENV", "NOTEBOOK_ENV", "read_log", "stage", "summarise", "timed_stage"]

#: environment variable naming the JSON-lines file stages are appended to (unset: nothing is written)
LOG_ENV = "DGQ_TIMING_LOG"
#: environment variable naming the notebook (or job) the stages belong to
NOTEBOOK_ENV = "DGQ_TIMING_NOTEBOOK"

_depth = threading.local()


@contextmanager
def stage(name: str, **info: Any) -> Iterator[dict]:
    """Time the block as stage ``name``; ``info`` (JSON-able values: recipe, counts) goes into its log line.
    The yielded dict can be updated inside the block (e.g. with a count known only at the end)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"stage name must be a non-empty string, got {name!r}")
    depth = getattr(_depth, "value", 0)
    _depth.value = depth + 1
    extra = dict(info)
    start = time.perf_counter()
    try:
        yield extra
    finally:
        seconds = time.perf_counter() - start
        _depth.value = depth
        path = os.environ.get(LOG_ENV)
        if path:
            line = {"notebook": os.environ.get(NOTEBOOK_ENV, ""), "stage": name, "seconds": round(seconds, 4),
                    "info": {k: _jsonable(v) for k, v in extra.items()}, "depth": depth, "pid": os.getpid(),
                    "end": round(time.time(), 3)}
            with open(path, "a", encoding="utf-8") as f:
                f.write(json.dumps(line) + "\n")


def _jsonable(v: Any) -> Any:
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return str(v)


def timed_stage(name: str):
    """Decorator form of :func:`stage` (no info)."""
    def wrap(fn):
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            with stage(name):
                return fn(*args, **kwargs)
        return inner
    return wrap


def read_log(path: str | os.PathLike):
    """The log as a pandas DataFrame (columns notebook, stage, seconds, depth, pid, end, and one per info key);
    empty (with those columns) when the file is missing or empty. A truncated last line (a killed process) is
    skipped."""
    import pandas as pd

    rows = []
    p = Path(path)
    if p.is_file():
        for text in p.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(text)
            except json.JSONDecodeError:
                continue
            info = row.pop("info", {}) or {}
            rows.append({**row, **{f"info_{k}": v for k, v in info.items()}})
    cols = ["notebook", "stage", "seconds", "depth", "pid", "end"]
    return pd.DataFrame(rows) if rows else pd.DataFrame(columns=cols)


def summarise(log, *, all_depths: bool = False):
    """Seconds and count per (notebook, stage), largest first; only outermost stages (depth 0) unless
    ``all_depths`` (then nested stages appear beside the stages that contain them)."""
    import pandas as pd

    df = log if isinstance(log, pd.DataFrame) else read_log(log)
    if df.empty:
        return pd.DataFrame(columns=["notebook", "stage", "seconds", "count"])
    if not all_depths:
        df = df[df["depth"] == 0]
    out = (df.groupby(["notebook", "stage"], as_index=False)
             .agg(seconds=("seconds", "sum"), count=("seconds", "size")))
    out["seconds"] = out["seconds"].round(1)
    return out.sort_values(["notebook", "seconds"], ascending=[True, False], ignore_index=True)
