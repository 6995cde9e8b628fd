"""The run's closing line: it names report.html, the best model and TensorBoard, on one line."""

from __future__ import annotations

import io
from pathlib import Path

import torch
from rich.console import Console

from exigo.config import Config
from exigo.engine.console import closing_line
from exigo.pipeline import run

from conftest import TinyNet, make_blobs


def test_closing_line_names_the_report_the_best_model_and_tensorboard():
    history = [{"epoch": 1, "eval_accuracy": 0.5}, {"epoch": 2, "eval_accuracy": 0.975}]
    line = closing_line(history, 2, Path("save"))
    assert line == (
        "best epoch 2 (eval accuracy 97.50%): open save/report.html; "
        "model save/models/best.pt; tensorboard --logdir save/logs"
    )
    assert closing_line([], 0, Path("save")) == (
        "no epoch completed: no model saved; open save/report.html; tensorboard --logdir save/logs"
    )


def _run(save: Path, console: Console, **options: bool):
    torch.manual_seed(0)
    config = Config(epochs=1, batch_size=16, lr=1e-2, save_dir=save, probe_size=3)
    train, held_out = make_blobs(48, seed=0), make_blobs(12, seed=1)
    return run(config, TinyNet(), train, held_out, console=console, **options)


def test_run_prints_the_closing_line_last_unbroken_at_80_columns(tmp_path):
    screen = io.StringIO()
    console = Console(file=screen, width=80, force_terminal=False, color_system=None)
    result = _run(tmp_path / "save", console)
    lines = screen.getvalue().splitlines()
    assert lines[-1] == result.closing_line  # one line, however long: the terminal wraps it
    assert str(tmp_path / "save" / "report.html") in lines[-1]
    assert "models/best.pt" in lines[-1] and "tensorboard --logdir" in lines[-1]

    quiet = io.StringIO()
    result = _run(tmp_path / "quiet", Console(file=quiet, width=80), verbose=False)
    assert result.closing_line not in quiet.getvalue() and "report.html" not in quiet.getvalue()


def test_attribution_summaries_never_break_a_method_name_at_80_columns(tmp_path):
    from exigo.analyses.attributions import (
        METHOD_LABELS,
        AttributionAnalysis,
        AttributionSettings,
        summary_block,
    )

    screen = io.StringIO()
    console = Console(file=screen, width=80, force_terminal=False, color_system=None)
    torch.manual_seed(0)
    config = Config(epochs=2, batch_size=16, lr=1e-2, save_dir=tmp_path / "save", probe_size=3)
    analysis = AttributionAnalysis(AttributionSettings(ig_steps=4, smoothgrad_samples=2))
    train, held_out = make_blobs(48, seed=0), make_blobs(12, seed=1)
    run(config, TinyNet(), train, held_out, [analysis], console=console)
    text = screen.getvalue()
    assert "attributions, faithfulness" in text and "attributions, drift" in text
    flat = " ".join(text.split())  # what the lines say without the terminal's breaks
    for label in METHOD_LABELS.values():
        shown = flat.count(label)
        assert shown >= (1 if label == METHOD_LABELS["random"] else 3), label  # 3 blocks
        assert text.count(label) == shown, f"{label!r} broken across lines"
    assert max(len(line) for line in text.splitlines() if line.startswith("  ")) <= 80
    # a verdict naming every method goes one name per line rather than past 80 columns
    long = summary_block("h", [("a", "1")], "verdict", list(METHOD_LABELS.values()))
    assert all(len(line) <= 78 for line in long.splitlines())
    assert summary_block("h", [("a", "1")], "verdict", []).endswith("verdict: none")


def test_an_analysis_line_longer_than_the_terminal_stays_one_line(tmp_path):
    from exigo.analysis import Analysis

    path = tmp_path / "a" / "rather" / "long" / "folder" / "name" / "label_issues.csv"

    class Says(Analysis):
        name = "says"

        def __call__(self, ctx):
            ctx.log(f"143 suspected label errors (top 1.4%: 108 training, 35 held-out): see {path}")

    screen = io.StringIO()
    console = Console(file=screen, width=80, force_terminal=False, color_system=None)
    config = Config(epochs=1, batch_size=16, lr=1e-2, save_dir=tmp_path / "save", probe_size=3)
    train, held_out = make_blobs(48, seed=0), make_blobs(12, seed=1)
    run(config, TinyNet(), train, held_out, [Says()], console=console)
    lines = [line for line in screen.getvalue().splitlines() if "suspected" in line]
    assert len(lines) == 1 and lines[0].endswith(str(path))
