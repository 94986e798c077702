"""SLUB (mm/slub.c): slabs, per-CPU slabs and freelists, partial lists, object alloc / free,
flush, shrink and shutdown, and SLAB_TYPESAFE_BY_RCU page freeing.

Structures as in SLUB: each cache has one ``kmem_cache_cpu`` per possible CPU (the *cpu slab*:
a frozen page whose free objects sit on the per-CPU freelist) and one node with a partial list.
Allocation pops the current CPU's freelist, refilling it from the remote frees that reached the
cpu slab's own page, else from a partial slab or a new page; a free on the CPU that owns the
slab goes back to the per-CPU freelist, any other free to the page's freelist under
``list_lock``. Empty slabs beyond ``min_partial`` are discarded; for a
SLAB_TYPESAFE_BY_RCU cache the page goes back to the page allocator one grace period later
(``call_rcu(rcu_free_slab)``), so an object reached under rcu_read_lock() keeps its type.

Lock contract (raw locks: preemption-disabled per-CPU sections and spinlocks in the kernel;
lockdep does not track them, and none is held across a blocking call):
``kmem_cache_cpu.lock`` -> ``kmem_cache.list_lock`` -> the page allocator's zone lock.

Differences from SLUB: one NUMA node; no cmpxchg fast paths (the per-CPU lock stands for
disabled preemption); ``min_partial`` is 0 by default so that empty slabs go back to the page
allocator at once (the lifecycle bugs this model hunts live there); every allocation of a
non-TYPESAFE cache hands out a fresh Python object for the slot, so a stale pointer to a freed
object stays poisoned even after the slot is reused (KASAN with an unbounded quarantine).
Nothing pins a task to its CPU, so the refill path re-checks under the per-CPU lock that the
CPU is still online (a slab frozen on a CPU after its CPU_DEAD flush would never be flushed).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from kmemcg.core.kasan import Kasan, KasanObject
from kmemcg.mm.page_alloc import PAGE_SIZE, Page

if TYPE_CHECKING:
    from kmemcg.kernel import Kernel

SLAB_HWCACHE_ALIGN = 0x00002000
SLAB_TYPESAFE_BY_RCU = 0x00080000
SLAB_ACCOUNT = 0x04000000
SLAB_PANIC = 0x00040000
SLAB_NEVER_MERGE = SLAB_TYPESAFE_BY_RCU
SLAB_MERGE_SAME = SLAB_ACCOUNT
CACHE_LINE = 64
MIN_OBJECTS, MAX_OBJECTS = 4, 32


class SlabObject(KasanObject):
    """One object handed out by kmem_cache_alloc(). ``payload`` is the user's data; ``key``
    and ``lock`` serve the SLAB_TYPESAFE_BY_RCU reader pattern (``lock`` exists only in such
    caches, made once per slot as a constructor would)."""

    __slots__ = ("cache", "page", "idx", "payload", "key", "lock", "allocated")

    def __init__(self, cache: KmemCache, page: Page, idx: int) -> None:
        self.cache = cache
        self.page = page
        self.idx = idx
        self.payload: Any = None
        self.key: Any = None
        self.lock: Any = None
        self.allocated = False

    def __repr__(self) -> str:
        g = object.__getattribute__
        return f"<object {g(self, 'idx')} of page {g(self, 'page')!r}>"


_MEMCG_SUFFIX = re.compile(r"\(.*\)$")


def cache_signature(name: str) -> str:
    """A cache's name for a finding's signature: ``dentry(7:m0)`` -> ``dentry(*)``. The
    children of many memcgs (a stress run makes thousands) are one place in the code."""
    return _MEMCG_SUFFIX.sub("(*)", name)


class KmemCacheCpu:
    """struct kmem_cache_cpu: the cpu slab. ``lock`` stands for disabled preemption."""

    __slots__ = ("lock", "page", "freelist")

    def __init__(self, kernel: Kernel) -> None:
        self.lock = kernel.raw_lock()
        self.page: Page | None = None
        self.freelist: list[int] = []


class KmemCache(KasanObject):
    """struct kmem_cache.

    The two counts the seed 000 review asked about:

    ``alias_count``
        How many kmem_cache_create() callers share this cache: 1 for its creator, +1 for each
        later creation that find_mergeable() merged into it. It is what the kernel calls
        ``s->refcount`` and it is *not* a lifetime reference: kmem_cache_destroy() frees the
        cache when it drops to zero, whoever else still uses the cache. Read and written only
        under ``slab_mutex``.
    ``lifetime_ref``
        Only in the design that has one (seed 000's fix, memcg layer): a refcount_t taken by
        whoever must keep the cache alive (asynchronous memcg work); None otherwise.
    """

    __slots__ = ("name", "object_size", "size", "align", "flags", "ctor", "objects_per_slab",
                 "order", "alias_count", "lifetime_ref", "cpu_slab", "list_lock", "partial",
                 "nr_partial", "min_partial", "slabs", "memcg_params", "on_list", "live")

    def __init__(self, kernel: Kernel, name: str, object_size: int, size: int, align: int,
                 flags: int, ctor: Callable[[SlabObject], None] | None) -> None:
        self.name = name
        self.object_size = object_size
        self.size = size
        self.align = align
        self.flags = flags
        self.ctor = ctor
        self.objects_per_slab = max(MIN_OBJECTS, min(MAX_OBJECTS, PAGE_SIZE // size))
        self.order = 0
        self.alias_count = 1  # slab_mutex
        self.lifetime_ref: Any = None
        self.cpu_slab = [KmemCacheCpu(kernel) for _ in range(kernel.hotplug.nr_cpus)]
        self.list_lock = kernel.raw_lock()
        self.partial: list[Page] = []  # list_lock
        self.nr_partial = 0  # list_lock
        self.min_partial = 0
        self.slabs: set[Page] = set()  # every slab of the cache (list_lock)
        self.memcg_params: Any = None
        self.on_list = False  # on slab_caches (slab_mutex)
        # Allocated objects, for kmemleak's scan (kmemleak_alloc/kmemleak_free). A slot is
        # owned by one party at a time (the allocator from its pop off a freelist to the
        # free), so each object is added and removed by one thread; set add/discard are
        # single atomic operations (GIL, or the set's own lock on free-threaded builds).
        self.live: set[SlabObject] = set()

    def __repr__(self) -> str:
        return f"<kmem_cache {object.__getattribute__(self, 'name')}>"

    @property
    def typesafe(self) -> bool:
        return bool(self.flags & SLAB_TYPESAFE_BY_RCU)


class Slub:
    """The allocator proper; ``SlabCommon`` (slab_common.py) drives it."""

    def __init__(self, kernel: Kernel) -> None:
        self._k = kernel
        self.kasan: Kasan = kernel.kasan

    # ------------------------------------------------------------------ slabs
    def allocate_slab(self, s: KmemCache) -> Page:
        """allocate_slab(): a page from the page allocator, its objects constructed."""
        page, _old = self._k.page_alloc.alloc_page(s.name)
        page.slab_cache = s
        p = s.memcg_params
        if p is not None and not p.is_root_cache:
            self._k.memcg_slab.memcg_charge_slab(s, page)
        n = s.objects_per_slab
        page.free = list(range(n - 1, -1, -1))
        if s.typesafe:
            # The objects are the memory: they persist across free and reuse of their slot,
            # so a reader that found one under RCU can lock it and revalidate.
            objs = []
            for i in range(n):
                o = SlabObject(s, page, i)
                o._kasan = None
                o.lock = self._k.spinlock(f"{s.name}.lock")
                if s.ctor is not None:
                    s.ctor(o)
                objs.append(o)
            page.objects = objs
        with s.list_lock:
            s.slabs.add(page)
        return page

    def discard_slab(self, s: KmemCache, page: Page) -> None:
        """discard_slab(): an empty slab goes back to the page allocator; for a TYPESAFE_BY_RCU
        cache only after a grace period."""
        if s.typesafe and not self._k.config.bug("typesafe_page_freed_without_grace_period"):
            self._k.rcu.call(self.rcu_free_slab, page)
        else:
            self.free_slab(s, page)

    def rcu_free_slab(self, page: Page) -> None:
        """rcu_free_slab(): the RCU callback. It finds its cache through the page, as the
        kernel's does: destroying the cache before this ran is a use-after-free here."""
        self.free_slab(page.slab_cache, page)

    def free_slab(self, s: KmemCache, page: Page) -> None:
        """__free_slab(): reads the cache (its order, its flags), poisons what the page held,
        frees the page."""
        order = s.order  # noqa: F841  (the kernel reads oo_order(s->oo) here)
        p = s.memcg_params
        child = p is not None and not p.is_root_cache
        if s.typesafe:
            for o in page.objects:  # the type-stable memory goes away only now
                self.kasan.poison(o)
        if not child and page.memcg_data is not None:
            # 5.9: uncharge_slab_page() frees page->obj_cgroups before __free_pages()
            self._k.memcg_slab.memcg_free_page_obj_cgroups(page)
        self._k.page_alloc.free_page(page)
        if child:
            # memcg_uncharge_slab(), last: the cache is not touched after the count that may
            # let its destruction run is dropped (seed 002's free-path bug, catalog 10)
            self._k.memcg_slab.memcg_uncharge_slab(s, page)

    # ------------------------------------------------------------------ alloc
    def slab_alloc(self, s: KmemCache) -> SlabObject:
        """slab_alloc(): slab_pre_alloc_hook() first (a SLAB_ACCOUNT cache allocates from the
        current memcg's child cache, see kmemcg.mm.memcg_slab), then the allocation proper."""
        if s.flags & SLAB_ACCOUNT and self._k.memcg_slab is not None:
            return self._k.memcg_slab.slab_alloc(s)
        return self.slab_alloc_node(s)

    def slab_alloc_node(self, s: KmemCache) -> SlabObject:
        """Pop the current CPU's freelist; refill it from a partial slab or a new slab when
        empty (___slab_alloc)."""
        k = self._k
        task = k.current()
        hp = k.hotplug
        while True:
            cpu = hp.this_cpu(task)
            c = s.cpu_slab[cpu]
            with c.lock:
                if not c.freelist:
                    if not hp.cpu_online(cpu):
                        # The CPU went down after this_cpu() (nothing pins a task to its
                        # CPU here): its CPU_DEAD flush may have run already, and a slab
                        # frozen now would stay on a dead CPU where no flush_all() looks.
                        # Checked under c.lock: the mask changes before that flush, which
                        # takes c.lock, so "online" here means the flush comes after us.
                        continue
                    self._refill(s, c, cpu)
                idx = c.freelist.pop()
                page = c.page
            break
        if s.typesafe:
            obj = page.objects[idx]
        else:
            obj = SlabObject(s, page, idx)
            if s.ctor is not None:
                s.ctor(obj)
        self.kasan.alloc(obj, "object", f"the cache {s.name} of size {s.object_size}")
        obj.allocated = True
        s.live.add(obj)  # kmemleak_alloc_recursive()
        return obj

    def _refill(self, s: KmemCache, c: KmemCacheCpu, cpu: int) -> None:
        """Caller holds ``c.lock`` and the per-CPU freelist is empty. As ___slab_alloc():
        first take the remote frees that reached the cpu slab's own page (get_freelist());
        else unfreeze the exhausted cpu slab and freeze a partial slab or a new one, moving
        its free objects onto the per-CPU freelist."""
        old = c.page
        with s.list_lock:
            if old is not None:
                if old.free:  # remote frees arrived meanwhile: keep this cpu slab
                    c.freelist, old.free = old.free, []
                    return
                old.frozen_cpu = None  # full: off every list until an object is freed
            if s.partial:
                page = s.partial.pop()
                page.on_partial = False
                s.nr_partial -= 1
                # Frozen in the same list_lock section that took it off the partial list: in
                # between, a remote free would find it unfrozen and on no list and could
                # discard it (its last object freed) while we make it our cpu slab.
                page.frozen_cpu = cpu
                c.freelist, page.free = page.free, []
                c.page = page
                return
        page = self.allocate_slab(s)  # no object of it is out yet: no remote free can race
        with s.list_lock:
            page.frozen_cpu = cpu
            c.freelist, page.free = page.free, []
        c.page = page

    @staticmethod
    def _add_partial(s: KmemCache, page: Page) -> None:
        page.on_partial = True
        s.partial.append(page)
        s.nr_partial += 1

    @staticmethod
    def _remove_partial(s: KmemCache, page: Page) -> None:
        page.on_partial = False
        s.partial.remove(page)
        s.nr_partial -= 1

    # ------------------------------------------------------------------ free
    def slab_free(self, s: KmemCache, obj: SlabObject) -> None:
        """slab_free(): KASAN first (a double free is caught before anything is touched), then
        back to the per-CPU freelist if the slab is this CPU's, else to the page."""
        if Kasan.is_freed(obj):
            self.kasan.free(obj)  # reports the double free and raises
        if obj.cache is not s:
            self.kasan.invalid_free(obj, f"kmem_cache_free({s.name}): the object belongs to "
                                         f"cache {obj.cache.name}")
        if not obj.allocated:  # a TYPESAFE object freed twice (it is not poisoned)
            self.kasan.free(obj)
        page, idx = obj.page, obj.idx
        obj.allocated = False
        s.live.discard(obj)  # kmemleak_free_recursive(), before poisoning
        self.kasan.free(obj, poison=not s.typesafe)
        k = self._k
        cpu = k.hotplug.this_cpu(k.current())
        c = s.cpu_slab[cpu]
        with c.lock:
            if c.page is page:
                c.freelist.append(idx)
                return
        discard = False
        with s.list_lock:
            page.free.append(idx)
            if page.frozen_cpu is not None:
                return
            nfree = len(page.free)
            if nfree == s.objects_per_slab and s.nr_partial >= s.min_partial:
                if page.on_partial:
                    self._remove_partial(s, page)
                s.slabs.discard(page)
                discard = True
            elif not page.on_partial:
                self._add_partial(s, page)
        if discard:
            self.discard_slab(s, page)

    # ------------------------------------------------------------------ flush / shrink
    def has_cpu_slab(self, cpu: int, s: KmemCache) -> bool:
        """has_cpu_slab(): the on_each_cpu_cond() condition of flush_all(). Where the 4.17 GPF
        of seed 000 happened, on a cache that had been freed."""
        c = s.cpu_slab[cpu]
        return c.page is not None

    def flush_cpu_slab(self, s: KmemCache, cpu: int) -> None:
        """flush_slab() / deactivate_slab(): unfreeze ``cpu``'s slab, its free objects back to
        the page; an empty one beyond min_partial is discarded."""
        c = s.cpu_slab[cpu]
        with c.lock:
            page, fl = c.page, c.freelist
            c.page, c.freelist = None, []
        if page is None:
            return
        discard = False
        with s.list_lock:
            page.free.extend(fl)
            page.frozen_cpu = None
            nfree = len(page.free)
            if nfree == s.objects_per_slab and s.nr_partial >= s.min_partial:
                s.slabs.discard(page)
                discard = True
            elif nfree and not page.on_partial:
                self._add_partial(s, page)
        if discard:
            self.discard_slab(s, page)

    def flush_all(self, s: KmemCache) -> None:
        """flush_all(): on_each_cpu_cond(has_cpu_slab, flush_cpu_slab)."""
        self._k.hotplug.on_each_cpu_cond(lambda cpu: self.has_cpu_slab(cpu, s),
                                         lambda cpu: self.flush_cpu_slab(s, cpu))

    def _discard_empty_partials(self, s: KmemCache) -> int:
        with s.list_lock:
            empty = [p for p in s.partial if len(p.free) == s.objects_per_slab]
            for p in empty:
                self._remove_partial(s, p)
                s.slabs.discard(p)
        for p in empty:
            self.discard_slab(s, p)
        return len(empty)

    def kmem_cache_shrink(self, s: KmemCache) -> int:
        """__kmem_cache_shrink(): flush every cpu slab, discard every empty slab."""
        self.flush_all(s)
        self._discard_empty_partials(s)
        return 0

    def kmem_cache_shutdown(self, s: KmemCache) -> list[Page]:
        """__kmem_cache_shutdown(): flush and free everything; returns the slabs that still
        hold objects (empty list = success)."""
        self.flush_all(s)
        self._discard_empty_partials(s)
        with s.list_lock:
            return [p for p in s.slabs if len(p.free) < s.objects_per_slab]

    # ------------------------------------------------------------------ accounting
    def counts(self, s: KmemCache) -> tuple[int, int, int]:
        """(active objects, total objects, slabs)."""
        n = s.objects_per_slab
        cpu_free = 0
        for c in s.cpu_slab:
            with c.lock:
                cpu_free += len(c.freelist)
        with s.list_lock:
            slabs = len(s.slabs)
            free = sum(len(p.free) for p in s.slabs)
        total = slabs * n
        return total - free - cpu_free, total, slabs
