import torch
from PIL import Image
from torch import nn

from exigo.analyses.saliency import (
    SaliencyAnalysis,
    SaliencyMaps,
    frozen,
    input_gradients,
    plot_saliency,
    reduce_channels,
    saliency_maps,
)
from exigo.config import Config
from exigo.data import MNIST_NORMALIZATION, Normalization
from exigo.pipeline import run

from conftest import TinyNet, assert_unchanged, batch_norm_net, snapshot

NORM = MNIST_NORMALIZATION
(MEAN,), (STD,) = NORM.mean, NORM.std


def linear_model(channels: int = 1, size: int = 4, classes: int = 3, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(channels * size * size, classes))


class Quadratic(nn.Module):
    """f_k(x) = w_k . x + 0.5 v_k . (x * x), so the input gradient is w_k + v_k * x."""

    def __init__(self, channels: int = 1, size: int = 4, classes: int = 3) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(1)
        features = channels * size * size
        self.w = nn.Parameter(torch.randn(classes, features, generator=generator))
        self.v = nn.Parameter(torch.randn(classes, features, generator=generator))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.flatten(1)
        return x @ self.w.T + 0.5 * (x * x) @ self.v.T

    def gradient(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x = images.flatten(1)
        return (self.w[labels] + self.v[labels] * x).view_as(images).detach()


def test_linear_model_maps_equal_weight_rows():
    model = linear_model()
    images = torch.randn(5, 1, 4, 4, generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([0, 2, 1, 2, 0])
    maps = saliency_maps(model, images, labels, normalization=NORM)
    rows = model[1].weight.detach()[labels].view(5, 4, 4)
    torch.testing.assert_close(maps.source, (images[:, 0] * STD + MEAN).clamp(0, 1))
    torch.testing.assert_close(maps.baseline, rows.abs())
    torch.testing.assert_close(maps.saliency, rows.abs())
    # a linear model looks at the same pixels whatever it is shown: nothing above the baseline
    torch.testing.assert_close(maps.delta, torch.zeros(5, 4, 4))
    torch.testing.assert_close(maps.overlay, torch.zeros(5, 4, 4))


def test_quadratic_model_maps_equal_closed_form_with_blank_baseline():
    model = Quadratic()
    images = torch.randn(6, 1, 4, 4, generator=torch.Generator().manual_seed(3))
    labels = torch.tensor([1, 1, 0, 2, 0, 1])
    blank = torch.full((6, 1, 4, 4), -MEAN / STD)
    maps = saliency_maps(model, images, labels, normalization=NORM)
    at_image = model.gradient(images, labels)[:, 0]
    at_blank = model.gradient(blank, labels)[:, 0]
    source = (images[:, 0] * STD + MEAN).clamp(0, 1)
    torch.testing.assert_close(maps.source, source)
    torch.testing.assert_close(maps.baseline, at_blank.abs())
    torch.testing.assert_close(maps.saliency, at_image.abs())
    torch.testing.assert_close(maps.delta, at_image - at_blank)
    torch.testing.assert_close(maps.overlay, (at_image - at_blank) * source)


def test_without_normalization_blank_is_zero_and_source_is_stretched():
    model = Quadratic()
    images = torch.randn(4, 1, 4, 4, generator=torch.Generator().manual_seed(4))
    labels = torch.tensor([0, 1, 2, 0])
    maps = saliency_maps(model, images, labels)
    at_zero = model.w.detach()[labels].view(4, 4, 4)  # the gradient at 0 is w
    torch.testing.assert_close(maps.baseline, at_zero.abs())
    flat = images.flatten(1)
    low, high = flat.min(1).values, flat.max(1).values
    stretched = (images[:, 0] - low[:, None, None]) / (high - low)[:, None, None]
    torch.testing.assert_close(maps.source, stretched)
    assert maps.source.min() == 0 and maps.source.max() == 1


def test_explicit_per_image_baseline_matches_shared_blank():
    model = Quadratic()
    images = torch.randn(5, 1, 4, 4, generator=torch.Generator().manual_seed(5))
    labels = torch.tensor([2, 0, 2, 1, 2])
    shared = saliency_maps(model, images, labels, normalization=NORM)
    per_image = saliency_maps(
        model, images, labels, NORM.blank((5, 1, 4, 4)), normalization=NORM, chunk_size=2
    )
    for (name, a), (_, b) in zip(shared.rows(), per_image.rows(), strict=True):
        torch.testing.assert_close(a, b, msg=name)


def test_reduce_channels_keeps_signed_channel_of_largest_magnitude():
    maps = torch.tensor([[[[1.0, -3.0]], [[-2.0, 2.0]], [[0.5, 0.0]]]])  # (1, 3, 1, 2)
    assert reduce_channels(maps).tolist() == [[[-2.0, -3.0]]]
    assert reduce_channels(maps[:, :1]).tolist() == [[[1.0, -3.0]]]


def test_multi_channel_linear_model_reduces_channels():
    model = linear_model(channels=3)
    norm = Normalization(mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    pixels = torch.rand(4, 3, 4, 4, generator=torch.Generator().manual_seed(6))
    images = norm.normalize(pixels)
    labels = torch.tensor([0, 1, 2, 1])
    maps = saliency_maps(model, images, labels, normalization=norm)
    rows = model[1].weight.detach()[labels].view(4, 3, 4, 4)
    torch.testing.assert_close(maps.saliency, rows.abs().amax(1))
    torch.testing.assert_close(maps.baseline, rows.abs().amax(1))
    torch.testing.assert_close(maps.source, pixels.amax(1))
    assert maps.delta.shape == (4, 4, 4) and maps.delta.abs().max() == 0


def test_batched_gradients_equal_one_image_at_a_time():
    torch.manual_seed(0)
    model = TinyNet()
    images = torch.randn(7, 1, 8, 8)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0])
    batched = input_gradients(model, images, labels, chunk_size=3)
    for i in range(7):
        single = images[i : i + 1].clone().requires_grad_(True)
        model.eval()
        (grad,) = torch.autograd.grad(model(single)[0, labels[i]], single)
        torch.testing.assert_close(batched[i], grad[0])


def test_model_mode_flags_buffers_and_inputs_restored():
    model = batch_norm_net()
    model.train()
    model[0].weight.requires_grad_(False)
    before = snapshot(model)
    images = torch.randn(4, 1, 4, 4)
    labels = torch.tensor([0, 1, 2, 0])
    images_before, labels_before = images.clone(), labels.clone()
    saliency_maps(model, images, labels, normalization=NORM)
    assert_unchanged(model, before)  # BatchNorm running stats too
    assert torch.equal(images, images_before) and torch.equal(labels, labels_before)


def test_frozen_restores_after_an_exception():
    model = linear_model()
    model.train()
    try:
        with frozen(model):
            assert not model.training
            assert not any(p.requires_grad for p in model.parameters())
            raise KeyError("boom")
    except KeyError:
        pass
    assert model.training and all(p.requires_grad for p in model.parameters())


def test_plot_saliency_draws_five_rows_and_colour_bars():
    model = Quadratic()
    images = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(7))
    labels = torch.tensor([0, 1, 2])
    maps = saliency_maps(model, images, labels)
    figure = plot_saliency(maps, labels, torch.tensor([0, 2, 2]), ["a", "b", "c"])
    texts = [text.get_text() for text in figure.texts]
    row_titles = [
        t.split("\n")[0] for t in texts if t.split("\n")[0] in SaliencyMaps.__annotations__
    ]
    assert row_titles == ["source", "baseline", "saliency", "delta", "overlay"]
    wrong = next(text for text in figure.texts if text.get_text() == "true b\npred c")
    assert wrong.get_color() == "tab:red"
    # four colour bars (not the source's), each labelled top, middle and bottom
    tops = [t for t in texts if t.startswith("\u2265 ")]
    bottoms = [t for t in texts if t.startswith("\u2264 ")]
    assert len(tops) == 4 and len(bottoms) == 2  # magnitudes start at 0, unclipped
    assert bottoms[0] == "\u2264 \u2212" + tops[2][2:]  # delta: symmetric around 0
    canvas = figure.axes[0].images[0].get_array()
    assert canvas.shape == (5 * 4 + 4 * 2, 3 * 4 + 2 * 1 + 3 + 2, 3)  # 5 rows of 3 tiles, bars


def test_analysis_writes_figures_before_and_after_training(blobs, tmp_path):
    train, held_out = blobs
    torch.manual_seed(0)
    config = Config(epochs=1, batch_size=16, lr=1e-2, save_dir=tmp_path / "save", probe_size=3)
    result = run(config, TinyNet(), train, held_out, [SaliencyAnalysis()])
    assert result.failed_analyses == []
    for tag in ("init", "1"):
        path = tmp_path / "save" / "plots" / f"saliency_{tag}.png"
        with Image.open(path) as png:
            assert png.size[0] > 300 and png.size[1] > 300
