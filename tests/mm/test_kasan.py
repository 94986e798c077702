"""KASAN for slab objects (kmemcg.core.kasan through kmemcg.mm.slub): use-after-free reads and
writes from any function, double free, invalid free, the alloc / free stacks of the report,
deduplication, the oops in the offending thread, the stack depot, and KASAN switched off."""

from __future__ import annotations

from typing import Any

import pytest

from kmemcg import Kernel
from kmemcg.core import findings as F
from kmemcg.core.kasan import Kasan, KasanOops
from kmemcg.mm.slub import SLAB_TYPESAFE_BY_RCU, KmemCache, SlabObject

JOIN = 20.0


def read_payload(obj: Any) -> Any:
    return obj.payload


def write_payload(obj: Any, value: Any) -> None:
    obj.payload = value


def release_object(k: Kernel, s: KmemCache, obj: Any) -> None:
    k.slab.kmem_cache_free(s, obj)


def _alloc_here(k: Kernel, s: KmemCache) -> Any:
    return k.slab.kmem_cache_alloc(s)  # one allocation site for the stack-depot test


def test_use_after_free_read_names_the_reader_and_both_stacks(kernel: Kernel) -> None:
    k = kernel
    s = k.slab.kmem_cache_create("uaf_read", 128)
    obj = k.slab.kmem_cache_alloc(s)
    obj.payload = "live"
    assert read_payload(obj) == "live" and len(k.findings) == 0  # a live object costs nothing
    assert type(obj) is SlabObject
    release_object(k, s, obj)
    assert Kasan.is_freed(obj) and type(obj) is not SlabObject
    with pytest.raises(KasanOops) as exc:
        read_payload(obj)
    [f] = k.findings.snapshot()
    assert exc.value.finding is f
    assert f.kind == F.KASAN_UAF
    assert f.title == "BUG: KASAN: use-after-free in read_payload"
    assert "Read of attribute 'payload' of object at addr" in f.text
    assert f"by task {k.current().name}" in f.text
    alloc_part, free_part = f.text.split("Allocated by task", 1)[1].split("Freed by task", 1)
    assert "test_use_after_free_read_names_the_reader_and_both_stacks" in alloc_part
    assert "kmem_cache_alloc" in alloc_part
    assert "release_object" in free_part and "kmem_cache_free" in free_part
    assert "which belongs to the cache uaf_read of size 128" in f.text
    assert f.extra["function"] == "read_payload" and f.extra["access"] == "read"


def test_use_after_free_write_from_any_function(kernel: Kernel) -> None:
    k = kernel
    s = k.slab.kmem_cache_create("uaf_write", 64)
    obj = k.slab.kmem_cache_alloc(s)
    k.slab.kmem_cache_free(s, obj)
    with pytest.raises(KasanOops):
        write_payload(obj, 1)
    with pytest.raises(KasanOops):
        obj.key = 2  # straight from the test function
    titles = [f.title for f in k.findings]
    assert titles == ["BUG: KASAN: use-after-free in write_payload",
                      "BUG: KASAN: use-after-free in "
                      "test_use_after_free_write_from_any_function"]
    assert all("Write of attribute" in f.text for f in k.findings)
    assert [f.extra["attr"] for f in k.findings] == ["payload", "key"]


def test_finding_is_deduplicated_and_counted_and_each_access_oopses(kernel: Kernel) -> None:
    k = kernel
    s = k.slab.kmem_cache_create("dedup", 64)
    objs = [k.slab.kmem_cache_alloc(s) for _ in range(3)]
    for o in objs:
        k.slab.kmem_cache_free(s, o)
    oopses = 0
    for o in objs:  # three objects, same access, same function: one finding
        try:
            read_payload(o)
        except KasanOops:
            oopses += 1
    assert oopses == 3
    [f] = k.findings.snapshot()
    assert f.count == 3


def test_oops_is_raised_in_the_offending_thread(kernel: Kernel) -> None:
    k = kernel
    s = k.slab.kmem_cache_create("threaded", 64)
    obj = k.slab.kmem_cache_alloc(s)
    k.slab.kmem_cache_free(s, obj)
    t = k.kthread_run(read_payload, obj, name="stale_reader")
    t.join(JOIN)
    assert not t.is_alive() and isinstance(t.exception, KasanOops)
    [f] = k.findings.snapshot()  # the KASAN report is the oops: no second finding
    assert f.kind == F.KASAN_UAF and f.thread == t.task.name
    assert f.thread.startswith("stale_reader/")
    # the test thread was not touched
    o2 = k.slab.kmem_cache_alloc(s)
    o2.payload = 5
    assert read_payload(o2) == 5


def test_double_free(kernel: Kernel) -> None:
    k = kernel
    s = k.slab.kmem_cache_create("twice", 256)
    obj = k.slab.kmem_cache_alloc(s)
    release_object(k, s, obj)
    before = k.slab.slub.counts(s)
    with pytest.raises(KasanOops):
        k.slab.kmem_cache_free(s, obj)
    [f] = k.findings.snapshot()
    assert f.kind == F.KASAN_DOUBLE_FREE
    assert f.title.startswith("BUG: KASAN: double-free in ")
    assert "test_double_free" in f.text.split("Allocated by task")[0]  # the second free
    assert "release_object" in f.text.split("Freed by task")[1]  # the first free
    assert k.slab.slub.counts(s) == before  # caught before the freelist was touched


def test_double_free_of_a_typesafe_object(kernel: Kernel) -> None:
    k = kernel
    s = k.slab.kmem_cache_create("ts_twice", 256, flags=SLAB_TYPESAFE_BY_RCU)
    obj = k.slab.kmem_cache_alloc(s)
    k.slab.kmem_cache_free(s, obj)
    assert not Kasan.is_freed(obj)  # type-stable: readable until its page is freed
    assert obj.allocated is False
    with pytest.raises(KasanOops):
        k.slab.kmem_cache_free(s, obj)
    assert [f.kind for f in k.findings] == [F.KASAN_DOUBLE_FREE]


def test_invalid_free_to_another_cache(kernel: Kernel) -> None:
    k = kernel
    a = k.slab.kmem_cache_create("owner", 128)
    b = k.slab.kmem_cache_create("stranger", 512)
    obj = k.slab.kmem_cache_alloc(a)
    with pytest.raises(KasanOops):
        k.slab.kmem_cache_free(b, obj)
    [f] = k.findings.snapshot()
    assert f.kind == F.KASAN_INVALID_FREE
    assert f.title.startswith("BUG: KASAN: invalid-free in ")
    assert "kmem_cache_free(stranger): the object belongs to cache owner" in f.text
    assert "test_invalid_free_to_another_cache" in f.text
    # nothing was freed: the object is live and goes back to its own cache normally
    assert not Kasan.is_freed(obj) and obj.allocated
    k.slab.kmem_cache_free(a, obj)
    assert k.slab.slub.counts(a)[0] == 0 and len(k.findings) == 1


def test_stack_depot_stores_one_stack_per_site(kernel: Kernel) -> None:
    k = kernel
    s = k.slab.kmem_cache_create("depot", 64)  # 32 per slab: the loop stays in one slab
    objs: list[Any] = []
    n = 0
    for i in range(s.objects_per_slab - 1):
        objs.append(_alloc_here(k, s))
        if i == 0:
            n = len(k.stacks)  # the first round stored the site (and the new slab's page)
    assert len(k.stacks) == n  # same site thirty times: nothing new stored
    infos = [o._kasan for o in objs]
    assert infos[0] is not infos[1]
    assert all(i.alloc_stack is infos[0].alloc_stack for i in infos)  # one stored stack
    other = k.slab.kmem_cache_alloc(s)  # another site: another stack
    assert other._kasan.alloc_stack is not infos[0].alloc_stack
    assert other._kasan.alloc_stack != infos[0].alloc_stack and len(k.stacks) == n + 1
    for o in [*objs, other]:
        release_object(k, s, o)
    frees = {id(object.__getattribute__(o, "_kasan").free_stack) for o in objs}
    assert len(frees) == 1


def test_kasan_off_poisons_nothing_and_reports_nothing() -> None:
    with Kernel(name="nokasan", kasan=False) as k:
        s = k.slab.kmem_cache_create("plain", 128)
        obj = k.slab.kmem_cache_alloc(s)
        obj.payload = "stale but readable"
        k.slab.kmem_cache_free(s, obj)
        assert type(obj) is SlabObject and not Kasan.is_freed(obj) and obj._kasan is None
        assert read_payload(obj) == "stale but readable"
        write_payload(obj, 1)
        other = k.slab.kmem_cache_create("other", 512)
        o2 = k.slab.kmem_cache_alloc(other)
        k.slab.kmem_cache_free(other, o2)
        k.slab.kmem_cache_shrink(s)
        k.slab.kmem_cache_destroy(s)
        assert not Kasan.is_freed(s) and s.name == "plain"
        assert len(k.findings) == 0
        n = len(k.stacks)  # lockdep stores its edges' stacks; KASAN stores nothing
        k.slab.kmem_cache_free(other, k.slab.kmem_cache_alloc(other))
        assert len(k.stacks) == n
