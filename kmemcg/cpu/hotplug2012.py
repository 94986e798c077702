"""The v3.6 CPU hotplug lock (kernel/cpu.c, 2012): ``struct cpu_hotplug``.

::

    struct cpu_hotplug { active_writer; mutex lock ("cpu_hotplug.lock"); int refcount; }

* get_online_cpus(): return if current is the active writer; lock; refcount++; unlock.
  A reader holds a COUNT, not the mutex: lockdep sees only a short lock/unlock of
  cpu_hotplug.lock, never the reader's exclusion of the writer.
* put_online_cpus(): return if current is the active writer; lock; refcount--; if it reached 0
  and a writer waits, wake it; unlock. Srivatsa Bhat's debug patch (seed 004) adds
  ``BUG_ON(refcount == 0)`` before the decrement: here a HOTPLUG_REFCOUNT finding.
* cpu_hotplug_begin(): active_writer = current; loop { lock; if refcount == 0 break, KEEPING
  the lock; unlock; sleep until woken }. cpu_hotplug_done(): active_writer = NULL; unlock.
  So the hotplug notifiers run holding cpu_hotplug.lock, and a notifier that calls
  get_online_cpus() returns at once (it is the active writer).

Why it matters (seed 004, commit 210ed9defffc): kmem_cache_destroy() took get_online_cpus(),
then slab_mutex, then rcu_barrier() -> get_online_cpus() -> cpu_hotplug.lock, while SLAB's
notifier takes slab_mutex under cpu_hotplug.lock. Lockdep reports the cycle; it cannot deadlock
because the destroyer's reader count keeps the writer out before it takes the mutex, unless a
put_online_cpus() imbalance dropped that count.

Underflow policy (``allow_underflow``): the debug patch's BUG_ON is always reported. By default
the model then clamps the count at 0 (no decrement, no wake-up), so one bad put does not break
the exclusion for everyone else. With ``allow_underflow = True`` it behaves like the historical
code without the BUG_ON: the count goes negative, the next get_online_cpus() brings it back to
0 while that reader runs, and a writer passes cpu_hotplug_begin() next to it: the imbalance
that makes seed 004's lockdep report a real deadlock.

Waking the writer: the kernel sets TASK_UNINTERRUPTIBLE before it unlocks, so a wake-up between
unlock and schedule() is not lost. The model clears a wake flag under the mutex before it
unlocks and sleeps (through the wait tracker) until put_online_cpus() sets it, also under the
mutex. ``refcount`` is guarded by ``lock``; ``active_writer`` is compared with the current task
without a lock, as in the kernel (only the writer itself can make it equal to itself).
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from kmemcg.core import findings as F
from kmemcg.core.report import banner, held_locks
from kmemcg.core.stacks import format_site, format_stack, frame_site
from kmemcg.cpu.hotplug import Hotplug

if TYPE_CHECKING:
    from kmemcg.core.task import Task
    from kmemcg.kernel import Kernel


class CpuHotplug2012(Hotplug):
    design = "2012"
    barrier_takes_hotplug = True

    def __init__(self, kernel: Kernel, nr_cpus: int) -> None:
        super().__init__(kernel, nr_cpus)
        self.lock = kernel.mutex("cpu_hotplug.lock")
        self.refcount = 0
        self.allow_underflow = False
        self._wake = threading.Condition(kernel.raw_lock())
        self._woken = False

    # ------------------------------------------------------------------ readers
    def get_online_cpus(self) -> None:
        task = self._k.current()
        if self.active_writer is task:
            return
        self.lock.lock()
        self.refcount += 1
        self.lock.unlock()
        task.hotplug_depth += 1

    def put_online_cpus(self) -> None:
        task = self._k.current()
        if self.active_writer is task:
            return
        self.lock.lock()
        try:
            if self.refcount <= 0:
                self._report_underflow(task)
                if not self.allow_underflow:
                    return
            self.refcount -= 1
            if self.refcount == 0 and self.active_writer is not None:
                with self._wake:  # wake_up_process(cpu_hotplug.active_writer)
                    self._woken = True
                    self._wake.notify_all()
        finally:
            self.lock.unlock()
            if task.hotplug_depth > 0:
                task.hotplug_depth -= 1

    def _report_underflow(self, task: Task) -> None:
        k = self._k
        site = frame_site(3)
        title = "kernel BUG at kernel/cpu.c: put_online_cpus() refcount underflow"
        count = self.refcount

        def text() -> str:
            return (banner(title, k)
                    + f"{task.name}: put_online_cpus() with cpu_hotplug.refcount == {count}"
                    + " (BUG_ON(cpu_hotplug.refcount == 0))\n"
                    + f"caller: {format_site(site)}\n"
                    + ("the count goes negative (historical code): the next get_online_cpus()"
                       " will not keep a hotplug writer out\n" if self.allow_underflow else
                       "the model clamps the count at 0\n")
                    + "\n" + held_locks(task)
                    + "\nCall Trace:\n" + format_stack(k.stacks.capture(2)))

        # One signature: once the count is off, every later put at zero trips the same BUG_ON;
        # the first caller (in the text) is the one to look at.
        k.findings.report(F.HOTPLUG_REFCOUNT, title, "cpu_hotplug.refcount", text,
                          thread=task.name, extra={"refcount": count})

    # ------------------------------------------------------------------ writer
    def cpu_hotplug_begin(self) -> None:
        k = self._k
        task = k.current()
        self.active_writer = task
        try:
            while True:
                self.lock.lock()
                if self.refcount == 0:
                    return  # keep the lock until cpu_hotplug_done()
                with self._wake:  # set_current_state(TASK_UNINTERRUPTIBLE)
                    self._woken = False
                self.lock.unlock()
                k.waits.wait(task, self, self._try_woken)
        except BaseException:
            self.active_writer = None
            raise

    def _try_woken(self, timeout: float) -> bool:
        with self._wake:
            if not self._woken:
                self._wake.wait(timeout)
            return self._woken

    def cpu_hotplug_done(self) -> None:
        self.active_writer = None
        self.lock.unlock()

    def cpus_held(self) -> bool:
        task = self._k.current()
        return task.hotplug_depth > 0 or self.active_writer is task

    def waiter_owners(self) -> list[Task]:
        """A writer sleeping in cpu_hotplug_begin() waits for the readers (racy read: the
        tasks with get_online_cpus() nesting > 0; blind to a leaked count)."""
        return [t for t in self._k.tasks.all() if t.hotplug_depth > 0]
