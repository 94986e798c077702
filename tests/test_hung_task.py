"""The hung-task watchdog (kmemcg.hung_task): report text, once per blocking episode, parked
tasks, the khungtaskd thread, and teardown of a real deadlock."""

from __future__ import annotations

import threading
import time

import pytest

from kmemcg import Kernel
from kmemcg.core import findings as F
from kmemcg.testing import wait_until
from kmemcg.workqueue import Work, flush_work, queue_work

WAIT = 5.0
FAR = 1e6  # check(now=monotonic() + FAR): every blocked task is past any timeout


def finding_event(k: Kernel, kind: str) -> threading.Event:
    ev = threading.Event()
    k.findings.add_listener(lambda f: ev.set() if f.kind == kind else None)
    return ev


@pytest.fixture
def wk():
    """A kernel whose khungtaskd runs but would wait ~forever: tests scan with check()."""
    k = Kernel(name="hung", hung_task_timeout=1000.0)
    yield k
    assert k.shutdown(timeout=5.0) == []


def test_off_by_default(kernel: Kernel) -> None:
    assert kernel.hung_task is None
    assert not any(t.name == "khungtaskd" for t in threading.enumerate()
                   if getattr(t, "_kernel", None) is kernel)


def test_period_and_bad_timeout() -> None:
    with Kernel(hung_task_timeout=0.1) as k:
        assert k.hung_task.period == 0.05  # timeout/4, at least 50 ms
        assert k.hung_task.thread.name == "khungtaskd" and k.hung_task.thread.is_alive()
    with Kernel(hung_task_timeout=8) as k:
        assert k.hung_task.period == 2.0
    with pytest.raises(ValueError):
        Kernel(hung_task_timeout=0)


def test_hung_task_report_text() -> None:
    """A kthread blocked on a mutex the test holds, past a 0.3 s timeout: khungtaskd reports
    it with the kernel's first lines, the held locks of the system and every stack."""
    k = Kernel(name="hungtext", hung_task_timeout=0.3)
    m = k.mutex("stuck_mutex")
    got = finding_event(k, F.HUNG_TASK)
    m.lock()

    def blocked_fn() -> None:
        with m:
            pass

    try:
        t = k.kthread_run(blocked_fn, name="victim")
        assert got.wait(WAIT), "no hung-task report"
        [f] = k.findings.of_kind(F.HUNG_TASK)
        task = t.task
        assert f.title == f"INFO: task victim:{task.pid} blocked for more than 0.3 seconds."
        assert f.text.startswith(f.title)
        assert '"echo 0 > /proc/sys/kernel/hung_task_timeout_secs" disables this message.' \
            in f.text
        me = k.current()
        assert "blocked on (stuck_mutex)" in f.text and f"held by: {me.name}" in f.text
        assert "Showing all locks held in the system:" in f.text
        assert f"1 lock held by {me.name}:" in f.text and "(stuck_mutex)" in f.text
        assert "Showing stacks of all tasks:" in f.text
        assert "blocked_fn" in f.text  # the hung task's stack
        assert "test_hung_task_report_text" in f.text  # the holder's stack
        assert f.signature == "stuck_mutex@victim"
        assert f.extra["task"] == task.name and f.extra["blocked_on"] == "stuck_mutex"
        assert f.extra["seconds"] >= 0.3
    finally:
        m.unlock()
        t.join(WAIT)
        assert k.shutdown(timeout=5.0) == []
    assert not t.is_alive()


def test_reported_once_per_episode(wk: Kernel) -> None:
    m = wk.mutex("episodic")
    m.lock()
    second = threading.Event()

    def fn() -> None:
        with m:
            pass
        assert second.wait(WAIT)
        with m:
            pass

    t = wk.kthread_run(fn, name="twice")
    assert wait_until(lambda: t.task is not None and t.task.blocked_on is m)
    now = time.monotonic()
    assert wk.hung_task.check(now=now + 10) == []  # not yet: within the timeout
    [f] = wk.hung_task.check(now=now + FAR)
    assert wk.hung_task.check(now=now + FAR) == []  # same episode: not again
    assert f.count == 1
    m.unlock()
    assert wait_until(lambda: t.task.blocked_on is None)
    m.lock()
    second.set()
    assert wait_until(lambda: t.task.blocked_on is m)
    [g] = wk.hung_task.check(now=time.monotonic() + FAR)  # a new episode
    assert g is f and f.count == 2  # same signature: a recurrence
    m.unlock()
    t.join(WAIT)
    wk.findings.clear()


def test_parked_tasks_and_their_waiters_are_not_hung(wk: Kernel) -> None:
    """A task parked at a breakpoint holding a lock, and a task blocked on that lock: the
    test holds them on purpose. Once the parked task is released, a real hang is seen."""
    m = wk.mutex("parked_lock")
    bp = wk.breakpoints.add("window:holding", thread="parker")

    def parker() -> None:
        with m:
            wk.window("holding")

    p = wk.kthread_run(parker, name="parker")
    assert bp.wait(WAIT) is p.task
    w = wk.kthread_run(lambda: (m.lock(), m.unlock()), name="waiter")
    assert wait_until(lambda: w.task is not None and w.task.blocked_on is m)
    assert wk.hung_task.check(now=time.monotonic() + FAR) == []
    bp.release()
    p.join(WAIT)
    w.join(WAIT)
    assert not p.is_alive() and not w.is_alive()
    assert not wk.findings.of_kind(F.HUNG_TASK)


def test_hung_flush_work_and_hotplug_writer(wk: Kernel) -> None:
    """Other blocking waits are seen too: a flush_work() waiting for a stuck work, and a 2012
    hotplug writer waiting for a leaked reader count."""
    gate = threading.Event()
    w = Work(lambda: gate.wait(WAIT), name="slow_work")
    queue_work(wk.create_workqueue("slow"), w)
    f = wk.kthread_run(flush_work, w, name="flusher")
    assert wait_until(lambda: f.task is not None and f.task.blocked_on is w)
    [r] = wk.hung_task.check(now=time.monotonic() + FAR)
    assert r.signature == "slow_work@flusher"
    assert "blocked on (slow_work) for" in r.text and "held by: kworker/u8:" in r.text
    gate.set()
    f.join(WAIT)
    wk.findings.clear()

    with Kernel(name="hung2012", hotplug="2012", hung_task_timeout=1000.0) as k:
        hp = k.hotplug
        hp.get_online_cpus()  # a reader that never puts: the writer waits for ever
        wr = k.kthread_run(hp.cpu_down, 1, name="cpu_down")
        assert wait_until(lambda: wr.task is not None and wr.task.blocked_on is hp)
        [r] = k.hung_task.check(now=time.monotonic() + FAR)
        assert r.signature == "cpu_hotplug@cpu_down"
        assert f"held by: {k.current().name}" in r.text  # the reader it waits for
        hp.put_online_cpus()
        wr.join(WAIT)
        assert wr.result == 0


def test_real_abba_deadlock_hung_task_and_teardown() -> None:
    """Two kthreads in a real ABBA: the wait-for cycle is reported at once, khungtaskd reports
    the hung tasks after 0.5 s, and shutdown leaves no thread behind."""
    k = Kernel(name="abba-hung", hung_task_timeout=0.5)
    a, b = k.mutex("abba_A"), k.mutex("abba_B")
    both = threading.Barrier(2)
    hung = finding_event(k, F.HUNG_TASK)

    def ab() -> None:
        with a:
            both.wait(WAIT)
            with b:
                pass

    def ba() -> None:
        with b:
            both.wait(WAIT)
            with a:
                pass

    t1 = k.kthread_run(ab, name="ab")
    t2 = k.kthread_run(ba, name="ba")
    try:
        assert hung.wait(WAIT), "no hung-task report within 5 s"
        kinds = {f.kind for f in k.findings}
        assert {F.REAL_DEADLOCK, F.CIRCULAR_LOCKING, F.HUNG_TASK} <= kinds
        reports = k.findings.of_kind(F.HUNG_TASK)
        assert {r.extra["task"] for r in reports} <= {t1.task.name, t2.task.name}
        assert "blocked for more than 0.5 seconds." in reports[0].title
    finally:
        stuck = k.shutdown(timeout=5.0)
    assert stuck == []
    assert not t1.is_alive() and not t2.is_alive()
    assert not k.hung_task.thread.is_alive()
