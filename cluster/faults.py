"""TEST-ONLY fault injection: make a real group hang, to test hang detection end to end.

    FLOTILLA_FAULT=hang_step_after:N   a step after the N-th never returns
    FLOTILLA_FAULT_ONCE=/path          optional: a step hangs only if it creates this file
                                       (exclusively): one hang across every process given
                                       the path, and none while the file exists -- a test
                                       creates it first, then deletes it to arm the fault

Read once, when an AsyncEngine starts. Unset (always, outside tests), the engine steps through
LLMEngine.step directly: nothing here is on the serving path.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

ENV = "FLOTILLA_FAULT"
ONCE_ENV = "FLOTILLA_FAULT_ONCE"


def wrap_step(step: Callable[[], Any]) -> Callable[[], Any]:
    """`step` itself, or, under FLOTILLA_FAULT, `step` with the fault injected."""
    spec = os.environ.get(ENV, "")
    if not spec:
        return step
    kind, _, arg = spec.partition(":")
    if kind != "hang_step_after" or not arg.isdigit():
        raise ValueError(f"{ENV}={spec!r}: expected hang_step_after:N")
    after, once = int(arg), os.environ.get(ONCE_ENV)
    steps = 0

    def faulty() -> Any:
        nonlocal steps
        steps += 1
        if steps > after and _claim(once):
            log.error("%s: step %d hangs now (test fault injection)", ENV, steps)
            while True:  # a step that never returns; the process is killed around it
                time.sleep(3600)
        return step()

    log.warning("%s=%s: fault injection is on (tests only)", ENV, spec)
    return faulty


def _claim(path: str | None) -> bool:
    if path is None:
        return True
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False
