"""The run queue (kmemcg.core.sched): at most nr_cpus tasks on a CPU, sleepers off it, woken
sleepers first, the time slice, and the timeout that keeps a foreign block from stalling it."""

from __future__ import annotations

import threading
import time

import pytest

from kmemcg import Kernel, Task
from kmemcg.core.sched import RunQueue


def start(k: Kernel, fn, name: str) -> threading.Thread:
    return k.kthread_run(fn, name=name)


def test_no_more_tasks_run_than_cpus_and_every_task_gets_turns(kernel: Kernel) -> None:
    rq = kernel.rq = RunQueue(2, slice=0.002)
    lock = threading.Lock()
    running = [0]
    most = [0]
    ops: dict[str, int] = {}
    stop = threading.Event()

    def driver() -> None:
        task = kernel.current()
        try:
            while not stop.is_set():
                rq.cond_resched(task)
                with lock:
                    running[0] += 1
                    most[0] = max(most[0], running[0])
                time.sleep(0.0005)  # busy on the CPU: not a model sleep, the CPU is kept
                with lock:
                    running[0] -= 1
                    ops[task.comm] = ops.get(task.comm, 0) + 1
        finally:
            rq.give(task)

    threads = [start(kernel, driver, f"d{i}") for i in range(6)]
    time.sleep(0.5)
    stop.set()
    for t in threads:
        t.join(5)
    assert most[0] == 2  # both CPUs were used, never a third task
    assert sorted(ops) == [f"d{i}" for i in range(6)]  # nobody starved
    assert rq.overruns == 0
    assert rq.stats()["waits"] > 0


def test_a_sleeping_task_gives_its_cpu_to_a_waiting_one(kernel: Kernel) -> None:
    rq = kernel.rq = RunQueue(1, timeout=5.0)
    a_on = threading.Event()
    b_ran = threading.Event()

    def a() -> None:
        task = kernel.current()
        rq.take(task)
        a_on.set()
        kernel.schedule_timeout(task, 0.3)  # msleep(): off the CPU
        rq.give(task)

    def b() -> None:
        task = kernel.current()
        a_on.wait(5)
        rq.take(task)
        b_ran.set()
        rq.give(task)

    ta, tb = start(kernel, a, "a"), start(kernel, b, "b")
    assert b_ran.wait(0.25)  # within a's sleep: the CPU was handed over, not timed out
    ta.join(5)
    tb.join(5)
    assert rq.overruns == 0


def test_a_task_blocked_on_a_mutex_is_off_its_cpu(kernel: Kernel) -> None:
    """One CPU. The holder of m sleeps, the other task blocks on m; the holder must get the
    CPU back to release m. It can only if the blocked task gave it up (WaitTracker.wait)."""
    rq = kernel.rq = RunQueue(1, timeout=2.0)
    m = kernel.mutex("m")
    held = threading.Event()

    def holder() -> None:
        task = kernel.current()
        rq.take(task)
        with m:
            held.set()
            kernel.schedule_timeout(task, 0.1)
        rq.give(task)

    def waiter() -> None:
        task = kernel.current()
        held.wait(5)
        rq.take(task)
        with m:
            pass
        rq.give(task)

    t0 = time.monotonic()
    th, tw = start(kernel, holder, "holder"), start(kernel, waiter, "waiter")
    th.join(5)
    tw.join(5)
    assert rq.overruns == 0
    assert time.monotonic() - t0 < 1.5


def test_a_woken_sleeper_goes_before_new_work(kernel: Kernel) -> None:
    rq = kernel.rq = RunQueue(1, timeout=5.0)
    order: list[str] = []
    sleeping = threading.Event()
    queued = threading.Event()

    def sleeper() -> None:
        task = kernel.current()
        rq.take(task)
        with rq.off_cpu(task):  # the CPU goes to "hog"
            sleeping.set()
            queued.wait(5)
        order.append("sleeper")
        rq.give(task)

    def hog() -> None:
        task = kernel.current()
        sleeping.wait(5)
        rq.take(task)
        newcomer_t = start(kernel, newcomer, "newcomer")
        while not rq._new:  # the newcomer queues first ...
            time.sleep(0.001)
        queued.set()  # ... then the sleeper wakes and queues behind it
        while not rq._woken:
            time.sleep(0.001)
        rq.give(task)
        newcomer_t.join(5)

    def newcomer() -> None:
        task = kernel.current()
        rq.take(task)
        order.append("newcomer")
        rq.give(task)

    ts = start(kernel, sleeper, "sleeper")
    th = start(kernel, hog, "hog")
    ts.join(5)
    th.join(5)
    assert order == ["sleeper", "newcomer"]


@pytest.mark.parametrize("hold", ["mutex", "get_online_cpus"])
def test_a_woken_lock_holder_preempts_and_the_next_give_pays_for_it(kernels, hold: str) -> None:
    """One CPU. The holder of m (or of the 2012 hotplug design's read side, a refcount that
    lockdep did not see then) sleeps and its CPU goes to "other"; woken, the holder runs at
    once beside "other" (wakeup preemption) instead of queueing behind it. The CPU it gives
    back then pays that debt: "late", queued meanwhile, runs only once "other" gives up its
    CPU too."""
    kernel = kernels(hotplug="2012")
    rq = kernel.rq = RunQueue(1, timeout=5.0)
    m = kernel.mutex("m")
    lock, unlock = ((m.lock, m.unlock) if hold == "mutex" else
                    (kernel.hotplug.get_online_cpus, kernel.hotplug.put_online_cpus))
    sleeping, other_on, back_on = threading.Event(), threading.Event(), threading.Event()
    late_queued, holder_gave, late_ran = threading.Event(), threading.Event(), threading.Event()
    seen: dict[str, bool] = {}

    def holder() -> None:
        task = kernel.current()
        rq.take(task)
        lock()
        with rq.off_cpu(task):
            sleeping.set()
            other_on.wait(5)
        back_on.set()  # on a CPU again while "other" still holds the only one
        late_queued.wait(5)
        unlock()
        rq.give(task)
        holder_gave.set()

    def other() -> None:
        task = kernel.current()
        sleeping.wait(5)
        rq.take(task)
        other_on.set()
        seen["holder back before other gave"] = back_on.wait(2)
        late_t = start(kernel, late, "late")
        while not rq._new:
            time.sleep(0.001)
        late_queued.set()
        holder_gave.wait(5)
        time.sleep(0.05)
        seen["late ran on the holder's CPU"] = late_ran.is_set()
        rq.give(task)
        late_t.join(5)

    def late() -> None:
        task = kernel.current()
        rq.take(task)
        late_ran.set()
        rq.give(task)

    th, to = start(kernel, holder, "holder"), start(kernel, other, "other")
    th.join(10)
    to.join(10)
    assert seen == {"holder back before other gave": True, "late ran on the holder's CPU": False}
    assert late_ran.is_set()
    assert (rq.preempts, rq.overruns) == (1, 0)


def test_cond_resched_yields_only_when_the_slice_is_up_and_someone_waits(
        kernel: Kernel) -> None:
    rq = kernel.rq = RunQueue(1, slice=0.05, timeout=5.0)
    task = kernel.current()
    rq.cond_resched(task)
    got_it = threading.Event()

    def other() -> None:
        t = kernel.current()
        rq.take(t)
        got_it.set()
        rq.give(t)

    th = start(kernel, other, "other")
    while not rq._new:
        time.sleep(0.001)
    rq.cond_resched(task)  # within the slice: keeps the CPU
    assert not got_it.is_set()
    time.sleep(0.06)
    rq.cond_resched(task)  # slice used up, a waiter: it runs first, then this task again
    assert got_it.is_set()
    th.join(5)
    assert rq.give(task)


def test_a_task_stuck_outside_the_model_holds_no_cpu_forever(kernel: Kernel) -> None:
    """A block the model does not see (a raw lock) keeps the CPU; the waiter runs anyway after
    ``timeout`` and the run queue counts an overrun."""
    rq = kernel.rq = RunQueue(1, timeout=0.1)
    on = threading.Event()
    release = threading.Event()

    def stuck() -> None:
        task: Task = kernel.current()
        rq.take(task)
        on.set()
        release.wait(5)
        rq.give(task)

    ts = start(kernel, stuck, "stuck")
    on.wait(5)
    t0 = time.monotonic()
    rq.take(kernel.current())
    assert time.monotonic() - t0 < 2.0
    assert rq.overruns == 1
    assert not rq.give(kernel.current())  # it ran without a CPU: nothing to give back
    release.set()
    ts.join(5)


def test_preempt_disable_keeps_the_cpu_through_a_sleep(kernel: Kernel) -> None:
    rq = kernel.rq = RunQueue(1)
    task = kernel.current()
    rq.take(task)
    rq.preempt_disable(task)
    kernel.schedule_timeout(task, 0.001)  # a sleep under the driver's lock: CPU kept
    assert not rq.give(task)
    assert rq.stats()["switches"] == 1 and rq._free == 0
    rq.preempt_enable(task)
    assert rq.give(task) and rq._free == 1
