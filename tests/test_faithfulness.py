import math

import pytest
import torch
from torch import nn

from exigo.analyses.faithfulness import better_than_random, deletion_insertion, pixel_order


def linear_model(weights: torch.Tensor) -> nn.Module:
    """Two logits: w . flatten(x) and 0, so p(class 0) = sigmoid(w . x)."""
    layer = nn.Linear(weights.numel(), 2, bias=False)
    with torch.no_grad():
        layer.weight.zero_()
        layer.weight[0] = weights.flatten()
    return nn.Sequential(nn.Flatten(), layer).eval()


def test_pixel_order_ranks_by_descending_attribution():
    maps = torch.tensor([[[0.1, 3.0], [-2.0, 1.0]]])  # (1, 2, 2)
    assert pixel_order(maps).tolist() == [[2, 0, 3, 1]]


def test_pixel_order_breaks_ties_at_random_but_reproducibly():
    flat = torch.zeros(2, 4, 4)
    first = pixel_order(flat, torch.Generator().manual_seed(0))
    again = pixel_order(flat, torch.Generator().manual_seed(0))
    assert torch.equal(first, again)
    for row in first:  # a permutation of the 16 positions
        assert sorted(row.tolist()) == list(range(16))
    assert not torch.equal(first[0], first[1])  # not raster order for every image


def test_two_pixel_case_by_hand():
    # image (a, b) = (1, 2), weights (2, 1): contributions 2 and 2 -> use weights (3, 1)
    image = torch.tensor([[[[1.0, 2.0]]]])  # (1, 1, 1, 2)
    model = linear_model(torch.tensor([3.0, 1.0]))
    maps = torch.tensor([[[[3.0, 2.0]]]])  # (M=1, N=1, 1, 2): pixel 0 first
    curves = deletion_insertion(
        model, image, torch.tensor([0]), maps, torch.zeros(1, 1, 1, 2), names=["true"], steps=2
    )

    def sigmoid(z: float) -> float:
        return 1 / (1 + math.exp(-z))

    # deletion: both pixels (logit 5), pixel 0 removed (logit 2), none (logit 0)
    assert curves.deletion[0, 0].tolist() == pytest.approx([sigmoid(5), sigmoid(2), 0.5])
    # insertion: nothing, pixel 0 inserted (logit 3), both
    assert curves.insertion[0, 0].tolist() == pytest.approx([0.5, sigmoid(3), sigmoid(5)])
    assert curves.fractions.tolist() == [0.0, 0.5, 1.0]
    expected_deletion_auc = 0.25 * (sigmoid(5) + 2 * sigmoid(2) + 0.5)
    assert float(curves.deletion_auc[0]) == pytest.approx(expected_deletion_auc)
    assert curves.names == ["true", "random"]


def test_true_importance_of_a_linear_model_beats_random_at_every_step():
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(6, 1, 8, 8, generator=generator)
    weights = torch.randn(1, 8, 8, generator=generator) * 0.3
    model = linear_model(weights)
    baseline = torch.zeros(1, 1, 8, 8)
    contribution = (weights * (images - baseline))[:, 0]  # exact share of each pixel in the logit
    maps = torch.stack([contribution, -contribution])  # the true importance, and its opposite
    curves = deletion_insertion(
        model,
        images,
        torch.zeros(6, dtype=torch.long),
        maps,
        baseline,
        names=["true", "reversed"],
        steps=16,
        generator=torch.Generator().manual_seed(1),
    )
    true, reversed_, random = 0, 1, 2
    # Removing the largest contributions first is the lowest logit any order can reach.
    assert (curves.deletion[true] <= curves.deletion[random] + 1e-6).all()
    assert (curves.insertion[true] >= curves.insertion[random] - 1e-6).all()
    auc_deletion, auc_insertion = curves.deletion_auc, curves.insertion_auc
    assert auc_deletion[true] < auc_deletion[random] < auc_deletion[reversed_]
    assert auc_insertion[true] > auc_insertion[random] > auc_insertion[reversed_]


def test_ends_of_every_curve_are_the_image_and_the_baseline():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3)).eval()
    images = torch.randn(5, 1, 4, 4)
    targets = torch.tensor([0, 1, 2, 0, 1])
    baseline = torch.full((1, 1, 4, 4), -0.5)
    curves = deletion_insertion(
        model, images, targets, torch.randn(2, 5, 4, 4), baseline, names=["a", "b"], steps=4
    )
    with torch.no_grad():
        full = model(images).softmax(1)[torch.arange(5), targets]
        empty = model(baseline.expand(5, -1, -1, -1)).softmax(1)[torch.arange(5), targets]
    for order in range(3):
        assert torch.allclose(curves.deletion[order, :, 0], full)
        assert torch.allclose(curves.deletion[order, :, -1], empty)
        assert torch.allclose(curves.insertion[order, :, 0], empty)
        assert torch.allclose(curves.insertion[order, :, -1], full)


def test_batch_size_and_chunking_do_not_change_the_curves():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3)).eval()
    images = torch.randn(40, 1, 4, 4)
    targets = torch.arange(40) % 3
    maps = torch.randn(2, 40, 4, 4)
    baseline = torch.zeros(1, 1, 4, 4)
    results = [
        deletion_insertion(
            model,
            images,
            targets,
            maps,
            baseline,
            names=["a", "b"],
            steps=5,
            batch_size=size,  # 1: 16 composites per chunk -> one image at a time
            generator=torch.Generator().manual_seed(3),
        )
        for size in (1, 7, 4096)
    ]
    for other in results[1:]:
        assert torch.allclose(results[0].deletion, other.deletion, atol=1e-6)
        assert torch.allclose(results[0].insertion, other.insertion, atol=1e-6)


def test_rejects_maps_that_do_not_match_the_images():
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    with pytest.raises(ValueError, match="maps must be"):
        deletion_insertion(
            model,
            torch.zeros(2, 1, 4, 4),
            torch.zeros(2, dtype=torch.long),
            torch.zeros(1, 3, 4, 4),
            torch.zeros(1, 1, 4, 4),
            names=["a"],
        )


def every_step(model, images, targets, ranks, baseline, kept):
    """The curves the slow way: every composite of every step through the model."""
    deletion, insertion = [], []
    for rank in ranks:  # (N, HW) per order
        order_deletion, order_insertion = [], []
        for count in kept.tolist():
            mask = (rank < count).view(images.shape[0], 1, *images.shape[2:])
            with torch.no_grad():
                deleted = model(torch.where(mask, baseline, images)).softmax(1)
                inserted = model(torch.where(mask, images, baseline)).softmax(1)
            order_deletion.append(deleted[torch.arange(len(targets)), targets])
            order_insertion.append(inserted[torch.arange(len(targets)), targets])
        deletion.append(torch.stack(order_deletion, dim=1))
        insertion.append(torch.stack(order_insertion, dim=1))
    return torch.stack(deletion), torch.stack(insertion)


def sparse_images(count: int = 12, size: int = 8, seed: int = 0) -> torch.Tensor:
    """Normalised images whose pixels are mostly blank (= the baseline -2), like MNIST's."""
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.rand(count, 1, size, size, generator=generator)
    pixels[torch.rand(count, 1, size, size, generator=generator) < 0.7] = 0.0
    return (pixels - 0.5) / 0.25


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 64, 3)
    ).eval()


def test_skipping_repeated_composites_gives_exactly_the_curves_of_every_step():
    model = small_cnn()
    images = sparse_images()
    targets = torch.arange(12) % 3
    baseline = torch.full((1, 1, 8, 8), -2.0)
    maps = torch.randn(2, 12, 8, 8, generator=torch.Generator().manual_seed(1))
    maps[1, :, :4] = 0.0  # ties, broken at random
    curves = deletion_insertion(
        model,
        images,
        targets,
        maps,
        baseline,
        names=["a", "b"],
        steps=16,
        generator=torch.Generator().manual_seed(2),
    )
    # the ranks the function used: same generator, same calls
    generator = torch.Generator().manual_seed(2)
    ranks = torch.stack(
        [pixel_order(m, generator) for m in maps] + [pixel_order(torch.zeros(12, 8, 8), generator)]
    )
    kept = torch.round(torch.linspace(0, 1, 17) * 64).long()
    deletion, insertion = every_step(model, images, targets, ranks, baseline, kept)
    assert torch.equal(curves.deletion, deletion)
    assert torch.equal(curves.insertion, insertion)
    assert curves.passes < 2 * 3 * 12 * 17  # blank pixels made many composites repeat


def test_image_aucs_average_to_the_auc_of_the_mean_curve():
    model = small_cnn()
    images = sparse_images()
    curves = deletion_insertion(
        model,
        images,
        torch.arange(12) % 3,
        torch.randn(1, 12, 8, 8),
        torch.full((1, 1, 8, 8), -2.0),
        names=["a"],
        steps=8,
    )
    mean_curve_auc = torch.trapezoid(curves.deletion.mean(dim=1), curves.fractions, dim=-1)
    assert torch.allclose(curves.deletion_auc, mean_curve_auc, atol=1e-6)
    assert curves.image_deletion_auc.shape == (2, 12)


def test_better_than_random_is_a_one_sided_paired_test():
    generator = torch.Generator().manual_seed(0)
    random_auc = 0.5 + 0.1 * torch.rand(40, generator=generator)
    better = random_auc - 0.05 - 0.01 * torch.rand(40, generator=generator)
    worse = random_auc + 0.05
    p = better_than_random(
        torch.stack([better, worse, random_auc]), random_auc, lower_is_better=True
    )
    assert float(p[0]) < 1e-6  # every image better: the smallest p of 40 pairs
    assert float(p[1]) > 0.99
    assert float(p[2]) == 1.0  # no difference at all
    q = better_than_random(torch.stack([better, worse]), random_auc, lower_is_better=False)
    assert float(q[0]) > 0.99 and float(q[1]) < 1e-6


@pytest.mark.filterwarnings("ignore:The settings for perturbing input")  # blank on blank
def test_deletion_points_equal_quantus_pixel_flipping():
    quantus = pytest.importorskip("quantus")
    model = small_cnn()
    images = sparse_images(count=10)
    targets = torch.arange(10) % 3
    maps = torch.randn(1, 10, 8, 8, generator=torch.Generator().manual_seed(3))  # no ties
    curves = deletion_insertion(
        model, images, targets, maps, torch.full((1, 1, 8, 8), -2.0), names=["a"], steps=16
    )
    metric = quantus.PixelFlipping(features_in_step=4, perturb_baseline=-2.0, disable_warnings=True)
    theirs = metric(
        model=model,
        x_batch=images.numpy(),
        y_batch=targets.numpy(),
        a_batch=maps[0][:, None].numpy(),
        softmax=True,
        device="cpu",
        channel_first=True,
    )
    assert torch.equal(curves.deletion[0, :, 1:], torch.tensor(theirs, dtype=torch.float32))
