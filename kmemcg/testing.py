"""Helpers for tests of the model (the project's own and users' scenarios)."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_until(pred: Callable[[], bool], timeout: float = 5.0, interval: float = 0.002) -> bool:
    """Bounded poll for a state no event announces (e.g. a task asleep in a model wait:
    ``task.blocked_on``). Returns whether ``pred()`` became true within ``timeout``."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True
