import math

import torch

from exigo.analyses._filters import gaussian_blur, gaussian_kernel


def test_kernel_is_the_normalised_gaussian_at_integer_offsets():
    kernel = gaussian_kernel(5, 1.0, dtype=torch.float64)
    weights = torch.tensor([math.exp(-(i**2) / 2) for i in (-2, -1, 0, 1, 2)], dtype=torch.float64)
    torch.testing.assert_close(kernel, weights / weights.sum())


def test_blur_of_an_impulse_is_the_outer_product_and_constants_stay():
    impulse = torch.zeros(1, 2, 9, 9)
    impulse[:, :, 4, 4] = 1.0
    blurred = gaussian_blur(impulse, 1.0)  # radius 2: 5 taps
    profile = gaussian_kernel(5, 1.0, dtype=torch.float32)
    expected = torch.zeros(9, 9)
    expected[2:7, 2:7] = profile[:, None] * profile[None, :]
    torch.testing.assert_close(blurred[0, 0], expected)
    torch.testing.assert_close(blurred[0, 1], expected)  # each channel on its own
    constant = torch.full((1, 1, 6, 7), 0.3)
    torch.testing.assert_close(gaussian_blur(constant, 2.5), constant)  # edges replicated
