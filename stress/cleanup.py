"""The end of a stress run: undo everything the drivers left, as their owners would, then let
the leak check (kmemcg.mm.kmemleak) look at what the kernel model still holds.

A correct kernel keeps nothing once every object is freed, every memcg offlined and every cache
destroyed; what remains is a leak the drivers cannot have caused (they follow the owner
protocol), so it is reported as a finding like any other. Two scans, at the two points where
the kernel's own debugging would look:

1. *zombie memcgs*: every object freed, every driver back in the root memcg (their threads have
   exited), every memcg offlined, RCU callbacks and workqueues drained, but the root caches still
   alive: an offline memcg still here is pinned by something that should have let go (catalog
   bug 17's empty slabs that were never deactivated);
2. *everything else*: after every cache is destroyed and the kernel drained again: caches never
   destroyed, offline memcgs never freed, works or RCU callbacks still pending, objects never
   freed, each with its allocation stack.

The cleanup runs on a model thread with a deadline: a deadlocked or crashed model is reported
(``ran`` false, with the reason) and torn down, never waited on.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from kmemcg.core.kasan import KasanOops
from kmemcg.mm.typesafe import typesafe_delete
from stress.world import World

QUIESCE_ROUNDS = 4  # css_put -> call_rcu -> work -> css_put(parent) -> ...: a few rounds


def quiesce(k: Any) -> None:
    """Let every RCU callback and every queued work run, until nothing new appears."""
    for _ in range(QUIESCE_ROUNDS):
        k.rcu.barrier()
        for wq in k.workqueues.workqueues():
            wq.flush()


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
    quiesce(k)
    leak = getattr(k, "kmemleak", None)
    if leak is not None:
        result["leaks"] += len(leak.scan_memcgs())
    for e in entries:  # 3. destroy every cache
        try:
            sl.kmem_cache_destroy(e.cache)
        except KasanOops:
            pass
    quiesce(k)
    if leak is not None:
        result["leaks"] += len(leak.scan())
    result["ran"] = True


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
    if alive or k.deadlocked:
        result["why"] = f"{len(alive)} driver(s) still running" if alive else "deadlock"
        return result
    t = k.kthread_run(_cleanup, w, result, name="stress_cleanup")
    t.join(max(0.0, deadline - time.monotonic()))
    if t.is_alive():
        result["why"] = f"cleanup did not finish within {timeout:.0f}s"
    result["seconds"] = round(time.monotonic() - t0, 3)
    return result
