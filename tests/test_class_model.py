import torch
from PIL import Image
from torch import nn

from exigo.analyses.class_models import ClassModelAnalysis, class_models, plot_class_models
from exigo.config import Config
from exigo.data import MNIST_NORMALIZATION
from exigo.pipeline import run

from conftest import TinyNet, assert_unchanged, batch_norm_net, snapshot

NORM = MNIST_NORMALIZATION


def linear_model(classes: int = 3, size: int = 4, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(size * size, classes))


def exact_ascent(**overrides):
    """Settings under which the ascent converges to the maximiser of S_c(I) - l2 |I|^2."""
    exact = {"steps": 2000, "step_size": 0.1}
    no_regulariser = {"jitter": 0, "rotation": 0.0, "smoothing": 0.0, "margin": 0.0}
    return {**exact, **no_regulariser, **overrides}


def test_linear_model_class_model_is_its_weight_row_over_twice_lambda():
    model = linear_model()
    classes = torch.tensor([2, 0, 1])
    result = class_models(
        model, torch.zeros(1, 4, 4), classes, l2=0.5, **exact_ascent(pixel_range=None)
    )
    rows = model[1].weight.detach()[classes].view(3, 1, 4, 4)
    torch.testing.assert_close(result.pixels, rows / (2 * 0.5), atol=1e-3, rtol=0)
    assert result.classes.tolist() == [2, 0, 1]
    logits = model(result.images).detach()
    torch.testing.assert_close(result.scores, logits[torch.arange(3), classes])
    torch.testing.assert_close(result.probabilities, logits.softmax(1)[torch.arange(3), classes])


def test_normalised_inputs_chain_rule_and_clamped_closed_form():
    # S_c(I) = w . (I - mu) / sigma + b; with clamping the maximiser is clip(w / (2 l2 sigma)).
    model = linear_model(seed=1)
    classes = torch.tensor([0, 1, 2])
    start = NORM.blank((1, 1, 4, 4))
    result = class_models(model, start, classes, normalization=NORM, l2=0.2, **exact_ascent())
    rows = model[1].weight.detach()[classes].view(3, 1, 4, 4)
    expected = (rows / (2 * 0.2 * NORM.std[0])).clamp(0, 1)
    torch.testing.assert_close(result.pixels, expected, atol=1e-3, rtol=0)
    torch.testing.assert_close(result.images, NORM.normalize(result.pixels))
    assert 0 < expected.mean() < 1  # both bounds and the interior are exercised
    assert (expected == 0).any() and (expected == 1).any()


def test_default_regularisers_keep_the_direction_of_a_smooth_weight_row():
    # Class templates as smooth as strokes: the blur preconditioner
    # and the small moves change the path, not where the ascent heads (inside the margin).
    model = linear_model(size=16, seed=2)
    grid = torch.arange(16.0)
    templates = []
    for row, column in [(5.0, 6.0), (10.0, 9.0), (7.0, 11.0)]:
        bump = torch.exp(-((grid[:, None] - row) ** 2 + (grid[None, :] - column) ** 2) / 8)
        templates.append(bump - 0.3 * bump.mean())
    with torch.no_grad():
        model[1].weight.copy_(torch.stack(templates).view(3, 256))
    result = class_models(model, torch.zeros(1, 16, 16), torch.arange(3), l2=0.5, pixel_range=None)
    centre = result.pixels[:, 0, 3:13, 3:13].reshape(3, -1)
    expected = torch.stack(templates)[:, 3:13, 3:13].reshape(3, -1)
    cosine = nn.functional.cosine_similarity(centre, expected, dim=1)
    assert (cosine > 0.9).all(), cosine
    # the margin (2 of 16 pixels each side by default) decays 20x faster: much fainter there
    in_margin = torch.ones(16, 16, dtype=torch.bool)
    in_margin[2:14, 2:14] = False
    magnitude = result.pixels.abs()[:, 0]
    expected_magnitude = torch.stack(templates).abs()
    assert (magnitude[:, in_margin].sum() / magnitude.sum()) < 0.5 * (
        expected_magnitude[:, in_margin].sum() / expected_magnitude.sum()
    )


def test_model_comes_back_unchanged():
    model = batch_norm_net()
    model.train()
    model[3].bias.requires_grad_(False)
    before = snapshot(model)
    threads = torch.get_num_threads()
    start = torch.zeros(1, 4, 4)
    class_models(model, start, torch.arange(3), steps=5)
    assert_unchanged(model, before)
    assert torch.get_num_threads() == threads
    assert torch.equal(start, torch.zeros(1, 4, 4))


def test_same_seed_same_images_and_jitter_changes_them():
    model = TinyNet()
    start = torch.zeros(1, 8, 8)
    first = class_models(model, start, torch.arange(3), steps=10, seed=3)
    again = class_models(model, start, torch.arange(3), steps=10, seed=3)
    other = class_models(model, start, torch.arange(3), steps=10, seed=4)
    assert torch.equal(first.pixels, again.pixels)
    assert not torch.equal(first.pixels, other.pixels)
    assert first.pixels.min() >= 0 and first.pixels.max() <= 1


def test_plot_titles_each_class_with_its_probability():
    model = linear_model()
    result = class_models(model, torch.zeros(1, 4, 4), torch.arange(3), steps=5)
    figure = plot_class_models(result, ["cat", "dog", "emu"])
    titles = [ax.get_title() for ax in figure.axes if ax.images]
    assert titles == [
        f"{name}: p = {float(p):.2f}"
        for name, p in zip(["cat", "dog", "emu"], result.probabilities, strict=True)
    ]


def test_analysis_writes_one_figure_per_epoch(blobs, tmp_path):
    train, held_out = blobs
    torch.manual_seed(0)
    config = Config(epochs=1, batch_size=16, lr=1e-2, save_dir=tmp_path / "save")
    result = run(config, TinyNet(), train, held_out, [ClassModelAnalysis(steps=5)])
    assert result.failed_analyses == []
    with Image.open(tmp_path / "save" / "plots" / "class_models_1.png") as png:
        assert png.size[0] > 300
    assert not (tmp_path / "save" / "plots" / "class_models_init.png").exists()
    assert 0 < result.history[0]["class_models/mean_probability"] <= 1
