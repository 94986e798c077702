"""mm/slab_common.c: kmem_cache_create() with merging, kmem_cache_destroy(), kmem_cache_shrink(),
the slab_caches list under slab_mutex, /proc/slabinfo, and the CPU-hotplug notifier.

Lock order (fixed kernel): cpu hotplug read side -> slab_mutex -> (raw) list_lock. The hotplug
notifier runs with the hotplug write side held and takes slab_mutex, so that order is the only
legal one, which is exactly what the 2012 bug broke (seed 004).

Bug switches restored here, each at the point its fix changed:

* ``destroy_rcu_barrier_under_slab_mutex`` (v3.6; fixed by 210ed9defffc): rcu_barrier() runs
  before slab_mutex is released. rcu_barrier() takes the hotplug lock in the 2012 design
  (1331e7a1bbe1), so lockdep sees slab_mutex -> cpu_hotplug.lock against the notifier's
  cpu_hotplug.lock -> slab_mutex.
* ``destroy_without_rcu_barrier`` (2004, seed 003): no rcu_barrier() at all for a
  TYPESAFE_BY_RCU cache; pending rcu_free_slab() callbacks then read the freed cache.
* ``alias_race`` (3.16-3.18): with the alias count at zero, destroy drops slab_mutex (the real
  code destroyed memcg children there) while the doomed cache is still on slab_caches, so
  find_mergeable() can hand it to a concurrent kmem_cache_create().
* ``put_online_cpus_imbalance`` (seed 004): a leaking put_online_cpus(). The seed thread never
  found the leaking caller; the model puts it on kmem_cache_shrink()'s way out.

An accounted (SLAB_ACCOUNT) root cache is destroyed, allocated from and freed to through the
memcg design in use (``k.memcg_slab``), which reuses :meth:`SlabCommon.shutdown_cache` and
:class:`DestroyLocks` for the common part.

Unlinking a cache from slab_caches is checked as CONFIG_DEBUG_LIST does: a second unlink (two
destroyers of one cache, which the alias race allows) is reported as "list_del corruption"
(an ASSERTION finding) and skipped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from kmemcg.core import findings as F
from kmemcg.core.kasan import Kasan
from kmemcg.core.report import banner
from kmemcg.core.stacks import format_stack
from kmemcg.mm.slub import (
    CACHE_LINE,
    SLAB_ACCOUNT,
    SLAB_HWCACHE_ALIGN,
    SLAB_MERGE_SAME,
    SLAB_NEVER_MERGE,
    KmemCache,
    SlabObject,
    Slub,
    cache_signature,
)

if TYPE_CHECKING:
    from kmemcg.kernel import Kernel

WORD = 8


def _align(x: int, a: int) -> int:
    return (x + a - 1) // a * a


class DestroyLocks:
    """What a kmem_cache_destroy() holds right now (the hotplug read side, slab_mutex), so
    that the paths that drop and retake them in the middle, and every way out including a
    teardown, release exactly that. ``with DestroyLocks(sl) as held:`` takes both; functions
    queued with :meth:`after_unlock` run once both are released (freeing what must not be
    freed under slab_mutex)."""

    def __init__(self, sl: SlabCommon) -> None:
        self._sl = sl
        self._hp = sl._k.hotplug
        self.cpus = self.mutex = False
        self._after: list[Callable[[], None]] = []

    def __enter__(self) -> DestroyLocks:
        self.take_all()
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.drop_all()
        finally:
            after, self._after = self._after, []
            for fn in after:
                fn()

    def take_all(self) -> None:
        self._hp.get_online_cpus()
        self.cpus = True
        self.take_slab_mutex()

    def drop_all(self) -> None:
        self.drop_slab_mutex()
        if self.cpus:
            self.cpus = False
            self._hp.put_online_cpus()

    def take_slab_mutex(self) -> None:
        self._sl.slab_mutex.lock()
        self.mutex = True

    def drop_slab_mutex(self) -> None:
        if self.mutex:
            self.mutex = False
            self._sl.slab_mutex.unlock()

    def after_unlock(self, fn: Callable[[], None]) -> None:
        self._after.append(fn)


class SlabCommon:
    """``k.slab``: the slab allocator's public interface, named as in the kernel."""

    def __init__(self, kernel: Kernel) -> None:
        self._k = kernel
        self.slub = Slub(kernel)
        self.slab_mutex = kernel.mutex("slab_mutex")
        self.slab_caches: list[KmemCache] = []  # slab_mutex
        # accounted roots with a kmem_cache_destroy() in progress: id -> calls (model
        # bookkeeping for kmemleak: children a destroy is about to shut down are no leak)
        self._destroying: dict[int, int] = {}
        self._destroying_lock = kernel.raw_lock()
        kernel.hotplug.register_notifier(self.slab_cpu_callback)

    @contextmanager
    def cpus_and_slab_mutex(self) -> Iterator[None]:
        """The prologue of every slab_common path: get_online_cpus(), then slab_mutex."""
        hp = self._k.hotplug
        hp.get_online_cpus()
        try:
            with self.slab_mutex:
                yield
        finally:
            hp.put_online_cpus()

    # ------------------------------------------------------------------ create
    def kmem_cache_create(self, name: str, size: int, align: int = 0, flags: int = 0,
                          ctor: Callable[[SlabObject], None] | None = None) -> KmemCache:
        """kmem_cache_create(): merge into a compatible cache (its alias count goes up) or
        create a new one; under the hotplug read lock and slab_mutex as the kernel does."""
        if size <= 0 or size > 1 << 22:
            raise ValueError(f"kmem_cache_create({name!r}): bad object size {size}")
        k = self._k
        with self.cpus_and_slab_mutex():
            s = self.find_mergeable(size, align, flags, ctor)
            if s is not None and self.kmem_cache_alias(s):
                k.event("cache_merge", s)
                return s
            return self._create_cache(name, size, align, flags, ctor)

    def kmem_cache_alias(self, s: KmemCache) -> bool:
        """__kmem_cache_alias(), caller holds slab_mutex: one more alias of ``s``; the memcg
        design decides (seed 000's refcount design may refuse a root being destroyed)."""
        ms = self._k.memcg_slab
        if ms is not None:
            return ms.kmem_cache_alias(s)
        s.alias_count += 1
        return True

    def _calc_align(self, flags: int, align: int, size: int) -> int:
        a = max(align, WORD)
        if flags & SLAB_HWCACHE_ALIGN:
            ralign = CACHE_LINE
            while size <= ralign // 2 and ralign > WORD:
                ralign //= 2
            a = max(a, ralign)
        return a

    def find_mergeable(self, size: int, align: int, flags: int,
                       ctor: Callable | None) -> KmemCache | None:
        """find_mergeable(): caller holds slab_mutex. Never for TYPESAFE_BY_RCU or a ctor."""
        if (flags & SLAB_NEVER_MERGE) or ctor is not None:
            return None
        size = _align(size, WORD)
        a = self._calc_align(flags, align, size)
        size = _align(size, a)
        for s in reversed(self.slab_caches):
            if s.flags & SLAB_NEVER_MERGE or s.ctor is not None:
                continue  # slab_unmergeable()
            if s.memcg_params is not None and s.memcg_params.dying:
                continue  # being destroyed (d38a2b7a9c93): never resurrect it
            if s.memcg_params is not None and not s.memcg_params.is_root_cache:
                continue  # a per-memcg clone is never an alias target
            if size > s.size or s.size - size >= WORD:
                continue
            if (flags & SLAB_MERGE_SAME) != (s.flags & SLAB_MERGE_SAME):
                continue
            if s.size & (a - 1):
                continue
            return s
        return None

    def _create_cache(self, name: str, size: int, align: int, flags: int,
                      ctor: Callable | None) -> KmemCache:
        """create_cache(): caller holds slab_mutex."""
        k = self._k
        a = self._calc_align(flags, align, _align(size, WORD))
        s = KmemCache(k, name, size, _align(_align(size, WORD), a), a, flags, ctor)
        k.kasan.alloc(s, "kmem_cache", "the kmem_cache cache")
        if k.memcg_slab is not None:
            k.memcg_slab.init_memcg_params(s)  # a root cache: its per-memcg children
        self.slab_caches.append(s)
        s.on_list = True
        k.event("cache_create", s)
        return s

    # ------------------------------------------------------------------ destroy
    def kmem_cache_destroy(self, s: KmemCache | None) -> None:
        """kmem_cache_destroy(): drop one alias; the last one shuts the cache down and frees
        it. Objects still allocated: "Slab cache still has objects", the cache stays usable.
        An accounted root cache goes through the memcg design's destroy, which also takes
        care of its per-memcg children (kmemcg.mm.memcg_slab and the era modules)."""
        if s is None:
            return
        ms = self._k.memcg_slab
        if ms is not None and s.flags & SLAB_ACCOUNT and s.memcg_params is not None and \
                s.memcg_params.is_root_cache:
            key = id(s)  # s itself may be freed by the time we are done
            with self._destroying_lock:
                self._destroying[key] = self._destroying.get(key, 0) + 1
            try:
                ms.kmem_cache_destroy(s)
            finally:
                with self._destroying_lock:
                    if self._destroying[key] == 1:
                        del self._destroying[key]
                    else:
                        self._destroying[key] -= 1
            return
        self.destroy_plain(s)

    def destroy_in_progress(self, root: KmemCache) -> bool:
        """Is a kmem_cache_destroy() of accounted root ``root`` running?"""
        with self._destroying_lock:
            return id(root) in self._destroying

    def destroy_plain(self, s: KmemCache) -> None:
        """kmem_cache_destroy() with no memcg part: drop an alias; the last one shuts down."""
        with DestroyLocks(self) as held:
            s.alias_count -= 1
            if s.alias_count:
                return
            self.alias_race_window(held)
            self.shutdown_cache(s, held)

    def alias_race_window(self, held: DestroyLocks) -> None:
        """The ``alias_race`` switch (3.16-3.18): slab_mutex dropped with the alias count at
        zero and the cache still on slab_caches (the real code destroyed the memcg children
        there)."""
        if self._k.config.bug("alias_race"):
            held.drop_slab_mutex()
            self._k.window("kmem_cache_destroy:slab_mutex_dropped")
            held.take_slab_mutex()

    def shutdown_cache(self, s: KmemCache, held: DestroyLocks) -> bool:
        """shutdown_cache() + release: caller holds what ``held`` says (cpus, slab_mutex) and
        the alias count reached zero. Busy: reported, the alias restored, False. Otherwise
        unlinked and freed (after rcu_barrier() for TYPESAFE_BY_RCU), True."""
        k = self._k
        cfg = k.config
        busy = self.slub.kmem_cache_shutdown(s)
        if busy:
            s.alias_count += 1  # the model lets the owner free its objects and retry
            self._report_busy(s, busy)
            return False
        if not self._list_del(s):
            return False  # another destroyer unlinked it (alias race): its job now
        if cfg.bug("destroy_rcu_barrier_under_slab_mutex"):
            if s.typesafe and not cfg.bug("destroy_without_rcu_barrier"):
                k.rcu.barrier()  # v3.6: under slab_mutex
        else:
            # 210ed9defffc: unlock before rcu_barrier(); and, as today's kernel does, leave
            # the hotplug read side too: a writer queued on the percpu rwsem would otherwise
            # hold back anything the barrier waits for that needs the read side
            held.drop_all()
            k.window("kmem_cache_destroy:unlocked")
            if s.typesafe and not cfg.bug("destroy_without_rcu_barrier"):
                k.rcu.barrier()  # pending rcu_free_slab() callbacks read the cache
        k.event("cache_destroy", s)
        self._release_memcg_params(s)
        k.kasan.free(s)  # slab_kmem_cache_release()
        return True

    def _list_del(self, s: KmemCache) -> bool:
        """list_del(&s->list) under slab_mutex, checked as CONFIG_DEBUG_LIST does: a cache
        that is no longer on slab_caches (two destroyers of one cache, which the alias race
        allows) is "list_del corruption", reported, and the deletion skipped (the kernel's
        CHECK_DATA_CORRUPTION). Returns whether it was on the list."""
        if s.on_list:
            self.slab_caches.remove(s)
            s.on_list = False
            return True
        k = self._k
        task = k.current()
        title = f"WARNING: list_del corruption: kmem_cache {s.name} is not on slab_caches"
        stack = k.stacks.capture(2)
        k.findings.report(
            F.ASSERTION, title, "list_del:slab_caches",
            lambda: (banner(title, k) + f"list_del corruption, {s!r}->next is LIST_POISON1 "
                     "(dead000000000100): the cache was unlinked already\nCall Trace:\n"
                     + format_stack(stack)),
            thread=task.name, extra={"cache": s.name})
        return False

    def _release_memcg_params(self, s: KmemCache) -> None:
        """destroy_memcg_params(): the array may still be read lock-free: free it after a
        grace period; the params go with the cache."""
        k = self._k
        p = s.memcg_params
        if p is None:
            return
        if p.is_root_cache and p.memcg_caches is not None:
            arr = p.memcg_caches.protected(True)
            if arr is not None:
                k.rcu.call(k.kasan.free, arr)
        k.kasan.free(p)

    def _report_busy(self, s: KmemCache, busy: list) -> None:
        k = self._k
        task = k.current()
        title = f"kmem_cache_destroy {s.name}: Slab cache still has objects"
        active, total, slabs = self.slub.counts(s)
        stack = k.stacks.capture(2)
        k.findings.report(
            F.SLAB_CACHE_NOT_EMPTY, title, cache_signature(s.name),
            lambda: (banner(title, k) + f"{active} of {total} objects in {slabs} slabs still "
                     f"allocated ({len(busy)} slabs not empty)\nCall Trace:\n"
                     + format_stack(stack)),
            thread=task.name, extra={"cache": s.name, "active_objects": active})

    # ------------------------------------------------------------------ shrink
    def kmem_cache_shrink(self, s: KmemCache) -> int:
        """kmem_cache_shrink(): under the hotplug read lock (and, since 4.x, slab_mutex is not
        needed)."""
        hp = self._k.hotplug
        hp.get_online_cpus()
        try:
            return self.slub.kmem_cache_shrink(s)
        finally:
            hp.put_online_cpus()
            if self._k.config.bug("put_online_cpus_imbalance"):
                hp.put_online_cpus()  # the leaking put of seed 004

    # ------------------------------------------------------------------ alloc / free
    def kmem_cache_alloc(self, s: KmemCache) -> SlabObject:
        return self.slub.slab_alloc(s)

    def kmem_cache_free(self, s: KmemCache, obj: SlabObject) -> None:
        """kmem_cache_free(): cache_from_obj() first: an object of a per-memcg child goes back
        to that child even when freed through its root cache."""
        if s.flags & SLAB_ACCOUNT and self._k.memcg_slab is not None:
            self._k.memcg_slab.kmem_cache_free(s, obj)
            return
        self.free_to_cache(s, obj)

    def free_to_cache(self, s: KmemCache, obj: SlabObject) -> None:
        """cache_from_obj() + slab_free()."""
        if not Kasan.is_freed(obj):
            c = obj.cache
            if c is not s and c.memcg_params is not None and \
                    not c.memcg_params.is_root_cache and c.memcg_params.root_cache is s:
                s = c
        self.slub.slab_free(s, obj)

    # ------------------------------------------------------------------ hotplug
    def slab_cpu_callback(self, event: str, cpu: int) -> None:
        """The slab CPU notifier (cpuup_callback / slub_cpu_dead): takes slab_mutex with the
        hotplug write side held; on CPU death flushes that CPU's slab of every cache."""
        from kmemcg.cpu import DEAD, UP_PREPARE
        if event not in (UP_PREPARE, DEAD):
            return
        with self.slab_mutex:
            if event == DEAD:
                for s in list(self.slab_caches):
                    self.slub.flush_cpu_slab(s, cpu)

    # ------------------------------------------------------------------ listings
    def caches(self) -> list[KmemCache]:
        with self.slab_mutex:
            return list(self.slab_caches)

    def slabinfo(self) -> str:
        """/proc/slabinfo (version 2.1)."""
        out = [self.slabinfo_header()]
        with self.slab_mutex:  # slab_start()/slab_stop(): no cache can be destroyed meanwhile
            for s in self.slab_caches:
                out.append(self.slabinfo_line(s))
        return "".join(out)

    @staticmethod
    def slabinfo_header() -> str:
        """print_slabinfo_header(): also memory.kmem.slabinfo's (kmemcg.mm.memcg_slab)."""
        return ("slabinfo - version: 2.1\n"
                "# name            <active_objs> <num_objs> <objsize> <objperslab> "
                "<pagesperslab> : tunables <limit> <batchcount> <sharedfactor> : slabdata "
                "<active_slabs> <num_slabs> <sharedavail>\n")

    def slabinfo_line(self, s: KmemCache) -> str:
        """cache_show(): one cache's line. Caller holds slab_mutex."""
        active, total, slabs = self.slub.counts(s)
        return (f"{s.name:<17} {active:>6} {total:>6} {s.size:>6} "
                f"{s.objects_per_slab:>4} {1:>4} : tunables {0:>4} {0:>4} "
                f"{0:>4} : slabdata {slabs:>6} {slabs:>6} {0:>6}\n")
