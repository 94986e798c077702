"""Seed 000's refcount design (v4-refcount): the root's lifetime refcount pinned by queued
creations and deactivations, the alias count split out; and catalog bug 12 (the alias count
decremented without slab_mutex), caught by VM_BUG_ON in __kmem_cache_destroy and kmemleak."""

from __future__ import annotations

import random
import threading

import pytest

from kmemcg import Kernel
from kmemcg.catalog import BY_NAME
from kmemcg.config import Config
from kmemcg.core import findings as F
from kmemcg.core.instrument import Perturb
from kmemcg.core.kasan import Kasan
from kmemcg.mm.memcg_v4_refcount import MemcgSlabRefcount
from kmemcg.mm.slub import SLAB_ACCOUNT
from kmemcg.testing import (
    OwnedCaches,
    check_churn_outcome,
    fast_switching,
    hold_grace_period,
    in_memcg,
    memcg_user_loop,
    run_until_found,
)
from kmemcg.workqueue import Work, queue_work

BUG = "alias_count_dec_without_slab_mutex"
VM_BUG = "kernel BUG at mm/slab_common.c: VM_BUG_ON(s->alias_count) in __kmem_cache_destroy"


def fixed() -> Kernel:
    """The design's fixed form: v4-refcount with the alias count under slab_mutex."""
    return Kernel(config=Config.make("fixed", memcg="v4-refcount"))


def buggy() -> Kernel:
    return Kernel(config="v4.18-refcount")


def test_presets_and_design() -> None:
    with buggy() as k:
        assert isinstance(k.memcg_slab, MemcgSlabRefcount) and k.config.bug(BUG)
    with fixed() as k:
        assert isinstance(k.memcg_slab, MemcgSlabRefcount) and not k.config.bug(BUG)


def test_each_alias_holds_a_reference_and_the_last_put_frees_the_root() -> None:
    with fixed() as k:
        sl = k.slab
        a = sl.kmem_cache_create("a", 192, flags=SLAB_ACCOUNT)
        assert (a.alias_count, a.lifetime_ref.read()) == (1, 1)
        b = sl.kmem_cache_create("b", 192, flags=SLAB_ACCOUNT)
        assert b is a and (a.alias_count, a.lifetime_ref.read()) == (2, 2)
        plain = sl.kmem_cache_create("plain", 192)  # not accounted: no lifetime refcount
        assert plain is not a and plain.lifetime_ref is None
        sl.kmem_cache_destroy(a)
        assert (a.alias_count, a.lifetime_ref.read()) == (1, 1) and a.on_list
        sl.kmem_cache_destroy(b)
        assert Kasan.is_freed(a)
        sl.kmem_cache_destroy(plain)
        assert k.kmemleak.quiesce() and k.kmemleak.scan() == []
        assert not k.findings.snapshot()


def test_a_queued_creation_pins_the_root_past_its_destroy() -> None:
    """Seed 000's creation half: the root destroyed while its child's creation is queued. The
    work's reference keeps it; the work sees alias count 0 and creates nothing; its put frees
    the root."""
    with fixed() as k:
        sl, mc = k.slab, k.memcg
        s = sl.kmem_cache_create("dentry", 192, flags=SLAB_ACCOUNT)
        hold, started = threading.Event(), threading.Event()

        def blocker() -> None:  # memcg_kmem_cache_wq has max_active 1: the creation waits
            started.set()
            hold.wait(5)

        queue_work(k.memcg_slab.wq, Work(blocker, name="blocker"))
        assert started.wait(5)
        m = in_memcg(k)
        sl.kmem_cache_free(s, sl.kmem_cache_alloc(s))  # a miss: creation queued, root pinned
        assert s.lifetime_ref.read() == 2
        mc.attach(k.current(), mc.root)
        sl.kmem_cache_destroy(s)
        assert s.alias_count == 0 and s.lifetime_ref.read() == 1 and s.on_list
        hold.set()
        assert k.kmemleak.quiesce()
        assert Kasan.is_freed(s) and k.memcg_slab.nr_created == 0
        assert mc.offline(m) == 0
        assert k.kmemleak.quiesce() and k.kmemleak.scan() == []
        assert not k.findings.snapshot(), [f.text for f in k.findings]


def test_a_pending_deactivation_pins_the_root() -> None:
    """Seed 000's GPF scenario (bug 11's interleaving) on this design: the destroy's put is
    not the last one; the deactivation work's is, after it shrank the child."""
    with fixed() as k:
        sl, mc = k.slab, k.memcg
        s = sl.kmem_cache_create("dentry", 192, flags=SLAB_ACCOUNT)
        m = in_memcg(k)
        sl.kmem_cache_free(s, sl.kmem_cache_alloc(s))
        k.kmemleak.quiesce()
        sl.kmem_cache_free(s, sl.kmem_cache_alloc(s))
        (child,) = s.memcg_params.children
        mc.attach(k.current(), mc.root)
        out, r = hold_grace_period(k)
        assert mc.offline(m) == 0  # the deactivation is an RCU callback now, root pinned
        assert s.lifetime_ref.read() == 2
        sl.kmem_cache_destroy(s)
        assert not Kasan.is_freed(s) and not Kasan.is_freed(child)
        out.set()
        r.join(5)
        assert k.kmemleak.quiesce()
        assert Kasan.is_freed(s) and Kasan.is_freed(child)
        assert k.kmemleak.scan() == [] and mc.freed == 1
        assert not k.findings.snapshot(), [f.text for f in k.findings]


def test_a_pinned_root_with_no_alias_left_is_resurrected_by_a_merge() -> None:
    with fixed() as k:
        sl = k.slab
        s = sl.kmem_cache_create("a", 192, flags=SLAB_ACCOUNT)
        s.lifetime_ref.inc()  # stands for a queued work's pin
        sl.kmem_cache_destroy(s)
        assert s.alias_count == 0 and s.on_list
        t = sl.kmem_cache_create("b", 192, flags=SLAB_ACCOUNT)
        assert t is s and (s.alias_count, s.lifetime_ref.read()) == (1, 2)
        k.memcg_slab.kmem_cache_put(s)  # the work's put
        sl.kmem_cache_destroy(t)
        assert Kasan.is_freed(s) and not k.findings.snapshot()


def test_alias_writes_assert_slab_mutex() -> None:
    with fixed() as k:
        s = k.slab.kmem_cache_create("a", 192, flags=SLAB_ACCOUNT)
        k.memcg_slab._alias_add(s, 1)  # without slab_mutex: the review's rule broken
        (f,) = k.findings
        assert f.kind == F.ASSERT_HELD and "slab_mutex" in f.title


# ---------------------------------------------------------------------- bug 12
def destroy_vs_merge(k: Kernel, park: bool):
    """D destroys alias A of a root shared with B; C merges a third alias meanwhile. With the
    bug, D is parked between its read and its write of alias_count."""
    sl = k.slab
    a = sl.kmem_cache_create("a", 192, flags=SLAB_ACCOUNT)
    b = sl.kmem_cache_create("b", 192, flags=SLAB_ACCOUNT)
    assert b is a and a.alias_count == 2
    bp = k.breakpoints.add("window:kmem_cache_destroy:alias_dec_unlocked", thread="destroyer")
    d = k.kthread_run(sl.kmem_cache_destroy, a, name="destroyer")
    if park:
        bp.wait(5)  # D read 2
    c = sl.kmem_cache_create("c", 192, flags=SLAB_ACCOUNT)  # C: 2 -> 3 under slab_mutex
    assert c is a
    bp.release()
    d.join(5)
    sl.kmem_cache_destroy(b)
    sl.kmem_cache_destroy(c)  # the last alias holder
    k.kmemleak.quiesce()
    return a


def test_bug12_lost_increment_hits_vm_bug_on_and_leaks_the_root() -> None:
    with buggy() as k:
        s = destroy_vs_merge(k, park=True)
        (f,) = k.findings
        assert f.kind == F.ASSERTION and f.title == VM_BUG
        assert f.kind in BY_NAME[BUG].detector
        assert "alias_count -1" in f.text and "__kmem_cache_destroy" in f.text
        assert s.on_list and not Kasan.is_freed(s)  # BUG(): never freed
        (leak,) = k.kmemleak.scan()
        assert leak.kind == F.MEMLEAK and leak.kind in BY_NAME[BUG].detector
        assert leak.title == "kmemleak: unreferenced object: kmem_cache a"
        assert "lifetime refcount 0" in leak.text and "-1 alias(es)" in leak.text


def test_bug12_lost_decrement_between_two_destroyers() -> None:
    with buggy() as k:
        sl = k.slab
        a = sl.kmem_cache_create("a", 192, flags=SLAB_ACCOUNT)
        sl.kmem_cache_create("b", 192, flags=SLAB_ACCOUNT)
        bp = k.breakpoints.add("window:kmem_cache_destroy:alias_dec_unlocked", count=2)
        ds = [k.kthread_run(sl.kmem_cache_destroy, a, name=f"d{i}") for i in range(2)]
        bp.wait(5, hits=2)  # both read 2
        bp.release()
        for d in ds:
            d.join(5)
        (f,) = k.findings
        assert f.title == VM_BUG and "alias_count 1" in f.text
        assert [x.title for x in k.kmemleak.scan(what="caches")] == \
            ["kmemleak: unreferenced object: kmem_cache a"]


def test_bug12_fixed_form_is_clean() -> None:
    with fixed() as k:
        s = destroy_vs_merge(k, park=False)
        assert Kasan.is_freed(s)
        assert k.kmemleak.scan() == []
        assert not k.findings.snapshot(), [f.text for f in k.findings]


@pytest.mark.parametrize("bug", [True, False], ids=["v4.18-refcount", "fixed"])
def test_bug12_randomized_cache_and_memcg_churn(bug: bool) -> None:
    """Module load/unload of same-size accounted caches (they merge) racing each other and
    memcg churn allocating from them: the bug is found within the bound; the fixed form
    stays clean for a second, and kmemleak finds nothing after a full teardown."""
    limit = 20.0 if bug else 1.0
    with fast_switching():
        with (buggy() if bug else fixed()) as k:
            k.add_instrument(Perturb(1, 0.3, 0.002))
            sl = k.slab
            stop, found = threading.Event(), threading.Event()
            k.findings.add_listener(lambda f: found.set())
            owned = OwnedCaches()  # per module handle: allocations in flight

            def modules(i: int) -> None:
                rng = random.Random(i)
                while not stop.is_set():
                    s = sl.kmem_cache_create(f"mod{i}", 192, flags=SLAB_ACCOUNT)
                    h = owned.publish(s)
                    stop.wait(rng.random() * 0.003)
                    owned.destroy(k, h, s)

            def memcgs(i: int) -> None:
                rng = random.Random(10 + i)
                memcg_user_loop(k, stop, f"m{i}", 3, lambda: owned.alloc_free(k, rng))

            ts = [k.kthread_run(modules, i, name=f"modules{i}") for i in range(3)]
            ts += [k.kthread_run(memcgs, i, name=f"memcgs{i}") for i in range(2)]
            elapsed = run_until_found(ts, stop, found, limit)
            check_churn_outcome(k, bug, found.is_set(), BY_NAME[BUG].detector, limit,
                                f"bug 12 {'on' if bug else 'off'}", elapsed)
            if not bug:
                assert k.kmemleak.quiesce()
                assert k.kmemleak.scan() == [], [f.text for f in k.findings]
