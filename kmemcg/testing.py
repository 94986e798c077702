"""Helpers for tests of the model (the project's own and users' scenarios)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kmemcg.core.task import KThread, Task
    from kmemcg.kernel import Kernel


def wait_until(pred: Callable[[], bool], timeout: float = 5.0, interval: float = 0.002) -> bool:
    """Bounded poll for a state no event announces (e.g. a task asleep in a model wait:
    ``task.blocked_on``). Returns whether ``pred()`` became true within ``timeout``."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


@contextmanager
def held_by_another_task(k: Kernel, lock: Any, name: str = "holder",
                         timeout: float = 5.0) -> Iterator[KThread]:
    """Run the block while a model thread ``name`` holds ``lock`` (anything usable in a
    ``with``); the holder lets go when the block ends. Yields the holder's thread."""
    held, done = threading.Event(), threading.Event()

    def holder() -> None:
        with lock:
            held.set()
            done.wait(timeout)

    t = k.kthread_run(holder, name=name)
    if not held.wait(timeout):
        raise TimeoutError(f"{name} did not get {lock!r} within {timeout}s")
    try:
        yield t
    finally:
        done.set()
        t.join(timeout)


class Hold:
    """Something a model thread sleeps on (``k.waits.wait(task, hold, hold.ev.wait)``) until
    the test calls :meth:`release`; nobody "owns" it for the deadlock detector."""

    def __init__(self, name: str = "test_hold") -> None:
        self.name = name
        self.ev = threading.Event()

    def release(self) -> None:
        self.ev.set()

    def waiter_owners(self) -> list[Task]:
        return []
