"""The run queue: at most ``nr_cpus`` tasks run at once, as on a machine with that many CPUs.

A kernel with 4 CPUs runs 4 tasks at a time; the other runnable tasks wait on a run queue, and
a task that sleeps (a contended mutex, a grace period, a flushed work, ``msleep``) gives its
CPU to the next one. Without this, 64 model tasks on CPython are 64 runnable OS threads that
fight for the GIL: at the stress driver's 0.1 ms switch interval each waiting thread wakes every
interval, and 64 threads spend most of their CPU time in futex calls (BENCHMARKS.md: 64
threads did 0.60-0.71 of 8 threads' operations per second, 0.79-0.92 with a run queue). Used
when ``kernel.rq`` is set: ``python -m stress`` sets it unless ``--no-run-queue`` (the default
since session 11, once detection with it matched detection without it); a ``Kernel`` made
directly, as in the tests, has none.

How it maps to the model:

- A driver task calls ``cond_resched()`` between two operations: it takes a CPU if it has
  none, and gives it to the next in line once it has run a time slice (``slice``, 3 ms).
- Every blocking wait of the model goes through :meth:`WaitTracker.wait`, and every
  perturbation sleep through :meth:`Kernel.schedule_timeout`: both give the CPU up for the
  sleep (``off_cpu()``), so a sleeping task never keeps a waiting one from running.
- A task coming back from a sleep goes to the *front* of the queue, as CFS favours woken
  sleepers over tasks that have been running. Woken sleepers and new operations queue apart,
  each first come first served; a CPU is handed to the oldest waiter, never grabbed by the
  task that just gave one back.
- A woken task that holds a lock (lockdep's held-lock list: a mutex, an rwsem, an RCU read
  section; or the 2012 hotplug design's get_online_cpus() refcount, which lockdep did not
  see) does not queue at all: it *preempts*, as CFS's wakeup preemption lets a woken sleeper
  run at once. The model cannot stop the task it would preempt in mid-operation, so it
  runs one task over ``nr_cpus`` instead, and the next CPU given back pays that debt rather
  than going to a waiter. Without it a mutex holder waits behind every woken task for each of
  its sleeps, and everyone behind the mutex waits with it: with 60 drivers on 4 CPUs the memcg
  creation works piled up behind memcg_cache_mutex for over 10 s, and in v3.6 a hotplug
  writer waited, holding cpu_hotplug.lock, for a queued reader that every get_online_cpus()
  then waited behind (hung tasks, BENCHMARKS.md). Without lockdep only the hotplug readers
  are known to hold a lock.
- ``preempt_disable()`` keeps a task's CPU through its sleeps: the stress drivers' own lock is
  held that way, like a spinlock, because the tasks that wait for it keep their CPUs too.

Where it differs from the kernel: there is no preemption inside an operation (CPython
switches threads under us anyway, among the tasks that hold a CPU); kworkers, the RCU
callback thread and the watchdog are not queued (they run beside the CPUs, like extra CPUs
of their own); a model CPU here is a slot, not the CPU ``this_cpu()`` names (a task's per-cpu
data still follows its placement by the hotplug model, and CPU hotplug does not change the
number of slots). And a task that waits longer than ``timeout`` runs without a CPU: a
blocking call that is not one of the model's waits could otherwise hold every CPU while the
task it waits for queues behind them. ``overruns`` counts those, so a run can show it stayed
rare.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kmemcg.core.task import Task

_ON_CPU = "rq_on_cpu"  # Task.extra key: the task holds one of the run queue's CPUs
_NO_RESCHED = "rq_no_resched"  # Task.extra key: preempt_disable() depth
_SLICE = "rq_slice"  # Task.extra key: when it got that CPU (monotonic)


class RunQueue:
    """``nr_cpus`` CPUs handed out first come, first served (woken sleepers first)."""

    def __init__(self, nr_cpus: int, slice: float = 0.003, timeout: float = 0.5) -> None:
        if nr_cpus < 1:
            raise ValueError(f"a run queue needs at least one CPU, got {nr_cpus}")
        self.nr_cpus = nr_cpus
        self.slice = slice
        self.timeout = timeout
        self._lock = threading.Lock()  # guards _free, the queues and the counters
        self._free = nr_cpus
        # One lock per waiter, held until a CPU is handed to it: a release wakes exactly the
        # task it is for, so a task that gives a CPU back cannot take it again before them.
        # Two queues, each first come first served: woken sleepers, then new operations.
        self._woken: deque[threading.Lock] = deque()
        self._new: deque[threading.Lock] = deque()
        self.switches = 0  # CPUs taken
        self.waits = 0  # takes that had to queue
        self.overruns = 0  # waits that gave up after ``timeout`` and ran anyway
        self.preempts = 0  # woken lock holders that ran at once, one over nr_cpus
        self.wait_s = 0.0  # total time spent queued

    def _waiting(self) -> bool:
        """Anyone queued for a CPU (an unlocked peek outside ``_lock``: deque truth tests are
        single reads)."""
        return bool(self._woken or self._new)

    def take(self, task: Task, woken: bool = False, preempt: bool = False) -> None:
        """Wait for a CPU (in the woken sleepers' queue, served first, if ``woken``), then run
        on it. With ``preempt``, run at once, on credit if no CPU is free."""
        if task.extra.get(_ON_CPU):
            return
        with self._lock:
            self.switches += 1
            if preempt or (self._free > 0 and not self._waiting()):
                if self._free <= 0:
                    self.preempts += 1
                self._free -= 1  # below 0: a debt the next give() pays
                task.extra[_ON_CPU] = True
                task.extra[_SLICE] = time.monotonic()
                return
            self.waits += 1
            me = threading.Lock()
            me.acquire()
            queue = self._woken if woken else self._new
            queue.append(me)
        t0 = time.monotonic()
        got = me.acquire(True, self.timeout)
        with self._lock:
            self.wait_s += time.monotonic() - t0
            if not got:
                try:
                    queue.remove(me)
                except ValueError:
                    got = True  # handed over between the timeout and this lock
                else:
                    self.overruns += 1
        task.extra[_ON_CPU] = got
        task.extra[_SLICE] = time.monotonic()

    def give(self, task: Task) -> bool:
        """Give the task's CPU (if it holds one) to the oldest waiter, or back to the pool.
        True if it held one."""
        if not task.extra.get(_ON_CPU) or task.extra.get(_NO_RESCHED):
            return False
        task.extra[_ON_CPU] = False
        with self._lock:
            queue = self._woken or self._new
            if queue and self._free >= 0:
                queue.popleft().release()  # the CPU passes to it directly
            else:
                self._free += 1
        return True

    @staticmethod
    def preempt_disable(task: Task) -> None:
        """Keep the CPU whatever the task waits for until preempt_enable() (spinlock-like
        sections of code the model does not see, such as the stress drivers' own lock)."""
        task.extra[_NO_RESCHED] = task.extra.get(_NO_RESCHED, 0) + 1

    @staticmethod
    def preempt_enable(task: Task) -> None:
        task.extra[_NO_RESCHED] -= 1

    def cond_resched(self, task: Task) -> None:
        """cond_resched() between two operations of a driver task: take a CPU if it has none;
        give it up for the next in line if its time slice is used up and someone waits."""
        if task.extra.get(_ON_CPU):
            if not self._waiting() or time.monotonic() - task.extra[_SLICE] < self.slice:
                return  # unlocked peek: a waiter that just came waits one more operation
            self.give(task)
        self.take(task)

    @contextmanager
    def off_cpu(self, task: Task) -> Iterator[None]:
        """A sleep: the CPU goes to the next task, and comes back (first in line, or at once
        for a task that holds a lock) after."""
        if not self.give(task):
            yield  # not a queued task (a kworker), or already running without a CPU
            return
        try:
            yield
        finally:
            self.take(task, woken=True, preempt=bool(task.held or task.hotplug_depth))

    def stats(self) -> dict[str, float]:
        with self._lock:
            return {"nr_cpus": self.nr_cpus, "switches": self.switches, "waits": self.waits,
                    "overruns": self.overruns, "preempts": self.preempts,
                    "wait_s": round(self.wait_s, 3)}
