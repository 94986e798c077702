"""Per-memcg kmem caches, the v4 design (3.19-5.2: mm/memcontrol.c + mm/slab_common.c), with
every fix by default (4.18's dying + flush, 5.8's ordering); docs/memcg-eras.md sections 3-4.

This class is also the interface every memcg design implements (the slab layer calls only
these): ``init_memcg_params``, ``slab_alloc`` (slab_pre/post_alloc_hook around the
allocation), ``kmem_cache_free``, ``memcg_charge_slab`` / ``memcg_uncharge_slab`` (per child
slab page), ``memcg_update_all_caches`` (kmem activation), ``memcg_deactivate_kmem_caches``
(offline), ``memcg_destroy_kmem_caches`` (css_free) and ``kmem_cache_destroy`` (an accounted
root). The other eras subclass it (kmemcg.mm.memcg_designs picks one per configuration).

An allocation from a SLAB_ACCOUNT root cache by a task of a kmem-active memcg goes to that
memcg's child of the root cache:

* ``memcg_kmem_get_cache(root)``: the current memcg with a css reference, its child looked up
  lock-free (``cache_from_memcg_idx``); the reference is kept until
  ``memcg_kmem_put_cache()`` after the allocation (so the memcg, and with it the child, cannot
  go away in between: the get_cache/alloc window of seed 002 is closed). On a miss, creation is
  queued on ``memcg_kmem_cache_wq`` and the root cache serves this allocation.
* creation (``memcg_create_kmem_cache``): cpus read lock -> slab_mutex; bail if the memcg is no
  longer kmem-online or the root is dying; bail if another creator won (recheck under
  slab_mutex, 2edefe1155b3); publish the child in the array only once it is complete.
* charging: each slab page of a child pins its memcg (css_get), dropped when the page is freed.
* offline: every child is unpublished under slab_mutex and deactivated: an RCU callback queues
  a work that shrinks it (its empty slabs go, uncharging their pages); the css pin taken for
  that keeps the memcg alive meanwhile. Unless the root is dying.
* the memcg's last reference (no charged page left) frees it, and with it its children
  (``memcg_destroy_kmem_caches``).
* root destroy: once the alias count reaches zero, the root is marked ``dying`` (so nothing new
  is created or deactivated for it, and find_mergeable() no longer offers it), slab_mutex is
  dropped to run rcu_barrier() and flush memcg_kmem_cache_wq (every pending creation and
  deactivation finishes), then the children are shut down with the root.

Lock order: activate_kmem_mutex -> cpu hotplug (read) -> slab_mutex; the workqueue's works
take cpu hotplug -> slab_mutex, so it is never flushed with either held.

Bug switches restored here: ``get_cache_without_reference`` (9; the css reference is dropped
at once, as before 3.19), ``free_path_touches_cache_after_uncharge`` (10),
``root_destroy_without_flush`` (11; 4.11-4.17) and ``dying_set_before_alias_check`` (17;
4.18-5.7: dying set and the flush done before the alias check).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from kmemcg.mm.memcontrol import KMEM_ONLINE, MemcgCacheParams
from kmemcg.mm.slab_common import DestroyLocks
from kmemcg.mm.slub import SLAB_ACCOUNT, KmemCache, SlabObject
from kmemcg.workqueue import Work, queue_work

if TYPE_CHECKING:
    from kmemcg.kernel import Kernel
    from kmemcg.mm.memcontrol import MemCgroup
    from kmemcg.mm.page_alloc import Page


def is_child(s: KmemCache) -> bool:
    p = s.memcg_params
    return p is not None and not p.is_root_cache


class MemcgSlab:
    """``k.memcg_slab``."""

    # 3.13 kept an offline memcg's kmemcg_id until css_free (its dead children keep their
    # slots); later designs give it back at offline
    kmemcg_id_freed_at_css_free = False

    def __init__(self, k: Kernel) -> None:
        self._k = k
        self.wq = k.create_workqueue("memcg_kmem_cache", max_active=1)
        self.nr_created = 0
        self.nr_deactivated = 0

    # ------------------------------------------------------------------ slab hooks
    def init_memcg_params(self, s: KmemCache) -> None:
        """A new root cache (slab_mutex held): its array of per-memcg children."""
        self._k.memcg.init_memcg_params(s)

    def slab_alloc(self, s: KmemCache) -> SlabObject:
        """An allocation from accounted root ``s``: slab_pre_alloc_hook() picks the cache,
        slab_post_alloc_hook() drops what the pick pinned."""
        slub = self._k.slab.slub
        c = self.memcg_kmem_get_cache(s)
        if c is s:
            return slub.slab_alloc_node(s)
        self._k.window("memcg_kmem_get_cache:returned")
        obj = slub.slab_alloc_node(c)  # an oops here (bug 9) kills the task: no put after it
        self.memcg_kmem_put_cache(c)
        return obj

    def kmem_cache_free(self, s: KmemCache, obj: SlabObject) -> None:
        self._k.slab.free_to_cache(s, obj)

    def memcg_charge_slab(self, s: KmemCache, page: Page) -> None:
        """A new slab page of child ``s``: it pins the memcg (css_get_many in try_charge)."""
        self._k.memcg.css_get(s.memcg_params.memcg)

    def memcg_uncharge_slab(self, s: KmemCache, page: Page) -> None:
        """The page is gone: unpin the memcg. The last access to ``s`` unless bug 10 is on."""
        k = self._k
        memcg = s.memcg_params.memcg
        k.memcg.css_put(memcg)
        if k.config.bug("free_path_touches_cache_after_uncharge"):
            k.window("memcg_uncharge_slab:after_put")
            s.nr_partial  # noqa: B018  stat(s, FREE_SLAB) after the put that allowed the free

    def kmem_cache_alias(self, s: KmemCache) -> bool:
        """__kmem_cache_alias(): kmem_cache_create() merges into root ``s`` (slab_mutex held).
        False: ``s`` may not be used (the caller creates a new cache instead)."""
        s.alias_count += 1
        return True

    def memcg_update_all_caches(self, num: int) -> int:
        """kmem activation grew the ids (caller holds activate_kmem_mutex). 0, or a negative
        errno (only designs that model the allocation's failure return one)."""
        self._k.memcg.memcg_update_all_caches(num)
        return 0

    def memcg_online_kmem(self, m: MemCgroup) -> None:
        """kmem activation of ``m`` (activate_kmem_mutex held), before it is marked
        KMEM_ONLINE: nothing here (5.9 allocates the memcg's obj_cgroup)."""

    def memcg_free_page_obj_cgroups(self, page: Page) -> None:
        """A root cache's slab page that carries ``memcg_data`` is freed (5.9's
        uncharge_slab_page(), before the page goes back): no design but 5.9 sets one."""
        page.memcg_data = None

    # ------------------------------------------------------------------ lookup
    def memcg_kmem_bypass(self, s: KmemCache) -> bool:
        """What opens every era's get_cache: only an accounted root cache, allocated from by a
        task of a memcg other than the root, goes to a per-memcg child."""
        p = s.memcg_params
        if not s.flags & SLAB_ACCOUNT or p is None or not p.is_root_cache:
            return True
        memcg = self._k.current().memcg
        return memcg is None or memcg is self._k.memcg.root

    def memcg_kmem_get_cache(self, s: KmemCache) -> KmemCache:
        """The cache to allocate from: the current memcg's child of root ``s``, holding a
        reference on its memcg until memcg_kmem_put_cache(); else ``s``."""
        if self.memcg_kmem_bypass(s):
            return s
        k = self._k
        mc = k.memcg
        memcg = mc.get_mem_cgroup_from_current()
        kid = memcg.kmemcg_id
        if kid >= 0:
            c = mc.cache_from_memcg_idx(s, kid)
            # Still online after the lookup, so kid was still ours when we read the slot (the
            # model gives an offline memcg's id back at once: another memcg's child may sit
            # there by now, and put_cache would drop a reference on that other memcg).
            if c is not None and memcg.kmem_state == KMEM_ONLINE:
                if k.config.bug("get_cache_without_reference"):
                    mc.css_put(memcg)  # before 3.19: nothing holds the child meanwhile
                return c  # the css reference goes with it
            if memcg.kmem_state == KMEM_ONLINE:
                self.memcg_schedule_kmem_cache_create(memcg, s)
        mc.css_put(memcg)
        return s

    def memcg_kmem_put_cache(self, c: KmemCache) -> None:
        if is_child(c) and not self._k.config.bug("get_cache_without_reference"):
            self._k.memcg.css_put(c.memcg_params.memcg)

    # ------------------------------------------------------------------ creation
    def memcg_schedule_kmem_cache_create(self, memcg: MemCgroup, root: KmemCache) -> None:
        self._k.memcg.css_get(memcg)  # the work's reference on the memcg
        queue_work(self.wq, Work(self._create_func, memcg, root,
                                 name="memcg_kmem_cache_create_func"))

    def _create_func(self, memcg: MemCgroup, root: KmemCache) -> None:
        try:
            self.memcg_create_kmem_cache(memcg, root)
        finally:
            self._k.memcg.css_put(memcg)

    def memcg_create_kmem_cache(self, memcg: MemCgroup, root: KmemCache) -> KmemCache | None:
        k = self._k
        sl = k.slab
        with sl.cpus_and_slab_mutex():
            rp = root.memcg_params
            if memcg.kmem_state != KMEM_ONLINE or self.root_dying(root):
                return None  # offline meanwhile, or the root is being destroyed
            idx = memcg.kmemcg_id
            arr = rp.memcg_caches.protected(sl.slab_mutex)
            if arr.entries[idx] is not None:
                return None  # several creators race; one won (2edefe1155b3)
            c = self.alloc_child_cache(root, memcg, memcg.serial)
            c.memcg_params = self.init_child_params(c, memcg, root)
            rp.children.append(c)
            memcg.kmem_caches.append(c)
            sl.slab_caches.append(c)
            c.on_list = True
            k.window("memcg_create_kmem_cache:before_publish")
            arr.entries[idx] = c  # published complete: readers take it lock-free
            self.nr_created += 1
            k.event("memcg_cache_create", c)
            return c

    def alloc_child_cache(self, root: KmemCache, memcg: MemCgroup, tag: int) -> KmemCache:
        """The kmem_cache of a new child of ``root`` for ``memcg``, named "root(tag:memcg)"
        as memcg_create_cache_name() does, allocated (for KASAN) from the kmem_cache cache."""
        k = self._k
        c = KmemCache(k, f"{root.name}({tag}:{memcg.name})", root.object_size, root.size,
                      root.align, root.flags, root.ctor)
        k.kasan.alloc(c, "kmem_cache", "the kmem_cache cache")
        return c

    def init_child_params(self, c: KmemCache, memcg: MemCgroup,
                          root: KmemCache) -> MemcgCacheParams:
        """init_memcg_params() of a new child ``c`` (slab_mutex held)."""
        cp = MemcgCacheParams(False)
        self._k.kasan.alloc(cp, "memcg_cache_params", f"the cache {c.name}")
        cp.memcg, cp.root_cache = memcg, root
        return cp

    def root_dying(self, root: KmemCache) -> bool:
        """Caller holds slab_mutex: is ``root`` being destroyed (no new child for it)?"""
        return root.memcg_params.dying

    # ------------------------------------------------------------------ offline
    def memcg_deactivate_kmem_caches(self, memcg: MemCgroup) -> None:
        """At offline: unpublish every child of ``memcg`` and deactivate it."""
        with self._k.slab.cpus_and_slab_mutex():
            for p, arr, idx, c in self.memcg_slots(memcg):
                arr.entries[idx] = None
                if not p.dying:
                    self.slab_deactivate_memcg_cache_rcu_sched(c, memcg)

    def memcg_slots(self, memcg: MemCgroup) -> Iterator[tuple[Any, Any, int, KmemCache]]:
        """Caller holds slab_mutex: (root params, array, index, child) for every root cache
        with a child published in ``memcg``'s slot."""
        sl = self._k.slab
        idx = memcg.kmemcg_id
        for s in list(sl.slab_caches):
            p = s.memcg_params
            if p is None or not p.is_root_cache:
                continue
            arr = p.memcg_caches.protected(sl.slab_mutex)
            c = arr.entries[idx] if 0 <= idx < len(arr.entries) else None
            if c is not None:
                yield p, arr, idx, c

    def slab_deactivate_memcg_cache_rcu_sched(self, c: KmemCache, memcg: MemCgroup) -> None:
        """Caller holds slab_mutex: deactivate child ``c`` after a grace period."""
        c.memcg_params.deact_queued = True  # the kernel's deact_fn, set here too
        self._k.memcg.css_get(memcg)  # pin memcg so that c doesn't go meanwhile
        self._k.rcu.call(self._deactivate_rcufn, c)

    def offline_children_not_deactivated(self, min_age: float = 0.0) -> list[KmemCache]:
        """An invariant of this design, for the leak check: once a memcg is offline, each of
        its children was deactivated (its deactivation queued: deact_fn set). Only a root
        being destroyed skips it (it shuts the child down itself); a child skipped otherwise
        keeps its empty slabs, and they pin the memcg until the root goes (catalog bug 17 in
        4.18-5.2: a root left dying by the destroy of one of its aliases). Designs with
        another lifecycle override this or return nothing.

        ``min_age``: kmemleak's minimum age, for a scan while the kernel runs: only children
        whose memcg finished its offline at least that many seconds ago, and none whose root
        has a kmem_cache_destroy() in progress (0: the caller quiesced the kernel)."""
        if type(self).memcg_deactivate_kmem_caches is not MemcgSlab.memcg_deactivate_kmem_caches:
            return []  # another design's offline: not this invariant
        sl = self._k.slab
        now = time.monotonic()
        with sl.slab_mutex:
            return [c for c in sl.slab_caches if is_child(c) and not c.memcg_params.deact_queued
                    and not c.memcg_params.memcg.online
                    and self._aged(c, c.memcg_params.memcg.offline_at, min_age, now)]

    def _aged(self, c: KmemCache, since: float | None, min_age: float, now: float) -> bool:
        """Caller holds slab_mutex: is child ``c``, offline ``since`` then, old enough to be
        reported by a scan with ``min_age`` (see offline_children_not_deactivated)?"""
        if min_age <= 0:
            return True
        return since is not None and now - since >= min_age and \
            not self._k.slab.destroy_in_progress(c.memcg_params.root_cache)

    def _deactivate_rcufn(self, c: KmemCache) -> None:
        queue_work(self.wq, Work(self._deactivate_workfn, c, name="kmemcg_deactivate_workfn"))

    def _deactivate_workfn(self, c: KmemCache) -> None:
        """kmemcg_deactivate_workfn -> __kmem_cache_shrink: the child's empty slabs go."""
        k = self._k
        with k.slab.cpus_and_slab_mutex():
            k.slab.slub.kmem_cache_shrink(c)  # deact_fn(s): flush_all -> has_cpu_slab(c)
            self.nr_deactivated += 1
        # done: put the pin taken at deactivation (read only now, as the kernel does; the
        # pin is what keeps c alive until here)
        k.memcg.css_put(c.memcg_params.memcg)

    # ------------------------------------------------------------------ root destroy
    def kmem_cache_destroy(self, s: KmemCache) -> None:
        """kmem_cache_destroy() of an accounted root: once the alias count reaches zero, mark
        it ``dying`` (nothing is created, deactivated or merged for it any more), flush the
        memcg side with no lock held (its works take them), then shut the children down with
        the root (shutdown_memcg_caches)."""
        k = self._k
        cfg = k.config
        sl = k.slab
        if cfg.bug("dying_set_before_alias_check"):
            # 4.18-5.7: flush_memcg_workqueue() first, whatever the alias count
            self.memcg_set_kmem_cache_dying(s, locked=False)
            k.window("kmem_cache_destroy:dying_set")
            self.flush_memcg_workqueue(s)
        with DestroyLocks(sl) as held:
            s.alias_count -= 1
            if s.alias_count:
                return
            sl.alias_race_window(held)
            if not cfg.bug("dying_set_before_alias_check") and \
                    not cfg.bug("root_destroy_without_flush"):
                # d38a2b7a9c93: dying only once the last alias goes; flush with no lock held
                self.memcg_set_kmem_cache_dying(s, locked=True)
                held.drop_all()
                k.window("kmem_cache_destroy:flush")
                self.flush_memcg_workqueue(s)
                held.take_all()
            ok, children = self.shutdown_memcg_caches(s)
            held.after_unlock(lambda: self.release(children))
            if not ok:  # a child still has objects (reported): the root stays
                s.alias_count += 1
                return
            sl.shutdown_cache(s, held)

    def memcg_set_kmem_cache_dying(self, s: KmemCache, locked: bool) -> None:
        """Mark root ``s`` dying: 4.18 under slab_mutex (``locked``: the caller holds it)."""
        if locked:
            s.memcg_params.dying = True
        else:
            with self._k.slab.slab_mutex:
                s.memcg_params.dying = True

    # ------------------------------------------------------------------ destruction
    def memcg_destroy_kmem_caches(self, memcg: MemCgroup) -> None:
        """css_free: the memcg has no charged page left, so its children are empty."""
        with self._k.slab.cpus_and_slab_mutex():
            gone = [c for c in list(memcg.kmem_caches) if self._shutdown_child(c)]
        self._release(gone)

    def _shutdown_child(self, c: KmemCache) -> bool:
        """Caller holds slab_mutex. Shut child ``c`` down and unlink it; False if busy."""
        sl = self._k.slab
        busy = sl.slub.kmem_cache_shutdown(c)
        if busy:
            sl._report_busy(c, busy)
            return False
        p = c.memcg_params
        if c in p.root_cache.memcg_params.children:
            p.root_cache.memcg_params.children.remove(c)
        if c in p.memcg.kmem_caches:
            p.memcg.kmem_caches.remove(c)
        arr = p.root_cache.memcg_params.memcg_caches.protected(sl.slab_mutex)
        for i, e in enumerate(arr.entries):
            if e is c:
                arr.entries[i] = None
        sl.slab_caches.remove(c)
        c.on_list = False
        return True

    def _release(self, gone: list[KmemCache]) -> None:
        k = self._k
        if any(c.typesafe for c in gone):
            k.rcu.barrier()  # their pending rcu_free_slab() callbacks read them
        for c in gone:
            k.event("cache_destroy", c)
            k.kasan.free(c.memcg_params)
            k.kasan.free(c)

    # ------------------------------------------------------------------ listings
    def memcg_slabinfo(self, memcg: MemCgroup) -> str:
        """memory.kmem.slabinfo (memcg_slab_show): /proc/slabinfo's header, then one line per
        child cache of ``memcg`` (memcg->kmem_caches, under slab_mutex)."""
        sl = self._k.slab
        out = [sl.slabinfo_header()]
        with sl.slab_mutex:
            for c in memcg.kmem_caches:
                out.append(sl.slabinfo_line(c))
        return "".join(out)

    def flush_memcg_workqueue(self, s: KmemCache) -> None:
        """After ``s.memcg_params.dying`` was set: run every pending RCU callback (they queue
        deactivation works) and every queued creation or deactivation."""
        self._k.rcu.barrier()
        self.wq.flush()

    def shutdown_memcg_caches(self, s: KmemCache) -> tuple[bool, list[KmemCache]]:
        """Caller holds slab_mutex; ``s`` is a root whose alias count reached zero. Shut down
        and unlink every child (published or deactivated). Returns whether all were empty,
        and the unlinked ones, which the caller frees with :meth:`release` once slab_mutex
        is dropped."""
        gone, ok = [], True
        for c in list(s.memcg_params.children):
            if self._shutdown_child(c):
                gone.append(c)
            else:
                ok = False
        return ok, gone

    def release(self, gone: list[KmemCache]) -> None:
        """Free children that shutdown_memcg_caches() unlinked (no lock held)."""
        self._release(gone)
