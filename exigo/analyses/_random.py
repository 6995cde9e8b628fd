"""Seeded randomness inside an analysis that leaves the run's random state as it found it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["NUMPY_SEED_LIMIT", "numpy_seed", "seeded"]

#: numpy's `RandomState`, and so scikit-learn and openTSNE, take seeds in [0, 2**32); torch
#: and the run take [0, 2**63).
NUMPY_SEED_LIMIT = 2**32


@contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Seed torch's global generators inside the block; restore their states after.

    An analysis that draws noise or weights from a fixed seed must not change the training
    that follows it. The CPU generator is always forked, the CUDA one when `device` is a CUDA
    device. Exceptions propagate; the states are restored in any case.

    Args:
        seed: the seed of the block's draws.
        device: where the block's tensors live.

    Yields:
        Nothing.
    """
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def numpy_seed(seed: int) -> int:
    """The run's seed as a seed numpy-based libraries take: `seed mod 2**32`.

    Seeds below 2**32 pass unchanged (their results stay as they were); seeds from 2**32 up,
    which `--seed` accepts because torch does, fold into numpy's range: seed s and
    s + 2**32 give the same t-SNE, and still different weights and shuffling.

    Args:
        seed: the run's seed, in [0, 2**63).

    Returns:
        An int in [0, 2**32).
    """
    return seed % NUMPY_SEED_LIMIT
