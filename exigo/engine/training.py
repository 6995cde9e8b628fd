r"""One training epoch and one evaluation pass; both return values and never print or write.

Training minimises the mean cross-entropy of a batch,
$\mathcal{L} = -\frac{1}{B} \sum_i \log \mathrm{softmax}(f(x_i))_{y_i}$.
Evaluation runs the model over the validation set once and keeps everything the analyses need
(predictions, probabilities, embeddings), so no analysis runs the model over that set again.
Progress is reported through an `on_batch(n_images)` callback; the pipeline draws the bar.

The training pass also records, for every example it sees, how the model treated the example's
given label $y$ at that moment (`TrainingDynamics`): the probability
$p_y = \mathrm{softmax}(f(x))_y$ and the margin $f(x)_y - \max_{k \ne y} f(x)_k$, read from the
logits of the very forward pass that trains (train mode: dropout, BatchNorm batch statistics and
any augmentation of the dataset are on), so the record costs a few element-wise operations per
batch and no extra pass over the data.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset, IterableDataset

from exigo._modes import evaluation_mode
from exigo.data import iterate_batches
from exigo.models import embedding_module

__all__ = [
    "DivergenceError",
    "EvalResult",
    "TrainResult",
    "TrainingDynamics",
    "evaluate",
    "given_label_scores",
    "train_epoch",
]

BatchCallback = Callable[[int], None]


class DivergenceError(RuntimeError):
    """The training loss became NaN or infinite."""


def given_label_scores(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    r"""How each row's logits treat its given label: probability, margin and strongest rival.

    $$ p_y = \mathrm{softmax}(z)_y, \qquad m = z_y - \max_{k \ne y} z_k, \qquad
       r = \operatorname{argmax}_{k \ne y} z_k $$

    The margin is positive exactly when the given label wins. Log-probabilities give the same
    probability and margin as the logits they came from (softmax ignores a shift per row).

    Args:
        logits: float tensor [B, K], K >= 2 (logits or log-probabilities).
        labels: int64 tensor [B], the given labels, on the same device.

    Returns:
        `(probabilities, margins, runner_up)`: float32 [B], float32 [B], int64 [B].
    """
    logits = logits.detach().float()
    given = logits.gather(1, labels[:, None]).squeeze(1)
    rivals = logits.scatter(1, labels[:, None], -math.inf)
    strongest, runner_up = rivals.max(1)
    return (given - logits.logsumexp(1)).exp(), given - strongest, runner_up


@dataclass(frozen=True)
class TrainingDynamics:
    r"""Each training example as the epoch's training forward pass saw it, by dataset position.

    Row $i$ describes `dataset[i]`, whatever the shuffling order; rows of examples this process
    did not see (another torchrun process' shard, before rank 0 gathers them) are empty. Values
    come from the logits of the training step that took the example, before that step's update,
    in train mode (see `given_label_scores`).

    Attributes:
        labels: int64 [N], the given label $y_i$; -1 where not seen.
        probabilities: float32 [N], $\mathrm{softmax}(f(x_i))_{y_i}$; NaN where not seen.
        margins: float32 [N], $f(x_i)_{y_i} - \max_{k \ne y_i} f(x_i)_k$; NaN where not seen.
        runner_up: int64 [N], $\operatorname{argmax}_{k \ne y_i} f(x_i)_k$; -1 where not seen.
    """

    labels: Tensor
    probabilities: Tensor
    margins: Tensor
    runner_up: Tensor

    @classmethod
    def empty(cls, size: int, device: torch.device | str = "cpu") -> TrainingDynamics:
        """A record of `size` examples, none seen yet.

        Args:
            size: N, the dataset's length.
            device: where the record is filled.

        Returns:
            Labels and rivals -1, probabilities and margins NaN.
        """
        return cls(
            labels=torch.full((size,), -1, dtype=torch.long, device=device),
            probabilities=torch.full((size,), math.nan, device=device),
            margins=torch.full((size,), math.nan, device=device),
            runner_up=torch.full((size,), -1, dtype=torch.long, device=device),
        )

    def record(self, positions: Tensor, logits: Tensor, labels: Tensor) -> None:
        """Write one batch into its rows (on the device, no host synchronisation).

        Args:
            positions: int64 [B], the batch's dataset positions, on the record's device.
            logits: float [B, K], the training forward pass' output.
            labels: int64 [B], the batch's given labels.
        """
        probabilities, margins, runner_up = given_label_scores(logits, labels)
        self.labels.index_copy_(0, positions, labels)
        self.probabilities.index_copy_(0, positions, probabilities)
        self.margins.index_copy_(0, positions, margins)
        self.runner_up.index_copy_(0, positions, runner_up)

    @property
    def seen(self) -> Tensor:
        """Bool [N]: the examples recorded."""
        return self.labels >= 0

    @property
    def predictions(self) -> Tensor:
        """Int64 [N]: the class the training pass predicted (-1 where not seen)."""
        return torch.where(self.margins > 0, self.labels, self.runner_up)

    def cpu(self) -> TrainingDynamics:
        """The same record on the CPU.

        Returns:
            A copy on the CPU (this record itself when it is there).
        """
        return TrainingDynamics(*(tensor.cpu() for tensor in dataclasses.astuple(self)))


@dataclass(frozen=True)
class TrainResult:
    """What one training epoch did.

    Attributes:
        loss: mean cross-entropy over the epoch's images.
        accuracy: fraction of the epoch's images classified correctly while training (the
            model changes during the epoch, so this lags the evaluation accuracy).
        seconds: wall-clock duration.
        images: number of images seen.
        dynamics: every example's given-label probability and margin in this epoch's training
            pass, on the CPU (whole on rank 0 under torchrun); None when not recorded (an
            `IterableDataset` has no dataset positions, or `record_examples=False`).
    """

    loss: float
    accuracy: float
    seconds: float
    images: int
    dynamics: TrainingDynamics | None = None

    @property
    def images_per_second(self) -> float:
        """Training throughput."""
        return self.images / self.seconds if self.seconds > 0 else float("nan")


@dataclass(frozen=True)
class EvalResult:
    """One pass of the model over a validation set, in dataset order, on the CPU.

    Attributes:
        loss: mean cross-entropy.
        accuracy: fraction classified correctly.
        predictions: int64 [N], argmax of the logits.
        targets: int64 [N], true labels.
        probabilities: float32 [N, C], softmax of the logits.
        embeddings: float32 [N, D], the input of the model's classifier layer.
        seconds: wall-clock duration.
    """

    loss: float
    accuracy: float
    predictions: Tensor
    targets: Tensor
    probabilities: Tensor
    embeddings: Tensor
    seconds: float

    @property
    def num_classes(self) -> int:
        """C, the number of logits."""
        return self.probabilities.shape[1]


def train_epoch(
    model: nn.Module,
    dataset: Dataset,
    indices: Sequence[int] | Tensor,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    *,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    label_smoothing: float = 0.0,
    on_batch: BatchCallback | None = None,
    record_examples: bool = True,
) -> TrainResult:
    r"""Train `model` for one pass over `dataset[indices]`.

    The loss and accuracy are summed on the device and read once at the end, so the loop
    makes no host synchronisation per step; so is the per-example record (`TrainingDynamics`),
    filled by position on the device and copied to the CPU once.

    Args:
        model: classifier mapping [B, C, H, W] to logits [B, K]; left in train mode.
        dataset: training images and labels.
        indices: order in which to visit the dataset (a permutation for shuffling).
        optimizer: updates the model's parameters.
        scheduler: stepped after every batch (for per-step schedules such as OneCycleLR).
        batch_size: images per optimizer step.
        device: where the model lives.
        label_smoothing: weight $\varepsilon$ of the uniform target mixed into the one-hot
            target (the reported loss includes it).
        on_batch: called with the number of images after each step.
        record_examples: record every example's given-label probability and margin
            (`TrainResult.dynamics`); ignored for an `IterableDataset`, which has no positions.

    Returns:
        The epoch's `TrainResult`.

    Raises:
        DivergenceError: the loss is NaN or infinite at the end of the epoch.
    """
    start = time.perf_counter()
    model.train()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    order = torch.as_tensor(indices, dtype=torch.long)
    dynamics = None
    if record_examples and not isinstance(dataset, IterableDataset):
        dynamics = TrainingDynamics.empty(len(dataset), device)
    positions = order.to(device, non_blocking=True).split(batch_size)
    for step, (images, labels) in enumerate(iterate_batches(dataset, order, batch_size)):
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        logits = model(images)
        if dynamics is not None:
            dynamics.record(positions[step], logits, labels)
        loss = F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        loss_sum += loss.detach() * labels.shape[0]
        correct += (logits.detach().argmax(1) == labels).sum()
        seen += labels.shape[0]
        if on_batch is not None:
            on_batch(labels.shape[0])
    mean_loss = loss_sum.item() / max(seen, 1)
    if not math.isfinite(mean_loss):
        raise DivergenceError(
            f"training loss became {mean_loss}; the learning rate is probably too high "
            "(try a smaller --lr)"
        )
    recorded = None if dynamics is None else dynamics.cpu()
    return TrainResult(
        loss=mean_loss,
        accuracy=correct.item() / max(seen, 1),
        seconds=time.perf_counter() - start,
        images=seen,
        dynamics=recorded,
    )


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: Dataset,
    *,
    batch_size: int = 500,
    device: torch.device | str = "cpu",
    on_batch: BatchCallback | None = None,
    indices: Sequence[int] | Tensor | None = None,
) -> EvalResult:
    """Run `model` over all of `dataset` once, in order, in eval mode.

    The embedding is captured by a forward pre-hook on the model's classifier layer
    (`exigo.models.embedding_module`); the hook is removed before returning and the model's
    train/eval mode is restored.

    Args:
        model: classifier mapping [B, C, H, W] to logits [B, K].
        dataset: validation images and labels.
        batch_size: images per forward pass.
        device: where the model lives.
        on_batch: called with the number of images after each forward pass.
        indices: evaluate only these images, in this order (the result's rows follow it);
            default: all of `dataset`.

    Returns:
        The `EvalResult`, with every tensor on the CPU.
    """
    start = time.perf_counter()
    captured: list[Tensor] = []

    def keep_embedding(_module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
        captured.append(inputs[0].detach().flatten(1))

    with evaluation_mode(model):  # every submodule gets its own mode back
        handle = embedding_module(model).register_forward_pre_hook(keep_embedding)
        logits_parts, target_parts = [], []
        try:
            order = range(len(dataset)) if indices is None else indices
            for images, labels in iterate_batches(dataset, order, batch_size):
                logits_parts.append(model(images.to(device, non_blocking=True)).float())
                target_parts.append(labels)
                if on_batch is not None:
                    on_batch(labels.shape[0])
        finally:
            handle.remove()
    if not logits_parts:
        raise ValueError("cannot evaluate on an empty dataset")
    logits = torch.cat(logits_parts).cpu()
    targets = torch.cat(target_parts).long()
    embeddings = torch.cat(captured).float().cpu()
    loss = F.cross_entropy(logits, targets).item()
    predictions = logits.argmax(1)
    return EvalResult(
        loss=loss,
        accuracy=(predictions == targets).float().mean().item(),
        predictions=predictions,
        targets=targets,
        probabilities=logits.softmax(1),
        embeddings=embeddings,
        seconds=time.perf_counter() - start,
    )
