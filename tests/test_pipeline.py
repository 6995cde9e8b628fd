import json

import torch

from exigo.analysis import Analysis, EpochContext, FigureInfo, select_probe
from exigo.config import Config
from exigo.engine.checkpoint import load_checkpoint
from exigo.pipeline import run

from conftest import TinyNet


class Recorder(Analysis):
    name = "recorder"
    before_training = True

    def __init__(self):
        self.epochs = []

    def __call__(self, ctx: EpochContext) -> None:
        self.epochs.append(ctx.epoch)
        assert ctx.probe.images.shape[0] == 4
        if ctx.eval is not None:
            ctx.metrics["recorder/accuracy_again"] = ctx.eval.accuracy


class Broken(Analysis):
    name = "broken"

    def __call__(self, ctx):
        raise RuntimeError("plotting backend exploded")


def test_select_probe_one_per_class_first_occurrence():
    targets = torch.tensor([2, 0, 0, 1, 2, 1, 0])
    assert select_probe(targets, 3, 3).tolist() == [1, 3, 0]
    assert select_probe(targets, 5, 3).tolist() == [1, 3, 0, 2, 5]
    assert select_probe(targets, 50, 4).tolist() == [1, 3, 0, 2, 5, 4, 6]


def test_run_writes_outputs_and_isolates_failing_analyses(blobs, tmp_path):
    train, held_out = blobs
    torch.manual_seed(0)
    recorder = Recorder()
    config = Config(epochs=3, batch_size=16, lr=1e-2, save_dir=tmp_path / "save", probe_size=4)
    result = run(config, TinyNet(), train, held_out, [recorder, Broken()])
    assert recorder.epochs == [0, 1, 2, 3]
    assert [(e, n) for e, n, _ in result.failed_analyses] == [
        (1, "broken"),
        (2, "broken"),
        (3, "broken"),
    ]
    rows = json.loads((tmp_path / "save" / "metrics.json").read_text())
    assert [row["epoch"] for row in rows] == [1, 2, 3]
    assert rows[-1]["recorder/accuracy_again"] == rows[-1]["eval_accuracy"]
    assert [row.get("failed") for row in rows] == [["broken"]] * 3  # the report's warnings
    assert rows[-1]["eval_loss"] < rows[0]["eval_loss"]
    run_info = json.loads((tmp_path / "save" / "run.json").read_text())
    assert run_info["config"]["epochs"] == 3 and run_info["seed"] == 0
    checkpoint = load_checkpoint(tmp_path / "save" / "models" / "best.pt", TinyNet())
    assert checkpoint["epoch"] == result.best_epoch
    assert any(result.log_dir.glob("events.out.tfevents.*"))


def test_same_seed_same_metrics_and_new_run_replaces_old(blobs, tmp_path):
    train, held_out = blobs
    config = Config(epochs=2, batch_size=16, lr=1e-2, save_dir=tmp_path / "save", run_name="a")
    torch.manual_seed(0)
    first = run(config, TinyNet(), train, held_out).history
    stale = tmp_path / "save" / "plots" / "stale_9.png"
    stale.write_bytes(b"old")
    torch.manual_seed(0)
    second = run(config, TinyNet(), train, held_out).history
    keys = ["train_loss", "eval_loss", "eval_accuracy"]
    assert [[r[k] for k in keys] for r in first] == [[r[k] for k in keys] for r in second]
    assert not stale.exists()


class ViewFlatten(torch.nn.Module):
    """Conv, BatchNorm and max-pool, then `.view` to flatten: fails on channels-last outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.MaxPool2d(2)
        )
        self.classifier = torch.nn.Linear(4 * 4 * 4, 3)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.features(images)
        return self.classifier(features.view(features.size(0), -1))


def test_run_leaves_the_memory_format_of_a_model_alone(blobs, tmp_path):
    train, held_out = blobs
    torch.manual_seed(0)
    model = ViewFlatten()
    result = run(
        Config(epochs=1, batch_size=16, save_dir=tmp_path / "save"), model, train, held_out
    )
    assert result.history and model.features[0].weight.is_contiguous()


def test_the_default_model_is_channels_last_on_the_cpu_only(tmp_path):
    from exigo.cli import default_model

    torch.manual_seed(0)
    model = default_model(10, torch.device("cpu"))
    weights = [p for p in model.parameters() if p.ndim == 4 and p.shape[1] > 1]
    assert weights and all(
        w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
        for w in weights
    )
    images = torch.randn(2, 1, 28, 28)
    plain = default_model(10, torch.device("cuda"))  # not moved: only the format is chosen
    assert all(p.is_contiguous() for p in plain.parameters())
    plain.load_state_dict(model.state_dict())  # checkpoints load across formats
    model.eval(), plain.eval()
    assert torch.allclose(model(images), plain(images), atol=1e-5)


class Curve(Analysis):
    """One figure per epoch, drawn in whatever pool the run uses."""

    name = "curve"
    figures = (FigureInfo("curve", "A line", "A line per epoch."),)

    def __call__(self, ctx: EpochContext) -> None:
        ctx.draw_figure("curve", _draw_line, ctx.epoch)


def _draw_line(epoch: int):
    from matplotlib.figure import Figure

    figure = Figure(figsize=(2, 2))
    figure.add_subplot().plot([0, 1], [0, epoch])
    return figure


def test_a_pool_the_caller_started_draws_the_figures_and_is_closed(blobs, tmp_path):
    from exigo.figures.pool import FigurePool

    class Counting(FigurePool):
        submitted, closed = 0, 0

        def submit(self, *args, **kwargs):
            Counting.submitted += 1
            return super().submit(*args, **kwargs)

        def close(self):
            Counting.closed += 1
            super().close()

    train, held_out = blobs
    pool = Counting(workers=1)
    pool.start()  # as runner.py does, before the data
    config = Config(epochs=2, batch_size=16, lr=1e-2, save_dir=tmp_path / "save", probe_size=4)
    torch.manual_seed(0)
    result = run(config, TinyNet(), train, held_out, [Curve()], figure_pool=pool)
    assert Counting.submitted == 2 and Counting.closed >= 1
    assert sorted(p.name for p in (tmp_path / "save" / "plots").glob("curve_*.png")) == [
        "curve_1.png",
        "curve_2.png",
    ]
    assert not result.failed_analyses
    rows = json.loads((tmp_path / "save" / "metrics.json").read_text())
    assert all("failed" not in row for row in rows)  # nothing failed: no key
    figures = json.loads((tmp_path / "save" / "run.json").read_text())["figures"]
    assert figures["curve"]["analysis"] == "curve"


def test_the_cli_worker_preloads_what_the_default_analyses_ask_for():
    from exigo.analyses import default_analyses
    from exigo.cli import WORKER_IMPORTS

    wanted = {m for analysis in default_analyses(Config()) for m in analysis.worker_imports}
    assert wanted <= set(WORKER_IMPORTS)


def test_the_heap_is_frozen_during_the_epochs_and_given_back_after(blobs, tmp_path):
    import gc

    seen = []

    class FreezeCount(Analysis):
        name = "freeze_count"
        before_training = True

        def __call__(self, ctx: EpochContext) -> None:
            seen.append(gc.get_freeze_count())

    train, held_out = blobs
    before = gc.get_freeze_count()
    config = Config(epochs=2, batch_size=16, lr=1e-2, save_dir=tmp_path / "save", probe_size=4)
    run(config, TinyNet(), train, held_out, [FreezeCount()])
    assert len(seen) == 3 and all(count > before for count in seen)  # epochs 0, 1, 2
    assert gc.get_freeze_count() == before


def test_a_worker_starts_with_the_run_only_when_some_analysis_declares_a_figure(
    blobs, tmp_path, monkeypatch
):
    """A run without figures starts no worker: its imports would only take CPU from training."""
    from exigo.figures.pool import FigurePool

    started = []
    real_start = FigurePool.start

    def start(self):
        started.append(self.preload)
        real_start(self)

    monkeypatch.setattr(FigurePool, "start", start)
    train, held_out = blobs
    config = Config(epochs=1, batch_size=16, lr=1e-2, probe_size=4)
    for name, analyses in (("none", []), ("no figure", [Recorder()]), ("figures", [Curve()])):
        torch.manual_seed(0)
        run(Config(**(config.to_dict() | {"save_dir": tmp_path / name})), TinyNet(), train,
            held_out, analyses)  # fmt: skip
    # torch first: the figures' data arrive as tensors
    assert started == [("torch",)]
