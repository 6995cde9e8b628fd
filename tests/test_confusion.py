import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from exigo.analyses import default_analyses
from exigo.analyses.confusion import (
    ConfusionAnalysis,
    confusion_matrix,
    plot_confusion,
    precision_recall,
    row_normalize,
)
from exigo.cli import build_parser, config_from_args
from exigo.config import Config
from exigo.data import load_mnist
from exigo.models import MnistCNN
from exigo.pipeline import run

from conftest import TinyNet, epoch_context

# 4 classes, 10 samples. Class 2 is never predicted; class 3 never occurs as a target.
#   true:  0 0 0 1 1 1 1 2 2 0
#   pred:  0 0 1 1 1 1 0 1 3 3
TARGETS = torch.tensor([0, 0, 0, 1, 1, 1, 1, 2, 2, 0])
PREDICTIONS = torch.tensor([0, 0, 1, 1, 1, 1, 0, 1, 3, 3])
EXPECTED = [
    [2, 1, 0, 1],  # true 0: two right, one taken for 1, one for 3
    [1, 3, 0, 0],
    [0, 1, 0, 1],
    [0, 0, 0, 0],
]


def test_confusion_matrix_hand_computed():
    matrix = confusion_matrix(TARGETS, PREDICTIONS, 4)
    assert matrix.dtype == torch.int64 and matrix.shape == (4, 4)
    assert matrix.tolist() == EXPECTED
    assert matrix.sum(1).tolist() == torch.bincount(TARGETS, minlength=4).tolist()
    assert matrix.sum(0).tolist() == torch.bincount(PREDICTIONS, minlength=4).tolist()


def test_confusion_matrix_small_integer_dtypes_do_not_overflow():
    # 200 * 200 + 199 overflows uint8 and int16 if multiplied before widening.
    targets = torch.tensor([199, 0], dtype=torch.uint8)
    predictions = torch.tensor([198, 0], dtype=torch.int16)
    matrix = confusion_matrix(targets, predictions, 200)
    assert matrix[199, 198] == 1 and matrix[0, 0] == 1 and matrix.sum() == 2


def test_confusion_matrix_does_not_modify_inputs_and_handles_empty():
    targets, predictions = TARGETS.clone(), PREDICTIONS.clone()
    confusion_matrix(targets, predictions, 4)
    assert torch.equal(targets, TARGETS) and torch.equal(predictions, PREDICTIONS)
    empty = torch.zeros(0, dtype=torch.long)
    assert confusion_matrix(empty, empty, 3).tolist() == [[0] * 3] * 3


@pytest.mark.parametrize(
    ("targets", "predictions", "classes", "message"),
    [
        (TARGETS, PREDICTIONS, 3, r"predictions must lie in \[0, 3\)"),
        (TARGETS, PREDICTIONS[:-1], 4, "equal length"),
        (TARGETS.float(), PREDICTIONS, 4, "integer class indices"),
        (TARGETS - 1, PREDICTIONS, 4, r"targets must lie in \[0, 4\), got values in \[-1, 1\]"),
        (TARGETS, PREDICTIONS, 0, "at least 1"),
    ],
)
def test_confusion_matrix_rejects_bad_input(targets, predictions, classes, message):
    with pytest.raises(ValueError, match=message):
        confusion_matrix(targets, predictions, classes)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_confusion_matrix_on_cuda_matches_cpu():
    matrix = confusion_matrix(TARGETS.cuda(), PREDICTIONS.cuda(), 4)
    assert matrix.device.type == "cuda" and matrix.cpu().tolist() == EXPECTED
    precision, recall = precision_recall(matrix)
    assert precision.device.type == recall.device.type == "cuda"
    assert torch.equal(precision.cpu(), precision_recall(matrix.cpu())[0])
    assert torch.equal(row_normalize(matrix).cpu(), row_normalize(matrix.cpu()))


def test_precision_recall_hand_computed_with_zero_divisions():
    precision, recall = precision_recall(torch.tensor(EXPECTED))
    assert precision.dtype == recall.dtype == torch.float32
    # columns sums 3, 5, 0, 2: class 2 is never predicted -> precision 0 (not NaN)
    torch.testing.assert_close(precision, torch.tensor([2 / 3, 3 / 5, 0.0, 0.0]))
    # row sums 4, 4, 2, 0: class 3 never occurs -> recall 0 (not NaN)
    torch.testing.assert_close(recall, torch.tensor([2 / 4, 3 / 4, 0.0, 0.0]))


def test_precision_recall_of_an_empty_matrix_is_zero_not_nan():
    precision, recall = precision_recall(torch.zeros(3, 3, dtype=torch.long))
    assert precision.tolist() == recall.tolist() == [0.0, 0.0, 0.0]


def test_row_normalize_rows_sum_to_one_diagonal_is_recall():
    matrix = torch.tensor(EXPECTED)
    normalized = row_normalize(matrix)
    assert normalized.tolist()[0] == [0.5, 0.25, 0.0, 0.25]
    assert normalized.tolist()[1] == [0.25, 0.75, 0.0, 0.0]
    assert normalized.tolist()[2] == [0.0, 0.5, 0.0, 0.5]
    assert normalized.tolist()[3] == [0.0, 0.0, 0.0, 0.0]  # absent class: zeros, not NaN
    assert torch.equal(normalized.diagonal(), precision_recall(matrix)[1])
    assert torch.equal(matrix, torch.tensor(EXPECTED))


def _png_decodes(figure: Figure, path: Path) -> np.ndarray:
    FigureCanvasAgg(figure)
    figure.savefig(path, dpi=60)
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB"))
    assert pixels.ndim == 3 and pixels.std() > 0  # not blank
    return pixels


def _texts(figure: Figure) -> list[str]:
    return [text.get_text() for text in figure.axes[0].texts]


def test_plot_confusion_annotates_counts_margins_and_accuracy(tmp_path):
    figure = plot_confusion(torch.tensor(EXPECTED), ["zero", "one", "two", "three"])
    assert isinstance(figure, Figure)
    axes = figure.axes[0]
    assert axes.get_ylabel() == "True label" and axes.get_xlabel() == "Predicted label"
    assert [t.get_text() for t in axes.get_xticklabels()] == [
        "zero",
        "one",
        "two",
        "three",
        "recall",
    ]
    assert [t.get_text() for t in axes.get_yticklabels()][-1] == "precision"
    assert "accuracy 50.00% (5 of 10 correct)" in axes.get_title()
    texts = _texts(figure)
    assert texts[:16] == [str(v) for row in EXPECTED for v in row]  # every cell, row-major
    # precision row, recall column, accuracy corner; "–" where the denominator is zero
    assert texts[16:] == [
        *("66.7%", "60.0%", "–", "0.0%"),
        *("50.0%", "75.0%", "0.0%", "–"),
        "50.0%",
    ]
    _png_decodes(figure, tmp_path / "counts.png")


def test_plot_confusion_normalized_shows_percent_of_true_class(tmp_path):
    figure = plot_confusion(torch.tensor(EXPECTED), normalize=True)
    assert _texts(figure)[:4] == ["50.0", "25.0", "0", "25.0"]
    assert "diagonal is recall" in figure.axes[0].get_title()
    _png_decodes(figure, tmp_path / "normalized.png")


def test_plot_confusion_errors_have_their_own_visible_colour(tmp_path):
    # One error next to a diagonal of thousands: its cell must be clearly coloured (red), not
    # washed out to near-white as on a single linear scale.
    matrix = torch.tensor([[5000, 1], [0, 5000]])
    pixels = _png_decodes(plot_confusion(matrix), tmp_path / "one_error.png")
    figure = plot_confusion(matrix)
    image = figure.axes[0].images[0].get_array()
    red, green, blue = image[0, 1, :3]
    assert red > 0.9 and green < 0.75 and blue < 0.75
    assert tuple(image[1, 0, :3]) == (1.0, 1.0, 1.0)  # an empty cell is white
    assert pixels.shape[0] > 0


def test_plot_confusion_single_class(tmp_path):
    figure = plot_confusion(torch.tensor([[7]]), ["only"])
    assert _texts(figure) == ["7", "100.0%", "100.0%", "100.0%"]
    assert "no errors" in figure.axes[0].get_title()
    _png_decodes(figure, tmp_path / "single.png")


def test_plot_confusion_hundred_classes_has_no_cell_text(tmp_path):
    generator = torch.Generator().manual_seed(0)
    targets = torch.randint(0, 100, (3000,), generator=generator)
    predictions = torch.where(
        torch.rand(3000, generator=generator) < 0.3,
        torch.randint(0, 100, (3000,), generator=generator),
        targets,
    )
    figure = plot_confusion(confusion_matrix(targets, predictions, 100))
    assert _texts(figure) == []
    assert len(figure.axes[0].get_xticklabels()) == 101
    _png_decodes(figure, tmp_path / "hundred.png")


def test_plot_confusion_with_no_samples(tmp_path):
    figure = plot_confusion(torch.zeros(3, 3, dtype=torch.long))
    assert "no samples" in figure.axes[0].get_title()
    _png_decodes(figure, tmp_path / "empty.png")


def test_plot_confusion_rejects_wrong_number_of_names():
    with pytest.raises(ValueError, match="3 class names for a 4-class matrix"):
        plot_confusion(torch.tensor(EXPECTED), ["a", "b", "c"])


def _context(tmp_path, class_names, probabilities_width, epoch=3, evaluation=True):
    eval_result = SimpleNamespace(
        targets=TARGETS,
        predictions=PREDICTIONS,
        num_classes=probabilities_width,
    )
    return epoch_context(
        tmp_path,
        ConfusionAnalysis,
        epoch=epoch,
        eval=eval_result if evaluation else None,
        class_names=class_names,
        plots_dir=tmp_path,
    )


def test_analysis_records_scalars_and_writes_figures(tmp_path):
    ctx = _context(tmp_path, ["a", "b", "c", "d"], 4)
    ConfusionAnalysis(normalize=True)(ctx)
    assert ctx.metrics["precision/0"] == pytest.approx(2 / 3)
    assert ctx.metrics["recall/1"] == 0.75
    assert ctx.metrics["precision/2"] == 0.0 and ctx.metrics["recall/3"] == 0.0
    assert len(ctx.metrics) == 8
    assert all(isinstance(value, float) for value in ctx.metrics.values())
    names = sorted(path.name for path in tmp_path.glob("*.png"))
    assert names == ["confusion_matrix_3.png", "confusion_matrix_normalized_3.png"]
    for path in tmp_path.glob("*.png"):
        with Image.open(path) as image:
            image.verify()
    assert [(figure.name, figure.step) for figure in ctx.figures.collect()] == [
        ("confusion_matrix", 3),
        ("confusion_matrix_normalized", 3),
    ]


def test_analysis_without_normalize_writes_one_figure_and_skips_before_training(tmp_path):
    ConfusionAnalysis()(_context(tmp_path, ["a", "b", "c", "d"], 4, epoch=0, evaluation=False))
    assert not list(tmp_path.glob("*.png"))
    # more logits than class names: the extra classes get their index as name
    ctx = _context(tmp_path, ["a", "b", "c"], 4)
    ConfusionAnalysis()(ctx)
    assert [path.name for path in tmp_path.glob("*.png")] == ["confusion_matrix_3.png"]
    assert "recall/3" in ctx.metrics


def test_registered_by_default_with_the_configured_normalisation():
    found = [a for a in default_analyses(Config()) if isinstance(a, ConfusionAnalysis)]
    assert len(found) == 1 and not found[0].normalize
    found = [
        a
        for a in default_analyses(Config(confusion_normalize=True))
        if isinstance(a, ConfusionAnalysis)
    ]
    assert found[0].normalize


def test_pipeline_puts_precision_recall_in_metrics_json(blobs, tmp_path):
    train, held_out = blobs
    torch.manual_seed(0)
    config = Config(epochs=2, batch_size=16, lr=1e-2, save_dir=tmp_path / "save")
    result = run(config, TinyNet(), train, held_out, [ConfusionAnalysis()])
    assert result.failed_analyses == []
    rows = json.loads((tmp_path / "save" / "metrics.json").read_text())
    for row in rows:
        assert {f"precision/{c}" for c in range(3)} | {f"recall/{c}" for c in range(3)} <= set(row)
        # mean recall weighted by class size is the accuracy
        counts = torch.bincount(held_out.targets, minlength=3).tolist()
        weighted = sum(row[f"recall/{c}"] * counts[c] for c in range(3)) / sum(counts)
        assert weighted == pytest.approx(row["eval_accuracy"])
    plots = tmp_path / "save" / "plots"
    assert (plots / "confusion_matrix_1.png").exists() and (
        plots / "confusion_matrix_2.png"
    ).exists()


def test_cli_flag_turns_on_the_normalised_figure():
    args = build_parser().parse_args(["--confusion-normalize"])
    assert config_from_args(args).confusion_normalize
    assert not config_from_args(build_parser().parse_args([])).confusion_normalize


@pytest.mark.slow
def test_confusion_on_real_mnist(mnist_root, tmp_path):
    train, held_out = load_mnist(mnist_root, download=False)
    torch.manual_seed(0)
    config = Config(epochs=1, save_dir=tmp_path / "save", confusion_normalize=True)
    analysis = ConfusionAnalysis(normalize=config.confusion_normalize)
    result = run(config, MnistCNN(), train, held_out, [analysis])
    assert result.failed_analyses == []
    plots = tmp_path / "save" / "plots"
    for name in ("confusion_matrix_1.png", "confusion_matrix_normalized_1.png"):
        with Image.open(plots / name) as image:
            image.verify()
    row = result.history[0]
    assert min(row[f"recall/{c}"] for c in range(10)) > 0.8
    assert all(0.8 < row[f"precision/{c}"] <= 1 for c in range(10))


@pytest.mark.parametrize("classes", [300, 1000])
def test_plot_confusion_names_which_classes_are_labelled_in_good_english(classes):
    import re

    from exigo._text import ordinal

    matrix = torch.eye(classes, dtype=torch.long)
    title = plot_confusion(matrix).axes[0].get_title()
    step = int(re.search(r"every (\d+)\w\w class labelled", title)[1])
    assert f"every {ordinal(step)} class labelled" in title  # "every 2nd", not "every 2th"


def test_ordinal():
    from exigo._text import ordinal

    assert [ordinal(n) for n in (1, 2, 3, 4, 11, 12, 13, 21, 22, 23, 101, 102, 111)] == [
        "1st", "2nd", "3rd", "4th", "11th", "12th", "13th", "21st", "22nd", "23rd", "101st",
        "102nd", "111th",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("num_classes", "normalize"), [(1, False), (4, False), (10, False), (10, True), (20, False)]
)
def test_plot_confusion_cell_values_stay_out_of_the_layout_without_changing_it(
    num_classes, normalize
):
    """The values are left out of the constrained layout (faster to render): they sit inside
    the axes, so the PNG is byte for byte the one the layout would give with them in it."""
    from exigo.figures.pool import render_png

    generator = torch.Generator().manual_seed(num_classes)
    matrix = torch.randint(0, 300, (num_classes, num_classes), generator=generator)
    matrix += torch.diag(torch.randint(500, 2000, (num_classes,), generator=generator))
    names = [f"class {c}" for c in range(num_classes)]
    fast = plot_confusion(matrix, names, normalize=normalize)
    texts = [text for axes in fast.axes for text in axes.texts]
    assert len(texts) == (num_classes + 1) ** 2  # the cells, the margins, the accuracy
    assert not any(text.get_in_layout() for text in texts)
    measured = plot_confusion(matrix, names, normalize=normalize)
    for axes in measured.axes:
        for text in axes.texts:
            text.set_in_layout(True)
    assert render_png(fast, 100) == render_png(measured, 100)
