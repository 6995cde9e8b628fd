"""Seeded randomness inside an analysis that leaves the run's random state as it found it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["seeded"]


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
