"""Two runs side by side in one self-contained page: `python -m exigo.compare RUN_A RUN_B`.

```
python -m exigo.compare save/baseline save/wider [-o compare.html]
```

writes `compare.html` (default: in the current folder), which opens from disk like
`report.html` and loads nothing from elsewhere. It shows

- the two runs' headline numbers, with the difference B - A;
- their loss and accuracy curves overlaid (A blue, B red; training dashed, evaluation solid);
- the faithfulness and sanity numbers of the attribution checks, and each class' precision and
  recall, in one table per epoch with the differences (green: B better, red: B worse);
- the same epoch's figures of both runs side by side, one slider (or the arrow keys) for all;
- the configurations, the options that differ highlighted and listed first.

Runs with different epochs, classes, figures or scalars are compared where they overlap, and
the page lists what it left out. The figures follow `exigo.report`'s size bound (full size for
the first, last and both best epochs and evenly spaced ones, within the same budgets).

Exit codes: 0 written; 2 a folder is not an exigo run (no `run.json` written by exigo), or bad
options.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from exigo._io import atomic_write_bytes
from exigo.engine.run_dir import is_exigo_run
from exigo.report import (
    IMAGES,
    RunFolder,
    chart,
    describe_steps,
    embed_frames,
    embedding_plan,
    format_metric,
    frame_costs,
    metric_label,
    metric_points,
    read_run,
    render_page,
    size_text,
    small_cost,
    step_label,
)

__all__ = ["NotARunError", "build_compare", "main", "write_compare"]

#: Scalar prefixes of the attribution checks, and which way is better (+1 higher, -1 lower).
CHECKS = {
    "faithfulness/deletion_auc": -1,
    "faithfulness/insertion_auc": +1,
    "sanity/spearman": -1,
    "sanity/ssim": -1,
    "sanity/unchanged": -1,
}


class NotARunError(ValueError):
    """A folder that holds no exigo run (no `run.json` with exigo's entries)."""


@dataclass(frozen=True)
class _Side:
    """One run as the page shows it: its folder, its letter and its name."""

    letter: str
    folder: RunFolder

    @property
    def name(self) -> str:
        return str(self.folder.info.get("run_name") or self.folder.path.name)

    def row(self, epoch: int) -> Mapping[str, Any]:
        return next((r for r in self.folder.rows if int(r["epoch"]) == epoch), {})


def _open(path: str | Path, letter: str) -> _Side:
    path = Path(path)
    if not path.is_dir():
        raise NotARunError(f"RUN_{letter} {path} is not a folder")
    if not is_exigo_run(path):
        raise NotARunError(
            f"RUN_{letter} {path} is not an exigo run (no run.json written by exigo)"
        )
    return _Side(letter, read_run(path))


def build_compare(run_a: str | Path, run_b: str | Path) -> str:
    """Render the comparison of two run folders as one HTML document (writes nothing).

    Args:
        run_a: the first run's save directory ("A", the reference).
        run_b: the second run's ("B"; differences are B - A).

    Returns:
        The HTML text.

    Raises:
        NotARunError: a folder is missing or holds no exigo run.
    """
    a, b = _open(run_a, "A"), _open(run_b, "B")
    left_out: list[str] = []

    epochs_a = {int(r["epoch"]) for r in a.folder.rows}
    epochs_b = {int(r["epoch"]) for r in b.folder.rows}
    epochs = sorted(epochs_a & epochs_b)
    for side, own, other in ((a, epochs_a, epochs_b), (b, epochs_b, epochs_a)):
        if own - other:
            left_out.append(
                f"{describe_steps(sorted(own - other))} of {side.letter} "
                f"({'the other run has none' if not other else 'the other run stops earlier'})"
            )

    names_a, names_b = a.folder.class_names, b.folder.class_names
    if names_a and names_b and names_a != names_b:
        only_a = [n for n in names_a if n not in names_b]
        only_b = [n for n in names_b if n not in names_a]
        if only_a:
            left_out.append(f"classes only in A: {', '.join(only_a)}")
        if only_b:
            left_out.append(f"classes only in B: {', '.join(only_b)}")
    classes = _common_classes(names_a, names_b, a.folder.rows, b.folder.rows)

    stems_a = {s.stem: s for s in a.folder.series}
    stems_b = {s.stem: s for s in b.folder.series}
    stems = [stem for stem in stems_a if stem in stems_b]
    for side, own, other in ((a, stems_a, stems_b), (b, stems_b, stems_a)):
        missing = [own[stem].title for stem in own if stem not in other]
        if missing:
            left_out.append(f"figures only in {side.letter}: {', '.join(missing)}")
    both_before = all(any(0 in side[stem].frames for stem in stems) for side in (stems_a, stems_b))
    steps = [0, *epochs] if stems and both_before else epochs

    checks = [
        name
        for name in _scalars(a.folder.rows)
        if name.rpartition("/")[0] in CHECKS and name in _scalars(b.folder.rows)
    ]
    for side, other in ((a, b), (b, a)):
        own_checks = [
            n
            for n in _scalars(side.folder.rows)
            if n.rpartition("/")[0] in CHECKS and n not in _scalars(other.folder.rows)
        ]
        if own_checks:
            left_out.append(f"attribution checks only in {side.letter}: {len(own_checks)} scalars")

    series_a = [stems_a[stem] for stem in stems]
    series_b = [stems_b[stem] for stem in stems]
    both = [*series_a, *series_b]
    bests = [x for x in (a.folder.best, b.folder.best) if x in steps]
    plan = embedding_plan(
        frame_costs(both, steps), bests[0] if bests else None, small_cost(both), also=bests[1:]
    )
    sections = [
        {
            "stem": stem,
            "title": stems_a[stem].title,
            "caption": stems_a[stem].caption or stems_b[stem].caption,
            "a": embed_frames(stems_a[stem], steps, plan, a.folder.best),
            "b": embed_frames(stems_b[stem], steps, plan, b.folder.best),
        }
        for stem in stems
    ]
    IMAGES.forget_unused()

    rows_a = [r for r in a.folder.rows if int(r["epoch"]) in epochs]
    rows_b = [r for r in b.folder.rows if int(r["epoch"]) in epochs]
    curves = [
        _overlaid("loss", rows_a, rows_b, "loss", percent=False),
        _overlaid("accuracy", rows_a, rows_b, "accuracy", percent=True),
    ]
    tables = [
        {
            "step": epoch,
            "checks": [_difference(name, a.row(epoch), b.row(epoch)) for name in checks],
            "classes": [
                {
                    "name": label,
                    "cells": [
                        _difference(
                            f"{kind}/{index_a}",
                            a.row(epoch),
                            b.row(epoch),
                            key_b=f"{kind}/{index_b}",
                        )
                        for kind in ("precision", "recall")
                    ],
                }
                for label, index_a, index_b in classes
            ],
        }
        for epoch in epochs
    ]
    return render_page(
        "compare.html.j2",
        a={"letter": "A", "name": a.name, "path": str(a.folder.path), **_summary(a)},
        b={"letter": "B", "name": b.name, "path": str(b.folder.path), **_summary(b)},
        headline=[
            _difference(key, _best_row(a), _best_row(b))
            for key in ("eval_accuracy", "eval_loss", "train_accuracy", "train_loss")
        ],
        curves=curves,
        config=_config_rows(a.folder.info, b.folder.info),
        steps=[{"step": step, "label": step_label(step)} for step in steps],
        current=steps[-1] if steps else None,
        epochs=epochs,
        tables=tables,
        check_names=checks,
        sections=sections,
        left_out=left_out,
        plan={
            "full": describe_steps(plan.full),
            "small": describe_steps(plan.small) if plan.small else "",
            "any_left_out": any(plan.tier(s) != "full" for s in steps),
        },
        embedded_size=size_text(plan.full_chars + plan.small_chars),
    )


def write_compare(run_a: str | Path, run_b: str | Path, output: str | Path) -> Path:
    """Write `build_compare(run_a, run_b)` to `output` atomically.

    Args:
        run_a: the first run's save directory.
        run_b: the second run's.
        output: the HTML file to write.

    Returns:
        `output` as a Path.
    """
    html = build_compare(run_a, run_b)
    return atomic_write_bytes(Path(output), html.encode("utf-8"))


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m exigo.compare RUN_A RUN_B [-o compare.html]`; returns the exit code.

    Args:
        argv: the command line after the program name; None reads `sys.argv[1:]`.

    Returns:
        0 when the page was written, 2 when a folder is not an exigo run.
    """
    parser = argparse.ArgumentParser(
        prog="python -m exigo.compare",
        description="Compare two exigo runs in one self-contained HTML page.",
    )
    parser.add_argument("run_a", type=Path, metavar="RUN_A", help="the first run's --save-dir")
    parser.add_argument("run_b", type=Path, metavar="RUN_B", help="the second run's --save-dir")
    parser.add_argument(
        "-o",
        "--output",
        type=Path,
        default=Path("compare.html"),
        help="the page to write (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    try:
        path = write_compare(args.run_a, args.run_b, args.output)
    except NotARunError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


def _scalars(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    names: list[str] = []
    for row in rows:
        for key, value in row.items():
            if isinstance(value, float) and "/" in key and key not in names:
                names.append(key)
    return names


def _common_classes(
    names_a: Sequence[str],
    names_b: Sequence[str],
    rows_a: Sequence[Mapping[str, Any]],
    rows_b: Sequence[Mapping[str, Any]],
) -> list[tuple[str, str, str]]:
    """`(name, index in A, index in B)` of the classes both runs have, matched by name."""
    if not names_a or not names_b:  # no names: match by index
        count = min(
            sum(1 for k in (rows_a[-1] if rows_a else {}) if k.startswith("recall/")),
            sum(1 for k in (rows_b[-1] if rows_b else {}) if k.startswith("recall/")),
        )
        return [(str(i), str(i), str(i)) for i in range(count)]
    return [
        (name, str(i), str(names_b.index(name)))
        for i, name in enumerate(names_a)
        if name in names_b
    ]


def _best_row(side: _Side) -> Mapping[str, Any]:
    return side.row(side.folder.best) if side.folder.best is not None else {}


def _summary(side: _Side) -> dict[str, Any]:
    rows = side.folder.rows
    best = _best_row(side)
    return {
        "epochs": len(rows),
        "best": side.folder.best,
        "best_accuracy": format_metric("eval_accuracy", best.get("eval_accuracy")),
        "best_loss": format_metric("eval_loss", best.get("eval_loss")),
        "model": side.folder.info.get("model", ""),
        "started": side.folder.info.get("started", ""),
    }


def _difference(
    key: str, row_a: Mapping[str, Any], row_b: Mapping[str, Any], *, key_b: str | None = None
) -> dict[str, str]:
    """A table row: the name, both values, B - A, and whether B is better or worse."""
    value_a, value_b = row_a.get(key), row_b.get(key_b or key)
    numbers = all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in (value_a, value_b)
    )
    change, verdict = "", ""
    if numbers:
        delta = float(value_b) - float(value_a)
        if "accuracy" in key or key.startswith(("precision/", "recall/")):
            change = f"{delta * 100:+.2f} pp"
            direction = 1
        else:
            change = f"{delta:+.4f}"
            direction = -1 if "loss" in key else CHECKS.get(key.rpartition("/")[0], 0)
        if abs(delta) > 1e-12 and direction:
            verdict = "better" if delta * direction > 0 else "worse"
    percent = key.startswith(("precision/", "recall/"))
    return {
        "name": metric_label(key),
        "a": f"{value_a:.2%}" if percent and numbers else format_metric(key, value_a),
        "b": f"{value_b:.2%}" if percent and numbers else format_metric(key, value_b),
        "change": change,
        "verdict": verdict,
    }


def _overlaid(
    title: str,
    rows_a: Sequence[Mapping[str, Any]],
    rows_b: Sequence[Mapping[str, Any]],
    metric: str,
    *,
    percent: bool,
) -> Any:
    lines = [
        ("A train", "series-0 dashed", metric_points(rows_a, f"train_{metric}")),
        ("A eval", "series-0", metric_points(rows_a, f"eval_{metric}")),
        ("B train", "series-1 dashed", metric_points(rows_b, f"train_{metric}")),
        ("B eval", "series-1", metric_points(rows_b, f"eval_{metric}")),
    ]
    return chart(title, lines, percent=percent, width=520, height=230)


def _config_rows(info_a: Mapping[str, Any], info_b: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every option and fact of both runs; the differing ones first."""
    config_a, config_b = info_a.get("config", {}), info_b.get("config", {})
    rows = []
    for key in [*config_a, *(k for k in config_b if k not in config_a)]:
        a, b = config_a.get(key, "—"), config_b.get(key, "—")
        rows.append({"key": key, "a": a, "b": b, "changed": a != b})
    for key in ("model", "seed", "device", "train_size", "val_size", "class_names", "versions"):
        if key in info_a or key in info_b:
            a, b = info_a.get(key, "—"), info_b.get(key, "—")
            rows.append({"key": key, "a": a, "b": b, "changed": a != b})
    return sorted(rows, key=lambda row: not row["changed"])


if __name__ == "__main__":
    sys.exit(main())
