r"""The Gaussian kernel the analyses share: SSIM's window (sanity) and the class models' blur.

$g_i \propto \exp(-i^2 / 2\sigma^2)$ for the integer offsets $i$ from the centre, normalised
to sum to 1; a 2-D Gaussian is separable, $G = g g^\top$.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["gaussian_blur", "gaussian_kernel"]


def gaussian_kernel(
    size: int, sigma: float, *, dtype: torch.dtype, device: torch.device | str = "cpu"
) -> Tensor:
    """Normalised 1-D Gaussian weights at `size` integer offsets centred on 0.

    Args:
        size: number of taps (odd, so that the centre is a tap).
        sigma: standard deviation, in taps.
        dtype: the weights' dtype.
        device: where the weights live.

    Returns:
        Float tensor [size] summing to 1.
    """
    offsets = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    profile = torch.exp(-offsets.square() / (2 * sigma**2))
    return profile / profile.sum()


def gaussian_blur(images: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of each channel, edges replicated, radius `ceil(2 sigma)`.

    Args:
        images: float tensor [N, C, H, W].
        sigma: standard deviation of the blur, in pixels (positive).

    Returns:
        Float tensor [N, C, H, W].
    """
    radius = max(1, math.ceil(2 * sigma))
    kernel = gaussian_kernel(2 * radius + 1, sigma, dtype=images.dtype, device=images.device)
    channels = images.shape[1]
    horizontal = kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1)
    vertical = kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1)
    images = F.conv2d(
        F.pad(images, (radius, radius, 0, 0), mode="replicate"), horizontal, groups=channels
    )
    return F.conv2d(
        F.pad(images, (0, 0, radius, radius), mode="replicate"), vertical, groups=channels
    )
