"""Workqueues: queue/flush/cancel/destroy contracts, max_active, lockdep's flush maps, work
exceptions, events and teardown (kmemcg.workqueue)."""

from __future__ import annotations

import threading
import time

import pytest

from kmemcg import Instrument, Kernel
from kmemcg.core import findings as F
from kmemcg.testing import wait_until
from kmemcg.workqueue import (
    Work,
    cancel_work,
    cancel_work_sync,
    destroy_workqueue,
    flush_work,
    flush_workqueue,
    queue_work,
    schedule_work,
)

WAIT = 5.0


def gated_work(name: str = "gated") -> tuple[Work, threading.Event, threading.Event, list]:
    """A work that announces its start, then waits for ``gate``; records each run's end."""
    started, gate = threading.Event(), threading.Event()
    ends: list[int] = []

    def fn() -> None:
        started.set()
        assert gate.wait(WAIT)
        ends.append(1)

    return Work(fn, name=name), started, gate, ends


def test_work_runs_on_a_kworker(kernel: Kernel) -> None:
    wq = kernel.create_workqueue("test_wq")
    seen = []
    w = Work(lambda x: seen.append((x, threading.current_thread().name)), 42)
    assert queue_work(wq, w)
    flush_work(w)  # True if it had to wait, False if the work was already done
    [(x, thread)] = seen
    assert x == 42
    assert thread.startswith("kworker/u8:")  # 4 CPUs: unbound pools start at id 8
    assert w.name.endswith("<lambda>")
    assert not w.busy()
    assert not flush_work(w)  # idle: nothing to wait for


def test_queue_work_false_when_pending(kernel: Kernel) -> None:
    wq = kernel.create_workqueue("serial", max_active=1)
    blocker, started, gate, _ = gated_work("blocker")
    runs = []
    w = Work(lambda: runs.append(1), name="counted")
    assert queue_work(wq, blocker)
    assert started.wait(WAIT)
    assert queue_work(wq, w) is True
    assert w.pending
    assert queue_work(wq, w) is False  # already pending: not queued twice
    assert queue_work(kernel.system_wq, w) is False  # on any workqueue
    gate.set()
    flush_workqueue(wq)
    assert runs == [1]
    assert queue_work(wq, w) is True  # idle again: can be queued
    flush_work(w)
    assert runs == [1, 1]


def test_flush_work_waits_for_the_running_instance(kernel: Kernel) -> None:
    wq = kernel.create_workqueue("wq")
    w, started, gate, ends = gated_work()
    queue_work(wq, w)
    assert started.wait(WAIT)
    result = []
    flusher = kernel.kthread_run(lambda: result.append((flush_work(w), list(ends))),
                                 name="flusher")
    assert wait_until(lambda: flusher.task is not None and flusher.task.blocked_on is w)
    assert flusher.is_alive() and not result  # blocked while the work runs
    gate.set()
    flusher.join(WAIT)
    assert result == [(True, [1])]  # returned after the work finished


def test_flush_work_waits_for_a_pending_instance(kernel: Kernel) -> None:
    wq = kernel.create_workqueue("serial", max_active=1)
    blocker, started, gate, _ = gated_work("blocker")
    runs = []
    w = Work(lambda: runs.append(1), name="behind")
    queue_work(wq, blocker)
    assert started.wait(WAIT)
    queue_work(wq, w)
    threading.Timer(0.05, gate.set).start()  # the flush must outwait the blocker too
    assert flush_work(w)
    assert runs == [1]


def test_cancel_work_sync_of_pending_work_prevents_it(kernel: Kernel) -> None:
    wq = kernel.create_workqueue("serial", max_active=1)
    blocker, started, gate, _ = gated_work("blocker")
    runs = []
    w = Work(lambda: runs.append(1), name="victim")
    queue_work(wq, blocker)
    assert started.wait(WAIT)
    assert queue_work(wq, w)
    assert cancel_work_sync(w) is True
    assert not w.pending
    assert cancel_work_sync(w) is False  # nothing pending any more
    gate.set()
    flush_workqueue(wq)
    assert runs == []


def test_cancel_work_sync_waits_for_the_running_work(kernel: Kernel) -> None:
    wq = kernel.create_workqueue("wq")
    w, started, gate, ends = gated_work()
    queue_work(wq, w)
    assert started.wait(WAIT)
    result = []
    canceller = kernel.kthread_run(lambda: result.append((cancel_work_sync(w), list(ends))),
                                   name="canceller")
    assert wait_until(lambda: canceller.task is not None and canceller.task.blocked_on is w)
    assert not queue_work(wq, w)  # WORK_OFFQ_CANCELING: cannot be requeued meanwhile
    assert not result
    gate.set()
    canceller.join(WAIT)
    assert result == [(False, [1])]  # was running, not pending; returned after it finished
    assert queue_work(wq, w)  # usable again after the cancel
    gate.set()
    flush_work(w)


def test_cancel_work_does_not_wait(kernel: Kernel) -> None:
    wq = kernel.create_workqueue("serial", max_active=1)
    blocker, started, gate, ends = gated_work("blocker")
    queue_work(wq, blocker)
    assert started.wait(WAIT)
    assert cancel_work(blocker) is False  # running, not pending: nothing removed
    assert blocker.running and not ends
    gate.set()
    flush_workqueue(wq)


def test_max_active_limits_concurrency(kernel: Kernel) -> None:
    wq = kernel.create_workqueue("two", max_active=2)
    gate = threading.Event()
    lock = threading.Lock()
    running, peak, started = [0], [0], threading.Semaphore(0)

    def fn() -> None:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        started.release()
        assert gate.wait(WAIT)
        with lock:
            running[0] -= 1

    works = [Work(fn, name=f"w{i}") for i in range(5)]
    for w in works:
        assert queue_work(wq, w)
    assert started.acquire(timeout=WAIT) and started.acquire(timeout=WAIT)
    # Both workers are inside a work: no third worker may exist, the rest stay pending.
    assert wq.nr_workers == 2
    assert sum(w.running for w in works) == 2 and sum(w.pending for w in works) == 3
    gate.set()
    flush_workqueue(wq)
    assert peak[0] == 2 and running[0] == 0
    assert not any(w.busy() for w in works)


def test_max_active_1_serializes_in_order(kernel: Kernel) -> None:
    wq = kernel.create_workqueue("ordered", max_active=1)
    log: list[str] = []

    def fn(i: int) -> None:
        log.append(f"start{i}")
        time.sleep(0.001)  # give an overlapping worker (a bug) a chance to interleave
        log.append(f"end{i}")

    for i in range(8):
        queue_work(wq, Work(fn, i, name=f"w{i}"))
    flush_workqueue(wq)
    assert log == [x for i in range(8) for x in (f"start{i}", f"end{i}")]
    assert wq.nr_workers == 1


def test_requeue_while_running_does_not_run_concurrently(kernel: Kernel) -> None:
    wq = kernel.create_workqueue("wide", max_active=4)
    lock = threading.Lock()
    inside, overlap, count = [0], [0], [0]
    first_started, gate = threading.Event(), threading.Event()

    def fn() -> None:
        with lock:
            inside[0] += 1
            overlap[0] = max(overlap[0], inside[0])
            count[0] += 1
            n = count[0]
        if n == 1:
            first_started.set()
            assert gate.wait(WAIT)
        with lock:
            inside[0] -= 1

    w = Work(fn, name="self_excl")
    queue_work(wq, w)
    assert first_started.wait(WAIT)
    assert queue_work(wq, w)  # pending again while running; idle workers are available
    gate.set()
    assert flush_work(w)
    assert count[0] == 2 and overlap[0] == 1


def test_flush_workqueue_waits_for_all_queued_before(kernel: Kernel) -> None:
    wq = kernel.create_workqueue("wq", max_active=3)
    done = []
    lock = threading.Lock()

    def fn(i: int) -> None:
        time.sleep(0.002)
        with lock:
            done.append(i)

    for i in range(12):
        queue_work(wq, Work(fn, i, name=f"w{i}"))
    flush_workqueue(wq)
    assert sorted(done) == list(range(12))


def test_destroy_workqueue_drains_and_stops_workers(kernel: Kernel) -> None:
    wq = kernel.create_workqueue("doomed", max_active=2)
    done = []
    lock = threading.Lock()

    def fn(i: int) -> None:
        time.sleep(0.001)
        with lock:
            done.append(i)
            threads.add(threading.current_thread())
        if i == 0:  # chained work: a work of a draining workqueue may queue on it
            assert queue_work(wq, Work(fn, 100, name="chained"))

    threads: set[threading.Thread] = set()
    for i in range(10):
        queue_work(wq, Work(fn, i, name=f"w{i}"))
    destroy_workqueue(wq)
    assert sorted(done) == list(range(10)) + [100]
    assert 1 <= len(threads) <= 2 and not any(t.is_alive() for t in threads)
    assert wq.nr_workers == 0 and wq not in kernel.workqueues.workqueues()
    assert not kernel.findings.of_kind(F.WORKQUEUE)
    # Queueing on a destroyed workqueue is a bug: reported, refused.
    assert queue_work(wq, Work(fn, 200, name="late")) is False
    [f] = kernel.findings.of_kind(F.WORKQUEUE)
    assert f.title == "WARNING: queue_work() on destroyed workqueue doomed"
    kernel.findings.clear()


def test_queue_on_draining_workqueue_from_outside_is_refused(kernel: Kernel) -> None:
    wq = kernel.create_workqueue("draining", max_active=1)
    w, started, gate, _ = gated_work()
    queue_work(wq, w)
    assert started.wait(WAIT)
    drainer = kernel.kthread_run(destroy_workqueue, wq, name="drainer")
    assert wait_until(lambda: drainer.task is not None and drainer.task.blocked_on is wq)
    assert queue_work(wq, Work(lambda: None, name="outsider")) is False
    [f] = kernel.findings.of_kind(F.WORKQUEUE)
    assert "draining workqueue draining" in f.title
    gate.set()
    drainer.join(WAIT)
    assert not drainer.is_alive()
    kernel.findings.clear()


def test_flush_work_under_a_lock_the_work_takes_is_circular(kernel: Kernel) -> None:
    """flush_work() while holding M, M taken by the work: lockdep reports work -> M -> work
    though this run never deadlocks (the second run does not take M)."""
    wq = kernel.create_workqueue("wq")
    m = kernel.mutex("M")
    runs = []

    def fn() -> None:
        runs.append(1)
        if len(runs) == 1:
            with m:
                pass

    w = Work(fn, name="takes_M_work")
    queue_work(wq, w)
    flush_work(w)  # records takes_M_work -> M
    assert not kernel.findings
    with m:
        queue_work(wq, w)
        assert flush_work(w)  # M -> takes_M_work: the cycle
    assert runs == [1, 1]
    [f] = kernel.findings.of_kind(F.CIRCULAR_LOCKING)
    assert f.title == "WARNING: possible circular locking dependency detected"
    assert set(f.extra["classes"]) == {"M", "takes_M_work"}
    assert "(takes_M_work)" in f.text and "(M)" in f.text
    kernel.findings.clear()


def test_cancel_work_sync_under_a_lock_the_work_takes_is_circular(kernel: Kernel) -> None:
    """cancel_work_sync() of a pending work on a max_active=1 workqueue takes the work's and
    the workqueue's maps: both cycles through M2 are reported."""
    wq = kernel.create_workqueue("single", max_active=1)
    m = kernel.mutex("M2")
    first = []

    def fn() -> None:
        if not first:
            first.append(1)
            with m:
                pass

    w = Work(fn, name="m2_work")
    queue_work(wq, w)
    flush_workqueue(wq)  # records single -> m2_work -> M2
    blocker, started, gate, _ = gated_work("blocker")
    queue_work(wq, blocker)
    assert started.wait(WAIT)
    queue_work(wq, w)  # pending behind the blocker
    with m:
        assert cancel_work_sync(w) is True
    gate.set()
    classes = [set(f.extra["classes"]) for f in kernel.findings.of_kind(F.CIRCULAR_LOCKING)]
    assert {"M2", "m2_work"} in classes
    assert {"M2", "m2_work", "single"} in classes
    assert first == [1]  # the cancelled instance never ran
    kernel.findings.clear()


def test_flush_workqueue_under_a_lock_a_work_takes_is_circular(kernel: Kernel) -> None:
    wq = kernel.create_workqueue("wq3", max_active=4)
    m = kernel.mutex("M3")
    w = Work(lambda: m.lock() or m.unlock(), name="m3_work")
    queue_work(wq, w)
    flush_workqueue(wq)  # wq3 -> m3_work -> M3
    assert not kernel.findings
    with m:
        flush_workqueue(wq)  # nothing queued: no wait, but the map is taken all the same
    [f] = kernel.findings.of_kind(F.CIRCULAR_LOCKING)
    assert set(f.extra["classes"]) == {"M3", "m3_work", "wq3"}
    assert "Chain exists of:" in f.text
    kernel.findings.clear()


def test_flush_from_inside_a_single_threaded_workqueue_is_recursive(kernel: Kernel) -> None:
    """A work of a max_active=1 workqueue flushing another work of it: lockdep's wq-map
    recursion, and a real self-deadlock the wait-for detector reports; teardown unwinds."""
    wq = kernel.create_workqueue("st", max_active=1)
    other = Work(lambda: None, name="other")

    def fn() -> None:
        queue_work(wq, other)
        flush_work(other)  # other can only run after us

    queue_work(wq, Work(fn, name="flusher_work"))
    deadline = time.monotonic() + WAIT
    while not kernel.findings.of_kind(F.REAL_DEADLOCK) and time.monotonic() < deadline:
        time.sleep(0.01)
    kinds = {f.kind for f in kernel.findings}
    assert F.RECURSIVE_LOCKING in kinds
    assert F.REAL_DEADLOCK in kinds
    [rec] = kernel.findings.of_kind(F.RECURSIVE_LOCKING)
    assert rec.extra["classes"] == ["st"]
    workers = [w.thread for w in wq._workers]
    assert kernel.shutdown(timeout=5.0) == []
    assert not any(t.is_alive() for t in workers)


def test_work_exception_is_a_finding_and_the_worker_survives(kernel: Kernel) -> None:
    wq = kernel.create_workqueue("oops_wq", max_active=1)
    threads = []

    def boom() -> None:
        threads.append(threading.current_thread())
        raise ValueError("bad work")

    def fine() -> None:
        threads.append(threading.current_thread())

    queue_work(wq, Work(boom, name="boom_work"))
    queue_work(wq, Work(fine, name="fine_work"))
    flush_workqueue(wq)
    assert len(threads) == 2 and threads[0] is threads[1]  # same worker, still alive
    [f] = kernel.findings.of_kind(F.WORK_EXCEPTION)
    assert f.title == "BUG: work boom_work raised ValueError: bad work"
    assert f.extra["work"] == "boom_work"
    assert "Workqueue: oops_wq boom_work" in f.text
    assert "raise ValueError" in f.text and "boom [test_workqueue.py:" in f.text
    assert kernel.current().held == []
    kernel.findings.clear()


def test_work_leaking_a_lock_is_reported(kernel: Kernel) -> None:
    wq = kernel.create_workqueue("leaky", max_active=1)
    m = kernel.mutex("leaked_mutex")
    queue_work(wq, Work(m.lock, name="lock_and_return"))
    flush_workqueue(wq)
    [f] = kernel.findings.of_kind(F.WORKQUEUE)
    assert f.title.startswith("BUG: workqueue leaked lock or atomic: kworker/u8:")
    assert "last function: lock_and_return" in f.text and "leaked_mutex" in f.text
    kernel.findings.clear()
    kernel.shutdown()  # the worker still holds the mutex: teardown must not hang


def test_work_events(kernel: Kernel) -> None:
    class Recorder(Instrument):
        def __init__(self) -> None:
            self.seen: list[tuple[str, str, str]] = []

        def on_event(self, point, label, task, obj) -> None:
            if point.startswith("work_"):
                self.seen.append((point, label, task.comm))

    rec = Recorder()
    kernel.add_instrument(rec)
    w = Work(lambda: None, name="evt_work")
    queue_work(kernel.create_workqueue("evt"), w)
    flush_work(w)
    points = [(p, label) for p, label, _ in rec.seen]
    assert points == [("work_queue", "evt_work"), ("work_start", "evt_work"),
                      ("work_end", "evt_work")]
    assert rec.seen[0][2] == threading.current_thread().name
    assert rec.seen[1][2].startswith("kworker/")


def test_breakpoint_at_work_start(kernel: Kernel) -> None:
    bp = kernel.breakpoints.add("work_start:bp_work")
    ran = []
    w = Work(lambda: ran.append(1), name="bp_work")
    schedule_work(kernel, w)
    task = bp.wait(WAIT)
    assert task.comm.startswith("kworker/") and w.running and not ran
    bp.release()
    flush_work(w)
    assert ran == [1]


def test_system_wq(kernel: Kernel) -> None:
    assert kernel.system_wq is kernel.system_wq
    assert kernel.system_wq.name == "events" and kernel.system_wq.max_active == 256
    out = []
    w = Work(out.append, "x")
    assert schedule_work(kernel, w)
    flush_work(w)
    assert out == ["x"]


def test_bad_max_active_and_foreign_work() -> None:
    with Kernel(name="a") as a, Kernel(name="b") as b:
        with pytest.raises(ValueError):
            a.create_workqueue("x", max_active=1000)
        w = Work(lambda: None)
        queue_work(a.create_workqueue("qa"), w)
        flush_work(w)
        with pytest.raises(ValueError):
            queue_work(b.create_workqueue("qb"), w)


def test_shutdown_with_busy_and_idle_workers_leaves_no_thread() -> None:
    k = Kernel(name="wq_teardown")
    m = k.mutex("held_forever")
    m.lock()
    wq = k.create_workqueue("stuck")
    queue_work(wq, Work(m.lock, name="blocks_on_held_forever"))
    queue_work(k.system_wq, Work(lambda: None, name="idle_after"))
    flush_workqueue(k.system_wq)
    assert wait_until(lambda: any(t.blocked_on is m for t in wq.worker_tasks()))
    threads = [w.thread for q in k.workqueues.workqueues() for w in q._workers]
    assert k.shutdown(timeout=5.0) == []
    assert not any(t.is_alive() for t in threads)
    m.unlock()  # the test's own thread leaves nothing held
