"""The extension API: a newcomer's analysis, written in this file, lands where a built-in's does."""

import html
import json

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from PIL import Image
from rich.console import Console

from exigo.analysis import Analysis, EpochContext, FigureInfo
from exigo.config import Config
from exigo.engine.events import EventLog
from exigo.pipeline import run

from conftest import TinyNet, make_blobs


def tensorboard(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    return events


class MeanConfidence(Analysis):
    """Mean top probability per class: one PNG and one scalar per epoch (the README's example)."""

    name = "mean_confidence"
    figures = (
        FigureInfo(
            "mean_confidence",
            "Mean confidence",
            "How sure the model is, class by class: the mean top probability.",
        ),
    )

    def __init__(self, colour: str) -> None:
        self.colour = colour  # settings come in through the constructor

    def __call__(self, ctx: EpochContext) -> None:
        if ctx.eval is None:
            return
        top = ctx.eval.probabilities.max(dim=1).values  # [N]
        classes = range(len(ctx.class_names))
        per_class = torch.stack([top[ctx.eval.targets == c].mean() for c in classes])
        ctx.metrics["mean_confidence/all"] = float(top.mean())
        colour = self.colour

        def draw(values: torch.Tensor, names: list[str], title: str) -> Figure:
            figure = Figure(figsize=(4, 2.5))  # a closure: it reads `colour` from this call
            figure.add_subplot().bar(names, values.tolist(), color=colour)
            figure.suptitle(title)
            return figure

        ctx.draw_figure("mean_confidence", draw, per_class, ctx.class_names, f"Mean {ctx.when}")


def test_an_analysis_written_here_lands_in_plots_metrics_tensorboard_and_report(tmp_path):
    torch.manual_seed(0)
    config = Config(epochs=2, batch_size=16, lr=1e-2, save_dir=tmp_path / "save", run_name="r")
    analysis = MeanConfidence(colour="#ff0000")
    result = run(
        config,
        TinyNet(),
        make_blobs(96),
        make_blobs(30, seed=1),
        [analysis],
        console=Console(file=None, quiet=True),
    )
    assert result.failed_analyses == []
    save = tmp_path / "save"
    for epoch in (1, 2):
        with Image.open(save / "plots" / f"mean_confidence_{epoch}.png") as png:
            pixels = np.asarray(png.convert("RGB"))  # (H, W, 3)
        assert (pixels == [255, 0, 0]).all(axis=-1).sum() > 100  # the red bars
    rows = json.loads((save / "metrics.json").read_text())
    assert all(0.3 < row["mean_confidence/all"] <= 1 for row in rows)
    events = tensorboard(result.log_dir)
    assert [(e.step, pytest.approx(e.value)) for e in events.Scalars("mean_confidence/all")] == [
        (row["epoch"], pytest.approx(row["mean_confidence/all"])) for row in rows
    ]
    images = events.Images("mean_confidence")
    assert [image.step for image in images] == [1, 2]
    assert images[1].encoded_image_string == (save / "plots" / "mean_confidence_2.png").read_bytes()
    page = html.unescape((save / "report.html").read_text())
    assert "How sure the model is, class by class: the mean top probability." in page
    assert "Mean confidence" in page
    info = json.loads((save / "run.json").read_text())
    assert info["figures"]["mean_confidence"]["title"] == "Mean confidence"
    assert result.timings["analysis/mean_confidence"] > 0 and result.timings["train"] > 0


class Undeclared(Analysis):
    name = "undeclared"

    def __call__(self, ctx: EpochContext) -> None:
        ctx.draw_figure("surprise", Figure)


def test_a_figure_must_be_declared_and_the_run_goes_on(tmp_path):
    config = Config(epochs=1, batch_size=16, save_dir=tmp_path / "save")
    result = run(config, TinyNet(), make_blobs(48), make_blobs(30, seed=1), [Undeclared()])
    assert [(epoch, name) for epoch, name, _ in result.failed_analyses] == [(1, "undeclared")]
    assert "figure 'surprise' is not declared" in result.failed_analyses[0][2]
    assert not (tmp_path / "save" / "plots" / "surprise_1.png").exists()


class NotAnAnalysis:
    name = "duck"

    def __call__(self, ctx: EpochContext) -> None:
        pass


class Twin(Analysis):
    name = "twin"

    def __call__(self, ctx: EpochContext) -> None:
        pass


@pytest.mark.parametrize(
    ("analyses", "message"),
    [
        ([NotAnAnalysis()], "subclass exigo.analysis.Analysis"),
        ([Twin(), Twin()], "'twin' is taken"),
        ([Analysis()], "'' is empty"),
    ],
)
def test_analyses_that_break_the_contract_stop_the_run_before_anything_is_written(
    tmp_path, analyses, message
):
    config = Config(epochs=1, save_dir=tmp_path / "save")
    with pytest.raises(TypeError, match=message):
        run(config, TinyNet(), make_blobs(48), make_blobs(30, seed=1), analyses)
    assert not (tmp_path / "save").exists()


def test_the_base_class_declares_every_hook_with_a_default():
    plain = Twin()
    assert plain.state_dict() == {}
    plain.load_state_dict({"anything": 1})  # a no-op, not an error
    assert (plain.figures, plain.before_training, plain.worker_imports) == ((), False, ())
    with pytest.raises(NotImplementedError, match="must implement __call__"):
        Analysis()(None)


def test_a_resumed_event_log_hides_the_stopped_attempts_later_steps(tmp_path):
    first = EventLog(tmp_path)
    for step in (1, 2):
        first.scalars({"epoch": step, "eval_loss": float(step), "analysis_seconds": {}}, step)
    first.close()
    second = EventLog(tmp_path, purge_step=2)  # epoch 2 is done again after --resume
    second.scalars({"epoch": 2, "eval_loss": 20.0, "analysis_seconds": {"x": 0.5}}, 2)
    second.close()
    events = tensorboard(tmp_path)
    assert [(e.step, e.value) for e in events.Scalars("loss/eval")] == [(1, 1.0), (2, 20.0)]
    assert [(e.step, e.value) for e in events.Scalars("seconds/x")] == [(2, 0.5)]
