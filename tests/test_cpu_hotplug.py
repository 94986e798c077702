"""CPU hotplug: both lock designs, cpu_up/cpu_down and the notifier chain, per-CPU helpers and
task placement (kmemcg.cpu)."""

from __future__ import annotations

import threading
import time

import pytest

from kmemcg import Instrument, Kernel
from kmemcg.core import findings as F
from kmemcg.cpu import (
    DEAD,
    DOWN_PREPARE,
    EBUSY,
    EINVAL,
    ONLINE,
    UP_PREPARE,
    PerCpu,
    for_each_online_cpu,
    on_each_cpu_cond,
)
from kmemcg.testing import wait_until

WAIT = 5.0
DESIGNS = ["2012", "percpu_rwsem"]


@pytest.fixture(params=DESIGNS)
def hk(request):
    k = Kernel(name=f"hotplug-{request.param}", hotplug=request.param)
    yield k
    assert k.shutdown(timeout=5.0) == []


def test_designs_and_defaults() -> None:
    with Kernel() as k:
        assert k.hotplug.design == "percpu_rwsem" and not k.hotplug.barrier_takes_hotplug
        assert k.hotplug.nr_cpus == 4 and k.hotplug.online_cpus() == [0, 1, 2, 3]
    with Kernel(hotplug="2012", cpus=2) as k:
        assert k.hotplug.design == "2012" and k.hotplug.barrier_takes_hotplug
        assert k.hotplug.lock.name == "cpu_hotplug.lock"
        assert k.hotplug.online_cpus() == [0, 1]
    with pytest.raises(ValueError):
        Kernel(hotplug="bogus")
    with pytest.raises(ValueError):
        Kernel(cpus=0)


@pytest.mark.parametrize("design", DESIGNS)
def test_hotplug_storm_writer_excludes_readers(design: str) -> None:
    """Readers loop over get/put_online_cpus while a writer takes CPU 3 down and up. The
    model must keep them apart: the notifiers (run with the write side held) see no reader
    inside, readers see no operation start or finish inside their section, nothing is
    reported, nothing hangs."""
    k = Kernel(name=f"storm-{design}", hotplug=design)
    hp = k.hotplug
    in_op = [False]
    inside = [0]  # readers inside a get/put section
    violations: list[str] = []
    sections = [0]
    count_lock = threading.Lock()

    def notifier(event: str, cpu: int) -> None:
        with count_lock:
            if inside[0]:
                violations.append(f"{event}: {inside[0]} reader(s) inside")
        in_op[0] = event in (UP_PREPARE, DOWN_PREPARE)
        time.sleep(0.0001)  # widen the operation

    hp.register_notifier(notifier)
    start = threading.Barrier(5)
    cycles = [0]
    readers_left = [4]

    def reader(i: int) -> None:
        start.wait(WAIT)
        for _ in range(100):
            hp.get_online_cpus()
            try:
                with count_lock:
                    inside[0] += 1
                ops = hp.nr_hotplug_ops
                if in_op[0]:
                    violations.append(f"reader {i} entered during a hotplug operation")
                time.sleep(0.0001)  # let the writer run if it can
                if in_op[0] or hp.nr_hotplug_ops != ops:
                    violations.append(f"reader {i}: hotplug operation inside its section")
                with count_lock:
                    inside[0] -= 1
            finally:
                hp.put_online_cpus()
            with count_lock:
                sections[0] += 1
        with count_lock:
            readers_left[0] -= 1

    def writer() -> None:
        start.wait(WAIT)
        while readers_left[0] or cycles[0] < 10:  # for as long as the readers run
            assert hp.cpu_down(3) == 0
            assert hp.cpu_up(3) == 0
            cycles[0] += 1
            # The model's rwsem has no FIFO hand-off to waiting readers: a writer that
            # re-takes it at once would starve them (the kernel's queue would not).
            time.sleep(0.0005)

    try:
        threads = [k.kthread_run(reader, i, name=f"reader{i}") for i in range(4)]
        threads.append(k.kthread_run(writer, name="hotplugger"))
        for t in threads:
            t.join(30)
        assert not any(t.is_alive() for t in threads), "hotplug storm did not finish"
        assert all(t.exception is None for t in threads)
        assert violations == []
        assert not k.findings, [f.title for f in k.findings]
        assert sections[0] == 400 and hp.nr_hotplug_ops == 2 * cycles[0]
        assert hp.online_cpus() == [0, 1, 2, 3]
        if design == "2012":
            assert hp.refcount == 0 and hp.active_writer is None
    finally:
        assert k.shutdown(timeout=5.0) == []


def test_2012_get_online_cpus_is_recursive_and_invisible_to_lockdep() -> None:
    with Kernel(hotplug="2012") as k:
        hp = k.hotplug
        me = k.current()
        hp.get_online_cpus()
        hp.get_online_cpus()
        assert hp.refcount == 2 and me.hotplug_depth == 2
        assert me.held == []  # a count, not a held lock
        assert hp.cpus_held()
        hp.put_online_cpus()
        hp.put_online_cpus()
        assert hp.refcount == 0 and not hp.cpus_held()
        assert not k.findings


def test_2012_put_underflow_is_reported_and_clamped() -> None:
    with Kernel(hotplug="2012") as k:
        hp = k.hotplug
        hp.allow_underflow = False  # the clamping policy (Kernel() picks the historical one)
        hp.put_online_cpus()
        [f] = k.findings.of_kind(F.HOTPLUG_REFCOUNT)
        assert f.title == "kernel BUG at kernel/cpu.c: put_online_cpus() refcount underflow"
        assert "cpu_hotplug.refcount == 0" in f.text
        assert "test_2012_put_underflow_is_reported_and_clamped" in f.text  # the caller
        assert hp.refcount == 0  # clamped
        hp.get_online_cpus()
        assert hp.refcount == 1  # the next reader still counts
        hp.put_online_cpus()
        assert hp.cpu_down(1) == 0 and hp.cpu_up(1) == 0
        assert len(k.findings) == 1


def test_2012_historical_underflow_lets_the_writer_in_next_to_a_reader() -> None:
    """allow_underflow: the count goes to -1, the next reader brings it to 0 and a hotplug
    writer passes cpu_hotplug_begin() while that reader is inside its section."""
    with Kernel(hotplug="2012") as k:
        hp = k.hotplug
        hp.allow_underflow = True
        hp.put_online_cpus()  # the leak
        assert hp.refcount == -1
        assert k.findings.of_kind(F.HOTPLUG_REFCOUNT)
        hp.get_online_cpus()  # this reader believes it excludes hotplug
        assert hp.refcount == 0
        mask = hp.online_cpus()
        writer = k.kthread_run(hp.cpu_down, 2, name="hotplugger")
        writer.join(WAIT)
        assert not writer.is_alive() and writer.result == 0
        assert hp.online_cpus() != mask  # changed under the reader's feet
        hp.put_online_cpus()
        assert hp.refcount == -1
        k.findings.clear()


def test_2012_seed004_lockdep_false_positive_without_deadlock() -> None:
    """Seed 004: destroyer get_online_cpus -> slab_mutex -> (rcu_barrier) get_online_cpus;
    hotplug writer cpu_hotplug.lock -> (notifier) slab_mutex. Lockdep reports the cycle; the
    reader count keeps the writer out, so nothing deadlocks."""
    k = Kernel(name="seed004", hotplug="2012")
    hp = k.hotplug
    slab_mutex = k.mutex("slab_mutex")
    hp.register_notifier(lambda e, c: (slab_mutex.lock(), slab_mutex.unlock()))
    d_ready = threading.Event()
    writer_box: list = []

    def destroyer() -> None:
        hp.get_online_cpus()
        slab_mutex.lock()
        d_ready.set()
        assert wait_until(lambda: writer_box and writer_box[0].task is not None
                          and writer_box[0].task.blocked_on is hp)
        hp.get_online_cpus()  # rcu_barrier() -> _rcu_barrier() -> get_online_cpus()
        hp.put_online_cpus()
        slab_mutex.unlock()
        hp.put_online_cpus()

    def hotplug() -> None:
        assert d_ready.wait(WAIT)
        assert hp.cpu_down(1) == 0

    try:
        writer_box.append(k.kthread_run(hotplug, name="cpu_down"))
        d = k.kthread_run(destroyer, name="destroyer")
        d.join(WAIT)
        writer_box[0].join(WAIT)
        assert not d.is_alive() and not writer_box[0].is_alive()
        assert d.exception is None and writer_box[0].exception is None
        assert not k.findings.of_kind(F.REAL_DEADLOCK)
        [f] = k.findings.of_kind(F.CIRCULAR_LOCKING)
        assert set(f.extra["classes"]) == {"slab_mutex", "cpu_hotplug.lock"}
    finally:
        assert k.shutdown(timeout=5.0) == []


def test_2012_seed004_real_deadlock_with_a_put_imbalance() -> None:
    """The same interleaving after a put_online_cpus() leak: the destroyer's reader count
    is 0, the writer takes cpu_hotplug.lock and the notifier blocks on slab_mutex while the
    destroyer blocks on cpu_hotplug.lock: a real ABBA, reported, and torn down."""
    k = Kernel(name="seed004-real", hotplug="2012")
    hp = k.hotplug
    hp.allow_underflow = True
    slab_mutex = k.mutex("slab_mutex")
    in_notifier = threading.Event()

    def notifier(event: str, cpu: int) -> None:
        in_notifier.set()
        slab_mutex.lock()
        slab_mutex.unlock()

    hp.register_notifier(notifier)
    d_ready = threading.Event()

    def destroyer() -> None:
        hp.put_online_cpus()  # the imbalance, somewhere earlier in this task
        hp.get_online_cpus()
        slab_mutex.lock()
        d_ready.set()
        assert in_notifier.wait(WAIT)
        hp.get_online_cpus()  # blocks on cpu_hotplug.lock, held by the writer
        hp.put_online_cpus()
        slab_mutex.unlock()
        hp.put_online_cpus()

    def hotplug() -> None:
        assert d_ready.wait(WAIT)
        hp.cpu_down(1)

    try:
        threads = [k.kthread_run(destroyer, name="destroyer"),
                   k.kthread_run(hotplug, name="cpu_down")]
        assert wait_until(lambda: k.findings.of_kind(F.REAL_DEADLOCK))
        [dl] = k.findings.of_kind(F.REAL_DEADLOCK)
        assert dl.extra["locks"] == ["cpu_hotplug.lock", "slab_mutex"]
        assert k.findings.of_kind(F.HOTPLUG_REFCOUNT)
        assert k.findings.of_kind(F.CIRCULAR_LOCKING)
    finally:
        assert k.shutdown(timeout=5.0) == []
    assert not any(t.is_alive() for t in threads)


def test_percpu_rwsem_readers_are_visible_to_lockdep() -> None:
    with Kernel() as k:
        hp = k.hotplug
        slab_mutex = k.mutex("slab_mutex")
        hp.register_notifier(lambda e, c: (slab_mutex.lock(), slab_mutex.unlock()))
        with hp.cpus_read():
            assert [e[1].display for e in k.current().held] == ["cpu_hotplug_lock"]
            with slab_mutex:
                pass
        assert hp.cpu_down(2) == 0  # cpu_hotplug_lock -> slab_mutex: same order
        assert not k.findings
        with slab_mutex:
            hp.cpus_read_lock()  # slab_mutex -> cpu_hotplug_lock: the inversion
            hp.cpus_read_unlock()
        [f] = k.findings.of_kind(F.CIRCULAR_LOCKING)
        assert set(f.extra["classes"]) == {"slab_mutex", "cpu_hotplug_lock"}
        k.findings.clear()


def test_percpu_rwsem_put_without_get_is_a_bad_unlock() -> None:
    with Kernel() as k:
        k.hotplug.put_online_cpus()
        [f] = k.findings.of_kind(F.BAD_UNLOCK)
        assert "cpu_hotplug_lock" in f.text
        assert k.current().hotplug_depth == 0
        k.findings.clear()


def test_notifier_chain_order_events_and_context(hk: Kernel) -> None:
    hp = hk.hotplug
    log: list[tuple] = []

    def make(tag: str):
        def fn(event: str, cpu: int) -> None:
            write_held = (hp.lock.is_held() if hp.design == "2012"
                          else hp.lock.is_held_write())
            log.append((tag, event, cpu, hp.cpu_online(cpu), write_held,
                        hp.cpu_add_remove_lock.is_held(), hp.active_writer is hk.current()))
        return fn

    class Recorder(Instrument):
        def __init__(self) -> None:
            self.seen: list[tuple[str, str, int]] = []

        def on_event(self, point, label, task, obj) -> None:
            if point in ("cpu_up", "cpu_down"):
                self.seen.append((point, label, obj))

    rec = Recorder()
    hk.add_instrument(rec)
    hp.register_notifier(make("a"))
    hp.register_notifier(make("hi"), priority=10)
    hp.register_notifier(make("b"))
    assert hp.cpu_down(2) == 0
    assert hp.online_cpus() == [0, 1, 3] and not hp.cpu_online(2)
    assert hp.cpu_up(2) == 0
    ctx = (True, True, True)
    assert log == [
        ("hi", DOWN_PREPARE, 2, True, *ctx), ("a", DOWN_PREPARE, 2, True, *ctx),
        ("b", DOWN_PREPARE, 2, True, *ctx),
        ("hi", DEAD, 2, False, *ctx), ("a", DEAD, 2, False, *ctx), ("b", DEAD, 2, False, *ctx),
        ("hi", UP_PREPARE, 2, False, *ctx), ("a", UP_PREPARE, 2, False, *ctx),
        ("b", UP_PREPARE, 2, False, *ctx),
        ("hi", ONLINE, 2, True, *ctx), ("a", ONLINE, 2, True, *ctx), ("b", ONLINE, 2, True, *ctx),
    ]
    assert rec.seen == [("cpu_down", "cpu2", 2), ("cpu_up", "cpu2", 2)]
    assert hp.active_writer is None and not hp.cpus_held()
    assert not hk.findings


def test_notifier_may_use_get_online_cpus_in_2012() -> None:
    """A 2012 notifier runs as the active writer: get_online_cpus() returns at once."""
    with Kernel(hotplug="2012") as k:
        hp = k.hotplug
        seen = []

        def fn(event: str, cpu: int) -> None:
            hp.get_online_cpus()
            seen.append(hp.refcount)
            hp.put_online_cpus()

        hp.register_notifier(fn)
        assert hp.cpu_down(1) == 0
        assert seen == [0, 0] and not k.findings


def test_cpu_up_down_errors() -> None:
    with Kernel(cpus=2) as k:
        hp = k.hotplug
        assert hp.cpu_up(1) == -EINVAL  # already online
        assert hp.cpu_down(0) == 0
        assert hp.cpu_down(0) == -EINVAL  # already offline
        assert hp.cpu_down(1) == -EBUSY  # the last online CPU
        assert hp.online_cpus() == [1] and hp.num_online_cpus() == 1
        for bad in (2, -1, 7, "1", True):
            with pytest.raises(ValueError):
                hp.cpu_up(bad)
            with pytest.raises(ValueError):
                hp.cpu_down(bad)
        with pytest.raises(ValueError):
            hp.cpu_online(2)
        assert hp.nr_hotplug_ops == 1
        assert not k.findings


def test_notifier_exception_releases_the_locks(hk: Kernel) -> None:
    hp = hk.hotplug

    def bad(event: str, cpu: int) -> None:
        raise RuntimeError("notifier bug")

    hp.register_notifier(bad)
    with pytest.raises(RuntimeError):
        hp.cpu_down(1)
    assert not hp.cpu_add_remove_lock.is_locked() and hp.active_writer is None
    hp.unregister_notifier(bad)
    hp.get_online_cpus()  # the write side was released
    hp.put_online_cpus()
    assert hk.current().held == []


def test_tasks_are_placed_round_robin(hk: Kernel) -> None:
    hp = hk.hotplug
    cpus = []
    for i in range(5):
        t = hk.kthread_run(lambda: cpus.append(hp.this_cpu()), name=f"t{i}")
        t.join(WAIT)
    assert cpus == [0, 1, 2, 3, 0]
    assert hp.cpu_down(1) == 0
    cpus.clear()
    for i in range(3):
        t = hk.kthread_run(lambda: cpus.append(hp.this_cpu()), name=f"u{i}")
        t.join(WAIT)
    assert 1 not in cpus and len(set(cpus)) == 3  # round-robin over the online CPUs


def test_migration_off_an_offline_cpu(hk: Kernel) -> None:
    hp = hk.hotplug
    me = hk.current()
    c = hp.this_cpu()
    assert hp.this_cpu() == c and me.cpu == c  # stays put while online
    assert hp.cond_resched() == c
    assert hp.cpu_down(c) == 0
    assert me.cpu == c  # not moved yet: the model moves a task at its next marked point
    n = hp.this_cpu()
    assert n != c and hp.cpu_online(n) and me.cpu == n
    m = hp.migrate()
    assert m != n and hp.cpu_online(m)
    seen = set()
    for _ in range(6):
        seen.add(hp.migrate())
    assert seen == set(hp.online_cpus())  # migrate() walks the online CPUs
    assert hp.cpu_up(c) == 0


def test_migrate_with_one_cpu_online() -> None:
    with Kernel(cpus=2) as k:
        hp = k.hotplug
        assert hp.cpu_down(0) == 0
        assert hp.migrate() == 1 and hp.migrate() == 1


def test_percpu_data(hk: Kernel) -> None:
    hp = hk.hotplug
    pc: PerCpu[list] = PerCpu(hk, list)
    assert len(pc) == 4 and len(list(pc)) == 4
    pc.this_cpu().append("x")
    assert pc.per_cpu(hp.this_cpu()) == ["x"] and pc[hp.this_cpu()] is pc.this_cpu()
    other = (hp.this_cpu() + 1) % 4
    assert pc.per_cpu(other) == []
    with pytest.raises(ValueError):
        pc.per_cpu(4)
    assert hp.cpu_down(other) == 0
    assert [c for c, _ in pc.online()] == [c for c in range(4) if c != other]
    assert list(for_each_online_cpu(hk)) == hp.online_cpus()
    assert pc.per_cpu(other) == []  # data of an offline CPU stays reachable


def test_on_each_cpu_cond(hk: Kernel) -> None:
    hp = hk.hotplug
    assert hp.cpu_down(3) == 0
    calls = []

    def fn(cpu: int) -> None:
        calls.append((cpu, hp.cpus_held()))

    ran = on_each_cpu_cond(hk, lambda c: c % 2 == 0, fn)
    assert ran == [0, 2] and calls == [(0, True), (2, True)]
    assert not hp.cpus_held() and hk.current().hotplug_depth == 0
    calls.clear()
    with hp.cpus_read():  # already held: not taken again (no recursive read)
        assert hp.on_each_cpu_cond(lambda c: True, fn) == [0, 1, 2]
    assert [c for c, _ in calls] == [0, 1, 2] and all(h for _, h in calls)
    assert not hk.findings


@pytest.mark.parametrize("design", DESIGNS)
def test_on_each_cpu_cond_excludes_hotplug(design: str) -> None:
    """While fn runs, a concurrent cpu_down waits: the mask fn walks stays valid."""
    k = Kernel(name=f"oeacc-{design}", hotplug=design)
    hp = k.hotplug
    inside, go = threading.Event(), threading.Event()
    masks = []

    def fn(cpu: int) -> None:
        inside.set()
        assert go.wait(WAIT)
        masks.append(hp.online_cpus())

    try:
        runner = k.kthread_run(hp.on_each_cpu_cond, lambda c: c == 0, fn, name="ipi")
        assert inside.wait(WAIT)
        downer = k.kthread_run(hp.cpu_down, 1, name="downer")
        assert wait_until(lambda: downer.task is not None
                          and downer.task.blocked_on is not None)
        go.set()
        runner.join(WAIT)
        downer.join(WAIT)
        assert masks == [[0, 1, 2, 3]] and runner.result == [0]
        assert downer.result == 0 and hp.online_cpus() == [0, 2, 3]
        assert not k.findings
    finally:
        assert k.shutdown(timeout=5.0) == []
