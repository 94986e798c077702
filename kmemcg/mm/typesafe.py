"""The SLAB_TYPESAFE_BY_RCU reader pattern (Documentation/RCU/rculist_nulls.rst, seed 003).

An object of a TYPESAFE_BY_RCU cache reached under rcu_read_lock() may be freed and reused for
another object *of the same cache* at any moment, but its memory stays an object of that type
until a grace period after its slab page was freed. So a reader may lock it (the lock lives in
the object and survives reuse) and must then check that it is still the object it looked for,
retrying if not.

:class:`TypesafeTable` is the lookup structure such a subsystem keeps: a dict published with
rcu_assign_pointer() (copy on write, updaters serialized by a mutex), read lock-free.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kmemcg.kernel import Kernel
    from kmemcg.mm.slub import KmemCache, SlabObject

MAX_RETRIES = 100


class TypesafeTable:
    def __init__(self, k: Kernel, name: str) -> None:
        self._k = k
        self.mutex = k.mutex(f"{name}.mutex")
        self._ptr = k.rcu.pointer({}, name)

    def insert(self, key: Any, obj: SlabObject) -> None:
        with self.mutex:
            d = dict(self._ptr.protected(self.mutex))
            d[key] = obj
            self._ptr.assign(d)

    def remove(self, key: Any) -> SlabObject | None:
        with self.mutex:
            d = dict(self._ptr.protected(self.mutex))
            obj = d.pop(key, None)
            self._ptr.assign(d)
            return obj

    def lookup_rcu(self, key: Any) -> SlabObject | None:
        """Caller is inside rcu_read_lock()."""
        return self._ptr.dereference().get(key)


def typesafe_lookup(k: Kernel, table: TypesafeTable, key: Any) -> SlabObject | None:
    """Find ``key`` under rcu_read_lock(), lock the object, revalidate; retry when it changed
    identity. Returns the object *locked* (the caller unlocks ``obj.lock``), or None."""
    for _ in range(MAX_RETRIES):
        with k.rcu.read():
            obj = table.lookup_rcu(key)
            if obj is None:
                return None
            k.window("typesafe_lookup:found")  # the object may be freed and reused here
            obj.lock.lock()
            # Revalidate before rcu_read_unlock(): holding its lock does not keep a *free*
            # object's memory alive (a grace period after we leave, its empty slab page may
            # go back to the page allocator). Once it is found allocated with our key it is
            # pinned: deleting it needs the lock we hold.
            if obj.allocated and obj.key == key:
                return obj
            obj.lock.unlock()  # freed, or now another object of the cache: look again
    return None


def typesafe_insert(k: Kernel, s: KmemCache, table: TypesafeTable, key: Any,
                    payload: Any = None) -> SlabObject:
    """Allocate an object, give it its identity under its lock, publish it."""
    obj = k.slab.kmem_cache_alloc(s)
    with obj.lock:
        obj.key = key
        obj.payload = payload
    table.insert(key, obj)
    return obj


def typesafe_delete(k: Kernel, s: KmemCache, table: TypesafeTable, key: Any) -> bool:
    """Unpublish, clear the identity under the object's lock, free. Readers that found it
    before it was unpublished see the key gone and retry."""
    obj = table.remove(key)
    if obj is None:
        return False
    with obj.lock:
        obj.key = None
    k.slab.kmem_cache_free(s, obj)
    return True
