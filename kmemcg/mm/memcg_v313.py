"""Per-memcg kmem caches, the v3.13 design (3.8-3.15: mm/memcontrol.c, mm/slab_common.c,
mm/slab.h of 3.12/3.13); docs/memcg-eras.md sections 1 and 7.

* lookup (``__memcg_kmem_get_cache``): lock-free under rcu_read_lock(); a hit takes no
  reference of any kind (bug 9); a miss takes css_tryget() and queues a creation work on the
  *system* workqueue (several creators for one slot may run at once).
* creation (``memcg_create_kmem_cache`` under the global ``memcg_cache_mutex``): check the slot,
  ``kmem_cache_create_memcg`` (cpus -> slab_mutex; slab_caches; ``memcg_cache_list_add`` takes
  the memcg's ``slab_caches_mutex``), publish the slot. The child keeps the css reference.
* charging per page: ``nr_pages`` of the child (memcg_bind_pages / memcg_release_pages from
  the slab page hooks); pages do not pin the css, the child does.
* offline (``mem_cgroup_destroy_all_caches``): under ``slab_caches_mutex`` every child is
  marked ``dead`` and its destroy work queued; the work (``kmem_cache_destroy_work_func``)
  shrinks a child that still has pages, destroys an empty one.
* child destroy: ``memcg_release_cache`` clears the slot, unlinks from the memcg's list under
  ``slab_caches_mutex``, drops the css reference (so css_free comes after the children).
* root destroy: ``kmem_cache_destroy_memcg_children`` under activate_kmem_mutex (standing for
  set_limit_mutex): per slot dead = false, cancel_work_sync(destroy), kmem_cache_destroy(child).

Locks: memcg_cache_mutex -> cpus -> slab_mutex -> memcg::slab_caches_mutex (one lockdep class
for every memcg's mutex, as the kernel's single mutex_init site); activate_kmem_mutex ->
slab_mutex (relocation, memcg_update_all_caches), activate_kmem_mutex -> memcg_cache_mutex
(root destroy, fixed form of bug 14). Relocation (``memcg_update_cache_size``) publishes the
new array *empty*, then copies the old slots, then frees the old array. Its kzalloc() may
fail (``k.should_failslab``): the walk stops, the activation fails with -ENOMEM, and the next
one relocates every cache again, as 3.13 compares with the global size.

Bug switches, each where its fix changed the code: ``memcg_create_without_slab_mutex_recheck``
(7; fix 2edefe1155b3: check + publish / clear under slab_mutex), ``memcg_params_freed_without_rcu``
(13; fix f8570263ee16: kfree_rcu), ``destroy_work_scheduled_twice`` (8), ``get_cache_without_
reference`` (9), ``free_path_touches_cache_after_uncharge`` (10),
``cancel_work_sync_self_freeing_work`` (14), ``children_destroyed_before_alias_check`` (15;
fix b8529907ba35) and the what-if ``shrink_under_slab_caches_mutex`` (6).

Where the model differs (fixed forms of bugs that were fixed only by a later redesign):

* bug 8 off (no kernel fix: 3.16 removed the path, Davydov's 02/12 used a refcount): the
  freer drops nr_pages, checks ``dead`` and queues the work in one section of the child's
  lock; the destroy decision (nr_pages == 0, nobody pins it, then ``destroying``) takes the
  same lock and cancels an instance queued before it, so the freer never sees a freed child
  and no instance runs after the destroy.
* bug 9 off: the lookup pins the child it returns (``users``, taken under the child's lock
  unless the child is being destroyed) until ``memcg_kmem_put_cache``, which queues the
  destroy work of a dead child it was the last to hold; the destroy work leaves a pinned
  child alone; a destroyed child is freed a grace period after its slot was cleared, so a
  lookup that read the slot under rcu_read_lock() may still take the lock.
  (3.19 kept a css reference instead, but destroyed the children at css_free; in this era
  the child pins the css itself, so only a pin on the child closes the window.)
* bug 14 off: the 3.16 fix in miniature: the destroy work runs under memcg_cache_mutex (for
  memcg_slab_mutex) and returns when ``dead`` was cleared; the root destroy loads the slot and
  clears ``dead`` under the same mutex, so it never loads a child the work is destroying.
* bug 15 off: the root is marked ``dying`` while slab_mutex is dropped for the children, so
  find_mergeable() does not offer it meanwhile (the 3.16-3.18 alias race stays bug 5's).
* A creation queued before the offline and run after it: 3.13 never marked that child dead,
  so it pinned the memcg until its root was destroyed [I in the research note]; the model
  marks it dead when it joins the memcg's list after the offline walked it, and queues its
  destroy work once it is published.
* The kmemcg_id is given back at css_free (3.13's disarm_kmem_keys), since dead children keep
  their slots until they are destroyed.
* Bug 7's outcomes are reported by model checks that always run: the fix's VM_BUG_ONs (slot
  already set at publish, slot not ours at clear) as ASSERTION findings, and
  :meth:`leaked_children` (children on slab_caches but in no slot) as MEMLEAK at root destroy;
  its destroy half (a relocation copies a slot between the unlocked clear's load and store)
  leaves a freed child published, which KASAN reports at the next lookup.
* A queued creation holds no reference on its root, so a root destroyed meanwhile is read by
  the work: bug 11's creation half, real in this era. The catalog declares bug 11 for the v4
  designs only; this design honours its switch (``root_destroy_without_flush``) and otherwise
  waits for the root's queued creations (no lock held) before reaping the children, as 4.18's
  flush did.
"""

from __future__ import annotations

from errno import ENOMEM
from typing import TYPE_CHECKING, Any

from kmemcg.core import findings as F
from kmemcg.core.report import banner
from kmemcg.core.stacks import format_stack
from kmemcg.mm.memcg_slab import MemcgSlab, is_child
from kmemcg.mm.memcontrol import MemcgCacheArray, MemcgCacheParams
from kmemcg.mm.slab_common import DestroyLocks
from kmemcg.mm.slub import KmemCache
from kmemcg.workqueue import Work, queue_work
from kmemcg.workqueue.api import cancel_work, cancel_work_sync, flush_work

if TYPE_CHECKING:
    from kmemcg.kernel import Kernel
    from kmemcg.mm.memcontrol import MemCgroup
    from kmemcg.mm.page_alloc import Page


class MemcgV313State:
    """The 3.13 kmem part of struct mem_cgroup: ``slab_caches_mutex`` guards the memcg's list
    of child caches (``MemCgroup.kmem_caches`` stands for memcg_slab_caches)."""

    __slots__ = ("slab_caches_mutex", "dead")

    def __init__(self, k: Kernel) -> None:
        self.slab_caches_mutex = k.mutex("memcg->slab_caches_mutex")
        self.dead = False  # its caches were marked dead at offline (slab_caches_mutex)


class ChildParamsV313(MemcgCacheParams):
    """A child's struct memcg_cache_params (3.13): ``dead`` (plain bool, no lock),
    ``nr_pages`` (atomic_t: ``lock`` is a raw lock standing for the atomic op), the ``destroy``
    work. ``users`` (lookups holding it) and ``destroying`` (the destroy decision was taken)
    serve the model's fixed forms of bugs 8 and 9, under ``lock`` (see the module doc)."""

    __slots__ = ("dead", "nr_pages", "destroy", "lock", "users", "destroying")

    def __init__(self, k: Kernel) -> None:
        super().__init__(False)
        self.dead = False
        self.nr_pages = 0
        self.destroy: Work | None = None
        self.lock = k.raw_lock()
        self.users = 0
        self.destroying = False


class MemcgSlabV313(MemcgSlab):
    """``k.memcg_slab`` for config.memcg == "v3.13"."""

    kmemcg_id_freed_at_css_free = True  # read by memcontrol.memcg_offline_kmem

    def __init__(self, k: Kernel) -> None:
        super().__init__(k)
        self.wq = k.system_wq  # creation and destroy works run on system_wq (schedule_work)
        self.memcg_cache_mutex = k.mutex("memcg_cache_mutex")
        self._state_lock = k.raw_lock()  # lazy per-memcg state (creation of the fields)
        # Model bookkeeping (not kernel state): the creation works queued per root, so that
        # the root destroy can wait for them (_flush_creations). Raw lock, never held across
        # a blocking call.
        self._cw_lock = k.raw_lock()
        self._create_works: dict[int, list[Work]] = {}
        self.nr_destroyed = 0

    # ------------------------------------------------------------------ per-memcg state
    def state(self, memcg: MemCgroup) -> MemcgV313State:
        st = memcg.design
        if st is None:
            with self._state_lock:
                if memcg.design is None:
                    memcg.design = MemcgV313State(self._k)
                st = memcg.design
        return st

    # ------------------------------------------------------------------ charging
    def memcg_charge_slab(self, s: KmemCache, page: Page) -> None:
        """memcg_bind_pages(): a new slab page of child ``s``."""
        p = s.memcg_params
        with p.lock:
            p.nr_pages += 1

    def memcg_uncharge_slab(self, s: KmemCache, page: Page) -> None:
        """__free_slab() -> memcg_release_pages(); bug 10: the free path then still touches
        the cache."""
        k = self._k
        self.memcg_release_pages(s, 1)
        if k.config.bug("free_path_touches_cache_after_uncharge"):
            k.window("memcg_uncharge_slab:after_put")
            s.nr_partial  # noqa: B018  stat(s, FREE_SLAB) after the count allowed the free

    def memcg_release_pages(self, s: KmemCache, n: int) -> None:
        """atomic_sub_and_test(nr_pages); historically (bug 8) the freer of a dead child's last
        page then schedules its destruction, reading the child meanwhile destroyed."""
        k = self._k
        p = s.memcg_params
        if k.config.bug("destroy_work_scheduled_twice"):
            with p.lock:
                p.nr_pages -= n
                zero = p.nr_pages == 0
            if zero:
                k.window("memcg_release_pages:after_sub")
                self.mem_cgroup_destroy_cache(s)
            return
        # Model fix: the sub, the dead check and the queueing in one section of the child's
        # lock, which the destroy decision takes too: no destroyer can free s before we
        # leave it, and nothing is queued once it decided (it cancels what was queued).
        with p.lock:
            p.nr_pages -= n
            self._queue_destroy_locked(p)
        k.window("memcg_release_pages:after_sub")

    def _queue_destroy_locked(self, p: ChildParamsV313) -> None:
        """Caller holds ``p.lock``: queue the dead child's destroy work if nothing holds the
        child any more (schedule_work() from a spinlock section is fine)."""
        if p.nr_pages == 0 and p.users == 0 and p.dead and not p.destroying \
                and not p.destroy.pending:
            queue_work(self._k.system_wq, p.destroy)

    def mem_cgroup_destroy_cache(self, c: KmemCache) -> None:
        p = c.memcg_params
        if not p.dead:
            return
        if p.destroy.pending:  # work_pending(): false while it runs, so a shrink re-queues
            return
        queue_work(self._k.system_wq, p.destroy)

    # ------------------------------------------------------------------ relocation
    def memcg_update_all_caches(self, num: int) -> int:
        """memcg_update_all_caches(): caller holds activate_kmem_mutex (set_limit_mutex).
        0, or -ENOMEM when a relocation's allocation failed: the caches relocated before it
        keep their bigger arrays, and memcg_limited_groups_array_size stays, so the next
        activation relocates every cache again."""
        k = self._k
        sl = k.slab
        # mutex_lock() may sleep: lock-free readers go on with the arrays about to go
        self._k.window("memcg_update_all_caches:begin")
        with sl.slab_mutex:
            # Oldest root first. 3.13 list_add()s a new cache at the head of slab_caches, so
            # its walk meets the newest first; in the model that hides bug 7 (the creations
            # it races are for the long-lived roots): 2/75 relocations won against 20/73
            # (session 13, BENCHMARKS.md). Either order lets the race happen; this one, more.
            for s in sl.slab_caches:
                p = s.memcg_params
                if p is not None and p.is_root_cache:
                    err = self.memcg_update_cache_size(s, num)
                    if err:
                        return err
            k.memcg.nr_cache_ids = num
        return 0

    def memcg_update_cache_size(self, s: KmemCache, num: int) -> int:
        """Caller holds slab_mutex. The new array is published empty, then filled. Compares
        with the global size, as 3.13 does, not with this cache's array: after a failed
        activation the caches it relocated are relocated again."""
        k = self._k
        ptr = s.memcg_params.memcg_caches
        old = ptr.protected(k.slab.slab_mutex)
        if num <= k.memcg.nr_cache_ids:
            return 0
        if k.should_failslab("memcg_update_cache_size"):  # kzalloc(size, GFP_KERNEL)
            return -ENOMEM
        new = MemcgCacheArray(num)
        k.kasan.alloc(new, "memcg_cache_array", f"the memcg_params of {s.name}")
        ptr.assign(new)  # s->memcg_params = new_params, before the copy
        k.window("memcg_update_cache_size:published_empty")
        for i, c in enumerate(old.entries):
            if c is not None:
                new.entries[i] = c
        k.window("memcg_update_cache_size:before_free")
        if k.config.bug("memcg_params_freed_without_rcu"):
            k.kasan.free(old)  # kfree(cur_params) with lock-free readers inside
        else:
            k.rcu.call(k.kasan.free, old)  # kfree_rcu (f8570263ee16)
        return 0

    # ------------------------------------------------------------------ lookup
    def memcg_kmem_get_cache(self, s: KmemCache) -> KmemCache:
        """__memcg_kmem_get_cache()."""
        if self.memcg_kmem_bypass(s):
            return s
        k = self._k
        mc = k.memcg
        task = k.current()
        with k.rcu.read():
            memcg = mc.mem_cgroup_from_task(task)
            idx = memcg.kmemcg_id
            if idx < 0:  # !memcg_can_account_kmem()
                return s
            c = mc.cache_from_memcg_idx(s, idx)
            if c is not None:
                if k.config.bug("get_cache_without_reference"):
                    return c  # the era: nothing holds c until the allocation
                cp = c.memcg_params
                with cp.lock:
                    if not cp.destroying:
                        cp.users += 1
                        return c
                return s  # being destroyed: the root serves this one
            if not mc.css_tryget_online(memcg):
                return s
        self.memcg_create_cache_enqueue(memcg, s)
        return s

    def memcg_kmem_put_cache(self, c: KmemCache) -> None:
        if is_child(c) and not self._k.config.bug("get_cache_without_reference"):
            p = c.memcg_params
            with p.lock:
                p.users -= 1
                # A dead child allocated from after its offline shrink: its cpu slab would
                # keep a page (and the memcg) for good; the work shrinks it again, and the
                # last freed page then queues the destroy.
                if p.users == 0 and p.dead and not p.destroying and not p.destroy.pending:
                    queue_work(self._k.system_wq, p.destroy)

    # ------------------------------------------------------------------ creation
    def memcg_create_cache_enqueue(self, memcg: MemCgroup, root: KmemCache) -> None:
        """The caller's css reference travels with the work (kmalloc'ed create_work)."""
        me: list[Work] = []
        w = Work(self.memcg_create_cache_work_func, memcg, root, me,
                 name="memcg_create_cache_work_func")
        me.append(w)
        with self._cw_lock:
            self._create_works.setdefault(id(root), []).append(w)
        queue_work(self._k.system_wq, w)

    def memcg_create_cache_work_func(self, memcg: MemCgroup, root: KmemCache,
                                     me: list[Work]) -> None:
        try:
            self.memcg_create_kmem_cache(memcg, root)
        finally:
            with self._cw_lock:
                ws = self._create_works.get(id(root))
                if ws is not None:
                    _remove(ws, me[0])
                    if not ws:
                        del self._create_works[id(root)]

    def memcg_create_kmem_cache(self, memcg: MemCgroup, root: KmemCache) -> KmemCache | None:
        k = self._k
        bug7 = k.config.bug("memcg_create_without_slab_mutex_recheck")
        idx = memcg.kmemcg_id
        with self.memcg_cache_mutex:
            if bug7:
                rp = root.memcg_params
                arr = rp.memcg_caches.dereference(self.memcg_cache_mutex)
                if arr.entries[idx] is not None:
                    k.memcg.css_put(memcg)
                    return None
                k.window("memcg_create_kmem_cache:checked")
            new = self.kmem_cache_create_memcg(memcg, root, idx)
            if new is None:
                k.memcg.css_put(memcg)  # another creator won (checked under slab_mutex)
                return None
            if bug7:
                # cachep->memcg_params->memcg_caches[idx] = new, under memcg_cache_mutex only:
                # a load of the array, then a store into it. A relocation that took slab_mutex
                # as kmem_cache_create_memcg() dropped it may copy the loaded array in between:
                # the store lands in the old array, and the new one's slot stays empty (lost)
                arr = root.memcg_params.memcg_caches.dereference(self.memcg_cache_mutex)
                k.window("memcg_create_kmem_cache:publish")
                self._publish(root, arr, idx, new)
            p = new.memcg_params
            if p.dead:  # born dead: destroy it now that it is published (model, see doc)
                with p.lock:
                    self._queue_destroy_locked(p)
            return new  # the child keeps the css reference

    def kmem_cache_create_memcg(self, memcg: MemCgroup, root: KmemCache,
                                idx: int) -> KmemCache | None:
        """cpus -> slab_mutex; with the fix (2edefe1155b3) the slot is checked and published
        here, under slab_mutex (memcg_register_cache)."""
        k = self._k
        sl = k.slab
        bug7 = k.config.bug("memcg_create_without_slab_mutex_recheck")
        with sl.cpus_and_slab_mutex():
            rp = root.memcg_params
            arr = None
            if not bug7:
                arr = rp.memcg_caches.protected(sl.slab_mutex)
                if arr.entries[idx] is not None:
                    return None
                k.window("memcg_create_kmem_cache:checked")
            c = self.alloc_child_cache(root, memcg, memcg.serial)
            # __kmem_cache_create(): kmem_cache_open() and sysfs_slab_add() allocate and may
            # sleep with slab_mutex held, so an activation often waits here for slab_mutex and
            # gets it as the creator drops it, just before the creator's publish (bug 7)
            k.window("kmem_cache_create_memcg:sysfs_slab_add")
            cp = ChildParamsV313(k)
            k.kasan.alloc(cp, "memcg_cache_params", f"the cache {c.name}")
            cp.memcg, cp.root_cache = memcg, root
            cp.destroy = Work(self.kmem_cache_destroy_work_func, c,
                              name="kmem_cache_destroy_work_func")
            c.memcg_params = cp
            rp.children.append(c)
            sl.slab_caches.append(c)
            c.on_list = True
            self.memcg_cache_list_add(memcg, c)
            if arr is not None:
                self._publish(root, arr, idx, c)
            self.nr_created += 1
            k.event("memcg_cache_create", c)
            return c

    def memcg_cache_list_add(self, memcg: MemCgroup, c: KmemCache) -> None:
        st = self.state(memcg)
        with st.slab_caches_mutex:
            memcg.kmem_caches.append(c)
            if st.dead:  # created by a work queued before the offline walked the list
                c.memcg_params.dead = True

    def _publish(self, root: KmemCache, arr: MemcgCacheArray, idx: int, c: KmemCache) -> None:
        """The slot store, with the fix's VM_BUG_ON(slot already set) as a model check."""
        old = arr.entries[idx]
        if old is not None:
            self._assertion(f"kernel BUG at mm/memcontrol.c: memcg_caches[{idx}] of "
                            f"{root.name} already set", "memcg_register_cache:slot_set",
                            f"publishing {c.name} over {old.name}: {old.name} is now on "
                            "slab_caches and its memcg's list but in no slot\n")
        arr.entries[idx] = c

    # ------------------------------------------------------------------ offline
    def memcg_deactivate_kmem_caches(self, memcg: MemCgroup) -> None:
        """mem_cgroup_destroy_all_caches(): mark every child dead and queue its destroy work
        (bug 6: shrink / destroy them right here, under slab_caches_mutex)."""
        k = self._k
        st = self.state(memcg)
        bug8 = k.config.bug("destroy_work_scheduled_twice")
        with st.slab_caches_mutex:
            st.dead = True
            for c in list(memcg.kmem_caches):
                p = c.memcg_params
                p.dead = True
                # a freer may see dead now, free the last page and queue the destroy first
                k.window("memcg_deactivate_kmem_caches:dead")
                if k.config.bug("shrink_under_slab_caches_mutex"):
                    if p.nr_pages:
                        k.slab.kmem_cache_shrink(c)
                    else:
                        self.kmem_cache_destroy_memcg(c)
                elif bug8:
                    queue_work(k.system_wq, p.destroy)
                else:
                    # Model fix, the free path's: a child whose destroyer already decided
                    # (the last freer queued the work as dead was set) is left alone. It is
                    # still on this list, which it leaves only after that decision, and a
                    # work queued now would run after the one destroying it, on freed memory.
                    with p.lock:
                        if not p.destroying:
                            queue_work(k.system_wq, p.destroy)

    def kmem_cache_destroy_work_func(self, c: KmemCache) -> None:
        k = self._k
        fixed14 = not k.config.bug("cancel_work_sync_self_freeing_work")
        if fixed14:
            self.memcg_cache_mutex.lock()
        try:
            p = c.memcg_params
            if fixed14 and not p.dead:
                return  # the root destroy took the child over
            nr = p.nr_pages
            k.window("kmem_cache_destroy_work_func:nr_pages")
            if nr != 0:
                k.slab.kmem_cache_shrink(c)
                return  # the freer of the last page re-queues us (not pending: running)
            self.kmem_cache_destroy_memcg(c)
        finally:
            if fixed14:
                self.memcg_cache_mutex.unlock()

    # ------------------------------------------------------------------ child destroy
    def kmem_cache_destroy_memcg(self, c: KmemCache, force: bool = False) -> bool:
        """kmem_cache_destroy() of child ``c``; True if it was destroyed. With the bug 9 fix a
        child pinned by a lookup, or given a page since its destroyer read nr_pages, is left
        alone unless ``force`` (root destroy); the decision and ``destroying`` are taken under
        the child's lock, which every pin takes."""
        k = self._k
        sl = k.slab
        cfg = k.config
        bug9 = cfg.bug("get_cache_without_reference")
        bug7 = cfg.bug("memcg_create_without_slab_mutex_recheck")
        if k.kasan.free_recorded(c):
            # destroyed already (bug 14: the root destroy and the child's own destroy work):
            # 3.13 freed it then; the model defers the poison a grace period for lock-free
            # lookups only, so poison it now: the access below is the kernel's use after free
            k.kasan.poison(c)
        p = c.memcg_params
        with p.lock:  # no lookup pins it, no page came since the caller looked
            if (p.users or p.nr_pages) and not force:
                return False
            p.destroying = True  # from here on nothing queues its destroy work
        if not force:
            cancel_work(p.destroy)  # an instance the last freer queued (we may be the work)
        with DestroyLocks(sl) as held:
            c.alias_count -= 1
            if c.alias_count:
                return False
            busy = sl.slub.kmem_cache_shutdown(c)
            if busy:
                c.alias_count += 1
                sl._report_busy(c, busy)
                return False
            if not sl._list_del(c):
                return False
            rp = p.root_cache.memcg_params
            _remove(rp.children, c)
            if not bug7:
                self.memcg_unregister_cache(c)  # 2edefe1155b3: under slab_mutex
            held.drop_all()
            if c.typesafe:
                k.rcu.barrier()
            self.memcg_release_cache(c, clear_slot=bug7)
            k.event("cache_destroy", c)
            self.nr_destroyed += 1
            if bug9:
                self._free_cache(c)
            else:
                # freed now, poisoned a grace period later: lookups may hold c from the slot
                p = c.memcg_params
                k.kasan.free(p, poison=False)
                k.kasan.free(c, poison=False)
                k.rcu.call(self._poison_cache, c, p)
        return True

    def _free_cache(self, c: KmemCache) -> None:
        k = self._k
        k.kasan.free(c.memcg_params)
        k.kasan.free(c)

    def _poison_cache(self, c: KmemCache, p: ChildParamsV313) -> None:
        self._k.kasan.poison(p)
        self._k.kasan.poison(c)

    def memcg_unregister_cache(self, c: KmemCache) -> None:
        """Caller holds slab_mutex: clear c's slot, VM_BUG_ON(slot != c) as a model check."""
        sl = self._k.slab
        p = c.memcg_params
        idx = p.memcg.kmemcg_id
        arr = p.root_cache.memcg_params.memcg_caches.protected(sl.slab_mutex)
        if self._slot_is_ours(arr, idx, c):
            arr.entries[idx] = None

    def _slot_is_ours(self, arr: MemcgCacheArray, idx: int, c: KmemCache) -> bool:
        """The fix's VM_BUG_ON(slot != c) before a child's slot is cleared, as a model check
        that runs in both forms: with bug 7 a child published into an array a relocation
        had already copied is in no slot, and a second child may sit in the one it owns."""
        if arr.entries[idx] is c:
            return True
        self._assertion(f"kernel BUG at mm/memcontrol.c: memcg_caches[{idx}] of "
                        f"{c.memcg_params.root_cache.name} is not {c.name}",
                        "memcg_unregister_cache:slot_not_ours",
                        "clearing the slot of a child that is not published there\n")
        return False

    def memcg_release_cache(self, c: KmemCache, clear_slot: bool) -> None:
        """memcg_release_cache(): (3.13) slot = NULL with no lock but set_limit_mutex-free
        readers, list_del under slab_caches_mutex, css_put."""
        p = c.memcg_params
        memcg = p.memcg
        if clear_slot:
            root = p.root_cache
            arr = root.memcg_params.memcg_caches.access()
            self._slot_is_ours(arr, memcg.kmemcg_id, c)
            # root->memcg_params->memcg_caches[id] = NULL: a load of the array, then a store
            # into it, under no lock a relocation takes. One that copies the loaded array in
            # between keeps c, destroyed, in the new array: the lookups find it there
            self._k.window("memcg_release_cache:clear")
            arr.entries[memcg.kmemcg_id] = None  # 3.13 clears it all the same
        with self.state(memcg).slab_caches_mutex:
            _remove(memcg.kmem_caches, c)
        self._k.memcg.css_put(memcg)

    # ------------------------------------------------------------------ root destroy
    def kmem_cache_destroy(self, s: KmemCache) -> None:
        """kmem_cache_destroy() of an accounted root."""
        k = self._k
        sl = k.slab
        rp = s.memcg_params
        if k.config.bug("children_destroyed_before_alias_check"):
            k.window("kmem_cache_destroy:before_alias_check")
            self._flush_creations(s)
            left = self.kmem_cache_destroy_memcg_children(s)
            with DestroyLocks(sl) as held:
                s.alias_count -= 1
                if s.alias_count:
                    return
                if left:
                    s.alias_count += 1
                    return
                self._report_leaks(s)
                sl.shutdown_cache(s, held)
            return
        with DestroyLocks(sl) as held:  # b8529907ba35: the children only for the last alias
            s.alias_count -= 1
            if s.alias_count:
                return
            rp.dying = True  # model: not offered to find_mergeable() while unlocked
            held.drop_all()
            self._flush_creations(s)
            left = self.kmem_cache_destroy_memcg_children(s)
            held.take_all()
            if left:
                rp.dying = False
                s.alias_count += 1
                return
            self._report_leaks(s)
            sl.shutdown_cache(s, held)

    def _flush_creations(self, s: KmemCache) -> None:
        """A queued creation holds no reference on its root: unless bug 11 is switched on, let
        those of ``s`` finish before the children are reaped (4.18's flush, with no lock held;
        only the creations: the destroy works are bug 14's business).

        One pass over the creations queued before the call, as flush_workqueue(): the caller
        no longer allocates from ``s``, so no creation of its own comes later. Another alias's
        users may queue more meanwhile: waiting for those too never ended while they kept
        allocating in new memcgs (1,573 rounds and 4.5 s in one root destroy, behind hundreds
        of creations queued on memcg_cache_mutex)."""
        if self._k.config.bug("root_destroy_without_flush"):
            return
        with self._cw_lock:
            ws = list(self._create_works.get(id(s), ()))
        for w in ws:
            flush_work(w)

    def kmem_cache_destroy_memcg_children(self, s: KmemCache) -> int:
        """Destroy every published child of root ``s``; returns how many stayed (busy)."""
        k = self._k
        mc = k.memcg
        fixed14 = not k.config.bug("cancel_work_sync_self_freeing_work")
        left = 0
        with mc.activate_kmem_mutex:  # set_limit_mutex: no relocation meanwhile
            arr = s.memcg_params.memcg_caches.protected(mc.activate_kmem_mutex)
            for i in range(len(arr.entries)):
                # 3.13 skips an empty slot before taking memcg_cache_mutex: a creation that
                # fills it after this read could just as well fill it after a locked read.
                # Locking every slot queued root destroys hundreds of times behind the
                # creation backlog on memcg_cache_mutex. The list item load is atomic, like
                # the READ_ONCE of a slot; activate_kmem_mutex keeps the array in place.
                if arr.entries[i] is None:
                    continue
                if fixed14:
                    self.memcg_cache_mutex.lock()
                try:
                    c = arr.entries[i]  # again, under memcg_cache_mutex (bug 14's fix)
                    if c is None:
                        continue
                    k.window("kmem_cache_destroy_memcg_children:got_child")
                    p = c.memcg_params
                    p.dead = False
                    work = p.destroy
                finally:
                    if fixed14:
                        self.memcg_cache_mutex.unlock()
                cancel_work_sync(work)
                if not self.kmem_cache_destroy_memcg(c, force=True):
                    left += 1
        return left

    # ------------------------------------------------------------------ css_free
    def memcg_destroy_kmem_caches(self, memcg: MemCgroup) -> None:
        """css_free: every child pinned the css, so none is left; give the kmemcg_id back
        (3.13's disarm_kmem_keys)."""
        mc = self._k.memcg
        if memcg.kmemcg_id >= 0:
            with mc.activate_kmem_mutex:
                mc._ids.discard(memcg.kmemcg_id)

    # ------------------------------------------------------------------ listings
    def memcg_slabinfo(self, memcg: MemCgroup) -> str:
        """memory.kmem.slabinfo (3.13 mem_cgroup_slabinfo_read): the memcg's list is walked
        under its slab_caches_mutex (slab_mutex -> slab_caches_mutex, the creation order)."""
        sl = self._k.slab
        out = [sl.slabinfo_header()]
        with sl.slab_mutex, self.state(memcg).slab_caches_mutex:
            for c in memcg.kmem_caches:
                out.append(sl.slabinfo_line(c))
        return "".join(out)

    # ------------------------------------------------------------------ checks
    def leaked_children(self, s: KmemCache) -> list[KmemCache]:
        """Children of root ``s`` on slab_caches (and their memcg's list) but in no slot of
        its memcg_caches array: unreachable, never destroyed (bug 7). Caller holds
        slab_mutex or knows nothing changes."""
        arr = s.memcg_params.memcg_caches.access()
        published = {id(c) for c in arr.entries if c is not None}
        return [c for c in s.memcg_params.children if id(c) not in published]

    def _report_leaks(self, s: KmemCache) -> None:
        k = self._k
        for c in self.leaked_children(s):
            title = f"kmemleak: unreferenced kmem_cache {c.name} (root {s.name} destroyed)"
            k.findings.report(
                F.MEMLEAK, title, "memcg_v313:leaked_child",
                lambda c=c, title=title: banner(title, k) + f"{c.name} is on slab_caches "
                "and on its memcg's memcg_slab_caches but in no memcg_caches slot of its root: no "
                "destroy path reaches it, and it pins its memcg for good\n",
                thread=k.current().name, extra={"cache": c.name})

    def _assertion(self, title: str, sig: str, detail: str) -> None:
        k = self._k
        stack = k.stacks.capture(2)
        k.findings.report(F.ASSERTION, title, sig,
                          lambda: banner(title, k) + detail + "Call Trace:\n"
                          + format_stack(stack), thread=k.current().name)


def _remove(lst: list[Any], obj: Any) -> None:
    """list_del by identity (the object may already be poisoned: never compare it)."""
    for i, x in enumerate(lst):
        if x is obj:
            del lst[i]
            return

