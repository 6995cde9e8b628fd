"""Before a run replaces anything: one training step with its options, on copies, on its device.

Options can be valid one by one and still fail together at the first step: a learning rate
beyond the float range of the weights (`--lr 1e39`: "value cannot be converted to type float
without overflow" inside AdamW), a device that holds no data (`meta`), a model that does not
fit the images, a batch that does not fit the GPU's memory. `trial_step` finds these before
`exigo.engine.session.Session` sets the previous run's outputs aside: it trains one batch
(forward, backward, optimizer and scheduler step, the loss read back) and evaluates one batch
on deep copies of the model, optimizer and schedule, so the run itself, its random number
generators included, is exactly as if the trial had not happened. The trial step takes the
schedule's peak learning rate, the largest step the run will take.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch

from exigo.engine.checkpoint import capture_rng, restore_rng
from exigo.engine.training import evaluate, train_epoch

if TYPE_CHECKING:
    from exigo.engine.session import Session

__all__ = ["PreflightError", "trial_step"]


class PreflightError(Exception):
    """The run's options fail at its first training step; nothing in the save dir changed."""


def trial_step(session: Session) -> None:
    """Train and evaluate one batch on copies of the session's model, optimizer and schedule.

    Costs a copy of the model and optimizer state on its device and one batch of each pass.
    A model that cannot be copied (`copy.deepcopy` fails) is not tried, with one line saying
    so. Every random number generator is put back afterwards; the datasets are read as they
    are (a dataset that counts its reads sees one batch of each more).

    Args:
        session: the run, before its first epoch (or a resumed one, restored).

    Raises:
        PreflightError: the step failed; the message says where and why, in one sentence,
            and the original exception is its `__cause__`.
    """
    config, device = session.config, session.world.device
    try:
        model = copy.deepcopy(session.model)
    except Exception as error:
        session.console.print(
            "[yellow]no trial step before the run: the model cannot be copied "
            f"({type(error).__name__}: {error}); options that fail show at the first "
            "batch[/yellow]",
            highlight=False,
        )
        return
    optimizer, scheduler = session.training_parts(model)
    optimizer.load_state_dict(copy.deepcopy(session.optimizer.state_dict()))
    scheduler.load_state_dict(copy.deepcopy(session.scheduler.state_dict()))
    for group in optimizer.param_groups:
        # the schedule's peak rate on the first step, where Adam's bias correction makes the
        # step 10x the rate: the largest step of the run, so an overflow shows here
        group["lr"] = max(group["lr"], group.get("max_lr", group["lr"]))
    generators = capture_rng()
    try:
        train_epoch(
            model,
            session.train_data,
            torch.arange(min(config.batch_size, len(session.train_data))),
            optimizer,
            scheduler,
            batch_size=config.batch_size,
            device=device,
            label_smoothing=config.label_smoothing,
            record_examples=False,  # one batch: no per-example record of the whole set
        )
        evaluate(
            model,
            session.val_data,
            indices=torch.arange(min(config.eval_batch_size, len(session.val_data))),
            batch_size=config.eval_batch_size,
            device=device,
        )
    except Exception as error:
        raise PreflightError(_message(session, error)) from error
    finally:
        restore_rng(generators)


def _message(session: Session, error: Exception) -> str:
    """One sentence: what failed, where, and the likely option."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    reason = f"{type(error).__name__}: {lines[0][:300] if lines else ''}"
    hint = ""
    if "overflow" in reason:
        hint = f" (--lr {session.config.lr:g} is beyond the float range of the weights)"
    return (
        f"a training step with these options fails on {session.world.device}{hint}: {reason} "
        f"(tried on a copy of the model before anything in --save-dir {session.save_dir} "
        "was replaced)"
    )
