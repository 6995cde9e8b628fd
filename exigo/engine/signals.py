"""Stop signals: SIGINT (Ctrl-C) and SIGTERM end a run at the next safe point, not mid-write."""

from __future__ import annotations

import signal
import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from exigo.pipeline import RunResult

__all__ = ["RunInterrupted", "StopSignals"]


class RunInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped the run; the outputs of every completed epoch are intact.

    A `KeyboardInterrupt`, so code that catches `Exception` (such as the pipeline's guard
    around each analysis) lets it through.

    Args:
        signal_number: the signal received (`signal.SIGINT` or `signal.SIGTERM`).
        message: the exception's text; None: "interrupted by SIGINT" (or SIGTERM).

    Attributes:
        signal_number: the signal received (`signal.SIGINT` or `signal.SIGTERM`).
        result: the completed epochs (set by the pipeline before the exception leaves `run`).
        cut_short: the analysis the signal stopped, or None.
    """

    def __init__(self, signal_number: int, message: str | None = None) -> None:
        self.signal_number = signal_number
        self.result: RunResult | None = None
        self.cut_short: str | None = None
        super().__init__(message or f"interrupted by {self.signal_name}")

    @property
    def signal_name(self) -> str:
        """`SIGINT`, `SIGTERM`, ..."""
        return signal.Signals(self.signal_number).name

    @property
    def exit_code(self) -> int:
        """128 + the signal number, as a shell reports it: 130 for SIGINT, 143 for SIGTERM."""
        return 128 + self.signal_number


class StopSignals:
    """SIGINT and SIGTERM ask the run to stop at the next safe point; a second one stops it now.

    Safe points (`check()`) are batch boundaries, the gaps between analyses and every forward
    pass of an analysis, so a stop never lands in the middle of writing a checkpoint or
    metrics.json. A second signal raises at once, wherever the run is, unless the stop is
    already on its way out (`check()` raised): then it is ignored, so the message that says
    where the run stopped is not replaced by a bare one. Handlers can only be installed from
    the main thread; elsewhere, and for signals the process ignores, the signals keep their
    usual behaviour. Use as a context manager: the previous handlers come back on exit.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self.stopping = False  # a RunInterrupted is on its way out
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for number in (signal.SIGINT, signal.SIGTERM):
                # an ignored signal stays ignored (a shell script's background job ignores
                # SIGINT, so Ctrl-C in the terminal is not meant for it)
                if signal.getsignal(number) is not signal.SIG_IGN:
                    self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, signal.SIG_DFL if handler is None else handler)
        self._previous.clear()

    def _handle(self, number: int, _frame: object) -> None:
        if self.received is None:
            self.received = number
        elif not self.stopping:  # asked twice: the user does not want to wait
            self.stopping = True
            raise RunInterrupted(number)

    def check(self) -> None:
        """Raise `RunInterrupted` if a stop was requested.

        Raises:
            RunInterrupted: a signal arrived since the run started.
        """
        if self.received is not None:
            self.stopping = True
            raise RunInterrupted(self.received)
