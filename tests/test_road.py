import numpy as np
import pytest
import torch
from torch import nn

from exigo.analyses.road import noisy_linear_imputation, road_curves

NEIGHBOURS = {
    (-1, -1): 1 / 12, (-1, 0): 1 / 6, (-1, 1): 1 / 12, (0, -1): 1 / 6,
    (0, 1): 1 / 6, (1, -1): 1 / 12, (1, 0): 1 / 6, (1, 1): 1 / 12,
}  # fmt: skip


def direct_solve(image: np.ndarray, removed: np.ndarray) -> np.ndarray:
    """ROAD's equations, one sparse direct solve per channel (the paper's way)."""
    from scipy.sparse import lil_matrix
    from scipy.sparse.linalg import spsolve

    height, width = removed.shape
    unknown = list(zip(*np.nonzero(removed), strict=True))
    index = {pixel: i for i, pixel in enumerate(unknown)}
    out = image.copy()
    for channel in range(image.shape[0]):
        matrix = lil_matrix((len(unknown), len(unknown)))
        rhs = np.zeros(len(unknown))
        for i, (row, column) in enumerate(unknown):
            for (dr, dc), weight in NEIGHBOURS.items():
                r, c = row + dr, column + dc
                if not (0 <= r < height and 0 <= c < width):
                    continue
                matrix[i, i] += weight
                if (r, c) in index:
                    matrix[i, index[(r, c)]] -= weight
                else:
                    rhs[i] += weight * image[channel, r, c]
        solution = spsolve(matrix.tocsc(), rhs)
        for (row, column), value in zip(unknown, np.atleast_1d(solution), strict=True):
            out[channel, row, column] = value
    return out


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.9])
def test_imputation_solves_the_papers_equations(fraction):
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(3, 2, 9, 7, generator=generator)
    removed = torch.rand(3, 1, 9, 7, generator=generator) < fraction
    ours = noisy_linear_imputation(images, removed, noise=0.0, tolerance=1e-9)
    for n in range(3):
        expected = direct_solve(images[n].double().numpy(), removed[n, 0].numpy())
        np.testing.assert_allclose(ours[n].numpy(), expected, atol=1e-5)


def test_imputation_keeps_pixels_and_draws_reproducible_noise():
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(4, 1, 10, 10, generator=generator)
    removed = torch.rand(4, 1, 10, 10, generator=generator) < 0.4
    first = noisy_linear_imputation(images, removed, generator=torch.Generator().manual_seed(1))
    again = noisy_linear_imputation(images, removed, generator=torch.Generator().manual_seed(1))
    clean = noisy_linear_imputation(images, removed, noise=0.0)
    assert torch.equal(first, again)
    assert torch.equal(first[~removed.expand_as(images)], images[~removed.expand_as(images)])
    noise = (first - clean)[removed.expand_as(images)]
    assert 0.007 < float(noise.std()) < 0.013  # sigma 0.01
    # a constant image is imputed with its constant, whatever is removed
    flat = noisy_linear_imputation(torch.full((2, 3, 6, 6), -0.4), removed[:2, :, :6, :6], noise=0)
    assert torch.allclose(flat, torch.full_like(flat, -0.4), atol=1e-5)


def test_road_curves_of_a_linear_model():
    # p(class 0) = sigmoid(0.5 * (ink on 16 pixels S) - 2) on images of sparse ink: removing
    # the pixels of S first (MoRF) lowers it; removing the others first (LeRF) keeps it
    generator = torch.Generator().manual_seed(0)
    weights = torch.zeros(64)
    weights[torch.randperm(64, generator=generator)[:16]] = 0.5
    layer = nn.Linear(64, 2)
    with torch.no_grad():
        layer.weight.zero_()
        layer.bias.zero_()
        layer.weight[0] = weights
        layer.bias[0] = -2.0
    model = nn.Sequential(nn.Flatten(), layer).eval()
    images = (torch.rand(6, 1, 8, 8, generator=generator) < 0.5).float() * 2
    contribution = weights.view(8, 8) * images[:, 0]
    curves = road_curves(
        model,
        images,
        torch.zeros(6, dtype=torch.long),
        contribution[None],
        names=["true"],
        fractions=(0.0, 0.25, 0.5, 0.75),
        generator=torch.Generator().manual_seed(1),
    )
    assert curves.names == ["true", "random"]
    assert curves.most_relevant_first.shape == (2, 6, 4)
    with torch.no_grad():
        full = model(images).softmax(1)[:, 0]
    assert torch.allclose(curves.most_relevant_first[:, :, 0], full.expand(2, -1))
    assert torch.allclose(curves.least_relevant_first[:, :, 0], full.expand(2, -1))
    assert (curves.image_morf_auc[0] < curves.image_lerf_auc[0]).all()
    assert curves.passes == 6 + 2 * 6 * 3 * 2  # intact images, then 3 fractions x 2 orders


def test_road_rejects_a_full_removal():
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        road_curves(
            nn.Flatten(),
            torch.zeros(1, 1, 4, 4),
            torch.zeros(1, dtype=torch.long),
            torch.zeros(1, 1, 4, 4),
            names=["a"],
            fractions=(0.0, 1.0),
        )
