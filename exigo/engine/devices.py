"""Which device a run trains on, and how many CPU threads torch's operators use.

- `usable_devices` / `resolve_device`: `--device` checked against what the running torch can
  use on this machine (`auto`: CUDA, then MPS, then the CPU).
- `threads_for` / `set_threads` / `torch_threads`: the `--threads` rule (default half the
  CPUs, the other half draws the figures), applied by `exigo.cli` before it loads the data
  and for a run's length by `exigo.pipeline.run`.

The process layout (one process or torchrun's) is `exigo.engine.world`'s.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager, suppress

import torch

from exigo import _system

__all__ = ["resolve_device", "set_threads", "threads_for", "torch_threads", "usable_devices"]


def usable_devices() -> list[str]:
    """The devices the running torch can train on here, as `--device` takes them.

    The CPU, and the accelerator torch finds on this machine (CUDA, MPS, XPU, MTIA or a
    registered backend; `torch.accelerator`) with each of its indices.

    Returns:
        `["cpu"]`, followed by `["cuda", "cuda:0", "cuda:1"]` (say) when there is one.
    """
    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6
    if accelerator is not None:
        found = accelerator.current_accelerator(check_available=True)
        kind, count = (found.type, accelerator.device_count()) if found is not None else ("", 0)
    elif torch.cuda.is_available():
        kind, count = "cuda", torch.cuda.device_count()
    else:
        mps = getattr(torch.backends, "mps", None)
        kind, count = ("mps", 1) if mps is not None and mps.is_available() else ("", 0)
    if not count:
        return ["cpu"]
    return ["cpu", kind, *(f"{kind}:{index}" for index in range(count))]


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` picks cuda, then mps, then cpu; any other name must be in `usable_devices()`.

    Args:
        name: `auto`, or a torch device string such as `cpu`, `cuda:1`, `mps`.

    Returns:
        The device, checked to be one the running torch can train on here.

    Raises:
        ValueError: an unknown device name, or one this torch cannot use on this machine
            (`meta`, `xpu` without an XPU, `cuda:3` with two GPUs, ...); the message lists
            the usable ones.
    """
    usable = usable_devices()
    if name == "auto":
        for kind in ("cuda", "mps"):
            if kind in usable:
                return torch.device(kind)
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or str(device) not in {*usable, "cpu:0"}:
        what = "is not a device" if device is None else "cannot be used here"
        raise ValueError(
            f"--device {name!r} {what} (torch {torch.__version__} on this machine); "
            f"usable: {', '.join(['auto', *usable])}"
        )
    return device


def threads_for(threads: int) -> int:
    """The number of CPU threads `--threads` means on this machine.

    0 means `OMP_NUM_THREADS` when set, else half the CPUs (at least one): the other half
    renders the figures (`exigo.figures.pool`) and absorbs other processes. OpenMP threads
    spin-wait for each other at every operator, so when the cores are oversubscribed an
    epoch collapses: on 2 cores, two threads train the default CNN 1.6x faster than one when
    nothing else runs (1.4 s instead of 2.3 s per epoch), but 10-30x slower once other
    processes share the cores (29 s at load average 2, 76 s at 7; issue 7). torchrun sets
    `OMP_NUM_THREADS=1` for the same reason.

    Args:
        threads: `Config.threads`: a count, or 0 for the rule above.

    Returns:
        The count, at least 1.
    """
    if threads:
        return threads
    with suppress(ValueError):  # "4,2" (nested levels): the outer level is torch's
        return max(1, int(os.environ.get("OMP_NUM_THREADS", "").split(",")[0]))
    return max(1, _system.available_cpus() // 2)


def set_threads(threads: int) -> int:
    """Give torch's CPU operators `threads_for(threads)` intra-op threads.

    The one place the thread rule is applied: `runner.py` before it loads the data, and
    `exigo.pipeline.run` for the run (`torch_threads`). The count changes results in the
    last bits (operators split their sums by thread), so `models/last.pt` records it and
    `--resume` continues with it.

    Args:
        threads: `Config.threads`: a count, or 0 (`threads_for`).

    Returns:
        The count now in use.
    """
    count = threads_for(threads)
    if torch.get_num_threads() != count:
        torch.set_num_threads(count)
    return count


@contextmanager
def torch_threads(threads: int) -> Iterator[int]:
    """`set_threads(threads)` for the block; torch's previous count afterwards.

    Args:
        threads: `Config.threads`: a count, or 0 (`threads_for`).

    Yields:
        The count in use.
    """
    previous = torch.get_num_threads()
    try:
        yield set_threads(threads)
    finally:
        torch.set_num_threads(previous)
