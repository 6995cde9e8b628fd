"""Atomic file writes: a reader (or a crash) never sees a half-written file."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_json"]


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], None]) -> Path:
    """Write a file through `write(handle)` into a temporary sibling, then rename it into place.

    The rename is atomic on POSIX and Windows, so `path` holds either the old content or the
    new one, never a mixture. The temporary file is removed if `write` raises.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = tempfile.NamedTemporaryFile(  # noqa: SIM115 (closed below, before the rename)
        dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False
    )
    try:
        with handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(handle.name, path)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Atomically replace `path` with `data`."""
    return atomic_write(path, lambda handle: handle.write(data))


def atomic_write_json(path: str | Path, value: Any) -> Path:
    """Atomically replace `path` with `value` as indented JSON (NaN and infinity rejected)."""
    text = json.dumps(value, indent=2, allow_nan=False) + "\n"
    return atomic_write_bytes(path, text.encode())
