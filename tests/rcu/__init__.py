"""Tests of kmemcg.rcu, and the helpers they share.

Readers that must stay inside a section block through ``k.waits`` (:func:`block`), so that the
kernel fixture's teardown unwinds them even when a test fails half way.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from kmemcg import Instrument, Kernel, Task
from kmemcg.core import findings as F
from kmemcg.testing import Hold  # noqa: F401  (re-exported to the tests)


def block(k: Kernel, hold: Hold) -> None:
    """Sleep on ``hold`` through the wait tracker (teardown raises KernelTornDown here)."""
    k.waits.wait(k.current(), hold, hold.ev.wait)


class Watcher(Instrument):
    """Records events; ``wait_for(point, n)`` blocks until ``n`` events of ``point`` were seen."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, Task]] = []
        self._cond = threading.Condition()

    def on_event(self, point: str, label: str, task: Task, obj: Any) -> None:
        with self._cond:
            self.events.append((point, label, task))
            self._cond.notify_all()

    def count(self, point: str, task: Task | None = None) -> int:
        with self._cond:
            return sum(1 for p, _, t in self.events if p == point and (task is None or t is task))

    def wait_for(self, point: str, n: int = 1, task: Task | None = None,
                 timeout: float = 10.0) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: sum(
                1 for p, _, t in self.events if p == point and (task is None or t is task)) >= n,
                timeout)

    def of(self, task: Task) -> list[tuple[str, str]]:
        with self._cond:
            return [(p, lbl) for p, lbl, t in self.events if t is task]


class Reader:
    """A kthread that enters a read-side section, signals ``inside``, and stays there until
    ``leave`` is released; ``left`` is set once it has left the section."""

    def __init__(self, k: Kernel, name: str = "reader", nest: int = 1) -> None:
        self.k = k
        self.inside = threading.Event()
        self.leave = Hold(f"{name}_leave")
        self.left = threading.Event()
        self.nest = nest
        self.task: Task | None = None
        self.thread = k.kthread_run(self._run, name=name)
        assert self.inside.wait(10), f"{name} did not enter its read-side section"

    def _run(self) -> None:
        k = self.k
        self.task = k.current()
        for _ in range(self.nest):
            k.rcu.read_lock()
        self.inside.set()
        block(k, self.leave)
        for _ in range(self.nest):
            k.rcu.read_unlock()
        self.left.set()

    def exit_section(self, timeout: float = 10.0) -> None:
        self.leave.release()
        assert self.left.wait(timeout)
        self.thread.join(timeout)


class Runner:
    """Runs ``fn`` on a kthread; ``done`` is set when it returns, ``error`` holds what it
    raised (BaseException included: KernelTornDown)."""

    def __init__(self, k: Kernel, fn: Callable[[], Any], name: str = "runner") -> None:
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.task: Task | None = None
        self._k = k
        self._fn = fn
        self.thread = k.kthread_run(self._run, name=name)

    def _run(self) -> None:
        self.task = self._k.current()
        try:
            self._fn()
        except BaseException as e:
            self.error = e
            raise
        finally:
            self.done.set()


def unexpected(k: Kernel, *allowed: str) -> list[str]:
    """Titles of findings whose kind is not in ``allowed`` (thread deaths included)."""
    return [f"{f.kind}: {f.title}" for f in k.findings if f.kind not in allowed]


__all__ = ["Hold", "block", "Watcher", "Reader", "Runner", "unexpected", "F"]
