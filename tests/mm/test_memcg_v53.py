"""The v5.3 memcg design (kmemcg.mm.memcg_v53): percpu_ref-counted child caches, reparenting at
offline, release by a work; and its two catalog bugs, 16 (``percpu_ref_exit_while_switching``,
a264df74df38) and 17 (``dying_set_before_alias_check``, d38a2b7a9c93), each forced with the
minimal interleaving, the same scenario on the fixed form, and a randomized churn."""

from __future__ import annotations

import random
import threading
import time

import pytest

from kmemcg import Kernel
from kmemcg.catalog import BY_NAME
from kmemcg.config import MEMCG_V53, Config
from kmemcg.core import findings as F
from kmemcg.core.instrument import Perturb
from kmemcg.core.kasan import Kasan
from kmemcg.mm.memcg_v53 import MemcgSlabV53
from kmemcg.mm.slub import SLAB_ACCOUNT
from kmemcg.testing import (
    OwnedCaches,
    check_churn_outcome,
    fast_switching,
    hold_grace_period,
    in_memcg,
    memcg_user_loop,
    run_until_found,
    wait_until,
)

JOIN = 10.0
BUG16 = "percpu_ref_exit_while_switching"
BUG17 = "dying_set_before_alias_check"


def fixed() -> Config:
    return Config.make("fixed", memcg=MEMCG_V53)


def with_bug(name: str) -> Config:
    return Config.make("fixed", bugs=[name], memcg=MEMCG_V53)


def quiesce(k: Kernel) -> None:
    assert k.kmemleak.quiesce()


def child_of(k: Kernel, s):
    """Allocate from accounted root ``s`` in the current memcg until its child exists; return
    (child, an object allocated from it)."""
    sl = k.slab
    sl.kmem_cache_free(s, sl.kmem_cache_alloc(s))  # a miss: creation queued
    quiesce(k)
    o = sl.kmem_cache_alloc(s)
    assert o.cache is not s
    return o.cache, o


def in_rcu_barrier(t) -> bool:
    return t.task is not None and type(t.task.blocked_on).__name__ == "_Completion"


# ---------------------------------------------------------------------------------- design
def test_presets_select_the_v53_design() -> None:
    for cfg in ("v5.3", fixed(), with_bug(BUG16), with_bug(BUG17)):
        with Kernel(config=cfg) as k:
            assert isinstance(k.memcg_slab, MemcgSlabV53)
    with Kernel(config="v5.3") as k:
        assert k.config.bug(BUG16) and k.config.bug(BUG17)


def test_the_child_counts_pages_and_allocations_in_flight() -> None:
    with Kernel(config=fixed()) as k:
        sl = k.slab
        s = sl.kmem_cache_create("dentry", 192, flags=SLAB_ACCOUNT)
        m = in_memcg(k)
        c, o = child_of(k, s)
        ref = c.memcg_params.refcnt
        assert c.memcg_params.memcg is m and c in m.kmem_caches
        assert ref.read() == 2  # the initial reference + one slab page
        bp = k.breakpoints.add("window:memcg_kmem_get_cache:returned")
        t = k.kthread_run(lambda: (k.memcg.attach(k.current(), m), sl.kmem_cache_alloc(s)),
                          name="alloc")
        bp.wait(JOIN)
        assert ref.read() == 3  # + the allocation in flight (tryget ... put_cache)
        bp.release()
        t.join(JOIN)
        assert ref.read() == 1 + len(c.slabs)  # its own CPU may have needed a new slab
        sl.kmem_cache_free(s, o)
        sl.kmem_cache_free(s, t.result[1])
        assert not k.findings.snapshot()


def test_offline_reparents_frees_the_memcg_and_the_last_free_releases_the_child() -> None:
    """5.3's point: the memcg goes at once (its caches move to the parent); the child lives
    while an object of it does, and the free of the last one releases it."""
    with Kernel(config=fixed()) as k:
        sl, mc = k.slab, k.memcg
        s = sl.kmem_cache_create("dentry", 192, flags=SLAB_ACCOUNT)
        p = mc.create("p")
        m = mc.create("m", p)
        mc.memcg_activate_kmem(m)
        mc.attach(k.current(), m)
        c, o = child_of(k, s)
        mc.attach(k.current(), mc.root)
        assert mc.offline(m) == 0
        quiesce(k)
        assert Kasan.is_freed(m)  # not pinned by the child's page
        assert c.memcg_params.memcg is p and c in p.kmem_caches  # reparented
        assert c.memcg_params.deactivated and c.memcg_params.refcnt.is_dying()
        assert not Kasan.is_freed(c) and c.on_list  # the object keeps it
        assert k.memcg_slab.nr_deactivated == 1
        sl.kmem_cache_free(s, o)  # last page goes: the put releases the child
        quiesce(k)
        assert Kasan.is_freed(c) and c not in s.memcg_params.children
        assert not p.kmem_caches and k.memcg_slab.nr_released == 1
        sl.kmem_cache_destroy(s)
        quiesce(k)
        assert not k.findings.snapshot()


def test_root_destroy_shuts_down_live_and_deactivated_children() -> None:
    with Kernel(config=fixed()) as k:
        sl, mc = k.slab, k.memcg
        s = sl.kmem_cache_create("inode", 600, flags=SLAB_ACCOUNT)
        m1 = in_memcg(k, "m1")
        c1, o1 = child_of(k, s)
        in_memcg(k, "m2")
        c2, o2 = child_of(k, s)
        sl.kmem_cache_free(s, o1)
        sl.kmem_cache_free(s, o2)
        mc.attach(k.current(), mc.root)
        mc.offline(m1)  # c1 deactivated; c2 still live (m2 online)
        sl.kmem_cache_destroy(s)
        quiesce(k)
        assert Kasan.is_freed(c1) and Kasan.is_freed(c2) and Kasan.is_freed(s)
        assert not k.findings.snapshot()


# ---------------------------------------------------------------------------------- bug 16
def deactivation_in_flight_during_root_destroy(k: Kernel) -> tuple:
    """The minimal interleaving: offline M queues C's deactivation as an RCU callback (a reader
    holds the grace period); the root destroyer's rcu_barrier() runs it and its flush runs the
    work, whose percpu_ref_kill() starts a switch that a breakpoint keeps pending. Returns the
    breakpoint (hit), the destroyer and its done event, and the child."""
    sl, mc = k.slab, k.memcg
    s = sl.kmem_cache_create("dentry", 192, flags=SLAB_ACCOUNT)
    m = in_memcg(k)
    c, o = child_of(k, s)
    sl.kmem_cache_free(s, o)
    mc.attach(k.current(), mc.root)
    quiesce(k)
    bp = k.breakpoints.add("window:percpu_ref_kill:switch_pending")
    out, reader = hold_grace_period(k, JOIN)
    assert mc.offline(m) == 0  # kmemcg_cache_deactivate(C): call_rcu, waiting for the reader
    destroyed = threading.Event()

    def destroyer() -> None:
        sl.kmem_cache_destroy(s)
        destroyed.set()

    d = k.kthread_run(destroyer, name="destroyer")
    assert wait_until(lambda: in_rcu_barrier(d), JOIN)  # flush_memcg_workqueue's first one
    out.set()
    reader.join(JOIN)
    bp.wait(JOIN)  # the deactivation work killed the ref; the switch is pending
    return bp, d, destroyed, c


@pytest.mark.parametrize("config", [with_bug(BUG16), "v5.3"], ids=["bug16", "preset-v5.3"])
def test_bug16_root_destroy_exits_the_percpu_ref_while_switching(config) -> None:
    with Kernel(config=config) as k:
        bp, d, destroyed, c = deactivation_in_flight_during_root_destroy(k)
        assert destroyed.wait(JOIN)  # no second grace period: done with the switch pending
        (f,) = k.findings.snapshot()
        assert f.kind == F.REFCOUNT and f.kind in BY_NAME[BUG16].detector
        assert f.title == "WARNING: percpu_ref_exit while switching"
        assert "at lib/percpu-refcount.c:108 percpu_ref_exit" in f.text
        assert f.thread.startswith("destroyer/")
        assert Kasan.is_freed(c)
        bp.release()  # the switch completes on the freed child
        quiesce(k)
        kinds = [g.kind for g in k.findings.snapshot()]
        assert kinds == [F.REFCOUNT, F.KASAN_UAF]
        uaf = k.findings[1]
        assert uaf.kind in BY_NAME[BUG16].detector
        assert uaf.title == "BUG: KASAN: use-after-free in percpu_ref_switch_to_atomic_rcu"
        assert "Freed by task destroyer/" in uaf.text and uaf.thread.startswith("rcuc/")
        d.join(JOIN)


def test_bug16_fixed_root_destroy_waits_for_the_switch() -> None:
    with Kernel(config=fixed()) as k:
        bp, d, destroyed, c = deactivation_in_flight_during_root_destroy(k)
        # a264df74df38: the second rcu_barrier() waits for the pending switch
        assert wait_until(lambda: in_rcu_barrier(d), JOIN)
        assert not destroyed.is_set() and not Kasan.is_freed(c)
        bp.release()
        assert destroyed.wait(JOIN)
        d.join(JOIN)
        quiesce(k)
        assert Kasan.is_freed(c)
        assert not k.findings.snapshot(), [f.title for f in k.findings]


# ---------------------------------------------------------------------------------- bug 17
def alias_destroyed_then_memcg_comes_and_goes(k: Kernel) -> tuple:
    """Muchun Song's steps: A merged into B; destroy A (B lives on with one alias); memcg M
    allocates from B (child B(M)); rmdir M; everything freed and quiesced."""
    sl, mc = k.slab, k.memcg
    b = sl.kmem_cache_create("B", 192, flags=SLAB_ACCOUNT)
    a = sl.kmem_cache_create("A", 192, flags=SLAB_ACCOUNT)
    assert a is b and b.alias_count == 2
    sl.kmem_cache_destroy(a)
    assert b.alias_count == 1 and not Kasan.is_freed(b)
    m = in_memcg(k)
    c, o = child_of(k, b)
    sl.kmem_cache_free(b, o)
    mc.attach(k.current(), mc.root)
    quiesce(k)
    # the root memcg's references once M is gone: M's own pin on its parent goes with it
    root_refs = mc.root.css_ref.read() - 1
    assert mc.offline(m) == 0
    quiesce(k)
    return b, c, m, root_refs


def child_leaks(k: Kernel) -> list[F.Finding]:
    """kmemleak's reports of per-memcg child caches (the roots alive on purpose are reported
    too: the model's kmemleak has no kmemleak_not_leak())."""
    return [f for f in k.kmemleak.scan("caches") if "per-memcg kmem_cache" in f.text]


@pytest.mark.parametrize("config", [with_bug(BUG17), "v5.3"], ids=["bug17", "preset-v5.3"])
def test_bug17_dying_on_an_alias_leaks_the_child_of_every_offlined_memcg(config) -> None:
    with Kernel(config=config) as k:
        mc = k.memcg
        b, c, m, root_refs = alias_destroyed_then_memcg_comes_and_goes(k)
        assert b.memcg_params.dying  # set by the destroy of alias A, for good
        # rmdir M skipped the deactivation: the ref was never killed, the child never goes
        assert not Kasan.is_freed(c) and c.on_list and c in b.memcg_params.children
        assert not c.memcg_params.refcnt.is_dying() and not c.memcg_params.deactivated
        assert c.memcg_params.memcg is mc.root  # reparented: M itself is freed ...
        assert Kasan.is_freed(m)
        assert mc.root.css_ref.read() == root_refs + 1  # ... its css reference moved, leaked
        assert k.memcg_slab.nr_released == 0
        assert not k.findings.snapshot()  # nothing notices by itself
        (f,) = child_leaks(k)
        assert f.kind == F.MEMLEAK and f.kind in BY_NAME[BUG17].detector
        assert f.extra["name"].startswith("B(")
        assert "unreferenced object" in f.text and f"per-memcg kmem_cache {c.name}" in f.text
        k.findings.clear()
        # the leak lasts as long as B: its last destroy shuts the child down
        k.slab.kmem_cache_destroy(b)
        quiesce(k)
        assert Kasan.is_freed(c) and mc.root.css_ref.read() == root_refs
        assert not k.findings.snapshot()


def test_bug17_fixed_the_alias_destroy_leaves_b_alone() -> None:
    with Kernel(config=fixed()) as k:
        mc = k.memcg
        b, c, m, root_refs = alias_destroyed_then_memcg_comes_and_goes(k)
        assert not b.memcg_params.dying
        assert Kasan.is_freed(c) and not c_on_any_list(k, c) and Kasan.is_freed(m)
        assert mc.root.css_ref.read() == root_refs
        assert not k.findings.snapshot(), [f.title for f in k.findings]
        assert child_leaks(k) == []  # (B itself is reported: alive on purpose)
        k.findings.clear()
        k.slab.kmem_cache_destroy(b)
        quiesce(k)
        assert not k.findings.snapshot()


def c_on_any_list(k: Kernel, c) -> bool:
    return any(x is c for x in k.slab.caches())


# ---------------------------------------------------------------------------------- churn
class Churn:
    """What the stress driver does: owners create, use and destroy accounted roots (some
    merging into the long-lived ``K``, as module caches merge into a kmalloc cache); memcgs
    are created, kmem-activated, entered, allocated in, left and offlined; a shrinker runs."""

    def __init__(self, k: Kernel, seed: int) -> None:
        self.k = k
        self.seed = seed
        self.owned = OwnedCaches(per_cache=True)
        self.stop = threading.Event()
        self.K = k.slab.kmem_cache_create("kmalloc-192", 192, flags=SLAB_ACCOUNT)
        self.owned.publish(self.K)

    def caches(self, i: int) -> None:
        k, sl = self.k, self.k.slab
        rng = random.Random(self.seed * 100 + i)
        while not self.stop.is_set():
            s = sl.kmem_cache_create(f"mod{i}", rng.choice((96, 192)), flags=SLAB_ACCOUNT)
            h = self.owned.publish(s)
            self.stop.wait(0.003)
            # K outlives every alias: no need to wait for its users
            self.owned.destroy(k, h, s, wait=s is not self.K)
            k.window("churn:destroyed")

    def memcgs(self, i: int) -> None:
        k = self.k
        rng = random.Random(self.seed * 100 + 50 + i)

        def use() -> None:  # a while in the memcg: its queued creations get to run
            if self.owned.alloc_free(k, rng):
                self.stop.wait(0.001)

        memcg_user_loop(k, self.stop, f"m{i}", 6, use)

    def shrinker(self) -> None:
        rng = random.Random(self.seed * 100 + 99)
        while not self.stop.is_set():
            self.owned.use(rng, self.k.slab.kmem_cache_shrink)
            self.stop.wait(0.002)

    def run(self, limit: float, found: threading.Event) -> float:
        k = self.k
        ts = [k.kthread_run(self.caches, i, name=f"caches{i}") for i in range(2)]
        ts += [k.kthread_run(self.memcgs, i, name=f"memcgs{i}") for i in range(3)]
        ts.append(k.kthread_run(self.shrinker, name="shrinker"))
        return run_until_found(ts, self.stop, found, limit, JOIN)


@pytest.fixture(name="fast_switching")
def fast_switching_fixture():
    with fast_switching():
        yield


@pytest.mark.parametrize("config, expect", [(with_bug(BUG16), True), (fixed(), False)],
                         ids=["bug16", "fixed"])
def test_randomized_churn_bug16(config, expect: bool, fast_switching) -> None:
    """Roots destroyed while their children's deactivations are in flight, with the switch
    window perturbed: bug 16 is caught within the bound; the fixed form stays clean."""
    limit = 20.0 if expect else 1.0
    with Kernel(config=config) as k:
        k.add_instrument(Perturb(3, 0.3, 0.003))
        found = threading.Event()
        k.findings.add_listener(lambda f: found.set())
        elapsed = Churn(k, 1).run(limit, found)
        check_churn_outcome(k, expect, found.is_set(), BY_NAME[BUG16].detector, limit,
                            f"bug16 {'on' if expect else 'off'}", elapsed)


@pytest.mark.parametrize("config, expect", [(with_bug(BUG17), True), (fixed(), False)],
                         ids=["bug17", "fixed"])
def test_randomized_churn_bug17(config, expect: bool, fast_switching) -> None:
    """Module caches merging into a long-lived root come and go while memcgs churn; once every
    memcg is offline and everything quiesced, kmemleak finds the children bug 17 leaked. The
    fixed form leaves no child cache behind."""
    limit = 20.0 if expect else 1.0
    with Kernel(config=config) as k:
        k.add_instrument(Perturb(5, 0.3, 0.002))
        churn = Churn(k, 2)
        t0 = time.monotonic()
        leaks: list[F.Finding] = []
        rounds = 0
        while True:
            rounds += 1
            churn.stop.clear()
            churn.run(min(0.5, limit), threading.Event())
            quiesce(k)
            assert not k.findings.snapshot(), [f.text for f in k.findings]
            leaks = child_leaks(k)
            if leaks or time.monotonic() - t0 >= limit:
                break
            k.findings.clear()  # the long-lived root's report
        elapsed = time.monotonic() - t0
        print(f"\nbug17 {'on' if expect else 'off'}: {len(leaks)} leaked child cache(s) "
              f"after {elapsed:.2f}s ({rounds} round(s))")
        if expect:
            assert leaks, f"not found within {limit}s"
            assert {f.kind for f in leaks} <= set(BY_NAME[BUG17].detector)
            assert churn.K.memcg_params.dying
        else:
            assert not leaks, [f.text for f in leaks]
