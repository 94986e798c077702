"""kmemleak: each kind of leak is found when leaked on purpose, in kmemleak's format; a clean
teardown of a memcg scenario leaves nothing to report."""

from __future__ import annotations

import threading

import pytest

from kmemcg import Kernel
from kmemcg.config import Config
from kmemcg.core import findings as F
from kmemcg.mm import kmemleak as KL
from kmemcg.mm.slub import SLAB_ACCOUNT
from kmemcg.testing import hold_grace_period, in_memcg
from kmemcg.workqueue import Work, queue_work


def memcg_scenario(k: Kernel, destroy: bool = True) -> tuple:
    """Two accounted roots (one merged alias), two memcgs with children, objects allocated and
    freed, then a clean teardown: tasks back to the root, memcgs offline, caches destroyed."""
    sl, mc = k.slab, k.memcg
    a = sl.kmem_cache_create("dentry", 192, flags=SLAB_ACCOUNT)
    b = sl.kmem_cache_create("dentry_alias", 192, flags=SLAB_ACCOUNT)  # merged into a
    c = sl.kmem_cache_create("inode", 600, flags=SLAB_ACCOUNT)
    plain = sl.kmem_cache_create("plain", 100)
    ms = []
    for name in ("m0", "m1"):
        m = in_memcg(k, name)
        for s in (a, c):
            sl.kmem_cache_free(s, sl.kmem_cache_alloc(s))  # queues the child's creation
        k.kmemleak.quiesce()
        objs = [sl.kmem_cache_alloc(s) for s in (a, b, c, plain) for _ in range(5)]
        assert any(o.cache.memcg_params.memcg is m for o in objs
                   if o.cache.memcg_params is not None and not o.cache.memcg_params.is_root_cache)
        for o, s in zip(objs, [s for s in (a, b, c, plain) for _ in range(5)], strict=True):
            sl.kmem_cache_free(s, o)
        ms.append(m)
    mc.attach(k.current(), mc.root)
    for m in ms:
        assert mc.offline(m) == 0
    assert k.kmemleak.quiesce()
    if destroy:
        for s in (b, a, c, plain):
            sl.kmem_cache_destroy(s)
        assert k.kmemleak.quiesce()
    return a, b, c, plain, ms


@pytest.mark.parametrize("memcg", ["v4", "v4-refcount"])
def test_a_clean_teardown_leaves_nothing_to_report(memcg: str) -> None:
    with Kernel(config=Config.make("fixed", memcg=memcg)) as k:
        a, b, c, plain, ms = memcg_scenario(k, destroy=False)
        assert k.kmemleak.scan(what=KL.MEMCGS) == []  # the quiesce point: roots alive
        for s in (b, a, c, plain):
            k.slab.kmem_cache_destroy(s)
        assert k.kmemleak.quiesce()
        assert k.kmemleak.scan() == []
        assert k.memcg.freed == 2
        assert not k.findings.snapshot(), [f.text for f in k.findings]


def test_cache_never_destroyed_is_reported_with_its_creation_stack() -> None:
    with Kernel() as k:
        def my_module_init() -> None:
            k.slab.kmem_cache_create("leaky_cache", 64)

        my_module_init()
        (f,) = k.kmemleak.scan()
        assert f.kind == F.MEMLEAK
        assert f.title == "kmemleak: unreferenced object: kmem_cache leaky_cache"
        assert f.text.startswith("unreferenced object 0x")
        assert "(size 64):" in f.text and 'comm "' in f.text and "jiffies" in f.text
        assert "  backtrace:\n" in f.text and "my_module_init" in f.text
        assert "kmem_cache_create" in f.text
        assert k.kmemleak.scan() == [f] and f.count == 1  # reported once, seen again


def test_object_never_freed_is_reported_with_its_allocation_stack() -> None:
    with Kernel() as k:
        s = k.slab.kmem_cache_create("objs", 100)

        def leak_one():
            return k.slab.kmem_cache_alloc(s)

        kept = leak_one()
        k.slab.kmem_cache_free(s, k.slab.kmem_cache_alloc(s))  # freed: not reported
        fs = k.kmemleak.scan(what=KL.OBJECTS)
        assert [f.title for f in fs] == ["kmemleak: unreferenced object: object of objs"]
        assert "(size 100):" in fs[0].text and "leak_one" in fs[0].text
        assert fs[0].count == 1
        k.slab.kmem_cache_free(s, kept)
        assert k.kmemleak.scan(what=KL.OBJECTS) == []
        k.slab.kmem_cache_destroy(s)
        assert k.kmemleak.quiesce()
        assert k.kmemleak.scan() == []


def test_typesafe_objects_are_tracked_too() -> None:
    from kmemcg.mm.slub import SLAB_TYPESAFE_BY_RCU
    with Kernel() as k:
        s = k.slab.kmem_cache_create("ts", 100, flags=SLAB_TYPESAFE_BY_RCU)
        o = k.slab.kmem_cache_alloc(s)
        assert [f.extra["what"] for f in k.kmemleak.scan(KL.OBJECTS)] == [KL.OBJECTS]
        k.slab.kmem_cache_free(s, o)
        k.slab.kmem_cache_destroy(s)
        assert k.kmemleak.quiesce()
        assert k.kmemleak.scan() == []


def test_zombie_memcg_is_reported() -> None:
    """A child object kept past offline: its charged page pins the offline memcg."""
    with Kernel() as k:
        sl, mc = k.slab, k.memcg
        s = sl.kmem_cache_create("dentry", 192, flags=SLAB_ACCOUNT)
        m = in_memcg(k, "zombie")
        sl.kmem_cache_free(s, sl.kmem_cache_alloc(s))
        k.kmemleak.quiesce()
        kept = sl.kmem_cache_alloc(s)
        assert kept.cache is not s
        mc.attach(k.current(), mc.root)
        assert mc.offline(m) == 0
        assert k.kmemleak.quiesce()
        (f,) = k.kmemleak.scan(what=KL.MEMCGS)
        assert f.title == "kmemleak: unreferenced object: mem_cgroup /zombie"
        assert "offline, css_ref=" in f.text and "dentry(" in f.text
        assert "create" in f.text  # the memcg's allocation stack (mkdir)
        # the object is the cause; freeing it releases everything
        sl.kmem_cache_free(s, kept)
        assert k.kmemleak.quiesce()
        assert k.kmemleak.scan(what=KL.MEMCGS) == [] and mc.freed == 1


def test_pending_work_and_rcu_callback_are_reported() -> None:
    with Kernel() as k:
        wq = k.create_workqueue("leakwq", max_active=1)
        hold, started = threading.Event(), threading.Event()

        def blocker() -> None:
            started.set()
            hold.wait(5)

        def never() -> None:
            pass

        queue_work(wq, Work(blocker, name="blocker_fn"))
        queue_work(wq, Work(never, name="never_fn"))
        assert started.wait(5)
        out, r = hold_grace_period(k)
        k.rcu.call(never)  # waits for the reader's grace period
        try:
            fs = k.kmemleak.scan(what=(KL.WORKS, KL.RCU_CBS))
            titles = sorted(f.title for f in fs)
            assert "kmemleak: unreferenced object: work blocker_fn on leakwq" in titles
            assert "kmemleak: unreferenced object: work never_fn on leakwq" in titles
            assert any(t.startswith("kmemleak: unreferenced object: rcu callback") for t in
                       titles)
            running = next(f for f in fs if "blocker_fn" in f.title)
            assert "running on kworker" in running.text
        finally:
            hold.set()
            out.set()
            r.join(5)
        assert k.kmemleak.quiesce()
        assert k.kmemleak.scan(what=(KL.WORKS, KL.RCU_CBS)) == []


def test_findings_are_deduplicated_by_what_and_name() -> None:
    with Kernel() as k:
        s = k.slab.kmem_cache_create("many", 100)
        kept = [k.slab.kmem_cache_alloc(s) for _ in range(7)]
        (f,) = k.kmemleak.scan(what=KL.OBJECTS)
        assert f.signature == "objects:many" and f.count == 7
        (f2,) = k.kmemleak.scan(what=KL.OBJECTS)
        assert f2 is f and f.count == 7  # nothing counted twice
        for o in kept:
            k.slab.kmem_cache_free(s, o)


def test_unknown_scan_target_is_an_error(kernel) -> None:
    with pytest.raises(ValueError):
        kernel.kmemleak.scan(what="inodes")


def test_memcg_slabinfo_lists_the_memcgs_children_and_tree_shows_references(kernel) -> None:
    k, sl, mc = kernel, kernel.slab, kernel.memcg
    a = sl.kmem_cache_create("dentry", 192, flags=SLAB_ACCOUNT)
    c = sl.kmem_cache_create("inode", 600, flags=SLAB_ACCOUNT)
    m = mc.create("m")
    other = mc.create("other")
    mc.memcg_activate_kmem(m)
    mc.attach(k.current(), m)
    for s in (a, c):
        sl.kmem_cache_free(s, sl.kmem_cache_alloc(s))
    k.kmemleak.quiesce()
    objs = [sl.kmem_cache_alloc(a) for _ in range(3)]
    info = k.memcg_slab.memcg_slabinfo(m)
    assert info.splitlines()[:2] == sl.slabinfo().splitlines()[:2]  # /proc/slabinfo's header
    rows = {r.split()[0]: r.split() for r in info.splitlines()[2:]}
    assert set(rows) == {f"dentry({m.serial}:m)", f"inode({m.serial}:m)"}
    assert rows[f"dentry({m.serial}:m)"][1] == "3"  # active objects
    assert k.memcg_slab.memcg_slabinfo(other).count("\n") == 2  # header only
    tree = mc.tree().splitlines()
    (line,) = [x for x in tree if x.strip().startswith("/m ")]
    assert "online" in line and "tasks=1" in line and f"kmemcg_id={m.kmemcg_id}" in line
    assert "css_ref=" in line and int(line.split("css_ref=")[1].split()[0]) >= 2
    for o in objs:
        sl.kmem_cache_free(a, o)
    mc.attach(k.current(), mc.root)
    mc.offline(m)
    mc.offline(other)
    for s in (a, c):
        sl.kmem_cache_destroy(s)
    assert k.kmemleak.quiesce() and k.kmemleak.scan() == []
