"""The workqueue subsystem of one kernel (``k.workqueues``): the lock, worker names, the
work lockdep maps, ``process_one_work()`` and the workqueue reports."""

from __future__ import annotations

import itertools
import threading
import traceback
from typing import TYPE_CHECKING

from kmemcg.core import findings as F
from kmemcg.core.kasan import KasanOops
from kmemcg.core.report import banner, held_locks
from kmemcg.core.stacks import format_stack
from kmemcg.core.task import KernelTornDown
from kmemcg.workqueue.work import WQ_DFL_ACTIVE, Work, Worker, Workqueue

if TYPE_CHECKING:
    from kmemcg.core.task import Task
    from kmemcg.kernel import Kernel
    from kmemcg.locking.lockdep import LockdepMap


class Workqueues:
    """The kernel's workqueue subsystem: the lock, the worker names, the work lockdep maps."""

    def __init__(self, kernel: Kernel, pool_id: int = 8) -> None:
        self._k = kernel
        self._lock = kernel.raw_lock()
        self._done = threading.Condition(self._lock)  # a work finished / a worker left
        self._wqs: list[Workqueue] = []
        self._ids = itertools.count(1)
        self._pool_id = pool_id  # "u8" in kworker/u8:N: the first unbound pool id
        self._maps: dict[str, LockdepMap] = {}  # work class name -> map
        self._system_wq: Workqueue | None = None
        kernel.on_shutdown(self._shutdown)

    def create(self, name: str, max_active: int = 0) -> Workqueue:
        """alloc_workqueue(name, 0, max_active); 0 = WQ_DFL_ACTIVE (256)."""
        self._k.check_alive()
        wq = Workqueue(self, name, max_active)
        with self._lock:
            self._wqs.append(wq)
        return wq

    @property
    def system_wq(self) -> Workqueue:
        """system_wq ("events"), created on first use."""
        with self._lock:
            wq = self._system_wq
        if wq is None:
            new = Workqueue(self, "events", WQ_DFL_ACTIVE)
            with self._lock:
                if self._system_wq is None:
                    self._system_wq = new
                    self._wqs.append(new)
                wq = self._system_wq
        return wq

    def workqueues(self) -> list[Workqueue]:
        with self._lock:
            return list(self._wqs)

    def _work_map(self, name: str) -> LockdepMap:
        with self._lock:
            m = self._maps.get(name)
        if m is None:
            m = self._k.lockdep_map(name)  # registers the class: outside our raw lock
            with self._lock:
                m = self._maps.setdefault(name, m)
        return m

    def _bind(self, work: Work) -> None:
        if work._k is self._k:
            return
        if work._k is not None:
            raise ValueError(f"work {work.name} belongs to another kernel")
        m = self._work_map(work.name)
        with self._lock:
            if work._k is None:
                work._map = m
                work._k = self._k

    def _new_worker_locked(self, wq: Workqueue) -> Worker:
        w = Worker(wq, f"kworker/u{self._pool_id}:{next(self._ids)}")
        wq._workers.append(w)
        wq._idle += 1  # a starting worker takes the next item like an idle one
        return w

    # ------------------------------------------------------------------ process_one_work
    def _process_one_work(self, worker: Worker, work: Work, wq: Workqueue) -> None:
        k = self._k
        task = worker.task
        assert task is not None and work._map is not None
        d = k._dispatch
        if d is not None:
            d("work_start", task, work)
        wmap = work._map
        depth = len(task.held)
        rcu = task.rcu_nesting
        wq.map.acquire()  # lock_map_acquire(&pwq->wq->lockdep_map)
        wmap.acquire()  # lock_map_acquire(&lockdep_map), the work's
        try:
            work.func(*work.args)
        except KernelTornDown:
            raise
        except KasanOops:
            pass  # KASAN reported it already (the oops): no second finding
        except Exception as e:  # noqa: BLE001 - reported as the kernel would oops
            self._report_exception(task, work, wq, e)
        if len(task.held) != depth + 2 or task.rcu_nesting != rcu:
            self._report_leak(task, work, wq)
        wmap.release()
        wq.map.release()
        if d is not None:
            d("work_end", task, work)

    def _report_exception(self, task: Task, work: Work, wq: Workqueue,
                          e: BaseException) -> None:
        k = self._k
        title = f"BUG: work {work.name} raised {type(e).__name__}: {e}"
        tb = e.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        stack = k.stacks.capture(frame=tb.tb_frame) if tb is not None else None
        text_tb = "".join(traceback.format_exception(e))

        def text() -> str:
            return (banner(title, k)
                    + f"CPU: {task.cpu} PID: {task.pid} Comm: {task.comm}\n"
                    + f"Workqueue: {wq.name} {work.name}\n"
                    + text_tb + "Call Trace:\n" + format_stack(stack) + "\n"
                    + held_locks(task))

        k.findings.report(F.WORK_EXCEPTION, title, f"{work.name}:{type(e).__name__}", text,
                          thread=task.name, extra={"work": work.name, "workqueue": wq.name,
                                                   "exception": repr(e)})

    def _report_leak(self, task: Task, work: Work, wq: Workqueue) -> None:
        k = self._k
        title = f"BUG: workqueue leaked lock or atomic: {task.comm}"

        def text() -> str:
            return (banner(title, k)
                    + f"     last function: {work.name} (workqueue {wq.name})\n"
                    + f"     rcu_read_lock nesting: {task.rcu_nesting}\n"
                    + held_locks(task)
                    + "\nstack backtrace:\n" + format_stack(k.stacks.capture(1)))

        k.findings.report(F.WORKQUEUE, title, f"leak:{work.name}", text, thread=task.name,
                          extra={"work": work.name, "workqueue": wq.name})

    def _report_misuse(self, wq: Workqueue, work: Work, what: str) -> None:
        k = self._k
        task = k.current()
        title = f"WARNING: queue_work() on {what} workqueue {wq.name}"

        def text() -> str:
            return (banner(title, k)
                    + f"{task.name} queues work {work.name} on {what} workqueue {wq.name}\n"
                    + held_locks(task)
                    + "\nstack backtrace:\n" + format_stack(k.stacks.capture(1)))

        k.findings.report(F.WORKQUEUE, title, f"{what}:{wq.name}:{work.name}", text,
                          thread=task.name, extra={"work": work.name, "workqueue": wq.name})

    # ------------------------------------------------------------------ teardown
    def _shutdown(self) -> None:
        """Kernel shutdown hook: wake every idle worker and flusher; they see the dead kernel
        and end (a worker inside a work unwinds at its next blocking point)."""
        with self._lock:
            for wq in self._wqs:
                wq._stopping = True
                wq._cond.notify_all()
            self._done.notify_all()
