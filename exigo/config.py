"""The run's configuration: one frozen dataclass that the CLI fills and the pipeline reads.

Every field has a default that reproduces `python runner.py`; every field is documented with
its unit. The configuration is saved next to the run's outputs (`run.json`) so a run can be
reproduced from its folder alone.
"""

from __future__ import annotations

import dataclasses
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

    def __post_init__(self) -> None:
        """Reject values that cannot describe a run, naming the field."""
        problems = []
        if self.epochs < 1:
            problems.append(f"epochs must be at least 1, got {self.epochs}")
        if self.batch_size < 1:
            problems.append(f"batch_size must be at least 1, got {self.batch_size}")
        if self.eval_batch_size < 1:
            problems.append(f"eval_batch_size must be at least 1, got {self.eval_batch_size}")
        if not self.lr > 0:  # also rejects NaN
            problems.append(f"lr must be positive, got {self.lr}")
        if not self.weight_decay >= 0:
            problems.append(f"weight_decay must be non-negative, got {self.weight_decay}")
        if not 0 <= self.label_smoothing < 1:
            problems.append(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.threads < 0:
            problems.append(f"threads must be non-negative, got {self.threads}")
        if self.probe_size < 1:
            problems.append(f"probe_size must be at least 1, got {self.probe_size}")
        if self.projection_limit < 0:
            problems.append(f"projection_limit must be non-negative, got {self.projection_limit}")
        if not 0 < self.dist_timeout < float("inf"):  # also rejects NaN
            problems.append(f"dist_timeout must be a positive number, got {self.dist_timeout}")
        if problems:
            raise ValueError("; ".join(problems))
        object.__setattr__(self, "data_dir", Path(self.data_dir))
        object.__setattr__(self, "save_dir", Path(self.save_dir))

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
