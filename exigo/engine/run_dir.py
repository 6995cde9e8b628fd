"""The save directory of a run: its lock, `run.json`, `metrics.json`, and replacing a previous run.

```
<save-dir>/  plots/  models/best.pt  models/last.pt  metrics.json  run.json  report.html
             examples.csv  label_issues.csv   (exigo.analyses.examples)
             logs/<run-name>/   (TensorBoard; runs accumulate side by side)
             .lock  .lock.holder  .previous-run/ (until the first epoch is committed)
```

A new run replaces the previous run's `RUN_OUTPUTS` (and its own TensorBoard folder) only when
`run.json` shows that exigo wrote them: `--save-dir ~` by mistake never deletes `~/models`,
and a folder of other files is refused. Even then they are only set aside (`PreviousRun`)
until the new run's first epoch is committed, and put back if it fails or stops before.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from exigo._io import FolderLock, FolderLockedError, atomic_write_json
from exigo._system import library_versions

__all__ = [
    "BASE_METRICS",
    "BEST_CHECKPOINT",
    "EXIGO_ENTRIES",
    "LAST_CHECKPOINT",
    "PREVIOUS_RUN",
    "RUN_OUTPUTS",
    "BaseMetric",
    "PreviousRun",
    "SaveDirError",
    "check_replaceable",
    "check_save_dir",
    "is_exigo_run",
    "lock_save_dir",
    "prepare_save_dir",
    "record_resume",
    "recover_previous_run",
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
RUN_OUTPUTS = (
    "plots",
    "models",
    "metrics.json",
    "run.json",
    "report.html",
    "examples.csv",  # exigo.analyses.examples
    "label_issues.csv",
)
#: Where a new run keeps the previous run's outputs until its first epoch is committed.
PREVIOUS_RUN = ".previous-run"
_MANIFEST = "manifest.json"
#: What else exigo keeps in a save directory: TensorBoard runs, the lock, the previous run.
EXIGO_ENTRIES = ("logs", ".lock", ".lock.holder", PREVIOUS_RUN)
#: Written by file browsers into any folder they show; not the user's files.
_SYSTEM_FILES = (".DS_Store", "Thumbs.db", "desktop.ini")
BEST_CHECKPOINT = "models/best.pt"
LAST_CHECKPOINT = "models/last.pt"


class SaveDirError(Exception):
    """The save directory cannot be created, written or locked, or holds others' files."""


def check_save_dir(save_dir: str | Path) -> Path:
    """Prove that `save_dir` is, or can become, a writable folder; create nothing.

    Runs before the data is loaded (or downloaded), so a wrong `--save-dir` costs no time,
    and a run that stops there leaves no folder behind.

    Args:
        save_dir: the folder the run writes into.

    Returns:
        `save_dir` as a `Path`.

    Raises:
        SaveDirError: it, or a folder above it, is a file; or it cannot be written or created.
    """
    save_dir = Path(save_dir)
    existing = next(folder for folder in (save_dir, *save_dir.parents) if folder.exists())
    if existing == save_dir and not existing.is_dir():
        raise SaveDirError(
            f"--save-dir {save_dir} is a file, not a folder; choose a folder (it is created "
            "if missing)"
        )
    if not existing.is_dir():
        raise SaveDirError(
            f"--save-dir {save_dir} cannot be created: {existing} is a file, not a folder"
        )
    try:  # a folder made and removed: proves what creating `save_dir` needs, leaves nothing
        tempfile.TemporaryDirectory(dir=existing, prefix=".exigo-write-test-").cleanup()
    except OSError as error:
        raise SaveDirError(
            f"cannot write to --save-dir {save_dir}"
            + ("" if existing == save_dir else f" ({existing} does not let it be created)")
            + f": {error.strerror or error}"
        ) from None
    return save_dir


def prepare_save_dir(save_dir: str | Path) -> Path:
    """Create `save_dir` if needed and prove it writable, before any training.

    Args:
        save_dir: the folder the run writes into.

    Returns:
        `save_dir` as a `Path`.

    Raises:
        SaveDirError: it cannot be created, is not a folder, or cannot be written.
    """
    save_dir = check_save_dir(save_dir)
    try:
        save_dir.mkdir(parents=True, exist_ok=True)
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


def check_replaceable(save_dir: Path, data_dir: Path | None = None) -> None:
    """Refuse a folder holding files exigo did not write, unless an exigo run wrote it.

    Guards against a typo such as `--save-dir ~`, which would otherwise remove `~/models`
    (a new run replaces `RUN_OUTPUTS`) or write plots and models among a user's files. A
    folder with an exigo `run.json` is exigo's (files a user added beside its outputs stay
    untouched); any other folder may hold only what exigo writes, and the data folder.

    Args:
        save_dir: the run's folder.
        data_dir: the data's folder (`--data-dir`); allowed inside `save_dir`.

    Raises:
        SaveDirError: it holds run outputs or other files, but no exigo run.json.
    """
    if not save_dir.is_dir() or is_exigo_run(save_dir):
        return
    if (save_dir / PREVIOUS_RUN / _MANIFEST).is_file():
        return  # a run killed while setting the previous one aside: the recovery puts it back
    present = [
        name
        for name in RUN_OUTPUTS
        if (save_dir / name).is_file()
        or ((save_dir / name).is_dir() and any((save_dir / name).iterdir()))
    ]
    if present:
        raise SaveDirError(
            f"--save-dir {save_dir} already holds {', '.join(present)} but no exigo run.json: "
            "a new run would delete them. Choose an empty folder or one an exigo run wrote."
        )
    allowed = {*RUN_OUTPUTS, *EXIGO_ENTRIES, *_SYSTEM_FILES}
    if data_dir is not None:
        with contextlib.suppress(ValueError):  # ValueError: not inside save_dir
            inside = Path(data_dir).resolve().relative_to(save_dir.resolve()).parts
            allowed.update(inside[:1])
    foreign = sorted(
        entry.name
        for entry in save_dir.iterdir()
        if entry.name not in allowed and not entry.name.startswith(".exigo-write-test-")
    )
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if foreign[5:] else "")
        raise SaveDirError(
            f"--save-dir {save_dir} holds files exigo did not write ({shown}) and no exigo "
            "run.json: a run would write its plots, models and logs among them. Choose an "
            "empty folder or one an exigo run wrote."
        )


class PreviousRun:
    """The previous run's outputs, set aside until the new run commits its first epoch.

    `set_aside` moves the previous run's `RUN_OUTPUTS` (and its TensorBoard folder when the
    new run has the same name) into `<save-dir>/.previous-run/` with renames, after every
    check before training has passed. Once the new run's first epoch is committed
    (`models/last.pt` written) `discard` deletes them; if the run fails or stops before that,
    `restore` (or leaving the `with` block) deletes what the run wrote and puts them back
    exactly as they were. A manifest, rewritten atomically at each stage ("moving", "aside",
    "restoring"), lets `recover_previous_run` finish the job after a `kill -9` or a power
    cut: the next run on the folder puts the previous run back before anything else.

    Args:
        save_dir: the run's folder (its lock held).
        attempt: the new run's name (its TensorBoard folder).
        entries: the previous run's outputs set aside, as paths relative to `save_dir`.
        created_logs: whether `logs/` did not exist before the new run.
    """

    def __init__(
        self, save_dir: Path, attempt: str, entries: Sequence[str], created_logs: bool
    ) -> None:
        self.save_dir = save_dir
        self.attempt = attempt
        self.entries = list(entries)
        self.created_logs = created_logs
        self.active = True  # set aside, neither restored nor discarded yet

    @property
    def folder(self) -> Path:
        """`<save-dir>/.previous-run`."""
        return self.save_dir / PREVIOUS_RUN

    @classmethod
    def set_aside(cls, save_dir: Path, run_name: str) -> PreviousRun:
        """Move the previous run's outputs into `<save-dir>/.previous-run/`.

        Args:
            save_dir: the run's folder (`check_replaceable` passed, the lock held, and
                `recover_previous_run` called).
            run_name: the new run's TensorBoard folder name: a folder of that name from
                before is set aside too, so events are replaced, not mixed.

        Returns:
            The set-aside outputs; `discard` or `restore` them.
        """
        names = [*RUN_OUTPUTS, f"logs/{run_name}"]
        entries = [name for name in names if os.path.lexists(save_dir / name)]
        previous = cls(save_dir, run_name, entries, not (save_dir / "logs").exists())
        previous.folder.mkdir()
        previous._write_manifest("moving")
        for name in entries:
            target = previous.folder / "outputs" / name
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(save_dir / name, target)
        previous._write_manifest("aside")
        return previous

    def discard(self) -> None:
        """Delete the set-aside outputs: the new run has committed an epoch.

        A failure to delete is left for the next run's `recover_previous_run`.
        """
        self.active = False
        shutil.rmtree(self.folder, ignore_errors=True)

    def restore(self) -> None:
        """Delete the new run's outputs and put the previous run's back where they were."""
        self.active = False
        self._write_manifest("restoring")
        for name in dict.fromkeys([*RUN_OUTPUTS, f"logs/{self.attempt}", *self.entries]):
            aside, live = self.folder / "outputs" / name, self.save_dir / name
            if name in self.entries and not os.path.lexists(aside):
                continue  # put back already (an interrupted restore, continued)
            _remove(live)
            if os.path.lexists(aside):
                os.replace(aside, live)
        logs = self.save_dir / "logs"
        if self.created_logs and logs.is_dir() and not any(logs.iterdir()):
            logs.rmdir()
        shutil.rmtree(self.folder)

    def __enter__(self) -> PreviousRun:
        return self

    def __exit__(self, kind: object, error: BaseException | None, traceback: object) -> None:
        """Restore the previous run unless an epoch was committed; say so on the exception."""
        if self.active:
            self.restore()
            if error is not None:
                error.add_note(
                    f"--save-dir {self.save_dir} is back as it was before this run "
                    "(no epoch was completed)"
                )

    def _write_manifest(self, state: str) -> None:
        atomic_write_json(
            self.folder / _MANIFEST,
            {
                "state": state,
                "attempt": self.attempt,
                "entries": self.entries,
                "created_logs": self.created_logs,
            },
        )


def recover_previous_run(save_dir: Path) -> str | None:
    """Finish what a run killed between `PreviousRun.set_aside` and its first commit left.

    Call with the lock held, before anything else looks at the folder's outputs.

    Args:
        save_dir: the run's folder.

    Returns:
        One line saying what was put back, or None when there was nothing to do.
    """
    folder = save_dir / PREVIOUS_RUN
    if not folder.is_dir():
        return None
    try:
        manifest = json.loads((folder / _MANIFEST).read_text())
        previous = PreviousRun(
            save_dir, manifest["attempt"], manifest["entries"], manifest["created_logs"]
        )
        state = manifest["state"]
    except (OSError, ValueError, KeyError, TypeError):  # stopped before the first move
        shutil.rmtree(folder)
        return None
    if state == "moving":  # stopped while setting aside: the new run wrote nothing yet
        for name in previous.entries:
            aside = folder / "outputs" / name
            if os.path.lexists(aside):
                os.replace(aside, save_dir / name)
        shutil.rmtree(folder)
        return (
            f"put back the outputs of the run before in {save_dir}: a run stopped while "
            "setting them aside"
        )
    if state == "aside" and (save_dir / LAST_CHECKPOINT).exists():
        shutil.rmtree(folder)  # the new run committed an epoch, then stopped deleting these
        return None
    previous.restore()
    return (
        f"put back the outputs of the run before in {save_dir}: the run that was to replace "
        "them stopped before its first epoch was complete"
    )


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()


def run_info(
    *,
    run_name: str,
    config: Mapping[str, Any],
    seed: int,
    device: str,
    threads: int,
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
        threads: torch's CPU threads (they change the results in the last digits).
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
        "threads": threads,
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
