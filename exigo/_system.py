"""Facts about the machine and the libraries, shared by the run engine and the analyses."""

from __future__ import annotations

import os
import platform
import sys

__all__ = ["available_cpus", "library_versions"]


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one).

    Returns:
        At least 1.
    """
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def library_versions() -> dict[str, str]:
    """Versions of Python and of the libraries that decide a run's numbers, as imported now.

    Returns:
        `{"python": ..., "torch": ..., ...}`; a library not imported yet is left out.
    """
    versions = {"python": platform.python_version()}
    for module in ("torch", "torchvision", "numpy", "matplotlib", "tensorboard", "captum"):
        imported = sys.modules.get(module)
        if imported is not None:
            versions[module] = getattr(imported, "__version__", "?")
    return versions
