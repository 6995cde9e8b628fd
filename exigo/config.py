"""The run's configuration: one frozen dataclass that the CLI fills and the pipeline reads.

Every field has a default that reproduces `python runner.py`; every field is documented with
its unit. The configuration is saved next to the run's outputs (`run.json`) so a run can be
reproduced from its folder alone.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Config"]


@dataclass(frozen=True)
class Config:
    """Settings of one training run.

    The defaults reach at least 98% held-out accuracy on `../shared/mnist` (8,000 training /
    2,000 held-out images) after 2 epochs on a 2-core CPU in a few seconds.
    """

    epochs: int = 2
    """Full passes over the training set."""

    batch_size: int = 64
    """Training images per optimizer step."""

    lr: float = 4e-3
    """Peak learning rate of the one-cycle schedule (AdamW)."""

    weight_decay: float = 1e-2
    """AdamW's decoupled weight decay."""

    label_smoothing: float = 0.1
    """Cross-entropy target smoothing (0 = one-hot targets)."""

    seed: int = 0
    """Seeds model init, shuffling and every analysis' randomness."""

    data_dir: Path = Path("save/data")
    """A torchvision root holding `MNIST/raw/`."""

    download: bool = True
    """Fetch the dataset when its files are absent."""

    save_dir: Path = Path("save")
    """One run's outputs: `plots/`, `models/`, `metrics.json`, `logs/`."""

    device: str = "auto"
    """`auto` (cuda, then mps, then cpu) or any torch device string (`cpu`, `cuda:1`)."""

    eval_batch_size: int = 500
    """Images per forward pass during evaluation."""

    threads: int = 0
    """CPU threads of torch's operators; 0: `OMP_NUM_THREADS` if set, else half the CPUs."""

    probe_size: int = 10
    """Fixed validation images for saliency/attributions, one per class."""

    confusion_normalize: bool = False
    """Row-normalise the confusion matrix (diagonal = recall)."""

    projection_limit: int = 2000
    """At most this many points in the projector and the t-SNE."""

    attribution_checks: bool = True
    """Compare attribution methods and sanity-check them."""

    resume: bool = False
    """Continue the run in save_dir from its last completed epoch."""

    run_name: str | None = None
    """TensorBoard run folder under save_dir/logs; None: a timestamp."""

    dist_timeout: float = 1800.0
    """Seconds a torchrun process waits for the others, then fails."""

    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form, recorded in run.json."""

    check_size: int = 100
    """Held-out images (stratified by class, the same every epoch) the attribution checks
    run on; all of them when the held-out set is smaller."""

    def __post_init__(self) -> None:
        """Reject values that cannot describe a run, naming the field and its option.

        The one place settings are validated: `runner.py` turns the `ValueError` into exit 2.
        """
        problems = [
            f"{name} (--{name.replace('_', '-')}) {problem}" for name, problem in self._problems()
        ]
        if problems:
            raise ValueError("; ".join(problems))
        object.__setattr__(self, "data_dir", Path(self.data_dir))
        object.__setattr__(self, "save_dir", Path(self.save_dir))

    def _problems(self) -> list[tuple[str, str]]:
        problems: list[tuple[str, str]] = []
        for name in ("epochs", "batch_size", "eval_batch_size", "probe_size", "check_size"):
            value = getattr(self, name)
            if value < 1:
                problems.append((name, f"must be at least 1, got {value}"))
        for name in ("threads", "projection_limit"):
            value = getattr(self, name)
            if value < 0:
                problems.append((name, f"must be at least 0, got {value}"))
        for name in ("lr", "dist_timeout"):  # `not 0 < x < inf` also rejects NaN
            value = getattr(self, name)
            if not 0 < value < math.inf:
                problems.append((name, f"must be a positive number, got {value}"))
        if not 0 <= self.weight_decay < math.inf:
            problems.append(
                ("weight_decay", f"must be a non-negative number, got {self.weight_decay}")
            )
        if not 0 <= self.label_smoothing < 1:
            problems.append(("label_smoothing", f"must be in [0, 1), got {self.label_smoothing}"))
        if not 0 <= self.seed < 2**63:  # torch.manual_seed's range
            problems.append(("seed", f"must be in [0, 2**63), got {self.seed}"))
        if self.run_name is not None and (
            self.run_name in ("", ".", "..") or any(c in self.run_name for c in "/\\\0")
        ):
            problems.append(("run_name", f"must be a plain folder name, got {self.run_name!r}"))
        return problems

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready view: paths become strings.

        Returns:
            Every field by name (a new dict; `extra` deep-copied).
        """
        out = dataclasses.asdict(self)
        for key, value in out.items():
            if isinstance(value, Path):
                out[key] = str(value)
        return out
