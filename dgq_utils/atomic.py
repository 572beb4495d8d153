"""Atomic file writes: a reader sees either the old file or the complete new one, never half of either.

Every writer here follows the same recipe: write to a temporary file *in the destination's folder* (so the final
``os.replace`` is a rename inside one file system, which POSIX makes atomic), flush and ``fsync`` it, then
``os.replace`` it over the destination. If anything fails before the rename, the temporary file is removed and the
destination is untouched. A process killed mid-write leaves at most a stray ``.<name>.tmp-<pid>-*`` file, which
:func:`clean_stale_temp_files` removes (the generation runner calls it when it opens a cache folder). The writer's
process id in the name lets several processes share a folder (sharded generation): a temporary file whose writer
is still alive on this machine is in flight and is left alone.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Iterator

TMP_MARK = ".tmp-"


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", *, fsync: bool = True) -> Iterator[IO]:
    """Open a temporary sibling of ``path`` for writing; on a clean exit it replaces ``path`` atomically.

    ``mode`` must be a write mode (``"w"``, ``"wb"``, ``"wt"``). Text mode uses UTF-8.
    """
    if not mode.startswith("w"):
        raise ValueError(f"atomic_open only writes whole files; mode must start with 'w', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{TMP_MARK}{os.getpid()}-", dir=path.parent)
    try:
        kwargs = {} if "b" in mode else {"encoding": "utf-8", "newline": ""}
        with os.fdopen(fd, mode, **kwargs) as fh:
            yield fh
            fh.flush()
            if fsync:
                os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, fsync: bool = True) -> Path:
    """Write ``data`` to ``path`` atomically; returns the path."""
    with atomic_open(path, "wb", fsync=fsync) as fh:
        fh.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str, *, fsync: bool = True) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns the path."""
    return atomic_write_bytes(path, text.encode("utf-8"), fsync=fsync)


def atomic_write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 2) -> Path:
    """Serialise ``obj`` as JSON (sorted keys) and write it atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=True, default=str) + "\n")


def atomic_save_image(image, path: str | os.PathLike, *, format: str | None = None, **save_kwargs) -> bytes:
    """Encode a PIL image in memory and write it atomically. Returns the encoded bytes (to hash them)."""
    path = Path(path)
    fmt = format or {"jpg": "JPEG", "jpeg": "JPEG"}.get(path.suffix.lower().lstrip("."), "PNG")
    buf = io.BytesIO()
    image.save(buf, format=fmt, **save_kwargs)
    data = buf.getvalue()
    atomic_write_bytes(path, data)
    return data


def atomic_save_npz(path: str | os.PathLike, **arrays) -> Path:
    """``numpy.savez`` into ``path`` atomically (``path`` should end in ``.npz``)."""
    import numpy as np

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return atomic_write_bytes(path, buf.getvalue())


def _writer_alive(name: str) -> bool:
    """Whether the process that owns temporary file ``name`` (``.<name>.tmp-<pid>-...``) is still running here."""
    pid = name.rsplit(TMP_MARK, 1)[-1].split("-", 1)[0]
    if not pid.isdigit() or int(pid) == 0:
        return False
    if int(pid) == os.getpid():
        return True  # our own write in flight (another thread)
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def clean_stale_temp_files(folder: str | os.PathLike) -> int:
    """Remove temporary files left by writers that were killed mid-write in ``folder`` (not recursive).

    Files whose writer process is still alive on this machine are in flight and are kept."""
    folder = Path(folder)
    n = 0
    if folder.is_dir():
        for p in folder.iterdir():
            if p.is_file() and p.name.startswith(".") and TMP_MARK in p.name and not _writer_alive(p.name):
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
                    n += 1
    return n
