r"""One training epoch and one evaluation pass; both return values and never print or write.

Training minimises the mean cross-entropy of a batch,
$\mathcal{L} = -\frac{1}{B} \sum_i \log \mathrm{softmax}(f(x_i))_{y_i}$.
Evaluation runs the model over the validation set once and keeps everything the analyses need
(predictions, probabilities, embeddings), so no analysis runs the model over that set again.
Progress is reported through an `on_batch(n_images)` callback; the pipeline draws the bar.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from exigo._modes import evaluation_mode
from exigo.data import iterate_batches
from exigo.models import embedding_module

__all__ = ["DivergenceError", "EvalResult", "TrainResult", "evaluate", "train_epoch"]

BatchCallback = Callable[[int], None]


class DivergenceError(RuntimeError):
    """The training loss became NaN or infinite."""


@dataclass(frozen=True)
class TrainResult:
    """What one training epoch did.

    Attributes:
        loss: mean cross-entropy over the epoch's images.
        accuracy: fraction of the epoch's images classified correctly while training (the
            model changes during the epoch, so this lags the evaluation accuracy).
        seconds: wall-clock duration.
        images: number of images seen.
    """

    loss: float
    accuracy: float
    seconds: float
    images: int

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
) -> TrainResult:
    r"""Train `model` for one pass over `dataset[indices]`.

    The loss and accuracy are summed on the device and read once at the end, so the loop
    makes no host synchronisation per step.

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
    for images, labels in iterate_batches(dataset, indices, batch_size):
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        logits = model(images)
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
    return TrainResult(
        loss=mean_loss,
        accuracy=correct.item() / max(seen, 1),
        seconds=time.perf_counter() - start,
        images=seen,
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
