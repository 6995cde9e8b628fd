r"""Percentile bootstrap over the check images, shared by every statistic of an epoch.

Every number the attribution checks report is a mean over the same $N$ check images (an AUC,
a rank correlation, a difference of the two) or a function of such means (the Kendall
$\tau$ of a ranking). One set of $B$ resamples of the images, drawn once per epoch, gives all
of them (Efron and Tibshirani 1993, "An Introduction to the Bootstrap", ch. 13): resample $b$
draws $N$ image indices with replacement, and its weight matrix
$W_{bn} = (\text{times image } n \text{ was drawn}) / N$ turns the per-image values
$v \in \mathbb{R}^{N \times K}$ of $K$ statistics into their resampled means $W v$ in one
matrix product. The 95% interval is the 2.5th and 97.5th percentile of the resampled means.
Because every statistic uses the same resamples, differences (a method against its control,
two epochs of the same images) are paired.

scipy.stats.bootstrap computes the same percentile interval one statistic at a time; the
checks need several thousand per epoch (curves at every step, every depth of the cascade),
which one matrix product does in milliseconds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = ["Bootstrap", "Interval", "kendall_tau"]


@dataclass(frozen=True)
class Interval:
    """A mean over the check images with its bootstrap confidence interval.

    Attributes:
        mean: float tensor [...], the mean over the images.
        low: float tensor [...], the lower end of the interval.
        high: float tensor [...], the upper end of the interval.
    """

    mean: Tensor
    low: Tensor
    high: Tensor

    def __getitem__(self, index: object) -> Interval:
        """The interval of the statistics at `index` (any tensor index)."""
        return Interval(self.mean[index], self.low[index], self.high[index])

    def text(self, digits: int = 2) -> str:
        """`0.47 [0.44, 0.50]` for a single statistic."""
        return (
            f"{float(self.mean):.{digits}f} "
            f"[{float(self.low):.{digits}f}, {float(self.high):.{digits}f}]"
        )


class Bootstrap:
    """`resamples` resamples of `count` images with replacement, from a seeded generator.

    Args:
        count: N, the number of images.
        resamples: B, the number of resamples (2,000 keeps the percentile ends within about
            0.01 of their limit for the checks' statistics).
        confidence: coverage of the intervals.
        seed: seed of the resamples; the same seed, count and resamples give the same
            intervals.
    """

    def __init__(
        self, count: int, resamples: int = 2000, confidence: float = 0.95, seed: int = 0
    ) -> None:
        if count < 1 or resamples < 1 or not 0 < confidence < 1:
            raise ValueError(
                f"need count >= 1, resamples >= 1, 0 < confidence < 1; got {count}, "
                f"{resamples}, {confidence}"
            )
        generator = torch.Generator().manual_seed(seed)
        drawn = torch.randint(count, (resamples, count), generator=generator)
        counts = torch.zeros(resamples, count, dtype=torch.float64)
        counts.scatter_add_(1, drawn, torch.ones_like(drawn, dtype=torch.float64))
        self.count = count
        self.confidence = confidence
        self.seed = seed
        self.weights = counts / count  # (B, N): each row sums to 1
        self._draw_weights: dict[int, Tensor] = {}

    def means(self, values: Tensor) -> Tensor:
        """The resampled means of every statistic.

        Args:
            values: float tensor [..., N], per-image values of each statistic.

        Returns:
            Float64 tensor [B, ...].
        """
        if values.shape[-1] != self.count:
            raise ValueError(f"expected {self.count} images on the last axis, got {values.shape}")
        flat = values.detach().cpu().double().reshape(-1, self.count)  # (K, N)
        return (self.weights @ flat.T).reshape(-1, *values.shape[:-1])

    def interval(self, values: Tensor) -> Interval:
        """The mean over images of each statistic, with its percentile interval.

        Args:
            values: float tensor [..., N], per-image values.

        Returns:
            `Interval` of tensors [...] (float32, CPU).
        """
        return self.interval_of(values.detach().cpu().double().mean(dim=-1), self.means(values))

    def interval_over_draws(self, values: Tensor) -> Interval:
        """The mean over draws and images, with an interval that resamples both.

        For statistics measured on D independent random draws (of a model's random weights)
        of every image: each resample draws D of the draws and the N images with replacement
        (a two-stage bootstrap, Davison and Hinkley 1997, section 3.8), so the interval also
        covers how much the statistic changes from one draw to another.

        Args:
            values: float tensor [..., D, N].

        Returns:
            `Interval` of tensors [...] (float32, CPU).
        """
        *lead, draws, count = values.shape
        if count != self.count:
            raise ValueError(f"expected {self.count} images on the last axis, got {values.shape}")
        if draws not in self._draw_weights:
            generator = torch.Generator().manual_seed(self.seed + 1)
            drawn = torch.randint(draws, (self.weights.shape[0], draws), generator=generator)
            counts = torch.zeros(self.weights.shape[0], draws, dtype=torch.float64)
            counts.scatter_add_(1, drawn, torch.ones_like(drawn, dtype=torch.float64))
            self._draw_weights[draws] = counts / draws
        flat = values.detach().cpu().double().reshape(-1, draws, count)  # (K, D, N)
        over_images = self.weights @ flat.permute(2, 0, 1).reshape(count, -1)  # (B, K * D)
        over_images = over_images.view(-1, flat.shape[0], draws)
        resampled = (over_images * self._draw_weights[draws][:, None, :]).sum(dim=-1)
        estimate = flat.mean(dim=(1, 2)).reshape(lead)
        return self.interval_of(estimate, resampled.reshape(-1, *lead))

    def interval_of(self, estimate: Tensor, resampled: Tensor) -> Interval:
        """The percentile interval of any statistic from its value on each resample.

        Args:
            estimate: float tensor [...], the statistic on the images as they are.
            resampled: float tensor [B, ...], the statistic on each resample.

        Returns:
            `Interval` of tensors [...] (float32, CPU).
        """
        tail = (1 - self.confidence) / 2
        # numpy: torch.quantile refuses inputs of more than 16 million values
        low, high = np.quantile(resampled.cpu().numpy(), [tail, 1 - tail], axis=0)
        return Interval(
            estimate.float().cpu(),
            torch.from_numpy(np.asarray(low)).float(),
            torch.from_numpy(np.asarray(high)).float(),
        )


def kendall_tau(first: Tensor, second: Tensor) -> Tensor:
    r"""Kendall's $\tau_b$ between two scorings of the same M items, for many pairs at once.

    $\tau_b = (n_c - n_d) / \sqrt{(n_0 - n_1)(n_0 - n_2)}$ over the $n_0 = M(M-1)/2$ item
    pairs, with $n_1$, $n_2$ the pairs tied in the first and in the second scoring: the
    statistic `scipy.stats.kendalltau` computes, here for every row (resample) at once.

    Args:
        first: float tensor [..., M].
        second: float tensor [..., M], the same items scored again.

    Returns:
        Float tensor [...] in [-1, 1]; 0 where a scoring ties every pair.
    """
    count = first.shape[-1]
    upper = torch.triu(torch.ones(count, count, dtype=torch.bool), diagonal=1)
    a = torch.sign(first[..., :, None] - first[..., None, :])[..., upper]  # (..., pairs)
    b = torch.sign(second[..., :, None] - second[..., None, :])[..., upper]
    denominator = torch.sqrt((a != 0).sum(-1).double() * (b != 0).sum(-1).double())
    tau = (a * b).sum(-1).double() / denominator.clamp_min(1e-300)
    return torch.where(denominator > 0, tau, torch.zeros_like(tau)).float()
