"""percpu_ref (kmemcg.core.percpu_ref): percpu mode never releases, kill switches to atomic mode
one grace period later (then the last put releases, in whatever context drops it), tryget vs
tryget_live, exit while the switch is pending (lib/percpu-refcount.c:108) and the
use-after-free of the pending switch, exact counting under concurrent threads."""

from __future__ import annotations

import re
import threading

import pytest

from kmemcg import Kernel
from kmemcg.core import findings as F
from kmemcg.core.kasan import Kasan
from kmemcg.core.percpu_ref import PercpuRef, percpu_ref_init
from kmemcg.testing import hold_grace_period

JOIN = 10.0


class Released:
    """A release callback that records who called it."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.done = threading.Event()

    def __call__(self, k: Kernel):
        def release(ref: PercpuRef) -> None:
            self.calls.append(k.current().name)
            self.done.set()
        return release


def test_percpu_mode_never_releases_and_trygets_succeed(kernel: Kernel) -> None:
    k = kernel
    rel = Released()
    ref = percpu_ref_init(k, rel(k), "obj.refcnt")
    ref.get_many(3)
    ref.put_many(4)  # the sum is 0, but nobody can tell in percpu mode
    assert not ref.is_zero() and not ref.is_dying()
    assert ref.tryget() and ref.tryget_live()
    ref.put_many(2)
    k.rcu.barrier()
    assert rel.calls == []
    assert not k.findings.snapshot()


def test_kill_releases_after_the_switch_in_the_rcu_callback(kernel: Kernel) -> None:
    k = kernel
    rel = Released()
    ref = percpu_ref_init(k, rel(k), "obj.refcnt")
    ref.kill()  # drops the initial reference, but the switch is pending
    assert ref.is_dying() and not ref.is_zero()
    assert ref.confirm_switch is not None
    assert rel.done.wait(JOIN)
    assert len(rel.calls) == 1 and rel.calls[0].startswith("rcuc/")  # the confirm dropped it
    assert ref.is_zero() and ref.confirm_switch is None
    assert not ref.tryget() and not ref.tryget_live()  # zero: nothing to get
    ref.exit()
    assert not k.findings.snapshot()


def test_last_put_after_the_switch_releases_in_the_putters_context(kernel: Kernel) -> None:
    k = kernel
    rel = Released()
    ref = percpu_ref_init(k, rel(k), "obj.refcnt")
    me = k.current()
    me.cpu = 0
    ref.get_many(2)  # two references taken on CPU 0 ...
    me.cpu = 1
    ref.put()  # ... one dropped on CPU 1: per-CPU counters +2 and -1
    ref.kill()
    assert not ref.tryget_live()  # killed: no new live user
    assert ref.tryget()  # but a reference can still be taken while the count is not zero
    k.rcu.barrier()  # the switch is confirmed: the sum (1 + 1) is in the atomic counter
    assert ref.read() == 2 and rel.calls == []
    ref.put()
    assert rel.calls == []
    ref.put()
    assert rel.calls == [me.name]  # released by the task that dropped the last reference
    ref.exit()
    assert not k.findings.snapshot()


def test_exit_while_switching_warns_and_the_pending_switch_reads_freed_counters() -> None:
    with Kernel() as k:
        rel = Released()
        ref = percpu_ref_init(k, rel(k), "child.memcg_params.refcnt")
        out, reader = hold_grace_period(k, JOIN)
        ref.kill()  # the confirmation waits for the reader
        ref.exit()  # too early: the switch is still pending
        (f,) = k.findings.snapshot()
        assert f.kind == F.REFCOUNT
        assert f.title == "WARNING: percpu_ref_exit while switching"
        assert "------------[ cut here ]------------" in f.text
        assert re.search(r"^WARNING: CPU: \d+ PID: \d+ at lib/percpu-refcount\.c:108 "
                         r"percpu_ref_exit$", f.text, re.M), f.text
        out.set()
        reader.join(JOIN)
        k.rcu.barrier()
        kinds = [g.kind for g in k.findings.snapshot()]
        assert kinds == [F.REFCOUNT, F.KASAN_UAF]
        uaf = k.findings[1]
        assert uaf.title == "BUG: KASAN: use-after-free in percpu_ref_switch_to_atomic_rcu"
        assert "percpu counters" in uaf.text and "Freed by task" in uaf.text
        assert rel.calls == []  # the switch never completed


def test_callback_after_the_owner_freed_the_ref_is_a_use_after_free() -> None:
    with Kernel() as k:
        ref = percpu_ref_init(k, Released()(k), "child.memcg_params.refcnt", "the cache c")
        out, reader = hold_grace_period(k, JOIN)
        ref.kill()
        ref.exit()
        k.kasan.free(ref)  # the owner (and the struct embedded in it) goes
        out.set()
        reader.join(JOIN)
        k.rcu.barrier()
        uaf = k.findings.of_kind(F.KASAN_UAF)
        assert [f.title for f in uaf] == [
            "BUG: KASAN: use-after-free in percpu_ref_switch_to_atomic_rcu"]
        assert "percpu_ref" in uaf[0].text and "the cache c" in uaf[0].text


def test_exit_after_the_switch_is_clean_and_frees_the_counters(kernel: Kernel) -> None:
    k = kernel
    ref = percpu_ref_init(k, Released()(k), "obj.refcnt")
    pcpu = ref._pcpu
    ref.get()
    ref.kill()
    k.rcu.barrier()
    ref.exit()
    assert Kasan.is_freed(pcpu)
    ref.exit()  # a second exit finds nothing to free
    assert not k.findings.snapshot()


def test_exit_in_percpu_mode_is_clean(kernel: Kernel) -> None:
    ref = percpu_ref_init(kernel, Released()(kernel), "obj.refcnt")
    ref.get()
    ref.exit()
    assert not kernel.findings.snapshot()


def test_killing_twice_warns(kernel: Kernel) -> None:
    k = kernel
    ref = percpu_ref_init(k, Released()(k), "obj.refcnt")
    ref.get()
    ref.kill()
    k.rcu.barrier()
    ref.kill()  # already atomic: no second switch, but WARN and one more put
    (f,) = k.findings.snapshot()
    assert f.kind == F.REFCOUNT
    assert f.title == "WARNING: percpu_ref_kill_and_confirm called more than once"


def test_a_put_below_zero_in_atomic_mode_is_reported(kernel: Kernel) -> None:
    k = kernel
    rel = Released()
    ref = percpu_ref_init(k, rel(k), "obj.refcnt")
    ref.kill()
    k.rcu.barrier()
    assert rel.calls
    ref.put()
    (f,) = k.findings.snapshot()
    assert f.kind == F.REFCOUNT and f.title == "WARNING: percpu ref put below zero"


@pytest.mark.parametrize("threads, rounds", [(4, 1500)])
def test_concurrent_gets_and_puts_across_the_kill_release_exactly_once(
        threads: int, rounds: int) -> None:
    """Threads on different CPUs take and drop references while the ref is killed and
    switched: the release runs once, after the last put, whoever makes it."""
    with Kernel() as k:
        rel = Released()
        ref = percpu_ref_init(k, rel(k), "obj.refcnt")
        go = threading.Barrier(threads + 1)
        failed_gets: list[int] = []

        def user(i: int) -> None:
            k.current().cpu = i
            ref.get()  # our own reference, taken while the ref is surely live
            go.wait(JOIN)
            n = 0
            for _ in range(rounds):
                if ref.tryget():
                    ref.put()
                else:
                    n += 1
            failed_gets.append(n)
            ref.put()

        ts = [k.kthread_run(user, i, name=f"user{i}") for i in range(threads)]
        go.wait(JOIN)
        ref.kill()
        for t in ts:
            t.join(JOIN)
        assert rel.done.wait(JOIN)
        k.rcu.barrier()
        assert len(rel.calls) == 1
        assert failed_gets == [0] * threads  # each user held a reference throughout
        assert ref.is_zero()
        ref.exit()
        assert not k.findings.snapshot()
