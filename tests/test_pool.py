import collections
import gc
import io
import os
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from matplotlib.artist import Artist
from matplotlib.figure import Figure
from PIL import Image

from exigo.figures.pool import Drawn, FigurePool, _on_cpu, render_png

# torch is imported inside the tests that need it: the workers import this module to find the
# draw functions defined here, and torch would add seconds to each worker's start


def make_figure(seed: int = 0) -> Figure:
    figure = Figure(figsize=(2, 1.5), layout="constrained")
    ax = figure.subplots()
    ax.imshow(np.random.default_rng(seed).random((6, 6)), cmap="viridis")
    ax.set_title(f"figure {seed}")
    return figure


def expected_png(seed: int) -> bytes:
    """What drawing `make_figure(seed)` in this process writes."""
    return render_png(make_figure(seed), dpi=50)


def decoded(source) -> np.ndarray:
    """Pixels [H, W, 3] of a PNG file, or of PNG bytes."""
    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
        return np.asarray(image.convert("RGB"))


class Exploding(Artist):
    """An artist whose drawing fails, in whichever process draws it."""

    def draw(self, renderer):
        raise RuntimeError("this artist cannot be drawn")


def figure_and_pid(seed: int) -> Drawn:
    return Drawn(make_figure(seed), (seed, os.getpid()))


def figure_after(seed: int, paths: list[str]) -> Drawn:
    """In the worker: wait until the figures behind this one are drawn in the run's process."""
    deadline = time.monotonic() + 20
    while not all(Path(path).exists() for path in paths):
        if time.monotonic() > deadline:
            return Drawn(make_figure(seed), (seed, "gave up waiting"))
        time.sleep(0.01)
    return figure_and_pid(seed)


def fails_in_the_worker(seed: int, run_pid: int) -> Drawn:
    if os.getpid() != run_pid:
        raise ValueError("not in the run's process")
    return figure_and_pid(seed)


def hangs_in_the_worker(seed: int, run_pid: int) -> Drawn:
    if os.getpid() != run_pid:
        time.sleep(30)
    return figure_and_pid(seed)


def dies_in_the_worker(seed: int, run_pid: int) -> Drawn:
    if os.getpid() != run_pid:
        os._exit(1)
    return figure_and_pid(seed)


def exploding_figure(seed: int) -> Figure:
    figure = make_figure(seed)
    figure.add_artist(Exploding())
    return figure


def worker_facts(seed: int) -> Drawn:
    facts = {
        "pid": os.getpid(),
        "threads": os.environ.get("OMP_NUM_THREADS"),
        "ignores_ctrl_c": signal.getsignal(signal.SIGINT) is signal.SIG_IGN,
        "imported": sorted(
            name for name in ("tabnanny", "matplotlib.backends.backend_agg") if name in sys.modules
        ),
        # the imports' objects sit out of loky's collections after every job
        "frozen": gc.get_freeze_count(),
    }
    return Drawn(make_figure(seed), facts)


def write_pid_and_hang(seed: int, pid_file: str) -> Figure:
    Path(pid_file).write_text(str(os.getpid()))
    time.sleep(30)
    return make_figure(seed)


def wait_for_file(path: Path, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert path.exists()


def gone_or_zombie(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return "\nState:\tZ" in status


def ready(pool: FigurePool) -> FigurePool:
    """`pool` once its worker is up: a figure submitted now goes there, collect cannot take it."""
    pool.start()
    deadline = time.monotonic() + 60
    while not pool._ready:
        assert time.monotonic() < deadline, "the worker did not start"
        time.sleep(0.01)
    return pool


def test_render_png_is_an_rgb_png_of_the_figure_size():
    rgb = decoded(render_png(make_figure(), dpi=50))
    assert rgb.dtype == np.uint8 and rgb.shape == (75, 100, 3)  # 2 x 1.5 inches at 50 dpi
    assert len(np.unique(rgb.reshape(-1, 3), axis=0)) > 10  # drawn, not blank


@pytest.mark.parametrize("workers", [0, 1])
def test_pool_writes_the_png_this_process_would_in_submission_order(tmp_path, workers):
    lines = []
    with FigurePool(workers=workers, log=lines.append) as pool:
        for seed in range(3):
            path = tmp_path / f"f{seed}.png"
            pool.submit(make_figure, (seed,), {}, path=path, dpi=50, name=f"f{seed}", step=seed)
        done = pool.collect()
        assert pool.collect() == []
    assert [(figure.name, figure.step, figure.error) for figure in done] == [
        ("f0", 0, None),
        ("f1", 1, None),
        ("f2", 2, None),
    ]
    for seed, figure in enumerate(done):
        assert figure.png == expected_png(seed) == figure.path.read_bytes()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["f0.png", "f1.png", "f2.png"]
    assert lines == []


def test_without_workers_submit_draws_at_once(tmp_path):
    values = []
    pool = FigurePool(workers=0)
    pool.start()  # nothing to start
    pool.submit(
        figure_and_pid,
        (2,),
        {},
        path=tmp_path / "a.png",
        dpi=50,
        name="a",
        step=1,
        on_value=values.append,
    )
    assert values == [(2, os.getpid())] and (tmp_path / "a.png").read_bytes() == expected_png(2)
    (done,) = pool.collect()
    assert done.png == expected_png(2) and values == [(2, os.getpid())]
    pool.close()


def test_collect_draws_the_figures_the_worker_has_not_started_while_it_draws(tmp_path):
    values = []
    lines = []
    with ready(FigurePool(log=lines.append)) as pool:
        behind = [tmp_path / f"{seed}.png" for seed in (1, 2, 3)]
        # the worker holds this one until the three behind it have been drawn here: submit
        # waits for none of them, and collect draws them meanwhile, not behind it, the last
        # one waiting too once it has drawn one (matplotlib's start-up is paid then)
        pool.submit(
            figure_after,
            (0, [str(path) for path in behind]),
            {},
            path=tmp_path / "0.png",
            dpi=50,
            name="f0",
            step=1,
            on_value=values.append,
        )
        started = time.perf_counter()
        for seed, path in zip((1, 2, 3), behind, strict=True):
            pool.submit(
                figure_and_pid,
                (seed,),
                {},
                path=path,
                dpi=50,
                name=f"f{seed}",
                step=1,
                on_value=values.append,
            )
        assert time.perf_counter() - started < 1
        first = pool.collect()
        worker = dict(values).get(0)
        # the next epoch's figure goes to the same worker
        pool.submit(
            figure_and_pid,
            (4,),
            {},
            path=tmp_path / "4.png",
            dpi=50,
            name="f4",
            step=2,
            on_value=values.append,
        )
        second = pool.collect()
    assert [figure.error for figure in first + second] == [None] * 5
    here = os.getpid()
    assert worker not in (None, here)
    assert sorted(values) == [(0, worker), (1, here), (2, here), (3, here), (4, worker)]
    for seed, figure in enumerate(first + second):
        assert figure.png == expected_png(seed) == figure.path.read_bytes()
    assert lines == []


def test_collect_beside_training_shares_only_once_told(tmp_path):
    """`collect(share=)`: with the event clear nothing is drawn here, however long the queue."""
    values = []
    share = threading.Event()
    with ready(FigurePool()) as pool:
        paths = [tmp_path / f"{seed}.png" for seed in range(4)]
        # the worker holds the first figure until the others exist: only this process can
        # draw them, and it may only once `share` is set
        pool.submit(
            figure_after, (0, [str(path) for path in paths[1:]]), {}, path=paths[0], dpi=50,
            name="f0", step=1, on_value=values.append,
        )  # fmt: skip
        for seed in (1, 2, 3):
            pool.submit(
                figure_and_pid, (seed,), {}, path=paths[seed], dpi=50, name=f"f{seed}",
                step=1, on_value=values.append,
            )  # fmt: skip
        collected: list = []
        collecting = threading.Thread(target=lambda: collected.extend(pool.collect(share)))
        collecting.start()
        time.sleep(1.0)
        drawn_before = sorted(path.name for path in paths if path.exists())
        share.set()
        collecting.join(30)
    assert not collecting.is_alive()
    assert drawn_before == []  # the worker waits on f0, and collect drew nothing meanwhile
    here = os.getpid()
    worker = dict(values)[0]
    assert worker != here
    # told, it drew the three waiting here (the last one too, once it had drawn one)
    assert sorted(values) == [(0, worker), (1, here), (2, here), (3, here)]
    assert [figure.png for figure in collected] == [expected_png(seed) for seed in range(4)]


def test_a_lone_waiting_figure_goes_to_the_worker_while_this_process_has_drawn_none(tmp_path):
    """Its first figure would also pay matplotlib's start-up here: the started worker takes it."""
    values, lines = [], []
    with ready(FigurePool(log=lines.append)) as pool:
        for seed in (0, 1):  # the worker takes the first, the second waits behind it
            pool.submit(
                figure_and_pid, (seed,), {}, path=tmp_path / f"{seed}.png", dpi=50,
                name=f"f{seed}", step=1, on_value=values.append,
            )  # fmt: skip
        done = pool.collect()
    worker = dict(values)[0]
    assert worker != os.getpid()
    assert sorted(values) == [(0, worker), (1, worker)]
    assert [figure.png for figure in done] == [expected_png(0), expected_png(1)]
    assert lines == []


def test_a_figure_failed_in_the_worker_is_drawn_here_once_however_late_loky_says_so(
    tmp_path, monkeypatch
):
    """Regression: `collect` took a job loky had not yet marked finished for one the worker
    still drew, waited on it again, said its line again and overwrote the figure drawn here
    with "this figure was drawn already"."""
    values, lines = [], []
    with ready(FigurePool(log=lines.append)) as pool:
        finished = pool._finished

        def late(job, future):  # loky's thread calls this a while after the result is out
            time.sleep(0.5)
            finished(job, future)

        monkeypatch.setattr(pool, "_finished", late)
        pool.submit(
            fails_in_the_worker, (1, os.getpid()), {}, path=tmp_path / "1.png", dpi=50,
            name="fails", step=1, on_value=values.append,
        )  # fmt: skip
        pool.submit(
            figure_and_pid, (2,), {}, path=tmp_path / "2.png", dpi=50, name="behind", step=1,
            on_value=values.append,
        )  # fmt: skip
        done = pool.collect()
    assert [(figure.error, figure.png) for figure in done] == [
        (None, expected_png(1)),
        (None, expected_png(2)),
    ]
    assert sorted(values) == [(1, os.getpid()), (2, os.getpid())]
    (line,) = lines
    assert line.startswith("figure fails: drawn in the run's process (the worker failed")


def test_closures_and_functions_of_the_test_file_are_drawn_in_the_worker(tmp_path):
    values = []
    seed = 5

    def closure() -> Drawn:
        return Drawn(make_figure(seed), os.getpid())

    with ready(FigurePool()) as pool:
        pool.submit(
            closure,
            (),
            {},
            path=tmp_path / "closure.png",
            dpi=50,
            name="closure",
            step=1,
            on_value=values.append,
        )
        done = pool.collect()  # one at a time: collect draws the figures behind the first here
        pool.submit(
            lambda: figure_and_pid(6),
            (),
            {},
            path=tmp_path / "lambda.png",
            dpi=50,
            name="lambda",
            step=1,
            on_value=values.append,
        )
        done += pool.collect()
    assert [figure.png for figure in done] == [expected_png(5), expected_png(6)]
    assert values[0] == values[1][1] != os.getpid()


def test_tensors_of_other_devices_become_cpu_copies_and_cpu_ones_stay_as_they_are():
    import torch

    class Elsewhere(torch.Tensor):
        """A CPU tensor that says it lives on a GPU, and counts its copies to the CPU."""

        copies = 0

        @property
        def device(self):
            return torch.device("cuda", 0)

        def cpu(self, *args, **kwargs):
            Elsewhere.copies += 1
            return self.as_subclass(torch.Tensor).clone()

    Pair = collections.namedtuple("Pair", "left right")
    here = torch.arange(4.0)
    tree = (here, [here, {"maps": Pair(here, 3)}], "text")
    assert _on_cpu(tree) is tree  # nothing copied, no container rebuilt
    elsewhere = torch.arange(3.0).as_subclass(Elsewhere)
    converted = _on_cpu((1, [here, {"maps": Pair(elsewhere, here)}]))
    maps = converted[1][1]["maps"]
    assert isinstance(maps, Pair) and type(maps.left) is torch.Tensor
    assert torch.equal(maps.left, torch.arange(3.0)) and Elsewhere.copies == 1
    assert converted[1][0] is here and maps.right is here


def device_of(tensors: dict) -> Drawn:
    return Drawn(make_figure(0), [tensor.device.type for tensor in tensors["all"]])


def test_gpu_tensors_reach_the_worker_on_the_cpu(tmp_path):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")

    values = []
    tensors = {"all": [torch.ones(2, device="cuda"), torch.ones(2)]}
    with ready(FigurePool()) as pool:
        pool.submit(
            device_of,
            (tensors,),
            {},
            path=tmp_path / "a.png",
            dpi=50,
            name="a",
            step=1,
            on_value=values.append,
        )
        (done,) = pool.collect()
    assert done.error is None and values == [["cpu", "cpu"]]


@pytest.mark.parametrize("why", ["unpicklable", "raises"])
def test_a_figure_the_worker_cannot_draw_is_drawn_here_with_one_line(tmp_path, why):
    lines, values = [], []
    lock = threading.Lock()
    if why == "unpicklable":
        draw, args = (lambda seed: (lock, figure_and_pid(seed))[1]), (7,)
        reason = "TypeError: cannot pickle '_thread.lock' object"
    else:
        draw, args = fails_in_the_worker, (7, os.getpid())
        reason = "ValueError: not in the run's process"
    with ready(FigurePool(log=lines.append)) as pool:
        pool.submit(
            draw,
            args,
            {},
            path=tmp_path / "f.png",
            dpi=50,
            name="saliency_3",
            step=3,
            on_value=values.append,
        )
        (done,) = pool.collect()
    assert done.error is None and done.png == expected_png(7) == (tmp_path / "f.png").read_bytes()
    assert values == [(7, os.getpid())]
    (line,) = lines
    assert line.startswith("figure saliency_3: drawn in the run's process (the worker failed")
    assert reason in line


def test_a_figure_failing_here_too_is_returned_with_its_error(tmp_path):
    lines, values = [], []
    with ready(FigurePool(log=lines.append)) as pool:
        pool.submit(
            exploding_figure,
            (1,),
            {},
            path=tmp_path / "broken.png",
            dpi=50,
            name="broken",
            step=1,
            on_value=values.append,
        )
        pool.submit(make_figure, (2,), {}, path=tmp_path / "fine.png", dpi=50, name="fine", step=1)
        broken, fine = pool.collect()
    assert broken.png is None and isinstance(broken.error, RuntimeError)
    assert "this artist cannot be drawn" in str(broken.error)
    assert fine.error is None and fine.png == expected_png(2)
    assert values == [] and sorted(path.name for path in tmp_path.iterdir()) == ["fine.png"]
    (line,) = lines
    assert line.startswith("figure broken:") and "this artist cannot be drawn" in line


@pytest.mark.parametrize("beside_training", [False, True])
def test_the_figure_left_to_a_hung_worker_is_drawn_here_after_the_timeout(
    tmp_path, beside_training
):
    """The last waiting figure is left to the worker, but not behind a figure it hangs on."""
    lines, values = [], []
    share = threading.Event() if beside_training else None
    with ready(FigurePool(timeout=2, log=lines.append)) as pool:
        pool.submit(
            hangs_in_the_worker, (1, os.getpid()), {}, path=tmp_path / "1.png", dpi=50,
            name="hung", step=1, on_value=values.append,
        )  # fmt: skip
        pool.submit(
            figure_and_pid, (2,), {}, path=tmp_path / "2.png", dpi=50, name="behind", step=1,
            on_value=values.append,
        )  # fmt: skip
        timer = threading.Timer(0.5, share.set) if share is not None else None
        if timer is not None:  # the loop waits for the thread that collects: it may share
            timer.start()
        done = pool.collect(share)  # without the timeout: 30 s, and no line (asserted below)
        if timer is not None:
            timer.cancel()
            timer.join()
    assert [figure.png for figure in done] == [expected_png(1), expected_png(2)]
    assert sorted(values) == [(1, os.getpid()), (2, os.getpid())]
    # the hung one is said; the one behind it is shared as any figure no worker started
    (line,) = lines
    assert line.startswith("figure hung: drawn in the run's process (the worker took more")


def test_a_hung_worker_is_stopped_after_the_timeout_and_replaced(tmp_path):
    lines, values = [], []
    with ready(FigurePool(timeout=2, log=lines.append)) as pool:
        started = time.monotonic()
        pool.submit(
            hangs_in_the_worker,
            (1, os.getpid()),
            {},
            path=tmp_path / "1.png",
            dpi=50,
            name="hung",
            step=1,
            on_value=values.append,
        )
        (done,) = pool.collect()
        assert time.monotonic() - started < 15
        pool.timeout = 60  # a busy machine may take 2 s for the next one
        pool.submit(
            figure_and_pid,
            (2,),
            {},
            path=tmp_path / "2.png",
            dpi=50,
            name="next",
            step=1,
            on_value=values.append,
        )
        assert pool._executor is not None  # a new one: wait for its worker
        ready(pool)
        (after,) = pool.collect()
    assert done.error is None and done.png == expected_png(1) == (tmp_path / "1.png").read_bytes()
    assert after.png == expected_png(2)
    assert values[0] == (1, os.getpid()) and values[1][1] != os.getpid()
    assert [line for line in lines if "more than 2 s" in line] == lines
    assert len(lines) == 1 and lines[0].startswith("figure hung: drawn in the run's process")


def test_a_dead_worker_is_replaced_at_the_next_submit(tmp_path):
    lines, values = [], []
    with ready(FigurePool(log=lines.append)) as pool:
        pool.submit(
            dies_in_the_worker,
            (1, os.getpid()),
            {},
            path=tmp_path / "1.png",
            dpi=50,
            name="fatal",
            step=1,
            on_value=values.append,
        )
        (done,) = pool.collect()
        pool.submit(
            figure_and_pid,
            (2,),
            {},
            path=tmp_path / "2.png",
            dpi=50,
            name="next",
            step=1,
            on_value=values.append,
        )
        assert pool._executor is not None  # a new one: wait for its worker
        ready(pool)
        (after,) = pool.collect()
    assert done.error is None and done.png == expected_png(1)
    assert after.error is None and after.png == expected_png(2)
    assert values[0] == (1, os.getpid()) and values[1][1] != os.getpid()
    (line,) = lines
    assert line.startswith("figure fatal: drawn in the run's process (the worker died")


def test_the_worker_runs_one_thread_ignores_ctrl_c_and_preloads(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    values = []
    # a module that cannot be imported leaves the worker working
    with ready(FigurePool(preload=["tabnanny", "exigo_no_such_module"])) as pool:
        pool.submit(
            worker_facts,
            (1,),
            {},
            path=tmp_path / "a.png",
            dpi=50,
            name="a",
            step=1,
            on_value=values.append,
        )
        (done,) = pool.collect()
    assert done.error is None
    (facts,) = values
    assert facts["pid"] != os.getpid()
    assert facts["threads"] == "1" and facts["ignores_ctrl_c"]
    assert facts["imported"] == ["matplotlib.backends.backend_agg", "tabnanny"]
    assert facts["frozen"] > 40_000  # matplotlib's objects alone: about 62,000


def test_start_is_idempotent():
    pool = FigurePool()
    try:
        pool.start()
        executor = pool._executor
        pool.start()
        assert pool._executor is executor is not None
    finally:
        pool.close()
    assert pool._executor is None


def test_close_with_figures_pending_returns_at_once_and_a_later_submit_works(tmp_path):
    pid_file = tmp_path / "worker.pid"
    pool = ready(FigurePool())
    pool.submit(
        write_pid_and_hang,
        (0, str(pid_file)),
        {},
        path=tmp_path / "0.png",
        dpi=50,
        name="f0",
        step=1,
    )
    for seed in (1, 2, 3):
        pool.submit(
            make_figure, (seed,), {}, path=tmp_path / f"{seed}.png", dpi=50, name=f"f{seed}", step=1
        )
    wait_for_file(pid_file)
    worker = int(pid_file.read_text())
    started = time.monotonic()
    pool.close()
    pool.close()
    assert time.monotonic() - started < 2
    deadline = time.monotonic() + 10
    while not gone_or_zombie(worker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert gone_or_zombie(worker)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["worker.pid"]  # no .tmp
    values = []
    ready(pool)  # a new worker
    pool.submit(
        figure_and_pid,
        (4,),
        {},
        path=tmp_path / "4.png",
        dpi=50,
        name="f4",
        step=2,
        on_value=values.append,
    )
    (done,) = pool.collect()
    pool.close()
    assert done.png == expected_png(4) and values[0][1] not in (os.getpid(), worker)


def test_figures_do_not_wait_for_a_starting_worker(tmp_path, monkeypatch):
    (tmp_path / "slow_to_import.py").write_text("import time\ntime.sleep(20)\n")
    monkeypatch.syspath_prepend(str(tmp_path))  # the worker starts with this sys.path
    lines, values = [], []
    with FigurePool(preload=["slow_to_import"], log=lines.append) as pool:
        pool.start()
        started = time.monotonic()
        for seed in (1, 2):
            pool.submit(
                figure_and_pid,
                (seed,),
                {},
                path=tmp_path / f"{seed}.png",
                dpi=50,
                name=f"f{seed}",
                step=1,
                on_value=values.append,
            )
        done = pool.collect()
        assert time.monotonic() - started < 10
    assert [figure.png for figure in done] == [expected_png(1), expected_png(2)]
    assert sorted(values) == [(1, os.getpid()), (2, os.getpid())] and lines == []


def test_a_worker_that_cannot_start_is_reported_in_one_line(tmp_path, monkeypatch):
    (tmp_path / "exits_on_import.py").write_text("import os\nos._exit(3)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    lines = []
    with FigurePool(preload=["exits_on_import"], log=lines.append) as pool:
        pool.start()
        deadline = time.monotonic() + 60
        while pool._start_failure is None and time.monotonic() < deadline:
            time.sleep(0.01)
        for seed in (1, 2):
            path = tmp_path / f"{seed}.png"
            pool.submit(make_figure, (seed,), {}, path=path, dpi=50, name=f"f{seed}", step=1)
        done = pool.collect()
    assert [figure.png for figure in done] == [expected_png(1), expected_png(2)]
    (line,) = lines
    assert line.startswith("figures f1, f2: drawn in the run's process (the worker did not start")
    assert "TerminatedWorkerError" in line


_ORPHAN_SCRIPT = """
import os, sys, time
from pathlib import Path
from matplotlib.figure import Figure
from exigo.figures.pool import Drawn, FigurePool

def pid_figure():
    return Drawn(Figure(figsize=(1, 1)), os.getpid())

drawn_by = []
pool = FigurePool(workers=1)
pool.start()
while not drawn_by or drawn_by[-1] == os.getpid():  # until the worker (not this process) drew
    time.sleep(0.2)
    pool.submit(pid_figure, (), {}, path=Path(sys.argv[1]), dpi=20, name="pid", step=0,
                on_value=drawn_by.append)
    pool.collect()
print(drawn_by[-1], flush=True)
time.sleep(600)
"""


def test_a_worker_ends_when_its_run_is_killed(tmp_path):
    import subprocess

    script = tmp_path / "run.py"
    script.write_text(_ORPHAN_SCRIPT)
    run = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / "pid.png")],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        import select

        ready, _, _ = select.select([run.stdout], [], [], 120)
        assert ready, "the worker drew no figure in 2 minutes"
        worker = int(run.stdout.readline())
        assert worker != run.pid
        assert alive(worker)  # while the run is
    finally:
        run.kill()  # SIGKILL: the run cannot stop its worker itself
        run.wait()
        run.stdout.close()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if not alive(worker):
            return
        time.sleep(0.1)
    pytest.fail(f"the worker {worker} outlived its killed run by 20 s")


def alive(pid: int) -> bool:
    """Whether `pid` runs: a zombie (ended, not yet reaped by whoever adopted it) does not."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    except OSError:  # no /proc (macOS): ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    return state != "Z"
