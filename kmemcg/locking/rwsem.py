"""struct rw_semaphore (kernel/locking/rwsem.c) with lockdep's non-recursive read semantics.

Built on a ``threading.Condition``. Writers are preferred: once a writer waits, new readers
queue behind it, as the kernel's rwsem does. That is why a *read* rwsem is not recursive: a
task that takes the read side twice can deadlock against a writer that arrived in between, and
lockdep reports ``down_read(X); down_read(X)`` as recursive locking.

Lock contract: ``_cond``'s lock guards ``_writer``, ``_readers``, ``_wwait`` and the read-side
statistics; write-side statistics are written by the writer while it holds the rwsem.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from kmemcg.core.report import READ, TRYLOCK, site_key
from kmemcg.core.stacks import frame_site
from kmemcg.locking import lock_stat
from kmemcg.locking.lock_stat import LockStat
from kmemcg.locking.lockdep import LockdepMap

if TYPE_CHECKING:
    from kmemcg.core.task import Task
    from kmemcg.kernel import Kernel

_now = time.perf_counter_ns


class RWSem(LockdepMap):
    """``k.rwsem("name")``: down_read / up_read / down_write / up_write."""

    __slots__ = ("_cond", "_writer", "_readers", "_wwait", "_rwait", "_rturn", "_wstat",
                 "_rstat", "_t_w", "_t_r")
    kind = "rwsem"

    def __init__(self, kernel: Kernel, name: str) -> None:
        super().__init__(kernel, name, "{++++}-{3:3}")
        self._cond = threading.Condition(kernel.raw_lock())
        self._writer: Task | None = None
        self._readers: dict[Task, int] = {}
        self._wwait = 0  # writers waiting: new readers queue behind them
        self._rwait = 0  # readers waiting
        self._rturn = False  # a writer left while readers waited: they go before any writer
        self._wstat = LockStat()
        self._rstat = LockStat()
        self._t_w = 0
        self._t_r: dict[Task, int] = {}
        lock_stat.register(self._cls0, self._wstat)
        lock_stat.register(self._cls0, self._rstat)

    def __del__(self) -> None:
        try:
            lock_stat.retire(self._cls0, self._wstat)
            lock_stat.retire(self._cls0, self._rstat)
        except Exception:
            pass

    def __repr__(self) -> str:
        return f"<RWSem {self.name} writer={self._writer} readers={len(self._readers)}>"

    # -- common acquire path ----------------------------------------------------------------
    def _acquire(self, write: bool, subclass: int, site: object) -> None:
        k = self._k
        task = k.current()
        if task.rcu_nesting:
            k.might_sleep_in_rcu(task, self)
        d = k._dispatch
        if d is not None:
            d("lock_acquire", task, self)
        ld = k._ld
        if ld is not None:
            ld.acquire(task, self, self.lock_class(subclass), 0 if write else READ, site)
        cond = self._cond

        def try_once(timeout: float) -> bool:
            with cond:
                if self._take(task, write):
                    return True
                cond.wait(timeout)
                return self._take(task, write)

        with cond:
            got = self._take(task, write, queue=True)
        if not got:
            if d is not None:
                d("lock_contended", task, self)
            t0 = _now()
            try:
                k.waits.wait(task, self, try_once)
            except BaseException:
                with cond:
                    if write:
                        self._wwait -= 1
                    else:
                        self._rwait -= 1
                        if not self._rwait:
                            self._rturn = False
                if ld is not None:
                    ld.drop(task, self)
                raise
            # Contention is always recorded (slow path); read stats under _cond.
            if write:
                self._wstat.wait(_now() - t0, task.cpu, site_key(site), None)
            else:
                with cond:
                    self._rstat.wait(_now() - t0, task.cpu, site_key(site), None)
        if k.lock_stat:
            if write:
                self._wstat.acquired(task.cpu)
                self._t_w = _now()
            else:
                with cond:
                    self._rstat.acquired(task.cpu)
                    self._t_r[task] = _now()
        if d is not None:
            d("lock_acquired", task, self)

    def _take(self, task: Task, write: bool, queue: bool = False) -> bool:
        """Caller holds ``_cond``. Take the rwsem if free for this mode. ``queue`` is the first
        attempt: on failure the task is counted as a waiter of its mode.

        Fairness, as the kernel's wait queue gives: a waiting writer holds back new readers
        (writer preference), and a writer that leaves while readers wait hands the rwsem to
        those readers (``_rturn``) before any writer, so a writer retaking it at once cannot
        starve them."""
        if write:
            if self._writer is None and not self._readers and not self._rturn:
                self._writer = task
                if not queue:
                    self._wwait -= 1
                return True
            if queue:
                self._wwait += 1
            return False
        if self._writer is None and (not self._wwait or self._rturn):
            self._readers[task] = self._readers.get(task, 0) + 1
            if not queue:
                self._rwait -= 1
                if not self._rwait:
                    self._rturn = False
            return True
        if queue:
            self._rwait += 1
        return False

    def _release(self, write: bool) -> None:
        k = self._k
        task = k.current()
        with self._cond:
            ok = self._writer is task if write else task in self._readers
        if not ok:
            k.lockdep.report_bad_unlock(task, self, frame_site(3))
            return
        d = k._dispatch
        if d is not None:
            d("lock_release", task, self)
        if k._ld is not None:
            k._ld.release(task, self)
        with self._cond:
            if write:
                if k.lock_stat:
                    self._wstat.hold(_now() - self._t_w)
                self._writer = None
                if self._rwait:
                    self._rturn = True
            else:
                if k.lock_stat:
                    t = self._t_r.pop(task, None)
                    if t is not None:
                        self._rstat.hold(_now() - t)
                n = self._readers[task] - 1
                if n:
                    self._readers[task] = n
                else:
                    del self._readers[task]
            self._cond.notify_all()

    # -- public API -------------------------------------------------------------------------
    def down_read(self, subclass: int = 0) -> None:
        self._acquire(False, subclass, frame_site(2))

    def up_read(self) -> None:
        self._release(False)

    def down_write(self, subclass: int = 0) -> None:
        self._acquire(True, subclass, frame_site(2))

    def up_write(self) -> None:
        self._release(True)

    def down_read_trylock(self) -> bool:
        return self._trylock(False)

    def down_write_trylock(self) -> bool:
        return self._trylock(True)

    def _trylock(self, write: bool) -> bool:
        """down_{read,write}_trylock(): the same events and statistics as a successful
        uncontended acquisition (a failed trylock makes none), and a hold-time start so that
        the matching up_*() does not measure from a stale timestamp."""
        k = self._k
        task = k.current()
        with self._cond:
            if write:
                if self._writer is not None or self._readers or self._rturn:
                    return False
                self._writer = task
            else:
                if self._writer is not None or self._wwait:
                    return False
                self._readers[task] = self._readers.get(task, 0) + 1
        d = k._dispatch
        if d is not None:
            d("lock_acquire", task, self)
        if k._ld is not None:
            k._ld.acquire(task, self, self._cls0, TRYLOCK | (0 if write else READ),
                          frame_site(3))
        if k.lock_stat:
            if write:
                self._wstat.acquired(task.cpu)
                self._t_w = _now()
            else:
                with self._cond:
                    self._rstat.acquired(task.cpu)
                    self._t_r[task] = _now()
        if d is not None:
            d("lock_acquired", task, self)
        return True

    @contextmanager
    def read(self, subclass: int = 0) -> Iterator[None]:
        self._acquire(False, subclass, frame_site(3))
        try:
            yield
        finally:
            self._release(False)

    @contextmanager
    def write(self, subclass: int = 0) -> Iterator[None]:
        self._acquire(True, subclass, frame_site(3))
        try:
            yield
        finally:
            self._release(True)

    def is_held(self) -> bool:
        task = self._k.current()
        with self._cond:
            return self._writer is task or task in self._readers

    def is_held_write(self) -> bool:
        with self._cond:
            return self._writer is self._k.current()

    def waiter_owners(self) -> list[Task]:
        with self._cond:
            return [self._writer] if self._writer is not None else list(self._readers)

    def destroy(self) -> None:
        self._k.lockdep.check_no_locks_freed(self, self.waiter_owners(), "freeing")
