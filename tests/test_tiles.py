"""The tile grids behind the saliency, attribution and error figures: exact pixels, labels."""

import io

import numpy as np
import pytest
from matplotlib import colormaps
from PIL import Image

from exigo.figures.pool import render_png
from exigo.figures.tiles import TileBlock, TileRow, block_canvas, tile_figure


def rgb255(cmap: str, position: float) -> list[int]:
    return [round(255 * channel) for channel in colormaps[cmap](position)[:3]]


def two_rows() -> TileBlock:
    values = np.arange(2 * 4 * 4, dtype=float).reshape(2, 4, 4)  # 0..31
    images = np.zeros((2, 4, 4))
    images[1, 1:3, 1:3] = 1.0  # a 2x2 "stroke" in the second image
    return TileBlock(
        [
            TileRow("image", images),
            TileRow(
                "map",
                values,
                "viridis",
                (0.0, 20.0),
                bar=True,
                clipped=(False, True),
                outline=images,
            ),
        ],
        column_labels=["first", "second"],
        column_colours=["black", "tab:red"],
        header="two images",
    )


def test_canvas_places_every_tile_and_colours_it_on_its_row_scale():
    canvas = block_canvas(two_rows())
    # 4x4 tiles: 1 pixel between columns, 2 between rows, a 2-pixel bar 3 gaps after them
    assert canvas.row_tops == [0, 6] and canvas.column_lefts == [0, 5] and canvas.bar_left == 12
    assert canvas.rgb.shape == (10, 14, 3) and canvas.rgb.dtype == np.uint8
    assert canvas.rgb[1, 6].tolist() == [255, 255, 255]  # the stroke, grey scale 0..1
    assert canvas.rgb[0, 5].tolist() == [0, 0, 0]  # background of the second image
    assert canvas.rgb[4:6].min() == 255 and canvas.rgb[:, 4].min() == 255  # white gaps
    # second row, second tile, pixel (1, 2) holds value 16 + 4 + 2 = 22 > 20: clipped to the top
    assert canvas.rgb[6 + 1, 5 + 2].tolist() == rgb255("viridis", 1.0)
    # first tile, pixel (0, 1): value 1 -> 1/20 of the scale
    assert canvas.rgb[6, 1].tolist() == rgb255("viridis", 1 / 20)
    # the bar runs from the top of the scale down to its bottom, over the row's height
    assert canvas.rgb[6, 12].tolist() == rgb255("viridis", 1.0)
    assert canvas.rgb[9, 13].tolist() == rgb255("viridis", 0.0)
    assert canvas.rgb[0:4, 12:].min() == 255  # the grey row has no bar
    # the outline sits under the map row only
    assert canvas.ink[6 + 1, 5 + 1] == 1.0 and canvas.ink[1, 6] == 0.0
    assert canvas.ink.sum() == 4


def test_rgb_tiles_are_pasted_as_they_are_and_equal_limits_give_the_middle_colour():
    colours = np.zeros((1, 3, 3, 3))
    colours[0, ..., 0] = 1.0  # pure red
    flat = np.full((1, 3, 3), 7.0)
    canvas = block_canvas(
        TileBlock([TileRow("rgb", colours), TileRow("flat", flat, "RdBu_r", (7.0, 7.0))])
    )
    assert canvas.rgb[0, 0].tolist() == [255, 0, 0]
    assert canvas.rgb[canvas.row_tops[1], 0].tolist() == rgb255("RdBu_r", 0.5)


def test_blocks_share_a_width_so_their_bars_line_up():
    block = two_rows()
    wide = block_canvas(block, columns=4)
    assert wide.bar_left == 4 * 4 + 3 * 1 + 3 and wide.rgb[:, 5 + 4 + 1 :][:, :4].min() == 255


def test_rows_of_different_lengths_are_refused():
    with pytest.raises(ValueError, match="every row needs 2 tiles"):
        block_canvas(
            TileBlock([TileRow("a", np.zeros((2, 4, 4))), TileRow("b", np.zeros((3, 4, 4)))])
        )
    with pytest.raises(ValueError, match="at least one row"):
        block_canvas(TileBlock([]))


def test_figure_labels_rows_columns_and_bars_and_renders():
    figure = tile_figure([two_rows(), two_rows()], "the title", "a footnote " * 40)
    texts = {text.get_text(): text for text in figure.texts}
    assert {"image", "map", "first", "second", "two images", "the title"} <= set(texts)
    assert texts["second"].get_color() == "tab:red"
    assert {"≥ 20", "10", "0"} <= set(texts)  # clipped top marked, middle, bottom
    footnote = next(t for t in texts if t.startswith("a footnote"))
    assert footnote.count("\n") >= 1  # wrapped to the figure's width
    assert len(figure.axes) == 2  # one picture per block, not one Axes per tile
    with Image.open(io.BytesIO(render_png(figure, 80))) as png:
        width, height = png.size
    assert width == round(figure.get_figwidth() * 80) and height > width / 2


def test_a_backdrop_shows_where_the_map_is_zero_and_is_covered_at_the_limit():
    from matplotlib import colormaps

    values = np.array([[[0.0, 1.0, -0.5, 4.0]]])  # one 1 x 4 tile
    backdrop = np.zeros((1, 1, 4, 3))
    backdrop[..., 0] = 1.0  # red
    row = TileRow("m", values, "RdBu_r", (-2.0, 2.0), backdrop=backdrop)
    rgb = block_canvas(TileBlock([row])).rgb[0].astype(float) / 255
    cmap = colormaps["RdBu_r"]

    def expected(value: float, opacity: float) -> np.ndarray:
        return (1 - opacity) * np.array([1.0, 0.0, 0.0]) + opacity * np.array(
            cmap(np.clip((value + 2) / 4, 0, 1))[:3]
        )

    for column, (value, opacity) in enumerate([(0.0, 0.0), (1.0, 0.5), (-0.5, 0.25), (4.0, 1.0)]):
        np.testing.assert_allclose(rgb[column], expected(value, opacity), atol=1 / 255)
    grey = TileRow("m", values, "RdBu_r", (-2.0, 2.0), backdrop=np.full((1, 1, 4), 0.5))
    np.testing.assert_allclose(
        block_canvas(TileBlock([grey])).rgb[0, 0] / 255, [0.5, 0.5, 0.5], atol=1 / 255
    )
