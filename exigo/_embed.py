"""Images as `data:` URIs for the self-contained pages (report.html, compare.html), each made once.

A page is rebuilt after every epoch from every figure of the run; encoding them all again
would make each rebuild slower than the last. `ImageCache` keeps what it made under the
file's path, modification time and size, so a rebuild only encodes the figures that are new
(or were redrawn), and forgets what the last page no longer used.

- full size: the PNG's own bytes, base64 (4 characters per 3 bytes);
- small: half the width and height, WebP at quality 60 (Chromium, Firefox and Safari draw it):
  about an eighth of the PNG's bytes for exigo's figures, still readable as a whole.
"""

from __future__ import annotations

import base64
import io
import threading
from collections.abc import Callable
from pathlib import Path

__all__ = ["ImageCache", "base64_length"]


def base64_length(size: int) -> int:
    """Characters of `size` bytes in base64 (padding included)."""
    return 4 * -(-size // 3)


class ImageCache:
    """`data:` URIs of image files, made once per file version; thread-safe.

    Attributes:
        made: how many URIs were encoded since the cache was created (a measure for tests).
    """

    def __init__(self) -> None:
        self._entries: dict[tuple[str, int, int, str], str] = {}
        self._used: set[tuple[str, int, int, str]] = set()
        self._lock = threading.Lock()
        self.made = 0

    def full(self, path: Path) -> str:
        """The file as it is, as a `data:` URI (PNG, GIF or WebP by its suffix)."""
        mime = {".gif": "image/gif", ".webp": "image/webp"}.get(path.suffix, "image/png")
        return self._get(path, "full", lambda data: _uri(mime, data))

    def small(self, path: Path) -> str:
        """Half the width and height, WebP, as a `data:` URI."""
        return self._get(path, "small", _half_size_webp)

    def forget_unused(self) -> None:
        """Drop every entry not asked for since the last call (the previous page's figures)."""
        with self._lock:
            self._entries = {k: v for k, v in self._entries.items() if k in self._used}
            self._used.clear()

    def _get(self, path: Path, kind: str, make: Callable[[bytes], str]) -> str:
        stat = path.stat()
        key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size, kind)
        with self._lock:
            self._used.add(key)
            if key in self._entries:
                return self._entries[key]
        uri = make(path.read_bytes())
        with self._lock:
            self._entries[key] = uri
            self.made += 1
        return uri


def _uri(mime: str, data: bytes) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _half_size_webp(data: bytes) -> str:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        small = image.convert("RGB").reduce(2)
    buffer = io.BytesIO()
    small.save(buffer, format="webp", quality=60, method=2)
    return _uri("image/webp", buffer.getvalue())
