"""Timing shared by the benchmark scripts."""

from __future__ import annotations

import time
from collections.abc import Callable


def best(fn: Callable[[int], object], n: int, reps: int = 5) -> float:
    """Best-of-reps nanoseconds per iteration of ``fn(n)`` (the least disturbed run)."""
    out = []
    for _ in range(reps):
        t = time.perf_counter_ns()
        fn(n)
        out.append((time.perf_counter_ns() - t) / n)
    return min(out)


def raw_lock_loop() -> Callable[[int], None]:
    """The baseline every lock figure is divided by: n acquire+release of a threading.Lock."""
    import threading
    raw = threading.Lock()

    def loop(n: int) -> None:
        acq, rel = raw.acquire, raw.release
        for _ in range(n):
            acq()
            rel()
    return loop
