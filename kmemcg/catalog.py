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
    # The memcg designs (kmemcg.config.MEMCG_*) whose code carries the switch point; a switch
    # over a preset of another design brings the first along. Empty: any design.
    requires_memcg: tuple[str, ...] = ()


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
    Bug(6, "shrink_under_slab_caches_mutex", "3.8-3.15 (what-if; seed 001/002)",
        "seed 001/002; avoided by the destroy work, fixed for good by bd67314586a3 (3.16)", (),
        "Memcg offline shrinks and destroys its caches directly while walking its cache list "
        "under memcg->slab_caches_mutex, as seed 002's review asked. Creation takes "
        "slab_mutex -> slab_caches_mutex (memcg_cache_list_add), destroy takes slab_mutex "
        "under it: a lockdep cycle; and destroying a child takes the same slab_caches_mutex "
        "again (memcg_release_cache): recursive locking, then a real self-deadlock (the "
        "offline task waits for itself; everything behind it hangs).",
        (F.CIRCULAR_LOCKING, F.RECURSIVE_LOCKING, F.REAL_DEADLOCK, F.HUNG_TASK),
        "O: mutex_lock(memcg->slab_caches_mutex); kmem_cache_destroy(child) -> slab_mutex. "
        "C: creation work: slab_mutex -> memcg_cache_list_add -> slab_caches_mutex. "
        "Sequential is enough: one lockdep class for every memcg's mutex.", None,
        requires_memcg=("v3.13",)),
    Bug(7, "memcg_create_without_slab_mutex_recheck", "3.8-3.13",
        "seed 001; fixed by 2edefe1155b3 (3.14)", ("v3.13",),
        "Child-cache creators check and publish the memcg_caches slot under memcg_cache_mutex "
        "only, while memcg_update_cache_size() relocates the array under slab_mutex and "
        "publishes it empty before copying: a creator that read the empty new array creates "
        "a second child and overwrites the first (leaked, still on slab_caches), or "
        "publishes into the old array after the copy (lost; once the old array's grace period "
        "is over, a store into freed memory: the creator is in no RCU read section). The destroy "
        "half: memcg_release_cache() clears the slot after slab_mutex was dropped, so a "
        "relocation may copy the freed child into the new array.",
        (F.ASSERTION, F.MEMLEAK, F.KASAN_UAF),
        "W2: memcg_cache_mutex, reads slot; A: activation relocates (new array published "
        "empty), W2 reads NULL; A copies X; W2 creates Y and publishes over X: the "
        "VM_BUG_ON(slot already set) the fix added, or X leaked. Or W1 loads the array to "
        "publish X (window memcg_create_kmem_cache:publish), A copies it, W1 stores into the "
        "old one: X is lost, and its destroy clears a slot that is not its own (the fix's "
        "VM_BUG_ON(slot != cachep)); or the old array was freed already: KASAN in _publish. "
        "Or D, destroying X, loads the array to clear X's slot (window "
        "memcg_release_cache:clear), A copies X, D clears the old one: a lookup returns the "
        "freed X (KASAN).",
        "memcg_create_kmem_cache:checked", requires_memcg=("v3.13",)),
    Bug(8, "destroy_work_scheduled_twice", "3.8-3.15",
        "Davydov, linux-mm 26 Feb 2014; gone with 1e32e77f95d6 (3.16)", ("v3.13",),
        "The freer of a dead child's last page schedules the destroy work after dropping "
        "nr_pages to zero (memcg_release_pages -> mem_cgroup_destroy_cache); the destroy work "
        "queued at offline sees zero meanwhile and destroys the cache: the freer then reads "
        "the freed cache's params and work.",
        (F.KASAN_UAF,),
        "F: __free_slab, atomic_sub_and_test(nr_pages) -> 0; W: destroy work reads 0, "
        "kmem_cache_destroy(child) frees it; F: mem_cgroup_destroy_cache(child) reads "
        "params->dead: use-after-free.",
        "memcg_release_pages:after_sub", requires_memcg=("v3.13",)),
    Bug(9, "get_cache_without_reference", "3.8-3.18",
        "seed 002; fixed in 3.19 (css reference from memcg_kmem_get_cache to "
        "memcg_kmem_put_cache)", ("v3.13", "v3.16"),
        "memcg_kmem_get_cache() returns the child cache without any reference: between it and "
        "the allocation the task moves away, the memcg goes offline and its empty child cache "
        "is destroyed; the allocation then runs on the freed cache (in the v4 design, where "
        "each charged page pins the memcg, the charge may first take a reference on a memcg "
        "whose count already reached zero: refcount_t \"addition on 0\"; and when the "
        "allocation lands just before the destroy's shutdown, the destroyer finds it: \"Slab "
        "cache still has objects\").",
        (F.KASAN_UAF, F.REFCOUNT, F.SLAB_CACHE_NOT_EMPTY),
        "T: get_cache returns child C (empty); M: move T out, offline the memcg -> C "
        "destroyed; T: slab_alloc(C) -> use-after-free.",
        "memcg_kmem_get_cache:returned", requires_memcg=("v3.13", "v3.16", "v4")),
    Bug(10, "free_path_touches_cache_after_uncharge", "3.8-3.18", "seed 002 (Davydov)",
        ("v3.13", "v3.16"),
        "The free path drops the count that allows a dead child's destruction (nr_pages, "
        "memcg_release_pages / memcg_uncharge_slab) and then still touches the cache "
        "(stat(s, FREE_SLAB), the node list_lock): a destroyer that saw the count reach zero "
        "has freed it by then.",
        (F.KASAN_UAF,),
        "F: discard the dead child's last slab, nr_pages -> 0; W: sees 0, destroys C; "
        "F: stat(C, FREE_SLAB) -> use-after-free.",
        "memcg_uncharge_slab:after_put", requires_memcg=("v3.13", "v3.16", "v4")),
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
        None, requires_memcg=("v4", "v4-refcount")),
    Bug(12, "alias_count_dec_without_slab_mutex", "seed 000 v1/v2 (May 2018)",
        "seed 000 review (Andrew Morton: which lock protects the count?)", ("v4.18-refcount",),
        "Seed 000's refcount design splits the root's alias count from a lifetime refcount, "
        "but kmem_cache_destroy() decrements the alias count without slab_mutex while "
        "kmem_cache_create() increments it under slab_mutex: an update is lost, the count "
        "never reaches zero (the cache leaks) or goes negative (VM_BUG_ON in "
        "__kmem_cache_destroy).",
        (F.ASSERTION, F.MEMLEAK, F.REFCOUNT),
        "D: kmem_cache_destroy reads alias_count 2; C: merges under slab_mutex, 2 -> 3; D: "
        "writes 1: the increment is lost.",
        "kmem_cache_destroy:alias_dec_unlocked", requires_memcg=("v4-refcount",)),
    Bug(13, "memcg_params_freed_without_rcu", "3.8-3.13", "fixed by f8570263ee16 (3.14)",
        ("v3.13",),
        "memcg_update_cache_size() kfree()s a root's old memcg_params right after publishing "
        "the new one, while lock-free readers (memcg_kmem_get_cache) may still be reading "
        "the old array.",
        (F.KASAN_UAF,),
        "R: rcu_read_lock, loads p = s->memcg_params; A: publishes a bigger copy, kfree(p); "
        "R: reads p->memcg_caches[idx] -> use-after-free.",
        "cache_from_memcg_idx:array", requires_memcg=("v3.13",)),
    Bug(14, "cancel_work_sync_self_freeing_work", "3.8-3.15",
        "CentOS 7.4 hang (3.10.0-693); gone with bd67314586a3 (3.16)", ("v3.13",),
        "Root destroy loads a child, cancel_work_sync()s its destroy work and destroys it; if "
        "the work was running, it destroyed the child (and the work itself) meanwhile, and "
        "the root destroy then destroys the freed child.",
        (F.KASAN_UAF,),
        "O: offline queues destroy(C); W: runs, nr_pages 0; D: root destroy loads C, "
        "cancel_work_sync waits; W: kmem_cache_destroy(C) frees C; D: kmem_cache_destroy(C) "
        "-> use-after-free.",
        "kmem_cache_destroy_memcg_children:got_child", requires_memcg=("v3.13",)),
    Bug(15, "children_destroyed_before_alias_check", "3.8-3.14",
        "fixed by b8529907ba35 (3.15)", ("v3.13",),
        "kmem_cache_destroy() destroys a root's memcg children before dropping its alias "
        "count: destroying one alias of a merged root destroys children that the other "
        "aliases' users still allocate from.",
        (F.SLAB_CACHE_NOT_EMPTY, F.KASAN_UAF),
        "A's cache merged into R (2 aliases); memcg M's child R(M) holds B's objects; A "
        "unloads: the children go first -> \"Slab cache still has objects\", or R(M) empty "
        "is destroyed under a B allocation -> use-after-free.",
        "kmem_cache_destroy:before_alias_check", requires_memcg=("v3.13",)),
    Bug(16, "percpu_ref_exit_while_switching", "5.3-5.4",
        "fixed by a264df74df38 (Nov 2019)", ("v5.3",),
        "Root destroy waits one grace period and flushes the memcg workqueue, but the "
        "deactivation work's percpu_ref_kill() needs one more grace period to switch to "
        "atomic mode: the child is shut down and percpu_ref_exit() runs while the switch "
        "is pending.",
        (F.REFCOUNT, F.KASAN_UAF),
        "O: offline -> kmemcg_cache_deactivate(C) -> call_rcu; D: root destroy: dying, "
        "rcu_barrier (the callback queues the work), flush_workqueue (the work kills the "
        "ref: switch pending), shutdown_cache(C) -> percpu_ref_exit while switching.",
        "percpu_ref_kill:switch_pending", requires_memcg=("v5.3",)),
    Bug(17, "dying_set_before_alias_check", "4.18-5.7",
        "fixed by d38a2b7a9c93 (5.8)", ("v4.18", "v5.3"),
        "flush_memcg_workqueue() marks the root dying before the alias count is dropped: "
        "destroying one alias leaves the surviving root dying for good, so the children of "
        "memcgs going offline are never deactivated: their empty slabs pin the memcg "
        "(4.18-5.2) or the child is never released (5.3-5.7: its percpu_ref is never "
        "killed; the memcg itself goes, the child's css reference, moved to the parent at "
        "reparenting, leaks with it).",
        (F.MEMLEAK,),
        "Create A merged into B (2 aliases); destroy A: B dying, 2 -> 1; memcg M allocates "
        "from B -> child B(M); rmdir M: deactivation skipped -> B(M) leaks, and M (4.18-5.2) "
        "or, after 5.3's reparenting, a css reference on M's parent.",
        "kmem_cache_destroy:dying_set", requires_memcg=("v4", "v5.3")),
)

BY_NAME = {b.name: b for b in CATALOG}


def listing() -> str:
    out = []
    for b in CATALOG:
        out.append(f"{b.id:>2} {b.name:<42} {b.era:<22} presets: "
                   f"{', '.join(b.presets) or '-':<10} detector: {', '.join(b.detector)}\n")
    return "".join(out)
