"""Analyses beside the next epoch's training: the same outputs as one after the other, and stops
that are never lost."""

import io
import json
import os
import signal
import threading
import time

import pytest
import torch
from matplotlib.figure import Figure
from rich.console import Console
from test_reliability import DropoutNet

from exigo.analysis import Analysis, EpochContext, FigureInfo
from exigo.config import Config
from exigo.engine.checkpoint import load_checkpoint
from exigo.engine.signals import StopSignals
from exigo.pipeline import RunInterrupted, run

from conftest import TinyNet, make_blobs


def recorded() -> tuple[Console, io.StringIO]:
    text = io.StringIO()
    return Console(file=text, width=200), text


def draw_probabilities(probabilities: torch.Tensor, title: str) -> Figure:
    figure = Figure(figsize=(3, 2))
    figure.add_subplot().imshow(probabilities.numpy(), aspect="auto")
    figure.suptitle(title)
    return figure


class Probabilities(Analysis):
    """A figure and scalars from the evaluation and from the model (a forward pass), plus
    state across epochs and a draw from the global generator (forked: no effect on training)."""

    name = "probabilities"
    figures = (FigureInfo("probabilities", "Probabilities", "Held-out probabilities."),)
    before_training = True

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, ctx: EpochContext) -> None:
        self.calls += 1
        with torch.no_grad():
            logits = ctx.model(ctx.probe.images)
        ctx.metrics["probabilities/probe_logit"] = float(logits.abs().mean())
        ctx.metrics["probabilities/random"] = float(torch.rand(()))
        ctx.metrics["probabilities/calls"] = self.calls
        if ctx.eval is not None:
            ctx.draw_figure(
                "probabilities", draw_probabilities, ctx.eval.probabilities, f"{ctx.when}"
            )

    def state_dict(self) -> dict:
        return {"calls": self.calls}

    def load_state_dict(self, state) -> None:
        self.calls = state["calls"]


def outputs(save):
    rows = json.loads((save / "metrics.json").read_text())
    numbers = [{k: v for k, v in row.items() if "seconds" not in k} for row in rows]
    pngs = {path.name: path.read_bytes() for path in sorted((save / "plots").glob("*.png"))}
    last = load_checkpoint(save / "models" / "last.pt")
    best = load_checkpoint(save / "models" / "best.pt")
    return numbers, pngs, last, best


def same_tensors(first, second) -> bool:
    if isinstance(first, torch.Tensor):
        return torch.equal(first, second)
    if isinstance(first, dict):
        return first.keys() == second.keys() and all(
            same_tensors(first[k], second[k]) for k in first
        )
    if isinstance(first, (list, tuple)):
        return len(first) == len(second) and all(map(same_tensors, first, second))
    return first == second


def tiny(save, **changes) -> Config:
    settings = dict(epochs=3, batch_size=16, lr=1e-2, save_dir=save, probe_size=3, run_name="r")
    return Config(**{**settings, **changes})


@pytest.mark.parametrize("model", [TinyNet, DropoutNet])
def test_overlapped_and_sequential_runs_write_the_same_outputs(tmp_path, model):
    results = {}
    for sequential in (False, True):
        save = tmp_path / f"sequential-{sequential}"
        torch.manual_seed(0)
        console, text = recorded()
        run(
            tiny(save, sequential=sequential),
            model(),
            make_blobs(96),
            make_blobs(30, seed=1),
            [Probabilities()],
            console=console,
        )
        results[sequential] = outputs(save), text.getvalue()
    (numbers, pngs, last, best), overlapped_log = results[False]
    (numbers_s, pngs_s, last_s, best_s), _ = results[True]
    assert numbers == numbers_s
    assert pngs == pngs_s and len(pngs) == 3
    assert same_tensors(best["model"], best_s["model"])
    for key in ("model", "optimizer", "scheduler", "rng", "history", "analyses"):
        if key == "history":
            drop = lambda rows: [{k: v for k, v in r.items() if "seconds" not in k} for r in rows]  # noqa: E731
            assert drop(last[key]) == drop(last_s[key])
        else:
            assert same_tensors(last[key], last_s[key]), key
    says_sequential = "analyses run after each epoch from now on" in overlapped_log
    assert says_sequential == (model is DropoutNet)  # dropout draws random numbers: said once
    assert overlapped_log.count("analyses run after each epoch") <= 1


class StopInside(Analysis):
    """A long analysis: many forward passes; the signal arrives during the `at`-th one."""

    name = "long"

    def __init__(self, epoch: int, at: int = 5, passes: int = 10_000, times: int = 1) -> None:
        self.epoch, self.at, self.passes, self.times = epoch, at, passes, times
        self.forwards = 0

    def __call__(self, ctx: EpochContext) -> None:
        if ctx.epoch != self.epoch:
            return
        for index in range(self.passes):
            if index == self.at:
                for _ in range(self.times):
                    # to this thread: beside the next epoch, the analyses' thread (the OS may
                    # pick any thread for os.kill; the main thread must still see it promptly)
                    signal.pthread_kill(threading.get_ident(), signal.SIGTERM)
            with torch.no_grad():
                ctx.model(ctx.probe.images)
            self.forwards += 1


@pytest.mark.parametrize("sequential", [False, True])
@pytest.mark.parametrize("times", [1, 2])
@pytest.mark.parametrize("epoch", [2, 3])  # 3: the main thread waits for the analyses' thread
def test_a_signal_inside_a_long_analysis_stops_it_at_the_next_forward(
    tmp_path, sequential, times, epoch
):
    long = StopInside(epoch=epoch, times=times)
    torch.manual_seed(0)
    with pytest.raises(RunInterrupted) as raised:
        run(
            tiny(tmp_path / "save", sequential=sequential),
            TinyNet(),
            make_blobs(96),
            make_blobs(30, seed=1),
            [long],
            console=recorded()[0],
        )
    # not the 10,000 passes: a signal the OS gave the analyses' thread runs its handler when the
    # main thread runs Python code, which a waiting main thread does every 0.1 s (a few
    # hundred of these tiny passes); before that wake-up it waited for all 10,000
    assert long.forwards < 2000
    message = str(raised.value)
    assert raised.value.exit_code == 143
    assert "the signal cut the analysis long short" in message  # also after a second signal
    assert f"--resume continues after epoch {epoch - 1}" in message
    assert "not saved" in message
    saved = json.loads((tmp_path / "save" / "metrics.json").read_text())
    assert [row["epoch"] for row in saved] == list(range(1, epoch))  # `epoch` dropped whole


@pytest.mark.parametrize("sequential", [False, True])
def test_a_signal_in_the_last_epochs_commit_is_not_lost(tmp_path, monkeypatch, sequential):
    from exigo.engine import epoch as epoch_module

    real, commits = epoch_module.collect_figures, []

    def signal_then_collect(session, share=None):  # a signal while the last epoch commits
        commits.append(session)
        if len(commits) == 3:
            os.kill(os.getpid(), signal.SIGINT)
        real(session, share)

    monkeypatch.setattr(epoch_module, "collect_figures", signal_then_collect)
    torch.manual_seed(0)
    with pytest.raises(RunInterrupted) as raised:
        run(
            tiny(tmp_path / "save", sequential=sequential),
            TinyNet(),
            make_blobs(96),
            make_blobs(30, seed=1),
        )
    assert raised.value.exit_code == 130
    assert "epoch 3 was saved whole" in str(raised.value)
    assert len(json.loads((tmp_path / "save" / "metrics.json").read_text())) == 3


def test_a_second_signal_while_stopping_does_not_replace_the_first():
    with StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        with pytest.raises(RunInterrupted):
            stop.check()
        os.kill(os.getpid(), signal.SIGINT)  # ignored: the stop is on its way out
        assert stop.received == signal.SIGINT
    with StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        with pytest.raises(RunInterrupted):  # a second one before any check: at once
            os.kill(os.getpid(), signal.SIGINT)


class LockedNet(TinyNet):
    """A model that cannot be deep-copied (it holds a lock), as some real ones hold handles."""

    def __init__(self):
        super().__init__()
        self.lock = threading.Lock()


def two_blob_sets():
    return make_blobs(48, seed=0), make_blobs(12, seed=1)


def test_a_model_that_cannot_be_copied_is_analysed_after_each_epoch_and_says_so(tmp_path):
    console, text = recorded()
    torch.manual_seed(0)
    result = run(
        tiny(tmp_path / "save", epochs=2), LockedNet(), *two_blob_sets(), [Probabilities()],
        console=console,
    )  # fmt: skip
    said = text.getvalue()
    assert said.count("not beside the next one: the model cannot be copied (TypeError") == 1
    assert [row["epoch"] for row in result.history] == [1, 2] and not result.failed_analyses


def test_a_stop_between_two_analyses_names_none_as_cut_short(tmp_path):
    from test_reliability import SignalAfterEpoch

    config = tiny(tmp_path / "save", epochs=2, sequential=True)
    sender = SignalAfterEpoch(1)  # SIGTERM, handled at once: it stops before the next analysis
    with pytest.raises(RunInterrupted) as raised:
        run(config, TinyNet(), *two_blob_sets(), [sender, Probabilities()], console=recorded()[0])
    assert sender.finished == [1]
    assert "interrupted by SIGTERM" in str(raised.value)
    assert "cut the analysis" not in str(raised.value)  # the signal came between the two


def test_the_background_draws_figures_itself_only_while_the_loop_waits(monkeypatch):
    """`finish` beside training gets an event that is set only inside `Background.wait`:
    drawing in the run's process meanwhile would take the CPU and the interpreter lock from
    the training (`FigurePool.collect(share=)`)."""
    from exigo.engine import epoch as epoch_module

    seen = []

    def finish(session, ended, *, overlapped, share):
        seen.append(("beside training", overlapped, share.is_set()))
        assert share.wait(10)  # set once the loop waits
        seen.append(("loop waits", overlapped, share.is_set()))

    class Session:
        def timed(self, name, started):
            return started

    def trains_until(count):  # the loop trains the next epoch until `finish` has looked
        deadline = time.monotonic() + 10
        while len(seen) < count and time.monotonic() < deadline:
            time.sleep(0.01)

    monkeypatch.setattr(epoch_module, "finish", finish)
    with epoch_module.Background(Session(), overlap=True) as background:
        background.start("epoch 1")
        trains_until(1)
        background.wait()
        assert seen == [("beside training", True, False), ("loop waits", True, True)]
        background.start("epoch 2")  # cleared again after the wait
        trains_until(3)
    assert seen[2:] == [("beside training", True, False), ("loop waits", True, True)]


@pytest.mark.parametrize("sequential", [False, True])
def test_every_commit_hands_the_background_s_event_to_the_figure_pool(
    tmp_path, monkeypatch, sequential
):
    """The event reaches `FigurePool.collect` through `finish`, `commit` and `collect_figures`
    beside training (dropping it on the way would let the thread draw while the next epoch
    trains); an epoch finished after its training (`--sequential`) shares at once (None)."""
    from exigo.figures.pool import FigurePool

    shares, collect = [], FigurePool.collect

    def spy(self, share=None):
        shares.append(share)
        return collect(self, share)

    monkeypatch.setattr(FigurePool, "collect", spy)
    torch.manual_seed(0)
    run(
        tiny(tmp_path / "save", sequential=sequential), TinyNet(), make_blobs(96),
        make_blobs(30, seed=1), [Probabilities()], console=recorded()[0],
    )  # fmt: skip
    assert len(shares) == 3  # one commit per epoch
    if sequential:
        assert shares == [None, None, None]
    else:
        assert all(isinstance(share, threading.Event) for share in shares)
        assert len({id(share) for share in shares}) == 1  # the one the loop sets as it waits


def test_the_background_may_draw_when_a_second_signal_ends_the_wait(monkeypatch):
    """A second signal raises out of the loop's wait; the loop still waits for the thread to
    end (`shutdown(wait=True)`), so the thread may draw its figures itself."""
    from exigo.engine import epoch as epoch_module

    seen = []

    def finish(session, ended, *, overlapped, share):
        time.sleep(0.5)  # still analysing when the signal ends the loop's wait
        seen.append(share.wait(5))

    def second_signal(running):
        raise RunInterrupted(signal.SIGINT)

    class Session:
        def timed(self, name, started):
            return started

    monkeypatch.setattr(epoch_module, "finish", finish)
    monkeypatch.setattr(epoch_module, "_exception_seeing_signals", second_signal)
    with (
        pytest.raises(RunInterrupted),
        epoch_module.Background(Session(), overlap=True) as background,
    ):
        background.start("epoch 1")
        background.wait()
    assert seen == [True]
