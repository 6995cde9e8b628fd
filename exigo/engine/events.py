"""TensorBoard event files of a run: scalars per epoch and the figures' PNGs, as they are.

Records are TensorBoard's `Event` protocol buffers in TFRecord framing (`frame_record`: the
length, its masked CRC-32C, the data, its masked CRC-32C; byte for byte what TensorBoard's
`RecordWriter` writes), so a figure's PNG goes into the event file as it is (no decode and
re-encode, which `SummaryWriter.add_image` would do with every figure, every epoch). The
CRC-32C comes from `google-crc32c` (C): TensorBoard's own is pure Python, 0.13 s per MB of
PNG, which held the interpreter lock against training for about 0.2 s every epoch. A resumed
run hides the events an interrupted attempt logged after its last completed epoch, as
`SummaryWriter(purge_step=...)` does: a `SessionLog.START` event at that step.

The file is written here rather than through torch's `FileWriter`, whose writer thread, when
the disk fills, prints its own traceback ("Exception in thread ...") and leaves a record cut
in the middle. Here `flush`, called by every commit, appends the records framed since the
last one and raises a failed write in the run's thread, naming the event file, after cutting
the file back to its last whole record.
"""

from __future__ import annotations

import io
import itertools
import os
import socket
import struct
import time
import warnings
from collections.abc import Mapping
from contextlib import suppress
from pathlib import Path
from typing import Any

from exigo.engine.run_dir import BASE_METRICS

__all__ = ["EventLog", "frame_record", "masked_crc32c", "scalar_tag"]


def masked_crc32c(data: bytes) -> int:
    """TFRecord's masked CRC: `((c >> 15 | c << 17) + 0xA282EAD8) mod 2**32`, c = CRC-32C(data).

    Args:
        data: the bytes to check.

    Returns:
        The masked checksum, an unsigned 32-bit integer.
    """
    import google_crc32c

    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def frame_record(data: bytes) -> bytes:
    """One TFRecord: little-endian uint64 length, its masked CRC, the data, the data's.

    Args:
        data: a serialised `Event`.

    Returns:
        `len(data) + 16` bytes, as TensorBoard's `RecordWriter.write` writes them.
    """
    header = struct.pack("<Q", len(data))
    return b"".join(
        (
            header,
            struct.pack("<I", masked_crc32c(header)),
            data,
            struct.pack("<I", masked_crc32c(data)),
        )
    )


def scalar_tag(name: str) -> str | None:
    """The TensorBoard tag of a metrics.json entry.

    Args:
        name: a key of a metrics.json row (`eval_loss`, `precision/3`, ...).

    Returns:
        Its tag (`loss/eval`, `precision/3`, ...), or None for an entry that is no scalar.
    """
    base = BASE_METRICS.get(name)
    return name if base is None else base.tag


def _numeric(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


_FILE_NUMBERS = itertools.count()  # tells apart the event files one process opens in a second


class EventLog:
    """One TensorBoard run folder, written by this process.

    Args:
        log_dir: the run folder, `<save-dir>/logs/<run-name>`.
        purge_step: on `--resume`, the first epoch this attempt writes; TensorBoard hides the
            events a previous attempt logged from that step on. None for a new run.

    Raises:
        OSError: the folder or the event file cannot be created (named in the error).
    """

    def __init__(self, log_dir: Path, purge_step: int | None = None) -> None:
        import google_crc32c
        from tensorboard.compat.proto.event_pb2 import Event, SessionLog

        if google_crc32c.implementation != "c":  # no wheel for this platform: said, not hidden
            warnings.warn(
                "google-crc32c runs without its C extension here: TensorBoard event files are "
                "checksummed in pure Python (about 0.1 s per MB of figures)",
                RuntimeWarning,
                stacklevel=2,
            )

        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.log_dir / (
            f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}."
            f"{os.getpid()}.{next(_FILE_NUMBERS)}"
        )
        self._file = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        self._whole = 0  # bytes of whole records in the file
        self._framed = io.BytesIO()  # records framed, not yet in the file
        self._closed = False
        try:
            self._add(Event(wall_time=time.time(), file_version="brain.Event:2"))
            if purge_step is not None:
                self._add(Event(step=purge_step, file_version="brain.Event:2"))
                self._add(Event(step=purge_step, session_log=SessionLog(status=SessionLog.START)))
            self.flush()  # TensorBoard lists the run from now on
        except BaseException:  # a full disk already: no descriptor left open
            os.close(self._file)
            raise

    def _add(self, event: Any, step: int | None = None, wall_time: float | None = None) -> None:
        if step is not None:
            event.step = step
        event.wall_time = time.time() if wall_time is None else wall_time
        self._framed.write(frame_record(event.SerializeToString()))

    def scalars(self, row: Mapping[str, Any], step: int) -> None:
        """Log every number of a metrics.json row, and its per-analysis seconds.

        Args:
            row: the epoch's metrics row.
            step: the epoch.
        """
        from tensorboard.compat.proto.event_pb2 import Event
        from torch.utils.tensorboard.summary import scalar

        wall = time.time()
        values = {
            tag: value
            for key, value in row.items()
            if (tag := scalar_tag(key)) is not None and _numeric(value)
        }
        for name, seconds in row.get("analysis_seconds", {}).items():
            values[f"seconds/{name}"] = seconds
        for tag, value in values.items():
            self._add(Event(summary=scalar(tag, float(value))), step, wall)

    def png(self, tag: str, png: bytes, step: int) -> None:
        """Log an encoded RGB PNG as a TensorBoard image, without re-encoding it.

        Args:
            tag: image tag (the figure's name).
            png: bytes of an RGB PNG (`exigo.figures.pool.render_png`).
            step: the epoch (0 before training).
        """
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.proto.summary_pb2 import Summary

        # a PNG's IHDR chunk holds width and height as big-endian 32-bit integers
        width, height = (int.from_bytes(png[offset : offset + 4], "big") for offset in (16, 20))
        image = Summary.Image(height=height, width=width, colorspace=3, encoded_image_string=png)
        self._add(Event(summary=Summary(value=[Summary.Value(tag=tag, image=image)])), step)

    def flush(self) -> None:
        """Append every event logged so far to the file.

        Raises:
            OSError: the write failed (disk full, ...); `filename` is the event file, which
                holds only whole records (the failed ones are dropped).
        """
        data = self._framed.getvalue()
        self._framed.seek(0)
        self._framed.truncate()
        try:
            written = 0
            while written < len(data):
                written += os.write(self._file, data[written:])
        except OSError as error:
            with suppress(OSError):
                os.ftruncate(self._file, self._whole)
                os.lseek(self._file, self._whole, os.SEEK_SET)
            error.filename = str(self.path)
            raise
        self._whole += len(data)

    def close(self) -> None:
        """Flush what can be flushed and close the file; never raises.

        Every commit flushes (and so raises a failed write) first: what a close could lose
        belongs to an epoch that was dropped anyway.
        """
        if self._closed:
            return
        self._closed = True
        with suppress(OSError):
            self.flush()
        with suppress(OSError):
            os.close(self._file)
