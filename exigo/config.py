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

__all__ = ["DATASETS", "Config"]

#: The `--dataset` names (`exigo.data.load_dataset` loads each). Kept here, not in
#: `exigo.data`, so that validating a Config imports neither torch nor torchvision.
DATASETS = ("mnist", "fashion-mnist", "kmnist", "cifar10", "cifar100", "svhn", "imagefolder")


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
    """Seeds model init, shuffling and every analysis' randomness; in [0, 2**63) (torch's
    range; the t-SNE, whose libraries take [0, 2**32), uses it mod 2**32)."""

    data_dir: Path = Path("save/data")
    """A torchvision root holding the dataset's files (`MNIST/raw/`, `cifar-10-batches-py/`,
    ...), or the image folder of `--dataset imagefolder`."""

    download: bool = True
    """Fetch the dataset when its files are absent."""

    save_dir: Path = Path("save")
    """One run's outputs: `plots/`, `models/`, `metrics.json`, `logs/`."""

    device: str = "auto"
    """`auto` (cuda, then mps, then cpu) or any torch device string (`cpu`, `cuda:1`)."""

    eval_batch_size: int = 500
    """Images per forward pass during evaluation."""

    threads: int = 0
    """CPU threads of torch's operators; 0: `OMP_NUM_THREADS` if set, else half the CPUs
    (on `resume`: the run's own count, recorded in `models/last.pt`)."""

    probe_size: int = 10
    """Fixed validation images for saliency/attributions, one per class."""

    confusion_normalize: bool = False
    """Row-normalise the confusion matrix (diagonal = recall)."""

    projection_limit: int = 2000
    """At most this many points in the projector and the t-SNE."""

    attribution_checks: bool = True
    """Compare attribution methods and sanity-check them."""

    rescore_fraction: float = 0.2
    """The suspected label errors of the training set that the end-of-epoch model re-scores,
    at most this share of it (`exigo.analyses.examples`); 0: rank by the training records."""

    rescore_every_epoch: bool = False
    """Re-score the suspects and take the held-out votes after every epoch, not only after the
    last (the final list is the same; the earlier ones then cost as much as the last)."""

    resume: bool = False
    """Continue the run in save_dir from its last completed epoch."""

    run_name: str | None = None
    """TensorBoard run folder under save_dir/logs; None: a timestamp."""

    dist_timeout: float = 1800.0
    """Seconds a torchrun process waits for the others, then fails."""

    sequential: bool = False
    """Analyse each epoch before the next one trains (default: beside it, on rank 0, with 2+
    CPUs); for debugging and benchmarks: the results are the same either way."""

    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form, recorded in run.json."""

    force: bool = False
    """With `resume`: continue with a `threads` other than the run's, although the metrics
    then differ from an uninterrupted run's."""

    dataset: str = "mnist"
    """One of `DATASETS`; `imagefolder` reads `data_dir` as a folder of class sub-folders."""

    val_fraction: float = 0.2
    """Share of each class an image folder without `val/` holds out, in (0, 1); seeded."""

    model: str | None = None
    """A torchvision classification architecture (`resnet18`); None: the default model for
    the input shape (`exigo.models.default_model`)."""

    pretrained: bool = False
    """Start `model` from torchvision's default weights (downloaded to torch's hub cache)."""

    embedding_layer: str | None = None
    """Name of the module whose input is the embedding (`head.3`); None: the input of the
    model's `classifier`, else of its last `nn.Linear`."""

    analysis_budget: float = 1.0
    """Model passes the analyses may make per epoch, as a multiple of the epoch's training
    passes (forward-backward passes per image); above it, exigo lowers their settings or
    runs them every k epochs, and says so. 0: no limit."""

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
        for name in ("epochs", "batch_size", "eval_batch_size", "probe_size"):
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
        if self.dataset not in DATASETS:
            problems.append(
                ("dataset", f"must be one of {', '.join(DATASETS)}, got {self.dataset!r}")
            )
        if not 0 < self.val_fraction < 1:
            problems.append(("val_fraction", f"must be in (0, 1), got {self.val_fraction}"))
        if not 0 <= self.rescore_fraction <= 1:  # also rejects NaN
            problems.append(("rescore_fraction", f"must be in [0, 1], got {self.rescore_fraction}"))
        if not 0 <= self.analysis_budget < math.inf:
            problems.append(
                ("analysis_budget", f"must be a non-negative number, got {self.analysis_budget}")
            )
        if self.pretrained and self.model is None:
            problems.append(
                ("pretrained", "needs --model: torchvision's weights exist for its architectures")
            )
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
