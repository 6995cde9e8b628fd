import pytest
import torch
from PIL import Image

from exigo.analyses._bootstrap import Bootstrap
from exigo.analyses.drift import faithfulness_score, plot_drift, ranking_stability, settled_after


def test_settled_after():
    epochs = [2, 3, 4, 5]
    drift = torch.tensor([[0.5, 0.9], [0.9, 0.95], [0.3, 0.9], [0.85, 0.9]])
    assert settled_after(epochs, drift, 0.8) == 4  # stable from epoch 5's comparison with 4
    assert settled_after(epochs, drift[:3], 0.8) is None  # last comparison moved
    assert settled_after(epochs[:2], drift[:2], 0.8) == 2
    assert settled_after([2, 3], torch.tensor([[0.9], [0.9]]), 0.8) == 1
    assert settled_after([], torch.zeros(0, 2), 0.8) is None
    # one method alone: the second column settled from the start
    assert settled_after(epochs, drift[:, 1:], 0.8) == 1


def test_ranking_stability_of_the_same_and_of_a_reversed_ranking():
    generator = torch.Generator().manual_seed(0)
    scores = torch.arange(5.0)[:, None] + 0.3 * torch.randn(5, 60, generator=generator)
    bootstrap = Bootstrap(60, seed=0)
    same = ranking_stability(scores, scores, bootstrap)
    assert float(same.mean) == pytest.approx(1.0) and float(same.low) == pytest.approx(1.0)
    reversed_ = ranking_stability(scores, -scores, bootstrap)
    assert float(reversed_.mean) == pytest.approx(-1.0)
    # close scores: the ranking is uncertain, the interval wide
    close = torch.arange(5.0)[:, None] * 0.01 + torch.randn(5, 60, generator=generator)
    noisy = ranking_stability(close, close.flip(1), bootstrap)
    assert float(noisy.high - noisy.low) > 0.5


def test_faithfulness_score_and_the_figure(tmp_path):
    assert faithfulness_score(torch.tensor([[0.2]]), torch.tensor([[0.9]])).item() == (
        pytest.approx(0.7)
    )
    figure = plot_drift(
        {"a": "Method A", "b": "Method B"},
        {1: 0.9, 2: 0.95, 3: 0.96},
        {"a": [(2, 0.7, 0.65, 0.75), (3, 0.85, 0.8, 0.9)], "b": [(2, 0.9, 0.88, 0.92)]},
        {"a": 2, "b": 1},
        0.8,
        {1: {"a": 1, "b": 2}, 2: {"a": 2, "b": 1}, 3: {"a": 2, "b": 1}},
        [(2, -1.0, -1.0, 1.0), (3, 1.0, 1.0, 1.0)],
        "drift",
    )
    figure.savefig(tmp_path / "drift.png")
    with Image.open(tmp_path / "drift.png") as image:
        assert image.size[0] > 500
