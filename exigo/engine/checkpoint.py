"""Checkpoints that are safe to load: plain tensors and numbers, read with `weights_only=True`.

A checkpoint is a dict `{"format": "exigo-checkpoint", "version": 1, "model": state_dict,
"model_class": str, ...fields}`, written atomically (temporary file, then rename). The
pipeline writes two:

- `models/best.pt`: the weights of the epoch with the lowest evaluation loss, with `epoch`,
  `eval_loss` and `eval_accuracy`.
- `models/last.pt`: everything `--resume` needs to continue after the last completed epoch:
  optimizer and scheduler state, random number generator states (`capture_rng`), best loss
  and epoch, metrics history, run name, configuration, and each analysis' `state_dict()`.

`torch.load(path, weights_only=True)` reads both, and so never executes code from the file:
the optimizer (AdamW), scheduler (OneCycleLR) and RNG states are tensors, numbers, strings,
tuples, lists and dicts, which that loader accepts.
"""

from __future__ import annotations

import io
import pickle
import random
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from exigo._io import atomic_write_bytes

__all__ = [
    "CheckpointError",
    "apply_weights",
    "capture_rng",
    "load_checkpoint",
    "restore_rng",
    "save_checkpoint",
]

FORMAT = "exigo-checkpoint"
VERSION = 1


class CheckpointError(Exception):
    """A file is not an exigo checkpoint, or does not fit the model it is loaded into."""


def save_checkpoint(path: str | Path, model: nn.Module, **fields: Any) -> Path:
    """Atomically write the model's weights and `fields` (tensors, numbers, strings, dicts).

    Args:
        path: destination file (its folder is created).
        model: the weights saved are `model.state_dict()`.
        **fields: extra entries such as `epoch`, `eval_loss`, `optimizer` state. They must be
            loadable with `weights_only=True`: tensors, numbers, strings, None, and
            lists/tuples/dicts of those.

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
        CheckpointError: missing or unreadable file, not an exigo checkpoint (including any
            file that would need to run code to load), or weights that do not fit `model`;
            the message names the file.
    """
    path = Path(path)
    if path.is_file():
        _check_archive(path)
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such checkpoint") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path} is a folder, not a checkpoint file") from None
    except Exception as error:
        raise CheckpointError(_why(path, error)) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an exigo checkpoint")
    if model is not None:
        apply_weights(payload, model, path)
    return payload


def _check_archive(path: Path) -> None:
    """Refuse a file that is not a whole zip archive: every member's CRC-32 must match.

    `torch.save` writes a zip archive whose members carry CRC-32 checksums, which
    `torch.load` does not verify: flipped bytes inside a tensor's member would load as
    different weights (or optimizer state) without a word. Reading every member costs about
    a second per gigabyte.
    """
    size = path.stat().st_size
    if not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"{path} is not a loadable exigo checkpoint: "
            + (
                "the file is empty"
                if size == 0
                else f"{size} bytes that are not a PyTorch zip "
                "archive (truncated, or another kind of file)"
            )
        )
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as error:
        raise CheckpointError(
            f"{path} is damaged and was not loaded: its zip archive cannot be read ({error})"
        ) from None
    if damaged is not None:
        raise CheckpointError(
            f"{path} is damaged and was not loaded: the bytes of its member {damaged} do not "
            "match their CRC-32 checksum (a disk or copy error); use an intact copy"
        )


#: How `torch.load(weights_only=True)` names what it refused to rebuild: "Unsupported global:
#: GLOBAL x.y ...", "Trying to load unsupported GLOBAL posix.system whose module ...",
#: "Trying to call reduce for unrecognized function ...".
_REFUSED = re.compile(r"GLOBAL ([\w.]+)|unrecognized function (\S+)")


def _why(path: Path, error: Exception) -> str:
    """One sentence from torch.load's error (its refusals run to a dozen lines of advice)."""
    text = str(error)
    refused = _REFUSED.search(text)
    if refused or isinstance(error, pickle.UnpicklingError):
        culprit = f" ({refused.group(1) or refused.group(2)})" if refused else ""
        return (
            f"{path} was not loaded: it holds code or objects that are not plain "
            f"tensors{culprit}, and exigo loads only tensors and plain values (never code)"
        )
    lines = [line.strip() for line in re.sub(r"\x1b\[[0-9;]*m", "", text).splitlines()]
    first = next((line for line in lines if line), "")
    return f"{path} is not a loadable exigo checkpoint: {type(error).__name__}: {first[:200]}"


def apply_weights(payload: dict[str, Any], model: nn.Module, path: str | Path) -> None:
    """Load a checkpoint's weights into `model`, strictly (every key and shape must match).

    Args:
        payload: a dict returned by `load_checkpoint`.
        model: receives `payload["model"]`.
        path: the file `payload` came from, for the message.

    Raises:
        CheckpointError: the weights do not fit `model`; the message names the file.
    """
    try:
        model.load_state_dict(payload["model"])
    except (RuntimeError, KeyError, TypeError) as error:
        details = " ".join(str(error).split())  # torch lists every key, one per line
        raise CheckpointError(
            f"{path} holds weights of a {payload.get('model_class', 'different')} model "
            f"that do not fit {type(model).__name__}: "
            + (details if len(details) <= 300 else details[:300] + " ...")
        ) from None


def capture_rng(generator: torch.Generator | None = None) -> dict[str, Any]:
    """Every random number generator state a run draws from, as weights_only-safe values.

    Args:
        generator: an extra generator (the pipeline's shuffling generator).

    Returns:
        A dict of uint8 tensors (torch CPU, CUDA per device, `generator`), numpy's global
        MT19937 state as an int64 tensor with its position, and Python's `random` state.
    """
    numpy_state = np.random.get_state()
    python_version, python_words, python_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(numpy_state[1].astype(np.int64)),
            "position": int(numpy_state[2]),
            "has_gauss": int(numpy_state[3]),
            "cached_gaussian": float(numpy_state[4]),
        },
        "python": {"version": python_version, "words": list(python_words), "gauss": python_gauss},
    }
    if generator is not None:
        state["generator"] = generator.get_state()
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any], generator: torch.Generator | None = None) -> None:
    """Put back the states `capture_rng` returned.

    Args:
        state: the dict from `capture_rng`.
        generator: receives `state["generator"]` when both are present.
    """
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["position"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    python_state = state["python"]
    random.setstate((python_state["version"], tuple(python_state["words"]), python_state["gauss"]))
    if generator is not None and "generator" in state:
        generator.set_state(state["generator"])
    cuda_states = state.get("cuda")
    # the same number of devices: a resume on another machine keeps its fresh CUDA seeds
    if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_states)
