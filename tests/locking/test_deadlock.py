"""Real deadlocks: tasks that do wait for each other are reported at once (wait-for cycle),
lockdep's prediction is there too, and teardown unwinds the stuck threads."""

from __future__ import annotations

import threading
import time

from kmemcg import Kernel
from kmemcg.core import findings as F
from kmemcg.testing import wait_until


def wait_for_finding(k: Kernel, kind: str, timeout: float = 5.0) -> list:
    """Bounded poll of the findings log (findings have listeners, but polling keeps the
    test independent of that API)."""
    deadline = time.monotonic() + timeout
    while not k.findings.of_kind(kind):
        if time.monotonic() > deadline:
            return []
        time.sleep(0.01)
    return k.findings.of_kind(kind)


def test_abba_real_deadlock_is_reported_and_torn_down() -> None:
    k = Kernel(name="abba")
    a, b = k.mutex("lock_A"), k.mutex("lock_B")
    a_held, b_held = threading.Event(), threading.Event()

    def take_a_then_b() -> None:
        with a:
            a_held.set()
            b_held.wait(5)
            with b:
                pass

    def take_b_then_a() -> None:
        with b:
            b_held.set()
            a_held.wait(5)
            with a:
                pass

    deadlocked_when_reported = []
    k.findings.add_listener(lambda f: deadlocked_when_reported.append((f.kind, k.deadlocked)))
    try:
        t1 = k.kthread_run(take_a_then_b, name="ab_task")
        t2 = k.kthread_run(take_b_then_a, name="ba_task")
        found = wait_for_finding(k, F.REAL_DEADLOCK)
        assert found, "the ABBA deadlock was not reported within 5 s"
        [f] = found
        assert sorted(f.extra["tasks"]) == sorted([t1.task.name, t2.task.name])
        assert f.extra["locks"] == ["lock_A", "lock_B"]
        assert f.title == "BUG: real deadlock: tasks wait for each other"
        for s in ("lock_A", "lock_B", t1.task.name, t2.task.name,
                  "take_a_then_b", "take_b_then_a"):  # the tasks' stacks are in the report
            assert s in f.text, s
        assert f"{t1.task.name} is blocked on (lock_B) held by {t2.task.name}" in f.text \
            or f"{t2.task.name} is blocked on (lock_A) held by {t1.task.name}" in f.text
        assert k.deadlocked
        # a listener of the finding (e.g. a driver's deadlock exit) already sees the flag;
        # listeners run in the reporting thread just after the finding is logged
        assert wait_until(lambda: any(kind == F.REAL_DEADLOCK
                                      for kind, _ in deadlocked_when_reported))
        assert (F.REAL_DEADLOCK, True) in deadlocked_when_reported
        [circ] = k.findings.of_kind(F.CIRCULAR_LOCKING)
        assert sorted(circ.extra["classes"]) == ["lock_A", "lock_B"]
        assert t1.is_alive() and t2.is_alive()  # really stuck
    finally:
        stuck = k.shutdown(timeout=5)
    assert stuck == []
    assert not t1.is_alive() and not t2.is_alive()
    # they unwound quietly (KernelTornDown), releasing what they held
    assert t1.exception is None and t2.exception is None
    assert not k.findings.of_kind(F.KTHREAD_EXCEPTION)
    assert not a.is_locked() and not b.is_locked()
    assert t1.task.blocked_on is None and t2.task.blocked_on is None


def test_three_task_cycle() -> None:
    k = Kernel(name="abc")
    locks = [k.mutex(n) for n in ("lock_A", "lock_B", "lock_C")]
    all_hold_first = threading.Barrier(3)

    def worker(i: int) -> None:
        first, second = locks[i], locks[(i + 1) % 3]
        with first:
            all_hold_first.wait(5)
            with second:
                pass

    try:
        ts = [k.kthread_run(worker, i, name=f"cyc{i}") for i in range(3)]
        found = wait_for_finding(k, F.REAL_DEADLOCK)
        assert found, "the 3-task deadlock was not reported within 5 s"
        [f] = found
        assert sorted(f.extra["tasks"]) == sorted(t.task.name for t in ts)
        assert f.extra["locks"] == ["lock_A", "lock_B", "lock_C"]
        assert k.deadlocked
        [circ] = k.findings.of_kind(F.CIRCULAR_LOCKING)
        assert sorted(circ.extra["classes"]) == ["lock_A", "lock_B", "lock_C"]
        assert "Chain exists of:" in circ.text
    finally:
        stuck = k.shutdown(timeout=5)
    assert stuck == []
    assert not any(t.is_alive() for t in ts)
    assert not k.findings.of_kind(F.KTHREAD_EXCEPTION)


def test_self_deadlock_on_one_mutex() -> None:
    """mutex_lock(m) twice: lockdep predicts it, the wait-for check sees a cycle of one."""
    k = Kernel(name="aa")
    m = k.mutex("lonely")

    def twice() -> None:
        with m, m:
            pass

    try:
        t = k.kthread_run(twice, name="twice")
        [f] = wait_for_finding(k, F.REAL_DEADLOCK)
        assert f.extra["tasks"] == [t.task.name]
        assert k.findings.of_kind(F.RECURSIVE_LOCKING)
    finally:
        stuck = k.shutdown(timeout=5)
    assert stuck == []
    assert not t.is_alive()
    assert not m.is_locked()


class _CycleChecks:
    """Counts the wait tracker's cycle checks; signals once ``n`` have run."""

    def __init__(self, k: Kernel, n: int) -> None:
        self.n = n
        self.calls = 0
        self.enough = threading.Event()
        self._lock = threading.Lock()
        self._orig = k.waits._find_cycle
        k.waits._find_cycle = self  # instance attribute shadows the method

    def __call__(self, task):
        r = self._orig(task)
        with self._lock:
            self.calls += 1
            if self.calls >= self.n:
                self.enough.set()
        return r


def test_blocked_behind_a_finite_holder_is_not_a_deadlock(kernel) -> None:
    """W waits for L1, whose holder H1 waits for L2, whose holder H2 is busy (not blocked in
    the model). A wait-for chain, but no cycle: not a deadlock, however long it lasts."""
    l1, l2 = kernel.mutex("L1"), kernel.mutex("L2")
    h2_in, h2_go, h1_in = threading.Event(), threading.Event(), threading.Event()
    checks = _CycleChecks(kernel, n=12)  # several polls of both waiters

    def h2() -> None:
        with l2:
            h2_in.set()
            h2_go.wait(10)  # "long but finite" work

    def h1() -> None:
        with l1:
            h1_in.set()
            with l2:
                pass

    def w() -> None:
        with l1:
            pass

    t_h2 = kernel.kthread_run(h2, name="h2")
    assert h2_in.wait(5)
    t_h1 = kernel.kthread_run(h1, name="h1")
    assert h1_in.wait(5)
    t_w = kernel.kthread_run(w, name="w")
    try:
        assert checks.enough.wait(5)
        assert t_w.task.blocked_on is l1 and t_h1.task.blocked_on is l2
        assert not kernel.findings.of_kind(F.REAL_DEADLOCK)
        assert not kernel.deadlocked
    finally:
        h2_go.set()
    for t in (t_h2, t_h1, t_w):
        t.join(5)
        assert not t.is_alive()
    assert len(kernel.findings) == 0


def test_lockdep_reports_abba_that_never_overlaps(kernel) -> None:
    """The converse: an ABBA whose halves run at different times never deadlocks, and only
    lockdep's prediction is reported."""
    a, b = kernel.mutex("lock_A"), kernel.mutex("lock_B")

    def ab() -> None:
        with a, b:
            pass

    def ba() -> None:
        with b, a:
            pass

    t = kernel.kthread_run(ab, name="ab")
    t.join(5)
    t = kernel.kthread_run(ba, name="ba")
    t.join(5)
    assert [f.kind for f in kernel.findings] == [F.CIRCULAR_LOCKING]
    assert not kernel.deadlocked


def test_a_sleeper_just_granted_what_it_waited_for_is_not_a_deadlock(kernel) -> None:
    """Found by a soak run under load: a cpu_down() writer descheduled for more than a poll
    period between getting the hotplug lock and clearing its wait state looked like a task
    blocked on a lock it holds (AA). Owning what it waits on counts only if it owned it when it
    began to wait (a recursive read behind a queued writer, a real AA)."""
    task = kernel.current()

    class Held:
        name = "x"

        def waiter_owners(self) -> list:
            return [task]

    try:
        task.blocked_on, task.blocked_owned = Held(), False
        assert kernel.waits._find_cycle(task) is None
        task.blocked_owned = True
        cycle = kernel.waits._find_cycle(task)
        assert cycle is not None and cycle[0][0] is task
    finally:
        task.blocked_on, task.blocked_owned = None, False
