r"""One self-contained HTML file per run, `report.html`, rewritten after every epoch.

The report needs no server and no network: it is a single file that a researcher can mail.
It leads with the verdict: the best epoch's accuracy and loss, what exigo flagged (each flag
links to its section), the loss and accuracy curves and the latest confusion matrix and
saliency figure, all above the fold of a 1400 x 900 window. Below come the other figures, the
analyses' scalars drawn as small charts over the epochs (the numbers on hover, and in a
collapsed table), the metrics table and the run's configuration (collapsed). One slider (or the
arrow keys, or *play*) moves every figure, table row and chart cursor between epochs.

Figures are found by name, so a new analysis appears without any change here:
`plots/{stem}_init.png` is the figure before training and `plots/{stem}_{epoch}.png` the figure
after epoch `epoch`. The stems the run's analyses declared (`run.json`'s `figures`, from each
`exigo.analysis.Analysis.figures`) come first, in that order, with their titles and captions;
other stems follow alphabetically.

Every image is embedded as a base64 `data:` URI, which turns each 3 bytes into 4 characters:

$$\text{size}_{\text{base64}}(n) = 4 \left\lceil \frac{n}{3} \right\rceil \approx 1.33\, n.$$

MNIST's default analyses draw about 1.1 MB of PNG per epoch, so embedding every epoch would
grow the page by about 1.4 MB an epoch (140 MB after 100 epochs). The page stays bounded
instead (`embedding_plan`): full-size figures for the last, best and first epoch, the figures
before training and evenly spaced epochs, up to `FULL_BUDGET` characters; half-size copies of
other evenly spaced epochs up to `SMALL_BUDGET`; none for the rest (they stay in `plots/`),
which the page says where they would be and in its footer. Each image is encoded once per
file version (`exigo._embed.ImageCache`), so a rebuild costs about the same at epoch 100 as
at epoch 2. A Content-Security-Policy meta tag forbids the page every network request (only
`data:` images and its own inline style and script are allowed).

`build_report(save_dir)` only reads the save directory and returns the HTML text;
`write_report(save_dir)` also refreshes the t-SNE animation `plots/tsne.gif` and writes both
files atomically.
"""

from __future__ import annotations

import io
import json
import math
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from markupsafe import Markup

from exigo._embed import ImageCache, base64_length
from exigo._io import atomic_write_bytes
from exigo.engine.run_dir import BASE_METRICS

__all__ = [
    "FULL_BUDGET",
    "SMALL_BUDGET",
    "Chart",
    "ChartLine",
    "EmbeddingPlan",
    "FigureSeries",
    "Flag",
    "RunFolder",
    "ScalarGroup",
    "animation_steps",
    "best_epoch",
    "build_report",
    "chart",
    "describe_steps",
    "discover_figures",
    "embed_frames",
    "embedding_plan",
    "format_metric",
    "frame_costs",
    "line_chart",
    "metric_label",
    "metric_points",
    "read_run",
    "render_page",
    "run_flags",
    "scalar_groups",
    "size_text",
    "small_cost",
    "step_label",
    "write_animation",
    "write_report",
]

#: The animated stem and the file it is written to in `plots/`.
ANIMATED_STEM = "tsne"

#: Step number of the figures made before training (`{stem}_init.png`).
BEFORE_TRAINING = 0

#: Base64 characters of full-size figures one page embeds (about 7.5 MB of PNG).
FULL_BUDGET = 10_000_000

#: Base64 characters of half-size copies one page embeds.
SMALL_BUDGET = 3_000_000

#: Evenly spaced epochs offered full size (beside the first, best and last), and half size.
SPACED_FULL, SPACED_SMALL = 8, 40

#: Frames of the t-SNE animation at most (evenly spaced, the last always in).
ANIMATION_FRAMES = 24

#: Stems shown beside the curves at the top of the report, when the run has them.
HEADLINE_STEMS = ("confusion_matrix", "saliency")

_FIGURE_NAME = re.compile(r"^(?P<stem>.+)_(?P<tag>init|\d+)\.png$")

#: The encoded figures of the pages built in this process (one run's report after another).
IMAGES = ImageCache()


@dataclass(frozen=True)
class FigureSeries:
    """All epochs' figures of one analysis stem.

    Attributes:
        stem: file stem, e.g. `confusion_matrix`.
        title: heading shown in the report.
        caption: one sentence saying what the figure shows ("" for unknown stems).
        frames: step -> PNG path; step 0 is before training, step k the end of epoch k.
        analysis: the name of the analysis that draws it ("" when run.json does not say).
    """

    stem: str
    title: str
    caption: str
    frames: dict[int, Path]
    analysis: str = ""


@dataclass(frozen=True)
class RunFolder:
    """What a run folder holds, as the report reads it.

    Attributes:
        path: the save directory.
        info: `run.json` ({} when missing).
        rows: `metrics.json`, one row per completed epoch ([] when missing).
        series: the figure series of `plots/`, declared stems first.
        best: the best epoch, or None before the first epoch ends.
    """

    path: Path
    info: dict[str, Any]
    rows: list[dict[str, Any]]
    series: list[FigureSeries]
    best: int | None

    @property
    def steps(self) -> list[int]:
        """Every step with a metrics row or a figure, ascending (0 = before training)."""
        epochs = {int(row["epoch"]) for row in self.rows}
        return sorted(epochs | {step for s in self.series for step in s.frames})

    @property
    def class_names(self) -> list[str]:
        """`run.json`'s class names ([] when it has none)."""
        return [str(name) for name in self.info.get("class_names", [])]


@dataclass(frozen=True)
class ChartLine:
    """One polyline of a chart, in SVG pixel coordinates.

    Attributes:
        label: legend text.
        css_class: class of the line in the template (its colour and dashes).
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
        hover: `(epoch, x0, x1, text)` per epoch: a band of the plot area whose tooltip lists
            every line's value at that epoch.
        markers: draw a dot at every point (few epochs); lines only beyond 30 epochs.
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
    hover: list[tuple[int, float, float, str]] = field(default_factory=list)
    markers: bool = True


@dataclass(frozen=True)
class Flag:
    """One thing the report's headline says about the run.

    Attributes:
        level: "warning" (a suspected problem), "note" (worth a look) or "ok".
        text: one sentence, plain text.
        target: id of the section it links to ("" for none).
    """

    level: str
    text: str
    target: str = ""


@dataclass(frozen=True)
class ScalarGroup:
    """Analysis scalars that belong together, drawn as one small chart over the epochs.

    Attributes:
        key: the common prefix of their names (`precision`, `faithfulness/deletion_auc`).
        title: heading of the chart.
        members: metric name -> legend label, in first-seen order.
        percent: the values are fractions shown as percentages (precision, recall).
    """

    key: str
    title: str
    members: dict[str, str]
    percent: bool


@dataclass(frozen=True)
class EmbeddingPlan:
    """Which epochs' figures a page embeds, and how.

    Attributes:
        full: steps whose figures are embedded as they are.
        small: steps embedded as half-size copies.
        full_chars: base64 characters of the full-size figures.
        small_chars: base64 characters of the half-size copies.
    """

    full: tuple[int, ...]
    small: tuple[int, ...]
    full_chars: int = 0
    small_chars: int = 0

    def tier(self, step: int) -> str:
        """`"full"`, `"small"` or `"none"` for `step`.

        Args:
            step: 0 (before training) or an epoch.

        Returns:
            How the step's figures are embedded.
        """
        return "full" if step in self.full else "small" if step in self.small else "none"


# ---------------------------------------------------------------------------------------------
# reading a run folder


def discover_figures(
    plots_dir: str | Path, declared: Mapping[str, Mapping[str, str]] | None = None
) -> list[FigureSeries]:
    """Group `plots_dir/{stem}_{init|epoch}.png` files by stem.

    Args:
        plots_dir: a run's `plots/` folder (it may be missing: no figures).
        declared: figure name -> `{"title": ..., "caption": ..., "analysis": ...}`, in
            display order (`run.json`'s `figures`).

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
        analysis = str(text.get("analysis", ""))
        frames_in_order = dict(sorted(frames[stem].items()))
        series.append(FigureSeries(stem, title, caption, frames_in_order, analysis))
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


def read_run(save_dir: str | Path) -> RunFolder:
    """Read a run folder's `run.json`, `metrics.json` and `plots/` (any of them may be missing).

    Args:
        save_dir: the run's save directory.

    Returns:
        The `RunFolder`.
    """
    save_dir = Path(save_dir)
    info = _read_json(save_dir / "run.json", {})
    rows = _read_json(save_dir / "metrics.json", [])
    info = info if isinstance(info, dict) else {}
    rows = [row for row in rows if isinstance(row, dict) and "epoch" in row]
    series = discover_figures(save_dir / "plots", info.get("figures"))
    return RunFolder(save_dir, info, rows, series, best_epoch(rows))


def _read_json(path: Path, default: Any) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return default


# ---------------------------------------------------------------------------------------------
# charts


def chart(
    title: str,
    lines: Sequence[tuple[str, str, Sequence[tuple[int, float]]]],
    *,
    percent: bool = False,
    from_zero: bool = True,
    best: int | None = None,
    width: int = 420,
    height: int = 220,
    value_format: Callable[[float], str] | None = None,
) -> Chart:
    """Lay out per-epoch series as polylines in a `width` x `height` pixel box.

    Percentages span from the tenth below the lowest value to 100%, so late, small gains stay
    visible; other axes start at 0 (`from_zero`, an honest scale for losses) or hug the data.

    Args:
        title: heading of the chart.
        lines: `(label, css class, [(epoch, value), ...])` per line.
        percent: values are fractions in [0, 1], shown as percentages.
        from_zero: the value axis starts at 0 (ignored for percentages).
        best: epoch to mark, or None.
        width: SVG width in pixels.
        height: SVG height in pixels.
        value_format: how the hover text writes a value (default: 4 significant digits, or a
            percentage with two decimals).

    Returns:
        The laid-out `Chart`.
    """
    left, right, top, bottom = 52.0, width - 14.0, 16.0, height - 30.0
    epochs = sorted({epoch for _, _, points in lines for epoch, _ in points})
    values = [value for _, _, points in lines for _, value in points]
    first, last = (epochs[0], epochs[-1]) if epochs else (1, 1)
    if first == last:  # one epoch: centre it
        first, last = first - 1, last + 1
    low, high, tick = _value_axis(values, percent=percent, from_zero=from_zero)

    def x_of(epoch: float) -> float:
        return left + (epoch - first) / (last - first) * (right - left)

    def y_of(value: float) -> float:
        return bottom - (value - low) / (high - low) * (bottom - top)

    laid_out = [
        ChartLine(label, css_class, [(x_of(e), y_of(v)) for e, v in points])
        for label, css_class, points in lines
    ]
    decimals = 0 if float(tick * 100).is_integer() else 1  # 2.5% steps need one decimal
    y_ticks = []
    for i in range(round((high - low) / tick) + 1):
        value = low + i * tick
        y_ticks.append((y_of(value), f"{value:.{decimals}%}" if percent else f"{value:.3g}"))
    write = value_format or ((lambda v: f"{v:.2%}") if percent else (lambda v: f"{v:.4g}"))
    by_epoch: dict[int, list[str]] = {}
    for label, _, points in lines:
        for epoch, value in points:
            by_epoch.setdefault(epoch, []).append(f"{label}: {write(value)}")
    hover = []
    for index, epoch in enumerate(epochs):  # bands reach halfway to the neighbours
        before = x_of(epochs[index - 1]) if index else left
        after = x_of(epochs[index + 1]) if index + 1 < len(epochs) else right
        x = x_of(epoch)
        text = "\n".join([f"epoch {epoch}", *by_epoch[epoch]])
        hover.append((epoch, (x + before) / 2 if index else left, (x + after) / 2, text))
    return Chart(
        title=title,
        width=width,
        height=height,
        left=left,
        right=right,
        top=top,
        bottom=bottom,
        lines=laid_out,
        x_ticks=[(x_of(epoch), str(epoch)) for epoch in _epoch_ticks(epochs)],
        y_ticks=y_ticks,
        best_x=None if best is None or best not in epochs else x_of(best),
        epoch_x={epoch: x_of(epoch) for epoch in epochs},
        hover=hover,
        markers=len(epochs) <= 30,
    )


def line_chart(
    title: str,
    rows: Sequence[Mapping[str, Any]],
    series: Mapping[str, str],
    *,
    percent: bool = False,
    from_zero: bool = True,
    best: int | None = None,
    width: int = 420,
    height: int = 220,
) -> Chart:
    """`chart` of metrics rows: one line per row key, coloured `series-0`, `series-1`, ...

    Args:
        title: heading of the chart.
        rows: metrics rows, each with an `epoch` and the keys named in `series`.
        series: row key -> legend label, e.g. `{"train_loss": "train", "eval_loss": "eval"}`.
        percent: values are fractions in [0, 1], shown as percentages.
        from_zero: the value axis starts at 0 (ignored for percentages).
        best: epoch to mark, or None.
        width: SVG width in pixels.
        height: SVG height in pixels.

    Returns:
        The laid-out `Chart`.
    """
    lines = [
        (label, f"series-{index % 10}", metric_points(rows, key))
        for index, (key, label) in enumerate(series.items())
    ]
    return chart(
        title,
        lines,
        percent=percent,
        from_zero=from_zero,
        best=best,
        width=width,
        height=height,
    )


def metric_points(rows: Sequence[Mapping[str, Any]], key: str) -> list[tuple[int, float]]:
    """A chart line: `(epoch, value)` of every row where `key` is a finite number.

    Args:
        rows: metrics.json rows.
        key: the metric.

    Returns:
        The points, in row order.
    """
    return [(int(row["epoch"]), float(row[key])) for row in rows if _is_number(row.get(key))]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _value_axis(
    values: Sequence[float], *, percent: bool, from_zero: bool
) -> tuple[float, float, float]:
    """`(low, high, tick)` of a value axis with about four ticks."""
    if percent:
        lowest = min(min(values, default=0.0), 0.9)
        tick = _nice_step((1.0 - math.floor(lowest * 10) / 10) / 4)
        return math.floor(lowest / tick + 1e-9) * tick, 1.0, tick
    top = max(values, default=1.0)
    bottom = 0.0 if from_zero else min(values, default=0.0)
    bottom = min(bottom, 0.0) if from_zero else bottom
    if top - bottom <= 1e-12 * max(1.0, abs(top)):  # flat: give it room
        pad = abs(top) * 0.1 or 1.0
        top, bottom = top + pad, (0.0 if from_zero and bottom >= 0 else bottom - pad)
    tick = _nice_step((top - bottom) / 4)
    low = math.floor(bottom / tick + 1e-9) * tick
    high = math.ceil(top / tick - 1e-9) * tick
    return low, max(high, low + tick), tick


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
    if epochs[-1] - ticks[-1] < stride / 2:  # too close to the last: its label would collide
        ticks = ticks[:-1]
    return [*ticks, epochs[-1]]


#: Display names of metric name parts (the attribution methods' keys); others are prettified.
_LABELS = {
    "saliency": "Saliency",
    "occlusion": "Occlusion",
    "input_x_gradient": "Input × Gradient",
    "integrated_gradients": "Integrated Gradients",
    "smoothgrad": "SmoothGrad",
    "grad_cam": "Grad-CAM",
    "random": "random order",
    "deletion_auc": "deletion AUC",
    "insertion_auc": "insertion AUC",
    "ssim": "SSIM",
    "spearman": "Spearman",
}

#: What a reader needs to know to read a group's chart.
_GROUP_NOTES = {
    "faithfulness/deletion_auc": "lower is better",
    "faithfulness/insertion_auc": "higher is better",
    "sanity/spearman": "after randomising the weights; lower is better",
    "sanity/ssim": "after randomising the weights; lower is better",
    "sanity/unchanged": "1 = flagged: the maps ignore the weights",
    "attributions/drift": "Spearman with the previous epoch; near 1 = settled",
}


def _label(part: str) -> str:
    return _LABELS.get(part, part.replace("_", " "))


def metric_label(name: str) -> str:
    """A scalar's name for people, e.g. "faithfulness · deletion AUC · Grad-CAM".

    Args:
        name: the metrics.json key.

    Returns:
        Its parts, spelled out, joined by " · ".
    """
    return " · ".join(_label(part) for part in name.split("/"))


def scalar_groups(
    rows: Sequence[Mapping[str, Any]], class_names: Sequence[str] = ()
) -> list[ScalarGroup]:
    """The analyses' scalars grouped by name prefix: `precision/3` belongs to `precision`.

    Args:
        rows: metrics rows.
        class_names: display name per class: members of `precision` and `recall` are class
            indices.

    Returns:
        One group per prefix, in first-seen order (a scalar without "/" is its own group).
    """
    groups: dict[str, dict[str, str]] = {}
    for name in _analysis_scalars(rows):
        key, _, member = name.rpartition("/")
        key = key or name
        if key in ("precision", "recall") and member.isdigit() and int(member) < len(class_names):
            label = str(class_names[int(member)])
        else:
            label = _label(member) if member != name else name
        groups.setdefault(key, {})[name] = label
    result = []
    for key, members in groups.items():
        words = " · ".join(_label(part) for part in key.split("/"))
        per = " per class" if key in ("precision", "recall") else ""
        note = _GROUP_NOTES.get(key)
        title = f"{words}{per}" + (f" ({note})" if note else "")
        percent = key in ("precision", "recall") or "accuracy" in key
        result.append(ScalarGroup(key, title, members, percent))
    return result


# ---------------------------------------------------------------------------------------------
# what the headline says


def run_flags(folder: RunFolder) -> list[Flag]:
    """The suspected problems and notable facts of a run's last epoch, each with its section.

    Warnings: a figure missing from the last epoch (its analysis failed), the eval loss rising
    after the best epoch, attribution methods no better than random order (faithfulness) or
    unchanged when the weights are randomised (sanity). Notes: the weakest classes, and
    explanations still moving between the last two epochs. An "ok" flag when nothing warns.

    Args:
        folder: the run.

    Returns:
        Warnings first, then notes.
    """
    rows = folder.rows
    if not rows:
        return []
    last = rows[-1]
    epoch = int(last["epoch"])
    stems = {s.stem for s in folder.series}
    warnings: list[Flag] = []
    notes: list[Flag] = []

    def section(stem: str) -> str:
        return f"series-{stem}" if stem in stems else "scalars"

    # a figure may be missing on purpose (an analysis run every k epochs, no error to show):
    # warn only for what the metrics row says failed at this epoch
    failed = {str(name) for name in last.get("failed", ())}
    for series in folder.series:
        if epoch in series.frames:
            continue
        what = (
            f"its analysis, {series.analysis}," if series.analysis in failed
            else "its drawing" if f"figure {series.stem}" in failed
            else None
        )  # fmt: skip
        if what is not None:
            warnings.append(
                Flag(
                    "warning",
                    f"No {series.title.lower()} figure for epoch {epoch}: {what} failed "
                    "(the console says why).",
                    f"series-{series.stem}",
                )
            )
    best = folder.best
    best_row = next((row for row in rows if int(row["epoch"]) == best), None)
    if best_row is not None and best != epoch and _is_number(last.get("eval_loss")):
        lowest, now = float(best_row["eval_loss"]), float(last["eval_loss"])
        if now > lowest * 1.05:
            warnings.append(
                Flag(
                    "warning",
                    f"Eval loss rose to {now:.4f} after its lowest, {lowest:.4f} at epoch {best}: "
                    f"overfitting? models/best.pt keeps epoch {best}.",
                    "charts",
                )
            )
    methods = [k.rsplit("/", 1)[1] for k in last if k.startswith("faithfulness/deletion_auc/")]
    if "random" in methods:
        random_deletion = last["faithfulness/deletion_auc/random"]
        random_insertion = last.get("faithfulness/insertion_auc/random")
        weak = [
            _label(m)
            for m in methods
            if m != "random"
            and _is_number(random_insertion)
            and not (
                last[f"faithfulness/deletion_auc/{m}"] < random_deletion
                and last.get(f"faithfulness/insertion_auc/{m}", -math.inf) > random_insertion
            )
        ]
        if weak:
            warnings.append(
                Flag(
                    "warning",
                    f"Faithfulness: {_join(weak)} {'ranks' if len(weak) == 1 else 'rank'} pixels "
                    "no better than random order (deletion and insertion AUC).",
                    section("attribution_checks"),
                )
            )
    unchanged = [
        _label(k.rsplit("/", 1)[1])
        for k, v in last.items()
        if k.startswith("sanity/unchanged/") and _is_number(v) and v >= 0.5
    ]
    if unchanged:
        warnings.append(
            Flag(
                "warning",
                f"Sanity check: {_join(unchanged)} barely "
                f"{'changes' if len(unchanged) == 1 else 'change'} when the model's weights are "
                "randomised: they do not explain this model.",
                section("attribution_checks"),
            )
        )
    recalls = {
        k.rsplit("/", 1)[1]: v for k, v in last.items() if k.startswith("recall/") and _is_number(v)
    }
    if recalls:
        weakest = min(recalls, key=lambda c: recalls[c])
        precision = last.get(f"precision/{weakest}")
        names = folder.class_names
        name = names[int(weakest)] if weakest.isdigit() and int(weakest) < len(names) else weakest
        text = f"Weakest class: {name}, recall {recalls[weakest]:.1%}"
        text += f", precision {precision:.1%}." if _is_number(precision) else "."
        notes.append(Flag("note", text, section("confusion_matrix")))
    moving = [
        _label(k.rsplit("/", 1)[1])
        for k, v in last.items()
        if k.startswith("attributions/drift/") and _is_number(v) and v < 0.8
    ]  # 0.8: AttributionSettings.settled_threshold's default
    if moving:
        notes.append(
            Flag(
                "note",
                f"Explanations still moving: {_join(moving)} changed since the previous epoch "
                "(Spearman below 0.8).",
                section("attributions"),
            )
        )
    if not warnings:
        warnings.append(Flag("ok", "No check flagged a problem at the last epoch."))
    return warnings + notes


def _join(names: Sequence[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


# ---------------------------------------------------------------------------------------------
# which figures a page embeds


def embedding_plan(
    full_cost: Mapping[int, int],
    best: int | None,
    small_cost: Callable[[int], int] | None = None,
    *,
    also: Sequence[int] = (),
    full_budget: int = FULL_BUDGET,
    small_budget: int = SMALL_BUDGET,
    spaced_full: int = SPACED_FULL,
    spaced_small: int = SPACED_SMALL,
) -> EmbeddingPlan:
    """Choose the steps embedded at full size, at half size, and not at all.

    Full size, while `full_budget` lasts, in this order: the last epoch, the best, the figures
    before training, the first epoch, then up to `spaced_full` evenly spaced epochs (the
    multiples of a power of two, the coarsest first). Half size, while `small_budget` lasts:
    what did not fit, then up to `spaced_small` evenly spaced epochs. The choice depends only
    on the epochs and the sizes, so it changes little from one epoch to the next.

    Args:
        full_cost: step -> base64 characters of its figures at full size.
        best: the best epoch, or None.
        small_cost: step -> characters of its half-size copies (made when asked), or None
            for no half-size copies.
        also: more steps to keep right after the best (a second run's best epoch).
        full_budget: characters of full-size figures at most.
        small_budget: characters of half-size copies at most.
        spaced_full: evenly spaced epochs offered full size.
        spaced_small: evenly spaced epochs offered half size.

    Returns:
        The `EmbeddingPlan`.
    """
    epochs = sorted(step for step in full_cost if step != BEFORE_TRAINING)
    first_choices = [
        epochs[-1] if epochs else None,
        best,
        *also,
        BEFORE_TRAINING,
        epochs[0] if epochs else None,
    ]
    candidates = _unique([*first_choices, *_evenly_spaced(epochs, spaced_full)], full_cost)
    full: list[int] = []
    full_chars = 0
    for step in candidates:
        if full_chars + full_cost[step] <= full_budget:
            full.append(step)
            full_chars += full_cost[step]
    small: list[int] = []
    small_chars = 0
    if small_cost is not None:
        leftover = [step for step in candidates if step not in full]
        for step in _unique([*leftover, *_evenly_spaced(epochs, spaced_small)], full_cost):
            if step in full:
                continue
            cost = small_cost(step)
            if small_chars + cost <= small_budget:
                small.append(step)
                small_chars += cost
    return EmbeddingPlan(tuple(sorted(full)), tuple(sorted(small)), full_chars, small_chars)


def _unique(steps: Sequence[int | None], known: Mapping[int, int]) -> list[int]:
    seen: list[int] = []
    for step in steps:
        if step is not None and step in known and step not in seen:
            seen.append(step)
    return seen


def _evenly_spaced(epochs: Sequence[int], most: int) -> list[int]:
    """The multiples of the smallest power of two that leaves at most `most`; coarsest first.

    A power of two keeps the choice stable as epochs are added: it only halves, at 2x, 4x, ...
    """
    if not epochs or most <= 0:
        return []
    stride = 1
    while sum(1 for epoch in epochs if epoch % stride == 0) > most:
        stride *= 2
    chosen = [epoch for epoch in epochs if epoch % stride == 0]
    return sorted(chosen, key=lambda epoch: (-(epoch & -epoch), epoch))


def frame_costs(series: Sequence[FigureSeries], steps: Sequence[int]) -> dict[int, int]:
    """Bytes each step's full-size figures add to a page (base64).

    Args:
        series: the figure series on the page.
        steps: the page's steps.

    Returns:
        Step -> bytes.
    """
    return {
        step: sum(base64_length(s.frames[step].stat().st_size) for s in series if step in s.frames)
        for step in steps
    }


def small_cost(series: Sequence[FigureSeries]) -> Callable[[int], int]:
    """What a step's half-size WebP copies would add to a page instead.

    Args:
        series: the figure series on the page.

    Returns:
        A function: step -> bytes.
    """

    def cost(step: int) -> int:
        return sum(len(IMAGES.small(s.frames[step])) for s in series if step in s.frames)

    return cost


def embed_frames(
    series: FigureSeries, steps: Sequence[int], plan: EmbeddingPlan, best: int | None
) -> list[dict[str, Any]]:
    """The template's frames of one figure series: one per step, with its image or why not.

    Args:
        series: the figure series.
        steps: every step the page's slider offers.
        plan: which steps are embedded, and how.
        best: the best epoch (its frames carry the badge), or None.

    Returns:
        Per step a dict: `step`, `label`, `tier` ("full", "small", "none": not embedded,
        "missing": no such file), `uri` (or None), `name` (`plots/...`), `best`.
    """
    frames = []
    for step in steps:
        path = series.frames.get(step)
        tier = "missing" if path is None else plan.tier(step)
        uri = None
        if tier == "full":
            uri = IMAGES.full(path)
        elif tier == "small":
            uri = IMAGES.small(path)
        if uri is not None:  # base64 holds no character HTML escapes: skip scanning megabytes
            uri = Markup(uri)
        frames.append(
            {
                "step": step,
                "label": step_label(step),
                "tier": tier,
                "uri": uri,
                "name": "" if path is None else f"plots/{path.name}",
                "best": step == best,
            }
        )
    return frames


def step_label(step: int) -> str:
    """The slider's name of a step.

    Args:
        step: 0 (before training) or an epoch.

    Returns:
        "before training" for step 0, "epoch k" otherwise.
    """
    return "before training" if step == BEFORE_TRAINING else f"epoch {step}"


def describe_steps(steps: Sequence[int]) -> str:
    """A short list of steps, for a sentence.

    Args:
        steps: 0 (before training) and epochs, in any order.

    Returns:
        E.g. "before training, epochs 1-3, 8 and 12"; "none" without steps.
    """
    parts = ["before training"] if BEFORE_TRAINING in steps else []
    epochs = sorted(step for step in steps if step != BEFORE_TRAINING)
    runs: list[str] = []
    index = 0
    while index < len(epochs):
        end = index
        while end + 1 < len(epochs) and epochs[end + 1] == epochs[end] + 1:
            end += 1
        runs.append(str(epochs[index]) if end == index else f"{epochs[index]}-{epochs[end]}")
        index = end + 1
    if runs:
        many = len(epochs) > 1
        parts.append(("epochs " if many else "epoch ") + _join(runs))
    return ", ".join(parts) or "none"


def size_text(characters: int) -> str:
    """A size for people.

    Args:
        characters: bytes (or ASCII characters).

    Returns:
        "3.2 MB" from a million bytes on, else "80 KB".
    """
    return f"{characters / 1e6:.1f} MB" if characters >= 1e6 else f"{characters / 1e3:.0f} KB"


# ---------------------------------------------------------------------------------------------
# the page


def format_metric(key: str, value: Any) -> str:
    """A metric as the report's tables write it.

    Args:
        key: the metric's name (accuracies become percentages, losses get 4 decimals).
        value: its value (None and non-numbers are written as they are).

    Returns:
        The text.
    """
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


def render_page(template: str, **context: Any) -> str:
    """Render one of exigo's page templates (`exigo/templates/`), HTML-escaped.

    Args:
        template: the file name, e.g. `report.html.j2`.
        **context: the template's variables.

    Returns:
        The HTML text.
    """
    return _environment().get_template(template).render(**context)


_JINJA: dict[str, Any] = {}
_JINJA_LOCK = threading.Lock()


def _environment() -> Any:
    import jinja2

    with _JINJA_LOCK:
        if "env" not in _JINJA:
            _JINJA["env"] = jinja2.Environment(
                loader=jinja2.PackageLoader("exigo", "templates"),
                autoescape=True,
                undefined=jinja2.StrictUndefined,
                trim_blocks=True,
                lstrip_blocks=True,
            )
            _JINJA["env"].globals.update(format_metric=format_metric)
        return _JINJA["env"]


def build_report(save_dir: str | Path) -> str:
    """Render the report of the run in `save_dir` as one HTML document.

    Reads `run.json`, `metrics.json` and `plots/` (any of them may be missing, e.g. before the
    first epoch ends); writes nothing. Run `write_report` to refresh `plots/tsne.gif` first.

    Args:
        save_dir: the run's save directory.

    Returns:
        The HTML text, with the figures `embedding_plan` chose embedded.
    """
    folder = read_run(save_dir)
    rows, series, best = folder.rows, folder.series, folder.best
    steps = folder.steps
    current = steps[-1] if steps else None
    plan = embedding_plan(frame_costs(series, steps), best, small_cost(series))
    sections = [
        {
            "stem": s.stem,
            "title": s.title,
            "caption": s.caption,
            "frames": embed_frames(s, steps, plan, best),
        }
        for s in series
    ]
    IMAGES.forget_unused()
    headline_stems = [stem for stem in HEADLINE_STEMS if any(s.stem == stem for s in series)]

    present = {key for row in rows for key in row}
    columns = {key: header for key, header in _BASE_COLUMNS.items() if key in present}
    table = [
        {
            "epoch": int(row["epoch"]),
            "best": int(row["epoch"]) == best,
            "cells": [format_metric(key, row.get(key)) for key in columns],
        }
        for row in rows
    ]
    groups = scalar_groups(rows, folder.class_names)
    group_charts = [
        {
            "chart": line_chart(
                group.title,
                rows,
                group.members,
                percent=group.percent,
                from_zero=False,
                best=best,
                width=330,
                height=190,
            ),
            "key": group.key,
        }
        for group in groups
    ]
    # all analysis scalars: one row per scalar, one column per epoch (their names are long)
    scalars = [
        {"name": _breakable(name), "cells": [format_metric(name, row.get(name)) for row in rows]}
        for name in _analysis_scalars(rows)
    ]
    charts = [
        line_chart(
            "loss", rows, {"train_loss": "train", "eval_loss": "eval"}, best=best, height=200
        ),
        line_chart(
            "accuracy",
            rows,
            {"train_accuracy": "train", "eval_accuracy": "eval"},
            percent=True,
            best=best,
            height=200,
        ),
    ]
    info = folder.info
    best_row = next((row for row in rows if int(row["epoch"]) == best), None)
    config = info.get("config", {})
    environment = {
        key: info[key]
        for key in ("run_name", "model", "seed", "device", "started", "train_size", "val_size")
        if key in info
    }
    data = info.get("data")
    if isinstance(data, dict) and data.get("source"):  # where the images came from
        environment["data"] = data["source"]

    embedded = plan.full_chars + plan.small_chars
    return render_page(
        "report.html.j2",
        run=info,
        environment=environment,
        versions=info.get("versions", {}),
        config=config,
        planned_epochs=config.get("epochs"),
        rows=rows,
        columns=list(columns.values()),
        table=table,
        scalars=scalars,
        charts=charts,
        group_charts=group_charts,
        flags=run_flags(folder),
        best=best,
        best_row=best_row,
        last_row=rows[-1] if rows else None,
        steps=[{"step": step, "label": step_label(step)} for step in steps],
        current=current,
        sections=[s for s in sections if s["stem"] not in headline_stems],
        headline_sections=[s for s in sections if s["stem"] in headline_stems],
        plan={
            "full": describe_steps(plan.full),
            "small": describe_steps(plan.small) if plan.small else "",
            "none": describe_steps([s for s in steps if plan.tier(s) == "none"]),
            "any_left_out": any(plan.tier(s) != "full" for s in steps),
            "full_budget": size_text(FULL_BUDGET),
        },
        embedded_size=size_text(embedded),
    )


def _breakable(header: str) -> Any:
    """`header` as markup that may wrap after each "/" (analysis scalars are `name/metric`)."""
    from markupsafe import escape

    return Markup("/<wbr>").join(escape(part) for part in header.split("/"))


# ---------------------------------------------------------------------------------------------
# the t-SNE animation, and writing the files


def write_animation(
    frames: Sequence[Path],
    path: str | Path,
    labels: Sequence[str] | None = None,
    *,
    frame_ms: int = 700,
    hold_last_ms: int = 2000,
) -> Path:
    """Assemble PNG frames into a looping GIF, written atomically.

    Each frame is decoded and quantised once per file version (kept in memory), so writing the
    animation again after the next epoch only processes the new frame.

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
    if not frames:
        raise ValueError("write_animation needs at least one frame")
    sizes = [_image_size(source) for source in frames]
    size = (max(w for w, _ in sizes), max(h for _, h in sizes))
    palette_frames = [
        _gif_frame(source, size, None if labels is None else labels[index])
        for index, source in enumerate(frames)
    ]
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


_GIF_FRAMES: dict[tuple[Any, ...], Any] = {}
_GIF_LOCK = threading.Lock()


def _image_size(source: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(source) as image:
        return image.size


def _gif_frame(source: Path, size: tuple[int, int], label: str | None) -> Any:
    """One quantised frame, from memory when this file version was quantised before."""
    from PIL import Image, ImageDraw, ImageFont

    stat = source.stat()
    key = (str(source.resolve()), stat.st_mtime_ns, stat.st_size, size, label)
    with _GIF_LOCK:
        if key in _GIF_FRAMES:
            return _GIF_FRAMES[key]
    with Image.open(source) as image:
        canvas = Image.new("RGB", size, "white")
        canvas.paste(image.convert("RGB"), (0, 0))
    if label is not None:
        font = ImageFont.load_default(size=max(12, size[1] // 40))
        draw = ImageDraw.Draw(canvas)
        box = draw.textbbox((8, 6), label, font=font)
        draw.rectangle((box[0] - 4, box[1] - 3, box[2] + 4, box[3] + 3), fill="white")
        draw.text((8, 6), label, fill="black", font=font)
    # one adaptive palette per frame, no dithering: flat colours stay flat
    frame = canvas.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    with _GIF_LOCK:
        if len(_GIF_FRAMES) > 4 * ANIMATION_FRAMES:  # frames of runs long gone
            _GIF_FRAMES.clear()
        _GIF_FRAMES[key] = frame
    return frame


def animation_steps(steps: Sequence[int], most: int = ANIMATION_FRAMES) -> list[int]:
    """The steps the t-SNE animation shows: all, or `most` evenly spaced ones and the last.

    Args:
        steps: the steps with a t-SNE figure, ascending.
        most: frames at most.

    Returns:
        The chosen steps, ascending.
    """
    if len(steps) <= most:
        return list(steps)
    epochs = [step for step in steps if step != BEFORE_TRAINING]
    chosen = set(_evenly_spaced(epochs, most - 1)) | {steps[-1]}
    return sorted(chosen)


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
            shown = animation_steps(list(figure_series.frames))
            write_animation(
                [figure_series.frames[step] for step in shown],
                plots_dir / f"{ANIMATED_STEM}.gif",
                labels=[step_label(step) for step in shown],
            )
    html = build_report(save_dir)
    return atomic_write_bytes(save_dir / "report.html", html.encode("utf-8"))
