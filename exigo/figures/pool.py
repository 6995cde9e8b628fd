"""Figures built and rendered to PNG, in this process or in a helper process meanwhile.

Figures (building the Axes, matplotlib's constrained layout, Agg rasterisation, PNG encoding)
were a third of a default run's CPU time, all pure Python, so a thread would not overlap them
with anything. With two or more CPUs the pipeline hands each figure to one helper process
(`FigureRenderer`) and goes on with the next analysis on its own core: either a finished
`Figure`, pickled (`EpochContext.save_figure`), or, cheaper for this process, the draw
function and the data it draws (`EpochContext.draw_figure`), so the figure is built there
too. A draw function may also compute something the run needs back and return it with the
figure (`Drawn`): the t-SNE runs in the helper this way. Before it commits the epoch the
pipeline waits for the figures (`collect`) and logs their PNGs to TensorBoard, so
`report.html` and `models/last.pt` never come before the figures they describe; while it
waits, it renders the queued figures the helper has not started yet itself, so both cores
work until the end of the queue. Either way the PNG is byte for byte the one this process
would write.

The helper is `python -m exigo.figures.pool`, fed one line per figure on its stdin: a plain
subprocess rather than `multiprocessing`, whose `spawn` start would re-run the caller's
`__main__` script in the helper, and whose `fork` would copy torch's OpenMP state. It ignores
Ctrl-C (the run decides when to stop) and exits when its stdin closes, also when the run's
process dies. A figure that cannot be pickled, a helper that cannot start or fails on a
figure: the figure is drawn in this process, as without a helper.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np

from exigo._io import atomic_write_bytes

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from torch.utils.tensorboard import SummaryWriter

__all__ = ["Drawn", "FigureRenderer", "RenderedFigure", "available_cpus", "log_png", "render_png"]


def available_cpus() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


@dataclass(frozen=True)
class Drawn:
    """What a draw function returns when it computes something the run needs back.

    The t-SNE figure's draw function computes the layout too, so the t-SNE runs in the helper
    process; the next epoch starts from that layout. `value` is pickled back to the run's
    process and handed to the `on_value` callback of `submit_draw` when the figure is
    collected.

    Attributes:
        figure: the matplotlib Figure to render.
        value: anything picklable.
    """

    figure: Figure
    value: Any

    @classmethod
    def of(cls, drawn: Figure | Drawn) -> Drawn:
        """What a draw function returned, as a `Drawn` (a plain Figure's value is None)."""
        return drawn if isinstance(drawn, Drawn) else cls(drawn, None)


def render_png(figure: Figure, dpi: int) -> bytes:
    """Draw `figure` once with Agg and encode it as PNG.

    Args:
        figure: a matplotlib Figure.
        dpi: resolution.

    Returns:
        The PNG file's bytes (RGB, 8 bits per channel).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from PIL import Image

    figure.set_dpi(dpi)
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    rgb = np.asarray(canvas.buffer_rgba())[..., :3]  # (H, W, 3) uint8
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="png", optimize=False)
    return buffer.getvalue()


def log_png(writer: SummaryWriter, tag: str, png: bytes, step: int) -> None:
    """Log an encoded PNG as a TensorBoard image, as `add_image` would, without re-encoding it.

    Args:
        writer: the run's TensorBoard writer.
        tag: image tag.
        png: bytes of an RGB PNG.
        step: global step.
    """
    file_writer = getattr(writer, "file_writer", None)
    if file_writer is None:  # not torch's SummaryWriter: its public add_image, pixels in
        from PIL import Image

        with Image.open(io.BytesIO(png)) as image:
            rgb = np.asarray(image.convert("RGB"))  # (H, W, 3) uint8
        writer.add_image(tag, rgb, global_step=step, dataformats="HWC")
        return
    from tensorboard.compat.proto.summary_pb2 import Summary

    width, height = (int.from_bytes(png[offset : offset + 4], "big") for offset in (16, 20))
    image = Summary.Image(height=height, width=width, colorspace=3, encoded_image_string=png)
    file_writer.add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), global_step=step)


@dataclass(frozen=True)
class RenderedFigure:
    """A figure written to disk, or the error that stopped it.

    Attributes:
        name: file stem and TensorBoard tag.
        step: TensorBoard step (the epoch; 0 before training).
        path: the PNG.
        png: its bytes, or None if rendering failed.
        error: the exception that stopped rendering, or None.
    """

    name: str
    step: int
    path: Path
    png: bytes | None
    error: BaseException | None = None


def _as_is(value: Any) -> Any:
    """The draw call of a figure drawn already (and how a tensor copied to the CPU unpickles)."""
    return value


class _CPUPickler(pickle.Pickler):
    """Pickles tensors of other devices as their CPU copies: the helper needs no GPU."""

    def reducer_override(self, value: Any) -> Any:
        torch = sys.modules.get("torch")  # no tensor without torch imported
        if torch is not None and isinstance(value, torch.Tensor) and value.device.type != "cpu":
            return _as_is, (value.cpu(),)
        return NotImplemented


def _pickle(value: Any) -> bytes:
    buffer = io.BytesIO()
    _CPUPickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(value)
    return buffer.getvalue()


@dataclass
class _Job:
    name: str
    step: int
    path: Path
    dpi: int
    # the call, kept until collected: made here if the helper fails or never starts the job
    draw: Callable[..., Figure | Drawn] | None
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    on_value: Callable[[Any], None] | None = None
    png: bytes | None = None  # set once rendered in this process, or read back
    job_file: Path | None = None  # the pickle sent to the helper; None: not sent
    number: int = 0  # its place in the helper's queue (one reply line per job, in order)

    def render_here(self) -> None:
        assert self.draw is not None
        drawn = Drawn.of(self.draw(*self.args, **self.kwargs))
        self.png = render_png(drawn.figure, self.dpi)
        atomic_write_bytes(self.path, self.png)
        self.draw, self.args, self.kwargs = None, (), {}
        self.hand_over(drawn.value)

    def hand_over(self, value: Any) -> None:
        if self.on_value is not None:
            on_value, self.on_value = self.on_value, None
            on_value(value)


class FigureRenderer:
    """Draws and renders figures in one helper process; `collect()` returns them in order.

    Args:
        in_background: use a helper process; False renders every figure at once in this
            process (what `submit` also does when a job cannot be pickled).
        preload: modules the helper imports as soon as it starts, before its first job
            (openTSNE for the t-SNE: 1 s the first epoch's figure no longer waits for).
    """

    def __init__(self, in_background: bool = True, preload: Sequence[str] = ()) -> None:
        self.in_background = in_background
        self.preload = list(preload)
        self._helper: subprocess.Popen[bytes] | None = None
        self._folder: Path | None = None  # pickled jobs on their way to the helper
        self._pending: list[_Job] = []
        self._jobs = 0  # sent to the helper
        self._answered = 0  # reply lines read from the helper

    def submit(self, figure: Figure, path: Path, dpi: int, name: str, step: int) -> None:
        """Render `figure` to `path`, now or in the helper process.

        Args:
            figure: a matplotlib Figure; not used by the caller afterwards.
            path: the PNG to write (atomically).
            dpi: resolution.
            name: TensorBoard tag.
            step: TensorBoard step.
        """
        self.submit_draw(_as_is, (figure,), {}, path, dpi, name, step)

    def submit_draw(
        self,
        draw: Callable[..., Figure | Drawn],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        path: Path,
        dpi: int,
        name: str,
        step: int,
        on_value: Callable[[Any], None] | None = None,
    ) -> None:
        """Call `draw(*args, **kwargs)` and render its Figure to `path`, here or in the helper.

        In the helper, `draw` and its arguments are unpickled: `draw` must be a module-level
        function, the arguments tensors, arrays and plain values. Building the figure there
        too saves this process the figure's construction and its (larger) pickle.

        Args:
            draw: returns a matplotlib Figure, or a `Drawn` (a Figure and a value).
            args: its positional arguments.
            kwargs: its keyword arguments.
            path: the PNG to write (atomically).
            dpi: resolution.
            name: TensorBoard tag.
            step: TensorBoard step.
            on_value: called in this process with the `Drawn` value (None for a plain
                Figure) once the figure is written: at once when drawn here, else by
                `collect`. Not called when the figure fails.
        """
        job = _Job(name, step, path, dpi, draw, args, kwargs, on_value)
        if self.in_background:
            try:
                job.job_file, job.number = self._send(_pickle((draw, args, kwargs)), path, dpi)
                self._pending.append(job)
                return
            except Exception:  # something unpicklable, or no helper: render here instead
                pass
        job.render_here()
        self._pending.append(job)

    def collect(self) -> list[RenderedFigure]:
        """Wait for every submitted figure; the written ones and the failures, in order.

        This process would only wait, so it shares the remaining work: from the last job
        back, it takes each job the helper has not started yet and renders it here, until it
        meets one the helper has started; then it waits for the helper's replies. (The t-SNE
        job, submitted first, is in the helper while this process renders the figures
        queued behind it.) A job is taken by deleting its pickle, which the helper claims by
        renaming it: whichever comes first wins. A figure the helper could not render (a
        function it cannot import, a helper that died) is rendered here; the error of that
        attempt is reported if it fails too.
        """
        failed: dict[int, BaseException] = {}
        for position in reversed(range(len(self._pending))):
            job = self._pending[position]
            if job.png is not None or job.job_file is None:
                continue
            if not _take(job.job_file):
                break  # the helper has this one; it reached the ones before too
            job.job_file = None
            try:
                job.render_here()
            except Exception as error:
                failed[position] = error
        done = []
        for position, job in enumerate(self._pending):
            if job.png is None and position not in failed:
                try:
                    if self._reply(job) == b"ok\n":
                        job.png = job.path.read_bytes()
                        job.hand_over(_read_value(job.job_file))
                    else:
                        job.render_here()
                except Exception as error:
                    failed[position] = error
            if position in failed:
                done.append(RenderedFigure(job.name, job.step, job.path, None, failed[position]))
            else:
                done.append(RenderedFigure(job.name, job.step, job.path, job.png))
        self._pending.clear()
        return done

    def _reply(self, job: _Job) -> bytes:
        """The helper's reply line about `job` (b"" if the helper is gone).

        Replies come one line per job, in order; lines about jobs this process took
        (`taken`) are skipped on the way.
        """
        while self._helper is not None and self._helper.stdout is not None:
            if self._answered >= job.number:
                break  # read already: cannot happen when jobs are collected in order
            line = self._helper.stdout.readline()
            if not line:
                break
            self._answered += 1
            if self._answered == job.number:
                return line
        return b""

    def close(self) -> None:
        """Stop the helper (figures not yet rendered are dropped) and remove its files."""
        if self._helper is not None:
            if self._helper.stdin is not None:
                with contextlib.suppress(OSError):  # a helper that died leaves a broken pipe
                    self._helper.stdin.close()  # the helper exits when it has read every job
            if self._jobs == 0:
                self._helper.kill()  # never given a job: nothing to finish or clean up
            elif any(job.png is None for job in self._pending):
                self._helper.terminate()  # a stopped run: no need to finish its figures
            try:
                self._helper.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._helper.kill()
                self._helper.wait()
            if self._helper.stdout is not None:
                self._helper.stdout.close()
            self._helper = None
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None
        self._pending.clear()
        self._jobs = self._answered = 0  # a later job starts a new helper, counting afresh

    def start(self) -> None:
        """Start the helper process now rather than at the first figure.

        Its imports (torch, matplotlib, the `preload` modules: 3 CPU-seconds) then run while
        this process is still starting, instead of delaying the first epoch's figures. Does
        nothing without `in_background`, or when started already.
        """
        if not self.in_background or self._helper is not None:
            return
        if self._folder is None:
            self._folder = Path(tempfile.mkdtemp(prefix="exigo-figures-"))
        # the helper imports what this process can: exigo, and the caller's own modules that
        # a pickled job may name; one torch thread, as it shares the CPUs with us
        search_path = os.pathsep.join(entry or os.getcwd() for entry in sys.path)
        self._helper = subprocess.Popen(
            [sys.executable, "-m", "exigo.figures.pool", *self.preload],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": search_path, "OMP_NUM_THREADS": "1"},
        )

    def _send(self, payload: bytes, path: Path, dpi: int) -> tuple[Path, int]:
        self.start()
        assert self._helper is not None
        if self._helper.poll() is not None:
            raise RuntimeError("the figure helper process stopped")
        assert self._folder is not None and self._helper.stdin is not None
        number = self._jobs + 1
        job = self._folder / f"{number}.pickle"
        job.write_bytes(payload)
        # one short line per figure: the pipe never fills, so this never waits for the helper
        self._helper.stdin.write(f"{job}\t{path.resolve()}\t{dpi}\n".encode())
        self._helper.stdin.flush()
        self._jobs = number  # counted once sent: reply n is about the n-th line sent
        return job, number


def _take(job: Path) -> bool:
    """Take a job from the helper's queue: True if the helper had not claimed it yet."""
    try:
        job.unlink()
    except FileNotFoundError:  # renamed by the helper (`_serve`): it is the helper's
        return False
    return True


def _value_file(job: Path) -> Path:
    """Where the helper leaves the `Drawn` value of the job pickled in `job`."""
    return job.with_suffix(".value")


def _read_value(job: Path | None) -> Any:
    """The value the helper left for `job` (and remove it); None if it left none."""
    path = None if job is None else _value_file(job)
    if path is None or not path.exists():
        return None
    value = pickle.loads(path.read_bytes())
    path.unlink()
    return value


def _serve(jobs: IO[bytes], replies: IO[bytes]) -> None:
    """The helper's loop: claim, draw and render each job; answer one line per job.

    `ok`, `error <message>`, or `taken` for a job the run's process took first (`_take`).
    """
    for line in jobs:
        job, path, dpi = line.decode().rstrip("\n").split("\t")
        claimed = Path(job).with_suffix(".claimed")
        try:
            os.rename(job, claimed)  # atomic: either this or the run's unlink succeeds
        except FileNotFoundError:
            replies.write(b"taken\n")
            replies.flush()
            continue
        try:
            draw, args, kwargs = pickle.loads(claimed.read_bytes())
            drawn = Drawn.of(draw(*args, **kwargs))
            atomic_write_bytes(path, render_png(drawn.figure, int(dpi)))
            if drawn.value is not None:
                _value_file(Path(job)).write_bytes(_pickle(drawn.value))
            replies.write(b"ok\n")
        except Exception as error:
            text = " ".join(f"{type(error).__name__}: {error}".split())
            replies.write(f"error rendering {Path(path).name}: {text}\n".encode())
        finally:
            claimed.unlink(missing_ok=True)
        replies.flush()


def _exit_on_sigterm(number: int, _frame: object) -> None:
    raise SystemExit(128 + number)  # unwinds atomic_write, which removes its temporary file


def _preload(modules: Sequence[str]) -> None:
    """Import what the jobs will need while the run trains (a failure shows in the job)."""
    for module in ("matplotlib.figure", "matplotlib.backends.backend_agg", *modules):
        with contextlib.suppress(Exception):
            importlib.import_module(module)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    # the module under its own name, not as __main__: the `Drawn` the jobs return (imported
    # from exigo.figures.pool) must be the class `_serve` checks for
    from exigo.figures import pool as _render

    _render._preload(sys.argv[1:])
    _render._serve(sys.stdin.buffer, sys.stdout.buffer)
    # every reply is flushed and every file written: skip Python's teardown of torch and
    # matplotlib (1 s), which the run's process would wait for in `close`
    os._exit(0)


class FigurePool:
    """Interim adapter (replaced by the loky pool): the new interface over `FigureRenderer`."""

    def __init__(self, *, workers: int = 1, preload=(), timeout: float = 300.0, log=print) -> None:
        self._renderer = FigureRenderer(in_background=workers > 0, preload=preload)

    def start(self) -> None:
        with contextlib.suppress(OSError):
            self._renderer.start()

    def submit(self, draw, args, kwargs, *, path, dpi, name, step, on_value=None) -> None:
        self._renderer.submit_draw(draw, args, kwargs, path, dpi, name, step, on_value)

    def collect(self):
        return self._renderer.collect()

    def close(self) -> None:
        self._renderer.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
