"""Per-memcg kmem caches, the v3.16 design (3.16-3.18: mm/memcontrol.c + mm/slab_common.c after
bd67314586a3 "memcg, slab: simplify synchronization scheme", seed 001, and 1e32e77f95d6);
docs/memcg-eras.md section 2.

One global ``memcg_slab_mutex`` protects every root's ``memcg_caches`` slots and every memcg's
list of child caches (``MemCgroup.kmem_caches`` stands for ``memcg_slab_caches``); it is held
whenever a child cache is created or destroyed. Lock order:

    activate_kmem_mutex -> memcg_slab_mutex -> cpu hotplug (2012 reader count) -> slab_mutex

so kmem_cache_shrink() and kmem_cache_destroy() can run under it (the per-memcg destroy work of
3.13 is gone). The root destroyer holds the cpu hotplug *reader count* while it takes
memcg_slab_mutex: lockdep cannot see that with the 2012 hotplug design (the preset's), but the
nested get_online_cpus() of a child destroy would deadlock against a queued writer of the
percpu-rwsem design, so this design needs ``hotplug="2012"``.

* activation (``memcg_update_all_caches``): the arrays grow under memcg_slab_mutex (and
  slab_mutex inside), so relocation and the slot publish are serialised.
* ``memcg_kmem_get_cache``: the current memcg under RCU, its child looked up lock-free
  (``cache_from_memcg_idx``). With ``get_cache_without_reference`` (bug 9, the 3.16 code) a hit
  takes NO reference: nothing keeps the child alive until the allocation. On a miss,
  ``css_tryget`` and a creation work that carries that reference.
* creation (``memcg_create_cache_work_func``): under memcg_slab_mutex, recheck the slot (several
  creators for one slot can be queued), ``kmem_cache_create_memcg`` (cpus -> slab_mutex) makes
  the child, which is then linked on the memcg's list and published.
* charging: ``nr_pages`` (atomic) per child, counted by memcg_charge_slab /
  memcg_uncharge_slab; the freer never destroys a cache (1e32e77f95d6).
* offline (``memcg_deactivate_kmem_caches`` = mem_cgroup_destroy_all_caches): under
  memcg_slab_mutex, each child is shrunk and, when ``nr_pages`` is 0, destroyed at once
  (``memcg_kmem_destroy_cache``: slot = NULL, unlinked, kmem_cache_destroy(child)); a child
  that still has pages stays, dead.
* root destroy: cpus -> slab_mutex, alias count down; at zero, slab_mutex is dropped to destroy
  every child under memcg_slab_mutex (the children's destroy takes slab_mutex itself), then
  retaken; a child that cannot be destroyed (objects left) keeps the root; else shutdown_cache.

Lifetimes (bug 9 on, i.e. 3.16): each child holds a css reference on its memcg (css_get in
memcg_alloc_cache_params), dropped when the child is destroyed; pages do not pin the memcg. A
memcg therefore lives until its base reference (offline), its tasks and its children are gone.
A dead child (non-empty at offline) is destroyed only by its root's kmem_cache_destroy(): the
last uncharge does not destroy it, so until then it and its memcg stay (3.16's "pending for
good" caches).

With ``get_cache_without_reference`` off, the 3.19 fix ("memcg: fix possible use-after-free in
memcg_kmem_get_cache()") is applied, with the lifetime it came with: get_cache keeps a css
reference until memcg_kmem_put_cache(); children hold none; each charged page pins the memcg;
offline only shrinks; the children are destroyed at css_free (``memcg_destroy_kmem_caches``),
when no page is left.

Alias race (``alias_race``, catalog 5): the historical destroy drops slab_mutex with the alias
count at zero and the root still on slab_caches, so find_mergeable() may hand it to a
concurrent kmem_cache_create(). Fixed form (the Dec 2014 rework destroyed the children under
slab_mutex; this model keeps the 3.16 lock order instead): the root is marked ``dying`` under
slab_mutex before the drop, and find_mergeable() skips dying roots.

Bug 10 (``free_path_touches_cache_after_uncharge``): memcg_uncharge_slab() touches the child
(stat(s, FREE_SLAB)) after the count drop that lets a destroyer free it (window
``memcg_uncharge_slab:after_put``).

Differences from 3.16:

* creations run on a dedicated workqueue ``memcg_cache_create`` (unbound, default max_active,
  so creators of one slot still run concurrently), not schedule_work(), so that the root
  destroy can flush them: 3.16 did not (seed 000's creation half of catalog bug 11, which the
  catalog assigns to 4.17; ``root_destroy_without_flush`` restores it here too). Queued
  creations then bail on a dying root (read under slab_mutex).
* the shared memcg code gives a kmemcg_id back at offline (3.16 kept it until css_free), so
  offline unpublishes the children it cannot destroy (they stay on the root's ``children``
  and the memcg's list, where the root destroy and css_free find them), and a creation bails
  when its memcg is no longer kmem-online (3.16 only rechecked the slot). For the same reason
  get_cache rechecks, after reading the slot, that its memcg is still kmem-online
  (``kmem_state`` only ever goes from online to offline, under activate_kmem_mutex, before the
  id is given back; read lock-free as READ_ONCE): otherwise the slot may hold another memcg's
  child.
* the children's list of a root (``memcg_params.children``, slab_mutex in the shared code) is
  changed here only under memcg_slab_mutex too, so the root destroy walks it under that mutex.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kmemcg.mm.memcg_slab import MemcgSlab, is_child
from kmemcg.mm.memcontrol import KMEM_ONLINE, MemcgCacheParams
from kmemcg.mm.slab_common import DestroyLocks
from kmemcg.mm.slub import KmemCache
from kmemcg.workqueue import Work, queue_work

if TYPE_CHECKING:
    from kmemcg.kernel import Kernel
    from kmemcg.mm.memcontrol import MemCgroup
    from kmemcg.mm.page_alloc import Page

BUG9 = "get_cache_without_reference"
BUG10 = "free_path_touches_cache_after_uncharge"


class MemcgCacheParamsV316(MemcgCacheParams):
    """A child's memcg_cache_params with ``atomic_t nr_pages`` (its slab pages); the atomic is a
    raw lock around an int."""

    __slots__ = ("nr_pages", "nr_pages_lock")

    def __init__(self, k: Kernel) -> None:
        super().__init__(False)
        self.nr_pages = 0
        self.nr_pages_lock = k.raw_lock()

    def add_pages(self, n: int) -> int:
        """atomic_add_return()."""
        with self.nr_pages_lock:
            self.nr_pages += n
            return self.nr_pages

    def read_pages(self) -> int:
        with self.nr_pages_lock:
            return self.nr_pages


class MemcgSlabV316(MemcgSlab):
    """``k.memcg_slab`` for preset v3.16."""

    def __init__(self, k: Kernel) -> None:
        self._k = k
        self.memcg_slab_mutex = k.mutex("memcg_slab_mutex")
        self.wq = k.create_workqueue("memcg_cache_create")
        self.nr_created = 0
        self.nr_deactivated = 0
        self.nr_destroyed = 0

    def _lifetime_316(self) -> bool:
        """The 3.16 lifetime (children pin the memcg, offline destroys empty ones) rather than
        3.19's (get_cache pins it, children go at css_free): the switch of bug 9's fix."""
        return self._k.config.bug(BUG9)

    # ------------------------------------------------------------------ charging
    def memcg_charge_slab(self, s: KmemCache, page: Page) -> None:
        """A new slab page of child ``s``: nr_pages up (and, with 3.19's fix, a css reference
        per page: memcg_charge_kmem's css_get_many)."""
        p = s.memcg_params
        memcg = p.memcg
        if not self._lifetime_316():
            self._k.memcg.css_get(memcg)
        p.add_pages(1)  # the page records nothing: 3.16 finds the memcg through the cache

    def memcg_uncharge_slab(self, s: KmemCache, page: Page) -> None:
        """memcg_uncharge_kmem(), then atomic_sub(nr_pages): from then on a destroyer may free
        ``s`` (offline sees 0; with 3.19's fix, the css put below may free the memcg and with it
        the child at css_free). The last access to ``s`` unless bug 10 is on."""
        k = self._k
        p = s.memcg_params
        memcg = p.memcg
        p.add_pages(-1)
        if not self._lifetime_316():
            k.memcg.css_put(memcg)
        if k.config.bug(BUG10):
            k.window("memcg_uncharge_slab:after_put")
            s.nr_partial  # noqa: B018  stat(s, FREE_SLAB) after the drop that allowed the free

    def memcg_update_all_caches(self, num: int) -> int:
        """__memcg_activate_kmem(): grow the arrays under memcg_slab_mutex (caller holds
        activate_kmem_mutex), so a creator's publish never races a relocation."""
        with self.memcg_slab_mutex:
            self._k.memcg.memcg_update_all_caches(num)
        return 0

    # ------------------------------------------------------------------ lookup
    def memcg_kmem_get_cache(self, s: KmemCache) -> KmemCache:
        """__memcg_kmem_get_cache(): the current memcg's child of accounted root ``s``, else
        ``s`` (a miss queues the child's creation)."""
        if self.memcg_kmem_bypass(s):
            return s
        k = self._k
        mc = k.memcg
        task = k.current()
        if k.config.bug(BUG9):
            # 3.16: the memcg under RCU; a hit takes no reference of any kind
            with k.rcu.read():
                memcg = mc.mem_cgroup_from_task(task)
                if memcg.kmem_state != KMEM_ONLINE:  # memcg_can_account_kmem()
                    return s
                c = mc.cache_from_memcg_idx(s, memcg.kmemcg_id)
                if memcg.kmem_state != KMEM_ONLINE:
                    return s  # (model) offline meanwhile: its id may be another's already
                if c is not None:
                    return c
                if not mc.css_tryget(memcg):
                    return s
            self.memcg_create_cache_enqueue(memcg, s)  # the reference goes with the work
            return s
        # 3.19: the css reference is kept until memcg_kmem_put_cache()
        memcg = mc.get_mem_cgroup_from_current()
        if memcg.kmem_state == KMEM_ONLINE:
            c = mc.cache_from_memcg_idx(s, memcg.kmemcg_id)
            if c is not None and memcg.kmem_state == KMEM_ONLINE:  # (model) id still ours
                return c
            if c is None:
                mc.css_get(memcg)  # the work's
                self.memcg_create_cache_enqueue(memcg, s)
        mc.css_put(memcg)
        return s

    def memcg_kmem_put_cache(self, c: KmemCache) -> None:
        if is_child(c) and not self._k.config.bug(BUG9):
            self._k.memcg.css_put(c.memcg_params.memcg)

    # ------------------------------------------------------------------ creation
    def memcg_create_cache_enqueue(self, memcg: MemCgroup, root: KmemCache) -> None:
        """Caller holds a css reference on ``memcg`` for the work."""
        queue_work(self.wq, Work(self._create_work_func, memcg, root,
                                 name="memcg_create_cache_work_func"))

    def _create_work_func(self, memcg: MemCgroup, root: KmemCache) -> None:
        try:
            with self.memcg_slab_mutex:
                self.memcg_kmem_create_cache(memcg, root)
        finally:
            self._k.memcg.css_put(memcg)

    def memcg_kmem_create_cache(self, memcg: MemCgroup, root: KmemCache) -> KmemCache | None:
        """Caller holds memcg_slab_mutex."""
        k = self._k
        assert self.memcg_slab_mutex.is_held(), "lockdep_assert_held(&memcg_slab_mutex)"
        if memcg.kmem_state != KMEM_ONLINE:
            return None  # offline meanwhile: its kmemcg_id may be someone else's already
        idx = memcg.kmemcg_id
        if k.memcg.cache_from_memcg_idx(root, idx) is not None:
            return None  # several creators race; one won
        c = self.kmem_cache_create_memcg(memcg, root)
        if c is None:
            return None  # the root cache serves
        memcg.kmem_caches.append(c)  # list_add(memcg_slab_caches)
        k.window("memcg_create_kmem_cache:before_publish")
        arr = root.memcg_params.memcg_caches.protected(self.memcg_slab_mutex)
        assert arr.entries[idx] is None, "BUG_ON(memcg_caches[id])"
        arr.entries[idx] = c  # smp_wmb(); published complete
        self.nr_created += 1
        k.event("memcg_cache_create", c)
        return c

    def kmem_cache_create_memcg(self, memcg: MemCgroup, root: KmemCache) -> KmemCache | None:
        """slab_common.c: cpus -> slab_mutex; the child, on slab_caches and the root's list."""
        k = self._k
        sl = k.slab
        with sl.cpus_and_slab_mutex():
            rp = root.memcg_params
            if rp.dying:
                return None  # (model) the root is being destroyed: see the module docstring
            c = self.alloc_child_cache(root, memcg, memcg.kmemcg_id)
            cp = MemcgCacheParamsV316(k)
            k.kasan.alloc(cp, "memcg_cache_params", f"the cache {c.name}")
            cp.memcg, cp.root_cache = memcg, root
            if self._lifetime_316():
                k.memcg.css_get(memcg)  # memcg_alloc_cache_params(): the child pins the memcg
            c.memcg_params = cp
            rp.children.append(c)
            sl.slab_caches.append(c)
            c.on_list = True
            return c

    # ------------------------------------------------------------------ destruction
    def memcg_kmem_destroy_cache(self, c: KmemCache) -> bool:
        """Caller holds memcg_slab_mutex: unpublish child ``c``, unlink it, kmem_cache_destroy()
        it. False (reported "still has objects") if it is not empty: it stays linked, dead."""
        k = self._k
        assert self.memcg_slab_mutex.is_held(), "lockdep_assert_held(&memcg_slab_mutex)"
        p = c.memcg_params
        root, memcg = p.root_cache, p.memcg
        arr = root.memcg_params.memcg_caches.protected(self.memcg_slab_mutex)
        idx = memcg.kmemcg_id
        if 0 <= idx < len(arr.entries) and arr.entries[idx] is c:
            arr.entries[idx] = None
        memcg.kmem_caches.remove(c)
        if not self._kmem_cache_destroy_child(c):
            memcg.kmem_caches.append(c)
            return False
        if self._lifetime_316():
            k.memcg.css_put(memcg)  # memcg_free_cache_params()
        self.nr_destroyed += 1
        return True

    def _kmem_cache_destroy_child(self, c: KmemCache) -> bool:
        """kmem_cache_destroy() of a child: cpus -> slab_mutex (nested in a root destroy's
        reader count: the 2012 hotplug lets a reader in again)."""
        sl = self._k.slab
        with DestroyLocks(sl) as held:
            c.alias_count -= 1
            if c.alias_count:
                return False
            rp = c.memcg_params.root_cache.memcg_params
            rp.children.remove(c)
            if not sl.shutdown_cache(c, held):
                rp.children.append(c)  # busy (reported); slab_mutex still held
                return False
            return True

    def memcg_deactivate_kmem_caches(self, memcg: MemCgroup) -> None:
        """mem_cgroup_destroy_all_caches() at offline (activate_kmem_mutex held by the caller):
        shrink every child; destroy the empty ones (3.16); the others stay, dead."""
        k = self._k
        with self.memcg_slab_mutex:
            for c in list(memcg.kmem_caches):
                k.slab.kmem_cache_shrink(c)
                self.nr_deactivated += 1
                if self._lifetime_316() and c.memcg_params.read_pages() == 0:
                    self.memcg_kmem_destroy_cache(c)
                    continue
                # (model) the kmemcg_id is given back at offline: unpublish the dead child
                arr = c.memcg_params.root_cache.memcg_params.memcg_caches.protected(
                    self.memcg_slab_mutex)
                idx = memcg.kmemcg_id
                if 0 <= idx < len(arr.entries) and arr.entries[idx] is c:
                    arr.entries[idx] = None

    def memcg_destroy_kmem_caches(self, memcg: MemCgroup) -> None:
        """css_free. 3.16: the children pinned the memcg, so none is left. 3.19: no charged
        page is left, so its children are empty: destroy them."""
        with self.memcg_slab_mutex:
            for c in list(memcg.kmem_caches):
                self.memcg_kmem_destroy_cache(c)

    # ------------------------------------------------------------------ root destroy
    def kmem_cache_destroy(self, s: KmemCache) -> None:
        """kmem_cache_destroy() of an accounted root."""
        k = self._k
        cfg = k.config
        sl = k.slab
        with DestroyLocks(sl) as held:
            s.alias_count -= 1
            if s.alias_count:
                return
            if cfg.bug("alias_race"):
                # 3.16: the doomed root stays on slab_caches, mergeable, while unlocked
                held.drop_slab_mutex()
                k.window("kmem_cache_destroy:slab_mutex_dropped")
            else:
                s.memcg_params.dying = True  # find_mergeable() skips it; creations bail
                held.drop_slab_mutex()
            if not cfg.bug("root_destroy_without_flush"):
                # (model) queued creations read the root: let them finish, no lock held
                held.drop_all()
                self.wq.flush()
                held.take_all()
                held.drop_slab_mutex()
            failed = self.kmem_cache_destroy_memcg_children(s)
            held.take_slab_mutex()
            if failed:
                s.alias_count += 1  # the root stays (a child still has objects, reported)
                s.memcg_params.dying = False
                return
            if not sl.shutdown_cache(s, held) and not cfg.bug("alias_race"):
                s.memcg_params.dying = False  # busy: the root stays usable

    def kmem_cache_destroy_memcg_children(self, s: KmemCache) -> int:
        """__kmem_cache_destroy_memcg_children(): under memcg_slab_mutex, destroy every child
        of root ``s`` (published or dead). Returns how many could not be destroyed."""
        with self.memcg_slab_mutex:
            failed = 0
            for c in list(s.memcg_params.children):
                if not self.memcg_kmem_destroy_cache(c):
                    failed += 1
            return failed
