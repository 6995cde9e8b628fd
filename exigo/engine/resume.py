"""What `--resume` restores from `models/last.pt`, and the checks that it continues the same run.

`models/last.pt` holds the model, optimizer and scheduler states, every random number
generator, the `RunState` (epoch, best loss, metrics history) and each analysis' `state_dict()`,
so on the CPU a resumed run's metrics equal an uninterrupted run's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "RESUMABLE_CHANGES",
    "ResumeError",
    "RunState",
    "check_resumable",
    "resumed_threads",
]

#: Settings that may differ between a run and its `--resume`: they say where files are or how
#: fast it runs, not what is trained. Every other field must match.
RESUMABLE_CHANGES = frozenset(
    {
        "resume",
        "save_dir",
        "data_dir",
        "download",
        "device",
        "eval_batch_size",
        "threads",
        "run_name",
        "dist_timeout",
        "sequential",
        "rescore_every_epoch",  # when the suspects are re-scored, not the final list
        "force",
    }
)


class ResumeError(Exception):
    """`--resume` finds nothing to continue, or settings that differ from the run's."""


@dataclass
class RunState:
    """What changes from epoch to epoch; `models/last.pt` saves it for `--resume`.

    Attributes:
        run_name: the TensorBoard run folder under `save_dir/logs`.
        epoch: last completed epoch (0 before the first one completes).
        best_epoch: epoch of the lowest evaluation loss so far (0: none yet).
        best_eval_loss: that loss.
        history: one metrics row per completed epoch.
    """

    run_name: str
    epoch: int = 0
    best_epoch: int = 0
    best_eval_loss: float = float("inf")
    history: list[dict[str, Any]] = field(default_factory=list)

    def to_checkpoint(self) -> dict[str, Any]:
        """The fields as checkpoint entries.

        Returns:
            `dataclasses.asdict(self)`.
        """
        return dataclasses.asdict(self)

    @classmethod
    def from_checkpoint(cls, payload: Mapping[str, Any]) -> RunState:
        """The state a `to_checkpoint()` dict (inside a loaded checkpoint) describes.

        Args:
            payload: a loaded `models/last.pt`.

        Returns:
            The run's state at its last completed epoch.
        """
        return cls(**{name: payload[name] for name in cls.__dataclass_fields__})


def check_resumable(
    payload: Mapping[str, Any],
    path: Path,
    *,
    config: Mapping[str, Any],
    run_name: str | None,
    model_class: str,
    train_size: int,
    val_size: int,
    world_size: int,
    save_dir: Path,
) -> None:
    """Raise `ResumeError` unless this run would continue the run `payload` recorded exactly.

    Args:
        payload: the loaded `models/last.pt`.
        path: its path, for messages.
        config: this run's `Config.to_dict()`.
        run_name: this run's `--run-name`, or None (take the saved one).
        model_class: this run's model class name.
        train_size: this run's training images.
        val_size: this run's held-out images.
        world_size: this run's number of processes.
        save_dir: the run's folder, for messages.

    Raises:
        ResumeError: the checkpoint lacks resume entries, or a setting differs (all named).
    """
    needed = {*RunState.__dataclass_fields__, "config", "optimizer", "scheduler", "rng", "analyses"}
    saved = payload.get("config")
    if not isinstance(saved, dict) or not needed <= set(payload):
        raise ResumeError(
            f"--resume: {path} is a checkpoint, but not one a run can resume from "
            f"(it lacks {', '.join(sorted(needed - set(payload)))})"
        )
    differences = [
        f"{name} {saved.get(name)!r} then, {config.get(name)!r} now"
        for name in sorted(set(saved) | set(config))
        if name not in RESUMABLE_CHANGES and saved.get(name) != config.get(name)
    ]
    if run_name not in (None, payload["run_name"]):
        differences.append(f"run_name {payload['run_name']!r} then, {run_name!r} now")
    if payload.get("model_class") != model_class:
        differences.append(f"model {payload.get('model_class')} then, {model_class} now")
    for name, size in (("train_size", train_size), ("val_size", val_size)):
        if payload.get(name) != size:
            differences.append(f"{name} {payload.get(name)} then, {size} now")
    if payload.get("world_size", 1) != world_size:  # the schedule counts steps per process
        differences.append(f"{payload.get('world_size', 1)} process(es) then, {world_size} now")
    if differences:
        raise ResumeError(
            f"--resume: the run in {save_dir} was started with other settings ("
            + "; ".join(differences)
            + "). Resume with the same options, or start a new run without --resume."
        )


def resumed_threads(payload: Mapping[str, Any], threads: int, *, force: bool) -> int | None:
    """The CPU thread count a resumed run continues with: the run's own, unless forced.

    The count splits every operator's sums differently, so another count changes the
    metrics from the first resumed epoch on (40 values of a 2-epoch MNIST run differ).

    Args:
        payload: the loaded `models/last.pt`; its `threads` is the count the run trained with
            (absent in checkpoints of older versions: nothing to hold to).
        threads: this run's `--threads` (0: not given).
        force: `--force`: continue with `threads` anyway.

    Returns:
        The count to use, or None to keep this run's own (`threads`, or the rule for 0).

    Raises:
        ResumeError: `threads` is given, differs from the run's, and `force` is not.
    """
    recorded = payload.get("threads")
    if not isinstance(recorded, int) or threads == recorded:
        return None
    if not threads:
        return recorded
    if force:
        return None
    raise ResumeError(
        f"--resume: the run trained with {recorded} CPU threads and --threads {threads} would "
        "change its results; leave --threads out (the run's own count is used), pass "
        f"--threads {recorded}, or add --force to continue with {threads} anyway"
    )
