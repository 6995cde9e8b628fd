"""TensorBoard event records: framed byte for byte as TensorBoard frames them, read back whole."""

from __future__ import annotations

import io
import random

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c as reference_crc
from tensorboard.summary.writer.record_writer import RecordWriter

from exigo.engine.events import EventLog, frame_record, masked_crc32c


@pytest.mark.parametrize("size", [0, 1, 7, 1000, 70_001])
def test_records_are_framed_as_tensorboards_record_writer_frames_them(size):
    data = random.Random(size).randbytes(size)
    expected = io.BytesIO()
    RecordWriter(expected).write(data)
    assert frame_record(data) == expected.getvalue()
    assert masked_crc32c(data) == reference_crc(data)


def test_the_crc_of_a_known_string():
    # CRC-32C("123456789") = 0xE3069283 (the check value of the Castagnoli polynomial)
    crc = 0xE3069283
    assert masked_crc32c(b"123456789") == (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def test_scalars_and_a_png_read_back_by_tensorboard(tmp_path):
    from matplotlib.figure import Figure

    from exigo.figures.pool import render_png

    figure = Figure(figsize=(1, 1))
    figure.add_subplot().plot([0, 1], [1, 0])
    png = render_png(figure, 50)
    log = EventLog(tmp_path)
    log.scalars({"eval_loss": 0.25, "eval_accuracy": 0.9, "note": "text"}, 3)
    log.png("curve", png, 3)
    log.close()
    events = EventAccumulator(str(tmp_path), size_guidance={"images": 0})
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss/eval")] == [(3, 0.25)]
    image = events.Images("curve")[0]
    assert (image.step, image.encoded_image_string) == (3, png)


def test_a_pure_python_crc_is_said(tmp_path, monkeypatch):
    import google_crc32c

    monkeypatch.setattr(google_crc32c, "implementation", "python")
    with pytest.warns(RuntimeWarning, match="without its C extension"):
        EventLog(tmp_path).close()
