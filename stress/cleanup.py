"""The end of a stress run: undo everything the drivers left, as their owners would, then let
the leak check (kmemcg.mm.kmemleak) look at what the kernel model still holds.

A correct kernel keeps nothing once every object is freed, every memcg offlined and every cache
destroyed; what remains is a leak the drivers cannot have caused (they follow the owner
protocol), so it is reported as a finding like any other. Two scans, at the two points where
the kernel's own debugging would look:

1. *zombie memcgs*: every object freed, every driver back in the root memcg (their threads have
   exited), every memcg offlined, RCU callbacks and workqueues drained, but the root caches still
   alive: an offline memcg still here is pinned by something that should have let go (catalog
   bug 17's empty slabs that were never deactivated: reported first, then every cache is shrunk
   as reclaim would), and a per-memcg cache still here was never released (bug 17 in the 5.3
   lifecycle);
2. *everything else*: after every cache is destroyed and the kernel drained again: caches never
   destroyed, offline memcgs never freed, works or RCU callbacks still pending, objects never
   freed, each with its allocation stack.

During the run, a scan thread (``start_leak_scanner``) reports what is certain to leak although
the kernel is busy: children of memcgs offline for a second that were never deactivated.

No scan after an oops or a BUG (see ``OOPS_KINDS``). The cleanup runs on a model thread with a
deadline: a deadlocked or crashed model is reported
(``ran`` false, with the reason) and torn down, never waited on.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from kmemcg.core import findings as F
from kmemcg.core.kasan import KasanOops
from kmemcg.mm.memcg_slab import is_child
from kmemcg.mm.typesafe import typesafe_delete
from stress.world import World

# After an oops (KASAN) or a BUG (a failed assertion) the task died mid-operation in the
# kernel, and "Slab cache still has objects" leaves the cache behind on purpose: whatever they
# held leaks by construction, so a leak scan would only report echoes of the first finding.
OOPS_KINDS = frozenset({F.KASAN_UAF, F.KASAN_DOUBLE_FREE, F.KASAN_INVALID_FREE,
                        F.KASAN_TYPE_CONFUSION, F.ASSERTION, F.KTHREAD_EXCEPTION,
                        F.WORK_EXCEPTION, F.CALLBACK_EXCEPTION, F.SLAB_CACHE_NOT_EMPTY})


def _cleanup(w: World, result: dict[str, Any]) -> None:
    k = w.k
    sl, mc = k.slab, k.memcg
    with w.lock:
        entries = list(w.entries)
        memcgs = w.memcgs + w.retiring
        w.entries.clear()
        w.memcgs.clear()
        w.retiring.clear()
    for e in entries:  # 1. free every object, as the owners do before destroying
        if e.table is not None:
            for key in list(e.keys):
                try:
                    typesafe_delete(k, e.cache, e.table, key)
                except KasanOops:
                    pass
        for obj in e.objs:
            try:
                sl.kmem_cache_free(e.cache, obj)
            except KasanOops:
                pass
        e.objs.clear()
    for m in memcgs:  # 2. offline every memcg (the drivers' threads have exited)
        mc.offline(m)
    leak = k.kmemleak
    leak.quiesce()  # RCU callbacks and works, until nothing new appears
    oops = oopsed(k)
    if oops:  # still clean up (a tidy teardown), but do not scan
        result["why"] = f"not scanned: the kernel oopsed ({', '.join(oops)})"
    found: set[int] = set()
    if not oops:
        found |= {id(f) for f in leak.scan_undeactivated()}
        # what reclaim would free (empty cpu slabs): in the v4 design a task moved out between
        # memcg_kmem_get_cache() and its allocation may refill a deactivated child's cpu slab,
        # a zombie the 4.x kernel had too until reclaim; then whatever is left is a leak
        for e in entries:
            try:
                sl.kmem_cache_shrink(e.cache)
            except KasanOops:
                pass
        # the children under cpus + slab_mutex, as the deactivation work shrinks them: a
        # child's destruction (css_free) takes the same locks, so none is freed under us
        with sl.cpus_and_slab_mutex():
            for c in sl.slab_caches:
                if is_child(c):
                    sl.slub.kmem_cache_shrink(c)
        leak.quiesce()
        found |= {id(f) for f in leak.scan_memcgs() + leak.scan_memcg_caches()}
    for e in entries:  # 3. destroy every cache
        try:
            sl.kmem_cache_destroy(e.cache)
        except KasanOops:
            pass
    leak.quiesce()
    if not oops:
        found |= {id(f) for f in leak.scan()}  # a zombie seen twice is one leak
    result["leaks"] = len(found)
    result["ran"] = not oops


SCAN_PERIOD = 0.5  # seconds between the in-run leak scans
SCAN_MIN_AGE = 1.0  # seconds a memcg must have been offline for its children to count


def oopsed(k: Any) -> list[str]:
    """The oops kinds found so far (see OOPS_KINDS)."""
    return sorted({f.kind for f in k.findings.snapshot() if f.kind in OOPS_KINDS})


def start_leak_scanner(w: World) -> None:
    """kmemleak's scan thread during the run: every SCAN_PERIOD seconds, report children of
    memcgs offline for SCAN_MIN_AGE seconds that were never deactivated (the one leak that is
    certain while the kernel is busy; kmemleak's own thread reports only objects older than
    5 s, too). No scan after an oops, as at the end of the run."""
    k = w.k

    def kmemleak_scan_thread() -> None:
        while not w.stop.wait(SCAN_PERIOD) and not k.is_dead():
            if not oopsed(k):
                k.kmemleak.scan_undeactivated(SCAN_MIN_AGE)

    k.kthread_run(kmemleak_scan_thread, name="kmemleak")


def cleanup(w: World, drivers: list[threading.Thread], timeout: float) -> dict[str, Any]:
    """Join the drivers (they saw ``w.stop``), clean up and scan for leaks within ``timeout``
    seconds. Returns ``{"ran": bool, "leaks": int, "why": str, "seconds": float}``."""
    k = w.k
    t0 = time.monotonic()
    result: dict[str, Any] = {"ran": False, "leaks": 0, "why": "", "seconds": 0.0}
    deadline = t0 + timeout
    for t in drivers:
        t.join(max(0.0, deadline - time.monotonic()))
    alive = [t.name for t in drivers if t.is_alive()]
    # A thread's exit work (leaving its memcg) runs as the thread's state is torn down, which
    # may be just after join() returned: wait for it, or offlining that memcg would fail.
    with w.lock:
        tasks = list(w.tasks)
    while any(t.memcg is not None for t in tasks) and time.monotonic() < deadline:
        time.sleep(0.001)
    if alive or k.deadlocked:
        result["why"] = f"{len(alive)} driver(s) still running" if alive else "deadlock"
        return result
    t = k.kthread_run(_cleanup, w, result, name="stress_cleanup")
    t.join(max(0.0, deadline - time.monotonic()))
    if t.is_alive():
        result["why"] = f"cleanup did not finish within {timeout:.0f}s"
    result["seconds"] = round(time.monotonic() - t0, 3)
    return result
