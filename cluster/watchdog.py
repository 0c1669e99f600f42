"""Is the engine thread still making progress? The thread stamps a clock around every step
and at every pass of its loop; any other thread asks `stalled()`.

A group is hung when a step has run longer than the timeout (a rank stuck in a collective, a
kernel that never returns), or when work is pending and the thread has not come round its loop
for that long (it died outside a step, or is blocked elsewhere). Work queued while the thread
waits idle counts from when it was queued (`poke`), not from the thread's last pass: with a
timeout shorter than the idle wait, a thread slow to be scheduled after its wake-up would
otherwise look hung.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class StepClock:
    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.step_started: float | None = None  # set while a step runs
        self.beat = clock()  # the thread's last pass of its loop, or the end of a step
        self.queued: float | None = None  # first work queued since the last pass

    # ---- the engine thread -----------------------------------------------------------------
    def tick(self) -> None:
        self.beat = self.clock()
        self.queued = None

    def start(self) -> None:
        self.step_started = self.clock()

    def end(self) -> None:
        self.beat = self.clock()  # before clearing: a reader that sees None sees a fresh beat
        self.step_started = None

    # ---- any thread --------------------------------------------------------------------------
    def poke(self) -> None:
        """Work was queued for the engine thread."""
        if self.queued is None:
            self.queued = self.clock()

    def stalled(self, pending: bool, timeout_s: float) -> str | None:
        """Why the engine counts as hung, or None."""
        now = self.clock()
        started = self.step_started
        if started is not None:
            if now - started > timeout_s:
                return f"a step has run for {now - started:.1f} s (hang_timeout_s={timeout_s:g})"
            return None
        queued = self.queued
        since = self.beat if queued is None else max(self.beat, queued)
        if pending and now - since > timeout_s:
            return (
                f"requests are pending and no step has begun for {now - since:.1f} s "
                f"(hang_timeout_s={timeout_s:g})"
            )
        return None
