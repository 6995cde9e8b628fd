"""The save directory of a run: its lock, `run.json`, `metrics.json`, and replacing a previous run.

```
<save-dir>/  plots/  models/best.pt  models/last.pt  metrics.json  run.json  report.html
             logs/<run-name>/   (TensorBoard; runs accumulate side by side)
             .lock  .lock.holder
```

A new run replaces the previous run's `RUN_OUTPUTS` (and its own TensorBoard folder) only when
`run.json` shows that exigo wrote them: `--save-dir ~` by mistake never deletes `~/models`.
"""

from __future__ import annotations

import datetime as _dt
import json
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from exigo._io import FolderLock, FolderLockedError, atomic_write_json
from exigo._system import library_versions

__all__ = [
    "BASE_METRICS",
    "BEST_CHECKPOINT",
    "LAST_CHECKPOINT",
    "RUN_OUTPUTS",
    "BaseMetric",
    "SaveDirError",
    "check_replaceable",
    "clear_previous_run",
    "is_exigo_run",
    "lock_save_dir",
    "prepare_save_dir",
    "record_resume",
    "write_metrics",
]


class BaseMetric(NamedTuple):
    """An entry every metrics.json row has.

    Attributes:
        header: its column in the report's metrics table (None: not shown there).
        tag: its TensorBoard scalar tag (None: not a scalar over epochs).
    """

    header: str | None
    tag: str | None


#: The entries of every metrics.json row (the analyses add theirs after them).
BASE_METRICS: dict[str, BaseMetric] = {
    "epoch": BaseMetric("epoch", None),
    "train_loss": BaseMetric("train loss", "loss/train"),
    "eval_loss": BaseMetric("eval loss", "loss/eval"),
    "train_accuracy": BaseMetric("train accuracy", "accuracy/train"),
    "eval_accuracy": BaseMetric("eval accuracy", "accuracy/eval"),
    "lr": BaseMetric("learning rate", "learning_rate"),
    "seconds": BaseMetric("seconds", None),  # the whole epoch, commit included
    "train_seconds": BaseMetric(None, "seconds/train"),
    "eval_seconds": BaseMetric(None, "seconds/eval"),
    "analysis_seconds": BaseMetric(None, None),  # name -> seconds: `seconds/{name}` tags
    "best": BaseMetric(None, None),
}

#: Files and folders of one run inside the save directory, replaced by the next run.
RUN_OUTPUTS = ("plots", "models", "metrics.json", "run.json", "report.html")
BEST_CHECKPOINT = "models/best.pt"
LAST_CHECKPOINT = "models/last.pt"


class SaveDirError(Exception):
    """The save directory cannot be created, written or locked, or holds others' files."""


def prepare_save_dir(save_dir: str | Path) -> Path:
    """Create `save_dir` if needed and prove it writable, before any training.

    Args:
        save_dir: the folder the run writes into.

    Returns:
        `save_dir` as a `Path`.

    Raises:
        SaveDirError: it cannot be created, is not a folder, or cannot be written.
    """
    save_dir = Path(save_dir)
    try:
        save_dir.mkdir(parents=True, exist_ok=True)
        probe = save_dir / f".exigo-write-test-{time.monotonic_ns()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise SaveDirError(
            f"cannot write to --save-dir {save_dir}: {error.strerror or error}"
        ) from None
    return save_dir


def lock_save_dir(save_dir: Path) -> FolderLock:
    """Hold `save_dir`'s lock, or say who holds it.

    Args:
        save_dir: an existing folder.

    Returns:
        The held lock; `release()` it when the run ends.

    Raises:
        SaveDirError: another exigo run holds it ("in use by pid ... since ..."), or the lock
            file cannot be made.
    """
    lock = FolderLock(save_dir)
    try:
        lock.acquire()
    except FolderLockedError as error:
        raise SaveDirError(
            f"--save-dir {save_dir} is in use by another exigo run ({error.holder}); "
            "wait for it to finish or choose another --save-dir"
        ) from None
    except OSError as error:
        raise SaveDirError(f"cannot lock --save-dir {save_dir}: {error}") from None
    return lock


def is_exigo_run(save_dir: Path) -> bool:
    """Whether `save_dir/run.json` was written by exigo (so its neighbours are ours to replace).

    Args:
        save_dir: a run's folder.

    Returns:
        True when run.json exists and has exigo's `run_name` and `config` entries.
    """
    try:
        info = json.loads((save_dir / "run.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(info, dict) and "run_name" in info and "config" in info


def check_replaceable(save_dir: Path) -> None:
    """Refuse to delete a folder's `plots/`, `models/`, ... unless an exigo run wrote them.

    Guards against a typo such as `--save-dir ~`, which would otherwise remove `~/models`.

    Args:
        save_dir: the run's folder.

    Raises:
        SaveDirError: it holds run outputs but no exigo `run.json`.
    """
    present = [
        name
        for name in RUN_OUTPUTS
        if (save_dir / name).is_file()
        or ((save_dir / name).is_dir() and any((save_dir / name).iterdir()))
    ]
    if present and not is_exigo_run(save_dir):
        raise SaveDirError(
            f"--save-dir {save_dir} already holds {', '.join(present)} but no exigo run.json: "
            "a new run would delete them. Choose an empty folder or one an exigo run wrote."
        )


def clear_previous_run(save_dir: Path, run_name: str) -> None:
    """Remove the previous run's outputs and the TensorBoard folder of the same run name.

    Args:
        save_dir: the run's folder (`check_replaceable` passed).
        run_name: this run's TensorBoard folder name: its old events are replaced, not mixed.
    """
    for path in [*(save_dir / name for name in RUN_OUTPUTS), save_dir / "logs" / run_name]:
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def run_info(
    *,
    run_name: str,
    config: Mapping[str, Any],
    seed: int,
    device: str,
    distributed: Mapping[str, Any] | None,
    model: str,
    train_size: int,
    val_size: int,
    class_names: Sequence[str],
    figures: Mapping[str, Mapping[str, str]],
    data: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The content of `run.json`: what a reader needs to reproduce and read the run.

    Args:
        run_name: the TensorBoard run folder.
        config: `Config.to_dict()`.
        seed: the run's seed.
        device: where it trains.
        distributed: the torchrun processes (`World.describe()`), or None.
        model: the model's class name.
        train_size: training images.
        val_size: held-out images.
        class_names: display name per class.
        figures: figure name -> `{"title": ..., "caption": ...}`, as the analyses declare them
            (the report reads its headings from here).
        data: where the data came from: `source` (a dataset name and its torchvision root,
            an image folder, or "given from Python (ClassName)"), `image_shape` [C, H, W] and
            `normalization` (`mean`, `std` per channel, or None).

    Returns:
        A JSON-ready dict.
    """
    return {
        "run_name": run_name,
        "config": dict(config),
        "seed": seed,
        "device": device,
        "distributed": None if distributed is None else dict(distributed),
        "versions": library_versions(),
        "model": model,
        "started": _dt.datetime.now().isoformat(timespec="seconds"),
        "train_size": train_size,
        "val_size": val_size,
        "class_names": list(class_names),
        "data": None if data is None else dict(data),
        "figures": {name: dict(text) for name, text in figures.items()},
        "resumed": [],
    }


def record_resume(save_dir: Path, after_epoch: int, device: str, fallback: dict[str, Any]) -> None:
    """Append a `resumed` entry to run.json (written anew from `fallback` if it is not exigo's).

    Args:
        save_dir: the run's folder.
        after_epoch: the last completed epoch the run continues from.
        device: where it continues.
        fallback: the run.json content to start from when the file is missing or foreign.
    """
    path = save_dir / "run.json"
    info = json.loads(path.read_text()) if is_exigo_run(save_dir) else fallback
    info.setdefault("resumed", []).append(
        {
            "at": _dt.datetime.now().isoformat(timespec="seconds"),
            "after_epoch": after_epoch,
            "device": device,
            "versions": library_versions(),
        }
    )
    atomic_write_json(path, info)


def write_metrics(save_dir: Path, history: Sequence[Mapping[str, Any]]) -> None:
    """Atomically replace `metrics.json` with one row per completed epoch.

    Args:
        save_dir: the run's folder.
        history: the metrics rows.
    """
    atomic_write_json(save_dir / "metrics.json", list(history))
