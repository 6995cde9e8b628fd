"""Figures fit and stay true to the data, for 1 and 3 channels and 2 to 100 classes.

Every figure is drawn from small synthetic results (no model is trained) with class names of
20 characters, rendered with the Agg canvas, and checked: every text inside the figure, no two
tick labels or column captions overlapping, colour images in colour. Set
`EXIGO_FIGURE_DIR=/some/folder` to keep the PNGs for looking at them.
"""

from __future__ import annotations

import io
import os
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.text import Text
from PIL import Image

from exigo.analyses.attributions import plot_attribution_checks, plot_attributions
from exigo.analyses.class_models import ClassModels, choose_classes, plot_class_models
from exigo.analyses.confusion import confusion_matrix, plot_confusion
from exigo.analyses.errors import Confusion, ErrorSaliency, plot_errors
from exigo.analyses.projection import sprite_images, sprite_sheet
from exigo.analyses.saliency import SaliencyMaps, plot_saliency, probe_note
from exigo.analysis import select_probe

CLASS_COUNTS = (2, 4, 10, 100)
SHAPES = ((1, 28, 28), (3, 32, 32))
PROBE_SIZE = 10


def class_names(count: int) -> list[str]:
    """Names of up to 20 characters, as real datasets have ("aquarium_fish", "sweet_pepper")."""
    return [f"class_{index:03d}_long_name"[:20] for index in range(count)]


def render(figure: Figure, name: str) -> np.ndarray:
    """Draw with Agg, keep the PNG when EXIGO_FIGURE_DIR is set, return its RGB pixels."""
    FigureCanvasAgg(figure)
    figure.canvas.draw()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=figure.dpi)
    folder = os.environ.get("EXIGO_FIGURE_DIR")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / f"{name}.png").write_bytes(buffer.getvalue())
    with Image.open(io.BytesIO(buffer.getvalue())) as png:
        return np.asarray(png.convert("RGB"))


def visible_texts(figure: Figure) -> list[Text]:
    """The texts Agg draws: tick labels outside their axis' view (never drawn) left out."""
    undrawn = set()
    for axes in figure.axes:
        for axis in (axes.xaxis, axes.yaxis):
            low, high = sorted(axis.get_view_interval())
            for tick in [*axis.get_major_ticks(), *axis.get_minor_ticks()]:
                if not low - 1e-9 <= tick.get_loc() <= high + 1e-9:
                    undrawn.update({id(tick.label1), id(tick.label2)})
    return [
        text
        for text in figure.findobj(Text)
        if text.get_visible()
        and text.get_text().strip()
        and text.figure is figure
        and id(text) not in undrawn
    ]


def assert_fits(figure: Figure) -> None:
    """Every text inside the figure; no two tick labels of an axis, nor two captions, overlap."""
    renderer = figure.canvas.get_renderer()
    bounds = figure.bbox
    for text in visible_texts(figure):
        extent = text.get_window_extent(renderer)
        inside = (
            extent.x0 >= bounds.x0 - 1
            and extent.y0 >= bounds.y0 - 1
            and extent.x1 <= bounds.x1 + 1
            and extent.y1 <= bounds.y1 + 1
        )
        assert inside, f"text {text.get_text()!r} at {extent} outside the figure {bounds}"
    groups = []
    for axes in figure.axes:
        groups.append([t for t in axes.get_xticklabels() if t.get_text()])
        groups.append([t for t in axes.get_yticklabels() if t.get_text()])
    # figure-level texts of font size 8 at one height: the column captions of a tile figure
    captions: dict[float, list[Text]] = {}
    for text in figure.texts:
        if text.get_fontsize() == 8 and text.get_ha() == "center":
            captions.setdefault(round(text.get_position()[1], 6), []).append(text)
    groups.extend(captions.values())
    groups.append([axes.title for axes in figure.axes if axes.get_title()])
    suptitle = getattr(figure, "_suptitle", None)  # the figure's title: clear of every axis text
    if suptitle is not None and suptitle.get_text():
        for axes in figure.axes:
            labels = (axes.title, axes.xaxis.label, axes.yaxis.label)
            groups.extend([suptitle, label] for label in labels if label.get_text())
    for group in groups:
        extents = [(t.get_text(), t.get_window_extent(renderer)) for t in group]
        for (first, a), (second, b) in combinations(extents, 2):
            assert not a.overlaps(b), f"{first!r} overlaps {second!r}"


def red_images(count: int, shape: tuple[int, int, int]) -> torch.Tensor:
    """[N, C, H, W] pixels: random grey, or a pure red square on black for 3 channels."""
    generator = torch.Generator().manual_seed(count)
    channels, height, width = shape
    if channels == 1:
        pixels = torch.zeros(count, 1, height, width)  # bright strokes on black, as MNIST
        rows, columns = slice(height // 4, 3 * height // 4), slice(width // 3, 2 * width // 3)
        pixels[..., rows, columns] = torch.rand(
            count, 1, rows.stop - rows.start, columns.stop - columns.start, generator=generator
        )
        return pixels
    pixels = torch.zeros(count, channels, height, width)
    pixels[:, 0, height // 4 : 3 * height // 4, width // 4 : 3 * width // 4] = 1.0
    return pixels


def synthetic_saliency(labels: torch.Tensor, shape: tuple[int, int, int]) -> SaliencyMaps:
    generator = torch.Generator().manual_seed(1)
    count, (_, height, width) = labels.numel(), shape
    pixels = red_images(count, shape)

    def signed() -> torch.Tensor:
        return torch.randn(count, height, width, generator=generator)

    delta = signed()
    return SaliencyMaps(
        source=pixels.amax(1),
        baseline=signed().abs(),
        saliency=signed().abs(),
        delta=delta,
        overlay=delta * pixels.amax(1),
        pixels=pixels,
    )


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("classes", CLASS_COUNTS)
def test_saliency_figure_fits(classes, shape):
    labels = select_probe(torch.arange(classes).repeat(3), PROBE_SIZE, classes)
    labels = torch.arange(classes).repeat(3)[labels]
    predictions = (labels + torch.arange(labels.numel()) % 2) % classes
    figure = plot_saliency(
        synthetic_saliency(labels, shape),
        labels,
        predictions,
        class_names(classes),
        title="Saliency towards the true class, after epoch 12",
        columns_note=probe_note(labels, classes),
    )
    render(figure, f"saliency_{classes}_{shape[0]}ch")
    assert_fits(figure)
    footnote = "\n".join(t.get_text() for t in figure.texts)
    assert "digit" not in footnote
    assert ("outline" in footnote) == (shape[0] == 1)  # grey on black: outlined
    assert ("3 channels" in footnote) == (shape[0] == 3)
    if classes > PROBE_SIZE:
        assert f"first {PROBE_SIZE} of {classes} classes" in footnote


def test_saliency_source_row_of_a_red_image_is_red_and_the_overlay_shows_it_washed_out():
    labels = torch.tensor([0, 1])
    maps = synthetic_saliency(labels, (3, 32, 32))
    # overlay 0 on the square's left half: the image shows through there, washed out
    overlay = maps.overlay.clone()
    overlay[..., :16] = 0.0
    maps = SaliencyMaps(**{**maps.__dict__, "overlay": overlay})
    pixels = render(plot_saliency(maps, labels, labels, ["a", "b"]), "saliency_red")
    red = (pixels[..., 0] > 200) & (pixels[..., 1] < 60) & (pixels[..., 2] < 60)
    # the two red squares (16 x 16 data pixels each, drawn at ~3 screen pixels per pixel)
    assert red.sum() > 2 * 16 * 16 * 4
    rows = np.nonzero(red.any(axis=1))[0]
    assert rows.max() - rows.min() < pixels.shape[0] / 5  # in one row, the source row only
    # washed out: half-way to white, (1, 0.5, 0.5); no map colour is that pale pink
    pink = (
        (pixels[..., 0] > 245) & (abs(pixels[..., 1].astype(int) - 128) < 8)
        & (abs(pixels[..., 2].astype(int) - 128) < 8)
    )  # fmt: skip
    assert pink.sum() > 2 * 8 * 16 * 4  # the left halves of both squares
    shown = np.nonzero(pink.any(axis=1))[0]
    assert shown.min() > pixels.shape[0] / 2  # in the overlay row, the last one


def test_a_grey_image_has_no_backdrop_under_its_overlay():
    labels = torch.tensor([0, 1])
    maps = synthetic_saliency(labels, (1, 28, 28))
    flat = torch.full_like(maps.pixels, 0.3)  # a uniform grey image, value 0.3 (77 of 255)
    maps = SaliencyMaps(
        **{**maps.__dict__, "pixels": flat, "overlay": torch.zeros_like(maps.overlay)}
    )
    figure = plot_saliency(maps, labels, labels, ["a", "b"])
    pixels = render(figure, "saliency_grey_overlay")
    grey = (abs(pixels.astype(int) - 77) < 4).all(axis=-1)
    source = grey[: pixels.shape[0] // 4].sum()  # the first row of tiles
    assert source > 2 * 28 * 28 * 4
    assert grey[pixels.shape[0] // 4 :].sum() < source / 5  # grey text at most: no backdrop
    assert "drawn over the image" not in "\n".join(t.get_text() for t in figure.texts)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_attribution_outline_only_where_it_is_the_objects_edge(shape):
    count = 4
    pixels = red_images(count, shape)
    maps = torch.randn(2, count, *shape[1:], generator=torch.Generator().manual_seed(3))
    figure = plot_attributions(
        pixels,
        maps,
        torch.tensor([1.0, 2.0]),
        ["saliency", "occlusion"],
        [0, 1, 0, 1],
        [0.5] * count,
        ["a", "b"],
        "Attributions towards the true class, after epoch 1",
    )
    rendered = render(figure, f"attributions_{shape[0]}ch")
    assert_fits(figure)
    footnote = "\n".join(t.get_text() for t in figure.texts)
    contours = sum(len(axes.collections) for axes in figure.axes)
    grey = shape[0] == 1  # bright squares on black: an outline is the object's edge
    assert (contours > 0) == grey
    assert ("outline" in footnote) == grey
    assert "ink" not in footnote and "digit" not in footnote
    assert ("sum over the 3 colour channels" in footnote) == (not grey)
    if not grey:  # the image row in colour
        red = (rendered[..., 0] > 200) & (rendered[..., 1] < 60) & (rendered[..., 2] < 60)
        assert red.sum() > count * 16 * 16 * 4


def test_grey_image_on_a_light_background_gets_no_outline():
    labels = torch.tensor([0, 1])
    maps = synthetic_saliency(labels, (1, 28, 28))
    light = SaliencyMaps(**{**maps.__dict__, "pixels": 1 - maps.pixels})
    figure = plot_saliency(light, labels, labels, ["a", "b"])
    render(figure, "saliency_light")
    assert not any(axes.collections for axes in figure.axes)  # no contour drawn
    assert "outline" not in "\n".join(t.get_text() for t in figure.texts)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("classes", CLASS_COUNTS)
def test_errors_figure_fits(classes, shape):
    confusions = [
        Confusion(0, 1, 40, torch.arange(5)),
        Confusion(1 % classes, 0, 12, torch.arange(5, 9)),
        Confusion(classes - 1, 0, 3, torch.arange(9, 10)),
    ]
    pixels = red_images(10, shape)
    generator = torch.Generator().manual_seed(2)
    saliency = ErrorSaliency(
        torch.randn(10, *shape[1:], generator=generator),
        torch.randn(10, *shape[1:], generator=generator),
    )
    probabilities = torch.rand(10, generator=generator)
    figure = plot_errors(
        confusions,
        pixels,
        saliency,
        probabilities,
        1 - probabilities,
        class_names(classes),
        title="Most frequent errors after epoch 12: what pulled each image both ways",
    )
    image = render(figure, f"errors_{classes}_{shape[0]}ch")
    assert_fits(figure)
    if shape[0] == 3:
        assert ((image[..., 0] > 200) & (image[..., 1] < 60)).sum() > 16 * 16 * 4


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("classes", CLASS_COUNTS)
def test_class_models_figure_fits(classes, shape):
    recall = torch.linspace(1, 0, classes)
    chosen, reason = choose_classes(classes, 20, recall)
    pixels = red_images(chosen.numel(), shape)
    result = ClassModels(
        pixels=pixels,
        images=pixels,
        classes=chosen,
        scores=torch.ones(chosen.numel()),
        probabilities=torch.full((chosen.numel(),), 0.5),
    )
    figure = plot_class_models(
        result,
        class_names(classes),
        title="Class models: what the network finds most typical of each class, after epoch 12",
        selection=reason,
        recall=recall[chosen] if classes > 20 else None,
    )
    render(figure, f"class_models_{classes}_{shape[0]}ch")
    assert_fits(figure)
    assert len([axes for axes in figure.axes if axes.images]) == min(classes, 20)
    if classes > 20:
        assert chosen[0] == classes - 1  # lowest recall first
        assert "lowest held-out recall" in figure.get_supxlabel()
    titles = [axes.get_title() for axes in figure.axes if axes.images]
    assert len(set(titles)) == len(titles)


@pytest.mark.parametrize("classes", CLASS_COUNTS)
def test_confusion_figure_fits(classes):
    generator = torch.Generator().manual_seed(classes)
    targets = torch.randint(0, classes, (20 * classes,), generator=generator)
    predictions = torch.where(
        torch.rand(targets.numel(), generator=generator) < 0.3,
        torch.randint(0, classes, targets.shape, generator=generator),
        targets,
    )
    figure = plot_confusion(
        confusion_matrix(targets, predictions, classes),
        class_names(classes),
        title="Confusion matrix, epoch 12",
    )
    render(figure, f"confusion_{classes}")
    assert_fits(figure)
    if classes > 20:
        assert len(figure.axes[0].texts) == 0  # a heatmap, no numbers per cell
        panel = "\n".join(t.get_text() for axes in figure.axes[1:] for t in axes.texts)
        assert "Most frequent confusions" in panel


def test_sprite_of_a_red_image_is_red():
    sheet = sprite_sheet(sprite_images(red_images(4, (3, 32, 32))))
    assert sheet.shape[-1] == 3
    assert tuple(sheet[16, 16]) == (255, 0, 0)


def test_per_class_figures_choose_the_lowest_recall_or_the_first_classes():
    assert choose_classes(4, 20)[0].tolist() == [0, 1, 2, 3]
    assert choose_classes(4, 20)[1] == ""
    first, reason = choose_classes(30, 5)
    assert first.tolist() == [0, 1, 2, 3, 4] and "first 5 of 30" in reason
    recall = torch.tensor([0.9, 0.1, 0.5, 0.1, 0.7])
    lowest, reason = choose_classes(5, 3, recall)
    assert lowest.tolist() == [1, 3, 2] and "lowest held-out recall" in reason


def test_no_figure_title_or_caption_says_digit():
    from exigo.analyses.class_models import ClassModelAnalysis
    from exigo.analyses.confusion import ConfusionAnalysis
    from exigo.analyses.errors import ErrorAnalysis
    from exigo.analyses.projection import ProjectionAnalysis
    from exigo.analyses.saliency import SaliencyAnalysis

    for analysis in (
        ClassModelAnalysis,
        ConfusionAnalysis,
        ErrorAnalysis,
        ProjectionAnalysis,
        SaliencyAnalysis,
    ):
        for info in analysis.figures:
            assert "digit" not in f"{info.title} {info.caption}".lower(), info


def test_attribution_checks_figure_fits():
    from exigo.analyses.faithfulness import FaithfulnessCurves
    from exigo.analyses.sanity import RandomisationResult

    names = ["saliency", "input_x_gradient", "integrated_gradients", "smoothgrad", "occlusion",
             "grad_cam", "random"]  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    fractions = torch.linspace(0, 1, 11)
    deletion = torch.rand(len(names), 10, 11, generator=generator)
    curves = FaithfulnessCurves(names, fractions, deletion, 1 - deletion)
    randomisation = RandomisationResult(
        layers=["classifier", "features.0"],
        depth=torch.tensor([1, 6]),
        total_layers=6,
        spearman=torch.rand(2, len(names) - 1, generator=generator),
        ssim=torch.rand(2, len(names) - 1, generator=generator),
        maps=torch.zeros(2, len(names) - 1, 10, 28, 28),
    )
    figure = plot_attribution_checks(
        curves,
        randomisation,
        0.7,
        "Can the attributions be trusted? After epoch 2, 10 probe images",
    )
    render(figure, "attribution_checks")
    assert_fits(figure)  # the title was once crossed by the randomisation panel's y label


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("classes", [2, 100])
def test_label_issues_figure_fits_and_keeps_colour(classes, shape):
    from exigo.analyses.examples import Suspects, plot_suspects

    generator = torch.Generator().manual_seed(4)
    eight = torch.arange(8)
    blocks = [
        Suspects(split, 40, eight, eight % classes, (eight + 1) % classes,
                 torch.rand(8, generator=generator), torch.rand(8, generator=generator))
        for split in ("train", "held_out")
    ]  # fmt: skip
    saliency = ErrorSaliency(
        torch.randn(16, *shape[1:], generator=generator),
        torch.randn(16, *shape[1:], generator=generator),
    )
    figure = plot_suspects(
        blocks, red_images(16, shape), saliency, class_names(classes), title="Suspects, epoch 2"
    )
    pixels = render(figure, f"label_issues_{classes}_{shape[0]}ch")
    assert_fits(figure)
    footnote = "\n".join(t.get_text() for t in figure.texts)
    assert ("outline" in footnote) == (shape[0] == 1)
    assert ("of the 3." in footnote) == (shape[0] == 3)  # how the maps combine the channels
    assert "ordered by their margin and the held-out set's two votes" in " ".join(footnote.split())
    if shape[0] == 3:
        red = (pixels[..., 0] > 200) & (pixels[..., 1] < 60) & (pixels[..., 2] < 60)
        assert red.sum() > 16 * 16 * 16 * 4
    variants = [  # the other footnotes: (name, option, what it says)
        # an earlier epoch's list, not re-scored (the default), says whence its order comes
        ("earlier", {"rescored": False}, "votes on their order after the last epoch"),
        # re-scored, but no held-out vote (a held-out set of one class)
        ("unvoted", {"voted": False}, "ordered by their margin alone (no held-out vote)"),
    ]
    for name, option, says in variants:
        variant = plot_suspects(
            blocks, red_images(16, shape), saliency, class_names(classes), title="Suspects",
            **option,
        )  # fmt: skip
        render(variant, f"label_issues_{name}_{classes}_{shape[0]}ch")
        assert_fits(variant)
        text = " ".join("\n".join(t.get_text() for t in variant.texts).split())
        assert says in text and "two votes" not in text, name
