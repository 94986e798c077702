"""call_rcu() and rcu_barrier()'s callback side (liburcu src/urcu-call-rcu-impl.h; the
kernel's rcu_do_batch() and _rcu_barrier() in kernel/rcu/tree.c).

Callbacks go to one of ``nr_queues`` queues (a ``call_rcu_data``), picked by the caller's
simulated CPU. Each queue has one callback thread, started on its first callback. The thread
takes the whole queue, waits for ONE grace period (``synchronize()``, so concurrent queues and
updaters share it), then runs the batch in FIFO order: a callback never runs before a grace
period that began after it was queued. An exception in a callback is a finding
(CALLBACK_EXCEPTION, with its traceback), except a KasanOops, which KASAN reported already; the
thread goes on with the next callback.

rcu_barrier() appends one completion callback to every queue that has ever been used and waits
until all of them ran: FIFO order per queue means every callback queued before the barrier ran
first.

Differences from the kernel and liburcu:

* The idle callback thread sleeps on its queue's condition without going through
  ``k.waits``: it is the kernel's TASK_INTERRUPTIBLE idle sleep of rcuc/rcuop kthreads, which
  the hung-task watchdog ignores. It is woken by call() and by teardown (shutdown hook), so a
  torn-down kernel never waits for it.
* No per-CPU segmented callback lists and no callback offloading knobs: one FIFO per queue.
* The busted flavor's callbacks also go through the queue (the kernel's rcu_busted invokes them
  at once); its grace periods do not wait, so the effect is the same.

Lock contract: a queue's ``cond`` guards ``cbs``, ``thread``, ``queued``; ``invoked`` and
``errors`` are written by the queue's thread only (read racily for statistics). A completion's
``cond`` guards its count. No lock here is held while calling out (callbacks, synchronize).
"""

from __future__ import annotations

import threading
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from kmemcg.core import findings as F
from kmemcg.core.kasan import KasanOops
from kmemcg.core.report import banner
from kmemcg.core.stacks import format_stack
from kmemcg.core.task import KernelTornDown

if TYPE_CHECKING:
    from kmemcg.core.task import Task
    from kmemcg.kernel import Kernel
    from kmemcg.rcu.update import RCU


def cb_name(fn: Callable[..., Any]) -> str:
    return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)


class _CBQueue:
    """One call_rcu_data: a FIFO of (fn, args) and the thread that runs it."""

    __slots__ = ("idx", "cond", "cbs", "thread", "task", "queued", "invoked", "errors")

    def __init__(self, k: Kernel, idx: int) -> None:
        self.idx = idx
        self.cond = threading.Condition(k.raw_lock())
        self.cbs: list[tuple[Callable[..., Any], tuple]] = []
        self.thread: Any = None
        self.task: Task | None = None
        self.queued = 0
        self.invoked = 0
        self.errors = 0


class _Completion:
    """struct completion for rcu_barrier(): ``count`` callbacks still to run. What a barrier
    caller sleeps on, for the wait tracker (its owners are the callback threads)."""

    __slots__ = ("name", "cond", "count", "_owners")

    def __init__(self, k: Kernel, count: int, owners: list[Task]) -> None:
        self.name = "rcu_barrier_completion"
        self.cond = threading.Condition(k.raw_lock())
        self.count = count
        self._owners = owners

    def complete(self) -> None:
        with self.cond:
            self.count -= 1
            if self.count == 0:
                self.cond.notify_all()

    def try_wait(self, timeout: float) -> bool:
        with self.cond:
            if self.count == 0:
                return True
            self.cond.wait(timeout)
            return self.count == 0

    def waiter_owners(self) -> list[Task]:
        return list(self._owners)


class CallRCU:
    """The callback side of one RCU instance."""

    def __init__(self, rcu: RCU, nr_queues: int = 1) -> None:
        if nr_queues < 1:
            raise ValueError("nr_queues must be >= 1")
        self._rcu = rcu
        self._k = rcu._k
        self._queues = [_CBQueue(self._k, i) for i in range(nr_queues)]

    # ------------------------------------------------------------------ call_rcu
    def call(self, task: Task, fn: Callable[..., Any], args: tuple) -> None:
        """call_rcu(): queue ``fn(*args)`` on the caller's CPU queue."""
        qs = self._queues
        q = qs[task.cpu % len(qs)]
        with q.cond:
            q.cbs.append((fn, args))
            q.queued += 1
            if q.thread is None:
                # Started under the queue lock so that a barrier sees either no thread and
                # no callback, or both. kthread_run raises KernelTornDown after teardown.
                q.thread = self._k.kthread_run(self._worker, q, name=f"rcuc/{q.idx}")
            else:
                q.cond.notify()

    def _worker(self, q: _CBQueue) -> None:
        k = self._k
        q.task = k.current()
        cond = q.cond
        while True:
            with cond:
                while not q.cbs:
                    # Checked under ``cond``: the shutdown hook sets the kernel dead, then
                    # notifies under ``cond``, so this sleep cannot miss it.
                    if k.is_dead():
                        return
                    cond.wait()
                batch, q.cbs = q.cbs, []
            # One grace period for the whole batch: it began after every callback in it was
            # queued (the batch was taken first), so it covers their pre-existing readers.
            self._rcu.synchronize()
            for fn, args in batch:
                if k._dispatch is not None:
                    k.event("rcu_callback", cb_name(fn))
                try:
                    fn(*args)
                except KernelTornDown:
                    raise
                except KasanOops:
                    q.errors += 1  # KASAN already reported it (its oops): no second finding
                except Exception as e:  # noqa: BLE001 - a finding; the thread survives
                    q.errors += 1
                    self._report(q, fn, e)
                q.invoked += 1

    def _report(self, q: _CBQueue, fn: Callable[..., Any], e: Exception) -> None:
        k = self._k
        name = cb_name(fn)
        title = f"WARNING: RCU callback {name} raised {type(e).__name__}: {e}"
        task = q.task
        stack = k.stacks.capture(frame=e.__traceback__.tb_frame) if e.__traceback__ else None

        def text() -> str:
            return "".join([
                banner(title, k),
                f"rcu_do_batch: callback {name} on {task.name if task else '?'} raised:\n",
                "".join(traceback.format_exception(e)),
                "\ncallback backtrace:\n",
                format_stack(stack),
            ])

        k.findings.report(F.CALLBACK_EXCEPTION, title, f"{name}:{type(e).__name__}", text,
                          thread=task.name if task else "?",
                          extra={"callback": name, "exception": type(e).__name__})

    # ------------------------------------------------------------------ rcu_barrier
    def is_callback_thread(self, task: Task) -> bool:
        return any(q.task is task for q in self._queues)

    def barrier_wait(self, task: Task) -> None:
        """_rcu_barrier()'s core: a completion callback at the tail of every used queue, then
        sleep (through the wait tracker) until all ran. Caller holds the barrier mutex."""
        k = self._k
        used = []
        for q in self._queues:
            with q.cond:
                if q.thread is not None:
                    used.append(q)
        if not used:
            return
        comp = _Completion(k, len(used), [q.task for q in used if q.task is not None])
        for q in used:
            with q.cond:
                q.cbs.append((comp.complete, ()))
                q.queued += 1
                q.cond.notify()
        k.waits.wait(task, comp, comp.try_wait)

    # ------------------------------------------------------------------ state
    def stats(self) -> tuple[int, int, int]:
        """(queued, invoked, errors) over all queues; racy reads of counters."""
        return (sum(q.queued for q in self._queues), sum(q.invoked for q in self._queues),
                sum(q.errors for q in self._queues))

    def shutdown(self) -> None:
        """Teardown: wake idle callback threads so they see the kernel is dead and end."""
        for q in self._queues:
            with q.cond:
                q.cond.notify_all()
