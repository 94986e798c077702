"""The read side: nesting, registration, lockdep's held-lock listing, events, pointers."""

from __future__ import annotations

import threading

from kmemcg import Kernel
from kmemcg.core.report import held_locks

from . import Runner, Watcher, unexpected


def test_nesting_is_counted_and_cleared(kernel: Kernel) -> None:
    rcu = kernel.rcu
    t = kernel.current()
    assert (t.rcu_nesting, t.rcu_ctr) == (0, 0)
    rcu.read_lock()
    ctr = t.rcu_ctr
    assert t.rcu_nesting == 1 and ctr != 0
    with rcu.read():
        with rcu.read():
            assert t.rcu_nesting == 3 and t.rcu_ctr == ctr  # nested: same snapshot
            assert rcu.in_reader()
    assert t.rcu_nesting == 1
    rcu.read_unlock()
    assert (t.rcu_nesting, t.rcu_ctr) == (0, 0)
    assert not rcu.in_reader()
    assert unexpected(kernel) == []


def test_section_snapshot_follows_grace_periods(kernel: Kernel) -> None:
    t = kernel.current()
    with kernel.rcu.read():
        first = t.rcu_ctr
    kernel.rcu.synchronize()
    with kernel.rcu.read():
        assert t.rcu_ctr > first  # the scan told this reader about the new grace period


def test_rcu_read_lock_is_listed_in_held_locks_without_dependencies(kernel: Kernel) -> None:
    a, b = kernel.mutex("lock_a"), kernel.mutex("lock_b")
    t = kernel.current()
    with kernel.rcu.read():
        with kernel.rcu.read():
            listing = held_locks(t)
            assert listing.count("(rcu_read_lock){....}-{1:2}") == 2, listing
            assert "2 locks held by" in listing
    assert "no locks held" in held_locks(t)
    with a:
        with kernel.rcu.read():
            with b:  # (also a might-sleep finding, tested elsewhere)
                pass
    edges = {(e.prev.display, e.next.display) for e in kernel.lockdep.edges()}
    assert ("lock_a", "lock_b") in edges
    assert not any("rcu_read_lock" in p or "rcu_read_lock" in n for p, n in edges)


def test_lockdep_off_does_not_list_rcu_read_lock() -> None:
    k = Kernel(name="nolockdep", lockdep=False)
    try:
        with k.rcu.read():
            assert k.current().held == [] and k.current().rcu_nesting == 1
        assert k.current().rcu_nesting == 0
    finally:
        k.shutdown()


def test_events_are_emitted(kernel: Kernel) -> None:
    w = Watcher()
    kernel.add_instrument(w)
    t = kernel.current()
    with kernel.rcu.read():
        pass
    kernel.rcu.synchronize()

    def my_callback() -> None:
        pass

    kernel.rcu.call(my_callback)
    kernel.rcu.barrier()
    mine = w.of(t)
    assert mine[:2] == [("rcu_read_lock", "rcu_read_lock"), ("rcu_read_unlock", "rcu_read_lock")]
    assert ("rcu_sync_queued", "rcu_gp") in mine
    assert mine.index(("rcu_gp_start", "rcu_gp")) < mine.index(("rcu_gp_end", "rcu_gp"))
    assert any(p == "rcu_callback" and "my_callback" in lbl for p, lbl, _ in w.events)


def test_thread_registers_on_first_use_and_unregisters_at_exit(kernel: Kernel) -> None:
    seen: dict[str, bool] = {}

    def body() -> None:
        t = kernel.current()
        seen["before"] = kernel.rcu.is_registered(t)
        with kernel.rcu.read():
            pass
        seen["after"] = kernel.rcu.is_registered(t)

    base = kernel.rcu.statistics().readers
    r = Runner(kernel, body, "reader")
    r.thread.join(10)
    assert seen == {"before": False, "after": True}
    assert not kernel.rcu.is_registered(r.task)
    assert kernel.rcu.statistics().readers == base
    assert unexpected(kernel) == []


def test_foreign_thread_is_unregistered_when_it_ends(kernel: Kernel) -> None:
    box = {}

    def body() -> None:
        box["task"] = kernel.current()
        with kernel.rcu.read():
            pass
        box["registered"] = kernel.rcu.is_registered(box["task"])

    th = threading.Thread(target=body)
    th.start()
    th.join(10)
    assert box["registered"]
    assert not kernel.rcu.is_registered(box["task"])  # do_exit ran when the thread ended
    kernel.rcu.synchronize()


def test_pointer_assign_and_dereference(kernel: Kernel) -> None:
    p = kernel.rcu.pointer({"v": 1}, "gp")
    with kernel.rcu.read():
        old = p.dereference()
        assert old == {"v": 1}
        assert kernel.rcu.dereference(p) is old
        assert kernel.rcu.dereference(old) is old  # plain values pass through
    assert p.assign({"v": 2}) is old
    assert p.access() == {"v": 2}
    kernel.rcu.synchronize()
    with kernel.rcu.read():
        assert p.dereference() == {"v": 2}
    assert unexpected(kernel) == []
