import functools
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from exigo.analyses.attributions import attribution_maps, saliency
from exigo.analyses.sanity import cascading_randomisation, randomisable_layers, spearman, ssim
from exigo.models import MnistCNN

from conftest import assert_unchanged, snapshot


def gradient_maps(model: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return attribution_maps(model, images, targets, {"saliency": saliency})


def image_maps(model: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """A fake 'attribution' that ignores the model: the image itself. [1, N, H, W]."""
    return images.sum(dim=1)[None].detach().cpu()


def both_maps(model: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.cat([gradient_maps(model, images, targets), image_maps(model, images, targets)])


def test_spearman_hand_computed():
    a = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0], [1.0, 1.0, 2.0], [5.0, 5.0, 5.0]])
    b = torch.tensor([[10.0, 20.0, 30.0], [3.0, 2.0, 1.0], [1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
    rho = spearman(a, b)
    # ties: ranks (1.5, 1.5, 3) against (1, 2, 3) -> 1.5 / sqrt(1.5 * 2)
    assert rho.tolist() == pytest.approx([1.0, -1.0, 1.5 / math.sqrt(3.0), 0.0])


def test_spearman_can_leave_out_pixels_that_are_zero_in_both_maps():
    a = torch.tensor([[0.0, 0.0, 0.0, 1.0, 2.0, 3.0]])
    b = torch.tensor([[0.0, 0.0, 0.0, 3.0, 2.0, 1.0]])
    # with the shared zeros the reversed rankings still correlate: 11.5 / 15.5
    assert float(spearman(a, b)) == pytest.approx(11.5 / 15.5)
    assert float(spearman(a, b, ignore_joint_zeros=True)) == pytest.approx(-1.0)
    # a zero in only one map is kept
    c = torch.tensor([[0.0, 0.0, 4.0, 1.0, 2.0, 3.0]])
    assert float(spearman(a, c, ignore_joint_zeros=True)) == pytest.approx(
        float(spearman(a[:, 2:], c[:, 2:]))
    )


@pytest.mark.filterwarnings("ignore:An input array is constant")  # the oracle's NaN row
def test_spearman_equals_scipy_row_by_row_with_ties_and_left_out_zeros():
    from scipy.stats import spearmanr

    generator = torch.Generator().manual_seed(0)
    a = torch.randint(0, 4, (6, 30), generator=generator).float()  # many ties and zeros
    b = torch.randint(0, 4, (6, 30), generator=generator).float()
    a[4, :] = 2.0  # constant: no ranking, 0
    a[5, 2:], b[5, 2:] = 0.0, 0.0  # two positions left: still a correlation
    for ignore in (False, True):
        expected = []
        for x, y in zip(a.double().numpy(), b.double().numpy(), strict=True):
            kept = (x != 0) | (y != 0) if ignore else slice(None)
            rho = spearmanr(x[kept], y[kept]).statistic if len(x[kept]) >= 2 else 0.0
            expected.append(0.0 if math.isnan(rho) else rho)
        actual = spearman(a, b, ignore_joint_zeros=ignore)
        torch.testing.assert_close(actual, torch.tensor(expected, dtype=torch.float32))
    single = torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[0.0, 0.0, 5.0]])
    assert float(spearman(*single, ignore_joint_zeros=True)) == 0.0  # one value left


def test_spearman_ranks_infinities_and_leaves_out_nans_as_scipy_does():
    from scipy.stats import spearmanr

    inf, nan = float("inf"), float("nan")
    a = torch.tensor([[0.0, 0.0, 1.0, 2.0, inf, 3.0, -inf], [1.0, nan, 3.0, 2.0, 5.0, 4.0, 0.0]])
    b = torch.tensor([[0.0, 0.0, 4.0, 3.0, 2.0, 1.0, 6.0], [2.0, 1.0, nan, 1.0, 4.0, 6.0, 3.0]])
    for ignore in (False, True):
        expected = []
        for x, y in zip(a.double().numpy(), b.double().numpy(), strict=True):
            kept = ~(np.isnan(x) | np.isnan(y)) & (((x != 0) | (y != 0)) if ignore else True)
            expected.append(spearmanr(x[kept], y[kept]).statistic)
        actual = spearman(a, b, ignore_joint_zeros=ignore)
        torch.testing.assert_close(actual, torch.tensor(expected, dtype=torch.float32))


def test_average_ranks_equal_scipy_rankdata_with_ties_and_left_out_positions():
    from scipy.stats import rankdata

    from exigo.analyses._ranks import average_ranks

    generator = np.random.default_rng(3)
    rows = generator.integers(-3, 4, (7, 40)).astype(np.float64)  # blocks of ties, negatives
    rows[1] = 5.0  # one block: every rank is (1 + 40) / 2
    rows[2, ::3] = np.linspace(-1e-9, 1e-9, 14)  # distinct values a hair apart
    kept = generator.random((7, 40)) > 0.3
    kept[3] = False  # nothing kept: no rank to compare
    kept[4] = True
    ranks = average_ranks(rows, kept)
    for row, keep, got in zip(rows, kept, ranks, strict=True):
        np.testing.assert_array_equal(got[keep], rankdata(row[keep], method="average"))
    assert average_ranks(np.empty((2, 0)), np.empty((2, 0), bool)).shape == (2, 0)


def test_spearman_does_not_import_scipy_stats():
    # 1 CPU-second of imports that held the interpreter lock against the training beside it
    code = (
        "import sys, torch\n"
        "from exigo.analyses.sanity import spearman\n"
        "spearman(torch.rand(3, 10), torch.rand(3, 10), ignore_joint_zeros=True)\n"
        "assert 'scipy.stats' not in sys.modules, 'scipy.stats was imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr


def test_ssim_closed_form_for_constant_images():
    first = torch.full((1, 12, 12), 0.2)
    second = torch.full((1, 12, 12), 0.6)
    c1 = 0.01**2
    expected = (2 * 0.2 * 0.6 + c1) / (0.2**2 + 0.6**2 + c1)  # variances and covariance 0
    assert float(ssim(first, second)) == pytest.approx(expected, rel=1e-6)


def test_ssim_is_one_for_identical_images_and_lower_for_a_different_one():
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(3, 8, 8, generator=generator)  # smaller than the 11-pixel window
    assert ssim(images, images).tolist() == pytest.approx([1.0, 1.0, 1.0])
    other = torch.rand(3, 8, 8, generator=generator)
    scores = ssim(images, other)
    assert (scores < 0.5).all()
    assert torch.allclose(scores, ssim(other, images))


def test_randomisable_layers_top_down():
    names = [name for name, _ in randomisable_layers(MnistCNN())]
    assert names == [
        "classifier",
        "embedding.1",
        "features.5",
        "features.4",
        "features.1",
        "features.0",
    ]


def small_cnn(batch_norm: bool) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Conv2d(1, 4, 3, padding=1)]
    if batch_norm:
        layers.append(nn.BatchNorm2d(4))
    layers += [nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 3)]
    return nn.Sequential(*layers)


def test_gradient_passes_and_an_image_copy_fails_the_randomisation_check():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 3)).eval()
    images = torch.rand(6, 1, 8, 8)
    targets = torch.arange(6) % 3
    reference = both_maps(model, images, targets)
    result = cascading_randomisation(model, images, targets, both_maps, reference, seed=0)
    assert result.layers == ["1"] and result.total_layers == 1
    gradient_rho, image_rho = result.spearman[-1].tolist()
    # The gradient of a linear model is its weight row: new random weights, a new map.
    assert abs(gradient_rho) < 0.3
    assert image_rho == pytest.approx(1.0)
    assert float(result.ssim[-1, 1]) == pytest.approx(1.0)
    assert float(result.ssim[-1, 0]) < 0.5


def test_cascade_stages_and_reproducibility():
    model = small_cnn(batch_norm=True).eval()
    images, targets = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 0])
    reference = gradient_maps(model, images, targets)
    every = cascading_randomisation(model, images, targets, gradient_maps, reference)
    assert every.layers == ["4", "1", "0"]
    assert every.depth.tolist() == [1, 2, 3]
    assert every.maps.shape == (3, 1, 4, 8, 8)
    two = cascading_randomisation(model, images, targets, gradient_maps, reference, stages=2)
    assert two.depth.tolist() == [1, 3]
    # the same seed gives the same random weights, so the same maps at the same depths
    assert torch.allclose(two.maps, every.maps[[0, 2]])
    assert torch.allclose(two.spearman, every.spearman[[0, 2]])


@pytest.mark.parametrize("training", [False, True])
def test_trained_model_global_rng_and_batch_norm_are_safe(training):
    model = small_cnn(batch_norm=True)
    model.train()
    for _ in range(3):  # give BatchNorm non-trivial running statistics and parameters .grad
        model(torch.randn(16, 1, 8, 8) * 3 + 1).sum().backward()
    model.train(training)
    model[0].bias.requires_grad_(False)
    before = snapshot(model)
    images, targets = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 0])
    reference = gradient_maps(model, images, targets)
    rng = torch.random.get_rng_state()
    result = cascading_randomisation(model, images, targets, gradient_maps, reference, seed=3)
    assert torch.equal(rng, torch.random.get_rng_state())
    assert_unchanged(model, before)
    assert torch.isfinite(result.maps).all()
    assert torch.isfinite(result.spearman).all() and torch.isfinite(result.ssim).all()


def test_model_without_randomisable_layers_gives_an_empty_result():
    model = nn.Sequential(nn.Flatten(), nn.ReLU())
    explain = functools.partial(lambda m, x, t: x.sum(dim=1)[None])
    images = torch.rand(2, 1, 4, 4)
    result = cascading_randomisation(
        model, images, torch.zeros(2, dtype=torch.long), explain, explain(model, images, None)
    )
    assert result.layers == [] and result.spearman.shape == (0, 1)


def test_cache_reuses_the_maps_of_an_identical_randomised_model():
    model = small_cnn(batch_norm=True)
    model(torch.randn(16, 1, 8, 8) + 1)  # BatchNorm statistics that its reset changes
    model.eval()
    images, targets = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 0])
    calls = []

    def counting(model, images, targets):
        calls.append(1)
        return gradient_maps(model, images, targets)

    reference = gradient_maps(model, images, targets)
    cache: dict = {}
    first = cascading_randomisation(model, images, targets, counting, reference, cache=cache)
    assert len(calls) == 3 and len(cache) == 3
    with torch.no_grad():
        model[4].weight.mul_(2)  # "another epoch": only the top layer differs
    second = cascading_randomisation(model, images, targets, counting, reference, cache=cache)
    # the top layer is re-initialised first, so every stage's state is as before
    assert len(calls) == 3
    assert torch.equal(first.maps, second.maps)
    with torch.no_grad():
        model[0].weight.mul_(2)  # the bottom layer changed: only full randomisation is reused
    cascading_randomisation(model, images, targets, counting, reference, cache=cache)
    assert len(calls) == 5 and len(cache) == 3
