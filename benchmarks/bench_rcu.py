"""RCU benchmark: prints figures, asserts nothing.

    python benchmarks/bench_rcu.py [--quick]

Measured:
  * rcu_read_lock()+rcu_read_unlock() vs a raw threading.Lock acquire+release, lockdep on / off;
  * synchronize_rcu() latency (median, p99) with 1, 8, 64, 256 idle registered readers (threads
    that entered a section once, then block on an Event outside any section);
  * call_rcu() throughput, the callback backlog it builds, and the time rcu_barrier() takes to
    drain it;
  * grace periods per synchronize_rcu() call with 20 concurrent synchronizers (no readers, then
    4 busy readers).
Targets (issue): synchronize <= 1 ms median with 64 idle readers; >= 5x fewer grace periods than
calls with 20 concurrent synchronizers.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _timing import best, raw_lock_loop  # noqa: E402

from kmemcg import Kernel  # noqa: E402


def bench_read_side(n: int) -> None:
    print("== read side (ns per lock+unlock pair, best of 5) ==")
    raw_loop = raw_lock_loop()

    base = best(raw_loop, n)
    print(f"  threading.Lock acquire+release      {base:8.0f} ns   1.0x")
    for lockdep in (False, True):
        with Kernel(name="bench", lockdep=lockdep) as k:
            rcu = k.rcu
            rcu.read_lock()  # register outside the timing
            rcu.read_unlock()

            def rcu_loop(n: int, rcu=rcu) -> None:
                lock, unlock = rcu.read_lock, rcu.read_unlock
                for _ in range(n):
                    lock()
                    unlock()

            def with_loop(n: int, rcu=rcu) -> None:
                for _ in range(n):
                    with rcu.read():
                        pass

            def nested_loop(n: int, rcu=rcu) -> None:
                lock, unlock = rcu.read_lock, rcu.read_unlock
                lock()
                for _ in range(n):
                    lock()
                    unlock()
                unlock()

            tag = "on " if lockdep else "off"
            for name, fn in (("read_lock+read_unlock", rcu_loop),
                             ("with rcu.read()", with_loop),
                             ("nested read_lock+unlock", nested_loop)):
                ns = best(fn, n)
                print(f"  lockdep {tag} {name:25s} {ns:8.0f} ns {ns / base:5.1f}x")


def bench_synchronize(counts: list[int], calls: int) -> None:
    print("== synchronize_rcu() latency with idle registered readers ==")
    for nr in counts:
        with Kernel(name="bench-sync") as k:
            stop = threading.Event()
            ready = threading.Barrier(nr + 1)

            def idle_reader(k: Kernel = k, ready: threading.Barrier = ready,
                            stop: threading.Event = stop) -> None:
                with k.rcu.read():
                    pass
                ready.wait()
                stop.wait()

            for i in range(nr):
                k.kthread_run(idle_reader, name=f"idle/{i}")
            ready.wait()
            lat = []
            for _ in range(calls):
                t = time.perf_counter_ns()
                k.rcu.synchronize()
                lat.append(time.perf_counter_ns() - t)
            registered = k.rcu.statistics().readers
            stop.set()
            lat.sort()
            med = statistics.median(lat) / 1e3
            p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))] / 1e3
            print(f"  {nr:4d} idle readers: median {med:8.1f} us   p99 {p99:8.1f} us"
                  f"   ({registered} registered)")


def bench_call(n: int) -> None:
    print("== call_rcu() throughput and backlog ==")
    with Kernel(name="bench-call") as k:
        rcu = k.rcu
        done = [0]

        def cb() -> None:
            done[0] += 1

        rcu.call(cb)
        rcu.barrier()
        max_backlog = 0
        t = time.perf_counter()
        for i in range(n):
            rcu.call(cb)
            if i % 1000 == 0:
                max_backlog = max(max_backlog, rcu.statistics().callbacks_backlog)
        t_call = time.perf_counter() - t
        backlog = rcu.statistics().callbacks_backlog
        gp0 = rcu.completed
        t = time.perf_counter()
        rcu.barrier()
        t_drain = time.perf_counter() - t
        print(f"  {n} call_rcu(): {n / t_call / 1e3:8.1f} k calls/s "
              f"({t_call / n * 1e9:6.0f} ns/call)")
        print(f"  backlog: max sampled {max_backlog}, {backlog} left at the end of posting")
        print(f"  rcu_barrier() drained it in {t_drain * 1e3:.1f} ms "
              f"({rcu.completed - gp0} grace periods); {done[0] - 1}/{n} callbacks ran")


def bench_sharing(nsync: int, per: int, nreaders: int) -> None:
    with Kernel(name="bench-share") as k:
        rcu = k.rcu
        stop = threading.Event()
        start = threading.Barrier(nsync + 1)

        def reader() -> None:
            while not stop.is_set():
                with rcu.read():
                    time.sleep(0)

        def updater() -> None:
            start.wait()
            for _ in range(per):
                rcu.synchronize()

        for i in range(nreaders):
            k.kthread_run(reader, name=f"reader/{i}")
        ths = [k.kthread_run(updater, name=f"sync/{i}") for i in range(nsync)]
        gp0, c0 = rcu.completed, rcu.statistics().sync_calls
        t = time.perf_counter()
        start.wait()
        for th in ths:
            th.join()
        dt = time.perf_counter() - t
        stop.set()
        gps = rcu.completed - gp0
        calls = rcu.statistics().sync_calls - c0
        print(f"  {nsync} synchronizers x {per}, {nreaders} busy readers: {calls} calls, "
              f"{gps} grace periods -> {calls / max(gps, 1):.1f} calls per grace period; "
              f"{calls / dt / 1e3:.1f} k synchronize/s")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="smaller counts")
    a = ap.parse_args()
    q = a.quick
    t0 = time.perf_counter()
    bench_read_side(50_000 if q else 200_000)
    bench_synchronize([1, 8, 64, 256], 100 if q else 300)
    bench_call(20_000 if q else 100_000)
    print("== grace-period sharing ==")
    bench_sharing(20, 50 if q else 200, 0)
    bench_sharing(20, 50 if q else 100, 4)
    # Under the GIL, callers whose grace period never blocks do not overlap at all: each runs
    # its loop within one 5 ms switch interval. A 10 us interval emulates parallel arrival.
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        print("  (switch interval 10 us:)")
        bench_sharing(20, 50 if q else 200, 0)
    finally:
        sys.setswitchinterval(old)
    print(f"(total {time.perf_counter() - t0:.1f} s)")


if __name__ == "__main__":
    main()
