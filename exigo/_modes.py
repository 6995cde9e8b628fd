"""Run a model in eval mode for a while, then give every module its mode (and flags) back."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager

from torch import nn

__all__ = ["evaluation_mode", "frozen"]


@contextmanager
def evaluation_mode(model: nn.Module, *, freeze_parameters: bool = False) -> Iterator[nn.Module]:
    """Put `model` in eval mode inside the block; restore each submodule's own mode after.

    Analyses need eval mode: in training mode BatchNorm mixes the samples of a batch and
    updates its running statistics, and dropout is random. Exceptions propagate; the modes
    (and the `requires_grad` flags) are restored in any case.

    Args:
        model: any module.
        freeze_parameters: also switch off every parameter's `requires_grad` inside, so that
            a backward pass computes input gradients only and leaves every `.grad` alone.

    Yields:
        The same model.
    """
    modes = [(module, module.training) for module in model.modules()]
    parameters = model.parameters() if freeze_parameters else ()
    flags = [(parameter, parameter.requires_grad) for parameter in parameters]
    try:
        model.eval()
        for parameter, _ in flags:
            parameter.requires_grad_(False)
        yield model
    finally:
        for parameter, flag in flags:
            parameter.requires_grad_(flag)
        for module, training in modes:
            module.training = training


def frozen(model: nn.Module) -> AbstractContextManager[nn.Module]:
    """Eval mode with every parameter's `requires_grad` off; both restored after the block.

    `evaluation_mode(model, freeze_parameters=True)`: inside, backward passes compute input
    gradients only, and no parameter gradient is computed or accumulated in `.grad`. Eval mode
    makes samples independent (BatchNorm uses its running statistics, dropout is off), which
    batched input gradients rely on.

    Args:
        model: any module.

    Returns:
        A context manager that yields the same model.
    """
    return evaluation_mode(model, freeze_parameters=True)
