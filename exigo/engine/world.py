r"""Several processes, one run: torchrun, DistributedDataParallel, evaluation gathered to rank 0.

`torchrun --nproc_per_node=W runner.py ...` starts W processes and tells each its place through
environment variables (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`).
`join()` reads them and opens the process group: NCCL when the processes train on CUDA
(process `LOCAL_RANK` on `cuda:LOCAL_RANK`), Gloo on the CPU. Without torchrun (or with
`WORLD_SIZE=1`) there is no process group and exigo runs exactly as a single process.

Training is PyTorch's DistributedDataParallel (DDP): every process holds the same model, takes
its own shard of each epoch's shuffled training set (`torch.utils.data.DistributedSampler`,
re-shuffled per epoch by `set_epoch`) in batches of `--batch-size` images, and the gradients are
averaged across the W processes before every optimizer step,

$$ g = \frac{1}{W} \sum_{r=0}^{W-1} \nabla_\theta \frac{1}{B} \sum_{i \in \mathcal{B}_r}
\ell(f_\theta(x_i), y_i), $$

so one step sees $W \cdot B$ images and all copies of the model stay identical.

Evaluation is split too: process $r$ evaluates the images $r, r + W, r + 2W, \dots$ (no padding,
so no image counts twice), the loss and accuracy are summed over processes,

$$ \bar\ell = \frac{\sum_r n_r \, \bar\ell_r}{\sum_r n_r}, \qquad
\mathrm{acc} = \frac{\sum_r c_r}{\sum_r n_r}, $$

and the predictions, targets, probabilities and embeddings are gathered to rank 0 in dataset
order. The result equals a single-process `exigo.engine.training.evaluate` of the same model
(the loss up to float rounding of the split sum).

Each process also records its own training examples' given-label probability and margin
(`exigo.engine.training.TrainingDynamics`); after the epoch, `gather_dynamics` sends the rows
each one saw to rank 0, which puts them at their dataset positions. The `DistributedSampler`
pads the last shards with a few examples seen elsewhere too; such an example keeps the record
of the lowest rank that saw it.

Every collective runs under the process group's timeout: a process that crashed, hangs or waits
longer than `--dist-timeout` for the others makes the collective fail with a `DistributedError`
that says so, instead of a silent hang.

Reference: S. Li et al., "PyTorch Distributed: Experiences on Accelerating Data Parallel
Training", VLDB 2020 (arXiv:2006.15704).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset, DistributedSampler

from exigo.engine.devices import (  # the last four re-exported: their import path before the split
    resolve_device,
    set_threads,
    threads_for,
    torch_threads,
    usable_devices,
)
from exigo.engine.signals import RunInterrupted, StopSignals
from exigo.engine.training import (
    DivergenceError,
    EvalResult,
    TrainingDynamics,
    TrainResult,
    evaluate,
)

__all__ = [
    "DEFAULT_TIMEOUT",
    "STOP_CHECK_BATCHES",
    "DistributedError",
    "Torchrun",
    "World",
    "all_or_none",
    "broadcast_buffers",
    "current",
    "evaluate_sharded",
    "evaluation_shard",
    "gather_dynamics",
    "interleave_shards",
    "is_main",
    "join",
    "launched_by_torchrun",
    "leave",
    "open_world",
    "process_group",
    "reduce_train_result",
    "resolve_device",
    "set_threads",
    "threads_for",
    "torch_threads",
    "training_indices",
    "usable_devices",
    "wrap",
]

#: Seconds a process waits for the others at a collective before it gives up (`--dist-timeout`).
DEFAULT_TIMEOUT = 1800.0


#: Under torchrun the processes agree whether a signal stops them every this many training
#: batches: often enough to stop within seconds, rarely enough to cost no measurable time.
STOP_CHECK_BATCHES = 10


class DistributedError(RuntimeError):
    """A collective failed: another process crashed, stopped, or did not answer in time."""


class World:
    """The processes of a run, seen from one of them: here a single process (no-op collectives).

    The pipeline's epoch loop calls the same methods whatever the launch: `Torchrun` (a
    subclass) shares the work out among torchrun's processes, this class runs it all here.

    Args:
        device: where this process trains.

    Attributes:
        rank: 0 ... world_size - 1; rank 0 writes every output.
        world_size: W, the number of processes.
        local_rank: index of this process on its machine.
        backend: the collective backend ("nccl", "gloo"), or None for a single process.
        device: where this process trains.
        timeout: seconds a collective waits for the other processes.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    timeout: float = DEFAULT_TIMEOUT

    def __init__(self, device: torch.device) -> None:
        self.device = device

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0, the process that writes."""
        return self.rank == 0

    def describe(self) -> dict[str, Any] | None:
        """What run.json records of the processes.

        Returns:
            None for a single process.
        """
        return None

    @contextmanager
    def collective(self, what: str) -> Iterator[None]:
        """A block of collectives; their failure becomes a `DistributedError` saying `what`.

        Args:
            what: what the processes were doing, for the message ("evaluating").

        Yields:
            None; the block runs once.
        """
        yield

    @contextmanager
    def all_or_none(self, what: str) -> Iterator[None]:
        """A block that may fail on some processes only: if it fails on one, it fails on all.

        Each process runs the block, then all agree whether every one succeeded (one
        collective). The process whose block raised re-raises its own error; the others raise
        `DistributedError` instead of waiting at their next collective for a process that
        left. A single process just runs the block.

        Args:
            what: what the block does, for the others' message ("starting the run").

        Yields:
            None; the block runs once on every process.
        """
        with all_or_none(self if self.world_size > 1 else None, what):  # type: ignore[arg-type]
            yield

    def all_ok(self, ok: bool) -> bool:
        """Whether every process passes `ok=True`: one failing process tells all the others.

        Args:
            ok: whether this process succeeded.

        Returns:
            True on every process when all passed True.
        """
        return ok

    def agree_on_signal(self, signal_number: int | None) -> int | None:
        """The signal any process received, or None: all processes learn the same.

        Args:
            signal_number: the signal this process received, or None.

        Returns:
            The same signal number, or None, on every process.
        """
        return signal_number

    def broadcast_object(self, value: Any) -> Any:
        """Rank 0's `value` on every process.

        Args:
            value: any picklable object on rank 0; ignored on the other ranks.

        Returns:
            Rank 0's `value`.
        """
        return value

    def samples_per_epoch(self, dataset_size: int) -> int:
        """Training images this process sees per epoch.

        Args:
            dataset_size: N.

        Returns:
            N.
        """
        return dataset_size

    def training_order(
        self, dataset: Dataset, epoch: int, seed: int, generator: torch.Generator
    ) -> Tensor:
        """The epoch's shuffled order of this process' training images.

        Args:
            dataset: the training set (only its length is used).
            epoch: 1-based epoch.
            seed: the run's seed.
            generator: the run's shuffling generator (saved with `--resume` state).

        Returns:
            int64 tensor of indices into `dataset`.
        """
        return torch.randperm(len(dataset), generator=generator)

    def prepare(self, model: nn.Module) -> nn.Module:
        """The module to train through.

        Args:
            model: the model, on this process' device.

        Returns:
            The model itself, for a single process.
        """
        return model

    def train_epoch(
        self,
        trainer: nn.Module,
        model: nn.Module,
        one_pass: Callable[[nn.Module], TrainResult],
        images: int,
    ) -> TrainResult:
        """`one_pass(trainer)`: one epoch over this process' images, as all processes saw it.

        Args:
            trainer: what `prepare` returned.
            model: the model itself.
            one_pass: trains one epoch through the module it is given.
            images: images in this process' epoch.

        Returns:
            The epoch's `TrainResult` over every process' images.
        """
        return one_pass(trainer)

    def evaluate(
        self,
        model: nn.Module,
        dataset: Dataset,
        *,
        batch_size: int,
        on_batch: Callable[[int], None] | None = None,
    ) -> EvalResult:
        """The evaluation pass over `dataset` (see `exigo.engine.training.evaluate`).

        Args:
            model: the model itself.
            dataset: the validation set.
            batch_size: images per forward pass.
            on_batch: called with the number of images after each forward pass.

        Returns:
            The whole `EvalResult` on rank 0.
        """
        return evaluate(
            model, dataset, batch_size=batch_size, device=self.device, on_batch=on_batch
        )

    def evaluation_size(self, dataset_size: int) -> int:
        """Images this process evaluates.

        Args:
            dataset_size: N.

        Returns:
            N.
        """
        return dataset_size

    def stop_point(self, stop: StopSignals, batches: int, *, training: bool) -> None:
        """After every batch: stop here if a signal asked to (a single process checks each).

        Args:
            stop: this process' signal flag.
            batches: batches done so far in this pass.
            training: whether this is a training pass.

        Raises:
            RunInterrupted: a signal arrived.
        """
        stop.check()

    def tell_stop(self, signal_number: int) -> None:
        """Tell the others that rank 0 stops outside `stop_together` (in its analyses).

        Nothing to tell for a single process.

        Args:
            signal_number: the signal that stops rank 0.
        """

    def stop_together(self, stop: StopSignals) -> None:
        """Every process stops here if any one received a signal.

        Args:
            stop: this process' signal flag.

        Raises:
            RunInterrupted: a signal reached this process or another.
        """
        signal_number = self.agree_on_signal(stop.received)
        if signal_number is not None:
            raise RunInterrupted(signal_number)


class Torchrun(World):
    """This process' place among the processes of a torchrun run: the collectives are real.

    Args:
        rank: 0 ... world_size - 1; rank 0 writes every output.
        world_size: W, the number of processes (all machines together).
        local_rank: index of this process on its machine (its GPU index under CUDA).
        backend: "nccl" (CUDA) or "gloo" (CPU).
        device: where this process trains: `cuda:LOCAL_RANK` or the CPU.
        timeout: seconds a collective waits for the other processes.
    """

    def __init__(
        self,
        *,
        rank: int,
        world_size: int,
        local_rank: int,
        backend: str,
        device: torch.device,
        timeout: float,
    ) -> None:
        super().__init__(device)
        self.rank = rank
        self.world_size = world_size
        self.local_rank = local_rank
        self.backend = backend
        self.timeout = timeout

    @contextmanager
    def collective(self, what: str) -> Iterator[None]:
        """Turn a failed collective inside the block into a `DistributedError` that says why.

        Gloo reports a lost peer or a timeout as a bare `RuntimeError`, NCCL as a
        `torch.distributed.DistError`; exigo's own exceptions (subclasses) pass unchanged.

        Args:
            what: what the processes were doing, for the message ("evaluating").

        Yields:
            None; the block runs once.
        """
        try:
            yield
        except (RuntimeError, dist.DistError) as error:
            if type(error) is not RuntimeError and not isinstance(error, dist.DistError):
                raise
            reason = " ".join(str(error).split())[:400]
            raise DistributedError(
                f"rank {self.rank} of {self.world_size}: {what} failed, {reason}. Another "
                "process probably crashed, was stopped, or did not reach the same point within "
                f"--dist-timeout {self.timeout:g} s: its own error, named in torchrun's summary, "
                "is the cause (raise --dist-timeout if rank 0's analyses take that long)"
            ) from error

    def describe(self) -> dict[str, Any] | None:
        """What run.json records of the processes.

        Returns:
            `{"world_size": W, "backend": ...}`.
        """
        return {"world_size": self.world_size, "backend": self.backend}

    def samples_per_epoch(self, dataset_size: int) -> int:
        """Training images this process sees per epoch: a `DistributedSampler` gives ceil(N / W).

        Args:
            dataset_size: N.

        Returns:
            ceil(N / W).
        """
        return -(-dataset_size // self.world_size)

    def training_order(
        self, dataset: Dataset, epoch: int, seed: int, generator: torch.Generator
    ) -> Tensor:
        """This process' shard, re-shuffled every epoch (`DistributedSampler.set_epoch`).

        Args:
            dataset: the training set (only its length is used).
            epoch: 1-based epoch.
            seed: the run's seed: every process draws the same permutation.
            generator: unused: the permutation depends on `seed` and `epoch` only.

        Returns:
            int64 tensor [ceil(N / W)] of indices into `dataset`.
        """
        return training_indices(dataset, epoch, seed, self.rank, self.world_size)

    def prepare(self, model: nn.Module) -> nn.Module:
        """`model` in DistributedDataParallel (rank 0's weights copied to every process).

        Args:
            model: the model, on this process' device.

        Returns:
            The wrapper to train through.
        """
        with self.collective("wrapping the model in DistributedDataParallel"):
            return wrap(model, self)

    def train_epoch(
        self,
        trainer: nn.Module,
        model: nn.Module,
        one_pass: Callable[[nn.Module], TrainResult],
        images: int,
    ) -> TrainResult:
        """`one_pass(trainer)` on this shard, summed over the processes; NaN anywhere stops all.

        Args:
            trainer: the DDP wrapper `prepare` returned.
            model: the model itself: rank 0's BatchNorm statistics are copied into it after.
            one_pass: trains one epoch through the module it is given.
            images: images in this process' shard.

        Returns:
            The epoch's `TrainResult` over every process' images; on rank 0 its `dynamics`
            hold every process' examples (`gather_dynamics`).

        Raises:
            DivergenceError: the loss became NaN or infinite on any process.
        """
        diverged: str | None = None
        try:
            with self.collective("training (DistributedDataParallel)"):
                trained = one_pass(trainer)
        except DivergenceError as error:  # found on this shard: the others must hear of it
            diverged = str(error)
            trained = TrainResult(loss=math.nan, accuracy=math.nan, seconds=0.0, images=images)
        trained = reduce_train_result(trained, self)  # NaN anywhere: NaN everywhere
        if not math.isfinite(trained.loss):
            raise DivergenceError(
                diverged
                or f"training loss became {trained.loss} in another process; the learning "
                "rate is probably too high (try a smaller --lr)"
            )
        if trained.dynamics is not None:  # every process records, or none (same data, analyses)
            trained = dataclasses.replace(trained, dynamics=gather_dynamics(trained.dynamics, self))
        broadcast_buffers(model, self)  # evaluate the BatchNorm statistics rank 0 saves
        return trained

    def evaluate(
        self,
        model: nn.Module,
        dataset: Dataset,
        *,
        batch_size: int,
        on_batch: Callable[[int], None] | None = None,
    ) -> EvalResult:
        """Each process evaluates its shard; rank 0 receives the whole `EvalResult`.

        Args:
            model: the model itself, not its DDP wrapper (shards differ in batch count).
            dataset: the validation set.
            batch_size: images per forward pass.
            on_batch: called with the number of images after each forward pass.

        Returns:
            See `evaluate_sharded`.
        """
        return evaluate_sharded(
            model, dataset, self, batch_size=batch_size, device=self.device, on_batch=on_batch
        )

    def evaluation_size(self, dataset_size: int) -> int:
        """Images this process evaluates.

        Args:
            dataset_size: N.

        Returns:
            The size of this process' evaluation shard.
        """
        return len(range(self.rank, dataset_size, self.world_size))

    def stop_point(self, stop: StopSignals, batches: int, *, training: bool) -> None:
        """The processes decide together every `STOP_CHECK_BATCHES` training batches.

        Their training shards have equal batch counts; evaluation shards may differ by one
        batch, so evaluation leaves the decision to the end of the epoch (`stop_together`).

        Args:
            stop: this process' signal flag.
            batches: batches done so far in this pass.
            training: whether this is a training pass.
        """
        if training and batches % STOP_CHECK_BATCHES == 0:
            self.stop_together(stop)

    def tell_stop(self, signal_number: int) -> None:
        """Tell the others that rank 0 stops outside `stop_together` (in its analyses).

        They wait in `stop_together` and learn of it there.

        Args:
            signal_number: the signal that stops rank 0.
        """
        with suppress(DistributedError):  # the others may have left already
            self.agree_on_signal(signal_number)

    def _tensor(self, values: Sequence[float], dtype: torch.dtype) -> Tensor:
        # NCCL reduces tensors on the GPU only; Gloo on the CPU
        return torch.tensor(values, dtype=dtype, device=self.device)

    def agree_on_signal(self, signal_number: int | None) -> int | None:
        """The signal any process received (the largest number), or None: all learn the same.

        Args:
            signal_number: the signal this process received, or None.

        Returns:
            The same signal number, or None, on every process.
        """
        flag = self._tensor([signal_number or 0], torch.int64)
        with self.collective("agreeing whether to stop"):
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item()) or None

    def all_ok(self, ok: bool) -> bool:
        """Whether every process passes `ok=True`: one failing process tells all the others.

        Args:
            ok: whether this process succeeded.

        Returns:
            True on every process when all passed True, else False on every process.
        """
        flag = self._tensor([1 if ok else 0], torch.int64)
        with self.collective("checking that every process is ready"):
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def broadcast_object(self, value: Any) -> Any:
        """Rank 0's `value` on every process (pickled; other ranks pass anything, e.g. None).

        Args:
            value: any picklable object on rank 0; ignored on the other ranks.

        Returns:
            Rank 0's `value` (a copy on the other ranks).
        """
        box = [value]
        with self.collective("receiving rank 0's state"):
            dist.broadcast_object_list(box, src=0, device=self.device)
        return box[0]


_WORLD: Torchrun | None = None  # the process group join() opened, or None


def launched_by_torchrun() -> bool:
    """Whether the environment asks for more than one process (`WORLD_SIZE` > 1).

    Returns:
        True under torchrun with more than one process.
    """
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_main() -> bool:
    """Whether this process writes: always without torchrun, else rank 0 (before `join()` too).

    Returns:
        True on the process that writes files, logs and figures.
    """
    if _WORLD is not None:
        return _WORLD.is_main
    return not launched_by_torchrun() or int(os.environ.get("RANK", "0")) == 0


def current() -> Torchrun | None:
    """The `World` that `join()` opened, or None in a single-process run.

    Returns:
        The open `World`, or None.
    """
    return _WORLD


def _device_and_backend(device_name: str, local_rank: int) -> tuple[torch.device, str]:
    """`cuda:LOCAL_RANK` with NCCL, or the CPU with Gloo, for `--device` `device_name`."""
    if device_name == "auto":  # torchrun shares out GPUs or CPUs, never MPS
        device_name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device_name)
    except RuntimeError:
        raise ValueError(f"--device {device_name!r} is not a device (auto, cpu, cuda)") from None
    if device.type == "cpu":
        return torch.device("cpu"), "gloo"
    if device.type != "cuda":
        raise ValueError(
            f"--device {device_name}: torchrun runs train on CUDA (NCCL) or the CPU (Gloo); "
            "pass --device cuda or --device cpu"
        )
    if device.index is not None:
        raise ValueError(
            f"--device {device_name}: under torchrun every process takes the GPU of its "
            "LOCAL_RANK; pass --device cuda (or auto)"
        )
    resolve_device("cuda")  # CUDA present at all
    if local_rank >= torch.cuda.device_count():
        raise ValueError(
            f"LOCAL_RANK {local_rank} but this machine has {torch.cuda.device_count()} CUDA "
            "device(s): start at most one process per GPU (--nproc_per_node)"
        )
    return torch.device("cuda", local_rank), "nccl"


def join(device: str = "auto", timeout: float = DEFAULT_TIMEOUT) -> Torchrun | None:
    """Open the process group torchrun described in the environment; None without torchrun.

    Idempotent: a second call returns the same `World`. A process group opened by someone
    else (`torch.distributed.init_process_group` before exigo) is used as it is.

    Args:
        device: `--device`: "auto" or "cuda" (NCCL, one GPU per process) or "cpu" (Gloo).
        timeout: seconds any collective (and the rendezvous) waits for the other processes.

    Returns:
        This process' `World`, or None for a single-process run.

    Raises:
        ValueError: a device that cannot be shared out among the processes.
        DistributedError: the other processes did not show up within `timeout`.
    """
    global _WORLD
    if _WORLD is not None:
        return _WORLD
    if not dist.is_initialized() and not launched_by_torchrun():
        return None
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    chosen, backend = _device_and_backend(device, local_rank)
    if not dist.is_initialized():
        if chosen.type == "cuda":
            torch.cuda.set_device(chosen)  # before NCCL starts, so it binds this GPU
        try:
            dist.init_process_group(backend=backend, timeout=_dt.timedelta(seconds=timeout))
        except (RuntimeError, ValueError, dist.DistError) as error:
            raise DistributedError(
                f"rank {os.environ.get('RANK', '?')}: cannot join the other torchrun processes "
                f"({' '.join(str(error).split())[:300]}); check --rdzv-endpoint / MASTER_ADDR "
                "and that every machine started torchrun"
            ) from error
        _WORLD = Torchrun(
            rank=dist.get_rank(),
            world_size=dist.get_world_size(),
            local_rank=local_rank,
            backend=backend,
            device=chosen,
            timeout=timeout,
        )
        return _WORLD
    return Torchrun(  # someone else's group: describe it, leave it to its owner
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=local_rank,
        backend=str(dist.get_backend()),
        device=chosen,
        timeout=timeout,
    )


def leave() -> None:
    """Close the process group `join()` opened (nothing happens otherwise)."""
    global _WORLD
    if _WORLD is not None:
        _WORLD = None
        if dist.is_initialized():
            dist.destroy_process_group()


@contextmanager
def process_group(
    device: str = "auto", timeout: float = DEFAULT_TIMEOUT
) -> Iterator[Torchrun | None]:
    """`join()` for the block, and `leave()` after it if this block opened the group.

    Args:
        device: as for `join`: "auto", "cuda" (NCCL) or "cpu" (Gloo).
        timeout: seconds any collective waits for the other processes.

    Yields:
        The `World`, or None for a single-process run.
    """
    opened_here = _WORLD is None and not dist.is_initialized()
    world = join(device, timeout)
    try:
        yield world
    finally:
        if opened_here and world is not None:
            leave()


@contextmanager
def open_world(device: str = "auto", timeout: float = DEFAULT_TIMEOUT) -> Iterator[World]:
    """The run's `World`: torchrun's processes, or this process alone.

    Under torchrun, `join` (the group is closed after the block if opened here); else a
    single-process `World` on `resolve_device(device)`.

    Args:
        device: `--device`.
        timeout: seconds any collective waits for the other processes.

    Yields:
        A `Torchrun` under torchrun, else a single-process `World`.

    Raises:
        ValueError: a device this machine does not have, or cannot share among processes.
        DistributedError: the other processes did not show up within `timeout`.
    """
    with process_group(device, timeout) as torchrun:
        yield torchrun if torchrun is not None else World(resolve_device(device))


@contextmanager
def all_or_none(world: Torchrun | None, what: str) -> Iterator[None]:
    """A block that may fail on some processes only: if it fails on one, it fails on all.

    Each process runs the block, then all agree whether every one succeeded (one collective).
    The process whose block raised re-raises its own error; the others raise
    `DistributedError`, instead of waiting at their next collective for a process that left.
    Without a `World` the block just runs.

    Args:
        world: the processes, or None.
        what: what the block does, for the others' message ("starting the run").

    Yields:
        None; the block runs once on every process.
    """
    if world is None:
        yield
        return
    try:
        yield
    except BaseException:
        # the others may be gone already; this process' own error matters more than that
        with suppress(DistributedError):
            world.all_ok(False)
        raise
    if not world.all_ok(True):
        raise DistributedError(
            f"rank {world.rank} of {world.world_size}: another process failed while {what}; "
            "its message says why"
        )


def wrap(model: nn.Module, world: Torchrun) -> DistributedDataParallel:
    """`model` (already on `world.device`) in DistributedDataParallel.

    DDP copies rank 0's parameters and buffers to every process here, so all start equal.
    Train through the wrapper; evaluate, analyse and save `wrapper.module` (the model itself),
    which runs no collective.

    Args:
        model: the model, on `world.device`.
        world: the processes.

    Returns:
        The wrapper to train through.
    """
    device_ids = [world.device.index] if world.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def broadcast_buffers(model: nn.Module, world: Torchrun) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) into every process' `model`.

    DDP synchronises buffers at the start of each training step, but the last step updates each
    process' statistics from its own batch; after this call every process evaluates the model
    rank 0 saves.

    Args:
        model: the model itself (not its DDP wrapper), on `world.device`; changed in place.
        world: the processes.
    """
    with world.collective("sharing rank 0's BatchNorm statistics"):
        for buffer in model.buffers():
            dist.broadcast(buffer.data, src=0)


def training_indices(dataset: Dataset, epoch: int, seed: int, rank: int, world_size: int) -> Tensor:
    """This process' shard of the epoch's shuffled training set, from a `DistributedSampler`.

    The permutation depends on `seed` and `epoch` only (`set_epoch`), so every process draws
    the same one and takes every `world_size`-th index of it from `rank` on; the last shards
    are padded with the first indices so that all have ceil(N / W) (equal step counts keep the
    processes in step).

    Args:
        dataset: the training set (only its length is used).
        epoch: 1-based epoch.
        seed: the run's seed.
        rank: this process.
        world_size: W.

    Returns:
        int64 tensor [ceil(N / W)] of indices into `dataset`.
    """
    sampler = DistributedSampler(
        dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=False
    )
    sampler.set_epoch(epoch)
    return torch.tensor(list(sampler), dtype=torch.long)


def evaluation_shard(size: int, rank: int, world_size: int) -> Tensor:
    """Indices rank, rank + W, rank + 2W, ... of a dataset of `size`: every image exactly once.

    Args:
        size: number of items in the dataset.
        rank: this process' rank, in [0, world_size).
        world_size: number of processes, W.

    Returns:
        int64 tensor [len(range(rank, size, world_size))].
    """
    return torch.arange(rank, size, world_size, dtype=torch.long)


def interleave_shards(parts: Sequence[Tensor], size: int) -> Tensor:
    """Put per-rank rows back in dataset order: the inverse of `evaluation_shard`.

    Args:
        parts: W tensors [>= n_r, ...]; part r holds the rows of `evaluation_shard(size, r, W)`
            first (padding after them is dropped).
        size: N, the number of rows of the result.

    Returns:
        Tensor [N, ...] whose row i comes from part i mod W, row i div W.
    """
    world_size = len(parts)
    out = parts[0].new_empty((size, *parts[0].shape[1:]))
    for rank, part in enumerate(parts):
        out[rank::world_size] = part[: len(range(rank, size, world_size))]
    return out


def _gather_rows(rows: Tensor, world: Torchrun, size: int) -> Tensor | None:
    """Gather each process' `rows` [n_r, ...] to rank 0 as a [size, ...] tensor in dataset order.

    `dist.gather` needs equal shapes: every process pads to ceil(N / W) rows first.
    """
    longest = math.ceil(size / world.world_size)
    padded = rows.new_zeros((longest, *rows.shape[1:]))
    padded[: rows.shape[0]] = rows
    padded = padded.to(world.device)
    parts = [torch.empty_like(padded) for _ in range(world.world_size)] if world.is_main else None
    dist.gather(padded, parts, dst=0)
    if parts is None:
        return None
    return interleave_shards([part.cpu() for part in parts], size)


def evaluate_sharded(
    model: nn.Module,
    dataset: Dataset,
    world: Torchrun,
    *,
    batch_size: int = 500,
    device: torch.device | str = "cpu",
    on_batch: Callable[[int], None] | None = None,
) -> EvalResult:
    """Evaluate `dataset` split across the processes, as one `evaluate` would.

    Every process must call this at the same point. Pass the model itself, not its DDP wrapper:
    the processes evaluate different numbers of batches, and a wrapper could start a collective
    in its forward pass that the others never join.

    Args:
        model: classifier mapping [B, C, H, W] to logits [B, K], identical on every process.
        dataset: validation images and labels, with at least W images.
        world: the processes.
        batch_size: images per forward pass.
        device: where the model lives.
        on_batch: called with the number of images after each of this process' forward passes.

    Returns:
        On every process: the loss and accuracy over the whole dataset. On rank 0: also
        predictions [N], targets [N], probabilities [N, C] and embeddings [N, D] in dataset
        order, on the CPU. On the other ranks those tensors are empty ([0] and [0, C] / [0, D]).
    """
    start = time.perf_counter()
    size = len(dataset)
    if size < world.world_size:
        raise ValueError(
            f"cannot share {size} validation images among {world.world_size} processes"
        )
    shard = evaluation_shard(size, world.rank, world.world_size)
    local = evaluate(
        model, dataset, indices=shard, batch_size=batch_size, device=device, on_batch=on_batch
    )
    count = shard.numel()
    correct = int((local.predictions == local.targets).sum())
    totals = world._tensor([local.loss * count, correct, count], torch.float64)
    with world.collective("evaluating"):
        dist.all_reduce(totals)
        gathered = [
            _gather_rows(rows, world, size)
            for rows in (local.predictions, local.targets, local.probabilities, local.embeddings)
        ]
    loss_sum, correct_sum, total = totals.tolist()
    predictions, targets, probabilities, embeddings = (
        rows if rows is not None else local_rows[:0]
        for rows, local_rows in zip(
            gathered,
            (local.predictions, local.targets, local.probabilities, local.embeddings),
            strict=True,
        )
    )
    return EvalResult(
        loss=loss_sum / total,
        # float32 like `evaluate`'s mean of correct predictions, so both report the same number
        accuracy=(torch.tensor(correct_sum, dtype=torch.float32) / total).item(),
        predictions=predictions,
        targets=targets,
        probabilities=probabilities,
        embeddings=embeddings,
        seconds=time.perf_counter() - start,
    )


def reduce_train_result(result: TrainResult, world: Torchrun) -> TrainResult:
    """One process' `TrainResult` turned into the epoch's over all processes.

    Loss and accuracy become image-weighted means over the processes; a NaN on any process
    makes the loss NaN everywhere, so all processes see a divergence together.

    Args:
        result: this process' epoch (its shard).
        world: the processes.

    Returns:
        The `TrainResult` of all processes' images; `seconds` and `dynamics` stay this
        process' own (`gather_dynamics` merges the records).
    """
    totals = world._tensor(
        [result.loss * result.images, result.accuracy * result.images, result.images],
        torch.float64,
    )
    with world.collective("summing the training loss"):
        dist.all_reduce(totals)
    loss_sum, correct_sum, images = totals.tolist()
    return TrainResult(
        loss=loss_sum / images,
        accuracy=correct_sum / images,
        seconds=result.seconds,
        images=int(images),
        dynamics=result.dynamics,
    )


def gather_dynamics(dynamics: TrainingDynamics, world: Torchrun) -> TrainingDynamics:
    """Every process' record of its training shard, merged on rank 0 by dataset position.

    Each process sends only the rows it saw, as `(position, label, probability, margin,
    runner-up)` in float64 (exact for float32 values and integers below 2**53), padded to the
    longest shard for `dist.gather`. An example seen by several processes (the
    `DistributedSampler` pads the last shards with examples from the first ones) keeps the
    record of the lowest rank that saw it. Every process must call this at the same point.

    Args:
        dynamics: this process' record ([N] rows, its shard filled), on the CPU.
        world: the processes.

    Returns:
        On rank 0, the record of every process' examples; elsewhere `dynamics` itself.
    """
    seen = torch.nonzero(dynamics.seen).flatten()
    rows = torch.stack(
        [
            seen.double(),
            dynamics.labels[seen].double(),
            dynamics.probabilities[seen].double(),
            dynamics.margins[seen].double(),
            dynamics.runner_up[seen].double(),
        ],
        dim=1,
    )  # (n_r, 5)
    longest = world._tensor([rows.shape[0]], torch.int64)
    with world.collective("gathering the training examples' records"):
        dist.all_reduce(longest, op=dist.ReduceOp.MAX)
        padded = torch.full((int(longest.item()), 5), -1.0, dtype=torch.float64)
        padded[: rows.shape[0]] = rows
        padded = padded.to(world.device)
        parts = (
            [torch.empty_like(padded) for _ in range(world.world_size)] if world.is_main else None
        )
        dist.gather(padded, parts, dst=0)
    if parts is None:
        return dynamics
    merged = TrainingDynamics.empty(dynamics.labels.shape[0])
    for part in reversed(parts):  # the lower ranks write last: their record stays
        part = part.cpu()
        part = part[part[:, 0] >= 0]  # padding rows hold position -1
        position = part[:, 0].long()
        merged.labels[position] = part[:, 1].long()
        merged.probabilities[position] = part[:, 2].float()
        merged.margins[position] = part[:, 3].float()
        merged.runner_up[position] = part[:, 4].long()
    return merged
