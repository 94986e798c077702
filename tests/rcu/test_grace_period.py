"""Grace periods: synchronize() waits for exactly the pre-existing readers, shares grace periods
between concurrent callers, and unwinds on teardown."""

from __future__ import annotations

import threading

import pytest

from kmemcg import Kernel
from kmemcg.core.task import KernelTornDown
from kmemcg.rcu import RCU, BustedRCU

from . import F, Hold, Reader, Runner, Watcher, block, unexpected


def test_synchronize_without_readers_completes_one_grace_period(kernel: Kernel) -> None:
    before = kernel.rcu.completed
    kernel.rcu.synchronize()
    kernel.rcu.synchronize()
    assert kernel.rcu.completed == before + 2
    st = kernel.rcu.statistics()
    assert st.sync_calls == 2 and st.grace_periods == 2
    assert unexpected(kernel) == []


def test_waits_for_pre_existing_reader_not_for_later_one(kernel: Kernel) -> None:
    a = Reader(kernel, "reader_A")
    bp = kernel.breakpoints.add("rcu_gp_start:rcu_gp")
    s = Runner(kernel, kernel.rcu.synchronize, "synchronizer")
    bp.wait()  # the grace period has fixed its pending readers: A, not B
    b = Reader(kernel, "reader_B")
    bp.release()
    assert not s.done.wait(0.2), "synchronize() returned while a pre-existing reader was inside"
    a.exit_section()
    assert s.done.wait(10), "synchronize() did not return after the pre-existing reader left"
    assert s.error is None
    # B entered after the grace period began and is still inside: it was not waited for.
    assert b.task.rcu_nesting == 1 and not b.left.is_set()
    b.exit_section()
    assert unexpected(kernel) == []


def test_reader_that_leaves_and_reenters_is_not_waited_for_again(kernel: Kernel) -> None:
    first, second = threading.Event(), threading.Event()
    leave_first, leave_second = Hold("leave_first"), Hold("leave_second")

    def reader() -> None:
        with kernel.rcu.read():
            first.set()
            block(kernel, leave_first)
        with kernel.rcu.read():  # a new section, begun after the grace period's scan
            second.set()
            block(kernel, leave_second)

    bp = kernel.breakpoints.add("rcu_gp_start:rcu_gp")
    r = Runner(kernel, reader, "reader")
    assert first.wait(10)
    s = Runner(kernel, kernel.rcu.synchronize, "synchronizer")
    bp.wait()  # the reader's first section is pending
    leave_first.release()
    assert second.wait(10)
    bp.release()
    assert s.done.wait(10) and s.error is None
    assert r.task.rcu_nesting == 1 and not r.done.is_set()  # still in its second section
    leave_second.release()
    assert r.done.wait(10) and r.error is None
    assert unexpected(kernel) == []


def test_nested_reader_holds_the_grace_period_until_outermost_unlock(kernel: Kernel) -> None:
    release_inner = threading.Event()
    inner_released = threading.Event()
    release_outer = threading.Event()
    inside = threading.Event()

    def reader() -> None:
        kernel.rcu.read_lock()
        kernel.rcu.read_lock()
        assert kernel.current().rcu_nesting == 2
        inside.set()
        assert release_inner.wait(10)
        kernel.rcu.read_unlock()
        assert kernel.current().rcu_nesting == 1
        inner_released.set()
        assert release_outer.wait(10)
        kernel.rcu.read_unlock()
        assert kernel.current().rcu_nesting == 0 and kernel.current().rcu_ctr == 0

    w = Watcher()
    kernel.add_instrument(w)
    r = Runner(kernel, reader, "reader")
    assert inside.wait(10)
    s = Runner(kernel, kernel.rcu.synchronize, "synchronizer")
    assert w.wait_for("rcu_gp_start")
    release_inner.set()
    assert inner_released.wait(10)
    assert not s.done.wait(0.2), "grace period ended at an inner rcu_read_unlock()"
    release_outer.set()
    assert s.done.wait(10) and s.error is None
    assert r.done.wait(10) and r.error is None
    assert unexpected(kernel) == []


def test_busted_flavor_does_not_wait_for_readers() -> None:
    k = Kernel(name="busted", rcu_flavor="busted")
    try:
        assert isinstance(k.rcu, BustedRCU) and k.rcu.flavor == "busted"
        a = Reader(k, "reader_A")
        k.rcu.synchronize()  # returns although A is inside: that is the bug torture must catch
        assert a.task.rcu_nesting == 1 and not a.left.is_set()
        a.exit_section()
    finally:
        assert k.shutdown() == []


def test_flavor_selection() -> None:
    k = Kernel(name="flavors")
    try:
        assert type(RCU(k, flavor="busted")) is BustedRCU
        assert type(RCU(k)) is RCU
        with pytest.raises(ValueError, match="unknown RCU flavor"):
            RCU(k, flavor="srcu")
    finally:
        k.shutdown()


def test_concurrent_synchronizers_share_grace_periods(kernel: Kernel) -> None:
    """20 callers queued behind a grace period held open by a reader: at most two grace
    periods serve all of them (the running one, then one for everybody queued meanwhile)."""
    n = 20
    w = Watcher()
    kernel.add_instrument(w)
    a = Reader(kernel, "reader_A")
    gp0, sync0 = kernel.rcu.completed, kernel.rcu.statistics().sync_calls
    runners = [Runner(kernel, kernel.rcu.synchronize, f"sync/{i}") for i in range(n)]
    assert w.wait_for("rcu_sync_queued", n), "not every synchronize() caller queued"
    assert not any(r.done.is_set() for r in runners)
    a.exit_section()
    for r in runners:
        assert r.done.wait(10) and r.error is None
    gps = kernel.rcu.completed - gp0
    calls = kernel.rcu.statistics().sync_calls - sync0
    assert calls == n
    assert 1 <= gps <= 2 < calls, f"{gps} grace periods for {calls} synchronize() calls"
    assert unexpected(kernel) == []


def test_teardown_unwinds_synchronize_blocked_on_stuck_reader() -> None:
    k = Kernel(name="stuck")
    w = Watcher()
    k.add_instrument(w)
    a = Reader(k, "stuck_reader")
    s = Runner(k, k.rcu.synchronize, "synchronizer")
    queued = [Runner(k, k.rcu.synchronize, f"sync/{i}") for i in range(3)]
    assert w.wait_for("rcu_gp_start", task=None)
    assert w.wait_for("rcu_sync_queued", 4)
    assert k.shutdown(timeout=5.0) == []  # every model thread ended
    for r in [s, *queued]:
        assert r.done.is_set()
        assert isinstance(r.error, KernelTornDown), r.error
    assert not a.thread.is_alive()


def test_synchronize_holding_a_lock_the_reader_needs_is_a_real_deadlock() -> None:
    """Never call synchronize_rcu() holding a mutex that readers take: the wait tracker sees
    updater -> rcu_gp -> reader -> mutex -> updater; the reader's sleep is reported too."""
    k = Kernel(name="gp-deadlock")
    try:
        m = k.mutex("updater_mutex")
        found = threading.Event()
        k.findings.add_listener(lambda f: f.kind == F.REAL_DEADLOCK and found.set())
        inside = threading.Event()
        held = threading.Event()

        def reader() -> None:
            with k.rcu.read():
                inside.set()
                assert held.wait(10)
                with m:
                    pass

        def updater() -> None:
            with m:
                held.set()
                k.rcu.synchronize()

        r = Runner(k, reader, "reader")
        assert inside.wait(10)
        u = Runner(k, updater, "updater")
        assert found.wait(10), "the wait-for cycle through the grace period was not reported"
        (dl,) = k.findings.of_kind(F.REAL_DEADLOCK)
        assert "rcu_gp" in dl.extra["locks"] and "updater_mutex" in dl.extra["locks"]
        assert any("Illegal context switch" in f.text
                   for f in k.findings.of_kind(F.SUSPICIOUS_RCU))
    finally:
        assert k.shutdown(timeout=5.0) == []
    # Teardown unwinds whichever sleeper notices first (KernelTornDown); once one is gone the
    # other may finish normally. Either way both end and nothing else went wrong.
    assert u.done.is_set() and r.done.is_set()
    assert all(e is None or isinstance(e, KernelTornDown) for e in (u.error, r.error))
    assert isinstance(u.error, KernelTornDown) or isinstance(r.error, KernelTornDown)
