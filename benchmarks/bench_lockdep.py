"""Lockdep benchmark: prints figures, asserts nothing.

    python benchmarks/bench_lockdep.py [--n 300000]

Measured in one run (ratios are what matter on a noisy machine):
  * lock+unlock of a tracked mutex on a known chain vs a raw threading.Lock, vs a bare wrapper
    that only pushes and pops a held-lock stack (the floor for any Python-level tracker);
  * the same with lock_stat off and with lockdep off;
  * the cost of the new-edge path (chain miss, BFS, stack capture);
  * memory for 1,000 classes and 10,000 edges.
Target (issue 2): tracked <= 2.5x raw.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import threading
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _timing import best, raw_lock_loop  # noqa: E402

from kmemcg import Kernel  # noqa: E402


class BareWrapper:
    """Only what any tracker must do: a thread-local held stack, push and pop."""

    __slots__ = ("_l", "_tls")

    def __init__(self, tls: threading.local) -> None:
        self._l = threading.Lock()
        self._tls = tls

    def lock(self) -> None:
        self._l.acquire()
        self._tls.held.append(self)

    def unlock(self) -> None:
        held = self._tls.held
        if held[-1] is self:
            held.pop()
        else:
            held.remove(self)
        self._l.release()


def bench_lock_paths(n: int) -> dict[str, float]:
    raw = threading.Lock()

    raw_loop = raw_lock_loop()

    tls = threading.local()
    tls.held = []
    bare_outer, bare = BareWrapper(tls), BareWrapper(tls)

    def bare_loop(n: int) -> None:
        bare_outer.lock()
        for _ in range(n):
            bare.lock()
            bare.unlock()
        bare_outer.unlock()

    def tracked(k: Kernel):
        outer, m = k.mutex("bench_outer"), k.mutex("bench_inner")

        def loop(n: int) -> None:
            outer.lock()  # a known chain of two: outer -> inner
            lock, unlock = m.lock, m.unlock
            for _ in range(n):
                lock()
                unlock()
            outer.unlock()
        loop(10)  # validate the chain once, outside the timing
        return loop

    def tracked_with(k: Kernel):
        m = k.mutex("bench_with")

        def loop(n: int) -> None:
            for _ in range(n):
                with m:
                    pass
        loop(10)
        return loop

    def raw_with(n: int) -> None:
        for _ in range(n):
            with raw:
                pass

    res = {
        "raw acquire+release": best(raw_loop, n),
        "raw `with lock:`": best(raw_with, n),
        "bare push/pop wrapper": best(bare_loop, n),
    }
    for label, kw in (("lockdep (default)", {}),
                      ("lockdep + lock_stat", {"lock_stat": True}),
                      ("no lockdep, lock_stat", {"lockdep": False, "lock_stat": True}),
                      ("no lockdep, no lock_stat", {"lockdep": False, "lock_stat": False})):
        k = Kernel(**kw)
        res[f"mutex lock+unlock: {label}"] = best(tracked(k), n)
        if not kw:
            res["mutex `with m:`: lockdep (default)"] = best(tracked_with(k), n)
        k.shutdown()
    return res


def bench_new_edges(n_classes: int = 1000, n_edges: int = 10_000) -> dict[str, float]:
    """Build a DAG of n_edges over n_classes (i -> j only for i < j: no cycle), one new edge
    per acquisition pair, timing the whole new-edge path; then measure graph memory."""
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.take_snapshot()
    k = Kernel(lock_stat=False)
    locks = [k.mutex(f"class_{i}") for i in range(n_classes)]
    pairs = []
    step = 1
    while len(pairs) < n_edges:
        for i in range(0, n_classes - step):
            pairs.append((i, i + step))
            if len(pairs) == n_edges:
                break
        step += 1
    times = []
    for i, j in pairs:
        a, b = locks[i], locks[j]
        t = time.perf_counter_ns()
        a.lock()
        b.lock()
        b.unlock()
        a.unlock()
        times.append(time.perf_counter_ns() - t)
    gc.collect()
    snap = tracemalloc.take_snapshot()
    tracemalloc.stop()
    mem = sum(s.size_diff for s in snap.compare_to(base, "filename"))
    assert k.lockdep.nr_edges == n_edges, k.lockdep.nr_edges
    assert not len(k.findings)
    k.shutdown()
    return {
        "new-edge lock pair, first 100 edges, median (us)": statistics.median(times[:100]) / 1e3,
        "new-edge lock pair, all edges, median (us)": statistics.median(times) / 1e3,
        "new-edge lock pair, p99 (us)": sorted(times)[int(len(times) * 0.99)] / 1e3,
        "classes": n_classes,
        "edges": n_edges,
        "memory for graph + locks + stacks (MiB)": mem / 2**20,
        "bytes per edge (all included)": mem / n_edges,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=300_000, help="iterations per lock-path figure")
    args = ap.parse_args()
    print(f"python {sys.version.split()[0]}, switch interval {sys.getswitchinterval()} s")
    res = bench_lock_paths(args.n)
    raw = res["raw acquire+release"]
    bare = res["bare push/pop wrapper"]
    print(f"\n{'lock+unlock path':<45}{'ns/op':>10}{'x raw':>8}{'x bare':>8}")
    for k, v in res.items():
        print(f"{k:<45}{v:>10.1f}{v / raw:>8.2f}{v / bare:>8.2f}")
    w = res["mutex `with m:`: lockdep (default)"] / res["raw `with lock:`"]
    print(f"{'`with m:` vs raw `with lock:`':<45}{'':>10}{w:>8.2f}")
    print()
    for k, v in bench_new_edges().items():
        print(f"{k:<45}{v:>12.1f}" if isinstance(v, float) else f"{k:<45}{v:>12}")


if __name__ == "__main__":
    main()
