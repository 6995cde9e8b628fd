import functools
import math

import pytest
import torch
from torch import nn

from exigo.analyses._bootstrap import Interval
from exigo.analyses.attributions import attribution_maps, saliency
from exigo.analyses.sanity import (
    DEPENDS,
    FLAGGED,
    INCONCLUSIVE,
    image_control_map,
    randomisable_layers,
    randomisation_checks,
    randomisation_verdict,
    spearman,
    ssim,
)
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


def checks(model, images, targets, explain, **options):
    reference = explain(model, images, targets)
    names = [f"m{i}" for i in range(reference.shape[0])]
    return randomisation_checks(model, images, targets, explain, reference, names=names, **options)


def test_gradient_passes_and_an_image_copy_fails_the_randomisation_check():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 3)).eval()
    images = torch.rand(6, 1, 8, 8)
    targets = torch.arange(6) % 3
    result = checks(
        model,
        images,
        targets,
        both_maps,
        image_maps=image_control_map(images, torch.zeros(1, 1, 8, 8)),
    )
    assert result.layers == ["1"] and result.total_layers == 1
    gradient_rho, image_rho = result.cascade_spearman[-1].mean(dim=1).tolist()
    # The gradient of a linear model is its weight row: new random weights, a new map.
    assert abs(gradient_rho) < 0.3
    assert image_rho == pytest.approx(1.0)
    assert result.ssim[1].tolist() == pytest.approx([1.0] * 6)
    assert float(result.ssim[0].mean()) < 0.5
    # the image copy is its own image control; two random models agree on it too
    assert result.image_control[1].tolist() == pytest.approx([1.0] * 6)
    assert result.seed_control[1].tolist() == pytest.approx([1.0] * 6)
    assert torch.equal(result.independent_spearman, result.cascade_spearman)  # one layer


def test_cascade_and_independent_share_each_layers_random_weights():
    model = small_cnn(batch_norm=True).eval()
    images, targets = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 0])
    seen = []

    def recording(model, images, targets):
        seen.append({k: v.clone() for k, v in model.state_dict().items()})
        return gradient_maps(model, images, targets)

    result = checks(model, images, targets, recording, seed=2, draws=2)
    assert result.layers == ["4", "1", "0"]
    assert result.cascade_spearman.shape == result.independent_spearman.shape == (3, 1, 4)
    # calls: the reference, cascade depths 1-3, independent 1-3, the second draw
    reference, cascade, independent, control = seen[0], seen[1:4], seen[4:7], seen[7]
    trained = model.state_dict()
    for depth, layer in enumerate(["4", "1", "0"]):
        for key in trained:
            randomised_here = key.startswith(f"{layer}.")
            # layer k gets the same random weights in the cascade and alone
            if randomised_here:
                assert torch.equal(cascade[depth][key], independent[depth][key])
            else:
                assert torch.equal(independent[depth][key], reference[key])
    for layer in ("4", "0"):  # random weights, not the trained ones (BatchNorm's reset is 1, 0)
        assert not torch.equal(cascade[-1][f"{layer}.weight"], trained[f"{layer}.weight"])
    assert torch.equal(result.cascade_spearman[0], result.independent_spearman[0])
    assert not torch.equal(control["4.weight"], cascade[-1]["4.weight"])  # another seed
    assert torch.equal(result.full_spearman[0], result.cascade_spearman[-1])  # draw 0
    assert result.full_spearman.shape == (2, 1, 4)
    again = checks(model, images, targets, gradient_maps, seed=2, draws=2)
    assert torch.equal(again.cascade_spearman, result.cascade_spearman)
    assert torch.equal(again.seed_control, result.seed_control)


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
    result = randomisation_checks(
        model, images, targets, gradient_maps, reference, names=["saliency"], seed=3
    )
    assert torch.equal(rng, torch.random.get_rng_state())
    assert_unchanged(model, before)
    assert torch.isfinite(result.cascade_spearman).all() and torch.isfinite(result.ssim).all()
    assert torch.isfinite(result.seed_control).all() and not result.errors


def test_model_without_randomisable_layers_gives_an_empty_result():
    model = nn.Sequential(nn.Flatten(), nn.ReLU())
    explain = functools.partial(lambda m, x, t: x.sum(dim=1)[None])
    images = torch.rand(2, 1, 4, 4)
    result = checks(model, images, torch.zeros(2, dtype=torch.long), explain)
    assert result.layers == [] and result.total_layers == 0
    assert result.cascade_spearman.shape == (0, 1, 2)


def test_a_method_with_non_finite_maps_is_reported_and_the_others_go_on():
    model = small_cnn(batch_norm=False).eval()
    images, targets = torch.randn(3, 1, 8, 8), torch.tensor([0, 1, 2])
    calls = []

    def explain(model, images, targets):
        maps = both_maps(model, images, targets)
        calls.append(1)
        if len(calls) > 2:  # the second method breaks from the second randomised model on
            maps[1] = float("nan")
        return maps

    result = checks(model, images, targets, explain, independent=False)
    assert list(result.errors) == ["m1"]
    assert "not finite" in result.errors["m1"]
    assert torch.isfinite(result.cascade_spearman[:, 0]).all()
    assert result.cascade_spearman[-1, 1].isnan().all()


def test_cache_reuses_the_maps_of_identical_randomised_models():
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
    run = functools.partial(
        randomisation_checks,
        model,
        images,
        targets,
        counting,
        reference,
        names=["s"],
        cache=cache,
        draws=2,
    )
    first = run()
    assert len(calls) == 3 + 2 + 1  # cascade, independent (depth 1 is the cascade's), draw 2
    with torch.no_grad():
        model[4].weight.mul_(2)  # "another epoch": only the top layer differs
    second = run()
    # the cascade re-initialises the top layer first: every cascade state and the second
    # draw are as before; the independent depths 2 and 3 keep the (changed) top layer
    assert len(calls) == 6 + 2
    assert torch.equal(first.cascade_spearman, second.cascade_spearman)
    with torch.no_grad():
        model[0].weight.mul_(2)  # the bottom layer changed
    run()
    # new: cascade depths 1 and 2, independent depth 2; both full randomisations and
    # independent depth 3 (the bottom layer re-initialised) are reused
    assert len(calls) == 8 + 3


def test_excess_floors_a_negative_image_control_at_zero():
    from exigo.analyses.sanity import RandomisationChecks, excess_over_image

    full = torch.tensor([[[0.5, -0.1]], [[0.3, 0.1]]])  # (D=2, M=1, N=2)
    checks_ = RandomisationChecks(
        layers=["a"],
        cascade_spearman=full[:1],
        full_spearman=full,
        ssim=torch.zeros(1, 2),
        independent_spearman=full[:1],
        image_control=torch.tensor([[0.2, -0.4]]),
        seed_control=torch.zeros(1, 2),
        errors={},
    )
    excess = excess_over_image(checks_)  # (M, D, N)
    assert torch.allclose(excess, torch.tensor([[[0.3, -0.1], [0.1, 0.1]]]))


def test_verdict_rule():
    interval = Interval(
        mean=torch.tensor([0.2, -0.2, 0.01, 0.0, float("nan")]),
        low=torch.tensor([0.1, -0.3, -0.05, 0.0, float("nan")]),
        high=torch.tensor([0.3, -0.1, 0.06, 0.0, float("nan")]),
    )
    verdict = randomisation_verdict(interval)
    assert verdict[:4].tolist() == [FLAGGED, DEPENDS, INCONCLUSIVE, INCONCLUSIVE]
    assert verdict[4].isnan()


@pytest.mark.filterwarnings("ignore")
def test_cascade_equals_quantus_mprt():
    quantus = pytest.importorskip("quantus")
    from exigo.analyses.sanity import _SEED_OFFSET

    model = small_cnn(batch_norm=True).eval()
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(6, 1, 8, 8, generator=generator)
    targets = torch.tensor([0, 1, 2, 0, 1, 2])

    def explain_numpy(model, inputs, targets, **kwargs):
        maps = gradient_maps(model, torch.as_tensor(inputs), torch.as_tensor(targets))
        return maps[0][:, None].numpy()

    reference = gradient_maps(model, images, targets)
    metric = quantus.MPRT(layer_order="top_down", seed=42, disable_warnings=True)
    theirs = metric(
        model=model,
        x_batch=images.numpy(),
        y_batch=targets.numpy(),
        a_batch=reference[0][:, None].numpy(),
        explain_func=explain_numpy,
        softmax=False,
        device="cpu",
    )
    ours = randomisation_checks(
        model,
        images,
        targets,
        gradient_maps,
        reference,
        names=["saliency"],
        seed=42 + 1 - _SEED_OFFSET,
        ignore_joint_zeros=False,
    )
    for depth, layer in enumerate(ours.layers):
        assert ours.cascade_spearman[depth, 0].tolist() == pytest.approx(theirs[layer], abs=1e-6)
