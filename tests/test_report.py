"""The HTML report: figure discovery, charts, flags, the bounded embedding, the GIF, the
document, and a real browser (tests/browser.py)."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

import exigo.report
from exigo.config import Config
from exigo.pipeline import run
from exigo.report import (
    FULL_BUDGET,
    IMAGES,
    SMALL_BUDGET,
    animation_steps,
    best_epoch,
    build_report,
    describe_steps,
    discover_figures,
    embedding_plan,
    line_chart,
    run_flags,
    scalar_groups,
    write_animation,
    write_report,
)

from browser import audit
from conftest import EpochCard, TinyNet, make_blobs

# ---------------------------------------------------------------------------------------------
# helpers


def _png(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (12, 8)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def _save_dir(tmp_path: Path) -> Path:
    """A hand-made run folder: 2 epochs, three stems, one stem missing epoch 2."""
    save = tmp_path / "save"
    plots = save / "plots"
    _png(plots / "tsne_init.png", (255, 0, 0))
    _png(plots / "tsne_1.png", (0, 255, 0))
    _png(plots / "tsne_2.png", (0, 0, 255))
    _png(plots / "confusion_matrix_1.png", (10, 10, 10))
    _png(plots / "confusion_matrix_2.png", (20, 20, 20))
    _png(plots / "my_probe_1.png", (30, 30, 30))
    (plots / "notes.txt").write_text("not a figure")
    _png(plots / "summary.png", (40, 40, 40))  # no epoch in the name: not a series
    rows = [
        {"epoch": 1, "train_loss": 0.9, "eval_loss": 0.5, "train_accuracy": 0.7,
         "eval_accuracy": 0.8, "lr": 1e-3, "best": True, "my_probe/score": 0.25},
        {"epoch": 2, "train_loss": 0.6, "eval_loss": 0.55, "train_accuracy": 0.85,
         "eval_accuracy": 0.79, "lr": 1e-4, "best": False, "my_probe/score": 0.5},
    ]  # fmt: skip
    (save / "metrics.json").write_text(json.dumps(rows))
    run_info = {"run_name": "hand<made>", "seed": 7, "device": "cpu",
                "versions": {"torch": "9.9"}, "config": {"epochs": 3, "lr": 0.001}}  # fmt: skip
    (save / "run.json").write_text(json.dumps(run_info))
    return save


# ---------------------------------------------------------------------------------------------
# pure parts


def test_discover_figures_orders_declared_stems_then_others(tmp_path):
    save = _save_dir(tmp_path)
    declared = {
        "tsne": {"title": "t-SNE of the embeddings", "caption": "A map."},
        "absent": {"title": "Never drawn", "caption": ""},
        "confusion_matrix": {"title": "Confusion matrix", "caption": "Counts."},
    }
    series = discover_figures(save / "plots", declared)
    assert [s.stem for s in series] == ["tsne", "confusion_matrix", "my_probe"]
    assert [s.title for s in series] == ["t-SNE of the embeddings", "Confusion matrix", "My probe"]
    assert [s.caption for s in series] == ["A map.", "Counts.", ""]
    assert [s.stem for s in discover_figures(save / "plots")] == sorted(
        ["confusion_matrix", "tsne", "my_probe"]
    )
    assert list(series[0].frames) == [0, 1, 2]  # init is step 0, first
    assert series[0].frames[0].name == "tsne_init.png"
    assert discover_figures(tmp_path / "absent") == []


def test_best_epoch_is_last_flagged_row_else_lowest_eval_loss():
    rows = [{"epoch": 1, "eval_loss": 0.5, "best": True}, {"epoch": 2, "eval_loss": 0.3,
            "best": True}, {"epoch": 3, "eval_loss": 0.4, "best": False}]  # fmt: skip
    assert best_epoch(rows) == 2
    assert best_epoch([{k: v for k, v in r.items() if k != "best"} for r in rows]) == 2
    assert best_epoch([]) is None


def test_line_chart_maps_epochs_and_values_to_pixels():
    rows = [{"epoch": 1, "eval_loss": 2.0}, {"epoch": 3, "eval_loss": 1.0}]
    chart = line_chart("loss", rows, {"eval_loss": "eval"}, best=3, width=200, height=100)
    # plot box: x in [52, 186], y in [16, 70]; loss axis 0..2 with ticks every 0.5
    assert chart.lines[0].points == [(52.0, 16.0), (186.0, 43.0)]
    assert [label for _, label in chart.y_ticks] == ["0", "0.5", "1", "1.5", "2"]
    assert chart.best_x == 186.0
    assert chart.epoch_x == {1: 52.0, 3: 186.0}
    # hover bands split the plot area halfway between epochs; the tooltip lists the values
    assert chart.hover == [
        (1, 52.0, 119.0, "epoch 1\neval: 2"),
        (3, 119.0, 186.0, "epoch 3\neval: 1"),
    ]
    single = line_chart("loss", rows[:1], {"eval_loss": "eval"}, width=200, height=100)
    assert single.lines[0].points == [(119.0, 16.0)]  # one epoch sits in the middle
    accuracy = line_chart("acc", [{"epoch": 1, "a": 0.974}], {"a": "eval"}, percent=True)
    labels = [label for _, label in accuracy.y_ticks]
    assert labels == ["90.0%", "92.5%", "95.0%", "97.5%", "100.0%"]
    # an axis that hugs the data: 0.2..0.3 gets ticks 0.2, 0.225, ... not 0..0.3
    hugging = line_chart("auc", [{"epoch": 1, "a": 0.21}, {"epoch": 2, "a": 0.29}], {"a": "x"},
                         from_zero=False)  # fmt: skip
    assert hugging.y_ticks[0][1] == "0.2"


def test_scalar_groups_gather_by_prefix_with_readable_labels():
    rows = [{"epoch": 1, "precision/0": 0.9, "precision/1": 0.8, "recall/0": 0.7,
             "faithfulness/deletion_auc/grad_cam": 0.2, "class_models/mean_probability": 0.5,
             "lonely": 1.0, "best": True}]  # fmt: skip
    groups = scalar_groups(rows, ["zero", "one"])
    assert [g.key for g in groups] == [
        "precision", "recall", "faithfulness/deletion_auc", "class_models", "lonely"
    ]  # fmt: skip
    assert groups[0].members == {"precision/0": "zero", "precision/1": "one"}
    assert groups[0].percent and groups[0].title == "precision per class"
    assert groups[2].members == {"faithfulness/deletion_auc/grad_cam": "Grad-CAM"}
    assert "lower is better" in groups[2].title and not groups[2].percent
    assert groups[4].members == {"lonely": "lonely"}


def _flag_row(**extra: Any) -> dict[str, Any]:
    row = {"epoch": 3, "eval_loss": 0.30, "eval_accuracy": 0.9, "best": False,
           "recall/0": 0.95, "recall/1": 0.80, "precision/1": 0.85,
           "faithfulness/deletion_auc/saliency": 0.3, "faithfulness/insertion_auc/saliency": 0.8,
           "faithfulness/deletion_auc/grad_cam": 0.6, "faithfulness/insertion_auc/grad_cam": 0.8,
           "faithfulness/deletion_auc/random": 0.5, "faithfulness/insertion_auc/random": 0.5,
           "sanity/unchanged/saliency": 0.0, "sanity/unchanged/grad_cam": 1.0,
           "attributions/drift/saliency": 0.6, "attributions/drift/grad_cam": 0.9}  # fmt: skip
    return {**row, **extra}


def test_run_flags_name_each_suspected_problem_and_link_its_section(tmp_path):
    rows = [{"epoch": 1, "eval_loss": 0.25, "best": True}, {"epoch": 2, "eval_loss": 0.27},
            _flag_row(failed=["errors"])]  # fmt: skip
    checks = {1: tmp_path / "a_1.png", 3: tmp_path / "a_3.png"}
    series = [
        exigo.report.FigureSeries("attribution_checks", "Attribution checks", "", checks),
        exigo.report.FigureSeries("errors", "Errors", "", {1: tmp_path / "e_1.png"}, "errors"),
        # missing on purpose (drawn every other epoch, or nothing to show): no warning
        exigo.report.FigureSeries("label_issues", "Issues", "", {1: tmp_path / "l_1.png"}, "x"),
    ]
    folder = exigo.report.RunFolder(tmp_path, {"class_names": ["zero", "one"]}, rows, series, 1)
    flags = run_flags(folder)
    texts = [f.text for f in flags]
    assert [f.level for f in flags] == ["warning"] * 4 + ["note"] * 2
    assert (
        texts[0].startswith("No errors figure for epoch 3: its analysis, errors, failed")
        and flags[0].target == "series-errors"
    )
    assert not any("issues figure" in text for text in texts)
    assert "Eval loss rose to 0.3000" in texts[1] and "epoch 1" in texts[1]
    assert "Faithfulness: Grad-CAM ranks pixels no better than random" in texts[2]
    assert flags[2].target == "series-attribution_checks"
    assert texts[3].startswith("Sanity check: Grad-CAM barely changes")
    assert texts[4] == "Weakest class: one, recall 80.0%, precision 85.0%."
    assert flags[4].target == "scalars"  # no confusion figure in this run: the scalars
    assert "Saliency changed since the previous epoch" in texts[5]
    healthy = _flag_row(
        **{
            "faithfulness/deletion_auc/grad_cam": 0.4,
            "sanity/unchanged/grad_cam": 0.0,
            "attributions/drift/saliency": 0.9,
            "best": True,
        }
    )
    calm = run_flags(exigo.report.RunFolder(tmp_path, {}, [healthy], [], 3))
    assert [f.level for f in calm] == ["ok", "note"] and calm[1].text.startswith("Weakest class: 1")
    assert run_flags(exigo.report.RunFolder(tmp_path, {}, [], [], None)) == []


def test_embedding_plan_keeps_first_best_last_within_the_budgets():
    costs = {step: 10 for step in range(0, 101)}  # before training and 100 epochs, 10 each
    plan = embedding_plan(costs, best=40, small_cost=lambda step: 2, full_budget=100,
                          small_budget=20)  # fmt: skip
    # last, best, before training, first, then multiples of 16 (at most 8 of them), coarsest first
    assert plan.full == (0, 1, 16, 32, 40, 48, 64, 80, 96, 100)
    assert plan.full_chars == 100
    assert len(plan.small) == 10 and plan.small_chars == 20  # multiples of 4, coarsest first
    assert set(plan.small) <= {e for e in range(4, 101, 4)} and not set(plan.small) & set(plan.full)
    assert (
        plan.tier(100) == "full" and plan.tier(plan.small[0]) == "small" and plan.tier(3) == "none"
    )
    # everything fits: all full, nothing small, no half-size copy made
    asked = []
    small = embedding_plan({0: 1, 1: 1, 2: 1}, best=2, small_cost=lambda s: asked.append(s) or 1)
    assert small.full == (0, 1, 2) and small.small == () and asked == []
    # one epoch bigger than the budget: the last still shows, half size
    huge = embedding_plan({1: 5, 2: 500}, best=2, small_cost=lambda s: 3, full_budget=100)
    assert huge.full == (1,) and huge.small == (2,)
    assert describe_steps((0, 1, 2, 3, 8, 12)) == "before training, epochs 1-3, 8 and 12"
    assert describe_steps(()) == "none" and describe_steps((5,)) == "epoch 5"


def test_animation_steps_are_bounded_and_keep_the_last():
    assert animation_steps([0, 1, 2]) == [0, 1, 2]
    steps = animation_steps(list(range(0, 101)), most=12)
    assert len(steps) <= 12 and steps[-1] == 100 and steps == sorted(steps)


def test_write_animation_keeps_frame_order_sizes_and_timing(tmp_path):
    frames = [
        _png(tmp_path / "a.png", (255, 0, 0), (20, 10)),
        _png(tmp_path / "b.png", (0, 0, 255), (16, 12)),
    ]
    path = write_animation(frames, tmp_path / "out.gif", frame_ms=300, hold_last_ms=900)
    with Image.open(path) as gif:
        assert gif.n_frames == 2 and gif.size == (20, 12)
        assert gif.info["loop"] == 0
        first = gif.convert("RGB").getpixel((1, 1))
        assert gif.info["duration"] == 300
        gif.seek(1)
        assert gif.convert("RGB").getpixel((1, 1)) == (0, 0, 255)
        assert gif.convert("RGB").getpixel((19, 1)) == (255, 255, 255)  # padding
        assert gif.info["duration"] == 900
    assert first == (255, 0, 0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "b.png", "out.gif"]
    with pytest.raises(ValueError, match="at least one frame"):
        write_animation([], tmp_path / "none.gif")


def _embedded_images(html: str) -> list[bytes]:
    return [base64.b64decode(b) for b in re.findall(r'src="data:image/\w+;base64,([^"]+)"', html)]


def test_build_report_embeds_every_figure_and_references_nothing_else(tmp_path):
    save = _save_dir(tmp_path)
    html = build_report(save)
    embedded = _embedded_images(html)
    for name in ["tsne_init", "tsne_1", "tsne_2", "confusion_matrix_1", "confusion_matrix_2",
                 "my_probe_1"]:  # fmt: skip
        assert (save / "plots" / f"{name}.png").read_bytes() in embedded, name
    assert len(embedded) == 6  # each figure once; summary.png (no epoch) is not a series
    assert not re.search(r'(src|href)="(?!data:|#)', html)
    assert "http://" not in html and "https://" not in html
    assert "<script src" not in html and "@import" not in html
    # one slider over before training, epoch 1, epoch 2; the last step shown first
    assert re.search(r'type="range" min="0" max="2" step="1"\s+value="2"', html)
    assert json.loads(re.search(r'id="steps">(.*?)</script>', html)[1]) == [
        {"step": 0, "label": "before training"},
        {"step": 1, "label": "epoch 1"},
        {"step": 2, "label": "epoch 2"},
    ]
    assert "No my probe figure for epoch 2." in html
    assert "No confusion matrix figure before training." in html
    assert "not embedded" not in html  # a small run embeds everything at full size
    assert 'class="best"' in html and "at the best epoch, <strong>1</strong>" in html
    assert "hand&lt;made&gt;" in html and "hand<made>" not in html  # escaped
    # analysis scalars: one row each, one cell per epoch, plain numbers; and a chart
    assert re.search(r"<th>my_probe/<wbr>score</th><td[^>]*>0.2500</td><td[^>]*>0.5000</td>", html)
    assert 'id="scalars-my_probe"' in html and "<title>epoch 2\nscore: 0.5</title>" in html
    assert "stopped or still running: 2 of 3 epochs" in html
    # the metrics table's first column: the epoch as a whole number, not 1.0000
    assert re.search(r'<tr data-step="1"[^>]*>\s*<td>1</td>', html), "epoch cell"
    # the verdict comes first, the headline figure beside the curves, the configuration last
    ids = (
        "verdict",
        "charts",
        "series-confusion_matrix",
        "series-tsne",
        "scalars",
        "metrics",
        "run",
    )
    order = [html.index(f'id="{i}"') for i in ids]
    assert order == sorted(order)
    assert re.search(r'<details class="box" id="run">', html)  # collapsed: no `open`


def test_build_report_before_the_first_epoch(tmp_path):
    html = build_report(tmp_path)  # no run.json, metrics.json or plots yet
    assert "No epoch has finished yet." in html and 'type="range"' not in html


def test_write_report_writes_gif_and_html_atomically(tmp_path):
    save = _save_dir(tmp_path)
    path = write_report(save)
    assert path == save / "report.html"
    with Image.open(save / "plots" / "tsne.gif") as gif:
        assert gif.n_frames == 3
    assert not list(save.glob(".*.tmp")) and not list((save / "plots").glob(".*.tmp"))


def _long_run(save: Path, epochs: int, figure: bytes, stems: tuple[str, ...]) -> None:
    """Add epochs to a hand-made run folder: `figure` as every stem's PNG, one metrics row each."""
    plots = save / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    rows = (
        json.loads((save / "metrics.json").read_text()) if (save / "metrics.json").exists() else []
    )
    for epoch in range(len(rows) + 1, epochs + 1):
        for stem in stems:
            (plots / f"{stem}_{epoch}.png").write_bytes(figure)
        rows.append({"epoch": epoch, "train_loss": 1 / epoch, "eval_loss": 1 / epoch,
                     "train_accuracy": 0.5, "eval_accuracy": 0.5, "best": True,
                     "precision/0": 0.5, "recall/0": 0.5})  # fmt: skip
    (save / "metrics.json").write_text(json.dumps(rows))


def test_a_100_epoch_report_stays_bounded_and_each_rebuild_encodes_only_new_figures(tmp_path):
    # three analyses drawing 300 KB of incompressible PNG each per epoch: 90 MB over 100 epochs
    noise = np.random.default_rng(0).integers(0, 256, (320, 320, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format="png")
    figure, stems = buffer.getvalue(), ("saliency", "confusion_matrix", "errors")
    save = tmp_path / "save"
    (save / "plots").mkdir(parents=True)
    (save / "run.json").write_text(json.dumps({"run_name": "long", "config": {"epochs": 100}}))
    seconds = {}
    for epochs in (2, 99, 100):
        _long_run(save, epochs, figure, stems)
        made, started = IMAGES.made, time.perf_counter()
        write_report(save)
        seconds[epochs] = time.perf_counter() - started
        encoded = IMAGES.made - made
    size = (save / "report.html").stat().st_size
    assert size <= 15_000_000
    assert size <= FULL_BUDGET + SMALL_BUDGET + 1_000_000  # the page around the figures is small
    assert encoded <= 2 * len(
        stems
    )  # after epoch 100: its figures, and epoch 99's half-size copies
    html = (save / "report.html").read_text()
    assert "not embedded, to keep this page small" in html and "half-size copy" in html
    assert "full-size figures for epochs 1," in html and "and none for epochs" in html
    print(f"report.html after 100 epochs: {size / 1e6:.1f} MB; rebuild "
          f"{seconds[2]:.2f} s at 2 epochs, {seconds[100]:.2f} s at 100")  # fmt: skip


# ---------------------------------------------------------------------------------------------
# in the pipeline


def _tiny_run(save: Path, epochs: int = 3) -> Any:
    torch.manual_seed(0)
    config = Config(epochs=epochs, batch_size=16, lr=1e-2, save_dir=save, probe_size=3)
    analyses = [EpochCard("tsne"), EpochCard("confusion_matrix"), EpochCard("saliency")]
    return run(config, TinyNet(), make_blobs(48, seed=0), make_blobs(12, seed=1), analyses)


def test_pipeline_writes_the_report_after_every_epoch(tmp_path, monkeypatch):
    written: list[list[int]] = []
    real = exigo.report.write_report

    def spy(save_dir: Path) -> Path:
        rows = json.loads((Path(save_dir) / "metrics.json").read_text())
        written.append([row["epoch"] for row in rows])
        return real(save_dir)

    monkeypatch.setattr(exigo.report, "write_report", spy)
    result = _tiny_run(tmp_path / "save")
    assert written == [[1], [1, 2], [1, 2, 3]]  # after each metrics row
    assert result.failed_analyses == []
    html = (tmp_path / "save" / "report.html").read_text()
    assert len(_embedded_images(html)) == 3 * 4  # three stems x (init + 3 epochs), once each
    assert (tmp_path / "save" / "plots" / "tsne.gif").exists()  # beside it, not in it


def test_a_failing_report_does_not_stop_training(tmp_path, monkeypatch):
    def broken(save_dir: Path) -> Path:
        raise OSError("disk full")

    monkeypatch.setattr(exigo.report, "write_report", broken)
    result = _tiny_run(tmp_path / "save", epochs=2)
    assert [row["epoch"] for row in result.history] == [1, 2]
    assert result.failed_analyses == [(1, "report", "OSError: disk full"),
                                      (2, "report", "OSError: disk full")]  # fmt: skip


# ---------------------------------------------------------------------------------------------
# in a real browser (Debian's chromium, headless, over the DevTools protocol: tests/browser.py)


_STATE = """(() => {
  const current = (stem) => document.querySelector(`#series-${stem} .frame.is-current`);
  const image = current("tsne").querySelector("img");
  return {
    slider: document.getElementById("epoch-slider").value,
    label: document.getElementById("step-label").textContent,
    tsne: current("tsne").dataset.step,
    confusion: current("confusion_matrix").dataset.step,
    shown: document.querySelectorAll(".frame.is-current").length,
    visible: [...document.querySelectorAll("#series-tsne .frame")]
      .filter((f) => getComputedStyle(f).display !== "none").length,
    source: image.src.length + ":" + image.src.slice(-40),
    decoded: image.complete && image.naturalWidth > 0,
    row: document.querySelector("tr.is-current")?.dataset.step ?? null,
    cursors: [...document.querySelectorAll(".cursor.is-current")].map((c) => c.dataset.step),
  };
})()"""

#: Top edges (CSS px, from the top of the page) of what must show before any scrolling.
_FOLD = """(() => {
  const top = (selector) => document.querySelector(selector).getBoundingClientRect().top;
  const bottom = (selector) => document.querySelector(selector).getBoundingClientRect().bottom;
  return {
    verdict: bottom("#verdict"),
    loss: bottom("#charts .chart-box:nth-of-type(2) svg"),
    confusion: top("#series-confusion_matrix .frame.is-current img"),
    saliency: top("#series-saliency .frame.is-current img"),
    flags: [...document.querySelectorAll("ul.flags a")].map((a) => a.getAttribute("href"))
      .filter((href) => !document.querySelector(href)),
    configuration_open: document.getElementById("run").open,
  };
})()"""


def test_report_in_a_real_browser(browser, tmp_path):
    save = tmp_path / "save"
    _tiny_run(save, epochs=3)
    report = save / "report.html"
    seen = audit(browser, report.as_uri(), tmp_path, "report")  # 1400 and 800 px wide
    assert seen.urls[0] == report.as_uri()
    browser.open(report.as_uri(), width=1400)

    # above the fold at 1400 x 900: the verdict, both curves, the confusion matrix, the saliency
    fold = browser.evaluate(_FOLD)
    assert fold["verdict"] < 900 and fold["loss"] < 900
    assert fold["confusion"] < 900 and fold["saliency"] < 900
    assert fold["flags"] == [] and fold["configuration_open"] is False

    # the last epoch is shown first, every image decodes, one frame per analysis is visible
    last = browser.evaluate(_STATE)
    assert last["slider"] == "3" and last["label"].startswith("epoch 3")
    assert last["tsne"] == last["confusion"] == last["row"] == "3"
    assert last["shown"] == 3 and last["visible"] == 1 and last["decoded"]
    assert last["cursors"] == ["3", "3"]  # loss and accuracy charts (the scalars have none here)
    assert browser.evaluate("[...document.images].every((i) => !i.src || i.naturalWidth > 0)")
    assert "epoch 3" in browser.evaluate(
        "document.querySelector('svg.chart rect.hover:last-of-type title').textContent"
    )

    # a person presses the left arrow: every section moves to epoch 2
    browser.press("ArrowLeft", 37)
    previous = browser.evaluate(_STATE)
    assert previous["slider"] == "2" and previous["label"].startswith("epoch 2")
    assert previous["tsne"] == previous["confusion"] == previous["row"] == "2"
    assert previous["source"] != last["source"] and previous["decoded"]

    # and clicks the slider's left end: before training (no metrics row, no chart cursor)
    box = browser.evaluate(
        "(() => { const r = document.getElementById('epoch-slider').getBoundingClientRect();"
        " return [r.left, r.top + r.height / 2]; })()"
    )
    browser.click(box[0] + 1, box[1])
    first = browser.evaluate(_STATE)
    assert first["slider"] == "0" and first["label"] == "before training"
    assert first["tsne"] == first["confusion"] == "0"
    assert first["row"] is None and first["cursors"] == []

    # a click on a figure enlarges it; the keys still move it; Escape closes it
    browser.press("End", 35)
    image = browser.evaluate(
        "(() => { const r = document.querySelector('#series-saliency .frame.is-current img')"
        ".getBoundingClientRect(); return [r.left + r.width / 2, r.top + r.height / 2]; })()"
    )
    browser.click(*image)
    lightbox = "document.getElementById('lightbox')"
    assert browser.evaluate(f"{lightbox}.classList.contains('open')")
    assert browser.evaluate(f"{lightbox}.querySelector('p').textContent").startswith(
        "Saliency, epoch 3"
    )
    browser.press("ArrowLeft", 37)
    assert browser.evaluate(f"{lightbox}.querySelector('p').textContent").startswith(
        "Saliency, epoch 2"
    )
    browser.press("Escape", 27)
    assert not browser.evaluate(f"{lightbox}.classList.contains('open')")
    assert browser.errors() == []

    # the request check can fail: a page that loads a remote image is caught
    leaky = tmp_path / "leaky.html"
    leaky.write_text('<!DOCTYPE html><img src="http://127.0.0.1:9/pixel.png">')
    browser.open(leaky.as_uri())
    deadline = time.monotonic() + 30  # the image request may trail the load event
    while "http://127.0.0.1:9/pixel.png" not in browser.requested_urls():
        assert time.monotonic() < deadline, browser.requested_urls()
        browser.events.append(browser._receive())


def test_the_overflow_check_sees_a_page_too_wide(browser, tmp_path):
    wide = tmp_path / "wide.html"
    wide.write_text('<!DOCTYPE html><body style="margin:0"><div style="width:1000px;height:400px;'
                    'background:linear-gradient(90deg,red,blue)">wide</div>')  # fmt: skip
    with pytest.raises(AssertionError, match="at 800 px"):
        audit(browser, wide.as_uri(), tmp_path, "wide")


# ---------------------------------------------------------------------------------------------
# with the real analyses on real MNIST


@pytest.fixture(scope="module")
def mnist_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from exigo.cli import main

    from conftest import SHARED_MNIST

    if not (SHARED_MNIST / "MNIST" / "raw" / "train-images-idx3-ubyte").exists():
        pytest.skip(f"offline MNIST not found at {SHARED_MNIST}")
    save = tmp_path_factory.mktemp("mnist") / "save"
    arguments = ["--data-dir", str(SHARED_MNIST), "--save-dir", str(save), "--epochs", "1",
                 "--no-attribution-checks", "--run-name", "report"]  # fmt: skip
    main(arguments)  # exit code 1 would only mean some analysis failed: the report still shows
    return save


@pytest.mark.slow
def test_report_of_a_real_mnist_run_embeds_every_figure(mnist_run):
    html = (mnist_run / "report.html").read_text()
    embedded = _embedded_images(html)
    figures = sorted((mnist_run / "plots").glob("*.png"))
    assert figures, "the default analyses wrote no figure"
    for figure in figures:
        assert figure.read_bytes() in embedded, figure.name
    assert "finished: 1 epoch" in html and "What exigo flagged" in html
    assert not re.search(r'(src|href)="(?!data:|#)', html)


@pytest.mark.slow
def test_report_of_a_real_mnist_run_in_a_real_browser(mnist_run, browser, tmp_path):
    seen = audit(browser, (mnist_run / "report.html").as_uri(), tmp_path, "mnist-report")
    browser.open((mnist_run / "report.html").as_uri(), width=1400)
    fold = browser.evaluate(_FOLD)
    assert fold["confusion"] < 900 and fold["saliency"] < 900 and fold["flags"] == []
    assert browser.evaluate("document.querySelectorAll('#scalars svg.chart').length") >= 2
    shutil.copyfile(seen.screenshots[1400], tmp_path / "look-at-me.png")
