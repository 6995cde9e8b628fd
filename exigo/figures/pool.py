"""Figures drawn and rendered to PNG in a worker process while the run goes on.

Figures (building the Axes, matplotlib's constrained layout, Agg rasterisation, PNG encoding)
are a third of a default run's CPU time, all pure Python: a thread would hold the GIL and
overlap nothing, so they go to another process. `FigurePool.submit` hands the worker a draw
function and the data it draws, so the figure is built there too (cheaper for this process
than pickling a finished Figure), and returns at once. A draw function may also compute
something the run needs back and return it with the figure (`Drawn`): the t-SNE runs in the
worker this way. Before the pipeline commits an epoch it waits for its figures (`collect`),
so `report.html` and `models/last.pt` never come before the figures they describe. While it
waits it shares the remaining work: it draws the figures the worker has not started, from the
last one back, while the worker takes them from the front (the t-SNE, submitted first, runs
long in the worker while this process draws the ones behind it), so both cores work until
the queue is empty; a caller that collects on a thread beside the run's training shares only
once the training waits for it (`collect(share=...)`). Either way the PNG is byte for byte the
one this process would write.

The workers come from `loky.ProcessPoolExecutor`, a maintained executor, rather than
`multiprocessing`: its workers start by fork+exec, so they neither re-run the caller's
`__main__` script (as `spawn` would) nor inherit torch's OpenMP state (as `fork` would); jobs
travel with cloudpickle, so closures and functions of a user's script work; and it reports a
dead worker as `BrokenProcessPool` instead of hanging. A worker imports matplotlib and the
`preload` modules as it starts, runs one OpenMP thread (it shares the CPUs with training) and
ignores Ctrl-C (the run decides when to stop).

The executor gets one job per worker at a time, and none before its workers have started;
the others wait here, where `collect` can take them. loky marks the jobs in its call queue
running (up to twice the workers, plus one), whether a worker has started them or not, and
`Future.cancel` cannot take them back: a queue handed over at once would keep three figures
behind the t-SNE, and the first epoch's figures would wait for the worker's start.

Nothing falls back silently: a figure the worker cannot draw (it cannot be pickled, it raises
there, the worker died or took longer than `timeout`) is drawn in this process with one line
through `log` saying which and why; a worker that died, hung or never started is replaced
at the next `submit`.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import importlib
import io
import os
import re
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeoutError
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import numpy as np

from exigo._io import atomic_write_bytes

if TYPE_CHECKING:
    from loky import ProcessPoolExecutor
    from matplotlib.figure import Figure

__all__ = [
    "Drawn",
    "FigurePool",
    "RenderedFigure",
    "figure_workers",
    "render_png",
]


@dataclass(frozen=True)
class Drawn:
    """What a draw function returns when it computes something the run needs back.

    The t-SNE figure's draw function computes the layout too, so the t-SNE runs in the worker
    process; the next epoch starts from that layout. `value` is pickled back to the run's
    process and handed to the `on_value` callback of `FigurePool.submit` when the figure is
    collected.

    Attributes:
        figure: the matplotlib Figure to render.
        value: anything picklable.
    """

    figure: Figure
    value: Any

    @classmethod
    def of(cls, drawn: Figure | Drawn) -> Drawn:
        """What a draw function returned, as a `Drawn`.

        Args:
            drawn: a matplotlib Figure or a `Drawn`.

        Returns:
            `drawn` itself, or a plain Figure with the value None.
        """
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
    # zlib level 3: 40% less encoding time than the default 6 for 2.5% larger files
    Image.fromarray(rgb).save(buffer, format="png", compress_level=3)
    return buffer.getvalue()


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


def _on_cpu(tree: Any) -> Any:
    """`tree` with every tensor of another device replaced by its CPU copy: the worker needs no GPU.

    Looks into tuples (named ones too), lists and dicts. CPU tensors, and containers with
    nothing to replace, are returned as they are, not copied.
    """
    torch = sys.modules.get("torch")  # no tensor without torch imported
    if torch is None:
        return tree
    if isinstance(tree, torch.Tensor):
        return tree if tree.device.type == "cpu" else tree.cpu()
    if isinstance(tree, (tuple, list)):
        items = [_on_cpu(item) for item in tree]
        if all(new is old for new, old in zip(items, tree, strict=True)):
            return tree
        if isinstance(tree, list):
            return items
        return type(tree)(*items) if hasattr(tree, "_fields") else tuple(items)
    if isinstance(tree, dict):
        values = {key: _on_cpu(value) for key, value in tree.items()}
        if all(values[key] is value for key, value in tree.items()):
            return tree
        return values
    return tree


def figure_workers(is_main: bool = True) -> int:
    """How many figure worker processes a run's process gets: the one rule for every caller.

    One on the process that draws (rank 0 under torchrun) when two CPUs or more are
    available: it draws while the run trains on the other. None otherwise: the figures are
    drawn in the run's process.

    Args:
        is_main: this process draws the run's figures.

    Returns:
        1 or 0.
    """
    from exigo._system import available_cpus

    return 1 if is_main and available_cpus() >= 2 else 0


#: How often `collect`, not sharing, looks whether the workers took the figures waiting here.
_SHARE_POLL_SECONDS = 0.05

#: How often a worker checks that the process that started it is still alive.
PARENT_CHECK_SECONDS = 0.5


def _start_worker(preload: Sequence[str], run: int | None = None) -> None:
    """A worker's initializer: ignore Ctrl-C, outlive no run, import what the jobs will need.

    `run` is the pid of the process that created the pool: read there, not here, so a run
    that died before its worker started is noticed too.
    """
    # Ctrl-C reaches the whole process group; the run decides when to stop its figures
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _exit_with_parent(os.getppid() if run is None else run)
    for module in ("matplotlib.figure", "matplotlib.backends.backend_agg", *preload):
        # a module that fails to import here fails again, visibly, in the job that needs it
        with contextlib.suppress(Exception):
            importlib.import_module(module)
    # loky's worker runs a full `gc.collect()` after a job when a second has passed since the
    # last (without psutil): with torch and matplotlib loaded that walks ~300,000 objects,
    # 0.2 s measured here, before the next figure can start. The modules just imported are
    # never garbage: out of those walks they go (the figures' own cycles are still collected)
    gc.freeze()


def _exit_with_parent(parent: int) -> None:
    """End this worker when `parent` (the run) is gone, on a daemon thread.

    A run killed with SIGKILL (or by the out-of-memory killer) cannot stop its workers, and a
    loky worker waiting for its next job would otherwise live on (600 MB with torch loaded):
    once its parent has died the worker is someone else's child (`os.getppid()` changes) and
    exits within `PARENT_CHECK_SECONDS`. POSIX only: on Windows a process' parent id does not
    change when the parent dies, so there the watch never fires.
    """

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_CHECK_SECONDS)
        os._exit(0)  # no job of a dead run is worth finishing; nothing here to flush

    threading.Thread(target=watch, name="exigo-parent-watch", daemon=True).start()


def _draw_and_render(
    draw: Callable[..., Figure | Drawn], args: tuple[Any, ...], kwargs: dict[str, Any], dpi: int
) -> tuple[bytes, Any]:
    """A job, in the worker: the PNG and the value (this process writes the file)."""
    drawn = Drawn.of(draw(*args, **kwargs))
    return render_png(drawn.figure, dpi), drawn.value


def _describe(error: BaseException) -> str:
    """One line about `error`, with the worker's own error when loky wraps it."""
    message = str(error)
    if _is_broken(error):  # loky's paragraph about a dead worker: its first sentence, the codes
        codes = re.search(r"exit codes? of the workers? (?:are|is) (\{.*?\})", message)
        message = message.split(". ")[0].rstrip(".")
        if codes is not None:
            message = f"{message} (exit codes {codes[1]})"
    text = f"{type(error).__name__}: {message}"
    cause = error.__cause__
    if cause is not None:  # loky's remote traceback, in quotes: its last line is the error
        lines = [line.strip() for line in str(cause).splitlines()]
        lines = [line for line in lines if line and line != '"""']
        if lines and lines[-1] not in text:
            text = f"{text} ({lines[-1]})"
    return " ".join(text.split())


@dataclass(eq=False)  # compared and hashed by identity: the in-flight set holds jobs
class _Job:
    name: str
    step: int
    path: Path
    dpi: int
    draw: Callable[..., Figure | Drawn]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    on_value: Callable[[Any], None] | None
    future: Future[tuple[bytes, Any]] | None = None  # set once handed to an executor
    executor: ProcessPoolExecutor | None = None  # the one it was handed to
    lost: str | None = None  # why its worker will not deliver it: stopped for another figure
    done: RenderedFigure | None = field(default=None, repr=False)


class FigurePool:
    """Draws and renders figures in worker processes; `collect()` returns them in order.

    Also a context manager that calls `close` on exit.

    Args:
        workers: worker processes; 0 draws every figure at once in `submit`, in this process
            (the pipeline's choice on a machine with one CPU).
        preload: modules a worker imports as it starts (openTSNE for the t-SNE), so that cost
            overlaps the first epoch's training instead of delaying its figures.
        timeout: seconds `collect` waits for one figure before it stops the worker and draws
            that figure in this process.
        log: takes one-line messages for the run's console: each figure drawn in this process
            because the worker could not draw it.
    """

    def __init__(
        self,
        *,
        workers: int = 1,
        preload: Sequence[str] = (),
        timeout: float = 300.0,
        log: Callable[[str], None] = print,
    ) -> None:
        if workers < 0:
            raise ValueError(f"workers must be 0 or more, not {workers}")
        self.workers = workers
        self.preload = tuple(preload)
        self.timeout = timeout
        self.log = log
        self._jobs: list[_Job] = []  # submitted since the last collect, in order
        self._backlog: deque[_Job] = deque()  # waiting here for a free worker
        self._in_flight: set[_Job] = set()  # handed to an executor, not finished
        self._executor: ProcessPoolExecutor | None = None
        self._ready = False  # its worker has started (loky has run a first job)
        self._started_at = 0.0  # time.monotonic() when it was created
        self._drew_here = False  # this process has drawn a figure (matplotlib's start-up paid)
        self._start_failure: str | None = None  # why the last one never started
        # dropped (broken, hung, closed): shut down from this thread, not from loky's
        self._retired: list[ProcessPoolExecutor] = []
        # guards the attributes above: loky's threads call back when a job ends
        self._lock = threading.RLock()

    def __enter__(self) -> FigurePool:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def start(self) -> None:
        """Start the worker processes now rather than at the first figure.

        Their imports (matplotlib, the `preload` modules: seconds of CPU) then run while this
        process is still starting, instead of delaying the first epoch's figures. Does nothing
        with `workers=0`, or when started already.
        """
        if self.workers == 0:
            return
        self._stop_retired()
        with self._lock:
            if self._executor is None:
                try:
                    self._start_executor()
                except Exception as error:  # `collect` says so
                    self._start_failure = f"no worker: {_describe(error)}"

    def submit(
        self,
        draw: Callable[..., Figure | Drawn],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        *,
        path: Path,
        dpi: int,
        name: str,
        step: int,
        on_value: Callable[[Any], None] | None = None,
    ) -> None:
        """Have `draw(*args, **kwargs)` drawn and its PNG written to `path`; never waits.

        `draw` and its arguments travel to the worker with cloudpickle: module-level
        functions, closures and functions of the user's script work; tensors on another
        device travel as CPU copies (also inside tuples, lists and dicts). They are read when
        the figure is drawn, up to `collect`: do not modify them before.

        Args:
            draw: returns a matplotlib Figure, or a `Drawn` (a Figure and a value).
            args: its positional arguments.
            kwargs: its keyword arguments.
            path: the PNG to write (atomically).
            dpi: resolution.
            name: figure name (file stem and TensorBoard tag), in log lines too.
            step: TensorBoard step.
            on_value: called once in this process with the `Drawn` value (None for a plain
                Figure) when the figure is written: by `collect`, or at once with
                `workers=0`. Not called when the figure fails.
        """
        args, kwargs = _on_cpu(args), _on_cpu(kwargs)
        job = _Job(name, step, Path(path), dpi, draw, args, kwargs, on_value)
        self._jobs.append(job)
        if self.workers == 0:
            self._draw_here(job)
            return
        self._stop_retired()
        with self._lock:
            self._backlog.append(job)
            self._dispatch(create=True)

    def collect(self, share: threading.Event | None = None) -> list[RenderedFigure]:
        """Wait for every submitted figure; the written ones and the failures.

        This process would only wait, so it shares the remaining work: it draws the figures
        no worker has started, from the last one back, while the workers take them from the
        front; a lone waiting figure it leaves to a started worker as long as this process
        has drawn none (its first figure also pays matplotlib's start-up, 0.3 s measured
        here, which a queue of one does not repay); then it waits for the workers' figures,
        at most `timeout` seconds each. With no worker left to take them, it draws them all.
        A figure a worker could not draw is drawn here, with one line through `log`.

        Args:
            share: while this event is clear, the figures no worker has started wait for the
                workers instead (unless none is left to take them): the caller collects on a
                thread beside the run's training, which drawing here would slow down (the
                drawing is pure Python and holds the interpreter lock; measured here, it
                halved the training's speed while it lasted). Once it is set (the training
                waits for this thread), this process shares the work again. None: share at
                once.

        Returns:
            One `RenderedFigure` per submitted figure, in submission order; `png` is None
            and `error` set for a figure that failed here too. Each `on_value` has been
            called before this returns.
        """
        with self._lock:
            starting = self._executor is not None and not self._ready
            if starting and time.monotonic() - self._started_at > self.timeout:
                self._start_failure = (
                    f"the worker took more than {self.timeout:g} s to start and was stopped"
                )
                self._drop(self._executor)
            failure = self._start_failure if self._backlog else None
            names = ", ".join(job.name for job in self._backlog)
            if failure is not None:  # said once; kept till figures are drawn here for it
                self._start_failure = None
        if failure is not None:
            self.log(f"figures {names}: drawn in the run's process ({failure})")
        self._stop_retired()
        while True:
            with self._lock:
                if not self._backlog:
                    break
                sharing = share is None or share.is_set()
                no_worker = self._executor is None  # none will take them: all drawn here
                worth_it = len(self._backlog) > 1 or not self._ready or self._drew_here
                job = self._backlog.pop() if no_worker or (sharing and worth_it) else None
                # the figure the worker draws now, which the one left to it waits behind (one
                # whose result `_wait` has taken stays in flight until loky's thread says so)
                drawing = None
                if job is None and sharing:
                    drawing = next(
                        (j for j in self._jobs if j in self._in_flight and j.done is None), None
                    )
            if job is not None:
                self._draw_here(job)
            elif drawing is not None:  # wait for it under `timeout`: a hung worker is stopped
                self._wait(drawing)  # and the figure left to it is then drawn here
            elif share is not None and not share.is_set():
                share.wait(_SHARE_POLL_SECONDS)  # wakes when sharing may start
            else:  # the worker takes the backlog from the front meanwhile
                time.sleep(_SHARE_POLL_SECONDS)
        for job in self._jobs:
            if job.done is None:
                self._wait(job)
        done = [job.done for job in self._jobs if job.done is not None]
        self._jobs.clear()
        self._stop_retired()
        return done

    def close(self) -> None:
        """Stop the workers; figures not collected yet are dropped (a stopped run).

        Jobs not started are cancelled and the workers killed without waiting for the
        figure they draw, so this never hangs; this process writes every PNG, so no
        temporary file is left behind. Can be called twice; a later `submit` starts new
        workers.
        """
        with self._lock:
            self._backlog.clear()
            for job in list(self._in_flight):  # cancel() runs `_finished` at once
                if job.future is not None:
                    job.future.cancel()
            self._in_flight.clear()
            self._jobs.clear()
            self._drop(self._executor)
            self._start_failure = None
        self._stop_retired()

    def _start_executor(self) -> None:
        """Create the executor and start its workers (caller holds the lock).

        loky starts workers with a first job: one that does nothing, whose end says they are
        ready. Figures go to a worker only then: a figure handed to a starting worker could
        not be taken back, and this process would wait for the worker's start to get it.
        """
        from loky import ProcessPoolExecutor

        executor = ProcessPoolExecutor(
            max_workers=self.workers,
            initializer=_start_worker,
            initargs=(self.preload, os.getpid()),
            env={"OMP_NUM_THREADS": "1"},  # it shares the CPUs with training
        )
        self._executor, self._ready, self._started_at = executor, False, time.monotonic()
        try:
            started = executor.submit(int)
        except Exception:
            self._drop(executor)
            raise
        started.add_done_callback(functools.partial(self._started, executor))

    def _started(self, executor: ProcessPoolExecutor, future: Future[int]) -> None:
        """The first job of `executor` ended (called from loky's threads)."""
        with self._lock:
            if executor is not self._executor:
                return
            error = None if future.cancelled() else future.exception()
            if error is not None:  # died in its initializer: `collect` says so
                self._start_failure = f"the worker did not start: {_describe(error)}"
                self._drop(executor)
                return
            self._ready, self._start_failure = True, None
            self._dispatch(create=False)

    def _dispatch(self, *, create: bool) -> None:
        """Hand waiting jobs to the executor, one per idle worker (caller holds the lock).

        `create`: start an executor if there is none (not from loky's threads).
        """
        while self._backlog and len(self._in_flight) < self.workers:
            if self._executor is None:
                if not create:
                    return
                try:
                    self._start_executor()
                except Exception as error:  # `collect` says so
                    self._start_failure = f"no worker: {_describe(error)}"
                    return
            if not self._ready:
                return  # `_started` calls again
            executor = self._executor
            job = self._backlog.popleft()
            try:
                future = executor.submit(_draw_and_render, job.draw, job.args, job.kwargs, job.dpi)
            except Exception:  # broken or stopped meanwhile: a new one, or this process
                self._backlog.appendleft(job)
                self._drop(executor)
                continue
            job.future, job.executor = future, executor
            self._in_flight.add(job)
            future.add_done_callback(functools.partial(self._finished, job))

    def _finished(self, job: _Job, future: Future[tuple[bytes, Any]]) -> None:
        """A job's future is done (called from loky's threads): give its worker the next."""
        with self._lock:
            self._in_flight.discard(job)
            if not future.cancelled() and _is_broken(future.exception()):
                self._drop(job.executor)
            self._dispatch(create=False)

    def _drop(self, executor: ProcessPoolExecutor | None) -> None:
        """No more jobs for `executor` (caller holds the lock); `_stop_retired` stops it."""
        if executor is not None and executor is self._executor:
            self._executor, self._ready = None, False
            self._retired.append(executor)

    def _stop_retired(self) -> None:
        """Shut the dropped executors down, killing their workers (not from loky's threads)."""
        with self._lock:
            retired, self._retired = self._retired, []
        for executor in retired:
            with contextlib.suppress(Exception):  # a broken executor has stopped already
                executor.shutdown(wait=False, kill_workers=True)

    def _wait(self, job: _Job) -> None:
        """Wait for a job a worker has; draw it here if the worker cannot deliver it."""
        assert job.future is not None
        if job.done is not None:  # delivered, or drawn here, already
            return
        if job.lost is not None:  # its worker was stopped for another figure
            self.log(f"figure {job.name}: drawn in the run's process ({job.lost})")
            self._draw_here(job)
            return
        try:
            png, value = job.future.result(timeout=self.timeout)
        except FutureTimeoutError:
            self.log(
                f"figure {job.name}: drawn in the run's process (the worker took more than "
                f"{self.timeout:g} s on it and was stopped)"
            )
            self._stop(job)
            self._draw_here(job)
            return
        except Exception as error:
            why = "died" if _is_broken(error) else "failed"
            self.log(
                f"figure {job.name}: drawn in the run's process (the worker {why}: "
                f"{_describe(error)})"
            )
            self._draw_here(job)
            return
        try:
            atomic_write_bytes(job.path, png)
            self._hand_over(job, value)
        except Exception as error:
            job.done = RenderedFigure(job.name, job.step, job.path, None, error)
            return
        job.done = RenderedFigure(job.name, job.step, job.path, png)

    def _stop(self, hung: _Job) -> None:
        """Kill the executor of a job that took too long; its other jobs are drawn here."""
        with self._lock:
            executor = hung.executor
            self._drop(executor)
            for job in list(self._in_flight):
                if job.executor is executor:
                    self._in_flight.discard(job)
                    if job is not hung:
                        job.lost = f"its worker was stopped: figure {hung.name} took too long"
        self._stop_retired()

    def _draw_here(self, job: _Job) -> None:
        """Draw, render and write `job` in this process; keep the figure or its error."""
        self._drew_here = True
        try:
            drawn = Drawn.of(job.draw(*job.args, **job.kwargs))
            png = render_png(drawn.figure, job.dpi)
            atomic_write_bytes(job.path, png)
            self._hand_over(job, drawn.value)
        except Exception as error:
            job.done = RenderedFigure(job.name, job.step, job.path, None, error)
            return
        job.done = RenderedFigure(job.name, job.step, job.path, png)

    @staticmethod
    def _hand_over(job: _Job, value: Any) -> None:
        on_value, job.on_value = job.on_value, None
        job.draw, job.args, job.kwargs = _no_draw, (), {}  # let the data go
        if on_value is not None:
            on_value(value)


def _no_draw() -> Figure:
    raise RuntimeError("this figure was drawn already")


def _is_broken(error: BaseException | None) -> bool:
    from loky import BrokenProcessPool

    return isinstance(error, BrokenProcessPool)
