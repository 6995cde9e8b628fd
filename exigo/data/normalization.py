r"""How model inputs are made from pixel intensities, and the way back for figures.

A dataset's images are normalised per channel, $x = (p - \mu_c) / \sigma_c$, with $p \in [0, 1]$
the pixel intensity and $\mu_c$, $\sigma_c$ the training set's mean and standard deviation of
channel $c$. The blank image, zero intensity everywhere, is then $-\mu_c / \sigma_c$: the
baseline of the saliency maps, the attributions and the class models (`blank_image`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["MNIST_NORMALIZATION", "Normalization", "blank_image", "display_pixels"]


@dataclass(frozen=True)
class Normalization:
    r"""Per-channel affine normalisation $x = (p - \mu_c) / \sigma_c$.

    Attributes:
        mean: one value per channel, in pixel-intensity units ([0, 1]).
        std: one positive value per channel.
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def stats(self, like: Tensor) -> tuple[Tensor, Tensor]:
        """The mean and standard deviation as tensors that broadcast over a batch.

        Args:
            like: a tensor whose dtype and device the statistics take.

        Returns:
            `(mean, std)`, each a tensor [1, C, 1, 1].
        """
        shape = (1, len(self.mean), 1, 1)
        mean = torch.tensor(self.mean, dtype=like.dtype, device=like.device).view(shape)
        std = torch.tensor(self.std, dtype=like.dtype, device=like.device).view(shape)
        return mean, std

    def normalize(self, pixels: Tensor) -> Tensor:
        r"""Map pixel intensities to model inputs.

        Args:
            pixels: float tensor [N, C, H, W] in [0, 1].

        Returns:
            Float tensor [N, C, H, W], $(p - \mu) / \sigma$.
        """
        mean, std = self.stats(pixels)
        return (pixels - mean) / std

    def denormalize(self, images: Tensor) -> Tensor:
        r"""Map model inputs back to pixel intensities (the inverse of `normalize`).

        Args:
            images: float tensor [N, C, H, W], normalised.

        Returns:
            Float tensor [N, C, H, W], $x \sigma + \mu$ (in [0, 1] for real images).
        """
        mean, std = self.stats(images)
        return images * std + mean

    def blank(self, shape: Sequence[int], device: torch.device | str = "cpu") -> Tensor:
        r"""The normalised image of zero intensity everywhere (the saliency baseline).

        Args:
            shape: [N, C, H, W].
            device: where the tensor lives.

        Returns:
            Float32 tensor of `shape` whose channel c holds $-\mu_c / \sigma_c$.
        """
        return self.normalize(torch.zeros(tuple(shape), device=device))


#: MNIST's training-set pixel mean and standard deviation: the one place they are written.
MNIST_NORMALIZATION = Normalization(mean=(0.1307,), std=(0.3081,))


def blank_image(normalization: Normalization | None, like: Tensor) -> Tensor:
    """The blank image (zero intensity), normalised like the data: every analysis' baseline.

    Args:
        normalization: how pixel intensities were normalised; None gives the all-zero input.
        like: float tensor [N, C, H, W] whose shape, dtype and device the blank image takes.

    Returns:
        Float tensor [1, C, H, W] on `like`'s device and of its dtype.
    """
    shape = (1, *like.shape[1:])
    if normalization is None:
        return torch.zeros(shape, dtype=like.dtype, device=like.device)
    return normalization.blank(shape, device=like.device).to(like.dtype)


def display_pixels(images: Tensor, normalization: Normalization | None) -> Tensor:
    """Model inputs back to pixel intensities in [0, 1], for figures and overlays.

    Args:
        images: float tensor [N, C, H, W], normalised with `normalization`.
        normalization: how the images were made from pixels; None: each image is min-max
            stretched to [0, 1] (the original intensities are unknown).

    Returns:
        Float tensor [N, C, H, W] in [0, 1].
    """
    if normalization is not None:
        return normalization.denormalize(images).clamp(0, 1)
    low = images.amin(dim=(1, 2, 3), keepdim=True)
    high = images.amax(dim=(1, 2, 3), keepdim=True)
    return (images - low) / (high - low).clamp_min(1e-12)
