import io
import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.artist import Artist
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter
from PIL import Image

from exigo.config import Config
from exigo.figures.pool import Drawn, FigureRenderer, available_cpus, log_png, render_png
from exigo.pipeline import EpochContext, run

from conftest import TinyNet


def make_figure(seed: int = 0) -> Figure:
    figure = Figure(figsize=(2, 1.5), layout="constrained")
    ax = figure.subplots()
    ax.imshow(np.random.default_rng(seed).random((6, 6)), cmap="viridis")
    ax.set_title(f"figure {seed}")
    return figure


def decoded(source) -> np.ndarray:
    """Pixels [H, W, 3] of a PNG file, or of PNG bytes."""
    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
        return np.asarray(image.convert("RGB"))


def pixels(seed: int) -> np.ndarray:
    return decoded(render_png(make_figure(seed), dpi=50))


class Exploding(Artist):
    """An artist whose drawing fails, in whichever process draws it."""

    def draw(self, renderer):
        raise RuntimeError("this artist cannot be drawn")


def test_render_png_is_an_rgb_png_of_the_figure_size():
    rgb = decoded(render_png(make_figure(), dpi=50))
    assert rgb.dtype == np.uint8 and rgb.shape == (75, 100, 3)  # 2 x 1.5 inches at 50 dpi
    assert len(np.unique(rgb.reshape(-1, 3), axis=0)) > 10  # drawn, not blank


class AddImageOnly:
    def __init__(self):
        self.images = []

    def add_image(self, tag, image, global_step=None, dataformats="CHW"):
        self.images.append((tag, image, global_step, dataformats))


def test_log_png_writes_the_png_itself_or_the_pixels_to_another_writer(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    png = render_png(make_figure(), dpi=50)
    writer = SummaryWriter(str(tmp_path))
    log_png(writer, "picture", png, 3)
    writer.close()
    events = EventAccumulator(str(tmp_path), size_guidance={"images": 0})
    events.Reload()
    (image,) = events.Images("picture")
    assert (image.step, image.width, image.height) == (3, 100, 75)
    assert image.encoded_image_string == png
    other = AddImageOnly()
    log_png(other, "picture", png, 3)
    ((tag, rgb, step, layout),) = other.images
    assert (tag, step, layout) == ("picture", 3, "HWC") and np.array_equal(rgb, decoded(png))


@pytest.mark.parametrize("in_background", [False, True])
def test_renderer_writes_the_same_pixels_in_order(tmp_path, in_background):
    renderer = FigureRenderer(in_background=in_background)
    try:
        for seed in range(3):
            renderer.submit(make_figure(seed), tmp_path / f"f{seed}.png", 50, f"f{seed}", seed)
        done = renderer.collect()
    finally:
        renderer.close()
    assert [(figure.name, figure.step, figure.error) for figure in done] == [
        ("f0", 0, None),
        ("f1", 1, None),
        ("f2", 2, None),
    ]
    for seed, figure in enumerate(done):
        assert np.array_equal(decoded(figure.png), pixels(seed))
        assert figure.path.read_bytes() == figure.png
    assert sorted(path.name for path in tmp_path.iterdir()) == ["f0.png", "f1.png", "f2.png"]
    assert renderer.collect() == []


def test_draw_calls_in_the_helper_and_here_give_the_same_png(tmp_path):
    renderer = FigureRenderer()
    try:
        renderer.submit_draw(make_figure, (4,), {}, tmp_path / "helper.png", 50, "a", 1)
        renderer.submit_draw(lambda: make_figure(4), (), {}, tmp_path / "here.png", 50, "b", 1)
        done = renderer.collect()
    finally:
        renderer.close()
    assert [figure.error for figure in done] == [None, None]
    assert done[0].png == done[1].png == render_png(make_figure(4), dpi=50)


def test_unpicklable_figure_is_rendered_here(tmp_path):
    figure = make_figure()
    figure.axes[0].xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    renderer = FigureRenderer()
    try:
        renderer.submit(figure, tmp_path / "lambda.png", 50, "lambda", 1)
        assert renderer._helper is None  # the lambda cannot be pickled: never sent
        (done,) = renderer.collect()
    finally:
        renderer.close()
    assert done.error is None and (tmp_path / "lambda.png").read_bytes() == done.png


def test_dead_helper_means_rendering_here(tmp_path):
    renderer = FigureRenderer()
    try:
        renderer.submit(make_figure(1), tmp_path / "a.png", 50, "a", 1)
        renderer._helper.kill()
        renderer._helper.wait()
        renderer.submit(make_figure(2), tmp_path / "b.png", 50, "b", 1)
        done = renderer.collect()
    finally:
        renderer.close()
    assert [figure.error for figure in done] == [None, None]
    assert np.array_equal(decoded(done[0].png), pixels(1))
    assert np.array_equal(decoded(tmp_path / "b.png"), pixels(2))


def test_close_with_figures_pending_stops_the_helper_and_leaves_no_temporary_files(tmp_path):
    renderer = FigureRenderer()
    for seed in range(4):
        renderer.submit(make_figure(seed), tmp_path / f"f{seed}.png", 50, "f", 1)
    helper, folder = renderer._helper, renderer._folder
    renderer.close()
    assert helper.poll() is not None and not folder.exists()
    assert all(path.suffix == ".png" for path in tmp_path.iterdir())  # no .tmp left behind


def figure_and_pid(seed: int) -> Drawn:
    return Drawn(make_figure(seed), (seed, os.getpid()))


def figure_once_the_queue_is_taken(seed: int, folder: str, marker: str) -> Drawn:
    """In the helper: wait until the test has queued the rest and collect() has taken it."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if Path(marker).exists() and not list(Path(folder).glob("*.pickle")):
            break
        time.sleep(0.01)
    return figure_and_pid(seed)


def fails_in_the_helper(seed: int, run_pid: int) -> Drawn:
    if os.getpid() != run_pid:
        raise RuntimeError("not in the helper")
    return figure_and_pid(seed)


def wait_until_claimed(renderer: FigureRenderer) -> None:
    job = renderer._pending[-1].job_file
    deadline = time.monotonic() + 60
    while job.exists() and time.monotonic() < deadline:  # the helper renames what it starts
        time.sleep(0.01)
    assert not job.exists()


def test_collect_shares_the_queue_and_values_come_back_from_either_process(tmp_path):
    values = []
    renderer = FigureRenderer()
    try:
        renderer.start()
        marker = tmp_path / "queued"
        # a job the helper starts and holds until collect() has taken the three behind it
        args = (0, str(renderer._folder), str(marker))
        renderer.submit_draw(
            figure_once_the_queue_is_taken, args, {}, tmp_path / "0.png", 50, "f", 1, values.append
        )
        wait_until_claimed(renderer)
        for seed in (1, 2, 3):
            path = tmp_path / f"{seed}.png"
            renderer.submit_draw(figure_and_pid, (seed,), {}, path, 50, "f", 1, values.append)
        marker.touch()
        first = renderer.collect()
        helper = renderer._helper.pid
        # the next epoch's job: the helper's replies about the taken jobs are skipped
        renderer.submit_draw(
            figure_and_pid, (4,), {}, tmp_path / "4.png", 50, "f", 2, values.append
        )
        wait_until_claimed(renderer)
        second = renderer.collect()
    finally:
        renderer.close()
    assert [figure.error for figure in first + second] == [None] * 5
    here = os.getpid()
    assert sorted(values) == [(0, helper), (1, here), (2, here), (3, here), (4, helper)]
    for seed, figure in enumerate(first + second):
        assert np.array_equal(decoded(figure.png), pixels(seed))
        assert figure.path.read_bytes() == figure.png


def test_a_job_failing_in_the_helper_is_drawn_here_and_hands_its_value_over_once(tmp_path):
    values = []
    renderer = FigureRenderer()
    try:
        args = (5, os.getpid())
        renderer.submit_draw(
            fails_in_the_helper, args, {}, tmp_path / "5.png", 50, "f", 1, values.append
        )
        wait_until_claimed(renderer)
        (done,) = renderer.collect()
    finally:
        renderer.close()
    assert done.error is None and values == [(5, os.getpid())]
    assert np.array_equal(decoded(done.png), pixels(5))


def test_a_job_that_cannot_be_sent_does_not_shift_the_replies(tmp_path):
    renderer = FigureRenderer()
    try:
        renderer.submit(make_figure(0), tmp_path / "0.png", 50, "f", 1)
        folder = renderer._folder
        renderer._folder = tmp_path / "missing"  # its pickle cannot be written: drawn here
        renderer.submit(make_figure(1), tmp_path / "1.png", 50, "f", 1)
        renderer._folder = folder
        renderer.submit(make_figure(2), tmp_path / "2.png", 50, "f", 1)
        wait_until_claimed(renderer)  # the helper has the last one: collect() needs its reply
        done = []
        collecting = threading.Thread(target=lambda: done.extend(renderer.collect()), daemon=True)
        collecting.start()
        collecting.join(60)
        assert not collecting.is_alive(), "collect() waits for a reply that never comes"
    finally:
        renderer.close()
    assert [figure.error for figure in done] == [None] * 3
    for seed, figure in enumerate(done):
        assert np.array_equal(decoded(figure.png), pixels(seed))


def draw_or_explode(seed: int, explode: bool = False) -> Figure:
    figure = make_figure(seed)
    if explode:
        figure.add_artist(Exploding())
    return figure


class FigureOnce:
    """Saves one figure per epoch: drawable, or with an artist that fails to draw."""

    name = "figures"

    def __init__(self, broken_at: int) -> None:
        self.broken_at = broken_at
        self.renderers = set()

    def __call__(self, ctx: EpochContext) -> None:
        self.renderers.add(ctx.renderer is not None)
        explode = ctx.epoch == self.broken_at
        ctx.save_figure(draw_or_explode(ctx.epoch, explode), "picture", dpi=50)
        ctx.draw_figure("drawn", draw_or_explode, ctx.epoch + 10, explode=explode, dpi=50)


def test_pipeline_collects_figures_before_committing_and_reports_failed_ones(blobs, tmp_path):
    train, held_out = blobs
    torch.manual_seed(0)
    analysis = FigureOnce(broken_at=2)
    config = Config(epochs=3, batch_size=16, lr=1e-2, save_dir=tmp_path / "save", probe_size=3)
    result = run(config, TinyNet(), train, held_out, [analysis])
    assert analysis.renderers == {available_cpus() >= 2}  # a helper process needs a 2nd CPU
    plots = tmp_path / "save" / "plots"
    assert sorted(path.name for path in plots.iterdir()) == [
        "drawn_1.png",
        "drawn_3.png",
        "picture_1.png",
        "picture_3.png",
    ]
    for epoch in (1, 3):
        assert np.array_equal(decoded(plots / f"picture_{epoch}.png"), pixels(epoch))
        assert np.array_equal(decoded(plots / f"drawn_{epoch}.png"), pixels(epoch + 10))
    failed = [(epoch, name) for epoch, name, _ in result.failed_analyses]
    assert failed == [(2, "figure picture"), (2, "figure drawn")]
    assert all("this artist cannot be drawn" in error for _, _, error in result.failed_analyses)
    rows = json.loads((tmp_path / "save" / "metrics.json").read_text())
    assert [row["epoch"] for row in rows] == [1, 2, 3]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(result.log_dir), size_guidance={"images": 0})
    events.Reload()
    logged = {image.step: image.encoded_image_string for image in events.Images("picture")}
    assert logged == {epoch: (plots / f"picture_{epoch}.png").read_bytes() for epoch in (1, 3)}


def test_a_started_helper_is_stopped_by_close_even_before_its_first_job():
    renderer = FigureRenderer(preload=["openTSNE"])
    renderer.start()
    helper, folder = renderer._helper, renderer._folder
    renderer.start()  # started once
    assert renderer._helper is helper and helper.poll() is None
    renderer.close()
    assert helper.poll() is not None and not folder.exists()
    inline = FigureRenderer(in_background=False)
    inline.start()
    assert inline._helper is None
