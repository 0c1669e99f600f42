"""Is the engine thread still making progress? The thread stamps a clock around every step
and at every pass of its loop; any other thread asks `stalled()`.

A group is hung when a step has run longer than the timeout (a rank stuck in a collective, a
kernel that never returns), or when work is pending and the thread has not come round its loop
for that long (it died outside a step, or is blocked elsewhere). An idle thread passes its loop
at least once a second, so idleness never looks like a hang.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class StepClock:
    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.step_started: float | None = None  # set while a step runs
        self.beat = clock()  # the thread's last pass of its loop, or the end of a step

    # ---- the engine thread -----------------------------------------------------------------
    def tick(self) -> None:
        self.beat = self.clock()

    def start(self) -> None:
        self.step_started = self.clock()

    def end(self) -> None:
        self.beat = self.clock()  # before clearing: a reader that sees None sees a fresh beat
        self.step_started = None

    # ---- any thread --------------------------------------------------------------------------
    def stalled(self, pending: bool, timeout_s: float) -> str | None:
        """Why the engine counts as hung, or None."""
        now = self.clock()
        started = self.step_started
        if started is not None:
            if now - started > timeout_s:
                return f"a step has run for {now - started:.1f} s (hang_timeout_s={timeout_s:g})"
            return None
        if pending and now - self.beat > timeout_s:
            return (
                f"requests are pending and no step has begun for {now - self.beat:.1f} s "
                f"(hang_timeout_s={timeout_s:g})"
            )
        return None
