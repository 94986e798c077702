"""call_rcu() and rcu_barrier(): after a grace period, FIFO, barrier semantics, exceptions,
and the 2012 barrier_mutex -> cpu_hotplug.lock dependency."""

from __future__ import annotations

import threading

import pytest

from kmemcg import Kernel
from kmemcg.core.task import KernelTornDown
from kmemcg.rcu import RCU
from kmemcg.testing import wait_until

from . import F, Reader, Runner, Watcher, unexpected


def test_callback_never_runs_before_its_grace_period(kernel: Kernel) -> None:
    w = Watcher()
    kernel.add_instrument(w)
    a = Reader(kernel, "reader_A")  # pre-existing when the callback is queued
    ran = threading.Event()
    kernel.rcu.call(ran.set)
    # The callback thread took the batch and started its grace period, which waits for A.
    assert w.wait_for("rcu_gp_start")
    assert not ran.wait(0.2), "callback ran while a pre-existing reader was inside"
    a.exit_section()
    kernel.rcu.barrier()
    assert ran.is_set()
    assert unexpected(kernel) == []


def test_callbacks_run_in_fifo_order_in_batches(kernel: Kernel) -> None:
    out: list[int] = []
    gp0 = kernel.rcu.completed
    for i in range(500):
        kernel.rcu.call(out.append, i)
    kernel.rcu.barrier()
    assert out == list(range(500))
    st = kernel.rcu.statistics()
    assert st.callbacks_backlog == 0 and st.callbacks_invoked == st.callbacks_queued
    # batching: far fewer grace periods than callbacks (one per batch the thread took)
    assert kernel.rcu.completed - gp0 < 500


def test_fifo_per_queue_with_several_callback_threads(kernel: Kernel) -> None:
    rcu = RCU(kernel, nr_cb_queues=2)
    kernel.on_shutdown(rcu.shutdown)
    out: dict[int, list[int]] = {0: [], 1: []}
    threads: dict[int, str] = {}
    lock = threading.Lock()

    def cb(cpu: int, i: int) -> None:
        with lock:
            out[cpu].append(i)
            threads[cpu] = threading.current_thread().name

    def producer(cpu: int) -> None:
        kernel.current().cpu = cpu
        for i in range(200):
            rcu.call(cb, cpu, i)

    ps = [Runner(kernel, lambda c=c: producer(c), f"cpu{c}") for c in (0, 1)]
    for p in ps:
        assert p.done.wait(10) and p.error is None
    rcu.barrier()
    assert out == {0: list(range(200)), 1: list(range(200))}
    assert threads == {0: "rcuc/0", 1: "rcuc/1"}


def test_barrier_waits_for_every_earlier_callback(kernel: Kernel) -> None:
    a = Reader(kernel, "reader_A")
    order: list[str] = []
    kernel.rcu.call(order.append, "cb")

    def do_barrier() -> None:
        kernel.rcu.barrier()
        order.append("barrier")

    b = Runner(kernel, do_barrier, "barrier")
    assert not b.done.wait(0.2), "rcu_barrier() returned before a pending callback ran"
    a.exit_section()
    assert b.done.wait(10) and b.error is None
    assert order == ["cb", "barrier"]


def test_a_barrier_done_by_another_meanwhile_is_not_done_twice(kernel: Kernel) -> None:
    """Two callers wait for barrier_mutex while barrier A runs: the first to get it runs a
    barrier of its own (A began before they called), the second finds that one began and
    ended after its call and returns (cf3a9c4842b1): one barrier less, and still every
    callback queued before its call ran first."""
    a = Reader(kernel, "reader_A")  # holds up the grace period: barrier A waits
    order: list[str] = []
    kernel.rcu.call(order.append, "cb1")

    def barrier(name: str) -> Runner:
        def run() -> None:
            kernel.rcu.barrier()
            order.append(name)
        return Runner(kernel, run, name)

    ra = barrier("A")
    assert wait_until(kernel.rcu.barrier_mutex.is_locked)
    kernel.rcu.call(order.append, "cb2")  # behind A's completion: A does not wait for it
    rb, rc = barrier("B"), barrier("C")
    assert wait_until(lambda: all(r.task is not None and r.task.blocked_on is not None
                                   for r in (rb, rc)))
    a.exit_section()
    assert all(r.done.wait(10) and r.error is None for r in (ra, rb, rc))
    assert kernel.rcu.nr_barrier_shared == 1
    assert kernel.rcu.statistics().barriers == 2
    assert order.index("cb1") < order.index("A")
    assert order.index("cb2") < min(order.index("B"), order.index("C"))


def test_barrier_without_callbacks_returns(kernel: Kernel) -> None:
    kernel.rcu.barrier()
    assert kernel.rcu.statistics().barriers == 1


def test_callback_exception_is_a_finding_and_the_thread_survives(kernel: Kernel) -> None:
    ran_on: list[str] = []

    def bad_callback(x: int) -> None:
        ran_on.append(threading.current_thread().name)
        raise ZeroDivisionError(f"boom {x}")

    def good_callback() -> None:
        ran_on.append(threading.current_thread().name)

    kernel.rcu.call(bad_callback, 1)
    kernel.rcu.call(good_callback)
    kernel.rcu.barrier()
    kernel.rcu.call(bad_callback, 2)  # same callback, same exception: counted
    kernel.rcu.call(good_callback)
    kernel.rcu.barrier()
    assert len(ran_on) == 4 and len(set(ran_on)) == 1  # one callback thread did it all
    (f,) = kernel.findings.of_kind(F.CALLBACK_EXCEPTION)
    assert f.count == 2 and "ZeroDivisionError" in f.title
    assert "boom 1" in f.text and "bad_callback" in f.text and "Traceback" in f.text
    assert f.thread.startswith("rcuc/0")
    assert kernel.rcu.statistics().callback_errors == 2
    assert unexpected(kernel, F.CALLBACK_EXCEPTION) == []


class FakeHotplug:
    """Stands in for k.hotplug (2012 design): records what rcu_barrier() holds when it calls
    get_online_cpus()."""

    def __init__(self, k: Kernel, takes: bool) -> None:
        self.k = k
        self.barrier_takes_hotplug = takes
        self.held_at_get: list[str] = []
        self.gets = self.puts = 0

    def get_online_cpus(self) -> None:
        self.gets += 1
        self.held_at_get = [e[1].display for e in self.k.current().held]

    def put_online_cpus(self) -> None:
        self.puts += 1


@pytest.mark.parametrize("takes", [True, False])
def test_barrier_takes_barrier_mutex_then_hotplug(kernel: Kernel, monkeypatch: pytest.MonkeyPatch,
                                                 takes: bool) -> None:
    hp = FakeHotplug(kernel, takes)
    monkeypatch.setattr(kernel, "hotplug", hp, raising=False)
    kernel.rcu.call(lambda: None)
    kernel.rcu.barrier()
    if takes:
        assert (hp.gets, hp.puts) == (1, 1)
        assert hp.held_at_get == ["rcu_barrier_mutex"]
    else:
        assert (hp.gets, hp.puts) == (0, 0)
    assert not kernel.rcu.barrier_mutex.is_locked()


def test_barrier_under_slab_mutex_records_the_2012_dependency(kernel: Kernel) -> None:
    slab_mutex = kernel.mutex("slab_mutex")
    with slab_mutex:  # kmem_cache_destroy() of a SLAB_DESTROY_BY_RCU cache, pre-210ed9defffc
        kernel.rcu.barrier()
    edges = {(e.prev.display, e.next.display) for e in kernel.lockdep.edges()}
    assert ("slab_mutex", "rcu_barrier_mutex") in edges


def test_call_after_teardown_raises() -> None:
    k = Kernel(name="dead")
    k.rcu.call(lambda: None)
    k.rcu.barrier()
    assert k.shutdown() == []
    with pytest.raises(KernelTornDown):
        k.rcu.synchronize()
    rcu2 = RCU(k)
    with pytest.raises(KernelTornDown):
        rcu2.call(lambda: None)  # would start a callback thread


def test_barrier_with_the_2012_hotplug_design_records_the_lockdep_chain() -> None:
    """kmem_cache_destroy() of v3.6: slab_mutex -> rcu_barrier_mutex -> cpu_hotplug.lock."""
    with Kernel(name="hp2012", hotplug="2012") as k:
        assert k.hotplug.barrier_takes_hotplug
        slab_mutex = k.mutex("slab_mutex")
        k.rcu.call(lambda: None)
        with slab_mutex:
            k.rcu.barrier()
        hp_lock = k.hotplug.lock.name
        edges = {(e.prev.display, e.next.display) for e in k.lockdep.edges()}
        assert ("slab_mutex", "rcu_barrier_mutex") in edges
        assert ("rcu_barrier_mutex", hp_lock) in edges
        assert k.hotplug.refcount == 0  # put_online_cpus() balanced the get
        assert unexpected(k) == []
