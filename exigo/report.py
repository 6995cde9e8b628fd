r"""One self-contained HTML file per run, `report.html`, rewritten after every epoch.

The report needs no server and no network: it is a single file that a researcher can mail.
It shows the run's configuration, a metrics table with loss and accuracy curves (inline SVG),
every analysis figure found in `plots/` with one slider (or the arrow keys) that moves all of
them between epochs, the best epoch marked, and the t-SNE layouts as an animation
(`plots/tsne.gif`, assembled from the `tsne_{epoch}.png` frames).

Figures are found by name, so a new analysis appears without any change here:
`plots/{stem}_init.png` is the figure before training and `plots/{stem}_{epoch}.png` the figure
after epoch `epoch`. The stems the run's analyses declared (`run.json`'s `figures`, from each
`exigo.analysis.Analysis.figures`) come first, in that order, with their titles and captions;
other stems follow alphabetically.

Every image is embedded as a base64 `data:` URI. Base64 turns each 3 bytes into 4 characters,
so embedding $n$ bytes of PNG costs

$$\text{size}_{\text{base64}}(n) = 4 \left\lceil \frac{n}{3} \right\rceil \approx 1.33\, n$$

characters, and the report grows linearly with epochs times analyses (at 100 dpi, 20-300 KB
per figure: the MNIST saliency and attribution grids take 150-290 KB each). A
Content-Security-Policy meta tag forbids the page every network request (only `data:` images
and its own inline style and script are allowed).

`build_report(save_dir)` only reads the save directory and returns the HTML text;
`write_report(save_dir)` also assembles the animation and writes both files atomically.
"""

from __future__ import annotations

import base64
import io
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from exigo._io import atomic_write_bytes
from exigo.engine.run_dir import BASE_METRICS

__all__ = [
    "Chart",
    "ChartLine",
    "FigureSeries",
    "best_epoch",
    "build_report",
    "discover_figures",
    "line_chart",
    "write_animation",
    "write_report",
]

#: The animated stem and the file it is written to in `plots/`.
ANIMATED_STEM = "tsne"

#: Step number of the figures made before training (`{stem}_init.png`).
BEFORE_TRAINING = 0

_FIGURE_NAME = re.compile(r"^(?P<stem>.+)_(?P<tag>init|\d+)\.png$")
_TEMPLATE = "report.html.j2"


@dataclass(frozen=True)
class FigureSeries:
    """All epochs' figures of one analysis stem.

    Attributes:
        stem: file stem, e.g. `confusion_matrix`.
        title: heading shown in the report.
        caption: one sentence saying what the figure shows ("" for unknown stems).
        frames: step -> PNG path; step 0 is before training, step k the end of epoch k.
    """

    stem: str
    title: str
    caption: str
    frames: dict[int, Path]


@dataclass(frozen=True)
class ChartLine:
    """One polyline of a chart, in SVG pixel coordinates.

    Attributes:
        label: legend text.
        css_class: class of the line in the template (its colour).
        points: `(x, y)` pixel positions, one per epoch with a value.
    """

    label: str
    css_class: str
    points: list[tuple[float, float]]

    @property
    def svg_points(self) -> str:
        """The `points` attribute of an SVG polyline."""
        return " ".join(f"{x:.1f},{y:.1f}" for x, y in self.points)


@dataclass(frozen=True)
class Chart:
    """A small line chart of per-epoch values, laid out in pixels for an inline SVG.

    Attributes:
        title: heading above the plot area.
        width: SVG width in pixels.
        height: SVG height in pixels.
        left: x of the plot area's left edge.
        right: x of its right edge.
        top: y of its top edge.
        bottom: y of its bottom edge.
        lines: one polyline per series.
        x_ticks: `(x, label)` per tick on the epoch axis.
        y_ticks: `(y, label)` per tick on the value axis.
        best_x: x of the best epoch, or None.
        epoch_x: epoch -> x, where the slider's cursor is drawn.
    """

    title: str
    width: int
    height: int
    left: float
    right: float
    top: float
    bottom: float
    lines: list[ChartLine]
    x_ticks: list[tuple[float, str]]
    y_ticks: list[tuple[float, str]]
    best_x: float | None
    epoch_x: dict[int, float] = field(default_factory=dict)


def discover_figures(
    plots_dir: str | Path, declared: Mapping[str, Mapping[str, str]] | None = None
) -> list[FigureSeries]:
    """Group `plots_dir/{stem}_{init|epoch}.png` files by stem.

    Args:
        plots_dir: a run's `plots/` folder (it may be missing: no figures).
        declared: figure name -> `{"title": ..., "caption": ...}`, in display order
            (`run.json`'s `figures`).

    Returns:
        One series per stem: declared stems in their order, then the others alphabetically
        (titled after their stem, without caption).
    """
    declared = declared or {}
    plots_dir = Path(plots_dir)
    frames: dict[str, dict[int, Path]] = {}
    if plots_dir.is_dir():
        for path in plots_dir.iterdir():
            match = _FIGURE_NAME.match(path.name)
            if match is None or not path.is_file():
                continue
            tag = match["tag"]
            step = BEFORE_TRAINING if tag == "init" else int(tag)
            frames.setdefault(match["stem"], {})[step] = path
    known = [stem for stem in declared if stem in frames]
    others = sorted(stem for stem in frames if stem not in declared)
    series = []
    for stem in known + others:
        text = declared.get(stem, {})
        title = str(text.get("title", stem.replace("_", " ").capitalize()))
        caption = str(text.get("caption", ""))
        series.append(FigureSeries(stem, title, caption, dict(sorted(frames[stem].items()))))
    return series


def best_epoch(rows: Sequence[Mapping[str, Any]]) -> int | None:
    """The epoch whose model was kept: the last row flagged `best`, else the lowest eval loss.

    Args:
        rows: metrics rows with `epoch`, `eval_loss` and optionally `best`.

    Returns:
        The epoch, or None without rows.
    """
    flagged = [row["epoch"] for row in rows if row.get("best")]
    if flagged:
        return int(flagged[-1])
    scored = [row for row in rows if isinstance(row.get("eval_loss"), (int, float))]
    if not scored:
        return None
    return int(min(scored, key=lambda row: row["eval_loss"])["epoch"])


def line_chart(
    title: str,
    rows: Sequence[Mapping[str, Any]],
    series: Mapping[str, str],
    *,
    percent: bool = False,
    best: int | None = None,
    width: int = 420,
    height: int = 220,
) -> Chart:
    """Lay out per-epoch values as polylines in a `width` x `height` pixel box.

    Loss axes start at 0 (an honest scale); accuracy axes span from the tenth below the
    lowest value to 100%, so late, small gains stay visible.

    Args:
        title: heading of the chart.
        rows: metrics rows, each with an `epoch` and the keys named in `series`.
        series: row key -> legend label, e.g. `{"train_loss": "train", "eval_loss": "eval"}`.
        percent: values are fractions in [0, 1], shown as percentages.
        best: epoch to mark, or None.
        width: SVG width in pixels.
        height: SVG height in pixels.

    Returns:
        The laid-out `Chart`.
    """
    left, right, top, bottom = 52.0, width - 14.0, 30.0, height - 30.0
    epochs = [int(row["epoch"]) for row in rows]
    values = [
        float(row[key]) for row in rows for key in series if isinstance(row.get(key), (int, float))
    ]
    first, last = (min(epochs), max(epochs)) if epochs else (1, 1)
    if first == last:  # one epoch: centre it
        first, last = first - 1, last + 1
    if percent:
        lowest = min(min(values, default=0.0), 0.9)
        tick = _nice_step((1.0 - math.floor(lowest * 10) / 10) / 4)
        low, high = math.floor(lowest / tick + 1e-9) * tick, 1.0
    else:
        tick = _nice_step(max(values, default=1.0) / 4)
        low, high = 0.0, math.ceil(max(values, default=1.0) / tick - 1e-9) * tick

    def x_of(epoch: float) -> float:
        return left + (epoch - first) / (last - first) * (right - left)

    def y_of(value: float) -> float:
        return bottom - (value - low) / (high - low) * (bottom - top)

    lines = []
    for index, (key, label) in enumerate(series.items()):
        points = [
            (x_of(row["epoch"]), y_of(float(row[key])))
            for row in rows
            if isinstance(row.get(key), (int, float))
        ]
        lines.append(ChartLine(label, f"series-{index}", points))
    tick_epochs = _epoch_ticks(sorted(set(epochs)))
    decimals = 0 if float(tick * 100).is_integer() else 1  # 2.5% steps need one decimal
    y_ticks = []
    for i in range(round((high - low) / tick) + 1):
        value = low + i * tick
        y_ticks.append((y_of(value), f"{value:.{decimals}%}" if percent else f"{value:.3g}"))
    return Chart(
        title=title,
        width=width,
        height=height,
        left=left,
        right=right,
        top=top,
        bottom=bottom,
        lines=lines,
        x_ticks=[(x_of(epoch), str(epoch)) for epoch in tick_epochs],
        y_ticks=y_ticks,
        best_x=None if best is None or best not in epochs else x_of(best),
        epoch_x={epoch: x_of(epoch) for epoch in epochs},
    )


def _nice_step(rough: float) -> float:
    """The smallest of 1, 2, 2.5 or 5 times a power of ten that is at least `rough` (> 0)."""
    if not rough > 0:
        return 1.0
    power = 10 ** math.floor(math.log10(rough))
    return next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= rough * (1 - 1e-9))


def _epoch_ticks(epochs: list[int], most: int = 10) -> list[int]:
    """At most `most` evenly strided epochs, always including the last."""
    if len(epochs) <= most:
        return epochs
    stride = math.ceil(len(epochs) / most)
    ticks = epochs[::stride]
    return ticks if ticks[-1] == epochs[-1] else [*ticks, epochs[-1]]


def write_animation(
    frames: Sequence[Path],
    path: str | Path,
    labels: Sequence[str] | None = None,
    *,
    frame_ms: int = 700,
    hold_last_ms: int = 2000,
) -> Path:
    """Assemble PNG frames into a looping GIF, written atomically.

    Args:
        frames: PNG files in display order (they may differ in size; smaller ones are padded
            with white at the bottom and right).
        path: the GIF to write.
        labels: text stamped in the top-left corner of each frame (e.g. "epoch 3"), or None.
        frame_ms: display time of each frame in milliseconds.
        hold_last_ms: display time of the last frame, so the final layout can be read.

    Returns:
        `path`.
    """
    from PIL import Image, ImageDraw, ImageFont

    if not frames:
        raise ValueError("write_animation needs at least one frame")
    images = []
    for source in frames:
        with Image.open(source) as image:
            images.append(image.convert("RGB"))
    size = (max(im.width for im in images), max(im.height for im in images))
    font = ImageFont.load_default(size=max(12, size[1] // 40))
    palette_frames = []
    for index, image in enumerate(images):
        canvas = Image.new("RGB", size, "white")
        canvas.paste(image, (0, 0))
        if labels is not None:
            draw = ImageDraw.Draw(canvas)
            box = draw.textbbox((8, 6), labels[index], font=font)
            draw.rectangle((box[0] - 4, box[1] - 3, box[2] + 4, box[3] + 3), fill="white")
            draw.text((8, 6), labels[index], fill="black", font=font)
        # one adaptive palette per frame, no dithering: flat colours stay flat
        palette_frames.append(
            canvas.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
        )
    durations = [frame_ms] * (len(palette_frames) - 1) + [hold_last_ms]
    buffer = io.BytesIO()
    palette_frames[0].save(
        buffer,
        format="gif",
        save_all=True,
        append_images=palette_frames[1:],
        duration=durations,
        loop=0,
        optimize=False,
    )
    return atomic_write_bytes(path, buffer.getvalue())


def _step_label(step: int) -> str:
    return "before training" if step == BEFORE_TRAINING else f"epoch {step}"


def _read_json(path: Path, default: Any) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return default


def _data_uri(path: Path, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


def _format_metric(key: str, value: Any) -> str:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return "" if value is None else str(value)
    if "accuracy" in key:
        return f"{value:.2%}"
    if "loss" in key:
        return f"{value:.4f}"
    if key == "lr":
        return f"{value:.2e}"
    if "seconds" in key:
        return f"{value:.1f}"
    if isinstance(value, int):  # the epoch (analysis scalars are floats by now)
        return str(value)
    return f"{value:.4f}" if abs(value) < 1e4 else f"{value:.4g}"  # aligned decimals


#: Metrics table columns that every run has: row key -> header.
_BASE_COLUMNS = {key: base.header for key, base in BASE_METRICS.items() if base.header}


def _analysis_scalars(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Numeric row keys that the analyses added, in first-seen order."""
    names: list[str] = []
    for row in rows:
        for key, value in row.items():
            numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
            if numeric and key not in BASE_METRICS and key not in names:
                names.append(key)
    return names


def build_report(save_dir: str | Path) -> str:
    """Render the report of the run in `save_dir` as one HTML document.

    Reads `run.json`, `metrics.json` and `plots/` (any of them may be missing, e.g. before the
    first epoch ends); writes nothing. Run `write_report` to refresh `plots/tsne.gif` first.

    Args:
        save_dir: the run's save directory.

    Returns:
        The HTML text, with every figure embedded.
    """
    import jinja2

    save_dir = Path(save_dir)
    run_info: dict[str, Any] = _read_json(save_dir / "run.json", {})
    rows: list[dict[str, Any]] = _read_json(save_dir / "metrics.json", [])
    series = discover_figures(save_dir / "plots", run_info.get("figures"))
    best = best_epoch(rows)

    steps = sorted(
        {int(row["epoch"]) for row in rows} | {step for s in series for step in s.frames}
    )
    current = steps[-1] if steps else None
    embedded_bytes = 0
    sections = []
    for figure_series in series:
        frames = []
        for step in steps:
            path = figure_series.frames.get(step)
            uri = None
            if path is not None:
                embedded_bytes += path.stat().st_size
                uri = _data_uri(path, "image/png")
            frames.append(
                {"step": step, "label": _step_label(step), "uri": uri, "name": _name(path)}
            )
        animation = save_dir / "plots" / f"{figure_series.stem}.gif"
        animation_uri = None
        if animation.is_file():
            embedded_bytes += animation.stat().st_size
            animation_uri = _data_uri(animation, "image/gif")
        sections.append(
            {
                "stem": figure_series.stem,
                "title": figure_series.title,
                "caption": figure_series.caption,
                "frames": frames,
                "animation_uri": animation_uri,
                "animation_name": f"plots/{animation.name}",
            }
        )

    present = {key for row in rows for key in row}
    columns = {key: header for key, header in _BASE_COLUMNS.items() if key in present}
    table = [
        {
            "epoch": int(row["epoch"]),
            "best": int(row["epoch"]) == best,
            "cells": [_format_metric(key, row.get(key)) for key in columns],
        }
        for row in rows
    ]
    # analysis scalars: one row per scalar, one column per epoch (their names are long)
    scalars = [
        {"name": _breakable(name), "cells": [_format_metric(name, row.get(name)) for row in rows]}
        for name in _analysis_scalars(rows)
    ]
    charts = [
        line_chart("loss", rows, {"train_loss": "train", "eval_loss": "eval"}, best=best),
        line_chart(
            "accuracy",
            rows,
            {"train_accuracy": "train", "eval_accuracy": "eval"},
            percent=True,
            best=best,
        ),
    ]
    best_row = next((row for row in rows if int(row["epoch"]) == best), None)
    config = run_info.get("config", {})
    environment = {
        key: run_info[key]
        for key in ("run_name", "model", "seed", "device", "started", "train_size", "val_size")
        if key in run_info
    }
    data = run_info.get("data")
    if isinstance(data, dict) and data.get("source"):  # where the images came from
        environment["data"] = data["source"]

    jinja = jinja2.Environment(
        autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True
    )
    source = resources.files("exigo").joinpath("templates", _TEMPLATE).read_text("utf-8")
    template = jinja.from_string(source)
    return template.render(
        run=run_info,
        environment=environment,
        versions=run_info.get("versions", {}),
        config=config,
        planned_epochs=config.get("epochs"),
        rows=rows,
        columns=list(columns.values()),
        table=table,
        scalars=scalars,
        charts=charts,
        best=best,
        best_row=best_row,
        steps=[{"step": step, "label": _step_label(step)} for step in steps],
        current=current,
        sections=sections,
        embedded_size=(
            f"{embedded_bytes / 1e6:.1f} MB"
            if embedded_bytes >= 1e6
            else f"{embedded_bytes / 1e3:.0f} KB"
        ),
        format_metric=_format_metric,
    )


def _breakable(header: str) -> Any:
    """`header` as markup that may wrap after each "/" (analysis scalars are `name/metric`)."""
    from markupsafe import Markup, escape

    return Markup("/<wbr>").join(escape(part) for part in header.split("/"))


def _name(path: Path | None) -> str:
    return "" if path is None else f"plots/{path.name}"


def write_report(save_dir: str | Path) -> Path:
    """Refresh `plots/tsne.gif` from the t-SNE frames, then write `report.html` atomically.

    Args:
        save_dir: the run's save directory.

    Returns:
        Path of `report.html`.
    """
    save_dir = Path(save_dir)
    plots_dir = save_dir / "plots"
    for figure_series in discover_figures(plots_dir):  # titles do not matter here
        if figure_series.stem == ANIMATED_STEM:
            write_animation(
                list(figure_series.frames.values()),
                plots_dir / f"{ANIMATED_STEM}.gif",
                labels=[_step_label(step) for step in figure_series.frames],
            )
    html = build_report(save_dir)
    return atomic_write_bytes(save_dir / "report.html", html.encode("utf-8"))
