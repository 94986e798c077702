"""The hung-task watchdog (kernel/hung_task.c): ``khungtaskd``.

``Kernel(hung_task_timeout=T)`` starts a kthread that, every ``T/4`` seconds (at least 50 ms),
looks at every task of the kernel: a task that has been sleeping in a blocking wait (every
blocking wait goes through ``k.waits.wait``, which records ``task.blocked_on`` and
``task.blocked_since``) for more than ``T`` seconds gives a HUNG_TASK finding::

    INFO: task kworker/u8:1:57 blocked for more than 0.5 seconds.

followed by what it is blocked on, its stack, "Showing all locks held in the system" and the
Python stack of every task (the kernel prints the hung task's trace and, with
``hung_task_all_cpu_backtrace``, every CPU's).

Differences from the kernel:

* Each blocking episode is reported once (the kernel re-reports the same task each period
  until ``hung_task_warnings`` runs out); the finding's signature is the blocking object's
  name and the task's comm, so the same hang in another episode counts as a recurrence.
* Tasks parked at a test breakpoint are not hung, and neither is a task whose wait-for chain
  (lock -> owner -> what the owner waits on ...) reaches a parked task: a test holds them on
  purpose.
* Idle kthreads (kworkers waiting for work, khungtaskd itself) do not sleep through the wait
  tracker, as the kernel's sleep in TASK_IDLE / TASK_INTERRUPTIBLE, which it does not check.

Lock contract: ``blocked_on`` / ``blocked_since`` are written under the wait tracker's lock
(see :mod:`kmemcg.core.wait`); the watchdog reads each task's pair under that same lock so it
never pairs one episode's object with another's start time. ``_reported`` is guarded by
``_lock``.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any

from kmemcg.core import findings as F
from kmemcg.core.report import all_held_locks
from kmemcg.core.wait import owners_of

if TYPE_CHECKING:
    from kmemcg.core.findings import Finding
    from kmemcg.core.task import KThread, Task
    from kmemcg.kernel import Kernel

MIN_PERIOD = 0.05
_MAX_CHAIN = 64


def _obj_name(obj: Any) -> str:
    return getattr(obj, "name", None) or type(obj).__name__


class HungTaskWatchdog:
    """``k.hung_task``; :meth:`check` runs one scan (tests pass ``now`` to look ahead)."""

    def __init__(self, kernel: Kernel, timeout: float, start: bool = True) -> None:
        if timeout <= 0:
            raise ValueError(f"hung_task_timeout must be > 0, got {timeout}")
        self._k = kernel
        self.timeout = float(timeout)
        self.period = max(self.timeout / 4, MIN_PERIOD)
        self._lock = kernel.raw_lock()
        self._cond = threading.Condition(kernel.raw_lock())  # khungtaskd's sleep
        self._stop = False
        self._reported: dict[int, float] = {}  # pid -> blocked_since of the reported episode
        self.checks = 0
        self.thread: KThread | None = None
        kernel.on_shutdown(self.stop)
        if start:
            self.thread = kernel.kthread_run(self._main, name="khungtaskd")

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()

    def _main(self) -> None:
        k = self._k
        while True:
            with self._cond:
                if not self._stop:
                    self._cond.wait(self.period)
                if self._stop:
                    return
            if k.is_dead():
                return
            self.check()

    # ------------------------------------------------------------------ the scan
    def check(self, now: float | None = None) -> list[Finding]:
        """check_hung_uninterruptible_tasks(): report tasks blocked longer than the timeout
        as seen at ``now`` (default: the current time). Returns the new reports."""
        k = self._k
        now = time.monotonic() if now is None else now
        tasks = k.tasks.all()
        blocked: list[tuple[Task, Any, float]] = []
        with k.waits._lock:  # the lock blocked_on/blocked_since are written under
            for t in tasks:
                obj = t.blocked_on
                if obj is not None and now - t.blocked_since > self.timeout:
                    if t.parked_at is None and not self._held_by_parked(t):
                        blocked.append((t, obj, t.blocked_since))
        out = []
        with self._lock:
            self.checks += 1
            live = {t.pid for t in tasks}
            for pid in [p for p in self._reported if p not in live]:
                del self._reported[pid]
            fresh = []
            for t, obj, since in blocked:
                if self._reported.get(t.pid) != since:
                    self._reported[t.pid] = since
                    fresh.append((t, obj, since))
        for t, obj, since in fresh:
            out.append(self._report(t, obj, now - since))
        return out

    @staticmethod
    def _held_by_parked(task: Task) -> bool:
        """Does the wait-for chain from ``task`` reach a task parked at a breakpoint?
        Caller holds the wait tracker's lock (as the deadlock detector does)."""
        todo = [task]
        seen = {task.pid}
        while todo and len(seen) < _MAX_CHAIN:
            t = todo.pop()
            obj = t.blocked_on
            if obj is None:
                continue
            for o in owners_of(obj):
                if o.parked_at is not None:
                    return True
                if o.pid not in seen:
                    seen.add(o.pid)
                    todo.append(o)
        return False

    def _report(self, task: Task, obj: Any, elapsed: float) -> Finding:
        k = self._k
        name = _obj_name(obj)
        title = f"INFO: task {task.comm}:{task.pid} blocked for more than " \
                f"{self.timeout:g} seconds."

        def text() -> str:
            owners = ", ".join(o.name for o in owners_of(obj)) or "?"
            out = [title, "\n",
                   f"      {k.release_line()}\n",
                   '"echo 0 > /proc/sys/kernel/hung_task_timeout_secs" disables this message.\n',
                   f"task:{task.comm:<15} state:D pid:{task.pid:>5} blocked on ({name}) "
                   f"for {elapsed:.3f}s, held by: {owners}\n",
                   "Call Trace:\n", task.python_stack(),
                   all_held_locks(k),
                   "\nShowing stacks of all tasks:\n"]
            for t in k.tasks.all():
                out.append(f"{t.name}:\n{t.python_stack()}")
            return "".join(out)

        return k.findings.report(F.HUNG_TASK, title, f"{name}@{task.comm}", text,
                                 thread=task.name,
                                 extra={"task": task.name, "blocked_on": name,
                                        "seconds": round(elapsed, 3)})
