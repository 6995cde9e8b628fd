"""TensorBoard event files of a run: scalars per epoch and the figures' PNGs, as they are.

Written through torch's public `torch.utils.tensorboard.writer.FileWriter` and TensorBoard's
`Summary` protocol buffers, so a figure's PNG goes into the event file byte for byte (no
decode and re-encode, which `SummaryWriter.add_image` would do with every figure, every
epoch). A resumed run hides the events an interrupted attempt logged after its last completed
epoch, as `SummaryWriter(purge_step=...)` does: a `SessionLog.START` event at that step.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from exigo.engine.run_dir import BASE_METRICS

__all__ = ["EventLog", "scalar_tag"]


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


class EventLog:
    """One TensorBoard run folder, written by this process.

    Args:
        log_dir: the run folder, `<save-dir>/logs/<run-name>`.
        purge_step: on `--resume`, the first epoch this attempt writes; TensorBoard hides the
            events a previous attempt logged from that step on. None for a new run.
    """

    def __init__(self, log_dir: Path, purge_step: int | None = None) -> None:
        from tensorboard.compat.proto.event_pb2 import Event, SessionLog
        from torch.utils.tensorboard.writer import FileWriter

        self.log_dir = Path(log_dir)
        self._writer = FileWriter(str(self.log_dir))
        if purge_step is not None:
            self._writer.add_event(Event(step=purge_step, file_version="brain.Event:2"))
            self._writer.add_event(
                Event(step=purge_step, session_log=SessionLog(status=SessionLog.START))
            )

    def scalars(self, row: Mapping[str, Any], step: int) -> None:
        """Log every number of a metrics.json row, and its per-analysis seconds.

        Args:
            row: the epoch's metrics row.
            step: the epoch.
        """
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
            self._writer.add_summary(scalar(tag, float(value)), step, wall)

    def png(self, tag: str, png: bytes, step: int) -> None:
        """Log an encoded RGB PNG as a TensorBoard image, without re-encoding it.

        Args:
            tag: image tag (the figure's name).
            png: bytes of an RGB PNG (`exigo.figures.pool.render_png`).
            step: the epoch (0 before training).
        """
        from tensorboard.compat.proto.summary_pb2 import Summary

        # a PNG's IHDR chunk holds width and height as big-endian 32-bit integers
        width, height = (int.from_bytes(png[offset : offset + 4], "big") for offset in (16, 20))
        image = Summary.Image(height=height, width=width, colorspace=3, encoded_image_string=png)
        self._writer.add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)

    def flush(self) -> None:
        """Write what is queued to disk."""
        self._writer.flush()

    def close(self) -> None:
        """Flush and close the event file."""
        self._writer.close()
