"""Safe file handling: atomic writes, and the lock that keeps two runs out of one folder.

Atomic writes go to a temporary sibling that is renamed into place, so a reader, a crash or a
Ctrl-C never leaves a half-written file: the path holds either the old content or the new one.

`FolderLock` takes an exclusive lock on `<folder>/.lock` (`filelock`: `flock` on POSIX, also
works on Windows). The operating system drops the lock when the holding process exits for any
reason (even `kill -9`), so a crashed run never leaves a folder locked; the files themselves
may stay behind and mean nothing on their own.
"""

from __future__ import annotations

import datetime as _dt
import errno
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import IO, Any

__all__ = [
    "STORAGE_ERRNOS",
    "FolderLock",
    "FolderLockedError",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_json",
    "describe_write_error",
    "is_storage_error",
]

#: A write failed because of the machine, not of exigo: the disk or quota is full, the file
#: system is read-only or failing, a file size limit is reached.
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EFBIG})


def is_storage_error(error: BaseException, folder: str | Path) -> bool:
    """Whether `error` means the run's files cannot be written (so the run must stop).

    Args:
        error: any exception.
        folder: the run's folder: a permission error on a file inside it counts too (the
            folder was made read-only during the run).

    Returns:
        True for a `STORAGE_ERRNOS` OSError anywhere, or EACCES/EPERM on a file in `folder`.
    """
    if not isinstance(error, OSError):
        return False
    if error.errno in STORAGE_ERRNOS:
        return True
    if error.errno in (errno.EACCES, errno.EPERM) and error.filename:
        written = Path(os.path.abspath(os.fsdecode(error.filename)))
        return written.is_relative_to(os.path.abspath(folder))
    return False


def describe_write_error(error: OSError, folder: str | Path) -> str:
    """The message a full disk's own lacks: `cannot write FILE: REASON (N MB free there)`.

    Args:
        error: the failed write (`atomic_write` names the file, not its temporary name).
        folder: where to measure the free space when the error names no file.

    Returns:
        One clause, without a final full stop.
    """
    target = Path(os.fsdecode(error.filename)) if error.filename else Path(folder)
    what = f"cannot write {target}" if error.filename else f"cannot write in {target}"
    existing = next((p for p in (target, *target.parents) if p.exists()), None)
    try:
        free = f" ({_size(shutil.disk_usage(existing).free)} free there)" if existing else ""
    except OSError:
        free = ""
    return f"{what}: {error.strerror or error}{free}"


def _size(count: int) -> str:
    """Bytes as people read them: 0 bytes, 812.3 kB, 1.3 GB."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count} bytes"


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# tempfile creates files with mode 0600; renamed into place they would be unreadable to other
# users (a shared TensorBoard server, a colleague). Give them the mode `open()` would have.
_FILE_MODE = 0o666 & ~_current_umask()


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], None]) -> Path:
    """Write a file through `write(handle)` into a temporary sibling, then rename it into place.

    The rename is atomic on POSIX and Windows, so `path` holds either the old content or the
    new one, never a mixture. The temporary file is removed if `write` raises (or the process
    is interrupted while writing).
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
        os.chmod(handle.name, _FILE_MODE)
        os.replace(handle.name, path)
    except BaseException as error:
        Path(handle.name).unlink(missing_ok=True)
        if isinstance(error, OSError) and error.filename in (None, handle.name):
            # "No space left on device" alone does not say where; the temporary name is
            # not the file the user knows
            error.filename, error.filename2 = str(path), None
        raise
    _fsync_folder(path.parent)
    return path


def _fsync_folder(folder: Path) -> None:
    """Make a rename in `folder` durable across a power cut (POSIX; a no-op elsewhere)."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass  # some file systems cannot fsync a folder; the rename is still atomic
    finally:
        os.close(descriptor)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Atomically replace `path` with `data`."""
    return atomic_write(path, lambda handle: handle.write(data))


def atomic_write_json(path: str | Path, value: Any) -> Path:
    """Atomically replace `path` with `value` as indented JSON (NaN and infinity rejected)."""
    text = json.dumps(value, indent=2, allow_nan=False) + "\n"
    return atomic_write_bytes(path, text.encode())


class FolderLockedError(Exception):
    """Another live process holds the folder's lock.

    Attributes:
        holder: who holds it, as the holder recorded (`pid 123 on host since 2026-...`).
    """

    def __init__(self, folder: Path, holder: str) -> None:
        super().__init__(f"{folder} is locked by {holder}")
        self.holder = holder


class FolderLock:
    """An exclusive lock on a folder, held by one process at a time.

    Use as a context manager, or call `acquire()` and `release()`. The lock is `filelock`'s
    `FileLock` on `<folder>/.lock` (`flock` on POSIX, `msvcrt.locking` on Windows): released by
    the operating system when the process ends, however it ends. Who holds it (pid, host, start
    time) is written beside it, in `<folder>/.lock.holder`, for the message of whoever waits
    (`filelock` truncates the lock file itself on every attempt).

    Args:
        folder: the folder to lock (must exist).
    """

    def __init__(self, folder: str | Path) -> None:
        from filelock import FileLock

        self.path = Path(folder) / ".lock"
        self.holder_path = Path(folder) / ".lock.holder"
        self._lock = FileLock(self.path, timeout=0)

    @property
    def held(self) -> bool:
        """Whether this object holds the lock now."""
        return self._lock.is_locked

    def acquire(self) -> None:
        """Take the lock, or fail at once.

        Raises:
            FolderLockedError: another process holds it; the message says which.
            OSError: the lock file cannot be opened.
        """
        from filelock import Timeout

        if self.held:
            return
        try:
            self._lock.acquire()
        except Timeout:
            try:
                holder = self.holder_path.read_text().strip()
            except OSError:
                holder = ""
            raise FolderLockedError(self.path.parent, holder or "another process") from None
        started = _dt.datetime.now().isoformat(timespec="seconds")
        try:
            atomic_write_bytes(
                self.holder_path,
                f"pid {os.getpid()} on {socket.gethostname()} since {started}\n".encode(),
            )
        except BaseException:
            self._lock.release()
            raise

    def release(self) -> None:
        """Give the lock back; its holder file goes first (the next holder writes its own)."""
        if self.held:
            self.holder_path.unlink(missing_ok=True)
            self._lock.release()

    def __enter__(self) -> FolderLock:
        self.acquire()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.release()
