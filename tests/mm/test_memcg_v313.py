"""The v3.13 memcg design (3.8-3.15): lifecycle, and catalog bugs 6-10, 13-15 forced with
breakpoints, each against its fixed form."""

from __future__ import annotations

import errno
import threading

import pytest

from kmemcg import Kernel
from kmemcg.catalog import BY_NAME
from kmemcg.config import PRESETS, Config
from kmemcg.core import findings as F
from kmemcg.core.failslab import FailSlab
from kmemcg.core.kasan import Kasan, KasanOops
from kmemcg.mm.memcg_v313 import MemcgSlabV313
from kmemcg.mm.slub import SLAB_ACCOUNT
from kmemcg.testing import hold_grace_period, in_memcg, relocation_ahead, settle, wait_until

V313_BUGS = PRESETS["v3.13"].bugs


def v313(without: tuple[str, ...] = (), with_: tuple[str, ...] = ()) -> Config:
    """The v3.13 design with the preset's bugs minus ``without`` plus ``with_``."""
    return Config("v3.13", (V313_BUGS - set(without)) | set(with_), "2012", "v3.13")


FIXED = Config("v3.13", frozenset(), "2012", "v3.13")




def child_of(k: Kernel, s, m):
    return k.memcg.cache_from_memcg_idx(s, m.kmemcg_id)


def make_child(k: Kernel, s, m):
    """Allocate once in ``m`` (creation queued), settle: the child exists and is empty of
    objects (its slab stays as a cpu slab until shrunk)."""
    k.slab.kmem_cache_free(s, k.slab.kmem_cache_alloc(s))
    settle(k)
    c = child_of(k, s, m)
    assert c is not None
    return c


def kinds(k: Kernel) -> set[str]:
    return {f.kind for f in k.findings}


@pytest.mark.parametrize("config", [FIXED, v313()], ids=["fixed", "v3.13"])
def test_lifecycle_is_clean_and_frees_the_memcg(config):
    with Kernel(config=config) as k:
        assert isinstance(k.memcg_slab, MemcgSlabV313)
        sl, mc = k.slab, k.memcg
        s = sl.kmem_cache_create("dentry", 192, flags=SLAB_ACCOUNT)
        m = in_memcg(k)
        kid = m.kmemcg_id
        sl.kmem_cache_free(s, sl.kmem_cache_alloc(s))  # a miss: creation queued
        settle(k)
        objs = [sl.kmem_cache_alloc(s) for _ in range(5)]
        c = objs[-1].cache
        assert c is not s and c.memcg_params.memcg is m and c in m.kmem_caches
        assert c.memcg_params.nr_pages >= 1
        assert m.design.slab_caches_mutex.name == "memcg->slab_caches_mutex"
        mc.attach(k.current(), mc.root)
        assert mc.offline(m) == 0
        settle(k)
        assert not Kasan.is_freed(c) and c.memcg_params.dead  # objects: still there
        for o in objs:
            sl.kmem_cache_free(s, o)
        settle(k)
        sl.kmem_cache_destroy(s)
        settle(k)
        assert Kasan.is_freed(c) and Kasan.is_freed(m)
        assert mc.freed == 1 and kid not in mc._ids
        assert not k.findings.snapshot(), [f.title for f in k.findings]


def test_offline_destroys_an_empty_child_through_the_destroy_work():
    with Kernel(config=FIXED) as k:
        sl, mc = k.slab, k.memcg
        s = sl.kmem_cache_create("dentry", 192, flags=SLAB_ACCOUNT)
        m = in_memcg(k)
        c = make_child(k, s, m)
        kid = m.kmemcg_id
        mc.attach(k.current(), mc.root)
        assert mc.offline(m) == 0
        settle(k)
        assert Kasan.is_freed(c) and k.memcg_slab.nr_destroyed == 1
        assert Kasan.is_freed(m) and mc.cache_from_memcg_idx(s, kid) is None
        assert kid not in mc._ids
        sl.kmem_cache_destroy(s)
        settle(k)
        assert not k.findings.snapshot(), [f.title for f in k.findings]


# ---------------------------------------------------------------------------------- bug 7
def racing_creator_vs_relocation(k: Kernel) -> tuple:
    """W1 created X; activation A parks after publishing the new (empty) array; W2 checks the
    slot there (NULL) and parks; A copies X; W2 creates Y and publishes it over X."""
    sl, mc = k.slab, k.memcg
    s = sl.kmem_cache_create("dentry", 192, flags=SLAB_ACCOUNT)
    m = in_memcg(k)
    x = make_child(k, s, m)
    others = []
    for i in range(3):  # ids 1..3: the array (4 slots) is full
        o = mc.create(f"o{i}")
        mc.memcg_activate_kmem(o)
        others.append(o)
    bug7 = k.config.bug("memcg_create_without_slab_mutex_recheck")
    bp_a = k.breakpoints.add("window:memcg_update_cache_size:published_empty")
    bp_w = k.breakpoints.add("window:memcg_create_kmem_cache:checked")
    a = k.kthread_run(lambda: mc.memcg_activate_kmem(mc.create("big")), name="activate")
    bp_a.wait()
    assert mc.css_tryget_online(m)
    k.memcg_slab.memcg_create_cache_enqueue(m, s)  # W2, queued behind W1
    if bug7:
        bp_w.wait()  # W2 read NULL in the empty array
    bp_a.release()
    a.join(5)
    bp_w.release()
    settle(k)
    return s, m, x


def test_bug7_second_creator_overwrites_the_published_child():
    with Kernel(config=v313()) as k:
        s, m, x = racing_creator_vs_relocation(k)
        f = next(f for f in k.findings if f.kind == F.ASSERTION)
        assert f.kind in BY_NAME["memcg_create_without_slab_mutex_recheck"].detector
        assert f.title == "kernel BUG at mm/memcontrol.c: memcg_caches[0] of dentry already set"
        assert child_of(k, s, m) is not x and k.memcg_slab.leaked_children(s) == [x]
        k.memcg.attach(k.current(), k.memcg.root)
        k.slab.kmem_cache_destroy(s)  # X is in no slot: nothing destroys it
        leak = next(f for f in k.findings if f.kind == F.MEMLEAK)
        assert x.name in leak.title
        assert kinds(k) == {F.ASSERTION, F.MEMLEAK}


def test_bug7_fixed_recheck_under_slab_mutex_keeps_one_child():
    with Kernel(config=v313(without=("memcg_create_without_slab_mutex_recheck",))) as k:
        s, m, x = racing_creator_vs_relocation(k)
        assert child_of(k, s, m) is x and s.memcg_params.children == [x]
        k.memcg.attach(k.current(), k.memcg.root)
        k.slab.kmem_cache_destroy(s)
        assert not k.findings.snapshot(), [f.title for f in k.findings]


BUG7_ALONE = v313(without=V313_BUGS, with_=("memcg_create_without_slab_mutex_recheck",))


def creator_parked_at(k: Kernel, window: str):
    """Root s with a relocation ahead; a miss in memcg m queued a creation W1, which parks at
    ``window``. Returns (s, m, bp)."""
    sl, mc = k.slab, k.memcg
    s, m = relocation_ahead(k)
    mc.attach(k.current(), m)
    bp = k.breakpoints.add(f"window:{window}")
    sl.kmem_cache_free(s, sl.kmem_cache_alloc(s))  # a miss: W1 queued
    bp.wait()
    return s, m, bp


def creator_parked_at_publish(k: Kernel):
    """W1 created X and parks holding the loaded memcg_caches array (``old``) before its
    store. Returns (s, m, bp, old)."""
    s, m, bp = creator_parked_at(k, "memcg_create_kmem_cache:publish")
    return s, m, bp, s.memcg_params.memcg_caches.access()


def test_bug7_creator_stores_into_the_array_a_relocation_copied():
    """W1 created X and loaded the memcg_caches array to publish it; an activation relocates
    the array meanwhile (slot 0 is copied empty); W1's store lands in the old array. X is in
    no slot (lost): the next miss creates a second child Y, and X's destroy at the offline
    clears Y's slot: the fix's VM_BUG_ON(slot != cachep), which the model checks in both
    forms, reports it."""
    with Kernel(config=BUG7_ALONE) as k:
        mc = k.memcg
        s, m, bp, old = creator_parked_at_publish(k)
        out, _reader = hold_grace_period(k)  # the old array outlives W1's store
        mc.memcg_activate_kmem(mc.create("big"))  # relocates: slot 0 copied empty
        assert s.memcg_params.memcg_caches.access() is not old
        bp.release()
        assert wait_until(lambda: old.entries[m.kmemcg_id] is not None, 5)
        x = old.entries[m.kmemcg_id]
        out.set()
        settle(k)
        assert child_of(k, s, m) is None and k.memcg_slab.leaked_children(s) == [x]
        assert not k.findings.snapshot(), [f.title for f in k.findings]
        y = make_child(k, s, m)
        assert y is not x and child_of(k, s, m) is y
        x_name = x.name  # X is freed by the end
        mc.attach(k.current(), mc.root)
        assert mc.offline(m) == 0
        settle(k)
        titles = [f.title for f in k.findings if f.kind == F.ASSERTION]
        assert f"kernel BUG at mm/memcontrol.c: memcg_caches[0] of dentry is not {x_name}" \
            in titles, titles
        assert F.ASSERTION in BY_NAME["memcg_create_without_slab_mutex_recheck"].detector


def test_bug7_creator_stores_into_the_array_the_relocation_freed():
    """The same lost publish, with no reader holding the grace period: the relocation's
    kfree_rcu() of the old array has run by the time W1 stores (W1 holds memcg_cache_mutex,
    no RCU read section), so the store is a use-after-free."""
    with Kernel(config=BUG7_ALONE) as k:
        mc = k.memcg
        s, m, bp, old = creator_parked_at_publish(k)
        mc.memcg_activate_kmem(mc.create("big"))  # relocates; the old array goes to kfree_rcu
        k.rcu.barrier()
        assert Kasan.is_freed(old)
        bp.release()
        assert wait_until(lambda: any(f.kind == F.KASAN_UAF for f in k.findings))
        (f,) = [f for f in k.findings if f.kind == F.KASAN_UAF]
        assert f.title == "BUG: KASAN: use-after-free in _publish"
        assert f.kind in BY_NAME["memcg_create_without_slab_mutex_recheck"].detector


@pytest.mark.parametrize("config", [FIXED, BUG7_ALONE], ids=["fixed", "bug7"])
def test_bug7_destroyed_child_stays_in_the_relocated_array(config):
    """The destruction half of 2edefe1155b3: 3.13 clears a destroyed child's slot
    (memcg_release_cache()) under no lock a relocation takes. The destroy work of m's child
    X loads the array and parks before its store; an activation relocates, copying X into
    the new array; the store clears the old one. X, freed, stays published: the next memcg
    given m's kmemcg_id allocates from the root, and the lookup reads X (KASAN). The fix
    clears the slot under slab_mutex, before the relocation can copy it."""
    with Kernel(config=config) as k:
        sl, mc = k.slab, k.memcg
        s, m = relocation_ahead(k)
        kid = m.kmemcg_id
        mc.attach(k.current(), m)
        x = make_child(k, s, m)
        sl.kmem_cache_shrink(x)
        mc.attach(k.current(), mc.root)
        bug7 = k.config.bug("memcg_create_without_slab_mutex_recheck")
        bp = k.breakpoints.add("window:memcg_release_cache:clear")
        assert mc.css_tryget_online(m)  # m keeps its kmemcg_id until we let it go
        assert mc.offline(m) == 0  # X is empty: its destroy work destroys it
        if bug7:
            bp.wait()  # the destroy work holds the array X is published in
        else:
            assert wait_until(lambda: Kasan.is_freed(x))
        old = s.memcg_params.memcg_caches.access()
        out, _reader = hold_grace_period(k)  # the old array outlives the store
        mc.memcg_activate_kmem(mc.create("big"))  # relocates: slot kid copied
        assert mc.nr_cache_ids == 10
        bp.release()
        assert wait_until(lambda: old.entries[kid] is None, 5)
        out.set()
        settle(k)
        mc.css_put(m)
        settle(k)
        assert Kasan.is_freed(x) and Kasan.is_freed(m)
        assert (k.memcg.cache_from_memcg_idx(s, kid) is x) == bug7
        m2 = in_memcg(k)
        assert m2.kmemcg_id == kid
        try:
            sl.kmem_cache_free(s, sl.kmem_cache_alloc(s))
        except KasanOops:
            pass
        settle(k)
        if bug7:
            (f,) = k.findings
            assert f.title == "BUG: KASAN: use-after-free in memcg_kmem_get_cache", f.title
            assert f.kind in BY_NAME["memcg_create_without_slab_mutex_recheck"].detector
        else:
            assert not k.findings.snapshot(), [f.title for f in k.findings]


@pytest.mark.parametrize("config", [FIXED, BUG7_ALONE], ids=["fixed", "bug7"])
def test_an_activation_waits_for_slab_mutex_while_a_child_is_created(config):
    """kmem_cache_create_memcg() holds slab_mutex across __kmem_cache_create(), where
    sysfs_slab_add() may sleep: an activation that must relocate the arrays waits there for
    the creation, and relocates once the creator drops slab_mutex (just before the creator's
    publish, with bug 7 under memcg_cache_mutex only)."""
    with Kernel(config=config) as k:
        mc = k.memcg
        s, m, bp = creator_parked_at(k, "kmem_cache_create_memcg:sysfs_slab_add")
        waits = k.breakpoints.add("lock_contended:slab_mutex", thread="activate")
        a = k.kthread_run(lambda: mc.memcg_activate_kmem(mc.create("big")), name="activate")
        waits.wait()  # the activation found slab_mutex held by the creator
        waits.release()
        assert mc.nr_cache_ids == 4 and a.is_alive()
        bp.release()
        a.join(5)
        settle(k)
        assert mc.nr_cache_ids == 10
        if not k.config.bug("memcg_create_without_slab_mutex_recheck"):
            assert child_of(k, s, m) is not None  # published under slab_mutex
            assert not k.findings.snapshot(), [f.title for f in k.findings]


class FailNth(FailSlab):
    """Fails the ``n``-th allocation that asks (1-based), and no other."""

    def __init__(self, n: int) -> None:
        super().__init__(probability=1.0)
        self.n = n

    def should_fail(self, task, site: str) -> bool:
        self.n -= 1
        return self.n == 0


@pytest.mark.parametrize("config", [FIXED, BUG7_ALONE], ids=["fixed", "bug7"])
def test_a_failed_relocation_leaves_the_size_and_the_next_activation_relocates_again(config):
    """3.13's memcg_update_all_caches() stops at the first cache whose kzalloc() fails: the
    caches before it keep their new arrays, memcg_limited_groups_array_size stays, and the
    activation fails (its id is given back). The next activation relocates every cache,
    those already relocated too, and keeps every child."""
    with Kernel(config=config) as k:
        sl, mc = k.slab, k.memcg
        s, m = relocation_ahead(k)
        t = sl.kmem_cache_create("inode", 128, flags=SLAB_ACCOUNT)
        mc.attach(k.current(), m)
        x = make_child(k, s, m)
        first, second = (r for r in sl.slab_caches if r in (s, t))
        arrays = {r: r.memcg_params.memcg_caches.access() for r in (s, t)}
        k.failslab = FailNth(2)  # the second root's array
        big = mc.create("big")
        assert mc.memcg_activate_kmem(big) == -errno.ENOMEM
        assert big.kmemcg_id < 0 and 4 not in mc._ids and mc.nr_cache_ids == 4
        grown = first.memcg_params.memcg_caches.access()
        assert grown is not arrays[first] and len(grown.entries) == 10
        assert second.memcg_params.memcg_caches.access() is arrays[second]
        k.failslab = FailSlab()
        assert mc.memcg_activate_kmem(big) == 4 and mc.nr_cache_ids == 10
        assert first.memcg_params.memcg_caches.access() is not grown  # relocated again
        assert len(second.memcg_params.memcg_caches.access().entries) == 10
        assert child_of(k, s, m) is x
        mc.attach(k.current(), mc.root)
        sl.kmem_cache_destroy(t)
        sl.kmem_cache_destroy(s)
        settle(k)
        assert not k.findings.snapshot(), [f.title for f in k.findings]


# ---------------------------------------------------------------------------------- bug 9
def lookup_then_offline(k: Kernel):
    """T got child C (empty) from the lookup and parks; T is moved out, M goes offline, the
    destroy work destroys C; T allocates."""
    sl, mc = k.slab, k.memcg
    s = sl.kmem_cache_create("dentry", 192, flags=SLAB_ACCOUNT)
    m = in_memcg(k)
    c = make_child(k, s, m)
    sl.kmem_cache_shrink(c)
    assert c.memcg_params.nr_pages == 0
    mc.attach(k.current(), mc.root)
    out: list = []
    bp = k.breakpoints.add("window:memcg_kmem_get_cache:returned", thread="task")

    def task() -> None:
        mc.attach(k.current(), m)
        try:
            out.append(sl.kmem_cache_alloc(s))
        except KasanOops:
            out.append(None)

    t = k.kthread_run(task, name="task")
    tt = bp.wait()
    mc.attach(tt, mc.root)
    k.rcu.barrier()
    assert mc.offline(m) == 0
    settle(k)
    bp.release()
    t.join(5)
    return s, c, out


def test_bug9_allocation_from_a_child_destroyed_after_the_lookup():
    with Kernel(config=v313()) as k:
        s, c, out = lookup_then_offline(k)
        assert out == [None] and Kasan.is_freed(c)
        (f,) = k.findings
        assert f.kind == F.KASAN_UAF and f.kind in BY_NAME["get_cache_without_reference"].detector
        assert f.title.startswith("BUG: KASAN: use-after-free in ")


def test_bug9_fixed_the_lookup_pins_the_child():
    with Kernel(config=v313(without=("get_cache_without_reference",))) as k:
        s, c, out = lookup_then_offline(k)
        assert out[0] is not None and out[0].cache is c and not Kasan.is_freed(c)
        k.slab.kmem_cache_free(s, out[0])
        settle(k)
        k.slab.kmem_cache_destroy(s)  # the pinned dead child goes with its root
        settle(k)
        assert Kasan.is_freed(c)
        assert not k.findings.snapshot(), [f.title for f in k.findings]


# ---------------------------------------------------------------------------------- bug 8
def child_with_one_object(k: Kernel):
    """Root s, memcg m and its child c holding one object ``obj`` on a slab that is off the
    cpu (its free discards the slab: c's last page); the current task back in the root."""
    sl, mc = k.slab, k.memcg
    s = sl.kmem_cache_create("dentry", 192, flags=SLAB_ACCOUNT)
    m = in_memcg(k)
    c = make_child(k, s, m)
    obj = sl.kmem_cache_alloc(s)
    assert obj.cache is c
    mc.attach(k.current(), mc.root)
    sl.kmem_cache_shrink(c)
    return s, m, c, obj


def last_page_freed_during_offline(k: Kernel, window: str = "memcg_release_pages:after_sub"):
    """F frees a dead-to-be child's last object (nr_pages -> 0) and parks at ``window`` (after
    the sub; bug 10: after the uncharge); M goes offline, its destroy work sees 0 and destroys
    C; F goes on."""
    sl, mc = k.slab, k.memcg
    s, m, c, obj = child_with_one_object(k)
    bp = k.breakpoints.add(f"window:{window}", thread="freer")

    def freer() -> None:
        try:
            sl.kmem_cache_free(s, obj)
        except KasanOops:
            pass

    t = k.kthread_run(freer, name="freer")
    bp.wait()
    assert mc.offline(m) == 0
    assert wait_until(lambda: Kasan.is_freed(c))
    bp.release()
    t.join(5)
    settle(k)
    return s, c


def test_bug8_freer_schedules_the_destroy_of_a_freed_child():
    with Kernel(config=v313(without=("get_cache_without_reference",
                                     "free_path_touches_cache_after_uncharge"))) as k:
        last_page_freed_during_offline(k)
        (f,) = k.findings
        assert f.kind == F.KASAN_UAF and f.kind in BY_NAME["destroy_work_scheduled_twice"].detector
        assert f.title == "BUG: KASAN: use-after-free in mem_cgroup_destroy_cache"


def test_bug8_fixed_the_freer_never_schedules():
    with Kernel(config=v313(without=("destroy_work_scheduled_twice",
                                     "free_path_touches_cache_after_uncharge"))) as k:
        s, c = last_page_freed_during_offline(k)
        k.slab.kmem_cache_destroy(s)
        assert not k.findings.snapshot(), [f.title for f in k.findings]


def test_bug8_fixed_offline_leaves_a_child_whose_destroy_is_decided():
    """Bug 8's other place: M's offline marks C dead; before it queues C's destroy work, the
    freer of C's last page queues it, and the work decides to destroy C, then waits for
    slab_caches_mutex (held by the offline) to take C off M's list. The offline must not queue
    the work again: that instance would run after C is freed."""
    with Kernel(config=v313(without=("destroy_work_scheduled_twice",
                                     "free_path_touches_cache_after_uncharge"))) as k:
        sl, mc = k.slab, k.memcg
        s, m, c, obj = child_with_one_object(k)
        bp = k.breakpoints.add("window:memcg_deactivate_kmem_caches:dead", thread="offline")
        t = k.kthread_run(lambda: mc.offline(m), name="offline")
        bp.wait()
        sl.kmem_cache_free(s, obj)  # the last page: the freer queues the destroy
        assert wait_until(lambda: c.memcg_params.destroying)  # decided, waits for the list
        bp.release()
        t.join(5)
        settle(k)
        assert Kasan.is_freed(c)
        assert not k.findings.snapshot(), [f.title for f in k.findings]


# ---------------------------------------------------------------------------------- bug 10
def test_bug10_free_path_touches_the_destroyed_child():
    with Kernel(config=v313(without=("destroy_work_scheduled_twice",))) as k:
        last_page_freed_during_offline(k, "memcg_uncharge_slab:after_put")
        (f,) = k.findings
        assert f.kind == F.KASAN_UAF
        assert f.kind in BY_NAME["free_path_touches_cache_after_uncharge"].detector
        assert f.title == "BUG: KASAN: use-after-free in memcg_uncharge_slab"


# ---------------------------------------------------------------------------------- bug 6
def test_bug6_destroy_under_slab_caches_mutex_is_circular_and_recursive():
    with Kernel(config=v313(with_=("shrink_under_slab_caches_mutex",))) as k:
        sl, mc = k.slab, k.memcg
        s = sl.kmem_cache_create("dentry", 192, flags=SLAB_ACCOUNT)
        m = in_memcg(k)
        c = make_child(k, s, m)  # creation recorded slab_mutex -> slab_caches_mutex
        sl.kmem_cache_shrink(c)
        mc.attach(k.current(), mc.root)
        found = threading.Event()
        k.findings.add_listener(lambda f: found.set() if f.kind == F.RECURSIVE_LOCKING else 0)
        k.kthread_run(mc.offline, m, name="rmdir")
        assert found.wait(10)
        got = kinds(k)
        assert {F.CIRCULAR_LOCKING, F.RECURSIVE_LOCKING} <= got
        assert got <= set(BY_NAME["shrink_under_slab_caches_mutex"].detector)
        circ = next(f for f in k.findings if f.kind == F.CIRCULAR_LOCKING)
        assert "memcg->slab_caches_mutex" in circ.text and "slab_mutex" in circ.text


def test_bug6_off_offline_only_queues_the_work():
    with Kernel(config=v313()) as k:
        sl, mc = k.slab, k.memcg
        s = sl.kmem_cache_create("dentry", 192, flags=SLAB_ACCOUNT)
        m = in_memcg(k)
        c = make_child(k, s, m)
        sl.kmem_cache_shrink(c)
        mc.attach(k.current(), mc.root)
        assert mc.offline(m) == 0
        settle(k)
        assert Kasan.is_freed(c)
        assert not k.findings.snapshot(), [f.title for f in k.findings]


# ---------------------------------------------------------------------------------- bug 13
def reader_during_relocation(k: Kernel):
    sl, mc = k.slab, k.memcg
    s, m = relocation_ahead(k)
    bp = k.breakpoints.add("window:cache_from_memcg_idx:array", thread="reader")
    out: list = []

    def reader() -> None:
        mc.attach(k.current(), m)
        try:
            out.append(sl.kmem_cache_alloc(s))
        except KasanOops:
            out.append(None)

    r = k.kthread_run(reader, name="reader")
    bp.wait()
    mc.memcg_activate_kmem(mc.create("big"))  # relocates every root's array
    bp.release()
    r.join(5)
    settle(k)
    return out


def test_bug13_relocated_params_freed_under_a_reader():
    with Kernel(config=v313()) as k:
        out = reader_during_relocation(k)
        assert out == [None]
        (f,) = k.findings
        assert f.kind == F.KASAN_UAF and f.title == \
            "BUG: KASAN: use-after-free in cache_from_memcg_idx"


def test_bug13_fixed_kfree_rcu():
    with Kernel(config=v313(without=("memcg_params_freed_without_rcu",))) as k:
        out = reader_during_relocation(k)
        assert out[0] is not None
        assert not k.findings.snapshot(), [f.title for f in k.findings]


# ---------------------------------------------------------------------------------- bug 15
def destroy_one_alias_of_a_root_with_busy_child(k: Kernel):
    sl = k.slab
    r = sl.kmem_cache_create("kmalloc-32", 32, flags=SLAB_ACCOUNT)
    a = sl.kmem_cache_create("module-a", 32, flags=SLAB_ACCOUNT)
    assert a is r and r.alias_count == 2
    m = in_memcg(k)
    c = make_child(k, r, m)
    obj = sl.kmem_cache_alloc(r)  # module B's object in R(M)
    assert obj.cache is c
    sl.kmem_cache_destroy(a)  # module A unloads
    return r, c, obj


def test_bug15_children_destroyed_before_the_alias_check():
    with Kernel(config=v313()) as k:
        r, c, obj = destroy_one_alias_of_a_root_with_busy_child(k)
        (f,) = k.findings
        assert f.kind == F.SLAB_CACHE_NOT_EMPTY
        assert f.title == f"kmem_cache_destroy {c.name}: Slab cache still has objects"


def test_bug15_fixed_children_only_for_the_last_alias():
    with Kernel(config=v313(without=("children_destroyed_before_alias_check",))) as k:
        r, c, obj = destroy_one_alias_of_a_root_with_busy_child(k)
        assert r.alias_count == 1 and not k.findings.snapshot()
        k.slab.kmem_cache_free(r, obj)
        k.memcg.attach(k.current(), k.memcg.root)
        k.slab.kmem_cache_destroy(r)
        settle(k)
        assert Kasan.is_freed(c) and Kasan.is_freed(r)
        assert not k.findings.snapshot(), [f.title for f in k.findings]


# ---------------------------------------------------------------------------------- bug 14
def root_destroy_against_running_destroy_work(k: Kernel, in_grace_period: bool = False):
    """W (destroy work queued at offline) parks after reading nr_pages == 0; D (root destroy)
    loads the child; W destroys it; D goes on with the freed child (``in_grace_period``: an
    RCU reader holds the grace period meanwhile, so a free deferred by RCU has not come)."""
    sl, mc = k.slab, k.memcg
    s = sl.kmem_cache_create("dentry", 192, flags=SLAB_ACCOUNT)
    m = in_memcg(k)
    c = make_child(k, s, m)
    sl.kmem_cache_shrink(c)
    mc.attach(k.current(), mc.root)
    bp_w = k.breakpoints.add("window:kmem_cache_destroy_work_func:nr_pages")
    bp_d = k.breakpoints.add("window:kmem_cache_destroy_memcg_children:got_child",
                             thread="destroyer")
    assert mc.offline(m) == 0
    bp_w.wait()

    def destroyer() -> None:
        try:
            sl.kmem_cache_destroy(s)
        except KasanOops:
            pass

    d = k.kthread_run(destroyer, name="destroyer")
    bug14 = k.config.bug("cancel_work_sync_self_freeing_work")
    if bug14:
        bp_d.wait()
    else:  # D waits for memcg_cache_mutex, held by W
        assert wait_until(lambda: d.task is not None and d.task.blocked_on is not None)
    if in_grace_period:
        out, _reader = hold_grace_period(k)
    bp_w.release()
    if bug14:
        assert wait_until(lambda: k.kasan.free_recorded(c))
    bp_d.release()
    d.join(5)
    if in_grace_period:
        assert not Kasan.is_freed(c) or k.findings.snapshot()  # poisoned by D's report only
        out.set()
    settle(k)
    return s, c


def test_bug14_root_destroy_destroys_the_child_the_work_freed():
    with Kernel(config=v313()) as k:
        root_destroy_against_running_destroy_work(k)
        (f,) = k.findings
        assert f.kind == F.KASAN_UAF
        assert f.kind in BY_NAME["cancel_work_sync_self_freeing_work"].detector
        assert f.title == "BUG: KASAN: use-after-free in kmem_cache_destroy_memcg_children"


def test_bug14_alone_the_second_destroy_is_a_use_after_free_within_the_grace_period():
    """Bug 9 off: the model frees a destroyed child a grace period late (lookups may hold
    it). 3.13 freed it at once, so D's destroy of the child W destroyed is still the kernel's
    use after free, reported where D touches it, whether the grace period ended or not."""
    with Kernel(config=Config.make("fixed", bugs=["cancel_work_sync_self_freeing_work"])) as k:
        assert k.config.memcg == "v3.13" and not k.config.bug("get_cache_without_reference")
        root_destroy_against_running_destroy_work(k, in_grace_period=True)
        (f,) = k.findings
        assert f.kind == F.KASAN_UAF
        assert f.title == "BUG: KASAN: use-after-free in kmem_cache_destroy_memcg"
        assert "Freed by task" in f.text and "kmem_cache_destroy_work_func" in f.text


def test_bug14_fixed_slot_loaded_under_memcg_cache_mutex():
    with Kernel(config=v313(without=("cancel_work_sync_self_freeing_work",))) as k:
        s, c = root_destroy_against_running_destroy_work(k)
        assert Kasan.is_freed(c) and Kasan.is_freed(s)
        assert not k.findings.snapshot(), [f.title for f in k.findings]


def test_root_destroy_skips_empty_slots_without_memcg_cache_mutex():
    """An empty slot is skipped before memcg_cache_mutex is taken (as 3.13 does): a root
    destroy must not queue behind creations for slots it has nothing to do with."""
    with Kernel(config=FIXED) as k:
        sl, mc = k.slab, k.memcg
        s = sl.kmem_cache_create("dentry", 192, flags=SLAB_ACCOUNT)
        for i in range(3):  # activated memcgs: slots exist, all empty
            mc.memcg_activate_kmem(mc.create(f"m{i}"))
        held, out = threading.Event(), threading.Event()

        def holder() -> None:
            with k.memcg_slab.memcg_cache_mutex:
                held.set()
                out.wait(10)

        h = k.kthread_run(holder, name="holder")
        assert held.wait(5)
        d = k.kthread_run(lambda: sl.kmem_cache_destroy(s), name="destroyer")
        try:
            assert wait_until(lambda: Kasan.is_freed(s))
        finally:
            out.set()
            d.join(5)
            h.join(5)
        assert not k.findings.snapshot(), [f.title for f in k.findings]


def test_root_destroy_flushes_only_the_creations_queued_before_it():
    """_flush_creations() waits like flush_workqueue(): for the creations of the root queued
    before the call, not for those another alias's users queue meanwhile (waiting for those
    too never ended while they kept allocating in new memcgs)."""
    with Kernel(config=FIXED) as k:
        sl = k.slab
        s = sl.kmem_cache_create("dentry", 192, flags=SLAB_ACCOUNT)
        first = k.breakpoints.add("window:memcg_create_kmem_cache:checked")
        later = k.breakpoints.add("window:memcg_create_kmem_cache:checked")
        in_memcg(k, "m1")
        sl.kmem_cache_free(s, sl.kmem_cache_alloc(s))  # creation 1 queued
        first.wait()  # ... and parked holding memcg_cache_mutex
        done = threading.Event()

        def flusher() -> None:
            k.memcg_slab._flush_creations(s)
            done.set()

        f = k.kthread_run(flusher, name="flusher")
        assert wait_until(lambda: f.task is not None and f.task.blocked_on is not None)
        in_memcg(k, "m2")
        sl.kmem_cache_free(s, sl.kmem_cache_alloc(s))  # creation 2, queued after the call
        first.release()
        try:
            later.wait()  # creation 2 runs only after creation 1 finished
            assert done.wait(5), "the flush waited for a creation queued after it"
        finally:
            later.release()
            f.join(5)
        settle(k)
        assert not k.findings.snapshot(), [f.title for f in k.findings]
