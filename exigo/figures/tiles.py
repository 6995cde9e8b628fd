"""Grids of small maps and images, coloured with numpy and drawn as one picture per block.

The saliency, attribution and error figures are rows of 28x28 maps, each row on its own
colour scale. Drawn as one matplotlib Axes per map with a colour bar per row, matplotlib spends
about 10 ms building each Axes and most of a second laying them out (constrained layout asks
every tick and spine for its extent): 1.2 s for the 50 maps of the saliency figure. Here each
block of rows is coloured in numpy and pasted into one RGB canvas shown by a single `imshow`,
the colour bars are pixels of that canvas, and the labels are figure texts at computed
positions, so a figure renders in about 0.2 s. The object outlines over the maps (only where
they are one: `object_outline`) are one `contour` call per block. Tile and label widths grow
with the captions and row labels (20-character class names fit), and the title wraps, so no
text leaves the figure.

Compute, then draw: `block_canvas` returns the pixels (tested exactly), `tile_figure` lays the
blocks out in inches and adds the texts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from textwrap import wrap
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "DARK_BORDER",
    "BlockCanvas",
    "TileBlock",
    "TileRow",
    "block_canvas",
    "display_tiles",
    "object_outline",
    "tile_figure",
]

#: An image whose border pixels average below this intensity has a dark background, so its
#: bright pixels are the object and "intensity above 0.5" traces the object's outline.
DARK_BORDER = 0.2

#: Width of one character in inches, per point of font size: DejaVu Sans averages about 0.6 em
#: a character; 0.65 leaves room for wide letters.
_CHARACTER_INCHES_PER_POINT = 0.65 / 72


@dataclass(frozen=True)
class TileRow:
    """One row of equally sized tiles on one colour scale.

    Attributes:
        label: the row's title, drawn left of it (a newline breaks lines).
        tiles: float array [N, H, W] of values, or [N, H, W, 3 or 4] of RGB(A) colours in
            [0, 1] (alpha is not drawn).
        cmap: matplotlib colour map for values (ignored for RGB tiles).
        limits: (low, high), the values at the two ends of the colour map; values outside
            take the end colours. `low == high` draws every tile in the middle colour.
        bar: draw the colour map as a bar right of the row, its ends and middle labelled.
        clipped: (low end, high end): whether the limits cut values off; the bar's labels
            then read "≤ low" and "≥ high".
        outline: float array [N, H, W] in [0, 1], or None: the ink of the image each tile
            explains; a grey line is drawn where it crosses 0.5.
        backdrop: float array [N, H, W] (grey) or [N, H, W, 3] (RGB) in [0, 1], or None: the
            image each value tile explains, drawn beneath it. The map's colour covers it with
            opacity `a = min(1, |v| / max(|low|, |high|))`: pixel = `(1 - a) * backdrop +
            a * cmap(v)`, so the image shows where the map is near 0 (values only).
    """

    label: str
    tiles: np.ndarray
    cmap: str = "gray"
    limits: tuple[float, float] = (0.0, 1.0)
    bar: bool = False
    clipped: tuple[bool, bool] = (False, False)
    outline: np.ndarray | None = None
    backdrop: np.ndarray | None = None


@dataclass(frozen=True)
class TileBlock:
    """Rows of tiles with the same columns, under an optional header.

    Attributes:
        rows: the rows, top to bottom; every row has the same number of tiles N.
        column_labels: N captions above the columns (may be empty).
        column_colours: N colours of those captions (empty: black).
        header: a bold line above the block (may be empty).
    """

    rows: Sequence[TileRow]
    column_labels: Sequence[str] = ()
    column_colours: Sequence[str] = ()
    header: str = ""


@dataclass(frozen=True)
class BlockCanvas:
    """A block's pixels and where its parts are, in canvas pixels.

    Attributes:
        rgb: uint8 array [canvas H, canvas W, 3]; white between tiles.
        ink: float array [canvas H, canvas W]: the rows' outlines in place, 0 elsewhere.
        row_tops: the first pixel row of each tile row.
        column_lefts: the first pixel column of each tile column.
        tile_size: (H, W) of one tile.
        bar_left: the first pixel column of the colour bars (None without bars).
    """

    rgb: np.ndarray
    ink: np.ndarray
    row_tops: list[int]
    column_lefts: list[int]
    tile_size: tuple[int, int]
    bar_left: int | None


def _spacing(height: int, width: int) -> tuple[int, int, int]:
    """Pixels between columns, between rows, and the colour bar's width, for [H, W] tiles."""
    return max(1, width // 14), max(2, height // 5), max(2, width // 7)


def _colour(values: np.ndarray, cmap: str, limits: tuple[float, float]) -> np.ndarray:
    """Values [...] to RGB [..., 3] in [0, 1]: `cmap((v - low) / (high - low))`, clipped."""
    from matplotlib import colormaps

    low, high = limits
    span = high - low
    position = (values - low) / span if span > 0 else np.full_like(values, 0.5, dtype=float)
    return colormaps[cmap](np.clip(position, 0.0, 1.0))[..., :3]


def _over_backdrop(
    coloured: np.ndarray, values: np.ndarray, backdrop: np.ndarray, limits: tuple[float, float]
) -> np.ndarray:
    """Map colours [N, H, W, 3] laid over `backdrop` with opacity |value| / the larger |limit|."""
    under = np.clip(backdrop.astype(float), 0.0, 1.0)
    if under.ndim == 3:  # grey: the same value in R, G and B
        under = np.repeat(under[..., None], 3, axis=-1)
    reach = max(abs(limits[0]), abs(limits[1]))
    opacity = np.clip(np.abs(values) / reach, 0.0, 1.0) if reach > 0 else np.zeros_like(values)
    opacity = opacity[..., None]
    return (1.0 - opacity) * under[..., :3] + opacity * coloured


def block_canvas(block: TileBlock, columns: int | None = None) -> BlockCanvas:
    """Colour a block's tiles and bars into one RGB canvas.

    Tiles sit `max(1, W // 14)` pixels apart in a row and rows `max(2, H // 5)` pixels apart;
    the colour bars, `max(2, W // 7)` pixels wide, start 3 column gaps after the last column.
    A bar is the colour map from `high` (top) to `low` (bottom), one colour per pixel row.

    Args:
        block: the rows to draw.
        columns: columns to make room for (at least the block's N), so blocks of a figure can
            share one width and their bars line up; None: N.

    Returns:
        The `BlockCanvas`.

    Raises:
        ValueError: no rows, rows of different lengths, or tiles of different sizes.
    """
    if not block.rows:
        raise ValueError("a tile block needs at least one row")
    count = len(block.rows[0].tiles)
    height, width = block.rows[0].tiles.shape[1:3]
    for row in block.rows:
        if len(row.tiles) != count or tuple(row.tiles.shape[1:3]) != (height, width):
            raise ValueError(
                f"every row needs {count} tiles of {height}x{width}; row {row.label!r} has "
                f"shape {tuple(row.tiles.shape)}"
            )
    columns = max(count, columns or 0, 1)
    gap, row_gap, bar_width = _spacing(height, width)
    with_bars = any(row.bar and row.tiles.ndim == 3 for row in block.rows)
    maps_width = columns * width + (columns - 1) * gap
    bar_left = maps_width + 3 * gap if with_bars else None
    canvas_width = maps_width + (3 * gap + bar_width if with_bars else 0)
    canvas_height = len(block.rows) * height + (len(block.rows) - 1) * row_gap
    rgb = np.ones((canvas_height, canvas_width, 3))
    ink = np.zeros((canvas_height, canvas_width))
    row_tops = [row * (height + row_gap) for row in range(len(block.rows))]
    column_lefts = [column * (width + gap) for column in range(columns)]
    for row, top in zip(block.rows, row_tops, strict=True):
        tiles = row.tiles.astype(float)
        coloured = (
            np.clip(tiles[..., :3], 0.0, 1.0)
            if tiles.ndim == 4
            else _colour(tiles, row.cmap, row.limits)
        )  # (N, H, W, 3)
        if row.backdrop is not None and tiles.ndim == 3:
            coloured = _over_backdrop(coloured, tiles, row.backdrop, row.limits)
        for column in range(count):
            where = (
                slice(top, top + height),
                slice(column_lefts[column], column_lefts[column] + width),
            )
            rgb[where] = coloured[column]
            if row.outline is not None:
                ink[where] = row.outline[column]
        if row.bar and tiles.ndim == 3 and bar_left is not None:
            low, high = row.limits
            levels = np.linspace(high, low, height)[:, None]  # (H, 1): high at the top
            rgb[top : top + height, bar_left:] = _colour(levels, row.cmap, row.limits)
    return BlockCanvas(
        rgb=(rgb * 255).round().astype(np.uint8),
        ink=ink,
        row_tops=row_tops,
        column_lefts=column_lefts,
        tile_size=(height, width),
        bar_left=bar_left,
    )


def _bar_number(value: float) -> str:
    """A colour bar label: 2 significant digits, a true minus sign."""
    text = f"{abs(value):.2g}"
    return ("\u2212" + text) if value < 0 else text


def display_tiles(pixels: np.ndarray) -> np.ndarray:
    """Pixels [N, C, H, W] in [0, 1] as tiles: grey [N, H, W] for one channel, else RGB.

    Args:
        pixels: float array [N, 1 or 3, H, W] (more channels: the first three are shown).

    Returns:
        Float array [N, H, W] (one channel) or [N, H, W, 3] (colour).
    """
    if pixels.shape[1] == 1:
        return pixels[:, 0]
    return np.moveaxis(pixels[:, :3], 1, -1)


def object_outline(pixels: np.ndarray) -> np.ndarray | None:
    """The ink to outline, or None where an outline would not be the object's edge.

    An outline at intensity 0.5 marks the object only for single-channel images with a dark
    background (bright strokes on black, as MNIST's digits): the mean of the border pixels
    below `DARK_BORDER`. Colour images, and grey images on a light or textured background,
    get no outline (it would scribble inside the object or miss it).

    Args:
        pixels: float array [N, C, H, W] in [0, 1].

    Returns:
        Float array [N, H, W] (the only channel; images with a light border all zero, so no line
        is drawn over them), or None when no image qualifies.
    """
    if pixels.shape[1] != 1:
        return None
    grey = pixels[:, 0]
    border = np.concatenate(
        [grey[:, 0, :], grey[:, -1, :], grey[:, :, 0], grey[:, :, -1]], axis=1
    )  # (N, 2H + 2W)
    dark = border.mean(axis=1) < DARK_BORDER
    if not dark.any():
        return None
    return np.where(dark[:, None, None], grey, 0.0)


def _text_inches(text: str, points: float) -> float:
    """Approximate width of the longest line of `text` at `points` font size, in inches."""
    longest = max((len(line) for line in text.splitlines()), default=0)
    return longest * points * _CHARACTER_INCHES_PER_POINT


def tile_figure(
    blocks: Sequence[TileBlock],
    title: str,
    footnote: str = "",
    *,
    tile_inches: float = 0.95,
    label_inches: float = 1.3,
) -> Figure:
    """Stack blocks of tiles into one figure, with titles, labels and colour bar numbers.

    Args:
        blocks: the blocks, top to bottom; tiles of the same size in all of them.
        title: the figure's title.
        footnote: grey text under the blocks (a newline breaks lines).
        tile_inches: the side of one tile.
        label_inches: room left of the tiles for the row labels.

    Returns:
        A matplotlib Figure (not attached to pyplot), sized to its content.
    """
    from matplotlib.figure import Figure

    columns = max(len(block.rows[0].tiles) for block in blocks)
    canvases = [block_canvas(block, columns) for block in blocks]
    height, width = canvases[0].tile_size
    # column captions (font size 8) must fit their column, row labels (9) their margin
    widest_caption = max(
        (_text_inches(label, 8) for block in blocks for label in block.column_labels), default=0
    )
    tile_inches = max(tile_inches, (widest_caption + 0.05) * height / (width + width // 14))
    label_inches = max(
        label_inches,
        0.25 + max(_text_inches(row.label, 9) for block in blocks for row in block.rows),
    )
    inches = tile_inches / height  # per canvas pixel
    bars = any(canvas.bar_left is not None for canvas in canvases)
    canvas_width = max(canvas.rgb.shape[1] for canvas in canvases) * inches
    right = 0.7 if bars else 0.25
    fig_width = max(label_inches + canvas_width + right, 6.4)
    left = label_inches + (fig_width - label_inches - canvas_width - right) / 2

    # vertical layout, top down, in inches
    margin = min(left, 0.3)
    title_lines = wrap(title, max(20, int((fig_width - 0.4) / (11 * _CHARACTER_INCHES_PER_POINT))))
    title_height = 0.35 + 0.2 * len(title_lines)
    characters = int((fig_width - 2 * margin) / (8 * _CHARACTER_INCHES_PER_POINT))
    lines = [wrapped for line in footnote.splitlines() for wrapped in wrap(line, characters)]
    footnote_height = 0.2 + 0.15 * len(lines) if lines else 0.15
    header_centre = left + canvas_width / 2
    header_characters = max(
        20, int((2 * min(header_centre, fig_width - header_centre) - 0.2) / 0.1)
    )  # bold, font size 10
    placed = []  # (canvas top in inches from the figure's top, header y, labels y)
    y = title_height
    for block, canvas in zip(blocks, canvases, strict=True):
        header_y = None
        header_lines = wrap(block.header, header_characters) or [""]
        if block.header:
            header_y = y + 0.15 + 0.09 * (len(header_lines) - 1)
            y += 0.35 + 0.18 * (len(header_lines) - 1)
        label_lines = max((label.count("\n") + 1 for label in block.column_labels), default=0)
        y += 0.08 + 0.15 * label_lines
        placed.append((y, header_y))
        y += canvas.rgb.shape[0] * inches + 0.2
    fig_height = y + footnote_height

    figure = Figure(figsize=(fig_width, fig_height))

    def fx(x_inches: float) -> float:
        return x_inches / fig_width

    def fy(y_inches_from_top: float) -> float:
        return 1 - y_inches_from_top / fig_height

    for block, canvas, (top, header_y) in zip(blocks, canvases, placed, strict=True):
        canvas_height, width_px = canvas.rgb.shape[:2]
        axes = figure.add_axes(
            (
                fx(left),
                fy(top + canvas_height * inches),
                fx(width_px * inches),
                canvas_height * inches / fig_height,
            )
        )
        axes.imshow(canvas.rgb, interpolation="nearest")
        if canvas.ink.any():
            axes.contour(canvas.ink, levels=[0.5], colors="0.35", linewidths=0.5)
        axes.set_axis_off()
        if header_y is not None:
            figure.text(
                fx(header_centre),
                fy(header_y),
                "\n".join(wrap(block.header, header_characters)),
                ha="center",
                va="center",
                fontsize=10,
                fontweight="bold",
            )
        tile_height, tile_width = canvas.tile_size
        colours = list(block.column_colours) or ["black"] * len(block.column_labels)
        for column, (label, colour) in enumerate(zip(block.column_labels, colours, strict=True)):
            figure.text(
                fx(left + (canvas.column_lefts[column] + tile_width / 2) * inches),
                fy(top - 0.05),
                label,
                ha="center",
                va="bottom",
                fontsize=8,
                color=colour,
            )
        for row, row_top in zip(block.rows, canvas.row_tops, strict=True):
            figure.text(
                fx(left - 0.1),
                fy(top + (row_top + tile_height / 2) * inches),
                row.label,
                ha="right",
                va="center",
                fontsize=9,
            )
            if not row.bar or canvas.bar_left is None or row.tiles.ndim != 3:
                continue
            low, high = row.limits
            bar_right = left + (canvas.rgb.shape[1] + 1) * inches + 0.02
            for offset, value, prefix in (
                (0.0, high, "\u2265 " if row.clipped[1] else ""),
                (tile_height / 2, (low + high) / 2, ""),
                (tile_height, low, "\u2264 " if row.clipped[0] else ""),
            ):
                figure.text(
                    fx(bar_right),
                    fy(top + (row_top + offset) * inches),
                    prefix + _bar_number(value),
                    va="center",
                    fontsize=7,
                )
    figure.text(
        0.5,
        fy(title_height / 2 + 0.05),
        "\n".join(title_lines),
        ha="center",
        va="center",
        fontsize=11,
    )
    if lines:
        figure.text(
            fx(margin),
            fy(fig_height - 0.1),
            "\n".join(lines),
            va="bottom",
            fontsize=8,
            color="0.3",
        )
    return figure
