"""Checkpoints that are safe to load: plain tensors and numbers, read with `weights_only=True`.

A checkpoint is a dict `{"format": "exigo-checkpoint", "version": 1, "model": state_dict,
"epoch": int, "eval_loss": float, "eval_accuracy": float, "model_class": str}`, written
atomically. `torch.load(path, weights_only=True)` reads it, and so never executes code from it.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch
from torch import nn

from exigo._io import atomic_write_bytes

__all__ = ["CheckpointError", "load_checkpoint", "save_checkpoint"]

FORMAT = "exigo-checkpoint"
VERSION = 1


class CheckpointError(Exception):
    """A file is not an exigo checkpoint, or does not fit the model it is loaded into."""


def save_checkpoint(path: str | Path, model: nn.Module, **fields: Any) -> Path:
    """Atomically write the model's weights and `fields` (tensors, numbers, strings, dicts).

    Args:
        path: destination file (its folder is created).
        model: the weights saved are `model.state_dict()`.
        **fields: extra entries such as `epoch`, `eval_loss`, `optimizer` state.

    Returns:
        `path`.
    """
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "model_class": type(model).__name__,
        "model": model.state_dict(),
        **fields,
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return atomic_write_bytes(path, buffer.getvalue())


def load_checkpoint(
    path: str | Path, model: nn.Module | None = None, map_location: str | torch.device = "cpu"
) -> dict[str, Any]:
    """Read a checkpoint with `weights_only=True` and optionally load its weights into `model`.

    Args:
        path: a file written by `save_checkpoint`.
        model: when given, receives the weights (strictly: every key and shape must match).
        map_location: where the tensors are loaded.

    Returns:
        The checkpoint dict.

    Raises:
        CheckpointError: unreadable file, not an exigo checkpoint, or weights that do not fit
            `model`; the message names the file.
    """
    path = Path(path)
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such checkpoint") from None
    except Exception as error:
        raise CheckpointError(f"{path} is not a loadable checkpoint ({error})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an exigo checkpoint")
    if model is not None:
        try:
            model.load_state_dict(payload["model"])
        except RuntimeError as error:
            raise CheckpointError(
                f"{path} holds weights of a {payload.get('model_class', 'different')} model "
                f"that do not fit {type(model).__name__}: {error}"
            ) from None
    return payload
