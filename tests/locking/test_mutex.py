"""struct mutex: real mutual exclusion, ownership, and the lockdep/debug checks on it."""

from __future__ import annotations

import threading
import time

import pytest

from kmemcg import Kernel
from kmemcg.core import findings as F
from kmemcg.testing import held_by_another_task, wait_until


def test_with_lock_unlock(kernel) -> None:
    m = kernel.mutex("m")
    me = kernel.current()
    assert not m.is_locked() and m.owner is None
    with m:
        assert m.is_locked() and m.is_held() and m.owner is me
        assert [e[0] for e in me.held] == [m]
    assert not m.is_locked() and m.owner is None and me.held == []
    m.lock()
    assert m.is_held()
    m.unlock()
    assert not m.is_held()
    assert len(kernel.findings) == 0


def test_with_releases_on_exception(kernel) -> None:
    m = kernel.mutex("m")
    with pytest.raises(KeyError), m:
        raise KeyError("x")
    assert not m.is_locked()
    assert kernel.current().held == []


def test_trylock(kernel) -> None:
    m = kernel.mutex("m")
    assert m.trylock() is True
    assert m.is_held()
    assert m.trylock() is False  # not recursive: the owner's trylock fails too
    m.unlock()
    with held_by_another_task(kernel, m):
        assert m.trylock() is False
        assert not m.is_held()
    assert m.trylock() is True
    m.unlock()
    assert len(kernel.findings) == 0


def test_is_held_only_for_the_calling_thread(kernel) -> None:
    m = kernel.mutex("m")
    seen = {}
    held, done = threading.Event(), threading.Event()

    def holder() -> None:
        with m:
            seen["in_holder"] = m.is_held()
            held.set()
            done.wait(5)

    t = kernel.kthread_run(holder, name="holder")
    assert held.wait(5)
    try:
        assert seen["in_holder"] is True
        assert m.is_locked()
        assert not m.is_held()  # locked, but not by this thread
        assert m.owner is t.task
    finally:
        done.set()
    t.join(5)
    assert m.owner is None


def test_contended_lock_really_blocks(kernel) -> None:
    m = kernel.mutex("m")
    got = threading.Event()

    def second() -> None:
        m.lock()
        got.set()
        m.unlock()

    m.lock()
    bp = kernel.breakpoints.add("lock_contended:m")  # T2 found it busy
    t = kernel.kthread_run(second, name="second")
    assert bp.wait(5) is t.task
    bp.release()
    assert wait_until(lambda: t.task.blocked_on is m)  # sleeping in the wait tracker
    assert not got.is_set()  # cannot have it: we hold it
    assert m.owner is kernel.current()
    m.unlock()
    assert got.wait(5)
    t.join(5)
    assert not t.is_alive()
    assert t.task.blocked_on is None
    assert len(kernel.findings) == 0


def _queue_waiters(kernel, m, n: int, order: list) -> list:
    """Start ``n`` tasks that lock ``m`` (held by the caller), one at a time: each is asleep on
    ``m`` before the next starts, so they queue in index order. Each records its turn."""
    ts = []
    for i in range(n):
        def waiter(i: int = i) -> None:
            with m:
                order.append(i)
        t = kernel.kthread_run(waiter, name=f"waiter{i}")
        assert wait_until(lambda t=t: t.task.blocked_on is m)
        ts.append(t)
    return ts


def test_waiters_get_the_mutex_first_come_first_served(kernel) -> None:
    """mutex->wait_list is FIFO: an unlock wakes the first sleeper only, so they get the mutex
    in the order they queued."""
    m = kernel.mutex("fifo")
    order: list = []
    m.lock()
    ts = _queue_waiters(kernel, m, 6, order)
    m.unlock()
    for t in ts:
        t.join(5)
    assert order == [0, 1, 2, 3, 4, 5]
    assert not m.is_locked() and len(kernel.findings) == 0


def test_a_waiter_that_lost_to_a_running_task_is_handed_the_mutex(kernel) -> None:
    """A running task may take the mutex before the woken waiter runs (optimistic spinning),
    but the waiter then asks for the handoff, and the next unlock hands it over: the running
    task that comes back for it waits (MUTEX_FLAG_HANDOFF). Without it, a task that unlocks and
    relocks in a loop keeps the mutex from a sleeper for as long as it likes."""
    m = kernel.mutex("handoff")
    turn = {"i": -1}
    order: list = []
    m.lock()
    (t,) = _queue_waiters(kernel, m, 1, order)
    for i in range(40):
        turn["i"] = i
        m.unlock()
        m.lock()  # at once: the woken waiter has not run yet, or it is handed the mutex
        if order:
            break
        # holding it: the waiter wakes, finds it taken and asks for it (MUTEX_FLAG_HANDOFF;
        # waited for, not slept on: a loaded machine may wake it late)
        wait_until(lambda: m._handoff, timeout=0.5)
    m.unlock()
    t.join(5)
    # the first unlock woke it; the second (or, if it ran in between, the first) handed over
    assert order == [0] and turn["i"] <= 1
    assert not m.is_locked()


def test_a_torn_down_waiter_leaves_the_queue(kernels) -> None:
    """A waiter that unwinds (teardown) is taken off the wait list: the next unlock frees the
    mutex instead of handing it to a task that is gone."""
    k = kernels()
    m = k.mutex("gone")
    order: list = []
    m.lock()
    (t,) = _queue_waiters(k, m, 1, order)
    k.shutdown(timeout=5.0)
    assert not t.is_alive() and order == []
    m.unlock()
    assert not m.is_locked()


def test_mutual_exclusion_under_contention(kernel) -> None:
    """Several threads increment a counter non-atomically (read, window, write) under the
    mutex; a breakpoint-free window still gives other threads the chance to run."""
    m = kernel.mutex("counter_lock")
    box = {"v": 0, "inside": 0, "max_inside": 0}
    n_threads, rounds = 4, 200
    start = threading.Barrier(n_threads)

    def worker() -> None:
        start.wait(5)
        for _ in range(rounds):
            with m:
                box["inside"] += 1
                box["max_inside"] = max(box["max_inside"], box["inside"])
                v = box["v"]
                time.sleep(0)  # yield inside the critical section
                box["v"] = v + 1
                box["inside"] -= 1

    ts = [kernel.kthread_run(worker, name=f"w{i}") for i in range(n_threads)]
    for t in ts:
        t.join(20)
    assert not any(t.is_alive() for t in ts)
    assert box["v"] == n_threads * rounds
    assert box["max_inside"] == 1
    assert len(kernel.findings) == 0


def test_assert_held(kernel) -> None:
    m = kernel.mutex("needs_lock")
    with m:
        assert kernel.lockdep.assert_held(m) is True
    assert len(kernel.findings) == 0
    assert kernel.lockdep.assert_held(m) is False
    [f] = kernel.findings.of_kind(F.ASSERT_HELD)
    assert "needs_lock" in f.title
    assert "test_assert_held" in f.title  # the failing call site
    assert f.thread == kernel.current().name


def test_assert_held_fails_when_another_thread_holds_it(kernel) -> None:
    m = kernel.mutex("needs_lock")
    with held_by_another_task(kernel, m):
        assert kernel.lockdep.assert_held(m) is False
    assert len(kernel.findings.of_kind(F.ASSERT_HELD)) == 1


def test_unlock_by_non_owner_is_bad_unlock_and_keeps_the_owner(kernel) -> None:
    m = kernel.mutex("owned")
    me = kernel.current()
    m.lock()
    t = kernel.kthread_run(m.unlock, name="intruder")
    t.join(5)
    [f] = kernel.findings.of_kind(F.BAD_UNLOCK)
    assert f.thread == t.task.name
    assert "owned" in f.text and "intruder" in f.text
    assert "but there are no more locks to release!" in f.text
    # still locked by its owner, who can go on using it
    assert m.is_locked() and m.owner is me and m.is_held()
    assert [e[0] for e in me.held] == [m]
    assert m.trylock() is False
    m.unlock()
    assert not m.is_locked()
    assert len(kernel.findings) == 1


def test_unlock_of_unlocked_mutex_is_bad_unlock(kernel) -> None:
    m = kernel.mutex("never_locked")
    m.unlock()
    with m:
        pass
    m.unlock()  # double unlock
    # one finding per (lock, function that unlocks), recurrences counted
    [f] = kernel.findings.snapshot()
    assert f.kind == F.BAD_UNLOCK and f.count == 2
    assert "never_locked" in f.text
    assert "test_unlock_of_unlocked_mutex_is_bad_unlock" in f.text
    assert not m.is_locked()


def test_init_or_destroy_of_held_mutex(kernel) -> None:
    m = kernel.mutex("freed_while_held")
    m.init()
    m.destroy()
    assert len(kernel.findings) == 0  # free: nothing to report
    with m:
        m.init()
        m.destroy()
    [f] = kernel.findings.of_kind(F.HELD_LOCK_FREED)
    assert f.count == 2  # same lock: one finding, counted
    assert "held lock freed" in f.title
    assert "freed_while_held" in f.text
    assert "re-initializing" in f.text  # the first occurrence's text


def test_destroy_of_a_mutex_held_by_another_task(kernel) -> None:
    m = kernel.mutex("other_holds_it")
    with held_by_another_task(kernel, m):
        m.destroy()
    [f] = kernel.findings.of_kind(F.HELD_LOCK_FREED)
    assert "holder" in f.text  # the holder's held locks are listed


def test_out_of_order_unlock_is_allowed(kernel) -> None:
    a, b = kernel.mutex("A"), kernel.mutex("B")
    a.lock()
    b.lock()
    a.unlock()
    b.unlock()
    assert len(kernel.findings) == 0
    assert kernel.current().held == []


def test_nested_subclass_is_not_recursive(kernel) -> None:
    parent, child = kernel.mutex("inode"), kernel.mutex("inode")
    with parent:
        child.lock(1)  # mutex_lock_nested(&child, SINGLE_DEPTH_NESTING)
        child.unlock()
    assert len(kernel.findings) == 0
    with parent:
        child.lock()  # same class, no annotation
        child.unlock()
    assert [f.kind for f in kernel.findings] == [F.RECURSIVE_LOCKING]


def test_mutex_lock_inside_rcu_read_section_is_reported(kernel) -> None:
    m = kernel.mutex("sleeps")
    me = kernel.current()
    me.rcu_nesting = 1  # as rcu_read_lock() leaves it
    try:
        assert m.trylock()  # does not sleep: fine
        m.unlock()
        assert len(kernel.findings) == 0
        with m:
            pass
    finally:
        me.rcu_nesting = 0
    [f] = kernel.findings.of_kind(F.SUSPICIOUS_RCU)
    assert "Illegal context switch in RCU read-side critical section" in f.text


def test_kernel_without_lockdep() -> None:
    with Kernel(name="nolockdep", lockdep=False) as k:
        a, b = k.mutex("A"), k.mutex("B")
        me = k.current()
        with a, b:
            assert a.is_held() and b.is_held()
        with b, a:  # ABBA in one thread: lockdep would report it
            pass
        assert me.held == []  # nothing tracked
        assert a.trylock() and not a.trylock()
        a.unlock()
        # contention and mutual exclusion still work
        got = threading.Event()
        a.lock()
        t = k.kthread_run(lambda: (a.lock(), got.set(), a.unlock()), name="waiter")
        assert wait_until(lambda: t.task is not None and t.task.blocked_on is a)
        assert not got.is_set()
        a.unlock()
        assert got.wait(5)
        t.join(5)
        assert len(k.findings) == 0
        assert k.lockdep.nr_edges == 0 and k.lockdep.nr_chains() == 0
        assert k.lockdep.edges() == []
