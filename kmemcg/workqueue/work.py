"""Work items, workers and workqueues (``struct work_struct``, ``struct worker``,
``struct workqueue_struct``): the worker loop and the state every operation works on.
See :mod:`kmemcg.workqueue` for the model and its differences from the kernel."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from kmemcg.workqueue import api

if TYPE_CHECKING:
    from kmemcg.core.task import KThread, Task
    from kmemcg.kernel import Kernel
    from kmemcg.locking.lockdep import LockdepMap
    from kmemcg.workqueue.subsys import Workqueues

WQ_DFL_ACTIVE = 256  # include/linux/workqueue.h
WQ_MAX_ACTIVE = 512
IDLE_WORKER_TIMEOUT = 5.0  # seconds; the kernel's is 300


class Work:
    """``struct work_struct``: ``Work(fn, *args, name=None)``; ``fn(*args)`` runs on a worker."""

    __slots__ = ("func", "args", "name", "_k", "_map", "_wq", "_list", "_seq", "_pending_seq",
                 "_ticket", "_running_seq", "_worker", "_canceling", "__weakref__")

    def __init__(self, func: Callable[..., Any], *args: Any, name: str | None = None) -> None:
        self.func = func
        self.args = args
        self.name = name or getattr(func, "__qualname__", None) or repr(func)
        self._k: Kernel | None = None  # bound at the first queue_work()
        self._map: LockdepMap | None = None
        self._wq: Workqueue | None = None  # workqueue of the pending (or last) instance
        self._list: deque | None = None  # the list the pending instance sits on
        self._seq = 0  # instances queued so far (instance numbers)
        self._pending_seq = 0  # instance waiting to run (0 = not pending)
        self._ticket = 0  # its ticket in _wq._outstanding
        self._running_seq = 0  # instance running now (0 = not running)
        self._worker: Worker | None = None  # the worker running it
        self._canceling = 0  # cancel_work_sync() in progress: queue_work() fails

    def __repr__(self) -> str:
        return f"<Work {self.name} pending={bool(self._pending_seq)} " \
               f"running={bool(self._running_seq)}>"

    @property
    def pending(self) -> bool:
        """work_pending(): queued and not yet started."""
        return bool(self._pending_seq)

    @property
    def running(self) -> bool:
        return bool(self._running_seq)

    def busy(self) -> bool:
        """work_busy() != 0: pending or running."""
        return bool(self._pending_seq or self._running_seq)

    def waiter_owners(self) -> list[Task]:
        """Who must act before a flusher of this work can go on: the worker running it, or,
        when the work is pending on a workqueue that may not start another worker, the busy
        workers of that workqueue (a flush from inside a max_active=1 workqueue waits for
        itself). Racy read, a hint for the wait-for detector."""
        w = self._worker
        if w is not None:
            return [w.task] if w.task is not None else []
        wq = self._wq
        if self._pending_seq and wq is not None:
            return wq.blocking_workers()
        return []


class Worker:
    """One kworker thread of a workqueue. Fields other than ``thread`` and ``task`` are
    guarded by the subsystem lock."""

    __slots__ = ("wq", "name", "thread", "task", "current", "inst", "scheduled")

    def __init__(self, wq: Workqueue, name: str) -> None:
        self.wq = wq
        self.name = name
        self.thread: KThread | None = None
        self.task: Task | None = None
        self.current: Work | None = None
        self.inst: tuple[Workqueue, int, int] | None = None  # (wq, seq, ticket) running now
        self.scheduled: deque[Work] = deque()  # works that collided with the running one


class Workqueue:
    """``struct workqueue_struct``. Use :func:`queue_work` etc. or the methods below."""

    def __init__(self, subsys: Workqueues, name: str, max_active: int) -> None:
        if max_active == 0:
            max_active = WQ_DFL_ACTIVE
        if not 1 <= max_active <= WQ_MAX_ACTIVE:
            raise ValueError(f"max_active {max_active} out of range 1..{WQ_MAX_ACTIVE}")
        self._s = subsys
        self._k = subsys._k
        self.name = name
        self.max_active = max_active
        self.map = subsys._k.lockdep_map(name)  # wq->lockdep_map
        self._worklist: deque[Work] = deque()
        self._cond = threading.Condition(subsys._lock)  # idle workers sleep here
        self._workers: list[Worker] = []
        self._idle = 0  # workers waiting for work (or starting)
        self._tickets = 0  # last ticket issued (one per queued instance)
        self._outstanding: set[int] = set()  # tickets queued or running (flush_workqueue)
        self._draining = 0
        self._destroyed = False
        self._stopping = False

    def __repr__(self) -> str:
        return f"<Workqueue {self.name} max_active={self.max_active}>"

    # Methods mirroring the module functions.
    def queue(self, work: Work) -> bool:
        return api.queue_work(self, work)

    def flush(self) -> None:
        api.flush_workqueue(self)

    def drain(self) -> None:
        api.drain_workqueue(self)

    def destroy(self) -> None:
        api.destroy_workqueue(self)

    @property
    def nr_workers(self) -> int:
        with self._s._lock:
            return len(self._workers)

    def worker_tasks(self) -> list[Task]:
        with self._s._lock:
            return [w.task for w in self._workers if w.task is not None]

    def blocking_workers(self) -> list[Task]:
        """Busy workers' tasks when no new worker may start (racy read, a hint)."""
        try:
            workers = list(self._workers)
        except RuntimeError:
            return []
        if len(workers) < self.max_active or self._idle:
            return []
        return [w.task for w in workers if w.task is not None and w.current is not None]

    def waiter_owners(self) -> list[Task]:
        """A flusher of the workqueue waits for its busy workers (racy read, a hint)."""
        try:
            return [w.task for w in list(self._workers)
                    if w.task is not None and w.current is not None]
        except RuntimeError:
            return []

    # ------------------------------------------------------------------ worker side
    def _worker_main(self, worker: Worker) -> None:
        k = self._k
        lock = self._s._lock
        worker.task = k.current()
        idle_since = time.monotonic()
        while True:
            with lock:
                while True:
                    if k.is_dead():
                        self._retire_locked(worker)
                        return
                    work = self._next_work_locked(worker)
                    if work is not None:
                        break
                    if self._stopping:
                        self._retire_locked(worker)
                        return
                    left = idle_since + IDLE_WORKER_TIMEOUT - time.monotonic()
                    if left <= 0 and self._idle > 1:
                        self._retire_locked(worker)
                        return
                    # Woken by queue_work, destroy and shutdown; the timeout only bounds the
                    # idle-timeout check.
                    self._cond.wait(min(left, 1.0) if left > 0 else 1.0)
                inst = self._start_locked(worker, work)
            try:
                self._s._process_one_work(worker, work, inst[0])
            finally:
                with lock:
                    self._finish_locked(worker, work, inst)
            idle_since = time.monotonic()

    def _next_work_locked(self, worker: Worker) -> Work | None:
        while True:
            if worker.scheduled:
                work = worker.scheduled.popleft()
            elif self._worklist:
                work = self._worklist.popleft()
            else:
                return None
            other = work._worker
            if other is not None and other is not worker:
                # Still running elsewhere: it runs after that instance, on that worker
                # (find_worker_executing_work() + move_linked_works()).
                other.scheduled.append(work)
                work._list = other.scheduled
                continue
            return work

    def _start_locked(self, worker: Worker, work: Work) -> tuple[Workqueue, int, int]:
        wq = work._wq
        assert wq is not None
        inst = (wq, work._pending_seq, work._ticket)
        # set_work_pool_and_clear_pending(): from here on the work may be queued again.
        work._list = None
        work._pending_seq = 0
        work._ticket = 0
        work._running_seq = inst[1]
        work._worker = worker
        worker.current = work
        worker.inst = inst
        self._idle -= 1
        return inst

    def _finish_locked(self, worker: Worker, work: Work, inst: tuple) -> None:
        if work._worker is worker:
            work._worker = None
            work._running_seq = 0
        worker.current = None
        worker.inst = None
        inst[0]._outstanding.discard(inst[2])
        self._idle += 1
        self._s._done.notify_all()

    def _retire_locked(self, worker: Worker) -> None:
        if worker in self._workers:
            self._workers.remove(worker)
            self._idle -= 1
        self._s._done.notify_all()
