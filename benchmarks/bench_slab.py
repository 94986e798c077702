"""Slab benchmark: prints figures, asserts nothing.

    python benchmarks/bench_slab.py [--quick]

Measured:
  * kmem_cache_alloc()+kmem_cache_free() per pair, KASAN on vs off: the per-CPU fast path
    (alloc then free at once), a batch pattern (1000 allocs then 1000 frees: slabs are made
    and discarded, pages go back to the page allocator), a SLAB_TYPESAFE_BY_RCU cache, and
    frees from another thread (the page-freelist path);
  * one stack capture (StackDepot.capture) at a shallow and a deep call depth, and how many
    distinct stacks an alloc/free loop stores (one site, then several sites and depths);
  * memory over a long alloc/free loop: tracemalloc's current/peak and RSS at checkpoints,
    KASAN on (does anything grow per allocation?).
"""

from __future__ import annotations

import argparse
import resource
import sys
import threading
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _timing import best  # noqa: E402

from kmemcg import Kernel  # noqa: E402
from kmemcg.mm.slub import SLAB_TYPESAFE_BY_RCU  # noqa: E402


def _rss_kib() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize() // 1024
    except OSError:  # not Linux: the high-water mark instead
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


# ---------------------------------------------------------------------- alloc + free
def bench_alloc_free(n: int) -> None:
    print("== kmem_cache_alloc + kmem_cache_free (ns per pair, best of 5) ==")
    print(f"  {'pattern':<34} {'KASAN off':>10} {'KASAN on':>10} {'ratio':>7}")
    rows: dict[str, list[float]] = {}
    for kasan in (False, True):
        with Kernel(name="bench-slab", kasan=kasan) as k:
            slab = k.slab
            s = slab.kmem_cache_create("bench", 256)
            ts = slab.kmem_cache_create("bench_ts", 256, flags=SLAB_TYPESAFE_BY_RCU)
            alloc, free = slab.kmem_cache_alloc, slab.kmem_cache_free

            def fast(n: int, s=s, alloc=alloc, free=free) -> None:
                for _ in range(n):
                    free(s, alloc(s))

            def batch(n: int, s=s, alloc=alloc, free=free) -> None:
                for _ in range(n // 1000):
                    objs = [alloc(s) for _ in range(1000)]
                    for o in objs:
                        free(s, o)

            def typesafe(n: int, ts=ts, alloc=alloc, free=free) -> None:
                for _ in range(n):
                    free(ts, alloc(ts))

            def remote(n: int, s=s, k=k, alloc=alloc, free=free) -> None:
                objs = [alloc(s) for _ in range(n)]

                def free_all() -> None:
                    for o in objs:
                        free(s, o)

                t = k.kthread_run(free_all, name="remote_freer")
                t.join()

            rows.setdefault("per-CPU fast path", []).append(best(fast, n))
            rows.setdefault("batch of 1000 (slab churn)", []).append(best(batch, n))
            rows.setdefault("TYPESAFE_BY_RCU cache", []).append(best(typesafe, n))
            # remote: the alloc half is in the timing too; one rep builds a big list
            rows.setdefault("alloc here, free in a thread", []).append(best(remote, n, 3))
            k.rcu.barrier()
    for name, (off, on) in rows.items():
        print(f"  {name:<34} {off:10.0f} {on:10.0f} {on / off:6.1f}x")


# ---------------------------------------------------------------------- stacks
def _deep(depth: int, fn: Callable[[], object]) -> object:
    return fn() if depth == 0 else _deep(depth - 1, fn)


def bench_stacks(n: int) -> None:
    print("== stack depot ==")
    with Kernel(name="bench-stacks") as k:
        depot = k.stacks

        def shallow(n: int) -> None:
            cap = depot.capture
            for _ in range(n):
                cap()

        def deep(n: int) -> None:
            _deep(20, lambda: shallow(n))

        print(f"  capture(), shallow stack            {best(shallow, n):8.0f} ns")
        print(f"  capture(), 20 frames deeper         {best(deep, n):8.0f} ns "
              f"(depth capped at 24 frames)")
        s = k.slab.kmem_cache_create("stacks", 128)
        before = len(depot)
        for _ in range(n):
            k.slab.kmem_cache_free(s, k.slab.kmem_cache_alloc(s))
        one_site = len(depot) - before
        before = len(depot)
        sites = [lambda: k.slab.kmem_cache_alloc(s),  # three call sites, one a line
                 lambda: k.slab.kmem_cache_alloc(s),
                 lambda: k.slab.kmem_cache_alloc(s)]
        for i in range(n):
            o = _deep(i % 8, sites[i % 3])
            k.slab.kmem_cache_free(s, o)
        several = len(depot) - before
        print(f"  {n} alloc+free at one site           stored {one_site} new stack(s)")
        print(f"  {n} alloc+free, 3 sites x 8 depths   stored {several} new stack(s)")
        print(f"  depot: {len(depot)} stacks, {depot.entries()} frames in all")


# ---------------------------------------------------------------------- memory
def bench_memory(n: int) -> None:
    print("== memory over a long alloc/free loop (KASAN on) ==")
    with Kernel(name="bench-mem") as k:
        s = k.slab.kmem_cache_create("mem", 192)
        alloc, free = k.slab.kmem_cache_alloc, k.slab.kmem_cache_free
        keep: list = []
        tracemalloc.start()
        rss0 = _rss_kib()
        step = n // 5
        print(f"  {'pairs':>9} {'traced now':>12} {'traced peak':>12} {'RSS delta':>11} "
              f"{'depot':>6} {'pages':>6}")
        t0 = time.perf_counter()
        for i in range(1, 6):
            for j in range(step):
                o = alloc(s)
                if j % 7 == 0:
                    keep.append(o)  # some live objects, freed later in another order
                else:
                    free(s, o)
                if len(keep) > 500:
                    for x in keep:
                        free(s, x)
                    keep.clear()
            for x in keep:  # measure with no object live: what is left is overhead
                free(s, x)
            keep.clear()
            cur, peak = tracemalloc.get_traced_memory()
            print(f"  {i * step:>9} {cur / 1024:>9.0f} KiB {peak / 1024:>9.0f} KiB "
                  f"{_rss_kib() - rss0:>7} KiB {len(k.stacks):>6} "
                  f"{k.page_alloc.stats()['total']:>6}")
        tracemalloc.stop()
        dt = time.perf_counter() - t0
        print(f"  ({n} pairs in {dt:.1f} s under tracemalloc)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="smaller counts")
    q = ap.parse_args().quick
    t0 = time.perf_counter()
    bench_alloc_free(5_000 if q else 20_000)
    bench_stacks(2_000 if q else 10_000)
    bench_memory(20_000 if q else 200_000)
    print(f"threads left: {threading.active_count() - 1}; total {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
