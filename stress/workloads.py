"""Stress workloads: what each driver thread does, one operation per call.

Until the slab and memcg layers exist, the workloads exercise the locking layer with the lock
classes of the slab / memcg world in their documented order (fixed kernel, seed 001):

    cpu_hotplug.lock -> activate_kmem_mutex -> memcg_slab_mutex -> slab_mutex

``locks`` takes random ordered subsets of them (sometimes unlocking out of order, sometimes a
trylock against the order, which lockdep allows) and must stay clean for any seed.
``lockdep-demo`` adds the 2012 inversion of seed 004 (slab_mutex held across rcu_barrier(),
which took the hotplug lock; the hotplug path took slab_mutex in a notifier): lockdep reports it
without the run ever deadlocking. Only those two operations take the hotplug lock in this
workload, and both run under a gate lock (as cpu_hotplug.refcount kept them apart in 2012: an
exclusion lockdep cannot see), so the inversion is real to lockdep and harmless to the run.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from kmemcg import Kernel
from kmemcg.locking.mutex import Mutex

ORDER = ("cpu_hotplug.lock", "activate_kmem_mutex", "memcg_slab_mutex", "slab_mutex")


@dataclass
class LockWorld:
    """The locks a workload shares: several instances per class, as many caches would have."""

    k: Kernel
    locks: dict[str, list[Mutex]] = field(default_factory=dict)

    @classmethod
    def build(cls, k: Kernel, instances: int = 4) -> LockWorld:
        w = cls(k)
        for name in ORDER:
            w.locks[name] = [k.mutex(name)] if name != "memcg_slab_mutex" else \
                [k.mutex(name) for _ in range(instances)]
        w.locks["gate"] = [k.mutex("hotplug_refcount_gate")]
        return w


Op = Callable[[LockWorld, random.Random, Counter], None]


def op_ordered(w: LockWorld, rng: random.Random, ops: Counter, order: tuple = ORDER) -> None:
    """Take a random subset of the classes in order; release in or out of order."""
    chosen = [rng.choice(w.locks[n]) for n in order if rng.random() < 0.6]
    for m in chosen:
        m.lock()
        w.k.window("locks:held")
    if rng.random() < 0.3:
        rng.shuffle(chosen)  # out-of-order unlock is allowed
    else:
        chosen.reverse()
    for m in chosen:
        m.unlock()
    ops["lock"] += len(chosen)


def op_ordered_memcg(w: LockWorld, rng: random.Random, ops: Counter) -> None:
    """The same, without the hotplug lock."""
    op_ordered(w, rng, ops, ORDER[1:])


def op_trylock_reverse(w: LockWorld, rng: random.Random, ops: Counter) -> None:
    """slab_mutex, then *try* the hotplug lock against the order: a trylock cannot deadlock."""
    a, b = w.locks["slab_mutex"][0], w.locks["cpu_hotplug.lock"][0]
    with a:
        if b.trylock():
            b.unlock()
            ops["trylock"] += 1
    ops["lock"] += 1


def op_destroy_2012(w: LockWorld, rng: random.Random, ops: Counter) -> None:
    """kmem_cache_destroy() of 3.6: slab_mutex held across rcu_barrier() -> hotplug lock."""
    with w.locks["gate"][0], w.locks["slab_mutex"][0], w.locks["cpu_hotplug.lock"][0]:
        ops["lock"] += 2


def op_cpu_up_2012(w: LockWorld, rng: random.Random, ops: Counter) -> None:
    """_cpu_up(): cpu_hotplug.lock kept through the notifiers; SLAB's takes slab_mutex."""
    with w.locks["gate"][0], w.locks["cpu_hotplug.lock"][0], w.locks["slab_mutex"][0]:
        ops["lock"] += 2


WORKLOADS: dict[str, list[tuple[Op, float]]] = {
    "locks": [(op_ordered, 0.9), (op_trylock_reverse, 0.1)],
    "lockdep-demo": [(op_ordered_memcg, 0.8), (op_trylock_reverse, 0.1),
                     (op_destroy_2012, 0.05), (op_cpu_up_2012, 0.05)],
}


def pick(workload: str, rng: random.Random) -> Op:
    ops, weights = zip(*WORKLOADS[workload])
    return rng.choices(ops, weights)[0]
