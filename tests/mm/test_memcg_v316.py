"""The v3.16 memcg design (kmemcg.mm.memcg_v316): one global memcg_slab_mutex, creation works,
direct destruction at offline, dead children destroyed with their root, lock order, and the
alias race (catalog 5) on an accounted root. Bugs 9 and 10: test_catalog_memcg_9_10.py."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from kmemcg import Kernel
from kmemcg.config import Config
from kmemcg.core import findings as F
from kmemcg.core.kasan import Kasan, KasanOops
from kmemcg.mm.memcg_v316 import MemcgSlabV316
from kmemcg.mm.slub import SLAB_ACCOUNT
from kmemcg.testing import settle, wait_until

WAIT = 5.0
BUG9 = "get_cache_without_reference"


def v316(*bugs: str) -> Config:
    """The v3.16 design with only ``bugs`` switched on (the preset carries 5, 9 and 10)."""
    return Config.make("fixed", bugs=list(bugs), hotplug="2012", memcg="v3.16")




def child(k: Kernel, name: str = "dentry") -> tuple[Any, Any, Any]:
    """Root ``s``, memcg ``m`` (the caller is attached to it) and m's child ``c`` of ``s``."""
    sl, mc = k.slab, k.memcg
    s = sl.kmem_cache_create(name, 192, flags=SLAB_ACCOUNT)
    m = mc.create("m")
    mc.memcg_activate_kmem(m)
    mc.attach(k.current(), m)
    first = sl.kmem_cache_alloc(s)
    assert first.cache is s  # a miss: the root serves, the creation is queued
    sl.kmem_cache_free(s, first)
    settle(k)
    c = mc.cache_from_memcg_idx(s, m.kmemcg_id)
    assert c is not None
    return s, m, c


def edges(k: Kernel) -> set[tuple[str, str]]:
    return {(e.prev.display, e.next.display) for e in k.lockdep.edges()}


def test_the_preset_runs_this_design(kernels) -> None:
    k = kernels("v3.16")
    assert isinstance(k.memcg_slab, MemcgSlabV316)
    assert k.config.hotplug == "2012" and k.config.memcg == "v3.16"
    assert {"alias_race", BUG9, "free_path_touches_cache_after_uncharge"} <= k.config.bugs


@pytest.mark.parametrize("bugs", [(BUG9,), ()], ids=["3.16", "3.19-lifetime"])
def test_child_creation_charging_and_the_lock_order(kernels, bugs: tuple) -> None:
    k = kernels(v316(*bugs))
    sl = k.slab
    s, m, c = child(k)
    assert c.memcg_params.root_cache is s and c.memcg_params.memcg is m
    assert c in m.kmem_caches and c in s.memcg_params.children and c in sl.slab_caches
    objs = [sl.kmem_cache_alloc(s) for _ in range(c.objects_per_slab + 1)]
    assert all(o.cache is c for o in objs)
    assert c.memcg_params.read_pages() == 2  # two slabs charged to the child
    for o in objs:
        sl.kmem_cache_free(s, o)
    sl.kmem_cache_shrink(c)
    assert c.memcg_params.read_pages() == 0
    assert k.memcg_slab.nr_created == 1
    for i in range(4):  # the fifth kmemcg_id does not fit: the arrays grow
        k.memcg.memcg_activate_kmem(k.memcg.create(f"grow{i}"))
    assert k.memcg.nr_cache_ids > 4
    e = edges(k)
    # seed 001's order: activate_kmem_mutex -> memcg_slab_mutex -> cpu hotplug -> slab_mutex
    assert ("activate_kmem_mutex", "memcg_slab_mutex") in e
    assert ("memcg_slab_mutex", "slab_mutex") in e
    assert ("memcg_slab_mutex", "cpu_hotplug.lock") in e
    assert ("slab_mutex", "memcg_slab_mutex") not in e
    assert not k.findings.snapshot()


def test_racing_creators_make_one_child(kernels) -> None:
    k = kernels(v316(BUG9))
    sl, mc = k.slab, k.memcg
    s = sl.kmem_cache_create("inode", 600, flags=SLAB_ACCOUNT)
    m = mc.create("m")
    mc.memcg_activate_kmem(m)
    go = threading.Barrier(4)

    def alloc_once() -> None:
        mc.attach(k.current(), m)
        go.wait(WAIT)
        sl.kmem_cache_free(s, sl.kmem_cache_alloc(s))
        mc.attach(k.current(), mc.root)

    ts = [k.kthread_run(alloc_once, name=f"a{i}") for i in range(4)]
    for t in ts:
        t.join(WAIT)
    settle(k)
    assert len(s.memcg_params.children) == 1 and k.memcg_slab.nr_created == 1
    assert not k.findings.snapshot()


def test_offline_destroys_an_empty_child_at_once(kernels) -> None:
    k = kernels(v316(BUG9))
    sl, mc = k.slab, k.memcg
    s, m, c = child(k)
    sl.kmem_cache_free(s, sl.kmem_cache_alloc(s))  # a cpu slab: offline's shrink empties it
    mc.attach(k.current(), mc.root)
    freed = mc.freed
    assert mc.offline(m) == 0
    assert Kasan.is_freed(c)  # under memcg_slab_mutex, in the offline itself
    assert mc.cache_from_memcg_idx(s, m.kmemcg_id) is None
    assert s.memcg_params.children == [] and c not in sl.slab_caches
    settle(k)
    assert mc.freed == freed + 1  # the child's css reference was the last one
    sl.kmem_cache_destroy(s)
    assert not k.findings.snapshot()


def test_a_dead_child_waits_for_its_root_destroy(kernels) -> None:
    """3.16: a child with pages at offline stays, dead, pinning its memcg; the last uncharge
    does not destroy it; the root's kmem_cache_destroy() does, and the memcg goes with it."""
    k = kernels(v316(BUG9))
    sl, mc = k.slab, k.memcg
    s, m, c = child(k)
    obj = sl.kmem_cache_alloc(s)
    mc.attach(k.current(), mc.root)
    freed = mc.freed
    assert mc.offline(m) == 0
    settle(k)
    assert not Kasan.is_freed(c) and c.memcg_params.read_pages() == 1
    assert mc.cache_from_memcg_idx(s, m.kmemcg_id) is None  # unpublished (the id is free)
    assert mc.freed == freed  # the child pins the memcg
    sl.kmem_cache_free(s, obj)
    sl.kmem_cache_shrink(c)
    settle(k)
    assert c.memcg_params.read_pages() == 0 and not Kasan.is_freed(c)
    sl.kmem_cache_destroy(s)
    assert Kasan.is_freed(c) and Kasan.is_freed(s)
    settle(k)
    assert mc.freed == freed + 1
    assert not k.findings.snapshot()


def test_319_lifetime_children_go_at_css_free(kernels) -> None:
    """Bug 9 off: get_cache pins the memcg, pages pin it, offline only shrinks; the child goes
    at css_free, after the last object's page is gone."""
    k = kernels(v316())
    sl, mc = k.slab, k.memcg
    s, m, c = child(k)
    obj = sl.kmem_cache_alloc(s)
    mc.attach(k.current(), mc.root)
    assert mc.offline(m) == 0
    settle(k)
    assert not Kasan.is_freed(c) and not Kasan.is_freed(m)
    sl.kmem_cache_free(s, obj)
    sl.kmem_cache_shrink(c)  # the last page goes: its css reference was the last one
    assert wait_until(lambda: Kasan.is_freed(c), WAIT)
    assert Kasan.is_freed(m)
    sl.kmem_cache_destroy(s)
    assert not k.findings.snapshot()


def test_root_destroy_with_a_busy_child_keeps_the_root(kernels) -> None:
    k = kernels(v316(BUG9))
    sl, mc = k.slab, k.memcg
    s, m, c = child(k)
    obj = sl.kmem_cache_alloc(s)
    sl.kmem_cache_destroy(s)
    (f,) = k.findings
    assert f.kind == F.SLAB_CACHE_NOT_EMPTY and c.name in f.title
    assert not Kasan.is_freed(s) and not Kasan.is_freed(c)
    assert mc.cache_from_memcg_idx(s, m.kmemcg_id) is None  # unpublished; still listed
    assert c in s.memcg_params.children and not s.memcg_params.dying
    sl.kmem_cache_free(s, obj)
    sl.kmem_cache_destroy(s)
    assert Kasan.is_freed(s) and Kasan.is_freed(c)


def test_root_destroy_waits_for_a_queued_creation(kernels) -> None:
    """A creation queued for the root runs (and bails: the root is dying) before the root is
    freed (the model's flush; see the module docstring)."""
    k = kernels(v316(BUG9))
    sl, mc = k.slab, k.memcg
    s = sl.kmem_cache_create("dentry", 192, flags=SLAB_ACCOUNT)
    m = mc.create("m")
    mc.memcg_activate_kmem(m)
    ms = k.memcg_slab
    with ms.memcg_slab_mutex:  # the creation work waits for it
        mc.attach(k.current(), m)
        sl.kmem_cache_free(s, sl.kmem_cache_alloc(s))  # a miss: queued
        mc.attach(k.current(), mc.root)
        d = k.kthread_run(sl.kmem_cache_destroy, s, name="destroyer")
        assert wait_until(lambda: s.memcg_params.dying, WAIT)
    d.join(WAIT)
    assert not d.is_alive() and Kasan.is_freed(s)
    assert ms.nr_created == 0
    settle(k)
    assert not k.findings.snapshot()


# ============================================================================= alias race
# D destroys the last alias of an accounted root and is parked with slab_mutex dropped (its
# children's destruction); C creates a compatible accounted cache meanwhile.

def destroy_vs_merge(k: Kernel) -> tuple[Any, Any, dict[str, Any]]:
    sl = k.slab
    a = sl.kmem_cache_create("kmalloc-96", 96, flags=SLAB_ACCOUNT)
    bp = k.breakpoints.add("lock_acquire:memcg_slab_mutex", thread="destroyer")
    d = k.kthread_run(sl.kmem_cache_destroy, a, name="destroyer")
    bp.wait(WAIT)
    out: dict[str, Any] = {}

    def creator() -> None:
        c = out["cache"] = sl.kmem_cache_create("foo", 96, flags=SLAB_ACCOUNT)
        bp.release()
        d.join(WAIT)
        try:
            sl.kmem_cache_free(c, sl.kmem_cache_alloc(c))
            sl.kmem_cache_destroy(c)
            out["ok"] = True
        except KasanOops as e:
            out["oops"] = e

    t = k.kthread_run(creator, name="creator")
    t.join(WAIT)
    assert not t.is_alive() and not d.is_alive()
    return a, out["cache"], out


def test_alias_race_off_a_dying_root_is_not_merged(kernels) -> None:
    k = kernels(v316(BUG9))
    a, c, out = destroy_vs_merge(k)
    assert c is not a and out.get("ok")
    assert not k.findings.snapshot()


def test_alias_race_on_the_creator_allocates_from_the_freed_root(kernels) -> None:
    k = kernels("v3.16")
    a, c, out = destroy_vs_merge(k)
    assert c is a
    assert isinstance(out.get("oops"), KasanOops)
    (f,) = k.findings
    assert f.kind == F.KASAN_UAF and f.thread.startswith("creator/")
    assert "Freed by task destroyer/" in f.text


def test_hotplug_next_to_the_memcg_paths_is_clean(kernels) -> None:
    """CPU hotplug (2012 design) with a root destroy and an offline: no lockdep report."""
    k = kernels(v316(BUG9))
    sl, mc = k.slab, k.memcg
    s, m, c = child(k)
    assert k.hotplug.cpu_down(1) == 0
    sl.kmem_cache_free(s, sl.kmem_cache_alloc(s))
    mc.attach(k.current(), mc.root)
    assert mc.offline(m) == 0
    assert k.hotplug.cpu_up(1) == 0
    sl.kmem_cache_destroy(s)
    settle(k)
    assert not k.findings.snapshot(), [f.text for f in k.findings]
