"""The workqueue API: queue_work, flush_work, cancel_work(_sync), flush_workqueue,
drain_workqueue, destroy_workqueue, schedule_work (kernel/workqueue.c)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kmemcg.kernel import Kernel
    from kmemcg.workqueue.subsys import Workqueues
    from kmemcg.workqueue.work import Work, Worker, Workqueue


def _wait(k: Kernel, obj: Any, pred: Callable[[], bool], done: threading.Condition) -> None:
    """Sleep through the wait tracker until ``pred()`` (read under the subsystem lock)."""
    def try_once(timeout: float) -> bool:
        with done:
            if pred():
                return True
            done.wait(timeout)
            return pred()

    k.waits.wait(k.current(), obj, try_once)


def queue_work(wq: Workqueue, work: Work) -> bool:
    """queue_work(): False if ``work`` is already pending (or being cancelled).

    The ``work_queue`` event comes after the work is marked pending and before it is put on
    the list (as the kernel's tracepoint in __queue_work()), so an instrument sees it before
    any worker can start it."""
    s = wq._s
    k = wq._k
    s._bind(work)
    d = k._dispatch
    spawn: Worker | None = None
    with s._lock:
        misuse = _misuse_locked(k, wq)
        if misuse is None:
            if work._pending_seq or work._canceling:
                return False
            work._seq += 1
            seq = work._pending_seq = work._seq  # test_and_set_bit(WORK_STRUCT_PENDING)
            work._wq = wq
            if d is None:
                spawn = _insert_locked(s, wq, work)
    if misuse is not None:
        s._report_misuse(wq, work, misuse)
        return False
    if d is not None:
        d("work_queue", k.current(), work)
        with s._lock:
            if work._pending_seq != seq:
                return True  # cancelled meanwhile
            misuse = _misuse_locked(k, wq)
            if misuse is None:
                spawn = _insert_locked(s, wq, work)
            else:
                work._pending_seq = 0
        if misuse is not None:
            s._report_misuse(wq, work, misuse)
            return False
    if spawn is not None:
        spawn.thread = k.kthread_run(wq._worker_main, spawn, name=spawn.name)
    return True


def _misuse_locked(k: Kernel, wq: Workqueue) -> str | None:
    if wq._destroyed:
        return "destroyed"
    if wq._draining:
        me = getattr(k._tls, "task", None)
        if not any(w.task is me for w in wq._workers):  # is_chained_work()
            return "draining"
    return None


def _insert_locked(s: Workqueues, wq: Workqueue, work: Work) -> Worker | None:
    """insert_work(): put the pending work on ``wq``; a new worker if none is free."""
    wq._tickets += 1
    work._ticket = wq._tickets
    wq._outstanding.add(wq._tickets)
    wq._worklist.append(work)
    work._list = wq._worklist
    if len(wq._worklist) > wq._idle and len(wq._workers) < wq.max_active:
        return s._new_worker_locked(wq)
    wq._cond.notify()
    return None


def schedule_work(k: Kernel, work: Work) -> bool:
    """schedule_work(): queue_work(system_wq, work)."""
    return queue_work(k.system_wq, work)


def _flush_lockdep(work: Work, wq: Workqueue | None) -> None:
    assert work._map is not None
    work._map.acquire()
    work._map.release()
    if wq is not None and wq.max_active == 1:
        # start_flush_work(): flushing from inside a single-threaded workqueue deadlocks.
        wq.map.acquire()
        wq.map.release()


def flush_work(work: Work) -> bool:
    """flush_work(): wait for the pending and the running instance to finish. True if it
    waited, False if the work was idle."""
    k = work._k
    if k is None:
        return False  # never queued
    s = k.workqueues
    with s._lock:
        target = work._pending_seq or work._running_seq
        wq = work._wq
    if not target:
        return False
    _flush_lockdep(work, wq)

    def finished() -> bool:
        return not (0 < work._pending_seq <= target or 0 < work._running_seq <= target)

    _wait(k, work, finished, s._done)
    return True


def cancel_work(work: Work) -> bool:
    """cancel_work(): remove the pending instance; do not wait. True if it was pending."""
    k = work._k
    if k is None:
        return False
    s = k.workqueues
    with s._lock:
        return _grab_pending_locked(s, work)


def _grab_pending_locked(s: Workqueues, work: Work) -> bool:
    if not work._pending_seq:
        return False
    if work._list is not None:
        work._list.remove(work)
        work._list = None
    if work._wq is not None:
        work._wq._outstanding.discard(work._ticket)
    work._pending_seq = 0
    work._ticket = 0
    s._done.notify_all()
    return True


def cancel_work_sync(work: Work) -> bool:
    """cancel_work_sync(): remove the pending instance and wait for a running one; the work
    cannot be queued meanwhile. True if it was pending."""
    k = work._k
    if k is None:
        return False
    s = k.workqueues
    with s._lock:
        work._canceling += 1  # WORK_OFFQ_CANCELING: queue_work() fails from here on
        was_pending = _grab_pending_locked(s, work)
        target = work._running_seq
        wq = work._wq
    try:
        if was_pending or target:
            _flush_lockdep(work, wq)
        if target:
            _wait(k, work, lambda: not 0 < work._running_seq <= target, s._done)
    finally:
        with s._lock:
            work._canceling -= 1
    return was_pending


def flush_workqueue(wq: Workqueue) -> None:
    """flush_workqueue(): wait for every work queued on ``wq`` before the call."""
    k = wq._k
    wq.map.acquire()
    wq.map.release()
    s = wq._s
    with s._lock:
        snap = wq._tickets
        if not wq._outstanding or min(wq._outstanding) > snap:
            return
    _wait(k, wq, lambda: not wq._outstanding or min(wq._outstanding) > snap, s._done)


def drain_workqueue(wq: Workqueue) -> None:
    """drain_workqueue(): flush until empty; meanwhile only the workqueue's own works may
    queue on it."""
    s = wq._s
    with s._lock:
        wq._draining += 1
    try:
        while True:
            flush_workqueue(wq)
            with s._lock:
                if not wq._outstanding:
                    return
    finally:
        with s._lock:
            wq._draining -= 1


def destroy_workqueue(wq: Workqueue) -> None:
    """destroy_workqueue(): drain, then stop and reap its workers."""
    k = wq._k
    s = wq._s
    with s._lock:
        wq._draining += 1  # stays raised: nothing may be queued any more
    drain_workqueue(wq)
    with s._lock:
        wq._destroyed = True
        wq._stopping = True
        me = threading.current_thread()
        threads = [w.thread for w in wq._workers if w.thread is not None and w.thread is not me]
        wq._cond.notify_all()

    def try_once(timeout: float) -> bool:
        alive = [t for t in threads if t.is_alive()]
        if not alive:
            return True
        alive[0].join(timeout)
        return not any(t.is_alive() for t in threads)

    k.waits.wait(k.current(), wq, try_once)
    with s._lock:
        if wq in s._wqs:
            s._wqs.remove(wq)
