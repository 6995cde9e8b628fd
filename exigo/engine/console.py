"""The run's closing line: where to look first once it has ended.

```
best epoch 2 (eval accuracy 98.25%): open save/report.html; model save/models/best.pt;
tensorboard --logdir save/logs
```

(one line on the console; wrapped here). `exigo.pipeline.run` prints it when the run ends
(`verbose=False` leaves it out) and `RunResult.closing_line` returns it, so a script or a
notebook can print or log the same words.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["closing_line"]


def closing_line(history: Sequence[Mapping[str, Any]], best_epoch: int, save_dir: Path) -> str:
    """One line naming report.html, the best model and the TensorBoard command.

    Args:
        history: the run's metrics rows (empty when no epoch completed).
        best_epoch: the epoch of `models/best.pt` (0 when none).
        save_dir: the run's save directory.

    Returns:
        The line, without a trailing newline.
    """
    report = save_dir / "report.html"
    tensorboard = f"tensorboard --logdir {save_dir / 'logs'}"
    best = next((row for row in history if row.get("epoch") == best_epoch), None)
    if best is None:
        return f"no epoch completed: no model saved; open {report}; {tensorboard}"
    accuracy = best.get("eval_accuracy")
    score = f" (eval accuracy {accuracy:.2%})" if isinstance(accuracy, float) else ""
    return (
        f"best epoch {best_epoch}{score}: open {report}; "
        f"model {save_dir / 'models' / 'best.pt'}; {tensorboard}"
    )
