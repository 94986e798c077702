"""mm/memcontrol.c's shared part: the memcg tree, css references, tasks and migration, kmem
activation with relocated memcg_caches arrays that lock-free readers keep using safely."""

from __future__ import annotations

import random
import threading

import pytest

from kmemcg import Kernel
from kmemcg.core import findings as F
from kmemcg.core.kasan import Kasan, KasanOops
from kmemcg.mm.memcontrol import EBUSY, KMEM_ALLOCATED, KMEM_ONLINE, MEMCG_CACHES_MIN_SIZE
from kmemcg.testing import wait_until


def freed(m) -> bool:
    return Kasan.is_freed(m)


def test_tree_paths_listing_and_rmdir_rules(kernel):
    mc = kernel.memcg
    a = mc.create("a")
    b = mc.create("b", a)
    assert (a.path, b.path) == ("/a", "/a/b")
    assert a in mc.root.children and b in a.children
    listing = mc.tree()
    assert "/a/b" in listing and "online" in listing and "css_ref=" in listing
    assert mc.offline(a) == -EBUSY  # an online child
    assert mc.offline(mc.root) == -EBUSY
    assert mc.offline(b) == 0 and mc.offline(b) == -EBUSY  # not twice
    assert mc.offline(a) == 0
    assert not kernel.findings.snapshot()


def test_offline_memcg_refuses_online_tryget_and_is_freed_after_its_last_reference(kernel):
    mc = kernel.memcg
    m = mc.create("m")
    assert mc.css_tryget_online(m)  # a user pins it
    assert mc.offline(m) == 0
    assert not mc.css_tryget_online(m)  # offline: no new online users
    assert mc.css_tryget(m)  # but a live css can still be referenced
    mc.css_put(m)
    kernel.rcu.barrier()
    kernel.system_wq.flush()
    assert not freed(m)  # our first reference still holds it
    mc.css_put(m)
    assert wait_until(lambda: freed(m))  # a grace period, then the css_free work
    assert m not in mc.root.children
    with pytest.raises(KasanOops):
        _ = m.kmemcg_id
    (f,) = kernel.findings.of_kind(F.KASAN_UAF)
    assert "mem_cgroup" in f.text
    kernel.findings.clear()


def test_a_child_pins_its_parent_until_it_is_freed(kernel):
    mc = kernel.memcg
    a = mc.create("a")
    b = mc.create("b", a)
    assert mc.offline(b) == 0 and mc.offline(a) == 0
    assert wait_until(lambda: freed(b))
    assert wait_until(lambda: freed(a))
    assert mc.freed == 2


def test_tasks_attach_migrate_and_references(kernel):
    k, mc = kernel, kernel.memcg
    a, b = mc.create("a"), mc.create("b")
    me = k.current()
    assert mc.mem_cgroup_from_task(me) is mc.root
    mc.attach(me, a)
    assert me.memcg is a and a.nr_tasks == 1
    assert mc.offline(a) == -EBUSY  # a task is in it
    m = mc.get_mem_cgroup_from_current()
    assert m is a
    mc.css_put(m)
    refs_a = a.css_ref.read()
    mc.attach(me, b)  # cgroup.procs write
    assert me.memcg is b and (a.nr_tasks, b.nr_tasks) == (0, 1)
    assert a.css_ref.read() == refs_a  # dropped only after a grace period
    k.rcu.barrier()
    assert a.css_ref.read() == refs_a - 1
    assert mc.offline(a) == 0
    assert wait_until(lambda: freed(a))
    assert not k.findings.snapshot()


def test_a_task_leaves_its_memcg_when_it_exits(kernel):
    k, mc = kernel, kernel.memcg
    m = mc.create("m")
    t = k.kthread_run(lambda: mc.attach(k.current(), m), name="member")
    t.join(5)
    assert wait_until(lambda: m.nr_tasks == 0)
    assert mc.offline(m) == 0
    assert wait_until(lambda: freed(m))


def test_kmem_activation_ids_and_arrays_grow_and_old_arrays_go_after_a_grace_period(kernel):
    k, mc, sl = kernel, kernel.memcg, kernel.slab
    s = sl.kmem_cache_create("dentry", 192)
    arr0 = s.memcg_params.memcg_caches.access()
    assert len(arr0.entries) == MEMCG_CACHES_MIN_SIZE
    ms = [mc.create(f"m{i}") for i in range(MEMCG_CACHES_MIN_SIZE + 1)]
    ids = [mc.memcg_activate_kmem(m) for m in ms]
    assert ids == list(range(MEMCG_CACHES_MIN_SIZE + 1))
    assert all(m.kmem_state == KMEM_ONLINE for m in ms)
    arr1 = s.memcg_params.memcg_caches.access()
    assert arr1 is not arr0 and len(arr1.entries) > MEMCG_CACHES_MIN_SIZE
    assert len(arr1.entries) == mc.nr_cache_ids
    k.rcu.barrier()
    assert freed(arr0) and not freed(arr1)  # kfree_rcu of the old array
    # a root cache created now is sized for the current ids
    t = sl.kmem_cache_create("inode", 600)
    assert len(t.memcg_params.memcg_caches.access().entries) == mc.nr_cache_ids
    # offline gives the id back; the next activation reuses it
    assert mc.offline(ms[1]) == 0 and ms[1].kmem_state == KMEM_ALLOCATED
    n = mc.create("n")
    assert mc.memcg_activate_kmem(n) == 1
    assert mc.memcg_activate_kmem(n) == 1  # idempotent
    # the activation path's lock order: activate_kmem_mutex -> slab_mutex
    edges = {(e["from"], e["to"]) for e in k.lockdep_graph()["edges"]}
    assert ("activate_kmem_mutex", "slab_mutex") in edges
    assert not k.findings.snapshot()


def test_a_lockless_reader_keeps_the_old_array_through_a_relocation(kernel):
    """cache_from_memcg_idx() runs without locks: the relocation frees the old array only after
    a grace period, so a reader holding it across the relocation reads valid memory."""
    k, mc, sl = kernel, kernel.memcg, kernel.slab
    s = sl.kmem_cache_create("sock", 64)
    bp = k.breakpoints.add("window:cache_from_memcg_idx:array", thread="reader")
    result = []
    r = k.kthread_run(lambda: result.append(mc.cache_from_memcg_idx(s, 0)), name="reader")
    bp.wait(5)
    old = s.memcg_params.memcg_caches.access()
    for i in range(MEMCG_CACHES_MIN_SIZE + 1):  # force a relocation
        mc.memcg_activate_kmem(mc.create(f"m{i}"))
    assert s.memcg_params.memcg_caches.access() is not old
    assert not freed(old)  # the reader is still inside its section
    bp.release()
    r.join(5)
    assert result == [None]
    k.rcu.barrier()
    assert freed(old)
    assert not k.findings.snapshot()


def test_concurrent_migration_references_and_memcg_churn_stay_clean():
    with Kernel(name="memcg-churn") as k:
        mc = k.memcg
        stable = [mc.create(f"s{i}") for i in range(3)]
        stop = threading.Event()
        errors = []

        def mover(i: int) -> None:
            rng = random.Random(i)
            me = k.current()
            while not stop.is_set():
                mc.attach(me, rng.choice(stable))
                m = mc.get_mem_cgroup_from_current()
                if rng.random() < 0.3:
                    mc.memcg_activate_kmem(m) if m.online else None
                mc.css_put(m)
            mc.exit_task(me)

        def churner() -> None:
            rng = random.Random(99)
            while not stop.is_set():
                m = mc.create(f"t{rng.randrange(1000)}")
                mc.memcg_activate_kmem(m)
                if mc.offline(m) != 0:
                    errors.append("offline failed")

        threads = [k.kthread_run(mover, i, name=f"mover{i}") for i in range(6)]
        threads.append(k.kthread_run(churner, name="churner"))
        stop.wait(1.0)
        stop.set()
        for t in threads:
            t.join(10)
        k.rcu.barrier()
        assert not errors
        assert all(m.nr_tasks == 0 for m in stable)
        assert not k.findings.snapshot(), [f.title for f in k.findings]
