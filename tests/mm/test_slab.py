"""The slab layer (kmemcg.mm.slab_common, kmemcg.mm.slub, kmemcg.mm.page_alloc): cache creation
under the hotplug read lock and slab_mutex, merging and the alias count, destroy, the page
allocator shared by all caches, slabs, per-CPU slabs and freelists, partial lists, shrink, the
CPU-hotplug notifier, /proc/slabinfo, and a many-thread run."""

from __future__ import annotations

import queue
import random
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from kmemcg import Instrument, Kernel, Task
from kmemcg.core import findings as F
from kmemcg.core.kasan import Kasan, KasanOops
from kmemcg.mm.slub import SLAB_ACCOUNT, SLAB_HWCACHE_ALIGN, SLAB_TYPESAFE_BY_RCU, KmemCache

JOIN = 20.0


# ---------------------------------------------------------------------- helpers
def run_on(k: Kernel, cpu: int) -> None:
    """Move the calling task to ``cpu`` through the scheduler's own migration points."""
    hp = k.hotplug
    for _ in range(2 * hp.nr_cpus):
        if hp.this_cpu() == cpu:
            return
        hp.migrate()
    raise AssertionError(f"could not move {k.current().name} to CPU {cpu}")


def in_thread(k: Kernel, fn: Callable[..., Any], *args: Any, cpu: int | None = None,
              name: str = "helper") -> Any:
    """Run ``fn(*args)`` on a model thread (on ``cpu`` if given), wait for it, re-raise."""
    def body() -> Any:
        if cpu is not None:
            run_on(k, cpu)
        return fn(*args)

    t = k.kthread_run(body, name=name)
    t.join(JOIN)
    assert not t.is_alive(), f"{name} did not finish"
    if t.exception is not None:
        raise t.exception
    return t.result


def titles(k: Kernel) -> list[str]:
    return [f"{f.kind}: {f.title}" for f in k.findings]


def alias_count(k: Kernel, s: KmemCache) -> int:
    """Read the alias count the way the model allows: under slab_mutex."""
    k.lockdep.assert_held(k.slab.slab_mutex)
    return s.alias_count


def locked_alias_count(k: Kernel, s: KmemCache) -> int:
    with k.slab.slab_mutex:
        return alias_count(k, s)


# ---------------------------------------------------------------------- creation
class _CreateSpy(Instrument):
    """Records, at every cache_create / cache_merge event, which locks the creator holds."""

    def __init__(self, k: Kernel) -> None:
        self.k = k
        self.seen: list[tuple[str, bool, bool]] = []

    def on_event(self, point: str, label: str, task: Task, obj: Any) -> None:
        if point in ("cache_create", "cache_merge"):
            self.seen.append((point, self.k.slab.slab_mutex.is_held(),
                              self.k.hotplug.cpus_held()))


def test_create_runs_under_hotplug_read_lock_and_slab_mutex(kernel: Kernel) -> None:
    k = kernel
    spy = _CreateSpy(k)
    k.add_instrument(spy)
    s = k.slab.kmem_cache_create("dentry", 192)
    k.slab.kmem_cache_create("dentry_alias", 190)  # merged
    k.remove_instrument(spy)
    assert spy.seen == [("cache_create", True, True), ("cache_merge", True, True)]
    assert not k.slab.slab_mutex.is_locked() and not k.hotplug.cpus_held()
    # lockdep learnt the order cpu_hotplug_lock -> slab_mutex, from kmem_cache_create()
    g = k.lockdep_graph()
    edges = {(e["from"], e["to"]): e for e in g["edges"]}
    assert ("cpu_hotplug_lock", "slab_mutex") in edges
    assert ("slab_mutex", "cpu_hotplug_lock") not in edges
    assert "kmem_cache_create" in [fr[2] for fr in edges[("cpu_hotplug_lock", "slab_mutex")]
                                   ["stack"]]
    assert s in k.slab.caches() and s.name == "dentry" and s.size == 192
    assert titles(k) == []
    with pytest.raises(ValueError):
        k.slab.kmem_cache_create("bad", 0)


def test_alias_count_is_documented_and_guarded_by_slab_mutex(kernel: Kernel) -> None:
    k = kernel
    doc = KmemCache.__doc__ or ""
    assert "alias_count" in doc and "slab_mutex" in doc and "lifetime_ref" in doc
    s = k.slab.kmem_cache_create("counted", 96)
    assert locked_alias_count(k, s) == 1
    assert s.lifetime_ref is None  # no lifetime reference in the slab layer
    assert titles(k) == []
    alias_count(k, s)  # without slab_mutex: the helper's lockdep assertion fires
    assert [f.kind for f in k.findings] == [F.ASSERT_HELD]


# ---------------------------------------------------------------------- merging
def test_compatible_sizes_merge_and_raise_the_alias_count(kernel: Kernel) -> None:
    k = kernel
    create = k.slab.kmem_cache_create
    s = create("size-64", 64)
    assert create("size-60", 60) is s  # 60 -> 64 after word alignment
    assert create("size-57", 57) is s
    assert create("hw-40", 40, flags=SLAB_HWCACHE_ALIGN) is s  # 40 -> 64 (cache line)
    assert locked_alias_count(k, s) == 4
    assert s.name == "size-64" and k.slab.caches() == [s]
    for other, size, flags in (("size-56", 56, 0), ("size-40", 40, 0), ("size-72", 72, 0)):
        t = create(other, size, flags=flags)  # differs by >= 8 after alignment, or bigger
        assert t is not s, other
        assert locked_alias_count(k, t) == 1
    assert locked_alias_count(k, s) == 4
    assert titles(k) == []


def test_never_merge_typesafe_ctor_or_across_account(kernel: Kernel) -> None:
    k = kernel
    create = k.slab.kmem_cache_create
    plain = create("plain", 128)
    ts = create("typesafe", 128, flags=SLAB_TYPESAFE_BY_RCU)
    assert ts is not plain
    assert create("typesafe2", 128, flags=SLAB_TYPESAFE_BY_RCU) is not ts

    def ctor(obj: Any) -> None:
        obj.payload = "constructed"

    withctor = create("ctor", 128, ctor=ctor)
    assert withctor is not plain and withctor is not ts
    acct = create("accounted", 128, flags=SLAB_ACCOUNT)
    assert acct not in (plain, ts, withctor)
    # nothing merges into a TYPESAFE, ctor or differently accounted cache either
    assert create("acct2", 128, flags=SLAB_ACCOUNT) is acct
    assert create("plain2", 128) is plain
    for s in (plain, acct):
        assert locked_alias_count(k, s) == 2
    for s in (ts, withctor):
        assert locked_alias_count(k, s) == 1
    assert k.slab.kmem_cache_alloc(withctor).payload == "constructed"
    assert titles(k) == []


def test_destroying_one_alias_keeps_the_cache_the_last_frees_it(kernel: Kernel) -> None:
    k = kernel
    s = k.slab.kmem_cache_create("shared", 256)
    t = k.slab.kmem_cache_create("shared_alias", 250)
    assert t is s
    k.slab.kmem_cache_destroy(t)
    assert locked_alias_count(k, s) == 1 and s in k.slab.caches() and not Kasan.is_freed(s)
    k.slab.kmem_cache_free(s, k.slab.kmem_cache_alloc(s))  # still fully usable
    k.slab.kmem_cache_destroy(s)
    assert Kasan.is_freed(s) and k.slab.caches() == []
    assert titles(k) == []
    # a new creation does not merge into the freed cache
    u = k.slab.kmem_cache_create("shared_again", 256)
    assert u is not s and locked_alias_count(k, u) == 1
    assert k.page_alloc.stats()["allocated"] == 0


def _touch_name(s: KmemCache) -> str:
    return s.name


def test_use_of_a_destroyed_cache_is_a_kasan_use_after_free(kernel: Kernel) -> None:
    k = kernel
    s = k.slab.kmem_cache_create("gone", 512)
    k.slab.kmem_cache_destroy(s)
    with pytest.raises(KasanOops):
        _touch_name(s)
    [f] = k.findings.of_kind(F.KASAN_UAF)
    assert f.title == "BUG: KASAN: use-after-free in _touch_name"
    assert "Read of attribute 'name' of kmem_cache" in f.text
    assert "kmem_cache_destroy" in f.text and "Freed by task" in f.text
    # the oops happens in the offending thread: a model thread dies, the test goes on
    t = k.kthread_run(_touch_name, s, name="toucher")
    t.join(JOIN)
    assert isinstance(t.exception, KasanOops)
    assert f.count == 2 and f.thread.startswith("MainThread/")
    with pytest.raises(KasanOops):
        k.slab.kmem_cache_alloc(s)  # the allocator reads the freed cache too
    assert {x.kind for x in k.findings} == {F.KASAN_UAF}


# ---------------------------------------------------------------------- page allocator
def test_a_page_freed_by_one_cache_is_reused_by_the_next_slab_of_another(
        kernel: Kernel) -> None:
    k = kernel
    a = k.slab.kmem_cache_create("a-1k", 1024)  # 4 objects per slab
    b = k.slab.kmem_cache_create("b-2k", 2048)
    assert a.objects_per_slab == 4
    run_on(k, 0)
    objs = [k.slab.kmem_cache_alloc(a) for _ in range(12)]  # slabs P1, P2 full, P3 on CPU 0
    p1, p2, p3 = objs[0].page, objs[4].page, objs[8].page
    assert len({p1, p2, p3}) == 3 and s_cpu_page(a, 0) is p3
    pfn1, pfn2 = p1.pfn, p2.pfn
    assert k.page_alloc.stats()["allocated"] == 3
    for o in objs[0:4]:
        k.slab.kmem_cache_free(a, o)  # last free: empty slab, min_partial 0 -> discarded
    assert Kasan.is_freed(p1) and k.page_alloc.stats()["allocated"] == 2
    for o in objs[4:8]:
        k.slab.kmem_cache_free(a, o)
    assert Kasan.is_freed(p2) and k.page_alloc.stats() == {"allocated": 1, "free": 2,
                                                              "total": 3}
    # LIFO: b's first slab gets P2 (freed last), its second P1; the very same Page objects
    first = [k.slab.kmem_cache_alloc(b) for _ in range(b.objects_per_slab)]
    second = k.slab.kmem_cache_alloc(b)
    assert first[0].page is p2 and p2.pfn == pfn2 and p2.slab_cache is b
    assert second.page is p1 and p1.pfn == pfn1 and p1.slab_cache is b
    assert not Kasan.is_freed(p1) and k.page_alloc.stats()["total"] == 3  # no new page
    assert titles(k) == []


def s_cpu_page(s: KmemCache, cpu: int) -> Any:
    return s.cpu_slab[cpu].page


# ---------------------------------------------------------------------- slabs
@pytest.mark.parametrize("size,per_slab", [(8, 32), (64, 32), (128, 32), (256, 16),
                                           (512, 8), (1024, 4), (4096, 4)])
def test_objects_per_slab(kernel: Kernel, size: int, per_slab: int) -> None:
    k = kernel
    s = k.slab.kmem_cache_create(f"size-{size}", size)
    assert s.objects_per_slab == per_slab
    objs = [k.slab.kmem_cache_alloc(s) for _ in range(per_slab + 1)]
    assert len({o.page for o in objs[:per_slab]}) == 1
    assert sorted(o.idx for o in objs[:per_slab]) == list(range(per_slab))
    assert objs[-1].page is not objs[0].page
    assert k.slab.slub.counts(s) == (per_slab + 1, 2 * per_slab, 2)


def test_alloc_uses_the_current_cpus_slab_and_remote_frees_go_to_the_page(
        kernel: Kernel) -> None:
    k = kernel
    s = k.slab.kmem_cache_create("percpu", 256)  # 16 per slab
    run_on(k, 1)
    o1 = k.slab.kmem_cache_alloc(s)
    p1, idx1 = o1.page, o1.idx
    assert s_cpu_page(s, 1) is p1 and p1.frozen_cpu == 1
    run_on(k, 2)
    o2 = k.slab.kmem_cache_alloc(s)
    p2, idx2 = o2.page, o2.idx
    assert p2 is not p1 and s_cpu_page(s, 2) is p2 and p2.frozen_cpu == 2
    # a local free goes back onto this CPU's freelist; the page's own freelist stays empty
    c2 = s.cpu_slab[2]
    n2 = len(c2.freelist)
    k.slab.kmem_cache_free(s, o2)
    assert len(c2.freelist) == n2 + 1 and c2.freelist[-1] == idx2 and p2.free == []
    # a free from another thread, on another CPU, goes to the page (the slab stays frozen)
    c1 = s.cpu_slab[1]
    n1 = len(c1.freelist)
    in_thread(k, k.slab.kmem_cache_free, s, o1, cpu=3, name="remote_freer")
    assert len(c1.freelist) == n1 and p1.free == [idx1] and p1.frozen_cpu == 1
    assert k.slab.slub.counts(s) == (0, 32, 2)
    # back on CPU 1: once its freelist is exhausted, the remote frees refill it (get_freelist)
    run_on(k, 1)
    mine = [k.slab.kmem_cache_alloc(s) for _ in range(n1)]
    assert all(o.page is p1 for o in mine) and p1.free == [idx1]
    again = k.slab.kmem_cache_alloc(s)
    assert again.page is p1 and again.idx == idx1 and s_cpu_page(s, 1) is p1
    assert titles(k) == []


def test_free_from_another_thread_than_the_allocator(kernel: Kernel) -> None:
    k = kernel
    s = k.slab.kmem_cache_create("handoff", 128)
    objs = [k.slab.kmem_cache_alloc(s) for _ in range(40)]
    for i, o in enumerate(objs):
        o.payload = i

    def free_all() -> list[int]:
        seen = []
        for o in objs:
            seen.append(o.payload)
            k.slab.kmem_cache_free(s, o)
        return seen

    assert in_thread(k, free_all, name="freer") == list(range(40))
    assert k.slab.slub.counts(s)[0] == 0
    assert all(Kasan.is_freed(o) for o in objs)
    k.slab.kmem_cache_destroy(s)
    assert titles(k) == [] and k.page_alloc.stats()["allocated"] == 0


def test_partial_lists(kernel: Kernel) -> None:
    k = kernel
    s = k.slab.kmem_cache_create("partial", 1024)  # 4 per slab
    run_on(k, 0)
    objs = [k.slab.kmem_cache_alloc(s) for _ in range(5)]
    p1, p2 = objs[0].page, objs[4].page
    assert p1 is not p2 and p1.frozen_cpu is None and not p1.on_partial  # full: on no list
    assert s.partial == [] and s.nr_partial == 0
    k.slab.kmem_cache_free(s, objs[0])  # a free into a full slab puts it on the partial list
    assert s.partial == [p1] and s.nr_partial == 1 and p1.on_partial
    more = [k.slab.kmem_cache_alloc(s) for _ in range(3)]  # the rest of the cpu slab P2
    assert all(o.page is p2 for o in more)
    refilled = k.slab.kmem_cache_alloc(s)  # cpu slab exhausted: the partial slab is taken
    assert refilled.page is p1 and s_cpu_page(s, 0) is p1 and p1.frozen_cpu == 0
    assert s.partial == [] and s.nr_partial == 0 and p2.frozen_cpu is None
    # P2 (full, unfrozen) gets a free: partial again; its last free discards it
    p2_objs = [objs[4], *more]
    k.slab.kmem_cache_free(s, p2_objs[0])
    assert s.partial == [p2]
    for o in p2_objs[1:]:
        k.slab.kmem_cache_free(s, o)
    assert s.partial == [] and s.nr_partial == 0 and Kasan.is_freed(p2)
    assert p2 not in s.slabs and k.slab.slub.counts(s) == (4, 4, 1)
    assert titles(k) == []


class _ReleaseHook:
    """Stands in for a cache's raw ``list_lock``: runs ``hook`` once, right after the next
    release, to land a remote free in the gap between two list_lock sections."""

    def __init__(self, lock: Any) -> None:
        self._lock = lock
        self.hook: Callable[[], None] | None = None

    def __enter__(self) -> bool:
        return self._lock.acquire()

    def __exit__(self, *exc: object) -> None:
        self._lock.release()
        hook, self.hook = self.hook, None
        if hook is not None:
            hook()


def test_refill_from_the_partial_list_is_atomic_against_a_remote_free(
        kernel: Kernel) -> None:
    """The slab taken off the partial list is frozen in the same list_lock section: a remote
    free of its last object right after must not discard (free) the new cpu slab."""
    k = kernel
    s = k.slab.kmem_cache_create("refill", 1024)  # 4 per slab
    hooked = _ReleaseHook(s.list_lock)
    s.list_lock = hooked
    run_on(k, 0)
    objs = [k.slab.kmem_cache_alloc(s) for _ in range(5)]  # P1 full, P2 = cpu slab
    p1, last = objs[0].page, objs[3]
    for o in objs[0:3]:
        k.slab.kmem_cache_free(s, o)  # P1 on the partial list, one object left in it
    assert s.partial == [p1]
    rest = [k.slab.kmem_cache_alloc(s) for _ in range(3)]  # CPU 0's freelist now empty
    hooked.hook = lambda: in_thread(k, k.slab.kmem_cache_free, s, last, cpu=1,
                                    name="remote_freer")
    o = k.slab.kmem_cache_alloc(s)  # refill: takes P1 off the partial list
    assert hooked.hook is None  # the remote free ran inside the refill
    assert o.page is p1 and s_cpu_page(s, 0) is p1 and p1.frozen_cpu == 0
    assert not Kasan.is_freed(p1) and p1 in s.slabs
    assert k.page_alloc.stats()["allocated"] == 2
    for x in [objs[4], *rest, o]:
        k.slab.kmem_cache_free(s, x)
    k.slab.kmem_cache_shrink(s)
    assert k.slab.slub.counts(s) == (0, 0, 0) and k.page_alloc.stats()["allocated"] == 0
    assert titles(k) == []


# ---------------------------------------------------------------------- shrink / hotplug
def test_shrink_flushes_every_cpu_slab_and_discards_empty_slabs(
        kernel: Kernel, monkeypatch: pytest.MonkeyPatch) -> None:
    k = kernel
    s = k.slab.kmem_cache_create("shrinkme", 512)
    pages = {}
    keep = None
    for cpu in range(4):
        run_on(k, cpu)
        o = k.slab.kmem_cache_alloc(s)
        pages[cpu] = o.page
        if cpu == 3:
            keep = o
        else:
            k.slab.kmem_cache_free(s, o)
    assert len(set(pages.values())) == 4
    assert all(s_cpu_page(s, c) is pages[c] for c in range(4))
    slub = k.slab.slub
    asked: list[tuple[int, bool]] = []
    has_cpu_slab = slub.has_cpu_slab

    def spy(cpu: int, cache: KmemCache) -> bool:
        asked.append((cpu, k.hotplug.cpus_held()))
        return has_cpu_slab(cpu, cache)

    monkeypatch.setattr(slub, "has_cpu_slab", spy)
    k.slab.kmem_cache_shrink(s)
    assert sorted(asked) == [(c, True) for c in range(4)]  # on_each_cpu_cond, hotplug held
    assert all(s_cpu_page(s, c) is None and not s.cpu_slab[c].freelist for c in range(4))
    assert all(Kasan.is_freed(pages[c]) for c in range(3))
    assert s.partial == [pages[3]] and k.slab.slub.counts(s) == (1, 8, 1)
    assert k.page_alloc.stats()["allocated"] == 1
    k.slab.kmem_cache_free(s, keep)  # the last object of an unfrozen slab: discarded
    assert k.slab.slub.counts(s) == (0, 0, 0) and k.page_alloc.stats()["allocated"] == 0
    asked.clear()
    k.slab.kmem_cache_shrink(s)  # nothing left: has_cpu_slab says no everywhere
    assert len(asked) == 4
    assert titles(k) == []


def test_cpu_down_flushes_that_cpus_slabs_from_the_notifier(
        kernel: Kernel, monkeypatch: pytest.MonkeyPatch) -> None:
    k = kernel
    s = k.slab.kmem_cache_create("hot", 256)
    t = k.slab.kmem_cache_create("plugged", 2048)
    run_on(k, 2)
    o = k.slab.kmem_cache_alloc(s)
    page2 = o.page
    k.slab.kmem_cache_free(s, o)
    k.slab.kmem_cache_free(t, k.slab.kmem_cache_alloc(t))
    run_on(k, 1)
    o1 = k.slab.kmem_cache_alloc(s)
    slub = k.slab.slub
    calls: list[tuple[str, int, bool, bool]] = []
    flush = slub.flush_cpu_slab

    def spy(cache: KmemCache, cpu: int) -> None:
        calls.append((cache.name, cpu, k.slab.slab_mutex.is_held(),
                      k.hotplug.lock.is_held_write()))
        flush(cache, cpu)

    monkeypatch.setattr(slub, "flush_cpu_slab", spy)
    assert k.hotplug.cpu_down(2) == 0
    # slab_cpu_callback(CPU_DEAD): under slab_mutex, with the hotplug write side held
    assert sorted(calls) == [("hot", 2, True, True), ("plugged", 2, True, True)]
    assert s_cpu_page(s, 2) is None and s_cpu_page(t, 2) is None
    assert Kasan.is_freed(page2)
    assert s_cpu_page(s, 1) is o1.page  # other CPUs untouched
    assert k.page_alloc.stats()["allocated"] == 1
    assert k.hotplug.cpu_up(2) == 0
    g = k.lockdep_graph()
    assert ("cpu_hotplug_lock", "slab_mutex") in {(e["from"], e["to"]) for e in g["edges"]}
    k.slab.kmem_cache_free(s, o1)
    assert titles(k) == []


def test_alloc_never_freezes_a_slab_on_a_cpu_that_went_down(
        kernel: Kernel, monkeypatch: pytest.MonkeyPatch) -> None:
    """A task that read its CPU number just before the CPU went down (nothing pins it) must
    not freeze a new slab there: CPU_DEAD has flushed it already and no flush_all() looks at
    offline CPUs, so the slab would leak and destroy would say "still has objects"."""
    k = kernel
    hp = k.hotplug
    s = k.slab.kmem_cache_create("stale_cpu", 512)
    run_on(k, 3)
    assert hp.cpu_down(3) == 0
    real = hp.this_cpu
    stale = [3]

    def this_cpu(task: Task | None = None) -> int:
        return stale.pop() if stale else real(task)

    monkeypatch.setattr(hp, "this_cpu", this_cpu)
    o = k.slab.kmem_cache_alloc(s)
    assert stale == [] and s_cpu_page(s, 3) is None and o.page.frozen_cpu in (0, 1, 2)
    k.slab.kmem_cache_free(s, o)
    k.slab.kmem_cache_destroy(s)
    assert titles(k) == [] and Kasan.is_freed(s)
    assert k.page_alloc.stats()["allocated"] == 0


# ---------------------------------------------------------------------- destroy
def test_destroy_with_objects_allocated_reports_and_keeps_the_cache(kernel: Kernel) -> None:
    k = kernel
    s = k.slab.kmem_cache_create("busy", 256)
    objs = [k.slab.kmem_cache_alloc(s) for _ in range(3)]
    k.slab.kmem_cache_destroy(s)
    [f] = k.findings.snapshot()
    assert f.kind == F.SLAB_CACHE_NOT_EMPTY
    assert f.title == "kmem_cache_destroy busy: Slab cache still has objects"
    assert "3 of 16 objects in 1 slabs still allocated" in f.text
    assert "test_destroy_with_objects_allocated_reports_and_keeps_the_cache" in f.text
    # intact and usable
    assert not Kasan.is_freed(s) and s in k.slab.caches() and locked_alias_count(k, s) == 1
    objs.append(k.slab.kmem_cache_alloc(s))
    assert k.slab.slub.counts(s)[0] == 4
    for o in objs:
        k.slab.kmem_cache_free(s, o)
    k.slab.kmem_cache_destroy(s)
    assert Kasan.is_freed(s) and k.slab.caches() == [] and len(k.findings) == 1
    assert k.page_alloc.stats()["allocated"] == 0


# ---------------------------------------------------------------------- slabinfo
def test_slabinfo_listing(kernel: Kernel) -> None:
    k = kernel
    a = k.slab.kmem_cache_create("alpha", 256)
    b = k.slab.kmem_cache_create("beta_cache", 1024)
    ao = [k.slab.kmem_cache_alloc(a) for _ in range(3)]
    bo = [k.slab.kmem_cache_alloc(b) for _ in range(5)]
    lines = k.slab.slabinfo().splitlines()
    assert lines[0] == "slabinfo - version: 2.1"
    assert lines[1].split() == [
        "#", "name", "<active_objs>", "<num_objs>", "<objsize>", "<objperslab>",
        "<pagesperslab>", ":", "tunables", "<limit>", "<batchcount>", "<sharedfactor>", ":",
        "slabdata", "<active_slabs>", "<num_slabs>", "<sharedavail>"]
    assert len(lines) == 4
    rows = {ln.split()[0]: ln for ln in lines[2:]}
    assert rows["alpha"].split() == ["alpha", "3", "16", "256", "16", "1", ":", "tunables",
                                     "0", "0", "0", ":", "slabdata", "1", "1", "0"]
    assert rows["beta_cache"].split() == ["beta_cache", "5", "8", "1024", "4", "1", ":",
                                          "tunables", "0", "0", "0", ":", "slabdata", "2",
                                          "2", "0"]
    assert rows["alpha"].startswith("alpha" + " " * 12 + " ")  # %-17s name column
    for o in ao:
        k.slab.kmem_cache_free(a, o)
    k.slab.kmem_cache_shrink(a)
    rows = {ln.split()[0]: ln.split() for ln in k.slab.slabinfo().splitlines()[2:]}
    assert rows["alpha"][1:3] == ["0", "0"] and rows["beta_cache"][1:3] == ["5", "8"]
    k.slab.kmem_cache_destroy(a)
    assert [ln.split()[0] for ln in k.slab.slabinfo().splitlines()[2:]] == ["beta_cache"]
    for o in bo:
        k.slab.kmem_cache_free(b, o)
    assert titles(k) == []


# ---------------------------------------------------------------------- many threads
def test_many_threads_alloc_and_free_across_threads() -> None:
    """16 threads allocate and free on four caches, hand a share of their objects to other
    threads to free, migrate between CPUs, while one thread shrinks and another takes a CPU
    down and up. No slot is ever handed out twice, nothing is reported, and at the end every
    object and page is back."""
    k = Kernel(name="slab-threads")
    try:
        caches = [k.slab.kmem_cache_create("st-64", 64),
                  k.slab.kmem_cache_create("st-256", 256),
                  k.slab.kmem_cache_create("st-256-acct", 256, flags=SLAB_ACCOUNT),
                  k.slab.kmem_cache_create("st-1k", 1024)]
        assert len(set(map(id, caches))) == 4
        handoff: queue.SimpleQueue = queue.SimpleQueue()
        live: dict[tuple[int, int], int] = {}  # (id(page), slot) -> owner thread
        live_lock = threading.Lock()
        errors: list[str] = []
        stop = threading.Event()
        deadline = time.monotonic() + 1.2

        def alloc(i: int, s: KmemCache) -> Any:
            o = k.slab.kmem_cache_alloc(s)
            with live_lock:
                key = (id(o.page), o.idx)
                if key in live:
                    errors.append(f"slot {key} of {s.name} handed out twice")
                live[key] = i
            o.payload = (i, s.name)
            return o

        def free(s: KmemCache, o: Any) -> None:
            if o.payload[1] != s.name:
                errors.append(f"payload {o.payload} in {s.name}")
            with live_lock:
                live.pop((id(o.page), o.idx), None)
            k.slab.kmem_cache_free(s, o)

        def worker(i: int) -> int:
            rng = random.Random(i)
            mine: list[tuple[KmemCache, Any]] = []
            n = 0
            while n < 100 or time.monotonic() < deadline:
                s = caches[rng.randrange(len(caches))]
                o = alloc(i, s)
                r = rng.random()
                if r < 0.4:
                    handoff.put((s, o))
                elif r < 0.7:
                    mine.append((s, o))
                else:
                    free(s, o)
                for _ in range(2):
                    try:
                        s2, o2 = handoff.get_nowait()
                    except queue.Empty:
                        break
                    free(s2, o2)
                if len(mine) > 48:
                    for s2, o2 in mine[:24]:
                        free(s2, o2)
                    del mine[:24]
                if n % 64 == 0:
                    k.hotplug.migrate()
                if i == 0 and n % 200 == 0:
                    k.slab.kmem_cache_shrink(caches[rng.randrange(len(caches))])
                n += 1
            for s2, o2 in mine:
                free(s2, o2)
            return n

        def hotplugger() -> int:
            ops = 0
            while True:  # at least one round, however late this thread starts
                assert k.hotplug.cpu_down(3) == 0
                assert k.hotplug.cpu_up(3) == 0
                ops += 2
                if stop.is_set() or time.monotonic() > deadline:
                    return ops

        threads = [k.kthread_run(worker, i, name=f"slabstress{i}") for i in range(16)]
        hp = k.kthread_run(hotplugger, name="hotplugger")
        for t in threads:
            t.join(JOIN)
        stop.set()
        hp.join(JOIN)
        assert not any(t.is_alive() for t in [*threads, hp])
        assert [t.exception for t in [*threads, hp] if t.exception] == []
        while True:
            try:
                s, o = handoff.get_nowait()
            except queue.Empty:
                break
            free(s, o)
        assert errors == [] and titles(k) == []
        assert all(t.result > 0 for t in threads) and hp.result > 0
        assert live == {}
        for s in caches:
            k.slab.kmem_cache_shrink(s)
            assert k.slab.slub.counts(s) == (0, 0, 0), s.name
        assert k.page_alloc.stats()["allocated"] == 0
        for s in caches:
            k.slab.kmem_cache_destroy(s)
        assert titles(k) == [] and k.slab.caches() == []
    finally:
        assert k.shutdown(timeout=5.0) == []
