"""Lockdep's reports read like the kernel's (print_circular_bug and friends)."""

from __future__ import annotations

import threading

import pytest

from kmemcg import Kernel
from kmemcg.core import findings as F
from kmemcg.locking.lockdep import MAX_LOCK_DEPTH

WAIT_S = 10.0


def _in_order(text: str, parts: list[str]) -> None:
    """Every part occurs in ``text``, each after the previous one."""
    pos = 0
    for p in parts:
        i = text.find(p, pos)
        assert i >= 0, f"{p!r} missing (or out of order) after offset {pos} in:\n{text}"
        pos = i + len(p)


def _sections(text: str) -> dict[str, str]:
    """The "-> #N (class):" entries of a circular report, each up to the next blank line."""
    out = {}
    for block in text.split("\n-> #")[1:]:
        n = block.split(" ", 1)[0]
        out[n] = block.split("\n\n", 1)[0]
    return out


def _nest(*locks) -> None:
    for m in locks:
        m.lock()
    for m in reversed(locks):
        m.unlock()


# ---------------------------------------------------------------------- circular
def test_circular_report_shape(kernel: Kernel) -> None:
    a, b = kernel.mutex("A"), kernel.mutex("B")
    a.lock()
    b.lock()  # A -> B, taken right here
    b.unlock()
    a.unlock()

    def inverse_order() -> None:
        b.lock()
        a.lock()  # B -> A closes the cycle
        a.unlock()
        b.unlock()

    inverse_order()
    (f,) = kernel.findings
    assert f.kind == F.CIRCULAR_LOCKING
    assert f.title == "WARNING: possible circular locking dependency detected"
    me = kernel.current().name
    _in_order(f.text, [
        "WARNING: possible circular locking dependency detected",
        f"{me} is trying to acquire lock:", "(A){+.+.}", "at: inverse_order [",
        "but task is already holding lock:", "(B){+.+.}",
        "which lock already depends on the new lock.",
        "the existing dependency chain (in reverse order) is:",
        "-> #1 (B)", "-> #0 (A)",
        "other info that might help us debug this:",
        "Possible unsafe locking scenario:",
        "CPU0", "CPU1", "----",
        "  lock(B);", "lock(A);", "lock(B);", "  lock(A);",
        "*** DEADLOCK ***",
        f"1 lock held by {me}:", " #0: ", "(B){+.+.}",
        "stack backtrace:", "inverse_order [",
    ])
    assert "Chain exists of:" not in f.text  # two classes: the scenario says it all
    sec = _sections(f.text)
    assert set(sec) == {"1", "0"}
    assert "test_circular_report_shape [test_lockdep_reports.py:" in sec["1"]
    assert "inverse_order [test_lockdep_reports.py:" in sec["0"]
    assert "inverse_order" not in sec["1"]
    d = f.to_dict()
    assert {"kind", "title", "signature", "count", "first_seen_s", "text"} <= set(d)
    assert d["kind"] == F.CIRCULAR_LOCKING and d["signature"] == "A+B" and d["count"] == 1
    assert d["text"] == f.text and d["first_seen_s"] >= 0


def test_circular_report_three_classes(kernel: Kernel) -> None:
    a, b, c = (kernel.mutex(n) for n in "ABC")

    def takes_a_b() -> None:
        _nest(a, b)

    def takes_b_c() -> None:
        _nest(b, c)

    def takes_c_a() -> None:
        _nest(c, a)

    # Each edge from its own task, one after the other: lockdep still sees the cycle.
    for fn in (takes_a_b, takes_b_c, takes_c_a):
        t = kernel.kthread_run(fn)
        t.join(WAIT_S)
        assert not t.is_alive()
    (f,) = kernel.findings
    assert f.signature == "A+B+C"
    assert "Chain exists of:\n  A --> B --> C\n" in f.text
    sec = _sections(f.text)
    assert set(sec) == {"2", "1", "0"}
    # #2 is C (taken under B), #1 is B (taken under A), #0 is A (the new acquisition).
    assert sec["2"].startswith("2 (C)") and "takes_b_c [" in sec["2"]
    assert sec["1"].startswith("1 (B)") and "takes_a_b [" in sec["1"]
    assert sec["0"].startswith("0 (A)") and "takes_c_a [" in sec["0"]
    assert "(first seen in takes_b_c/" in sec["2"]
    _in_order(f.text, ["CPU0", "CPU1", "  lock(C);", "lock(B);", "lock(C);", "  lock(A);",
                       "*** DEADLOCK ***", "1 lock held by takes_c_a/"])


def test_recursive_report(kernel: Kernel) -> None:
    x1, x2 = kernel.mutex("X"), kernel.mutex("X")

    def double_take() -> None:
        x1.lock()
        x2.lock()
        x2.unlock()
        x1.unlock()

    double_take()
    (f,) = kernel.findings
    assert f.kind == F.RECURSIVE_LOCKING and f.signature == "X"
    me = kernel.current().name
    _in_order(f.text, [
        "WARNING: possible recursive locking detected",
        f"{me} is trying to acquire lock:", f"{id(x2):016x} (X)",
        "but task is already holding lock:", f"{id(x1):016x} (X)",
        "other info that might help us debug this:",
        "Possible unsafe locking scenario:", "CPU0", "  lock(X);\n  lock(X);",
        "*** DEADLOCK ***",
        "May be due to missing lock nesting notation",
        f"1 lock held by {me}:",
        "stack backtrace:", "double_take [",
    ])
    assert "CPU1" not in f.text


def test_rwsem_read_recursion_report(kernel: Kernel) -> None:
    s = kernel.rwsem("S")
    s.down_read()
    s.down_read()  # not recursive: a writer arriving in between would deadlock it
    s.up_read()
    s.up_read()
    (f,) = kernel.findings
    assert f.kind == F.RECURSIVE_LOCKING
    assert "lock(S);\n  lock(S);" in f.text


# ---------------------------------------------------------------------- unlock balance
def test_bad_unlock_report(kernel: Kernel) -> None:
    a, b = kernel.mutex("A"), kernel.mutex("B")
    b.lock()

    def unlock_twice() -> None:
        a.lock()
        a.unlock()
        a.unlock()

    unlock_twice()
    b.unlock()
    (f,) = kernel.findings
    assert f.kind == F.BAD_UNLOCK
    me = kernel.current().name
    _in_order(f.text, [
        "WARNING: bad unlock balance detected!",
        f"{me} is trying to release lock (A) at:", "unlock_twice [",
        "but there are no more locks to release!",
        "other info that might help us debug this:",
        f"1 lock held by {me}:", "(B)",
        "stack backtrace:",
    ])
    assert kernel.current().held == []


def test_bad_unlock_of_lock_held_by_another_task(kernel: Kernel) -> None:
    a = kernel.mutex("A")
    held, done = threading.Event(), threading.Event()

    def holder() -> None:
        a.lock()
        held.set()
        assert done.wait(WAIT_S)
        a.unlock()

    t = kernel.kthread_run(holder)
    try:
        assert held.wait(WAIT_S)
        a.unlock()  # not ours: reported, and the mutex stays with its owner
        assert a.is_locked() and a.owner is t.task
    finally:
        done.set()
        t.join(WAIT_S)
    assert [f.kind for f in kernel.findings] == [F.BAD_UNLOCK]
    assert "no locks held by" in kernel.findings[0].text


def test_rwsem_bad_unlock(kernel: Kernel) -> None:
    s = kernel.rwsem("S")
    s.up_write()
    s.down_read()
    s.up_write()  # held for read, released as a writer
    s.up_read()
    fs = kernel.findings.of_kind(F.BAD_UNLOCK)
    assert fs and all("is trying to release lock (S)" in f.text for f in fs)
    assert kernel.current().held == []


# ---------------------------------------------------------------------- held at exit
def _wait_finding(k: Kernel, kind: str) -> list:
    got = threading.Event()
    k.findings.add_listener(lambda f: got.set() if f.kind == kind else None)
    if not k.findings.of_kind(kind):
        assert got.wait(WAIT_S), f"no {kind} finding"
    return k.findings.of_kind(kind)


def test_lock_held_by_exiting_kthread(kernel: Kernel) -> None:
    m = kernel.mutex("leaked")

    def forgets_to_unlock() -> None:
        m.lock()

    t = kernel.kthread_run(forgets_to_unlock, name="leaker")
    t.join(WAIT_S)
    assert not t.is_alive()
    (f,) = kernel.findings
    assert f.kind == F.LOCK_HELD_AT_EXIT and f.signature == "leaked"
    _in_order(f.text, ["WARNING: lock held when returning to user space!",
                       "leaker/", "is leaving the kernel with locks still held!",
                       "1 lock held by leaker/", "(leaked)", "forgets_to_unlock ["])


def test_lock_held_by_exiting_plain_thread(kernel: Kernel) -> None:
    m = kernel.mutex("leaked")
    seen = threading.Event()
    kernel.findings.add_listener(lambda f: seen.set())

    def forgets_to_unlock() -> None:
        m.lock()  # the first use registers this thread as a task of the kernel

    t = threading.Thread(target=forgets_to_unlock, name="plain")
    t.start()
    t.join(WAIT_S)
    assert not t.is_alive()
    (f,) = _wait_finding(kernel, F.LOCK_HELD_AT_EXIT)
    assert seen.is_set()
    _in_order(f.text, ["WARNING: lock held when returning to user space!",
                       "plain/", "is leaving the kernel with locks still held!", "(leaked)"])


def test_clean_exit_reports_nothing(kernel: Kernel) -> None:
    m = kernel.mutex("fine")
    t = kernel.kthread_run(lambda: _nest(m), name="tidy")
    t.join(WAIT_S)
    assert not t.is_alive()
    assert len(kernel.findings) == 0


# ---------------------------------------------------------------------- assert_held
def test_assert_held(kernel: Kernel) -> None:
    m = kernel.mutex("M")
    s = kernel.rwsem("S")
    m.lock()
    s.down_read()
    assert kernel.lockdep.assert_held(m) is True
    assert kernel.lockdep.assert_held(s) is True
    s.up_read()
    m.unlock()
    assert len(kernel.findings) == 0

    def caller_forgot_the_lock() -> bool:
        return kernel.lockdep.assert_held(m)

    assert caller_forgot_the_lock() is False
    (f,) = kernel.findings
    assert f.kind == F.ASSERT_HELD == "lockdep_assert_held"
    assert "lockdep_assert_held(M)" in f.title
    assert "caller_forgot_the_lock [" in f.text
    assert "no locks held by" in f.text
    assert caller_forgot_the_lock() is False
    assert len(kernel.findings) == 1 and f.count == 2


def test_assert_held_by_another_task_fails(kernel: Kernel) -> None:
    m = kernel.mutex("M")
    held, done = threading.Event(), threading.Event()

    def holder() -> None:
        m.lock()
        held.set()
        assert done.wait(WAIT_S)
        m.unlock()

    t = kernel.kthread_run(holder)
    try:
        assert held.wait(WAIT_S)
        assert kernel.lockdep.assert_held(m) is False
    finally:
        done.set()
        t.join(WAIT_S)
    assert [f.kind for f in kernel.findings] == [F.ASSERT_HELD]


# ---------------------------------------------------------------------- MAX_LOCK_DEPTH
@pytest.mark.parametrize("depth,expect", [(MAX_LOCK_DEPTH, False), (MAX_LOCK_DEPTH + 1, True)])
def test_max_lock_depth(kernel: Kernel, depth: int, expect: bool) -> None:
    locks = [kernel.mutex(f"L{i:02d}") for i in range(depth)]
    for m in locks:
        m.lock()
    assert len(kernel.current().held) == depth  # tracking goes on past the limit
    for m in reversed(locks):
        m.unlock()
    assert kernel.current().held == []
    fs = kernel.findings.snapshot()
    if not expect:
        assert fs == []
        return
    (f,) = fs
    assert f.kind == F.MAX_LOCK_DEPTH and f.title == "BUG: MAX_LOCK_DEPTH too low!"
    assert f"depth: {depth}  max: {MAX_LOCK_DEPTH}!" in f.text
    assert f"{depth} locks held by" in f.text
    # Still tracking: a cycle among the deep locks is found after the overflow.
    _nest(locks[-1], locks[0])
    assert [g.kind for g in kernel.findings] == [F.MAX_LOCK_DEPTH, F.CIRCULAR_LOCKING]


def test_max_lock_depth_out_of_order_unlock(kernel: Kernel) -> None:
    locks = [kernel.mutex(f"L{i:02d}") for i in range(MAX_LOCK_DEPTH + 1)]
    for m in locks:
        m.lock()
    for m in locks:  # unlock from the bottom: every unlock re-acquires all above it
        m.unlock()
    assert kernel.current().held == []
    assert [f.kind for f in kernel.findings] == [F.MAX_LOCK_DEPTH]


# ---------------------------------------------------------------------- held lock freed
def test_held_lock_freed_report(kernel: Kernel) -> None:
    m = kernel.mutex("M")
    m.lock()
    m.init()
    m.unlock()
    m.destroy()  # not held any more: fine
    (f,) = kernel.findings
    assert f.kind == F.HELD_LOCK_FREED
    _in_order(f.text, ["WARNING: held lock freed!", "is re-initializing", "(M)",
                       "with a lock still held there!", "1 lock held by", "stack backtrace:"])


def test_a_listener_may_take_model_locks_and_read_the_graph(kernel):
    """Listeners run after lockdep released graph_lock: taking a lock (a new chain, so a
    validation) or reading the graph from a listener must not self-deadlock."""
    k = kernel
    seen = []
    other = k.mutex("listener_lock")

    def listener(f):
        with other:
            seen.append((f.kind, len(k.lockdep_graph()["edges"])))

    k.findings.add_listener(listener)
    a, b = k.mutex("A"), k.mutex("B")
    with a, b:
        pass
    with b, a:
        pass
    assert seen and seen[0][0] == "circular_locking"
    assert seen[0][1] >= 2
