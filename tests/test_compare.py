"""`python -m exigo.compare`: two real (tiny) runs side by side, what is left out, the exit codes,
and the page in a real browser."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch

from exigo.analysis import Analysis, EpochContext
from exigo.compare import build_compare, main
from exigo.config import Config
from exigo.pipeline import run

from browser import audit
from conftest import EpochCard, TinyNet, make_blobs


class Checks(Analysis):
    """Scalars shaped like the attribution checks' and the confusion matrix's, from the epoch."""

    name = "checks"
    figures = ()

    def __init__(self, better: float) -> None:
        self.better = better

    def __call__(self, ctx: EpochContext) -> None:
        if ctx.eval is None:
            return
        ctx.metrics["faithfulness/deletion_auc/saliency"] = 0.4 - self.better / ctx.epoch
        ctx.metrics["faithfulness/deletion_auc/random"] = 0.5
        for c in range(3):
            ctx.metrics[f"precision/{c}"] = 0.5 + 0.1 * c
            ctx.metrics[f"recall/{c}"] = 0.6 + self.better


def _run(save: Path, epochs: int, lr: float, classes: list[str], extra: list[Analysis]) -> Any:
    torch.manual_seed(0)
    config = Config(epochs=epochs, batch_size=16, lr=lr, save_dir=save, probe_size=3)
    analyses = [EpochCard("confusion_matrix"), EpochCard("saliency"), *extra]
    train, held_out = make_blobs(48, seed=0), make_blobs(12, seed=1)
    return run(config, TinyNet(), train, held_out, analyses, class_names=classes, verbose=False)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("runs")
    a, b = root / "a", root / "b"
    _run(a, 3, 1e-2, ["zero", "one", "two"], [Checks(0.0)])
    _run(b, 2, 3e-2, ["zero", "one", "deux"], [Checks(0.1), EpochCard("only_b")])
    return a, b


def test_compare_shows_both_runs_where_they_overlap_and_says_what_it_left_out(two_runs):
    a, b = two_runs
    html = build_compare(a, b)
    # epochs 1 and 2 (and before training) side by side; A's third epoch left out, and said so
    steps = re.search(r'id="steps">(.*?)</script>', html)[1]
    assert '"step": 0' in steps and '"step": 2' in steps and '"step": 3' not in steps
    assert "epoch 3 of A (the other run stops earlier)" in html
    assert "classes only in A: two" in html and "classes only in B: deux" in html
    assert "figures only in B: Only_b" in html
    for stem in ("confusion_matrix", "saliency"):  # each step's figure of each run, once
        section = html.split(f'id="series-{stem}"')[1].split("</section>")[0]
        side_a, side_b = section.split('class="side side-b"')
        for step in (0, 1, 2):
            name = f"{stem}_{'init' if step == 0 else step}.png"
            assert side_a.count(f'data-name="plots/{name}"') == 1, name
            assert side_b.count(f'data-name="plots/{name}"') == 1, name
    assert 'data-name="plots/confusion_matrix_3.png"' not in html
    # the checks with their differences: B's deletion AUC is lower, i.e. better
    row = re.search(r"<td>faithfulness · deletion AUC · Saliency</td>(.*?)</tr>", html)[1]
    assert row == '<td>0.4000</td><td>0.3000</td><td class="better">-0.1000</td>'  # epoch 1
    # classes matched by name: zero and one compared, two and deux not
    assert re.search(r"<td>one</td><td>60.00%</td><td>60.00%</td><td[^>]*>\+0.00 pp", html)
    assert "<td>two</td>" not in html and "<td>deux</td>" not in html
    # the configuration: the options that differ first, highlighted
    config = html[html.index('id="config"') :]
    assert config.index(">lr<") < config.index(">batch_size<")
    assert re.search(r'<tr class="changed"><td class="changed">epochs</td>', config)
    assert not re.search(r'(src|href)="(?!data:|#)', html)


def test_the_command_line_writes_the_page_or_exits_2_with_one_line(two_runs, tmp_path, capsys):
    a, b = two_runs
    output = tmp_path / "out" / "compare.html"
    output.parent.mkdir()
    assert main([str(a), str(b), "-o", str(output)]) == 0
    assert output.read_text().startswith("<!DOCTYPE html>")
    capsys.readouterr()
    assert main([str(a), str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert error == f"error: RUN_B {tmp_path} is not an exigo run (no run.json written by exigo)\n"
    assert main([str(tmp_path / "absent"), str(b)]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_compare_in_a_real_browser(two_runs, browser, tmp_path):
    a, b = two_runs
    page = tmp_path / "compare.html"
    main([str(a), str(b), "-o", str(page)])
    audit(browser, page.as_uri(), tmp_path, "compare")  # 1400 and 800 px, no request, not blank
    browser.open(page.as_uri(), width=1400)
    state = """(() => [...document.querySelectorAll('#series-saliency .frame.is-current')]
        .map((f) => f.dataset.step + ':' + (f.querySelector('img')?.naturalWidth > 0))
        .concat([document.querySelector('#checks .frame.is-current').dataset.step]))()"""
    assert browser.evaluate(state) == ["2:true", "2:true", "2"]
    browser.press("ArrowLeft", 37)
    assert browser.evaluate(state) == ["1:true", "1:true", "1"]
    browser.press("Home", 36)
    assert browser.evaluate(state) == ["0:true", "0:true", "0"]
    assert browser.errors() == []
