"""Per-memcg kmem caches, the v5.3 design (5.3-5.7: f0a3a24b532d "rework non-root kmem_cache
lifecycle management" and fb2f2b0adb98 "reparent memcg kmem_caches on cgroup removal", in
mm/slab_common.c, mm/slab.h and mm/memcontrol.c); docs/memcg-eras.md section 5.

Every child cache carries a percpu_ref (``memcg_params.refcnt``, kmemcg.core.percpu_ref) whose
release is ``kmemcg_cache_shutdown``; its count is one per charged slab page
(``memcg_charge_slab`` / ``memcg_uncharge_slab``: get_many / put_many, the put the last access
to the cache) plus one per allocation in flight (``memcg_kmem_get_cache`` tryget,
``memcg_kmem_put_cache`` put). Pages no longer pin the memcg: try_charge()'s css references
are transferred to the cache, and the cache pins its memcg (``memcg_link_cache``).

* get_cache: under rcu_read_lock(), the current memcg's slot; a hit is used only if
  ``percpu_ref_tryget()`` succeeds (slots are cleared first at offline, so tryget, not
  tryget_live); a miss queues creation on memcg_kmem_cache_wq after ``css_tryget_online()``.
* creation: cpus -> slab_mutex; bail unless the memcg is still KMEM_ONLINE (5.3 dropped the
  ``dying`` check); recheck the slot; link (css_get) and publish.
* offline (``memcg_deactivate_kmem_caches``): under slab_mutex, for each root's slot:
  ``kmemcg_cache_deactivate(c)`` (skipped for a dying root), slot = NULL; then every cache on
  ``memcg->kmem_caches`` is reparented (``memcg_params.memcg = parent``, its css reference
  moved, the list spliced onto the parent's).
* ``kmemcg_cache_deactivate``: no empty-slab caching, SLAB_DEACTIVATED; under
  ``memcg_kmem_wq_lock``, unless the root is dying: ``call_rcu(kmemcg_rcufn)``, which queues
  ``kmemcg_workfn`` (cpus -> slab_mutex) -> ``kmemcg_cache_deactivate_after_rcu``: shrink, then
  ``percpu_ref_kill()`` (atomic mode one more grace period later).
* release (the ref reached zero, any context): under ``memcg_kmem_wq_lock``, unless the root is
  dying, queue ``kmemcg_workfn`` -> ``kmemcg_cache_shutdown_fn``: shutdown_cache(child) under
  slab_mutex; then ``percpu_ref_exit``, the css reference dropped (destroy_memcg_params, where
  "fix panic in __free_slab() caused by premature memcg pointer release" put it), freed.
* css_free no longer destroys children (``memcg_free_kmem`` only checks the list is empty).
* root destroy: ``flush_memcg_workqueue``: ``dying`` set under memcg_kmem_wq_lock (no
  deactivation or release work is queued for the root after that), rcu_barrier(), flush the
  workqueue, and (a264df74df38) a second rcu_barrier() if children remain, for the percpu_ref
  switches their deactivation started; then cpus -> slab_mutex, alias count, children shut down
  (``percpu_ref_exit`` on each), the root. With d38a2b7a9c93 (5.8, the default here) dying is
  set and the flush done only once the last alias goes, with slab_mutex and cpus dropped.

Lock order: activate_kmem_mutex -> cpus (read) -> slab_mutex -> memcg_kmem_wq_lock (spin);
memcg_kmem_wq_lock is also taken alone by a release in any context (RCU callback included);
nothing sleeps under it.

Differences: the page counters and vmstat are not modelled (charging is the percpu_ref get
plus the css tryget/put that picks the memcg); ``page->mem_cgroup`` is not kept (the model's
__free_slab frees the page before memcg_uncharge_slab, and nothing here reads it); Qian Cai's
5.3-rc fix is applied (kmemcg_workfn does not clear ``work_fn`` after a shutdown freed the
cache); the children's memory (percpu_ref, params, kmem_cache) is freed after slab_mutex is
dropped, behind an rcu_barrier() for TYPESAFE_BY_RCU children, as the base design does.

Bug switches restored here: ``percpu_ref_exit_while_switching`` (16; 5.3-5.4, before
a264df74df38: no second rcu_barrier() in flush_memcg_workqueue) and
``dying_set_before_alias_check`` (17; 5.3-5.7, before d38a2b7a9c93: dying set and the flush
done before the alias check, so a root surviving with other aliases stays dying: its children
are never deactivated, so never killed, never released).
"""

from __future__ import annotations

import time
from functools import partial
from typing import TYPE_CHECKING

from kmemcg.core import findings as F
from kmemcg.core.percpu_ref import PercpuRef, percpu_ref_init
from kmemcg.core.report import banner
from kmemcg.mm.memcg_slab import MemcgSlab, is_child
from kmemcg.mm.memcontrol import MemcgCacheParams
from kmemcg.mm.slub import SLAB_ACCOUNT, KmemCache
from kmemcg.workqueue import Work, queue_work

if TYPE_CHECKING:
    from collections.abc import Callable

    from kmemcg.kernel import Kernel
    from kmemcg.mm.memcontrol import MemCgroup
    from kmemcg.mm.page_alloc import Page


class MemcgCacheParamsV53(MemcgCacheParams):
    """A child's memcg_params in 5.3: ``refcnt`` (percpu_ref), ``work_fn`` and ``work`` (the
    kernel's union of rcu_head and work_struct: the work is INIT'ed in the RCU callback),
    ``deactivated`` (SLAB_DEACTIVATED). ``memcg`` changes at reparenting: read it under RCU."""

    __slots__ = ("refcnt", "work_fn", "work", "deactivated")

    def __init__(self) -> None:
        super().__init__(False)
        self.refcnt: PercpuRef | None = None
        self.work_fn: Callable[[KmemCache], list[KmemCache]] | None = None
        self.work: Work | None = None
        self.deactivated = False


class MemcgSlabV53(MemcgSlab):
    """``k.memcg_slab`` for ``Config.memcg == "v5.3"``."""

    def __init__(self, k: Kernel) -> None:
        super().__init__(k)
        # protects every root's ``dying`` and each call_rcu / queue_work of a deactivation or
        # a release, so that none is queued for a root once flush_memcg_workqueue() set dying
        self.memcg_kmem_wq_lock = k.spinlock("memcg_kmem_wq_lock")
        self.nr_released = 0  # children shut down and freed

    # ------------------------------------------------------------------ charging
    def memcg_charge_slab(self, s: KmemCache, page: Page) -> None:
        """A new slab page of child ``s``: charged to its memcg (the first online one up the
        tree: it may have been reparented, or be offline), and try_charge()'s css references
        transferred to the cache: the page holds a reference on ``s``, not on the memcg."""
        k = self._k
        mc = k.memcg
        with k.rcu.read():
            memcg = s.memcg_params.memcg  # READ_ONCE: reparenting rewrites it
            while memcg is not None and not mc.css_tryget_online(memcg):
                memcg = memcg.parent
        s.memcg_params.refcnt.get_many(1)
        if memcg is not None:
            mc.css_put(memcg)

    def memcg_uncharge_slab(self, s: KmemCache, page: Page) -> None:
        """The page is gone: uncharge the cache's current memcg, then put the page's reference
        on ``s``: the last access to it (the put may release it)."""
        k = self._k
        with k.rcu.read():
            s.memcg_params.memcg  # noqa: B018  READ_ONCE(s->memcg_params.memcg): its counters
        s.memcg_params.refcnt.put_many(1)

    # ------------------------------------------------------------------ lookup
    def memcg_kmem_get_cache(self, s: KmemCache) -> KmemCache:
        """The current memcg's child of root ``s`` with a reference on it (percpu_ref_tryget),
        to be dropped by memcg_kmem_put_cache(); else ``s`` (creation queued on a miss)."""
        p = s.memcg_params
        if not s.flags & SLAB_ACCOUNT or p is None or not p.is_root_cache:
            return s
        k = self._k
        mc = k.memcg
        task = k.current()
        with k.rcu.read():
            memcg = mc.mem_cgroup_from_task(task)
            if memcg is mc.root:
                return s
            kid = memcg.kmemcg_id
            if kid < 0:
                return s
            entries = p.memcg_caches.dereference().entries
            c = entries[kid] if kid < len(entries) else None
            if c is None:
                self.memcg_schedule_kmem_cache_create(memcg, s)
            elif c.memcg_params.refcnt.tryget():
                return c
        return s

    def memcg_kmem_put_cache(self, c: KmemCache) -> None:
        if is_child(c):
            c.memcg_params.refcnt.put()

    # ------------------------------------------------------------------ creation
    def memcg_schedule_kmem_cache_create(self, memcg: MemCgroup, root: KmemCache) -> None:
        """Caller is inside rcu_read_lock(): no creation for a memcg going offline."""
        if not self._k.memcg.css_tryget_online(memcg):
            return
        queue_work(self.wq, Work(self._create_func, memcg, root,
                                 name="memcg_kmem_cache_create_func"))

    def init_child_params(self, c: KmemCache, memcg: MemCgroup,
                          root: KmemCache) -> MemcgCacheParamsV53:
        """The child's params with its percpu_ref (release: kmemcg_cache_shutdown); the child
        pins its memcg (memcg_link_cache). The rest of creation is the base class's: 5.3's
        memcg_create_kmem_cache() differs only in not looking at ``dying`` (root_dying)."""
        k = self._k
        cp = MemcgCacheParamsV53()
        k.kasan.alloc(cp, "memcg_cache_params", f"the cache {c.name}")
        cp.root_cache = root
        cp.refcnt = percpu_ref_init(k, partial(self.kmemcg_cache_shutdown, c),
                                    f"{c.name}.memcg_params.refcnt", f"the cache {c.name}")
        k.memcg.css_get(memcg)  # memcg_link_cache(): the child pins its memcg
        cp.memcg = memcg
        return cp

    def root_dying(self, root: KmemCache) -> bool:
        """5.3's memcg_create_kmem_cache() no longer looks at ``dying``."""
        return False

    # ------------------------------------------------------------------ offline
    def memcg_deactivate_kmem_caches(self, memcg: MemCgroup) -> None:
        """At offline: unpublish and deactivate every child of ``memcg``, then reparent all of
        its caches (active or not) to its parent."""
        k = self._k
        sl = k.slab
        mc = k.memcg
        parent = memcg.parent
        with sl.cpus_and_slab_mutex():
            now = time.monotonic()
            for _p, arr, idx, c in self.memcg_slots(memcg):
                self.kmemcg_cache_deactivate(c)
                arr.entries[idx] = None
                c.memcg_params.offline_at = now  # kmemleak's age (bookkeeping)
            # fb2f2b0adb98: the caches move to the parent with their css references; the
            # memcg can be freed without waiting for the last object of its caches
            moved = list(memcg.kmem_caches)
            for c in moved:
                c.memcg_params.memcg = parent  # WRITE_ONCE: chargers read it under RCU
                mc.css_put(memcg)  # not the last: the cgroup's own reference is still held
            if moved:
                parent.kmem_caches.extend(moved)
                memcg.kmem_caches.clear()
                for _ in moved:
                    mc.css_get(parent)  # css_get_many()

    def offline_children_not_deactivated(self, min_age: float = 0.0) -> list[KmemCache]:
        """This design's invariant: a child unpublished at its memcg's offline was deactivated
        (its ref killed, so it is released once its last page goes), unless a destroy of its
        root shuts it down. Catalog bug 17 in 5.3: a root left dying by the destroy of one of
        its aliases skips the deactivation; the child is never released. ``min_age`` as in
        MemcgSlab.offline_children_not_deactivated."""
        sl = self._k.slab
        now = time.monotonic()
        with sl.slab_mutex:
            return [c for c in sl.slab_caches if is_child(c)
                    and c.memcg_params.offline_at is not None
                    and not c.memcg_params.deactivated
                    and self._aged(c, c.memcg_params.offline_at, min_age, now)]

    def kmemcg_cache_deactivate(self, c: KmemCache) -> None:
        """Caller holds slab_mutex: stop caching empty slabs of ``c`` and, a grace period
        later (no get_cache lookup can still return it), shrink it and kill its ref."""
        p = c.memcg_params
        root = p.root_cache
        if root.memcg_params.dying:
            return
        c.min_partial = 0  # __kmemcg_cache_deactivate(): slub_set_cpu_partial(s, 0) too
        p.deactivated = True  # SLAB_DEACTIVATED
        with self.memcg_kmem_wq_lock:
            if root.memcg_params.dying:
                return  # flush_memcg_workqueue() will not wait for anything queued now
            p.work_fn = self.kmemcg_cache_deactivate_after_rcu
            self._k.rcu.call(self.kmemcg_rcufn, c)

    def kmemcg_rcufn(self, c: KmemCache) -> None:
        """RCU callback: bounce to a work, which may take blocking locks."""
        p = c.memcg_params
        p.work = Work(self.kmemcg_workfn, c, name="kmemcg_workfn")  # INIT_WORK here: union
        queue_work(self.wq, p.work)

    def kmemcg_workfn(self, c: KmemCache) -> None:
        """The work of a deactivation or a release: ``work_fn(c)`` under cpus -> slab_mutex;
        what it shut down is freed once both are dropped."""
        k = self._k
        with k.slab.cpus_and_slab_mutex():
            gone = c.memcg_params.work_fn(c)
        if gone:
            self._release(gone)

    def kmemcg_cache_deactivate_after_rcu(self, c: KmemCache) -> list[KmemCache]:
        """Caller holds slab_mutex: shrink (the empty slabs go, putting their references),
        then kill the ref: from the confirmation on, the last put releases the cache."""
        self._k.slab.slub.kmem_cache_shrink(c)
        self.nr_deactivated += 1
        c.memcg_params.refcnt.kill()
        return []

    # ------------------------------------------------------------------ release
    def kmemcg_cache_shutdown(self, c: KmemCache, ref: PercpuRef) -> None:
        """The percpu_ref's release: no page and no allocation in flight is left. Runs in
        whatever context dropped the last reference (the RCU callback confirming the kill, a
        freeing task, a worker): queue the shutdown, unless the root is dying (then root
        destroy shuts the child down itself)."""
        with self.memcg_kmem_wq_lock:
            p = c.memcg_params
            if p.root_cache.memcg_params.dying:
                return
            p.work_fn = self.kmemcg_cache_shutdown_fn
            p.work = Work(self.kmemcg_workfn, c, name="kmemcg_workfn")
            queue_work(self.wq, p.work)

    def kmemcg_cache_shutdown_fn(self, c: KmemCache) -> list[KmemCache]:
        """Caller holds slab_mutex: WARN_ON(shutdown_cache(c)) (busy is reported)."""
        return [c] if self._shutdown_child(c) else []

    def _release(self, gone: list[KmemCache]) -> None:
        """slab_kmem_cache_release() of children unlinked by _shutdown_child() (no lock
        held): destroy_memcg_params() (percpu_ref_exit, the memcg's css reference), free."""
        k = self._k
        if any(c.typesafe for c in gone):
            k.rcu.barrier()  # their pending rcu_free_slab() callbacks read them
        for c in gone:
            p = c.memcg_params
            ref = p.refcnt
            ref.exit()
            memcg = p.memcg
            k.event("cache_destroy", c)
            k.kasan.free(ref)  # embedded in the params
            k.kasan.free(p)
            k.kasan.free(c)
            k.memcg.css_put(memcg)  # mem_cgroup_put() in destroy_memcg_params()
            self.nr_released += 1

    # ------------------------------------------------------------------ css_free
    def memcg_destroy_kmem_caches(self, memcg: MemCgroup) -> None:
        """memcg_free_kmem(): nothing to destroy (the caches were reparented at offline);
        WARN_ON(!list_empty(&memcg->kmem_caches))."""
        if not memcg.kmem_caches:
            return
        k = self._k
        title = "WARNING: memcg_free_kmem: mem_cgroup freed with kmem caches on its list"
        names = ", ".join(c.name for c in list(memcg.kmem_caches))
        k.findings.report(F.ASSERTION, title, "memcg_free_kmem:kmem_caches",
                          lambda: banner(title, k) + f"{memcg.path}: {names}\n",
                          thread=k.current().name, extra={"memcg": memcg.path})

    # ------------------------------------------------------------------ root destroy
    # kmem_cache_destroy() is the base class's (d38a2b7a9c93's order unless bug 17 is on);
    # 5.3 differs in the lock that guards ``dying`` and in the flush (below).
    def memcg_set_kmem_cache_dying(self, s: KmemCache, locked: bool) -> None:
        """5.3: ``dying`` is guarded by memcg_kmem_wq_lock (slab_mutex -> the spinlock)."""
        with self.memcg_kmem_wq_lock:
            s.memcg_params.dying = True

    def flush_memcg_workqueue(self, s: KmemCache) -> None:
        """After ``dying`` was set: run the pending deactivation callbacks (they queue works),
        then every queued creation, deactivation and release work; the deactivations' kills
        then need one more grace period to reach atomic mode (a264df74df38)."""
        k = self._k
        k.rcu.barrier()
        self.wq.flush()
        if k.config.bug("percpu_ref_exit_while_switching"):
            return  # 5.3-5.4: the children's percpu_ref switches may still be pending
        if s.memcg_params.children:  # cannot grow any more: read without slab_mutex
            k.rcu.barrier()
