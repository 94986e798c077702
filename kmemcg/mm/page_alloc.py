"""The page allocator (mm/page_alloc.c) as far as slab needs it: one pool of pages shared by
every cache, so a page one cache frees can be handed to another.

Free pages are reused most-recently-freed first (the buddy allocator's hot per-CPU lists do
the same), which is what turns a page freed too early into a *type confusion*: the next slab
allocated, by any cache, gets that page while a stale reader may still look at it.

KASAN: a freed page is poisoned; handing it out again unpoisons it. When a page is reused by a
different cache than the one that last owned it, the old objects of that page are marked as
now belonging to the new cache, so an RCU reader touching one reports a type-confusion
use-after-free rather than a plain one.

Lock contract: ``_lock`` (zone->lock, raw) guards the free list and the counters.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kmemcg.core.kasan import KasanObject

if TYPE_CHECKING:
    from kmemcg.kernel import Kernel

PAGE_SIZE = 4096


class Page(KasanObject):
    """struct page used as a slab (the slab fields of struct page / struct slab).

    Slab fields are guarded by the owning cache's ``list_lock`` (free, on_partial, frozen_cpu)
    or set once when the slab is allocated (slab_cache, objects).
    """

    __slots__ = ("pfn", "slab_cache", "objects", "free", "frozen_cpu", "on_partial",
                 "last_owner", "memcg_data")

    def __init__(self, pfn: int) -> None:
        self.pfn = pfn
        self.slab_cache: Any = None
        self.objects: list[Any] = []  # the slab's object slots
        self.free: list[int] = []  # page freelist: slot indices not in use
        self.frozen_cpu: int | None = None  # the CPU whose cpu slab this is
        self.on_partial = False
        self.last_owner = ""  # name of the cache that last held it (for type confusion)
        self.memcg_data: Any = None  # page->mem_cgroup / page->obj_cgroups (memcg design)

    def __repr__(self) -> str:
        return f"<page pfn={object.__getattribute__(self, 'pfn')}>"


class PageAllocator:
    def __init__(self, kernel: Kernel) -> None:
        self._k = kernel
        self._lock = kernel.raw_lock()
        self._free: list[Page] = []
        self._next_pfn = 0x1000
        self.nr_allocated = 0  # pages handed out and not yet freed
        self.nr_alloc_calls = 0

    def alloc_page(self, owner: str) -> tuple[Page, list[Any]]:
        """alloc_pages(order 0) for a slab of cache ``owner``. Returns the page and the objects
        it held in its previous life (to be marked reused), empty for a fresh page."""
        with self._lock:
            if self._free:
                page = self._free.pop()  # LIFO: the most recently freed page first
            else:
                page = Page(self._next_pfn)
                self._next_pfn += 1
                page._kasan = None
            self.nr_allocated += 1
            self.nr_alloc_calls += 1
        old: list[Any] = []
        kasan = self._k.kasan
        if type(page)._kasan_freed:  # a page that was freed: unpoison, look at its old life
            kasan.alloc(page, "slab page", f"the slab of cache {owner}")
            if page.last_owner and page.last_owner != owner:
                old = page.objects
        else:
            kasan.alloc(page, "slab page", f"the slab of cache {owner}")
        page.slab_cache = None
        page.objects = []
        page.free = []
        page.frozen_cpu = None
        page.on_partial = False
        page.last_owner = owner
        for obj in old:
            kasan.mark_reused(obj, owner)
        return page, old

    def free_page(self, page: Page) -> None:
        """__free_pages(): poison the page and put it on the free list."""
        self._k.kasan.free(page)
        with self._lock:
            self._free.append(page)
            self.nr_allocated -= 1

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"allocated": self.nr_allocated, "free": len(self._free),
                    "total": self._next_pfn - 0x1000}
