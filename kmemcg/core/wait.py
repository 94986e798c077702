"""Blocking waits: who sleeps on what, and real wait-for cycles.

Every blocking wait of the model (a contended mutex or rwsem, later a completion, a grace
period, a flushed work) goes through :meth:`WaitTracker.wait`. It records what the task sleeps on
(for the hung-task watchdog and "Showing all locks held in the system"), polls so that a torn
down kernel can unwind its blocked threads (``KernelTornDown``), and on every poll follows the
wait-for chain (waiter -> what it waits on -> the tasks that hold that -> what they wait on ...).
A chain that comes back to the waiter is a real deadlock: reported at once, not after
hung_task_timeout.

The kernel has no such detector (lockdep predicts, the hung-task watchdog notices late); the
model can afford one because every sleeper is known. A cycle is reported only when it is seen
twice in a row with the same sleepers and the same sleep start times, so a chain read while an
owner is changing hands cannot raise a false alarm; and a sleeper that already owns what it
waits on, but did not when it began to wait, has just been granted it (and may be descheduled
before it clears its state for longer than a poll period): it is not asleep.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from kmemcg.core import findings as F

if TYPE_CHECKING:
    from kmemcg.core.task import Task
    from kmemcg.kernel import Kernel

POLL_S = 0.05


def owners_of(obj: Any) -> list[Task]:
    """Tasks that must act before a sleeper on ``obj`` can go on (lock holders)."""
    fn = getattr(obj, "waiter_owners", None)
    return fn() if fn is not None else []


class WaitTracker:
    def __init__(self, kernel: Kernel) -> None:
        self._k = kernel
        self._lock = threading.Lock()

    def wait(self, task: Task, obj: Any, try_once: Callable[[float], bool]) -> None:
        """Sleep until ``try_once(timeout)`` returns True; ``obj`` is what is waited on."""
        k = self._k
        owned = task in owners_of(obj)
        with self._lock:
            task.blocked_on = obj
            task.blocked_since = time.monotonic()
            task.blocked_owned = owned
        last: tuple | None = None
        # A sleeper runs on no CPU (kmemcg.core.sched); it queues for one when it wakes.
        with k.off_cpu(task):
            try:
                while not try_once(POLL_S):
                    k.check_alive()
                    cycle = self._find_cycle(task)
                    if cycle is not None and cycle == last:
                        self._report(cycle)
                    last = cycle
            finally:
                with self._lock:
                    task.blocked_on = None

    def _find_cycle(self, start: Task) -> tuple | None:
        """Follow the wait-for chain from ``start``; the cycle through it, or None."""
        with self._lock:
            path: list[tuple[Task, Any, float]] = []
            seen: set[int] = set()
            task = start
            while True:
                obj = task.blocked_on
                if obj is None or task.pid in seen:
                    return None
                seen.add(task.pid)
                path.append((task, obj, task.blocked_since))
                all_owners = owners_of(obj)
                if task in all_owners and not task.blocked_owned:
                    # It got what it waited for and has not cleared blocked_on yet: a thread
                    # can be descheduled right there for longer than a poll period.
                    return None
                owners = [o for o in all_owners if o is not task]
                if not owners:
                    # a task blocked on a lock it held before it began to wait (AA) is a cycle
                    # of one
                    if task in all_owners:
                        return tuple(path)
                    return None
                if start in owners:
                    return tuple(path)
                # Follow the first owner that is itself blocked (rwsem: several readers).
                nxt = next((o for o in owners if o.blocked_on is not None), None)
                if nxt is None:
                    return None
                task = nxt

    def _report(self, cycle: tuple) -> None:
        k = self._k
        names = sorted({getattr(obj, "name", repr(obj)) for _, obj, _ in cycle})
        sig = "deadlock:" + "+".join(names)

        def text() -> str:
            from kmemcg.core.report import all_held_locks, banner
            lines = [banner("BUG: real deadlock: tasks wait for each other", k)]
            for task, obj, _ in cycle:
                owners = ", ".join(o.name for o in owners_of(obj)) or "?"
                lines.append(f"{task.name} is blocked on ({getattr(obj, 'name', obj)}) "
                             f"held by {owners}\n")
            lines.append("\n")
            lines.append(all_held_locks(k))
            lines.append("\nStacks of the deadlocked tasks:\n")
            for task, _, _ in cycle:
                lines.append(f"{task.name}:\n{task.python_stack()}")
            return "".join(lines)

        # Set before reporting: the finding's listeners (and anyone polling the findings)
        # must already see the kernel as deadlocked.
        k.deadlocked = True
        k.findings.report(F.REAL_DEADLOCK, "BUG: real deadlock: tasks wait for each other",
                          sig, text, thread=cycle[0][0].name,
                          extra={"tasks": [t.name for t, _, _ in cycle], "locks": names})
