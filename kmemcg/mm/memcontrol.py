"""mm/memcontrol.c, the part every era shares: the mem_cgroup tree, css references, tasks and
their migration, and kmem activation (a kmemcg_id from an id allocator, and every root cache's
``memcg_caches`` array grown to fit it, relocated under RCU).

References (kernel/cgroup, include/linux/cgroup.h): a css starts with one reference held by the
cgroup itself. ``css_tryget_online()`` fails once the cgroup went offline (rmdir: the kernel's
percpu_ref_kill); ``css_get()`` / ``css_put()`` work on any live css; the last put releases it
and, one grace period later (``call_rcu``), a work frees it (css_free_rwork_fn). A task holds a
reference on the memcg it belongs to; moving it (a write to cgroup.procs) takes the new one and
drops the old one after a grace period, because a reader may still be looking at the old memcg
under rcu_read_lock().

kmem activation (3.14-3.16: memcg_activate_kmem under activate_kmem_mutex; 4.x: at css_online
under memcg_cache_ids_sem): the memcg gets the smallest free kmemcg_id; when that id does not fit
the root caches' arrays, memcg_update_all_caches() allocates bigger arrays under slab_mutex,
copies the entries, publishes them with rcu_assign_pointer() and frees the old ones after a grace
period (kfree_rcu: the fix f8570263ee16 made, so lock-free readers in cache_from_memcg_idx()
stay safe).

Lock order: cgroup_mutex -> activate_kmem_mutex -> slab_mutex (seed 001's order, minus the
per-memcg lock of 3.13).

The per-memcg caches (creation, charging, deactivation, destruction, era by era) build on this
module; see docs/memcg-eras.md.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from kmemcg.core.kasan import KasanObject
from kmemcg.core.refcount import Refcount

if TYPE_CHECKING:
    from kmemcg.core.task import Task
    from kmemcg.kernel import Kernel
    from kmemcg.mm.slub import KmemCache

KMEM_NONE, KMEM_ALLOCATED, KMEM_ONLINE = "none", "allocated", "online"
MEMCG_CACHES_MIN_SIZE = 4
MEMCG_CACHES_MAX_SIZE = 65535
EBUSY = 16


class MemCgroup(KasanObject):
    """struct mem_cgroup (with its css). Tree fields are guarded by cgroup_mutex; ``online`` is
    written under ``css_lock`` together with the refcount checks of css_tryget_online();
    ``nr_tasks`` under the subsystem's raw ``_tasks_lock`` (task exit cannot take mutexes)."""

    __slots__ = ("name", "serial", "parent", "children", "css_ref", "css_lock", "online",
                 "kmem_state", "kmemcg_id", "nr_tasks", "kmem_caches", "design", "offline_at")

    def __init__(self, k: Kernel, name: str, serial: int, parent: MemCgroup | None) -> None:
        self.name = name
        self.serial = serial
        self.parent = parent
        self.children: list[MemCgroup] = []
        self.css_ref = Refcount(k, f"css({name})", 1)  # the cgroup's own reference
        self.css_lock = k.raw_lock()
        self.online = True
        self.kmem_state = KMEM_NONE
        self.kmemcg_id = -1
        self.nr_tasks = 0
        self.kmem_caches: list[KmemCache] = []  # this memcg's child caches (slab_mutex)
        self.design: Any = None  # the memcg design's own fields (e.g. 3.13's slab_caches_mutex)
        # when its offline finished (time.monotonic()): kmemleak's object age, for scans
        # that run while the kernel is busy (Kmemleak.scan_undeactivated's min_age)
        self.offline_at: float | None = None

    def __repr__(self) -> str:
        return f"<mem_cgroup {object.__getattribute__(self, 'name')}>"

    @property
    def path(self) -> str:
        if self.parent is None:
            return "/"
        p = self.parent.path
        return f"{p.rstrip('/')}/{self.name}"


class MemcgCacheArray(KasanObject):
    """struct memcg_cache_array: a root cache's per-memcg children, indexed by kmemcg_id.
    Replaced whole (never resized in place) so that lock-free readers see one or the other."""

    __slots__ = ("entries",)

    def __init__(self, size: int, old: MemcgCacheArray | None = None) -> None:
        self.entries: list[Any] = [None] * size
        if old is not None:
            self.entries[:len(old.entries)] = old.entries


class MemcgCacheParams(KasanObject):
    """struct memcg_cache_params. Root: ``memcg_caches`` (an RCU pointer to the array),
    ``children``, ``dying``. Child: ``memcg``, ``root_cache``. Guarded by slab_mutex, but
    ``memcg_caches`` is read lock-free under rcu_read_lock()."""

    __slots__ = ("is_root_cache", "memcg_caches", "children", "dying", "memcg", "root_cache",
                 "deact_queued", "offline_at")

    def __init__(self, is_root: bool) -> None:
        self.is_root_cache = is_root
        self.memcg_caches: Any = None
        self.children: list[KmemCache] = []
        self.dying = False
        self.memcg: MemCgroup | None = None
        self.root_cache: KmemCache | None = None
        self.deact_queued = False  # child: its deactivation was queued (v4 design, deact_fn)
        # child: when its memcg's offline unpublished it (designs that reparent children, so
        # the memcg it had is gone from ``memcg``); model bookkeeping for kmemleak's age
        self.offline_at: float | None = None


class MemcgSubsys:
    """``k.memcg``: the memory controller."""

    def __init__(self, k: Kernel) -> None:
        self._k = k
        self.cgroup_mutex = k.mutex("cgroup_mutex")
        self.activate_kmem_mutex = k.mutex("activate_kmem_mutex")
        self._serial = 0
        self.root = self._new("/", None)
        self.memcgs: list[MemCgroup] = [self.root]  # every live memcg (cgroup_mutex)
        self._ids: set[int] = set()  # the kmemcg_id allocator (ida); activate_kmem_mutex
        self.nr_cache_ids = MEMCG_CACHES_MIN_SIZE  # memcg_nr_cache_ids (slab_mutex to grow)
        self.freed = 0  # memcgs freed (css_free ran)
        self._tasks_lock = k.raw_lock()
        k.add_exit_check(self.exit_task)

    def _new(self, name: str, parent: MemCgroup | None) -> MemCgroup:
        self._serial += 1
        m = MemCgroup(self._k, name, self._serial, parent)
        self._k.kasan.alloc(m, "mem_cgroup", "the mem_cgroup allocations (kzalloc)")
        return m

    # ------------------------------------------------------------------ tree
    def create(self, name: str, parent: MemCgroup | None = None) -> MemCgroup:
        """mkdir: a new online memcg under ``parent`` (the root by default)."""
        parent = parent or self.root
        with self.cgroup_mutex:
            if not parent.online:
                raise ValueError(f"cannot create {name!r} under offline {parent.path}")
            m = self._new(name, parent)
            parent.children.append(m)
            self.memcgs.append(m)
            self.css_get(parent)  # a child pins its parent, as css_create does
        self._k.event("memcg_online", m)
        return m

    def offline(self, m: MemCgroup) -> int:
        """rmdir: -EBUSY while tasks or children remain; otherwise offline the memcg (no new
        css_tryget_online), let the era's kmem code deactivate its caches, and drop the
        cgroup's own reference. The memcg is freed when the last reference goes."""
        if m is self.root:
            return -EBUSY
        with self.cgroup_mutex:
            if m.nr_tasks or any(c.online for c in m.children) or not m.online:
                return -EBUSY
            with m.css_lock:
                m.online = False
            self.memcgs.remove(m)
        self._k.event("memcg_offline", m)
        self.memcg_offline_kmem(m)
        m.offline_at = time.monotonic()  # model bookkeeping, read racily by kmemleak
        self.css_put(m)  # the cgroup's base reference (percpu_ref_kill)
        return 0

    def memcg_offline_kmem(self, m: MemCgroup) -> None:
        """The kmem part of offlining: no new caches for it (kmem_state), give its kmemcg_id
        back. The per-era cache deactivation hooks in here (memcg layer, next)."""
        with self.activate_kmem_mutex:
            if m.kmem_state != KMEM_ONLINE:
                return
            m.kmem_state = KMEM_ALLOCATED  # pending creations for it bail from now on
            if self._k.memcg_slab is not None:
                self._k.memcg_slab.memcg_deactivate_kmem_caches(m)
            if self._k.memcg_slab is not None and \
                    self._k.memcg_slab.kmemcg_id_freed_at_css_free:
                return  # 3.13: its children keep the slot until they go; css_free frees it
            self._ids.discard(m.kmemcg_id)

    # ------------------------------------------------------------------ css references
    def css_get(self, m: MemCgroup) -> None:
        m.css_ref.inc()

    def css_tryget(self, m: MemCgroup) -> bool:
        return m.css_ref.inc_not_zero()

    def css_tryget_online(self, m: MemCgroup) -> bool:
        with m.css_lock:  # pairs with offline(): online and the count are checked together
            return m.online and m.css_ref.inc_not_zero()

    def css_put(self, m: MemCgroup) -> None:
        """css_put(): the last reference frees the memcg a grace period later, on a work."""
        if m.css_ref.dec_and_test():
            self._k.rcu.call(self._css_free_rcu, m)

    def _css_free_rcu(self, m: MemCgroup) -> None:
        from kmemcg.workqueue import Work, queue_work
        queue_work(self._k.system_wq, Work(self._css_free, m, name="css_free_work"))

    def _css_free(self, m: MemCgroup) -> None:
        """css_free_rwork_fn -> mem_cgroup_css_free: unlink, drop the parent, free."""
        parent = m.parent
        with self.cgroup_mutex:
            if parent is not None and m in parent.children:
                parent.children.remove(m)
        self._k.event("memcg_free", m)
        if self._k.memcg_slab is not None:
            self._k.memcg_slab.memcg_destroy_kmem_caches(m)  # no charged page left: empty
        self._k.kasan.free(m)
        self.freed += 1
        if parent is not None:
            self.css_put(parent)

    # ------------------------------------------------------------------ tasks
    def attach(self, task: Task, m: MemCgroup) -> None:
        """Write ``task`` into ``m``'s cgroup.procs: the task now charges to ``m``. Any thread
        may move any task at any time; readers of task.memcg use RCU."""
        with self.cgroup_mutex:
            if not m.online:
                raise ValueError(f"cannot attach to offline memcg {m.path}")
            self.css_get(m)
            with self._tasks_lock:
                old = task.memcg
                m.nr_tasks += 1
                task.memcg = m  # a reference store: readers see the old or the new memcg
                if old is not None:
                    old.nr_tasks -= 1
        self._k.event("memcg_attach", m)
        if old is not None:
            self._k.rcu.call(self.css_put, old)  # readers may still look at the old one

    def exit_task(self, task: Task) -> None:
        """The task leaves its memcg (exit): drop its reference after a grace period. Runs at
        task exit, where only raw locks may be taken."""
        with self._tasks_lock:
            old, task.memcg = task.memcg, None
            if old is not None:
                old.nr_tasks -= 1
        if old is not None:
            self._k.rcu.call(self.css_put, old)

    def mem_cgroup_from_task(self, task: Task) -> MemCgroup:
        """Caller is inside rcu_read_lock() (or holds cgroup_mutex)."""
        m = task.memcg
        return m if m is not None else self.root

    def get_mem_cgroup_from_current(self) -> MemCgroup:
        """The current task's memcg with a reference (get_mem_cgroup_from_mm): retry while the
        task is moved away from a memcg whose last reference is going."""
        k = self._k
        while True:
            with k.rcu.read():
                m = self.mem_cgroup_from_task(k.current())
                if self.css_tryget(m):
                    return m

    # ------------------------------------------------------------------ kmem activation
    def memcg_activate_kmem(self, m: MemCgroup) -> int:
        """Give ``m`` a kmemcg_id (the smallest free one), growing every root cache's
        memcg_caches array first when the id does not fit. Returns the id, or a negative
        errno when growing failed (``m`` stays unaccounted, as after a failed write of
        memory.kmem.limit_in_bytes; only a design that models the failure returns one)."""
        with self.activate_kmem_mutex:
            if m.kmem_state == KMEM_ONLINE:
                return m.kmemcg_id
            if not m.online:
                raise ValueError(f"memcg {m.path} is offline")
            kid = 0
            while kid in self._ids:
                kid += 1
            if kid >= MEMCG_CACHES_MAX_SIZE:
                raise OverflowError("out of kmemcg ids")
            self._ids.add(kid)
            if kid >= self.nr_cache_ids:
                num = min(max(2 * (kid + 1), MEMCG_CACHES_MIN_SIZE), MEMCG_CACHES_MAX_SIZE)
                ms = self._k.memcg_slab
                err = 0
                if ms is not None:
                    err = ms.memcg_update_all_caches(num)  # the era's locking around it
                else:
                    self.memcg_update_all_caches(num)
                if err:
                    self._ids.discard(kid)  # ida_simple_remove()
                    return err
            m.kmemcg_id = kid
            if self._k.memcg_slab is not None:
                self._k.memcg_slab.memcg_online_kmem(m)  # 5.9: the memcg's obj_cgroup
            m.kmem_state = KMEM_ONLINE
        self._k.event("memcg_kmem_online", m)
        return kid

    def memcg_update_all_caches(self, num: int) -> None:
        """Grow every root cache's memcg_caches array to ``num`` entries (slab_mutex)."""
        sl = self._k.slab
        # mutex_lock() may sleep: lock-free readers go on with the arrays about to go
        self._k.window("memcg_update_all_caches:begin")
        with sl.slab_mutex:
            for s in sl.slab_caches:
                p = s.memcg_params
                if p is not None and p.is_root_cache:
                    self.update_memcg_params(s, num)
            self.nr_cache_ids = num

    def update_memcg_params(self, s: KmemCache, num: int) -> None:
        """Caller holds slab_mutex. Publish a bigger copy; free the old one after a grace
        period, since cache_from_memcg_idx() reads it without locks."""
        k = self._k
        ptr = s.memcg_params.memcg_caches
        old = ptr.protected(k.slab.slab_mutex)
        new = MemcgCacheArray(num, old)
        k.kasan.alloc(new, "memcg_cache_array", f"the memcg_caches of {s.name}")
        ptr.assign(new)
        k.window("update_memcg_params:published")
        if old is not None:
            k.rcu.call(k.kasan.free, old)  # kfree_rcu (f8570263ee16)

    def init_memcg_params(self, s: KmemCache) -> None:
        """A new root cache gets an array sized for the current ids (slab_mutex held)."""
        k = self._k
        p = MemcgCacheParams(True)
        arr = MemcgCacheArray(self.nr_cache_ids)
        k.kasan.alloc(arr, "memcg_cache_array", f"the memcg_caches of {s.name}")
        k.kasan.alloc(p, "memcg_cache_params", f"the cache {s.name}")
        p.memcg_caches = k.rcu.pointer(arr, f"{s.name}.memcg_caches")
        s.memcg_params = p

    def cache_from_memcg_idx(self, s: KmemCache, idx: int) -> KmemCache | None:
        """The child of root cache ``s`` for kmemcg_id ``idx``, lock-free under RCU."""
        k = self._k
        with k.rcu.read():
            arr = s.memcg_params.memcg_caches.dereference()
            k.window("cache_from_memcg_idx:array")  # the array may be relocated meanwhile
            entries = arr.entries
            return entries[idx] if 0 <= idx < len(entries) else None

    # ------------------------------------------------------------------ listings
    def tree(self) -> str:
        """A tree listing: each memcg with its state, references, tasks and kmemcg_id."""
        out: list[str] = []

        def walk(m: MemCgroup, depth: int) -> None:
            state = "online" if m.online else "offline"
            out.append(f"{'  ' * depth}{m.path:<24} {state:<8} css_ref={m.css_ref.read():<4}"
                       f" tasks={m.nr_tasks:<3} kmemcg_id={m.kmemcg_id:<3} "
                       f"kmem={m.kmem_state}\n")
            for c in list(m.children):
                walk(c, depth + 1)

        with self.cgroup_mutex:
            walk(self.root, 0)
        return "".join(out)
