"""Per-memcg kmem caches, the fixed design: asynchronous creation with the recheck, routing of
accounted allocations, per-page charges pinning the memcg, deactivation at offline, destruction
with the memcg, and root destroy with dying + flush."""

from __future__ import annotations

import random
import threading

from kmemcg import Kernel
from kmemcg.core import findings as F
from kmemcg.core.kasan import Kasan, KasanOops
from kmemcg.mm.slub import SLAB_ACCOUNT
from kmemcg.testing import in_memcg, settle, wait_until


def test_an_accounted_allocation_goes_to_the_memcgs_child_once_it_exists(kernel):
    k, sl = kernel, kernel.slab
    s = sl.kmem_cache_create("dentry", 192, flags=SLAB_ACCOUNT)
    plain = sl.kmem_cache_create("plain", 600)
    o_root = sl.kmem_cache_alloc(s)  # root memcg: the root cache
    assert o_root.cache is s
    m = in_memcg(k)
    first = sl.kmem_cache_alloc(s)
    assert first.cache is s  # a miss: creation queued, the root serves meanwhile
    settle(k)
    o = sl.kmem_cache_alloc(s)
    c = o.cache
    assert c is not s and c.memcg_params.root_cache is s and c.memcg_params.memcg is m
    assert c.name == f"dentry({m.serial}:m)"
    assert k.memcg.cache_from_memcg_idx(s, m.kmemcg_id) is c
    assert c in m.kmem_caches and c in s.memcg_params.children
    assert sl.kmem_cache_alloc(plain).cache is plain  # not SLAB_ACCOUNT: never accounted
    for obj in (o_root, first, o):
        sl.kmem_cache_free(s, obj)  # cache_from_obj(): o goes back to its child
    assert not k.findings.snapshot()


def test_racing_creators_make_one_child(kernel):
    k, sl = kernel, kernel.slab
    s = sl.kmem_cache_create("inode", 600, flags=SLAB_ACCOUNT)
    m = k.memcg.create("m")
    k.memcg.memcg_activate_kmem(m)
    go = threading.Barrier(6)

    def alloc() -> None:
        k.memcg.attach(k.current(), m)
        go.wait()
        for _ in range(5):
            k.slab.kmem_cache_free(s, k.slab.kmem_cache_alloc(s))

    ts = [k.kthread_run(alloc, name=f"a{i}") for i in range(6)]
    for t in ts:
        t.join(10)
    settle(k)
    assert len(s.memcg_params.children) == 1
    assert k.memcg_slab.nr_created == 1
    assert not k.findings.snapshot()


def test_child_slab_pages_pin_the_memcg(kernel):
    k, sl = kernel, kernel.slab
    s = sl.kmem_cache_create("filp", 1024, flags=SLAB_ACCOUNT)  # 4 objects per slab
    m = in_memcg(k)
    sl.kmem_cache_free(s, sl.kmem_cache_alloc(s))
    settle(k)
    base = m.css_ref.read()
    objs = [sl.kmem_cache_alloc(s) for _ in range(12)]
    c = objs[0].cache
    assert all(o.cache is c for o in objs)
    assert m.css_ref.read() >= base + 3  # one reference per charged slab page
    for o in objs:
        sl.kmem_cache_free(s, o)
    sl.kmem_cache_shrink(c)
    assert m.css_ref.read() == base
    assert not k.findings.snapshot()


def test_offline_deactivates_the_children_and_the_memcg_takes_them_when_freed(kernel):
    k, sl, mc = kernel, kernel.slab, kernel.memcg
    s = sl.kmem_cache_create("sock", 256, flags=SLAB_ACCOUNT)
    m = in_memcg(k)
    sl.kmem_cache_free(s, sl.kmem_cache_alloc(s))  # a miss: creation queued
    settle(k)
    kept = [sl.kmem_cache_alloc(s) for _ in range(3)]
    c = kept[0].cache
    mc.attach(k.current(), mc.root)
    assert mc.offline(m) == 0
    assert mc.cache_from_memcg_idx(s, 0) is None  # unpublished at once
    settle(k)
    assert k.memcg_slab.nr_deactivated == 1
    assert not Kasan.is_freed(m)  # objects are still charged: a zombie memcg
    for o in kept:
        sl.kmem_cache_free(s, o)
    sl.kmem_cache_shrink(c)
    settle(k)
    assert wait_until(lambda: Kasan.is_freed(m))
    assert Kasan.is_freed(c) and c not in s.memcg_params.children
    sl.kmem_cache_destroy(s)
    assert not k.findings.snapshot(), [f.title for f in k.findings]


def test_root_destroy_flushes_pending_creation_and_shuts_the_children_down(kernel):
    k, sl = kernel, kernel.slab
    s = sl.kmem_cache_create("vm_area", 192, flags=SLAB_ACCOUNT)
    in_memcg(k, "a")
    sl.kmem_cache_free(s, sl.kmem_cache_alloc(s))
    settle(k)
    o = sl.kmem_cache_alloc(s)
    c = o.cache
    sl.kmem_cache_free(s, o)
    in_memcg(k, "b")
    bp = k.breakpoints.add("work_start:memcg_kmem_cache_create_func")
    sl.kmem_cache_free(s, sl.kmem_cache_alloc(s))  # b's creation is queued ...
    bp.wait()  # ... and held before it runs (else a quick worker creates b's child first)
    d = k.kthread_run(sl.kmem_cache_destroy, s, name="destroyer")
    assert wait_until(lambda: s.memcg_params.dying)  # dying, then flush: b's creation bails
    bp.release()
    d.join(5)
    assert Kasan.is_freed(s) and Kasan.is_freed(c)
    assert k.memcg_slab.nr_created == 1
    settle(k)
    assert not k.findings.snapshot(), [f.title for f in k.findings]


def test_root_destroy_with_a_busy_child_reports_and_keeps_the_root(kernel):
    k, sl = kernel, kernel.slab
    s = sl.kmem_cache_create("task_struct", 600, flags=SLAB_ACCOUNT)
    in_memcg(k)
    sl.kmem_cache_free(s, sl.kmem_cache_alloc(s))
    settle(k)
    o = sl.kmem_cache_alloc(s)
    sl.kmem_cache_destroy(s)
    (f,) = k.findings.of_kind(F.SLAB_CACHE_NOT_EMPTY)
    assert o.cache.name in f.title
    assert not Kasan.is_freed(s) and s.alias_count == 1
    sl.kmem_cache_free(s, o)
    k.findings.clear()
    sl.kmem_cache_destroy(s)
    assert Kasan.is_freed(s)
    try:
        sl.kmem_cache_alloc(s)
    except KasanOops:
        pass
    assert k.findings.of_kind(F.KASAN_UAF)
    k.findings.clear()


def test_concurrent_memcg_churn_with_accounted_allocations_stays_clean():
    with Kernel(name="memcg-slab-churn") as k:
        sl, mc = k.slab, k.memcg
        caches = [sl.kmem_cache_create(n, sz, flags=SLAB_ACCOUNT)
                  for n, sz in (("a", 192), ("b", 1024))]
        groups = [mc.create(f"g{i}") for i in range(3)]
        for g in groups:
            mc.memcg_activate_kmem(g)
        stop = threading.Event()

        def worker(i: int) -> None:
            rng = random.Random(i)
            me = k.current()
            mine = []
            while not stop.is_set():
                mc.attach(me, rng.choice(groups))
                s = rng.choice(caches)
                if rng.random() < 0.6 or not mine:
                    mine.append((s, sl.kmem_cache_alloc(s)))
                else:
                    s2, o = mine.pop(rng.randrange(len(mine)))
                    sl.kmem_cache_free(s2, o)
            for s2, o in mine:
                sl.kmem_cache_free(s2, o)
            mc.exit_task(me)

        def churn() -> None:
            rng = random.Random(7)
            while not stop.is_set():
                t = mc.create(f"t{rng.randrange(100)}")
                mc.memcg_activate_kmem(t)
                mc.attach(k.current(), t)
                s = rng.choice(caches)
                sl.kmem_cache_free(s, sl.kmem_cache_alloc(s))
                mc.attach(k.current(), mc.root)
                assert mc.offline(t) == 0

        ts = [k.kthread_run(worker, i, name=f"w{i}") for i in range(6)]
        ts.append(k.kthread_run(churn, name="churn"))
        stop.wait(1.5)
        stop.set()
        for t in ts:
            t.join(10)
        settle(k)
        for s in caches:
            for c in list(s.memcg_params.children):
                sl.kmem_cache_shrink(c)
        settle(k)
        for s in caches:
            sl.kmem_cache_destroy(s)
        settle(k)
        assert not k.findings.snapshot(), [f.title for f in k.findings]
        assert k.memcg_slab.nr_created >= 3
