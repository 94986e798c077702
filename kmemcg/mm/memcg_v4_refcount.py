"""Seed 000's alternative to the 4.18 fix (v1 21 May 2018, v2 "shared_count"): a real lifetime
refcount on root caches; docs/memcg-eras.md section 4.2, catalog bug 12.

The v4 design (:class:`kmemcg.mm.memcg_slab.MemcgSlab`) with ``struct kmem_cache.refcount``
split in two, as Andrew Morton's review asked them to be told apart:

``lifetime_ref`` (refcount_t, any context)
    Who keeps the root alive: 1 per alias (its creator, then each merge, taken with
    ``kmem_cache_tryget()`` in __kmem_cache_alias()), plus 1 per queued child creation and per
    pending child deactivation (the asynchronous memcg work of seed 000's GPF). The last
    ``kmem_cache_put()`` destroys the root (``__kmem_cache_destroy``), from whichever context
    drops it: a module's kmem_cache_destroy() or a worker finishing a queued work.
``alias_count`` (int, ``slab_mutex``)
    How many kmem_cache_create() callers share the root; memcg_create_kmem_cache() reads 0 as
    "root requested to be destroyed" and creates no child. Every write asserts slab_mutex
    (``lockdep_assert_held``), the rule the review asked for.

``kmem_cache_destroy(s)``: ``alias_count--`` under slab_mutex, then ``kmem_cache_put(s)``.
``__kmem_cache_destroy(s)``: cpus -> slab_mutex; ``VM_BUG_ON(s->alias_count)`` (an ASSERTION
finding; the BUG kills the destroying task, so the model leaves the cache where it is: a leak
kmemleak reports); shut the children down, then the root.

No ``dying`` flag and no flush: nothing asynchronous can reach a root it did not pin. A doomed
root stays on slab_caches until its last put, so kmem_cache_create() may merge into it and
resurrect it (the tryget succeeds while pins remain): "alias count 0" no longer means "freed".

Bug switch restored here: ``alias_count_dec_without_slab_mutex`` (12; v1/v2: "It is safe to
decrement shared_count without any lock"): the decrement in kmem_cache_destroy() is a plain
read then write, with no lock; a concurrent merge (slab_mutex) or destroy is lost. Found by
the VM_BUG_ON at the last put (the alias count is not zero: 1 after a lost decrement, -1 after
a lost increment) and by kmemleak (the root the BUG() left behind, with its children). The
lifetime refcount itself stays right (refcount_t is atomic), so no refcount_t WARNING here.

Model differences: a busy root (objects left) is reported as in the v4 design and given back
its alias and reference so that its owner can free the objects and destroy it again.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kmemcg.core import findings as F
from kmemcg.core.refcount import Refcount
from kmemcg.core.report import banner
from kmemcg.core.stacks import format_stack
from kmemcg.mm.memcg_slab import MemcgSlab
from kmemcg.mm.slab_common import DestroyLocks
from kmemcg.mm.slub import SLAB_ACCOUNT, KmemCache

if TYPE_CHECKING:
    from kmemcg.mm.memcontrol import MemCgroup


def _counted(s: KmemCache) -> bool:
    """A root whose lifetime this design counts: accounted (the only roots memcg work pins;
    the others are destroyed by slab_common's plain alias-count path)."""
    return bool(s.flags & SLAB_ACCOUNT) and s.lifetime_ref is not None


class MemcgSlabRefcount(MemcgSlab):
    """``k.memcg_slab`` of the v4.18-refcount preset."""

    # ------------------------------------------------------------------ the two counts
    def init_memcg_params(self, s: KmemCache) -> None:
        super().init_memcg_params(s)
        if s.flags & SLAB_ACCOUNT:
            s.lifetime_ref = Refcount(self._k, "kmem_cache.refcount", 1)  # its creator

    def kmem_cache_tryget(self, s: KmemCache) -> bool:
        """refcount_inc_not_zero(): fails once the last put started the destruction."""
        return s.lifetime_ref.inc_not_zero()

    def kmem_cache_put(self, s: KmemCache) -> None:
        if s.lifetime_ref.dec_and_test():
            self.__kmem_cache_destroy(s)

    def _alias_add(self, s: KmemCache, delta: int) -> None:
        """Every write of alias_count: slab_mutex held (the review's rule)."""
        self._k.lockdep.assert_held(self._k.slab.slab_mutex)
        s.alias_count += delta

    def kmem_cache_alias(self, s: KmemCache) -> bool:
        """__kmem_cache_alias() (slab_mutex held): ``if (s && kmem_cache_tryget(s))
        alias_count++``; a root already on its way out is not merged into."""
        if not _counted(s):
            return super().kmem_cache_alias(s)
        if not self.kmem_cache_tryget(s):
            return False
        self._alias_add(s, 1)
        return True

    def root_dying(self, root: KmemCache) -> bool:
        """memcg_create_kmem_cache(): "root requested to be destroyed while its memcg cache
        was in creation queue" (slab_mutex held)."""
        return not root.alias_count

    # ------------------------------------------------------------------ pins
    def memcg_schedule_kmem_cache_create(self, memcg: MemCgroup, root: KmemCache) -> None:
        """The queued creation pins the root; no pin, no creation (the root is going)."""
        if not self.kmem_cache_tryget(root):
            return
        super().memcg_schedule_kmem_cache_create(memcg, root)

    def _create_func(self, memcg: MemCgroup, root: KmemCache) -> None:
        try:
            super()._create_func(memcg, root)
        finally:
            self.kmem_cache_put(root)  # may be the last: destroys the root from here

    def slab_deactivate_memcg_cache_rcu_sched(self, c: KmemCache, memcg: MemCgroup) -> None:
        """The deactivation (RCU callback, then a work) pins the root of ``c``: its last
        put cannot free ``c`` under the work."""
        if not self.kmem_cache_tryget(c.memcg_params.root_cache):
            return  # the root is being destroyed: it shuts c down itself
        super().slab_deactivate_memcg_cache_rcu_sched(c, memcg)

    def _deactivate_workfn(self, c: KmemCache) -> None:
        root = c.memcg_params.root_cache  # read first: the put may free c and the root
        try:
            super()._deactivate_workfn(c)
        finally:
            self.kmem_cache_put(root)

    # ------------------------------------------------------------------ destroy
    def kmem_cache_destroy(self, s: KmemCache) -> None:
        """kmem_cache_destroy() of an accounted root: one alias less, one reference less."""
        k = self._k
        if k.config.bug("alias_count_dec_without_slab_mutex"):
            # seed 000 v1/v2: "safe to decrement without any lock": a plain read-modify-
            # write racing with merges (slab_mutex) and other destroys (no lock)
            v = s.alias_count
            k.window("kmem_cache_destroy:alias_dec_unlocked")
            s.alias_count = v - 1
        else:
            with k.slab.slab_mutex:
                self._alias_add(s, -1)
        self.kmem_cache_put(s)

    def __kmem_cache_destroy(self, s: KmemCache) -> None:
        """The last reference went: shut the children and the root down."""
        k = self._k
        sl = k.slab
        with DestroyLocks(sl) as held:
            if s.alias_count:
                self._vm_bug_on_alias_count(s)
                return  # BUG(): the task dies here; the root is never freed
            ok, children = self.shutdown_memcg_caches(s)
            held.after_unlock(lambda: self.release(children))
            if not ok:  # a child still has objects (reported): the root stays
                self._give_back(s)
                return
            if not sl.shutdown_cache(s, held):
                # busy (reported; shutdown_cache gave the alias back) or unlinked already
                if s.on_list:
                    s.lifetime_ref.set(1)

    def _give_back(self, s: KmemCache) -> None:
        """Model only: a busy root gets its last alias and reference back so that its owner
        can free the objects and destroy it again (slab_mutex held)."""
        self._alias_add(s, 1)
        s.lifetime_ref.set(1)

    def _vm_bug_on_alias_count(self, s: KmemCache) -> None:
        k = self._k
        task = k.current()
        n = s.alias_count
        title = "kernel BUG at mm/slab_common.c: VM_BUG_ON(s->alias_count) in " \
                "__kmem_cache_destroy"
        stack = k.stacks.capture(2)
        k.findings.report(
            F.ASSERTION, title, "VM_BUG_ON:alias_count@__kmem_cache_destroy",
            lambda: (banner(title, k) + f"cache {s.name}: last reference dropped with "
                     f"alias_count {n} (expected 0): an alias_count update was lost\n"
                     "invalid opcode: 0000 [#1] SMP\nCall Trace:\n" + format_stack(stack)),
            thread=task.name, extra={"cache": s.name, "alias_count": n})
