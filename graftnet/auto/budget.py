"""The wall-clock budget of `graft auto`: parsed from text, kept as a deadline, shared among stages.

The budget is a promise about the whole command, so every stage asks the same clock what is left;
a stage that would not fit is skipped (with its reason) rather than started and overrun. Training
stops at the end of the epoch that would otherwise run past the stage's end (`StopAtDeadline`).
"""
from __future__ import annotations

import time

from ..fields import parse_duration
from ..train.loop import Callback

def parse_budget(text: str | None) -> float:
    """Seconds from 30m, 90s, 1h, 1h30m, 1.5h or plain seconds; one ConfigError line for anything else."""
    return parse_duration(text, "--budget")


def shown(seconds: float) -> str:
    """90 -> '1m30s', 3700 -> '1h01m', 2.54 -> '2.5s': how the plan and the progress lines write durations."""
    if seconds < 10:
        return f"{max(0.0, seconds):.1f}s"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class Budget:
    """A deadline `seconds` after now, less what an earlier, killed attempt already spent."""

    def __init__(self, seconds: float, spent: float = 0.0):
        self.total, self.spent_before = float(seconds), float(spent)
        self.started = time.monotonic()
        self.deadline = self.started + self.total - self.spent_before

    def left(self) -> float:
        return max(0.0, self.deadline - time.monotonic())

    def spent(self) -> float:
        """Seconds spent in all, this attempt and the earlier ones."""
        return self.spent_before + time.monotonic() - self.started


class StopAtDeadline(Callback):
    """Ends a fit after the epoch when the next one, as long as the longest so far, would end past
    `deadline` (time.monotonic()); the epochs trained are kept, like early stopping's."""

    def __init__(self, deadline: float):
        self.deadline, self.longest, self.stopped = deadline, 0.0, False
        self.began = time.monotonic()

    def before_fit(self, state) -> None:
        self.began = time.monotonic()

    def after_epoch(self, state, row: dict) -> None:
        now = time.monotonic()
        self.longest, self.began = max(self.longest, now - self.began), now
        # after the fit's last epoch nothing is cut short: `stopped` would leave a whole ensemble member out
        if state.epoch < state.epochs and now + self.longest > self.deadline:
            state.stop = self.stopped = True
