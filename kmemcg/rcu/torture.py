"""rcutorture for the model's RCU (kernel/rcu/rcutorture.c; liburcu's
tests/regression/rcutorture.h).

One writer publishes elements from a pool of ``10 * PIPE_LEN`` through an :class:`RCUPointer`
and retires the element it replaced, choosing at random: ``call`` (call_rcu: each callback
ages the element by one grace period and re-queues it), ``sync`` (synchronize_rcu, then age
every element on the writer's removed list) or ``barrier`` (call_rcu then rcu_barrier). An
element's ``pipe_count`` is 1 when it is replaced and grows by one per grace period after that;
at PIPE_LEN its ``mbtest`` is cleared and it goes back to the free list, to be reused.

Readers, inside rcu_read_lock(), dereference the current element, check ``mbtest``, linger a
little (sleeps and yields: the window a broken RCU cannot survive), then record the element's
``pipe_count`` in the "Reader Pipe" histogram and the number of grace periods that completed
during the section in "Reader Batch". A correct RCU only ever shows pipe counts 0 and 1: a
count above 1 means an element aged by a grace period that did not wait for a reader still
using it, and ``mbtest == 0`` means the reader reached a freed element. Either is FAILURE.
Reader Batch is informational. Fake writers call synchronize() and barrier() at random; a
barrier tester posts callbacks, calls barrier() and checks they all ran (``rtbe``).

Output is rcutorture's: periodic statistics lines, then "--- End of test: SUCCESS" or
"FAILURE", with a replay line on failure (the seed fixes every thread's random choices, not the
interleaving). ``rcu_torture(k)`` runs it on a kernel (``Kernel(rcu_flavor="busted")`` for the
broken flavor); ``python -m kmemcg.rcu.torture --flavor busted`` is the command line.

Racy by design, as in the kernel: ``pipe_count`` and ``mbtest`` are written by the writer or
the callback thread and read by readers without a lock (READ_ONCE/WRITE_ONCE; Python ints are
never torn). Histograms are per reader and summed for printing. ``_lock`` guards the free list,
the circulation histogram and the free count (writer and callback thread both free).
"""

from __future__ import annotations

import argparse
import random
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kmemcg.core import findings as F

if TYPE_CHECKING:
    from kmemcg.core.task import KThread
    from kmemcg.kernel import Kernel

PIPE_LEN = 10
TAG = "rcu-torture:"


class _Elem:
    """struct rcu_torture."""

    __slots__ = ("pipe_count", "mbtest", "idx")

    def __init__(self, idx: int) -> None:
        self.idx = idx
        self.pipe_count = 0
        self.mbtest = 0


@dataclass
class TortureResult:
    success: bool
    text: str
    flavor: str
    seed: int
    pipe: list[int]
    batch: list[int]
    circulation: list[int]
    reads: int
    versions: int
    mberrors: int
    barrier_errors: int
    grace_periods: int
    errors: list[str] = field(default_factory=list)


class _ReaderState:
    __slots__ = ("pipe", "batch", "mberror", "reads")

    def __init__(self) -> None:
        self.pipe = [0] * (PIPE_LEN + 1)
        self.batch = [0] * (PIPE_LEN + 1)
        self.mberror = 0
        self.reads = 0


class RCUTorture:
    """One torture run on ``k.rcu``. Use :func:`rcu_torture`."""

    def __init__(self, k: Kernel, *, duration: float = 1.0, nreaders: int = 3,
                 nfakewriters: int = 2, stat_interval: float = 0.5, n_barrier_cbs: int = 4,
                 seed: int | None = None, out: Callable[[str], None] | None = None) -> None:
        self.k = k
        self.rcu = k.rcu
        self.duration = duration
        self.nreaders = nreaders
        self.nfakewriters = nfakewriters
        self.stat_interval = stat_interval
        self.n_barrier_cbs = n_barrier_cbs
        self.seed = seed if seed is not None else random.SystemRandom().randrange(1 << 32)
        self._out = out
        self.lines: list[str] = []
        self._stop = threading.Event()
        self._lock = k.raw_lock()
        self._pool = [_Elem(i) for i in range(10 * PIPE_LEN)]
        self._free = list(self._pool)  # guarded by _lock
        self._current = k.rcu.pointer(None, "rcu_torture_current")
        self._removed: list[_Elem] = []  # writer only
        self._wcount = [0] * (PIPE_LEN + 1)  # Free-Block Circulation; guarded by _lock
        self._readers = [_ReaderState() for _ in range(nreaders)]
        self.version = 0
        self.n_alloc = 0
        self.n_alloc_fail = 0
        self.n_free = 0  # guarded by _lock
        self.n_barrier_attempts = 0
        self.n_barrier_successes = 0
        self.n_barrier_errors = 0
        self.n_fake_syncs = 0

    # ------------------------------------------------------------------ output
    def _print(self, line: str) -> None:
        line = f"{TAG} {line}" if not line.startswith("---") else f"{TAG}{line}"
        self.lines.append(line)
        if self._out is not None:
            self._out(line)

    def _params(self) -> str:
        return (f"torture_type={self.rcu.flavor} nreaders={self.nreaders} "
                f"nfakewriters={self.nfakewriters} stat_interval={self.stat_interval} "
                f"duration={self.duration} n_barrier_cbs={self.n_barrier_cbs} "
                f"seed={self.seed}")

    def _sums(self) -> tuple[list[int], list[int], int, int]:
        pipe = [0] * (PIPE_LEN + 1)
        batch = [0] * (PIPE_LEN + 1)
        mbe = reads = 0
        for r in self._readers:
            for i in range(PIPE_LEN + 1):
                pipe[i] += r.pipe[i]
                batch[i] += r.batch[i]
            mbe += r.mberror
            reads += r.reads
        return pipe, batch, mbe, reads

    def _broken(self, pipe: list[int], mbe: int) -> bool:
        return bool(mbe or self.n_barrier_errors or any(pipe[2:]))

    def stats(self) -> bool:
        """rcu_torture_stats_print(); returns whether the histograms show a failure."""
        pipe, batch, mbe, reads = self._sums()
        cur = self._current.access()
        with self._lock:
            tfle = int(not self._free)
            circ = list(self._wcount)
            nfree = self.n_free
        self._print(
            f"rtc: {id(cur) if cur is not None else 0:016x} ver: {self.version} tfle: {tfle} "
            f"rta: {self.n_alloc} rtaf: {self.n_alloc_fail} rtf: {nfree} rtmbe: {mbe} "
            f"rtbe: {self.n_barrier_errors} nr: {reads} gps: {self.rcu.completed} "
            f"fsync: {self.n_fake_syncs} barrier: {self.n_barrier_successes}/"
            f"{self.n_barrier_attempts}:{self.n_barrier_errors}")
        broken = self._broken(pipe, mbe)
        self._print(("!!! " if broken else "") + "Reader Pipe:  " + " ".join(map(str, pipe)))
        self._print("Reader Batch:  " + " ".join(map(str, batch)))
        self._print("Free-Block Circulation:  " + " ".join(map(str, circ)))
        return broken

    # ------------------------------------------------------------------ elements
    def _alloc(self) -> _Elem | None:
        with self._lock:
            return self._free.pop() if self._free else None

    def _release(self, e: _Elem) -> None:
        """rcu_torture_free()."""
        with self._lock:
            self._free.append(e)
            self.n_free += 1

    def _pipe_update_one(self, e: _Elem) -> bool:
        """Age ``e`` by one grace period; True when it reached PIPE_LEN (now freed memory)."""
        i = min(e.pipe_count, PIPE_LEN)
        with self._lock:
            self._wcount[i] += 1
        e.pipe_count = i + 1
        if e.pipe_count >= PIPE_LEN:
            e.mbtest = 0
            return True
        return False

    def _cb(self, e: _Elem) -> None:
        """rcu_torture_cb(): one grace period has elapsed since ``e`` was queued."""
        if self._stop.is_set():
            return  # test ending: drop callbacks on the floor, as rcutorture does
        if self._pipe_update_one(e):
            self._release(e)
        else:
            self.rcu.call(self._cb, e)

    # ------------------------------------------------------------------ threads
    def _writer(self) -> None:
        rcu = self.rcu
        rng = random.Random(self.seed)
        stop = self._stop
        while not stop.is_set():
            rp = self._alloc()
            if rp is None:
                self.n_alloc_fail += 1
                stop.wait(0.001)
                continue
            self.n_alloc += 1
            rp.pipe_count = 0
            rp.mbtest = 1
            old = self._current.assign(rp)
            self.version += 1
            if old is not None:
                i = min(old.pipe_count, PIPE_LEN)
                with self._lock:
                    self._wcount[i] += 1
                old.pipe_count = i + 1
                mode = rng.random()
                if mode < 0.45:
                    rcu.call(self._cb, old)
                elif mode < 0.9:
                    rcu.synchronize()
                    self._removed.append(old)
                    keep = []
                    for e in self._removed:
                        if self._pipe_update_one(e):
                            self._release(e)
                        else:
                            keep.append(e)
                    self._removed = keep
                else:
                    rcu.call(self._cb, old)
                    rcu.barrier()
            stop.wait(rng.uniform(0.0002, 0.001))

    def _reader(self, idx: int) -> None:
        rcu = self.rcu
        st = self._readers[idx]
        rng = random.Random(self.seed + 1 + idx)
        stop = self._stop
        cur = self._current
        sleep = time.sleep
        while not stop.is_set():
            with rcu.read():
                started = rcu.completed
                p = cur.dereference()
                if p is not None:
                    if p.mbtest == 0:
                        st.mberror += 1
                    x = rng.random()
                    if x < 0.15:
                        sleep(rng.uniform(0.0005, 0.003))  # linger: the busted flavor's window
                    elif x < 0.6:
                        sleep(0)
                    pc = min(p.pipe_count, PIPE_LEN)
                    gps = min(rcu.completed - started, PIPE_LEN)
            if p is None:
                stop.wait(0.001)
                continue
            st.pipe[pc] += 1
            st.batch[gps] += 1
            st.reads += 1
            if rng.random() < 0.3:
                sleep(0.0002)

    def _fakewriter(self, idx: int) -> None:
        rcu = self.rcu
        rng = random.Random(self.seed + 1000 + idx)
        stop = self._stop
        while not stop.wait(rng.uniform(0.001, 0.005)):
            if rng.random() < 0.8:
                rcu.synchronize()
            else:
                rcu.barrier()
            with self._lock:
                self.n_fake_syncs += 1

    def _barrier_tester(self) -> None:
        rcu = self.rcu
        stop = self._stop
        n = self.n_barrier_cbs
        lock = self._lock
        while not stop.wait(0.005):
            done = [0]

            def cb(done: list[int] = done) -> None:
                with lock:
                    done[0] += 1

            for _ in range(n):
                rcu.call(cb)
            self.n_barrier_attempts += 1
            rcu.barrier()
            with lock:
                ok = done[0] == n
            if ok:
                self.n_barrier_successes += 1
            else:
                self.n_barrier_errors += 1

    # ------------------------------------------------------------------ the run
    def run(self) -> TortureResult:
        k = self.k
        before = len(k.findings.of_kind(F.CALLBACK_EXCEPTION, F.KTHREAD_EXCEPTION))
        self._print(f"--- Start of test: {self._params()}")
        threads: list[KThread] = [k.kthread_run(self._writer, name="rcu_torture_writer")]
        threads += [k.kthread_run(self._reader, i, name=f"rcu_torture_reader/{i}")
                    for i in range(self.nreaders)]
        threads += [k.kthread_run(self._fakewriter, i, name=f"rcu_torture_fakewriter/{i}")
                    for i in range(self.nfakewriters)]
        if self.n_barrier_cbs > 0:
            threads.append(k.kthread_run(self._barrier_tester, name="rcu_torture_barrier"))
        errors: list[str] = []
        end = time.monotonic() + self.duration
        try:
            while True:
                left = end - time.monotonic()
                if left <= 0:
                    break
                time.sleep(min(self.stat_interval, left))
                if time.monotonic() < end:
                    self.stats()
        finally:
            self._stop.set()
            deadline = time.monotonic() + 10.0
            for t in threads:
                t.join(max(0.0, deadline - time.monotonic()))
                if t.is_alive():
                    errors.append(f"{t.name} did not stop")
        if not errors:
            self.rcu.barrier()  # rcu_torture_cleanup(): no callback may outlive the test
        broken = self.stats()
        pipe, batch, mbe, reads = self._sums()
        after = len(k.findings.of_kind(F.CALLBACK_EXCEPTION, F.KTHREAD_EXCEPTION))
        if after > before:
            errors.append(f"{after - before} callback/kthread exception finding(s)")
        if pipe[0] + pipe[1] == 0 and not broken:
            errors.append("no reader saw an element")
        if mbe:
            errors.append(f"{mbe} reader(s) saw a freed element (mbtest == 0)")
        if any(pipe[2:]):
            errors.append("Reader Pipe count above 1: a grace period ended under a reader")
        if self.n_barrier_errors:
            errors.append(f"{self.n_barrier_errors} rcu_barrier() did not wait for callbacks")
        success = not errors
        for e in errors:
            self._print(f"!!! {e}")
        if not success:
            self._print(f"replay: python -m kmemcg.rcu.torture --flavor {self.rcu.flavor} "
                        f"--seed {self.seed} --duration {self.duration} "
                        f"--nreaders {self.nreaders} --nfakewriters {self.nfakewriters}")
        self._print(f"--- End of test: {'SUCCESS' if success else 'FAILURE'}: {self._params()}")
        with self._lock:
            circ = list(self._wcount)
        return TortureResult(success, "\n".join(self.lines) + "\n", self.rcu.flavor, self.seed,
                             pipe, batch, circ, reads, self.version, mbe,
                             self.n_barrier_errors, self.rcu.completed, errors)


def rcu_torture(k: Kernel, **params: Any) -> TortureResult:
    """Run rcutorture on ``k.rcu`` (parameters: see :class:`RCUTorture`)."""
    return RCUTorture(k, **params).run()


def main(argv: list[str] | None = None) -> int:
    """``python -m kmemcg.rcu.torture [--flavor busted] [--duration S] ...``: exit 0 on
    SUCCESS, 1 on FAILURE."""
    ap = argparse.ArgumentParser(prog="python -m kmemcg.rcu.torture", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--flavor", default="rcu", help="rcu (default) or busted")
    ap.add_argument("--duration", type=float, default=2.0)
    ap.add_argument("--nreaders", type=int, default=3)
    ap.add_argument("--nfakewriters", type=int, default=2)
    ap.add_argument("--stat-interval", type=float, default=0.5)
    ap.add_argument("--n-barrier-cbs", type=int, default=4)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--no-lockdep", action="store_true")
    a = ap.parse_args(argv)
    # The command line is a driver, above the kernel: import it here, never at module level.
    from kmemcg.kernel import Kernel
    with Kernel(name="rcutorture", lockdep=not a.no_lockdep, rcu_flavor=a.flavor) as k:
        res = rcu_torture(k, duration=a.duration, nreaders=a.nreaders,
                          nfakewriters=a.nfakewriters, stat_interval=a.stat_interval,
                          n_barrier_cbs=a.n_barrier_cbs, seed=a.seed,
                          out=lambda line: print(line, flush=True))
    return 0 if res.success else 1


if __name__ == "__main__":
    sys.exit(main())
