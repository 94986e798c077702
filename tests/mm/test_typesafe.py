"""SLAB_TYPESAFE_BY_RCU (kmemcg.mm.slub, kmemcg.mm.typesafe; seed 003): slab pages go back to
the page allocator one grace period late, destroy waits for them with rcu_barrier(), objects are
reused within the cache under a reader's nose, and the reader pattern (lock, revalidate, retry)
copes with that, also under many threads."""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from kmemcg import Instrument, Kernel, Task
from kmemcg.core import findings as F
from kmemcg.core.kasan import Kasan, KasanOops
from kmemcg.mm.slub import SLAB_TYPESAFE_BY_RCU, KmemCache
from kmemcg.mm.typesafe import TypesafeTable, typesafe_delete, typesafe_insert, typesafe_lookup
from kmemcg.testing import Hold

JOIN = 20.0
BUG_NO_GP = "typesafe_page_freed_without_grace_period"


class Reader:
    """A kthread inside rcu_read_lock(): runs ``first()`` there, signals ``inside``, sleeps
    until :meth:`go`, runs ``then()`` still inside, and leaves the section."""

    def __init__(self, k: Kernel, first: Callable[[], Any] = lambda: None,
                 then: Callable[[], Any] = lambda: None, name: str = "ts_reader") -> None:
        self.k = k
        self.first, self.then = first, then
        self.inside = threading.Event()
        self.hold = Hold(f"{name}_hold")
        self.result: Any = None
        self.thread = k.kthread_run(self._run, name=name)
        assert self.inside.wait(JOIN), f"{name} did not enter its read-side section"

    def _run(self) -> None:
        k = self.k
        with k.rcu.read():
            self.first()
            self.inside.set()
            k.waits.wait(k.current(), self.hold, self.hold.ev.wait)
            self.result = self.then()

    def go(self) -> None:
        self.hold.release()
        self.thread.join(JOIN)
        assert not self.thread.is_alive()


def titles(k: Kernel) -> list[str]:
    return [f"{f.kind}: {f.title}" for f in k.findings]


def typesafe_cache(k: Kernel, name: str = "ts_cache", size: int = 1024) -> KmemCache:
    s = k.slab.kmem_cache_create(name, size, flags=SLAB_TYPESAFE_BY_RCU)
    assert s.typesafe
    return s


def stale_read(obj: Any) -> Any:
    return obj.key


# ---------------------------------------------------------------------- page freeing
@pytest.mark.parametrize("bug", [False, True], ids=["fixed", BUG_NO_GP])
def test_empty_slab_page_goes_back_only_after_a_grace_period(
        bug: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    with Kernel(name="ts-gp", bugs=[BUG_NO_GP] if bug else []) as k:
        s = typesafe_cache(k)
        freed = threading.Event()
        free_page = k.page_alloc.free_page

        def spy(page: Any) -> None:
            free_page(page)
            freed.set()

        monkeypatch.setattr(k.page_alloc, "free_page", spy)
        obj = k.slab.kmem_cache_alloc(s)
        page = obj.page
        reader = Reader(k)  # in its section before the slab is discarded
        k.slab.kmem_cache_free(s, obj)
        assert not Kasan.is_freed(obj) and obj.allocated is False  # type-stable
        k.slab.kmem_cache_shrink(s)  # the empty cpu slab is discarded
        assert page not in s.slabs and k.slab.slub.counts(s) == (0, 0, 0)
        if bug:  # 2004: straight back to the page allocator, under the reader
            assert freed.is_set() and Kasan.is_freed(page)
            reader.go()
            return
        # the grace period cannot end while the reader is inside: the page stays out
        assert not freed.wait(0.2)
        assert not Kasan.is_freed(page) and k.page_alloc.stats()["allocated"] == 1
        assert obj.key is None and obj.lock is not None  # still an object of this cache
        reader.go()
        k.rcu.barrier()
        assert freed.is_set() and Kasan.is_freed(page)
        assert k.page_alloc.stats()["allocated"] == 0
        assert Kasan.is_freed(obj)  # the memory is gone now: stale pointers fault
        assert titles(k) == []


def test_destroy_runs_rcu_barrier_before_freeing_the_cache(
        kernel: Kernel, monkeypatch: pytest.MonkeyPatch) -> None:
    k = kernel
    s = typesafe_cache(k)
    objs = [k.slab.kmem_cache_alloc(s) for _ in range(6)]  # two slabs
    reader = Reader(k)  # holds the grace period: the slab-free callbacks stay pending
    for o in objs:
        k.slab.kmem_cache_free(s, o)  # the full slab's last free discards it
    order: list[tuple] = []
    in_barrier = threading.Event()
    barrier = k.rcu.barrier
    free_slab = k.slab.slub.free_slab

    def barrier_spy() -> None:
        order.append(("rcu_barrier", k.slab.slab_mutex.is_held(), Kasan.is_freed(s)))
        in_barrier.set()
        barrier()
        order.append(("rcu_barrier done",))

    def free_slab_spy(cache: KmemCache, page: Any) -> None:
        order.append(("free_slab", Kasan.is_freed(cache)))
        free_slab(cache, page)

    monkeypatch.setattr(k.rcu, "barrier", barrier_spy)
    monkeypatch.setattr(k.slab.slub, "free_slab", free_slab_spy)
    destroyer = k.kthread_run(k.slab.kmem_cache_destroy, s, name="destroyer")
    assert in_barrier.wait(JOIN)
    assert order == [("rcu_barrier", False, False)] and not Kasan.is_freed(s)
    reader.go()
    destroyer.join(JOIN)
    assert not destroyer.is_alive() and destroyer.exception is None
    # rcu_barrier() without slab_mutex (210ed9defffc), before the cache is freed; the
    # pending rcu_free_slab() callbacks ran inside it and saw a live cache
    assert order == [("rcu_barrier", False, False), ("free_slab", False),
                     ("free_slab", False), ("rcu_barrier done",)]
    assert Kasan.is_freed(s) and k.page_alloc.stats()["allocated"] == 0
    assert titles(k) == []


# ---------------------------------------------------------------------- reuse
def test_object_freed_and_reused_under_a_reader_is_the_same_object(kernel: Kernel) -> None:
    k = kernel
    s = typesafe_cache(k)
    table = TypesafeTable(k, "reuse_table")
    a = typesafe_insert(k, s, table, "A", payload="a")
    seen: dict[str, Any] = {}

    def first() -> None:
        seen["obj"] = table.lookup_rcu("A")

    def then() -> tuple:
        obj = seen["obj"]
        with obj.lock:
            return obj.key, obj.payload, obj.allocated

    reader = Reader(k, first, then)
    assert seen["obj"] is a
    assert typesafe_delete(k, s, table, "A")
    b = typesafe_insert(k, s, table, "B", payload="b")
    assert b is a  # the same slot, the same object: a new identity
    reader.go()
    assert reader.result == ("B", "b", True)  # what a reader must detect by revalidating
    assert titles(k) == []


class _Windows(Instrument):
    def __init__(self) -> None:
        self.hits: list[str] = []

    def on_event(self, point: str, label: str, task: Task, obj: Any) -> None:
        if point == "window" and label == "typesafe_lookup:found":
            self.hits.append(task.comm)


def test_lookup_revalidates_and_retries(kernel: Kernel) -> None:
    k = kernel
    s = typesafe_cache(k)
    table = TypesafeTable(k, "retry_table")
    a = typesafe_insert(k, s, table, "A")
    windows = _Windows()
    k.add_instrument(windows)
    bp = k.breakpoints.add("window:typesafe_lookup:found", thread="looker")
    out: dict[str, Any] = {}

    def look() -> None:
        obj = typesafe_lookup(k, table, "A")
        out["obj"] = obj
        if obj is not None:
            out["key"] = obj.key
            obj.lock.unlock()

    t = k.kthread_run(look, name="looker")
    bp.wait(JOIN)  # found a under rcu_read_lock(), not locked yet
    assert typesafe_delete(k, s, table, "A")
    assert typesafe_insert(k, s, table, "B") is a  # a is now "B"
    c = typesafe_insert(k, s, table, "A")  # "A" lives in another object
    assert c is not a
    bp.release()
    t.join(JOIN)
    assert not t.is_alive() and t.exception is None
    assert out == {"obj": c, "key": "A"}
    assert windows.hits == ["looker", "looker"]  # found a, rejected it, found c
    assert typesafe_delete(k, s, table, "A") and typesafe_lookup(k, table, "A") is None
    assert titles(k) == []


def test_lookup_of_an_object_whose_slab_was_discarded_meanwhile(kernel: Kernel) -> None:
    """The looker found the object; it is deleted and its (now empty) slab discarded before
    the looker locks it. The memory is still an object of the cache (the page waits for the
    looker's grace period): the revalidation fails, the retry finds nothing, no fault."""
    k = kernel
    s = typesafe_cache(k)
    table = TypesafeTable(k, "discard_table")
    a = typesafe_insert(k, s, table, "A")
    page = a.page
    bp = k.breakpoints.add("window:typesafe_lookup:found", thread="looker")
    out: dict[str, Any] = {}

    def look() -> None:
        out["obj"] = typesafe_lookup(k, table, "A")

    t = k.kthread_run(look, name="looker")
    bp.wait(JOIN)
    assert typesafe_delete(k, s, table, "A")
    k.slab.kmem_cache_shrink(s)  # a's slab is empty: discarded, its page waits for a GP
    assert page not in s.slabs and not Kasan.is_freed(page)
    bp.release()
    t.join(JOIN)
    assert not t.is_alive() and t.exception is None and out == {"obj": None}
    k.rcu.barrier()
    assert Kasan.is_freed(page) and Kasan.is_freed(a)
    assert k.page_alloc.stats()["allocated"] == 0 and titles(k) == []


@pytest.mark.parametrize("bug", [False, True], ids=["fixed", BUG_NO_GP])
def test_no_other_cache_reuses_the_page_while_a_reader_holds_an_object(bug: bool) -> None:
    with Kernel(name="ts-confusion", bugs=[BUG_NO_GP] if bug else []) as k:
        s = typesafe_cache(k)
        other = k.slab.kmem_cache_create("other_cache", 2048)
        obj = k.slab.kmem_cache_alloc(s)
        page = obj.page
        reader = Reader(k, then=lambda: (obj.key, obj.allocated))
        k.slab.kmem_cache_free(s, obj)
        k.slab.kmem_cache_shrink(s)  # the slab is empty: discarded
        o2 = k.slab.kmem_cache_alloc(other)  # the other cache's first slab
        if bug:
            assert o2.page is page  # reused at once, while the reader holds obj
            reader.go()
            assert isinstance(reader.thread.exception, KasanOops)
            [f] = k.findings.snapshot()
            assert f.kind == F.KASAN_TYPE_CONFUSION
            assert "under rcu_read_lock()" in f.text and "reused by cache other_cache" in f.text
            return
        assert o2.page is not page
        reader.go()
        assert reader.thread.exception is None and reader.result == (None, False)
        assert titles(k) == []
        # after a grace period the page is free for anyone: now the stale pointer faults
        k.rcu.barrier()
        more = [k.slab.kmem_cache_alloc(other) for _ in range(other.objects_per_slab)]
        assert more[-1].page is page
        with pytest.raises(KasanOops):
            stale_read(obj)
        [f] = k.findings.snapshot()
        assert f.kind == F.KASAN_TYPE_CONFUSION
        assert f.title == "BUG: KASAN: use-after-free in stale_read"


# ---------------------------------------------------------------------- many threads
def test_readers_and_writers_under_load_never_see_a_wrong_object() -> None:
    """8 readers look keys up (the reader pattern, and raw reads under rcu_read_lock) while 4
    writers insert and delete them, shrink the cache (slab pages go back after a grace
    period) and churn another cache that picks those pages up. Every successful lookup
    returns the object with the key asked for; no reader ever faults."""
    k = Kernel(name="ts-load")
    try:
        s = typesafe_cache(k, "ts_load", 512)
        other = k.slab.kmem_cache_create("churn", 512, flags=0)
        assert other is not s
        table = TypesafeTable(k, "load_table")
        n_writers, n_readers, keys_per_writer = 4, 8, 24
        deadline = time.monotonic() + 1.0
        errors: list[str] = []
        stats_lock = threading.Lock()
        hits = [0]
        raw_reads = [0]

        initial = {w: set(range(w * 1000, w * 1000 + keys_per_writer, 2))
                   for w in range(n_writers)}
        for keys in initial.values():
            for key in keys:
                typesafe_insert(k, s, table, key, payload=("payload", key))

        def writer(w: int) -> int:
            rng = random.Random(w)
            mine = [w * 1000 + i for i in range(keys_per_writer)]
            present = initial[w]
            churn: list[Any] = []
            n = 0
            while n < 100 or time.monotonic() < deadline:
                key = rng.choice(mine)
                if key in present:
                    assert typesafe_delete(k, s, table, key)
                    present.discard(key)
                else:
                    typesafe_insert(k, s, table, key, payload=("payload", key))
                    present.add(key)
                if n % 16 == 0:
                    churn.append(k.slab.kmem_cache_alloc(other))
                    if len(churn) > 8:
                        k.slab.kmem_cache_free(other, churn.pop(0))
                if n % 50 == 0:
                    k.hotplug.migrate()
                if n % 20 == 0:
                    k.slab.kmem_cache_shrink(s)  # empty slabs: pages out after a GP
                n += 1
            for key in present:
                assert typesafe_delete(k, s, table, key)
            for o in churn:
                k.slab.kmem_cache_free(other, o)
            return n

        def reader(r: int) -> int:
            rng = random.Random(100 + r)
            n = 0
            while n < 200 or time.monotonic() < deadline:
                key = rng.randrange(n_writers) * 1000 + rng.randrange(keys_per_writer)
                if n % 2:
                    obj = typesafe_lookup(k, table, key)
                    if obj is not None:
                        try:
                            if obj.key != key or obj.payload != ("payload", key):
                                errors.append(f"lookup {key} returned {obj.key}")
                        finally:
                            obj.lock.unlock()
                        with stats_lock:
                            hits[0] += 1
                else:
                    # raw reads: objects found under rcu_read_lock() are read again later in
                    # the same section, without their lock: any field, and it must not fault
                    with k.rcu.read():
                        found = [table.lookup_rcu(key + i) for i in range(4)]
                        os.sched_yield()  # widen the window for writers to free and reuse
                        for obj in found:
                            if obj is not None:
                                _ = (obj.key, obj.payload, obj.allocated)
                                with stats_lock:
                                    raw_reads[0] += 1
                n += 1
            return n

        threads = [k.kthread_run(writer, w, name=f"ts_writer{w}") for w in range(n_writers)]
        threads += [k.kthread_run(reader, r, name=f"ts_reader{r}") for r in range(n_readers)]
        for t in threads:
            t.join(JOIN)
        assert not any(t.is_alive() for t in threads)
        assert [repr(t.exception) for t in threads if t.exception] == []
        assert errors == [] and titles(k) == []
        assert hits[0] > 0 and raw_reads[0] > 0
        with k.rcu.read():
            assert table.lookup_rcu(0) is None
        k.slab.kmem_cache_shrink(s)
        k.slab.kmem_cache_shrink(other)
        k.rcu.barrier()
        assert k.slab.slub.counts(s) == (0, 0, 0) and k.slab.slub.counts(other) == (0, 0, 0)
        assert k.page_alloc.stats()["allocated"] == 0
        k.slab.kmem_cache_destroy(s)
        k.slab.kmem_cache_destroy(other)
        assert titles(k) == []
    finally:
        assert k.shutdown(timeout=5.0) == []
