"""What a run survives: signals, resume, divergence, failing analyses, a second run, leaks."""

import io
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from matplotlib.figure import Figure
from rich.console import Console
from torch.utils.data import Dataset

from exigo.analysis import Analysis, EpochContext, FigureInfo
from exigo.config import Config
from exigo.engine.checkpoint import load_checkpoint
from exigo.pipeline import (
    ResumeError,
    RunDiverged,
    RunInterrupted,
    SaveDirError,
    run,
)

from conftest import REPO, TinyNet, make_blobs


def quiet() -> Console:
    return Console(file=io.StringIO(), width=200)


def tiny_config(save_dir, **changes) -> Config:
    settings = dict(epochs=3, batch_size=16, lr=1e-2, save_dir=save_dir, probe_size=3)
    settings.update(changes)
    return Config(**settings)


class SignalAt(Dataset):
    """Training images that send `signal_number` to this process when item `at` is read.

    Reading item `at` happens inside `train_epoch`, so the signal lands in the middle of an
    epoch. `at` counts reads across epochs (96 images per epoch here).
    """

    def __init__(self, data: Dataset, at: int | None = None, signal_number=signal.SIGINT):
        self.data, self.at, self.signal_number, self.reads = data, at, signal_number, 0
        self.classes = data.classes

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index):
        self.reads += 1
        if self.reads == self.at:
            os.kill(os.getpid(), self.signal_number)
        return self.data[index]


class ArmSignal(Analysis):
    """After `epoch`'s other analyses, arms `data` (a `SignalAt`) to signal `reads` reads later.

    The next reads are the next epoch's training reads, whatever the analyses before it read
    from the training set; listed last, so it runs after them (a generic dataset runs the
    analyses after each epoch, not beside the next).
    """

    name = "arm"

    def __init__(self, data: SignalAt, epoch: int, reads: int) -> None:
        self.data, self.epoch, self.reads = data, epoch, reads

    def __call__(self, ctx: EpochContext) -> None:
        if ctx.epoch == self.epoch:
            self.data.at = self.data.reads + self.reads


class SignalAfterEpoch(Analysis):
    """An analysis that sends `signal_number` to this process at `epoch` (between analyses)."""

    name = "signal"

    def __init__(self, epoch: int | None, signal_number=signal.SIGTERM, times: int = 1):
        self.epoch, self.signal_number, self.times = epoch, signal_number, times
        self.finished: list[int] = []

    def __call__(self, ctx: EpochContext) -> None:
        if ctx.epoch == self.epoch:
            for _ in range(self.times):
                os.kill(os.getpid(), self.signal_number)
            # Python runs the handler in the main thread, at its next bytecode: beside the next
            # epoch (this is the analyses' thread) wait until it has, so the signal lands during
            # the analyses as a Ctrl-C here would, not after them (the analyses' end once took
            # 0.3 s of garbage collection, which hid the race)
            stops = getattr(signal.getsignal(self.signal_number), "__self__", None)
            deadline = time.monotonic() + 10
            while stops is not None and time.monotonic() < deadline:
                if stops.received is not None and (self.times < 2 or stops.stopping):
                    break
                time.sleep(0.01)
        self.finished.append(ctx.epoch)


class Counter(Analysis):
    """State across epochs (like a t-SNE's previous layout): must survive --resume."""

    name = "counter"
    before_training = True

    def __init__(self):
        self.calls = 0

    def __call__(self, ctx: EpochContext) -> None:
        self.calls += 1
        ctx.metrics["counter/calls"] = self.calls
        ctx.metrics["counter/random"] = torch.rand(()).item()  # draws from the global RNG

    def state_dict(self) -> dict:
        return {"calls": self.calls}

    def load_state_dict(self, state: dict) -> None:
        self.calls = state["calls"]


class Idle(Analysis):
    name = "idle"

    def __call__(self, ctx: EpochContext) -> None:
        pass


class DropoutNet(TinyNet):
    """TinyNet with dropout: training draws from torch's global RNG."""

    def forward(self, images):
        return self.classifier(torch.nn.functional.dropout(self.features(images), 0.3))


def scalar_steps(log_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return [(event.step, event.value) for event in events.Scalars(tag)]


COMPARED = [
    "epoch",
    "train_loss",
    "train_accuracy",
    "eval_loss",
    "eval_accuracy",
    "lr",
    "best",
    "counter/calls",
    "counter/random",
]


def numbers(history):
    return [[row[key] for key in COMPARED] for row in history]


# ---------------------------------------------------------------- interrupt and resume


@pytest.mark.parametrize("where", ["mid_training", "between_analyses"])
def test_interrupted_and_resumed_equals_uninterrupted(tmp_path, where):
    train, held_out = make_blobs(96, seed=0), make_blobs(30, seed=1)

    def attempt(save_dir, *, stop_training_at=None, stop_analyses_at=None, resume=False):
        torch.manual_seed(0)
        config = tiny_config(save_dir, run_name="r", resume=resume)
        analyses = [Counter(), SignalAfterEpoch(stop_analyses_at), Idle()]
        data = SignalAt(train, stop_training_at)
        return run(config, DropoutNet(), data, held_out, analyses, console=quiet())

    straight = attempt(tmp_path / "straight")
    save = tmp_path / "interrupted"
    with pytest.raises(RunInterrupted) as raised:
        if where == "mid_training":
            attempt(save, stop_training_at=96 + 40)  # SIGINT in the middle of epoch 2
        else:
            attempt(save, stop_analyses_at=2)  # SIGTERM after epoch 2 trained
    interrupt = raised.value
    assert interrupt.result is not None and len(interrupt.result.history) == 1
    assert "epoch 2/3" in str(interrupt) and "--resume" in str(interrupt)
    assert json.loads((save / "metrics.json").read_text())[0]["epoch"] == 1
    assert load_checkpoint(save / "models" / "last.pt")["epoch"] == 1
    early_plot = save / "plots" / "kept_1.png"
    early_plot.write_bytes(b"from before the interruption")

    resumed = attempt(save, resume=True)
    assert numbers(resumed.history) == numbers(straight.history)
    assert resumed.log_dir == save / "logs" / "r"
    assert early_plot.exists()  # resume continues the run folder, it does not clear it
    assert numbers(json.loads((save / "metrics.json").read_text())) == numbers(straight.history)
    best, best_straight = TinyNet(), TinyNet()
    load_checkpoint(save / "models" / "best.pt", best)
    load_checkpoint(tmp_path / "straight" / "models" / "best.pt", best_straight)
    for name, weights in best.state_dict().items():
        assert torch.equal(weights, best_straight.state_dict()[name]), name
    # TensorBoard: every epoch once, including a step the interrupted attempt had logged
    assert scalar_steps(save / "logs" / "r", "loss/eval") == scalar_steps(
        tmp_path / "straight" / "logs" / "r", "loss/eval"
    )
    assert scalar_steps(save / "logs" / "r", "counter/calls") == [
        (1, 2.0),
        (2, 3.0),
        (3, 4.0),
    ]
    run_info = json.loads((save / "run.json").read_text())
    assert [entry["after_epoch"] for entry in run_info["resumed"]] == [1]


def test_sigterm_mid_epoch_leaves_valid_outputs_and_restores_handlers(tmp_path):
    train, held_out = make_blobs(96, seed=0), make_blobs(30, seed=1)
    save = tmp_path / "save"
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    torch.manual_seed(0)
    with pytest.raises(RunInterrupted) as raised:
        run(
            tiny_config(save, run_name="r"),
            TinyNet(),
            SignalAt(train, 96 + 50, signal.SIGTERM),
            held_out,
            console=quiet(),
        )
    assert raised.value.signal_number == signal.SIGTERM and raised.value.exit_code == 143
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers
    message = str(raised.value)
    assert "\n" not in message and str(save / "models" / "best.pt") in message
    assert load_checkpoint(save / "models" / "best.pt", TinyNet())["epoch"] == 1
    assert [row["epoch"] for row in json.loads((save / "metrics.json").read_text())] == [1]
    for tag in ("loss/eval", "seconds/eval"):  # the first and the last scalar of a row
        assert [step for step, _ in scalar_steps(save / "logs" / "r", tag)] == [1]
    assert not list(save.rglob("*.tmp"))


def test_an_ignored_signal_stays_ignored(tmp_path):
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # as in a script's background job
    try:
        train = SignalAt(make_blobs(96, seed=0), 50, signal.SIGINT)
        try:
            result = run(tiny_config(tmp_path, epochs=1), TinyNet(), train, VAL, console=quiet())
        except RunInterrupted:
            pytest.fail("an ignored SIGINT stopped the run")
        assert len(result.history) == 1
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


VAL = make_blobs(30, seed=1)


@pytest.mark.parametrize("sequential", [True, False])
def test_second_signal_stops_at_once(tmp_path, sequential):
    sender = SignalAfterEpoch(1, signal.SIGINT, times=2)
    config = tiny_config(tmp_path, sequential=sequential)
    with pytest.raises(RunInterrupted) as raised:
        run(config, TinyNet(), *make_blobs_pair(), [sender], console=quiet())
    if sequential:
        assert sender.finished == []  # the second signal interrupted the analysis itself
    # beside the next epoch, the second signal stops the training at once; either way the
    # epoch whose analyses saw the signals is dropped whole, and the message says where
    assert not (tmp_path / "metrics.json").exists()
    assert "--resume" not in str(raised.value) and "not saved" in str(raised.value)


def make_blobs_pair():
    return make_blobs(96, seed=0), make_blobs(30, seed=1)


@pytest.mark.slow
def test_ctrl_c_on_real_mnist_then_resume(mnist_root, tmp_path):
    save = tmp_path / "save"
    command = [
        sys.executable,
        str(REPO / "runner.py"),
        "--data-dir",
        str(mnist_root),
        "--save-dir",
        str(save),
        "--run-name",
        "r",
        "--epochs",
        "2",
        "--projection-limit",
        "0",
        "--no-attribution-checks",
    ]
    # its own process group, signalled as a whole: what Ctrl-C in a terminal does
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 600
        while not (save / "metrics.json").exists():  # epoch 1 is complete: epoch 2 starts
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "epoch 1 did not finish in 10 minutes"
            time.sleep(0.2)
        os.killpg(process.pid, signal.SIGINT)
        _, stderr = process.communicate(timeout=300)
    finally:
        process.kill()
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    stop_lines = [line for line in stderr.splitlines() if line.startswith("stopped:")]
    assert len(stop_lines) == 1 and "interrupted by SIGINT" in stop_lines[0]
    assert str(save / "models" / "best.pt") in stop_lines[0].replace("\n", "")
    rows = json.loads((save / "metrics.json").read_text())
    assert [row["epoch"] for row in rows] == [1]
    from exigo.models import MnistCNN

    assert load_checkpoint(save / "models" / "best.pt", MnistCNN())["epoch"] == 1
    assert [step for step, _ in scalar_steps(save / "logs" / "r", "loss/eval")] == [1]

    resumed = subprocess.run([*command, "--resume"], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    rows_after = json.loads((save / "metrics.json").read_text())
    assert [row["epoch"] for row in rows_after] == [1, 2]
    assert rows_after[0]["eval_loss"] == rows[0]["eval_loss"]
    assert [step for step, _ in scalar_steps(save / "logs" / "r", "loss/eval")] == [1, 2]


# ---------------------------------------------------------------- resume refusals


def test_resume_without_last_checkpoint(tmp_path):
    with pytest.raises(ResumeError, match="nothing to continue"):
        run(tiny_config(tmp_path, resume=True), TinyNet(), *make_blobs_pair(), console=quiet())
    assert not (tmp_path / "run.json").exists()


def test_resume_with_other_options_is_refused_and_changes_nothing(tmp_path):
    torch.manual_seed(0)
    run(tiny_config(tmp_path, epochs=2), TinyNet(), *make_blobs_pair(), console=quiet())
    before = (tmp_path / "metrics.json").read_bytes()
    other = tiny_config(tmp_path, epochs=4, lr=0.5, resume=True)
    with pytest.raises(ResumeError) as raised:
        run(other, TinyNet(), *make_blobs_pair(), console=quiet())
    assert "epochs 2 then, 4 now" in str(raised.value) and "lr 0.01 then, 0.5 now" in str(
        raised.value
    )
    assert (tmp_path / "metrics.json").read_bytes() == before
    # a finished run resumes to nothing: no training, same outputs
    finished = run(
        tiny_config(tmp_path, epochs=2, resume=True), TinyNet(), *make_blobs_pair(), console=quiet()
    )
    assert len(finished.history) == 2
    assert (tmp_path / "metrics.json").read_bytes() == before


# ---------------------------------------------------------------- divergence


class PoisonedNet(TinyNet):
    """NaN logits once `at` training steps are done: in training, or only in evaluation."""

    def __init__(self, at: int, eval_only: bool = False):
        super().__init__()
        self.at, self.eval_only, self.steps = at, eval_only, 0

    def forward(self, images):
        logits = super().forward(images)
        self.steps += self.training
        if self.steps >= self.at and self.training != self.eval_only:
            return logits * float("nan")
        return logits


def draw_probabilities(probabilities: torch.Tensor) -> Figure:
    figure = Figure(figsize=(2, 2))
    figure.add_subplot().imshow(probabilities.numpy())
    return figure


class Plotter(Analysis):
    name = "plotter"
    figures = (FigureInfo("probabilities", "Probabilities", "The held-out probabilities."),)

    def __init__(self):
        self.epochs = []

    def __call__(self, ctx: EpochContext) -> None:
        self.epochs.append(ctx.epoch)
        ctx.draw_figure("probabilities", draw_probabilities, ctx.eval.probabilities)


@pytest.mark.parametrize("eval_only", [False, True])
def test_nan_loss_stops_keeps_best_and_draws_nothing(tmp_path, eval_only):
    plotter = Plotter()
    torch.manual_seed(0)
    # 6 steps per epoch: NaN from the middle of epoch 2's training, or in its evaluation only
    model = PoisonedNet(at=12 if eval_only else 9, eval_only=eval_only)
    with pytest.raises(RunDiverged) as raised:
        run(tiny_config(tmp_path), model, *make_blobs_pair(), [plotter], console=quiet())
    message = str(raised.value)
    assert "nan" in message and "smaller --lr" in message and "epoch 2/3" in message
    assert ("evaluation loss" in message) == eval_only
    assert plotter.epochs == [1]  # never called on the diverged model
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["probabilities_1.png"]
    assert load_checkpoint(tmp_path / "models" / "best.pt", TinyNet())["epoch"] == 1
    assert all(
        math.isfinite(value)
        for value in load_checkpoint(tmp_path / "models" / "best.pt")["model"]["classifier.weight"]
        .flatten()
        .tolist()
    )
    assert len(json.loads((tmp_path / "metrics.json").read_text())) == 1
    assert raised.value.result.best_epoch == 1


# ---------------------------------------------------------------- concurrency


HOLD_LOCK = """
import sys, time
from exigo._io import FolderLock
lock = FolderLock(sys.argv[1])
lock.acquire()
print("locked", flush=True)
time.sleep(120)
"""


def test_second_run_refused_while_first_holds_the_folder(tmp_path):
    torch.manual_seed(0)
    run(tiny_config(tmp_path, epochs=1), TinyNet(), *make_blobs_pair(), console=quiet())
    metrics = (tmp_path / "metrics.json").read_bytes()
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(SaveDirError) as raised:
            run(tiny_config(tmp_path, epochs=1), TinyNet(), *make_blobs_pair(), console=quiet())
        assert f"pid {holder.pid}" in str(raised.value) and "in use" in str(raised.value)
        assert (tmp_path / "metrics.json").read_bytes() == metrics  # nothing replaced
    finally:
        holder.kill()  # dies without releasing anything itself
        holder.wait()
        holder.stdout.close()
    result = run(tiny_config(tmp_path, epochs=1), TinyNet(), *make_blobs_pair(), console=quiet())
    assert len(result.history) == 1  # the dead holder's lock did not stay behind


# ---------------------------------------------------------------- analyses


class BadMetrics(Analysis):
    name = "bad_metrics"

    def __call__(self, ctx: EpochContext) -> None:
        ctx.metrics["bad/nan"] = float("nan")
        ctx.metrics["bad/tensor"] = torch.tensor(0.25)
        ctx.metrics["bad/text"] = "high"


def test_analysis_metrics_that_are_not_finite_numbers_do_not_break_metrics_json(tmp_path):
    result = run(
        tiny_config(tmp_path, epochs=1),
        TinyNet(),
        *make_blobs_pair(),
        [BadMetrics()],
        console=quiet(),
    )
    row = json.loads((tmp_path / "metrics.json").read_text())[0]
    assert row["bad/tensor"] == 0.25 and "bad/nan" not in row and "bad/text" not in row
    assert [(epoch, name) for epoch, name, _ in result.failed_analyses] == [(1, "bad_metrics")]


# ---------------------------------------------------------------- memory


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def draw_embeddings(embeddings: torch.Tensor) -> Figure:
    figure = Figure(figsize=(6, 6))
    figure.add_subplot().imshow(embeddings.numpy(), aspect="auto")
    return figure


class BigFigure(Analysis):
    name = "big_figure"
    figures = (FigureInfo("embeddings", "Embeddings", "The held-out embeddings."),)

    def __call__(self, ctx: EpochContext) -> None:
        ctx.draw_figure("embeddings", draw_embeddings, ctx.eval.embeddings)


class InputGradients(Analysis):
    name = "input_gradients"

    def __call__(self, ctx: EpochContext) -> None:
        images = ctx.probe.images.clone().requires_grad_(True)
        kept = []
        handle = ctx.model.classifier.register_forward_hook(lambda m, i, o: kept.append(o))
        try:
            (gradient,) = torch.autograd.grad(ctx.model(images).sum(), images)
        finally:
            handle.remove()
        ctx.metrics["input_gradients/mean"] = gradient.abs().mean().item()


class Resident(Analysis):
    name = "resident"

    def __init__(self):
        self.bytes: list[int] = []
        self.report: list[int] = []  # report.html's size: its images stay encoded in memory

    def __call__(self, ctx: EpochContext) -> None:
        self.bytes.append(resident_bytes())
        report = ctx.save_dir / "report.html"
        self.report.append(report.stat().st_size if report.exists() else 0)


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux /proc")
def test_memory_stays_flat_over_epochs(tmp_path):
    resident = Resident()
    torch.manual_seed(0)
    config = tiny_config(tmp_path, epochs=14)
    analyses = [BigFigure(), InputGradients(), resident]
    run(config, TinyNet(), make_blobs(48), make_blobs(300, seed=1), analyses, console=quiet())
    # after the first epochs' one-off allocations (the analyses' thread warms its own malloc
    # arena up over its first epochs: 745 -> 760 MB, then 760 -> 763 MB over 20 epochs)
    settled = resident.bytes[5]
    # report.html's images are encoded once and kept (exigo._embed.ImageCache): memory grows
    # with the page, whose size is bounded (15 MB), and with nothing else
    kept = max(resident.report[6:]) - resident.report[5]
    growth = max(resident.bytes[6:]) - settled - kept
    # a leaked 6 x 6 inch figure would add 1.4 MB an epoch, 11 MB over these 8 epochs
    assert growth < 8 * 2**20, [round(b / 2**20, 1) for b in resident.bytes]
