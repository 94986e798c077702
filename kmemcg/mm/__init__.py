"""The memory-management model: page allocator, SLUB, slab_common, and (next) memcg.

Built on the primitives (locking, RCU, workqueues, CPU hotplug) and checked by KASAN and
refcount_t from kmemcg.core.
"""
