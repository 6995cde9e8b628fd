"""Atomic writes and the folder lock."""

import os
import stat
import subprocess
import sys

import pytest
from test_reliability import HOLD_LOCK

from exigo._io import FolderLock, FolderLockedError, atomic_write, atomic_write_json

from conftest import REPO


def test_a_write_that_fails_midway_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "metrics.json"
    atomic_write_json(path, [{"epoch": 1}])
    before = path.read_bytes()

    def half_then_fail(handle):
        handle.write(b'[{"epoch": 1}, {"ep')
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError) as raised:
        atomic_write(path, half_then_fail)
    assert raised.value.filename == str(path)  # the message says which file
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]
    with pytest.raises(ValueError):
        atomic_write_json(path, [float("nan")])  # invalid JSON is refused, not written
    assert path.read_bytes() == before


def test_written_files_get_the_usual_permissions_not_0600(tmp_path):
    mask = os.umask(0o022)
    os.umask(mask)
    path = atomic_write_json(tmp_path / "run.json", {})
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask


def test_lock_is_exclusive_between_processes_and_dies_with_its_holder(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(tmp_path)], stdout=subprocess.PIPE, cwd=REPO
    )
    try:
        assert holder.stdout.readline().strip() == b"locked"
        with pytest.raises(FolderLockedError) as raised:
            FolderLock(tmp_path).acquire()
        assert raised.value.holder.startswith(f"pid {holder.pid} on ")
    finally:
        holder.kill()  # SIGKILL: no chance to clean up
        holder.wait()
        holder.stdout.close()
    with FolderLock(tmp_path) as lock:
        assert lock.held
        with pytest.raises(FolderLockedError):  # a second open file, even in one process
            FolderLock(tmp_path).acquire()
    assert not lock.held
    FolderLock(tmp_path).acquire()  # released on exit
