"""The HTML report: figure discovery, chart layout, the GIF, the document, and a real browser."""

from __future__ import annotations

import base64
import fcntl
import json
import os
import re
import select
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from matplotlib.figure import Figure
from PIL import Image

import exigo.report
from exigo.analysis import Analysis, EpochContext, FigureInfo
from exigo.config import Config
from exigo.pipeline import run
from exigo.report import (
    best_epoch,
    build_report,
    discover_figures,
    line_chart,
    write_animation,
    write_report,
)

from conftest import TinyNet, make_blobs

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
    # plot box: x in [52, 186], y in [30, 70]; loss axis 0..2 with ticks every 0.5
    assert chart.lines[0].points == [(52.0, 30.0), (186.0, 50.0)]
    assert [label for _, label in chart.y_ticks] == ["0", "0.5", "1", "1.5", "2"]
    assert chart.best_x == 186.0
    assert chart.epoch_x == {1: 52.0, 3: 186.0}
    single = line_chart("loss", rows[:1], {"eval_loss": "eval"}, width=200, height=100)
    assert single.lines[0].points == [(119.0, 30.0)]  # one epoch sits in the middle
    accuracy = line_chart("acc", [{"epoch": 1, "a": 0.974}], {"a": "eval"}, percent=True)
    labels = [label for _, label in accuracy.y_ticks]
    assert labels == ["90.0%", "92.5%", "95.0%", "97.5%", "100.0%"]


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
    assert len(embedded) == 6  # summary.png (no epoch) is not a series; no GIF written yet
    assert not re.search(r'(src|href)="(?!data:)', html)
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
    assert 'class="best"' in html and "best: epoch 1" in html  # epoch 1 kept, not the last
    assert "hand&lt;made&gt;" in html and "hand<made>" not in html  # escaped
    # analysis scalars: one row each, one cell per epoch, plain numbers
    assert re.search(r"<th>my_probe/<wbr>score</th><td[^>]*>0.2500</td><td[^>]*>0.5000</td>", html)
    assert "after epoch 2 of 3" in html
    # the metrics table's first column: the epoch as a whole number, not 1.0000
    assert re.search(r'<tr data-step="1"[^>]*>\s*<td>1</td>', html), "epoch cell"


def test_build_report_before_the_first_epoch(tmp_path):
    html = build_report(tmp_path)  # no run.json, metrics.json or plots yet
    assert "No epoch has finished yet." in html and 'type="range"' not in html


def test_write_report_writes_gif_and_html_atomically(tmp_path):
    save = _save_dir(tmp_path)
    path = write_report(save)
    assert path == save / "report.html"
    with Image.open(save / "plots" / "tsne.gif") as gif:
        assert gif.n_frames == 3
    html = path.read_text()
    assert (save / "plots" / "tsne.gif").read_bytes() in _embedded_images(html)
    assert not list(save.glob(".*.tmp")) and not list((save / "plots").glob(".*.tmp"))


# ---------------------------------------------------------------------------------------------
# in the pipeline


def draw_card(text: str) -> Figure:
    figure = Figure(figsize=(3, 2))
    axes = figure.add_subplot()
    axes.set_axis_off()
    axes.text(0.5, 0.5, text, ha="center", va="center", fontsize=20)
    return figure


class EpochCard(Analysis):
    """Draws a card saying which epoch it is: each epoch's figure looks different."""

    before_training = True

    def __init__(self, name: str) -> None:
        self.name = name
        self.figures = (FigureInfo(name, name.capitalize(), f"A card for {name}."),)

    def __call__(self, ctx: EpochContext) -> None:
        ctx.draw_figure(self.name, draw_card, f"{self.name}\n{ctx.tag}", dpi=50)


def _tiny_run(save: Path, epochs: int = 3) -> Any:
    torch.manual_seed(0)
    config = Config(epochs=epochs, batch_size=16, lr=1e-2, save_dir=save, probe_size=3)
    analyses = [EpochCard("tsne"), EpochCard("confusion_matrix")]
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
    assert len(_embedded_images(html)) == 2 * 4 + 1  # two stems x (init + 3 epochs) + GIF


def test_a_failing_report_does_not_stop_training(tmp_path, monkeypatch):
    def broken(save_dir: Path) -> Path:
        raise OSError("disk full")

    monkeypatch.setattr(exigo.report, "write_report", broken)
    result = _tiny_run(tmp_path / "save", epochs=2)
    assert [row["epoch"] for row in result.history] == [1, 2]
    assert result.failed_analyses == [(1, "report", "OSError: disk full"),
                                      (2, "report", "OSError: disk full")]  # fmt: skip


# ---------------------------------------------------------------------------------------------
# in a real browser (Debian's chromium, headless, driven over the DevTools protocol)


@pytest.fixture(scope="module")
def chromium() -> str:
    """Path of a Chromium; installs Debian's `chromium` when absent (as .ci/run does)."""
    found = os.environ.get("EXIGO_CHROMIUM") or shutil.which("chromium")
    if found:
        return found
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        pytest.skip("chromium is not installed and cannot be (needs apt-get as root)")
    install = "apt-get update -qq && apt-get install -y -qq chromium"
    environment = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    done = subprocess.run(
        install, shell=True, capture_output=True, text=True, timeout=1200, env=environment
    )
    if done.returncode != 0 or shutil.which("chromium") is None:
        pytest.skip(f"installing chromium failed: {done.stderr.strip()[-300:]}")
    return shutil.which("chromium")


class DevTools:
    """A headless Chromium driven over `--remote-debugging-pipe` (JSON messages ending in NUL).

    The pipe needs no port, no websocket client and no network: Chromium reads commands from
    its fd 3 and writes replies and events to its fd 4.
    """

    def __init__(self, executable: str, profile: Path, timeout: float = 60.0) -> None:
        self.timeout = timeout  # guards against a hung browser only; nothing is timed
        commands_read, commands_write = os.pipe()
        events_read, events_write = os.pipe()
        # keep our ends away from 3 and 4, which the shell below assigns
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (commands_read, events_write)]
        os.close(commands_read)
        os.close(events_write)
        flags = [
            "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={profile}", "--remote-debugging-pipe", "--window-size=1200,900",
            "about:blank",
        ]  # fmt: skip
        # bash (not dash) because the pipe's fd numbers may have two digits
        self.process = subprocess.Popen(
            ["bash", "-c", f'exec "$@" 3<&{high[0]} 4>&{high[1]}', "bash", executable, *flags],
            pass_fds=high,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for fd in high:
            os.close(fd)
        self.commands, self.replies = commands_write, events_read
        self.buffer = b""
        self.next_id = 0
        self.events: list[dict[str, Any]] = []
        self.session = ""

    def _receive(self) -> dict[str, Any]:
        while b"\0" not in self.buffer:
            ready, _, _ = select.select([self.replies], [], [], self.timeout)
            chunk = os.read(self.replies, 1 << 20) if ready else b""
            if not chunk:
                raise RuntimeError("chromium closed the DevTools pipe or did not answer")
            self.buffer += chunk
        message, self.buffer = self.buffer.split(b"\0", 1)
        return json.loads(message)

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        """Send a command (to the attached page, once attached) and return its result."""
        self.next_id += 1
        message: dict[str, Any] = {"id": self.next_id, "method": method, "params": params}
        if self.session and not method.startswith("Target."):
            message["sessionId"] = self.session
        os.write(self.commands, json.dumps(message).encode() + b"\0")
        while True:
            reply = self._receive()
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
            self.events.append(reply)

    def wait_for(self, event: str) -> dict[str, Any]:
        """The first event named `event` not yet consumed (waiting for it if needed)."""
        while True:
            for index, message in enumerate(self.events):
                if message.get("method") == event:
                    return self.events.pop(index)
            self.events.append(self._receive())

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def open(self, url: str) -> None:
        """Attach to the page, switch on the domains we watch, load `url` and wait for it."""
        if not self.session:
            page = next(
                t for t in self.call("Target.getTargets")["targetInfos"] if t["type"] == "page"
            )
            self.session = self.call("Target.attachToTarget", targetId=page["targetId"],
                                     flatten=True)["sessionId"]  # fmt: skip
            for domain in ("Page", "Network", "Runtime", "Log"):
                self.call(f"{domain}.enable")
        self.call("Page.navigate", url=url)
        self.wait_for("Page.loadEventFired")

    def requested_urls(self) -> list[str]:
        return [
            m["params"]["request"]["url"]
            for m in self.events
            if m.get("method") == "Network.requestWillBeSent"
        ]

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self.commands)
        os.close(self.replies)


@pytest.fixture
def browser(chromium: str, tmp_path: Path) -> Iterator[DevTools]:
    profile = Path(tempfile.mkdtemp(prefix="profile-", dir=tmp_path))  # fresh every time
    devtools = DevTools(chromium, profile)
    try:
        yield devtools
    finally:
        devtools.close()


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


def test_report_in_a_real_browser(browser, tmp_path):
    save = tmp_path / "save"
    _tiny_run(save, epochs=3)
    report = save / "report.html"
    browser.open(report.as_uri())

    # the last epoch is shown first, every image decodes, one frame per analysis is visible
    last = browser.evaluate(_STATE)
    assert last["slider"] == "3" and last["label"].startswith("epoch 3")
    assert last["tsne"] == last["confusion"] == last["row"] == "3"
    assert last["shown"] == 2 and last["visible"] == 1 and last["decoded"]
    assert last["cursors"] == ["3", "3"]  # loss and accuracy charts
    assert browser.evaluate("[...document.images].every((i) => i.naturalWidth > 0)")

    # a person presses the left arrow: every section moves to epoch 2
    for kind in ("keyDown", "keyUp"):
        browser.call("Input.dispatchKeyEvent", type=kind, key="ArrowLeft", code="ArrowLeft",
                     windowsVirtualKeyCode=37)  # fmt: skip
    previous = browser.evaluate(_STATE)
    assert previous["slider"] == "2" and previous["label"].startswith("epoch 2")
    assert previous["tsne"] == previous["confusion"] == previous["row"] == "2"
    assert previous["source"] != last["source"] and previous["decoded"]

    # and clicks the slider's left end: before training (no metrics row, no chart cursor)
    box = browser.evaluate(
        "(() => { const r = document.getElementById('epoch-slider').getBoundingClientRect();"
        " return [r.left, r.top + r.height / 2]; })()"
    )
    for kind in ("mousePressed", "mouseReleased"):
        browser.call("Input.dispatchMouseEvent", type=kind, x=box[0] + 1, y=box[1],
                     button="left", clickCount=1)  # fmt: skip
    first = browser.evaluate(_STATE)
    assert first["slider"] == "0" and first["label"] == "before training"
    assert first["tsne"] == first["confusion"] == "0"
    assert first["row"] is None and first["cursors"] == []

    screenshot = browser.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
    shot = tmp_path / "report-screenshot.png"
    shot.write_bytes(base64.b64decode(screenshot["data"]))
    with Image.open(shot) as image:
        assert image.width >= 1000 and len(image.getcolors(1 << 24)) > 50  # not a blank page

    # nothing left the file, and nothing went wrong on the page
    urls = browser.requested_urls()
    assert urls[0] == report.as_uri()
    assert [url for url in urls if not url.startswith(("file:", "data:"))] == []
    errors = [m for m in browser.events if m.get("method") == "Runtime.exceptionThrown"]
    errors += [m for m in browser.events if m.get("method") == "Log.entryAdded"
               and m["params"]["entry"]["level"] == "error"]  # fmt: skip
    assert errors == []

    # the request check can fail: a page that loads a remote image is caught
    leaky = tmp_path / "leaky.html"
    leaky.write_text('<!DOCTYPE html><img src="http://127.0.0.1:9/pixel.png">')
    browser.open(leaky.as_uri())
    deadline = time.monotonic() + 30  # the image request may trail the load event
    while "http://127.0.0.1:9/pixel.png" not in browser.requested_urls():
        assert time.monotonic() < deadline, browser.requested_urls()
        browser.events.append(browser._receive())


# ---------------------------------------------------------------------------------------------
# with the real analyses on real MNIST


@pytest.mark.slow
def test_report_of_a_real_mnist_run_embeds_every_figure(mnist_root, tmp_path):
    from exigo.cli import main

    save = tmp_path / "save"
    arguments = ["--data-dir", str(mnist_root), "--save-dir", str(save), "--epochs", "1",
                 "--no-attribution-checks", "--run-name", "report"]  # fmt: skip
    main(arguments)  # exit code 1 would only mean some analysis failed: the report still shows
    html = (save / "report.html").read_text()
    embedded = _embedded_images(html)
    figures = sorted((save / "plots").glob("*.png"))
    assert figures, "the default analyses wrote no figure"
    for figure in figures:
        assert figure.read_bytes() in embedded, figure.name
    if (save / "plots" / "tsne_1.png").exists():
        assert (save / "plots" / "tsne.gif").read_bytes() in embedded
    assert "after epoch 1 of 1" in html
    assert not re.search(r'(src|href)="(?!data:)', html)
