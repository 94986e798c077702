"""The v5.9 memcg kmem design: no per-memcg caches, every accounted object charged to an
obj_cgroup (the obj_cgroup series, 10befea91b61 "mm: memcg/slab: use a single set of
kmem_caches for all allocations"); docs/memcg-eras.md section 6.

One set of ``kmem_cache``s serves every memcg; the memcg layer never takes slab_mutex and
never creates, deactivates or destroys a cache. What 5.9 has instead (mm/memcontrol.c,
mm/slab.h):

* ``struct obj_cgroup`` (:class:`ObjCgroup`): a reference count (percpu_ref), an RCU pointer
  to its memcg, ``nr_charged_bytes``. A memcg gets one when its kmem goes online
  (memcg_online_kmem(): here the ``memcg_online_kmem`` hook of kmem activation,
  ``MemcgSubsys.memcg_activate_kmem``, under activate_kmem_mutex) and publishes it in its
  ``objcg`` RCU pointer (``MemCgroup.design``, a :class:`MemcgObjcg`).
* alloc (``slab_alloc``): memcg_slab_pre_alloc_hook() = get_obj_cgroup_from_current() (under
  RCU, walk up from the current task's memcg to the first objcg that a tryget succeeds on) +
  obj_cgroup_charge(objcg, obj_full_size(s)); the allocation; memcg_slab_post_alloc_hook():
  the page's obj_cgroups vector (``Page.memcg_data``, allocated on demand by cmpxchg), an
  objcg reference stored at the object's index, the pre-alloc reference put.
* free (``kmem_cache_free``): memcg_slab_free_hook(): read and clear the object's slot,
  obj_cgroup_uncharge(), obj_cgroup_put(); then the free proper. The vector is freed with the
  slab page (uncharge_slab_page() -> memcg_free_page_obj_cgroups(), called from
  ``Slub.free_slab`` before the page goes back: pages are reused).
* offline (``memcg_deactivate_kmem_caches`` hook, activate_kmem_mutex held):
  memcg_reparent_objcgs(): the memcg's objcg is unpublished (rcu_replace_pointer), pointed at
  the parent and put on the parent's ``objcg_list`` together with the objcgs of offlined
  descendants already on the memcg's list; then its initial reference is killed. The last
  reference (the last object freed) runs obj_cgroup_release(): flush leftover bytes,
  list_del, css reference dropped, kfree_rcu().
* css references as in 5.9: the objcg of an online memcg holds none (the memcg owns it); a
  reparented objcg holds one on the memcg it points at, moved at each reparenting and dropped
  at release. So an offline memcg is freed once the last object charged to it is freed.

Charges are modelled as hierarchical kmem counters (page_counter) per memcg, in bytes: a
charge adds ``obj_full_size`` (s->size + sizeof(struct obj_cgroup *)) to the objcg's memcg and
every ancestor, the uncharge takes it from the objcg's memcg at that time (the parent once
reparented) and its ancestors. So for every online memcg, its counter equals the full sizes of
the live objects charged to objcgs that point into its subtree; an offline memcg's counter is
stale (it keeps charges uncharged at its parent since), as the kernel's is.

Differences from 5.9:

* No per-CPU byte stock (consume_obj_stock/refill_obj_stock/drain_obj_stock) and no page
  rounding: the counters are in bytes, and ``nr_charged_bytes`` holds the bytes charged
  through the objcg and not yet uncharged (the kernel keeps only the sub-page leftovers of
  drained stocks there). obj_cgroup_release() still flushes what is left; with every object
  freed it must be 0, so a leftover is reported (the kernel's WARN_ON_ONCE(nr_bytes &
  (PAGE_SIZE - 1))).
* obj_cgroup_charge() pins the memcg with get_mem_cgroup_from_objcg()'s css_tryget() retry
  (5.13) instead of 5.9's css_get(): a charger that read the memcg just before its objcg was
  reparented could otherwise css_get() a memcg whose last reference was gone ("addition on 0").
* get_obj_cgroup_from_current() resets ``objcg`` on a failed tryget (the later fix "fix return
  of child memcg objcg for root memcg"): 5.9 could return an objcg it holds no reference on.
* A memcg that never had its kmem activated has no objcg (5.9: every non-root memcg does);
  its tasks charge the nearest ancestor that has one. Such a memcg does not reparent at
  offline (memcg_offline_kmem() only runs for a kmem-online memcg), so objcgs reparented to it
  keep it as a zombie until their last object goes.

Lock order: activate_kmem_mutex -> css_set_lock (spin; also taken from obj_cgroup_release(),
which runs wherever the last reference is put, RCU callbacks included); the counters and the
cmpxchg stand-in are raw locks taken innermost.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kmemcg.core import findings as F
from kmemcg.core.kasan import Kasan, KasanObject
from kmemcg.core.refcount import Refcount
from kmemcg.core.report import banner
from kmemcg.core.stacks import format_stack
from kmemcg.mm.memcg_slab import MemcgSlab

if TYPE_CHECKING:
    from kmemcg.kernel import Kernel
    from kmemcg.mm.memcontrol import MemCgroup
    from kmemcg.mm.page_alloc import Page
    from kmemcg.mm.slub import KmemCache, SlabObject

OBJ_CGROUP_PTR_SIZE = 8  # sizeof(struct obj_cgroup *), the per-object vector slot


def obj_full_size(s: KmemCache) -> int:
    """obj_full_size(): what an object costs its memcg, its slot in the vector included."""
    return s.size + OBJ_CGROUP_PTR_SIZE


class ObjcgRef:
    """percpu_ref as obj_cgroup uses it: ``tryget``/``get``/``put``, and ``kill`` (drop the
    initial reference once the switch to atomic mode completes, a grace period later; a
    second kill WARNs). The count is a refcount_t model, so a get on a released objcg is a
    REFCOUNT finding ("addition on 0"). Not kmemcg.core.percpu_ref: this design needs only
    this much and must not depend on it."""

    __slots__ = ("_k", "count", "dead", "_release", "_lock")

    def __init__(self, k: Kernel, name: str, release: Any) -> None:
        self._k = k
        self.count = Refcount(k, name, 1)  # the initial reference (percpu_ref_init)
        self.dead = False  # _lock
        self._release = release
        self._lock = k.raw_lock()

    def tryget(self) -> bool:
        """percpu_ref_tryget(): fails only once the count reached zero (not _live: a killed
        objcg still serves, its memcg is the parent by then)."""
        return self.count.inc_not_zero()

    def get(self) -> None:
        self.count.inc()

    def put(self) -> None:
        if self.count.dec_and_test():
            self._release()

    def kill(self) -> None:
        """percpu_ref_kill(): the initial reference goes once every CPU's count is folded
        into the atomic one, after a grace period (call_rcu from the switch)."""
        with self._lock:
            again, self.dead = self.dead, True
        if again:
            k = self._k
            title = f"percpu_ref_kill() called more than once on {self.count.name}!"
            k.findings.report(F.ASSERTION, title, f"percpu_ref_kill:{self.count.name}",
                              lambda: banner(title, k), thread=k.current().name)
            return
        self._k.rcu.call(self.put)


class ObjCgroup(KasanObject):
    """struct obj_cgroup. ``memcg`` is an RCU pointer written under css_set_lock
    (reparenting) and read under rcu_read_lock(); ``nr_charged_bytes`` is an atomic (its own
    raw lock)."""

    __slots__ = ("refcnt", "memcg", "nr_charged_bytes", "_bytes_lock", "serial")

    def __init__(self, k: Kernel, memcg: MemCgroup, serial: int, release: Any) -> None:
        self.serial = serial
        self.refcnt = ObjcgRef(k, f"obj_cgroup({memcg.path}#{serial}).refcnt",
                               lambda: release(self))
        self.memcg = k.rcu.pointer(memcg, f"obj_cgroup#{serial}.memcg")
        self.nr_charged_bytes = 0
        self._bytes_lock = k.raw_lock()

    def __repr__(self) -> str:
        return f"<obj_cgroup #{object.__getattribute__(self, 'serial')}>"

    def add_bytes(self, n: int) -> None:
        with self._bytes_lock:  # atomic_add
            self.nr_charged_bytes += n


class ObjCgroupVector(KasanObject):
    """page->obj_cgroups: one objcg pointer per object slot of a slab page. A slot is written
    only by whoever owns the object (the allocator after the allocation, the freer before the
    free), ordered by the slab's own locks, so slots need no lock."""

    __slots__ = ("slots",)

    def __init__(self, n: int) -> None:
        self.slots: list[ObjCgroup | None] = [None] * n


class MemcgObjcg:
    """The memcg's 5.9 fields (``MemCgroup.design``): ``objcg`` (RCU pointer, NULL from
    offline on), ``objcg_list`` (objcgs of offlined descendants reparented here, and its own
    once it went offline: css_set_lock) and the kmem counter (``kmem``, bytes, hierarchical:
    its raw lock stands for the page_counter's atomics)."""

    __slots__ = ("objcg", "objcg_list", "kmem", "_kmem_lock")

    def __init__(self, k: Kernel, memcg: MemCgroup) -> None:
        self.objcg = k.rcu.pointer(None, f"{memcg.path}.objcg")
        self.objcg_list: list[ObjCgroup] = []
        self.kmem = 0
        self._kmem_lock = k.raw_lock()


class ObjCgroupV59(MemcgSlab):
    """``k.memcg_slab`` for the v5.9 design (see the module docstring)."""

    def __init__(self, k: Kernel) -> None:
        # Not MemcgSlab.__init__: 5.9 has no memcg_kmem_cache workqueue.
        self._k = k
        self.wq = None
        self.nr_created = 0  # per-memcg caches created: none, ever (stress summary)
        self.nr_deactivated = 0
        self.css_set_lock = k.spinlock("css_set_lock")
        self._cmpxchg = k.raw_lock()  # stands for cmpxchg(&page->obj_cgroups, NULL, vec)
        self._state_lock = k.raw_lock()  # creates MemCgroup.design once
        self._serial_lock = k.raw_lock()
        self._serial = 0
        self.nr_objcgs = 0  # obj_cgroups allocated (_serial_lock)
        self.nr_objcgs_released = 0  # obj_cgroup_release() runs (css_set_lock)
        self.nr_charge_retries = 0  # css_tryget() failures in obj_cgroup_charge (_serial_lock)
        self.state(k.memcg.root)

    # ------------------------------------------------------------------ per-memcg state
    def state(self, m: MemCgroup) -> MemcgObjcg:
        """``m``'s 5.9 fields, made on first use. Written once, fully built, under
        _state_lock (a publish); a reader that sees None takes the lock and looks again."""
        st = m.design
        if st is None:
            with self._state_lock:
                st = m.design
                if st is None:
                    st = m.design = MemcgObjcg(self._k, m)
        return st

    # ------------------------------------------------------------------ slab hooks
    def init_memcg_params(self, s: KmemCache) -> None:
        """No memcg_params in 5.9: a cache is only ever a root, and slab_common's
        kmem_cache_destroy() then takes its plain path for it."""
        s.memcg_params = None

    def slab_alloc(self, s: KmemCache) -> SlabObject:
        """slab_alloc() of an accounted cache: the pre-alloc hook charges, the post-alloc
        hook records the objcg in the object's slot."""
        slub = self._k.slab.slub
        objcg = self.memcg_slab_pre_alloc_hook(s)
        if objcg is None:
            return slub.slab_alloc_node(s)
        try:
            obj = slub.slab_alloc_node(s)
        except BaseException:
            # the allocation failed (or the kernel is torn down): the post-alloc hook's
            # "!p[i]" branch
            self.obj_cgroup_uncharge(objcg, obj_full_size(s))
            self.obj_cgroup_put(objcg)
            raise
        self.memcg_slab_post_alloc_hook(s, objcg, obj)
        return obj

    def kmem_cache_free(self, s: KmemCache, obj: SlabObject) -> None:
        """slab_free(): memcg_slab_free_hook() first, then the free proper (which is where
        KASAN catches a double or invalid free: this hook must not touch such an object)."""
        if not Kasan.is_freed(obj) and obj.allocated and obj.cache is s:
            self.memcg_slab_free_hook(s, obj)
        self._k.slab.free_to_cache(s, obj)

    def memcg_charge_slab(self, s: KmemCache, page: Page) -> None:
        raise RuntimeError("v5.9 has no per-memcg child caches to charge slab pages to")

    def memcg_uncharge_slab(self, s: KmemCache, page: Page) -> None:
        raise RuntimeError("v5.9 has no per-memcg child caches to uncharge slab pages of")

    def memcg_update_all_caches(self, num: int) -> None:
        """memcg_alloc_cache_id() grew the id space (activate_kmem_mutex held): 5.9 only
        resizes the list_lrus there (not modelled); there is no cache array to grow."""
        self._k.memcg.nr_cache_ids = num

    def memcg_online_kmem(self, m: MemCgroup) -> None:
        """memcg_online_kmem() (activate_kmem_mutex held): the memcg's obj_cgroup, published
        in ``m.design.objcg``. It holds no css reference on ``m``: the memcg owns it."""
        k = self._k
        st = self.state(m)
        with self._serial_lock:
            self._serial += 1
            serial = self._serial
            self.nr_objcgs += 1
        objcg = ObjCgroup(k, m, serial, self.obj_cgroup_release)
        k.kasan.alloc(objcg, "obj_cgroup", f"the memcg {m.path} (obj_cgroup_alloc)")
        old = st.objcg.assign(objcg)  # rcu_assign_pointer
        assert old is None, f"{m.path} already has an obj_cgroup"
        k.event("objcg_alloc", objcg)

    def memcg_deactivate_kmem_caches(self, m: MemCgroup) -> None:
        """memcg_offline_kmem() (activate_kmem_mutex held): reparent the objcgs."""
        parent = m.parent if m.parent is not None else self._k.memcg.root
        self.memcg_reparent_objcgs(m, parent)

    def memcg_destroy_kmem_caches(self, m: MemCgroup) -> None:
        """css_free: every objcg that pointed at ``m`` was reparented or released (each held
        a css reference on it); anything left is a bug worth a WARN."""
        st = m.design
        if st is None:
            return
        with self.css_set_lock:
            left = st.objcg.protected(True) is not None or bool(st.objcg_list)
        if left:
            k = self._k
            title = f"WARNING: memcg {m.path} freed with obj_cgroups still attached"
            k.findings.report(F.ASSERTION, title, "mem_cgroup_css_free:objcg",
                              lambda: banner(title, k), thread=k.current().name)

    def kmem_cache_destroy(self, s: KmemCache) -> None:
        """5.9's kmem_cache_destroy() has no memcg part: the plain path (slab_common routes
        only caches with memcg_params here, which 5.9 never has)."""
        self._k.slab.destroy_plain(s)

    # ------------------------------------------------------------------ objcg lookup
    def get_obj_cgroup_from_current(self) -> ObjCgroup | None:
        """The first objcg, from the current task's memcg up, that a tryget succeeds on;
        None in the root memcg (not accounted)."""
        k = self._k
        mc = k.memcg
        root = mc.root
        with k.rcu.read():
            memcg = mc.mem_cgroup_from_task(k.current())
            while memcg is not root and memcg is not None:
                st = memcg.design
                objcg = st.objcg.dereference() if st is not None else None
                k.window("get_obj_cgroup_from_current:objcg")
                if objcg is not None and objcg.refcnt.tryget():
                    return objcg
                memcg = memcg.parent
        return None

    def obj_cgroup_get(self, objcg: ObjCgroup) -> None:
        objcg.refcnt.get()

    def obj_cgroup_put(self, objcg: ObjCgroup) -> None:
        objcg.refcnt.put()

    # ------------------------------------------------------------------ charges
    def get_mem_cgroup_from_objcg(self, objcg: ObjCgroup) -> MemCgroup:
        """The objcg's memcg with a css reference: css_tryget() fails only on a memcg whose
        last reference went, which the objcg no longer points at (reparenting moves the
        pointer before it drops the reference): read it again."""
        k = self._k
        while True:
            with k.rcu.read():
                memcg = objcg.memcg.dereference()
                k.window("obj_cgroup_charge:memcg")
                if k.memcg.css_tryget(memcg):
                    return memcg
            with self._serial_lock:
                self.nr_charge_retries += 1

    def obj_cgroup_charge(self, objcg: ObjCgroup, size: int) -> int:
        """Charge ``size`` bytes to the objcg's memcg (and its ancestors). 0: never fails
        (no limits in the model)."""
        memcg = self.get_mem_cgroup_from_objcg(objcg)
        try:
            self._counter_charge(memcg, size)
            objcg.add_bytes(size)
        finally:
            self._k.memcg.css_put(memcg)
        return 0

    def obj_cgroup_uncharge(self, objcg: ObjCgroup, size: int) -> None:
        """Uncharge from the memcg the objcg points at now (the parent once reparented): a
        memcg read under RCU stays valid for the section (css_free is RCU-delayed)."""
        k = self._k
        objcg.add_bytes(-size)
        with k.rcu.read():
            memcg = objcg.memcg.dereference()
            k.window("obj_cgroup_uncharge:memcg")
            self._counter_uncharge(memcg, size)

    def _counter_charge(self, memcg: MemCgroup, n: int) -> None:
        """page_counter_charge(): the memcg and every ancestor."""
        m: MemCgroup | None = memcg
        while m is not None:
            st = self.state(m)
            with st._kmem_lock:
                st.kmem += n
            m = m.parent

    def _counter_uncharge(self, memcg: MemCgroup, n: int) -> None:
        """page_counter_uncharge(): a counter going negative is the kernel's
        WARN_ONCE(new < 0, "page_counter underflow")."""
        m: MemCgroup | None = memcg
        while m is not None:
            st = self.state(m)
            with st._kmem_lock:
                st.kmem -= n
                bad = st.kmem < 0
            if bad:
                self._warn("page_counter underflow", f"page_counter:{m.path}",
                           f"kmem counter of {m.path} went negative\n")
            m = m.parent

    def kmem_usage(self, m: MemCgroup) -> int:
        """memory.kmem.usage_in_bytes of ``m`` (its subtree's charges)."""
        st = self.state(m)
        with st._kmem_lock:
            return st.kmem

    # ------------------------------------------------------------------ slab hooks (5.9)
    def memcg_slab_pre_alloc_hook(self, s: KmemCache) -> ObjCgroup | None:
        """The objcg to charge, with a reference, the object's full size charged; None:
        not accounted (root memcg)."""
        objcg = self.get_obj_cgroup_from_current()
        if objcg is None:
            return None
        if self.obj_cgroup_charge(objcg, obj_full_size(s)):
            self.obj_cgroup_put(objcg)
            return None
        return objcg

    def memcg_slab_post_alloc_hook(self, s: KmemCache, objcg: ObjCgroup,
                                   obj: SlabObject) -> None:
        """Record ``objcg`` (one more reference) in the object's slot; put the pre-alloc
        reference."""
        k = self._k
        page = obj.page
        vec = page.memcg_data
        if vec is None:
            vec = self.memcg_alloc_page_obj_cgroups(page, s)
        self.obj_cgroup_get(objcg)
        k.window("memcg_slab_post_alloc_hook:store")
        vec.slots[obj.idx] = objcg  # page_obj_cgroups(page)[obj_to_index()] = objcg
        k.event("objcg_charge", obj)
        self.obj_cgroup_put(objcg)

    def memcg_slab_free_hook(self, s: KmemCache, obj: SlabObject) -> None:
        """Read and clear the object's slot; uncharge and put what was there."""
        k = self._k
        vec = obj.page.memcg_data
        if vec is None:
            return  # allocated unaccounted (root memcg): no vector on its page
        objcg = vec.slots[obj.idx]
        if objcg is None:
            return
        vec.slots[obj.idx] = None
        k.window("memcg_slab_free_hook:cleared")
        self.obj_cgroup_uncharge(objcg, obj_full_size(s))
        k.event("objcg_uncharge", obj)
        self.obj_cgroup_put(objcg)

    def memcg_alloc_page_obj_cgroups(self, page: Page, s: KmemCache) -> ObjCgroupVector:
        """The page's vector, made on demand: a loser of the cmpxchg frees its own."""
        k = self._k
        vec = ObjCgroupVector(s.objects_per_slab)
        k.kasan.alloc(vec, "obj_cgroups vector", f"the slab page of cache {s.name}")
        with self._cmpxchg:
            cur = page.memcg_data
            if cur is None:
                page.memcg_data = vec
                return vec
        k.kasan.free(vec)
        return cur

    def memcg_free_page_obj_cgroups(self, page: Page) -> None:
        """uncharge_slab_page(): the slab page is going back to the page allocator (every
        object freed, so every slot cleared): free the vector, clear page->obj_cgroups."""
        vec, page.memcg_data = page.memcg_data, None
        if vec is None:
            return
        if any(o is not None for o in vec.slots):
            self._warn("obj_cgroups vector freed with a charged slot",
                       "memcg_free_page_obj_cgroups", "a freed slab page still references "
                       "an obj_cgroup: its reference and charge leak\n")
        self._k.kasan.free(vec)

    # ------------------------------------------------------------------ offline / release
    def memcg_reparent_objcgs(self, memcg: MemCgroup, parent: MemCgroup) -> None:
        """Unpublish ``memcg``'s objcg, point it and every objcg on ``memcg``'s list at
        ``parent`` (css references moved), splice them onto ``parent``'s list, then kill
        the objcg's initial reference."""
        k = self._k
        mc = k.memcg
        st, pst = self.state(memcg), self.state(parent)
        objcg = st.objcg.assign(None)  # rcu_replace_pointer(memcg->objcg, NULL)
        if objcg is None:
            return
        k.window("memcg_reparent_objcgs:unpublished")
        with self.css_set_lock:
            objcg.memcg.assign(parent)  # xchg(&objcg->memcg, parent)
            mc.css_get(parent)  # the online memcg's own objcg held none on memcg
            pst.objcg_list.append(objcg)
            for it in st.objcg_list:
                mc.css_get(parent)
                it.memcg.assign(parent)
                mc.css_put(memcg)  # memcg keeps its base reference until offline ends
            pst.objcg_list.extend(st.objcg_list)
            st.objcg_list.clear()
        k.event("objcg_reparent", objcg)
        objcg.refcnt.kill()

    def obj_cgroup_release(self, objcg: ObjCgroup) -> None:
        """The last reference went (any context): flush what is still charged, unlink,
        drop the css reference, free after a grace period (kfree_rcu: readers of
        memcg->objcg may still hold the pointer)."""
        k = self._k
        with objcg._bytes_lock:
            left, objcg.nr_charged_bytes = objcg.nr_charged_bytes, 0
        if left:
            self._warn("obj_cgroup released with bytes still charged",
                       "obj_cgroup_release:nr_charged_bytes",
                       f"{objcg!r}: {left} bytes charged and no object left\n")
        with self.css_set_lock:
            memcg = objcg.memcg.protected(self.css_set_lock)
            if left:
                self._counter_uncharge(memcg, left)
            st = self.state(memcg)
            if objcg in st.objcg_list:
                st.objcg_list.remove(objcg)
            self.nr_objcgs_released += 1
            k.memcg.css_put(memcg)  # mem_cgroup_put()
        k.event("objcg_release", objcg)
        k.rcu.call(k.kasan.free, objcg)

    # ------------------------------------------------------------------ reports
    def _warn(self, what: str, signature: str, text: str) -> None:
        k = self._k
        title = f"WARNING: {what}"
        stack = k.stacks.capture(2)
        k.findings.report(F.ASSERTION, title, signature,
                          lambda: banner(title, k) + text + "Call Trace:\n"
                          + format_stack(stack), thread=k.current().name)
