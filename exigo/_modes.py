"""Run a model in eval mode for a while, then give every module its own mode back."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

__all__ = ["evaluation_mode"]


@contextmanager
def evaluation_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put `model` in eval mode inside the block; restore each submodule's mode after.

    Attributions and deletion curves need eval mode: in training mode BatchNorm mixes the
    samples of a batch and updates its running statistics, and dropout is random. Exceptions
    propagate; the modes are restored in any case.

    Args:
        model: any module.

    Yields:
        The same model.
    """
    modes = [(module, module.training) for module in model.modules()]
    try:
        model.eval()
        yield model
    finally:
        for module, training in modes:
            module.training = training
