"""The bug catalog: every historical bug the model can switch back on.

Each entry names the switch (``Kernel(config=Config.make(preset, bugs=[...]))``), the era and
source (seed file or commit), what goes wrong, the detector expected to catch it (a finding
kind: the detectors never read the switch), and the minimal interleaving, which the tests force
with breakpoints at the named race window.
"""

from __future__ import annotations

from dataclasses import dataclass

from kmemcg.core import findings as F


@dataclass(frozen=True)
class Bug:
    id: int
    name: str  # the switch
    era: str
    source: str  # seed file or fixing commit
    presets: tuple[str, ...]  # presets that carry it
    description: str
    detector: tuple[str, ...]  # finding kinds expected
    interleaving: str
    window: str | None  # the named race window, if the bug needs one
    # The era's design the historical code path needs around it: a switch turned on over a
    # preset of another design brings it along (e.g. rcu_barrier() taking the 2012 hotplug
    # lock, without which holding slab_mutex across it is no inversion at all).
    requires_hotplug: str | None = None


CATALOG: tuple[Bug, ...] = (
    Bug(1, "destroy_rcu_barrier_under_slab_mutex", "v3.6 (2012)",
        "seed 004; fixed by 210ed9defffc", ("v3.6",),
        "kmem_cache_destroy() of a SLAB_DESTROY_BY_RCU cache holds slab_mutex across "
        "rcu_barrier(), which takes get_online_cpus() (cpu_hotplug.lock) since 1331e7a1bbe1; "
        "CPU hotplug holds cpu_hotplug.lock through its notifiers and the slab notifier takes "
        "slab_mutex. Lockdep reports the ABBA although the hotplug refcount keeps the two "
        "apart (an exclusion lockdep cannot see).",
        (F.CIRCULAR_LOCKING,),
        "D: get_online_cpus; slab_mutex; rcu_barrier -> get_online_cpus -> cpu_hotplug.lock. "
        "H: cpu_up -> cpu_hotplug_begin (cpu_hotplug.lock) -> notifier -> slab_mutex. "
        "Sequential is enough: lockdep joins the two orders.", None,
        requires_hotplug="2012"),
    Bug(2, "put_online_cpus_imbalance", "v3.6 (2012)", "seed 004 (Srivatsa's BUG_ON)",
        (),
        "A put_online_cpus() without its get drops cpu_hotplug.refcount below the readers that "
        "are really inside; a hotplug writer then gets in while a reader runs, and with bug 1 "
        "the ABBA becomes a real deadlock (a writer that finds the count negative sleeps "
        "forever: a hung task). With the 2012 hotplug lock (preset v3.6, or hotplug='2012') "
        "the underflow is Srivatsa's BUG_ON; with the percpu-rwsem lock it is an unbalanced "
        "cpus_read_unlock(), lockdep's bad unlock balance.",
        (F.HOTPLUG_REFCOUNT, F.BAD_UNLOCK, F.REAL_DEADLOCK, F.HUNG_TASK),
        "any task: extra put (refcount 0 -> -1, finding); D: get (-1 -> 0!), slab_mutex, "
        "rcu_barrier -> cpu_hotplug.lock; H: cpu_up sees refcount 0, holds cpu_hotplug.lock, "
        "notifier -> slab_mutex: real ABBA.", None),
    Bug(3, "typesafe_page_freed_without_grace_period", "2004", "seed 003", (),
        "A SLAB_DESTROY_BY_RCU slab page goes back to the page allocator at once instead of "
        "after a grace period; another cache reuses it while an RCU reader still holds a "
        "pointer into it.",
        (F.KASAN_TYPE_CONFUSION, F.KASAN_UAF),
        "R: rcu_read_lock, lookup -> obj; F: free obj (slab empty -> page freed); A: alloc "
        "from another cache (gets the page); R: lock obj -> type confusion.",
        "typesafe_lookup:found"),
    Bug(4, "destroy_without_rcu_barrier", "2004", "seed 003", (),
        "kmem_cache_destroy() of a SLAB_DESTROY_BY_RCU cache frees the cache without waiting "
        "for the pending rcu_free_slab() callbacks, which read the cache.",
        (F.KASAN_UAF,),
        "F: free the last object (slab empty -> call_rcu(rcu_free_slab)); D: destroy, cache "
        "freed; callback after the grace period: reads the freed cache.",
        "kmem_cache_destroy:unlocked"),
    Bug(5, "alias_race", "v3.16-v3.18 (Dec 2014)", "linux-mm, Dec 2014", ("v3.16",),
        "kmem_cache_destroy() drops slab_mutex after the alias count reached zero while the "
        "cache is still on slab_caches; a concurrent kmem_cache_create() merges into it "
        "(alias count back to 1) and destroy then frees it under the new user. Other "
        "outcomes of the same race: the destroyer finds the new user's objects (\"Slab cache "
        "still has objects\") or both destroyers unlink it (list_del corruption).",
        (F.KASAN_UAF, F.SLAB_CACHE_NOT_EMPTY, F.ASSERTION),
        "D: alias 1 -> 0, drops slab_mutex; C: kmem_cache_create merges (alias 0 -> 1); D: "
        "relocks, shuts down, frees; C: kmem_cache_alloc -> use-after-free.",
        "kmem_cache_destroy:slab_mutex_dropped"),
    Bug(11, "root_destroy_without_flush", "v4.11-v4.17 (2017-2018)",
        "seed 000; fixed by 92ee383f6daa (4.18)", ("v4.17",),
        "The asynchronous memcg side outlives a root cache: kmem_cache_destroy() of the root "
        "neither marks it dying nor waits for the memcg cache workqueue and the RCU callbacks, "
        "so a child's deactivation still queued (call_rcu, then kmemcg_deactivate_workfn) "
        "shrinks a child the root destroy already freed (the 4.17 GPF in has_cpu_slab), or a "
        "queued creation reads the freed root.",
        (F.KASAN_UAF,),
        "O: memcg offline -> child unpublished, call_rcu(deactivate) pending; D: destroy the "
        "root -> children shut down and freed; the RCU callback queues the work; the work: "
        "__kmem_cache_shrink(child) -> has_cpu_slab -> use-after-free. The deterministic test "
        "holds the grace period open with an RCU reader.",
        None),
)

BY_NAME = {b.name: b for b in CATALOG}


def listing() -> str:
    out = []
    for b in CATALOG:
        out.append(f"{b.id:>2} {b.name:<42} {b.era:<22} presets: "
                   f"{', '.join(b.presets) or '-':<10} detector: {', '.join(b.detector)}\n")
    return "".join(out)
