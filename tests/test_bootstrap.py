import pytest
import torch

from exigo.analyses._bootstrap import Bootstrap, kendall_tau


@pytest.mark.parametrize("distribution", ["normal", "exponential"])
def test_interval_covers_a_known_mean_at_the_stated_rate(distribution):
    # 600 synthetic data sets of 100 images; the 95% interval of each must cover the true
    # mean about 95% of the time (the percentile interval undercovers skewed data slightly)
    generator = torch.Generator().manual_seed(0)
    if distribution == "normal":
        values, true_mean = 0.3 + 0.2 * torch.randn(600, 100, generator=generator), 0.3
    else:
        values = torch.empty(600, 100).exponential_(2.0, generator=generator)
        true_mean = 0.5
    interval = Bootstrap(100, resamples=2000, seed=1).interval(values)
    covered = ((interval.low <= true_mean) & (true_mean <= interval.high)).float().mean()
    assert 0.92 <= float(covered) <= 0.98


def test_interval_of_a_mean_by_hand():
    values = torch.tensor([[1.0, 2.0, 3.0, 6.0]])
    bootstrap = Bootstrap(4, resamples=5000, seed=0)
    interval = bootstrap.interval(values)
    assert float(interval.mean) == pytest.approx(3.0)
    # resampled means lie between the smallest and the largest value, around 3
    assert 1.0 <= float(interval.low) < 3.0 < float(interval.high) <= 6.0
    # every resample's weights sum to 1: the means of a constant are the constant
    constant = bootstrap.interval(torch.full((2, 4), 0.7))
    assert torch.allclose(constant.low, torch.full((2,), 0.7))
    assert torch.allclose(constant.high, torch.full((2,), 0.7))


def test_same_seed_same_interval_and_shapes():
    values = torch.rand(3, 5, 50, generator=torch.Generator().manual_seed(0))
    first = Bootstrap(50, seed=4).interval(values)
    again = Bootstrap(50, seed=4).interval(values)
    other = Bootstrap(50, seed=5).interval(values)
    assert first.mean.shape == first.low.shape == (3, 5)
    assert torch.equal(first.low, again.low) and torch.equal(first.high, again.high)
    assert not torch.equal(first.low, other.low)
    assert (first.low <= first.mean).all() and (first.mean <= first.high).all()
    assert first[1, 2].text() == (
        f"{float(first.mean[1, 2]):.2f} [{float(first.low[1, 2]):.2f}, "
        f"{float(first.high[1, 2]):.2f}]"
    )


def test_paired_difference_is_narrower_than_either_side():
    # two statistics that share most of their per-image variation: the interval of the
    # difference, computed on the same resamples, is far narrower than each one's
    generator = torch.Generator().manual_seed(0)
    shared = torch.randn(100, generator=generator)
    first = shared + 0.05 * torch.randn(100, generator=generator)
    second = shared + 0.1 + 0.05 * torch.randn(100, generator=generator)
    bootstrap = Bootstrap(100, seed=0)
    difference = bootstrap.interval(second - first)
    alone = bootstrap.interval(first)
    assert float(difference.low) > 0
    assert float(difference.high - difference.low) < 0.2 * float(alone.high - alone.low)


def test_rejects_values_of_another_size():
    with pytest.raises(ValueError, match="expected 10 images"):
        Bootstrap(10).means(torch.zeros(3, 9))
    with pytest.raises(ValueError):
        Bootstrap(0)


def test_kendall_tau_equals_scipy_with_ties():
    from scipy.stats import kendalltau

    generator = torch.Generator().manual_seed(0)
    first = torch.randint(0, 4, (20, 6), generator=generator).float()
    second = torch.randint(0, 4, (20, 6), generator=generator).float()
    expected = [
        kendalltau(a.numpy(), b.numpy()).statistic for a, b in zip(first, second, strict=True)
    ]
    assert kendall_tau(first, second).tolist() == pytest.approx(expected, abs=1e-6)
    assert float(kendall_tau(torch.arange(5.0), torch.arange(5.0))) == pytest.approx(1.0)
    assert float(kendall_tau(torch.arange(5.0), -torch.arange(5.0))) == pytest.approx(-1.0)
    assert float(kendall_tau(torch.ones(5), torch.arange(5.0))) == 0.0  # no ranking


def test_interval_over_draws_also_covers_the_spread_between_draws():
    generator = torch.Generator().manual_seed(0)
    # 5 draws whose means differ by much more than the images within a draw
    values = torch.randn(5, 1, generator=generator) + 0.05 * torch.randn(5, 80, generator=generator)
    bootstrap = Bootstrap(80, seed=0)
    both = bootstrap.interval_over_draws(values[None])  # [1]
    images_only = bootstrap.interval(values.mean(dim=0, keepdim=True))
    assert float(both.mean) == pytest.approx(float(values.mean()), abs=1e-6)
    assert float(both.high - both.low) > 5 * float(images_only.high - images_only.low)
    constant = bootstrap.interval_over_draws(torch.full((2, 3, 80), 0.25))
    assert torch.allclose(constant.low, torch.full((2,), 0.25))
    assert torch.allclose(constant.high, torch.full((2,), 0.25))
