"""struct mutex (kernel/locking/mutex.c with CONFIG_DEBUG_MUTEXES, PROVE_LOCKING, LOCK_STAT).

A real ``threading.Lock`` underneath: a contended acquire really blocks (through the wait
tracker, so the hung-task watchdog sees it and teardown can unwind it). Lockdep runs *before*
the task blocks, as ``mutex_acquire_nest()`` does, so an inversion that deadlocks is reported
before the hang.

Sleeping waiters queue first come, first served, as on the kernel's ``wait_list``: an unlock
frees the mutex and wakes the first of them. A running task may still take a free mutex before
the woken waiter gets to it, as the kernel's optimistic spinners do; the waiter that loses that
race sets the handoff flag, and the next unlock hands the mutex straight to it (``_raw`` stays
held; MUTEX_FLAG_HANDOFF, 4.10). A bare ``threading.Lock`` is a lottery among its sleepers: with
a hundred memcg creation works on memcg_cache_mutex, one of them lost it for over 10 s. Strict
handoff at every unlock (no barging) made a root destroy that takes memcg_cache_mutex once per
child wait behind the whole creation backlog each time, holding activate_kmem_mutex meanwhile.

Memory ordering: ``_owner`` is written only by the task that holds ``_raw`` (set after acquiring,
cleared before releasing), so the ``threading.Lock`` acquire/release pair orders it; readers on
other threads (wait-for chains, reports) take it as a hint, never as proof of ownership.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import deque
from typing import TYPE_CHECKING

from kmemcg.core.report import H_LOCK, H_SITE, TRYLOCK, site_key
from kmemcg.core.stacks import frame_site
from kmemcg.locking import lock_stat
from kmemcg.locking.lock_stat import LockStat
from kmemcg.locking.lockdep import LockdepMap

if TYPE_CHECKING:
    from kmemcg.core.task import Task
    from kmemcg.kernel import Kernel

_getframe = sys._getframe
_now = time.perf_counter_ns


def site_of(task: Task, lock: object) -> object:
    """Where ``task`` took (or is taking) ``lock``; racy read of another task's stack."""
    try:
        for e in reversed(list(task.held)):
            if e[H_LOCK] is lock:
                return site_key(e[H_SITE])
    except Exception:  # the list changed under us: it is only a statistic
        pass
    return None


class _Waiter:
    """struct mutex_waiter: ``sem`` is held while the waiter sleeps and released to wake it."""

    __slots__ = ("sem", "woken", "handed")

    def __init__(self, sem: threading.Lock) -> None:
        sem.acquire()
        self.sem = sem
        self.woken = False  # a wakeup is on its way (sem released, not yet consumed)
        self.handed = False  # off the list, and the mutex is its own


class Mutex(LockdepMap):
    """``k.mutex("slab_mutex")``. The name is the lockdep class."""

    __slots__ = ("_raw", "_wait_lock", "_waiters", "_handoff", "_owner", "_stat", "_t_acq")
    kind = "mutex"
    sleeps = True  # might_sleep(): illegal inside rcu_read_lock()
    usage_str = "{+.+.}-{4:4}"

    def __init__(self, kernel: Kernel, name: str) -> None:
        super().__init__(kernel, name, self.usage_str)
        self._raw = kernel.raw_lock()
        # mutex->wait_lock guards the wait list, the handoff flag and the waiters' flags, and
        # orders them against _raw: an unlock decides under it whether to hand over or free and
        # wake, and a waiter retries _raw under it before it queues or asks for the handoff, so
        # no wakeup is lost between a failed try and the sleep.
        self._wait_lock = kernel.raw_lock()
        self._waiters: deque[_Waiter] = deque()
        self._handoff = False  # the first waiter lost a race after its wakeup: hand it over
        self._owner: Task | None = None
        self._stat = LockStat()
        self._t_acq = 0
        lock_stat.register(self._cls0, self._stat)

    def __del__(self) -> None:
        try:
            lock_stat.retire(self._cls0, self._stat)
        except Exception:
            pass

    def __repr__(self) -> str:
        return f"<Mutex {self.name} owner={self._owner}>"

    # -- mutex_lock / mutex_lock_nested ---------------------------------------------------
    def lock(self, subclass: int = 0) -> None:
        """mutex_lock(); ``subclass`` > 0 is mutex_lock_nested() (e.g. SINGLE_DEPTH_NESTING)."""
        k = self._k
        try:
            task = k._tls.task
        except AttributeError:
            task = k.current()
        if task.rcu_nesting and self.sleeps:  # might_sleep() inside rcu_read_lock()
            k.might_sleep_in_rcu(task, self)
        d = k._dispatch
        if d is not None:
            d("lock_acquire", task, self)
        ld = k._ld
        if ld is not None:
            # Lockdep.acquire() inlined (the hot path of the whole model). The caller's frame
            # is the acquisition site ("at:"): ~10 ns to take; its line number is resolved
            # only when a report or a new chain needs it.
            cls = self.lock_class(subclass) if subclass else self._cls0
            node = task.chain_key
            task.held.append((self, cls, node, 0, _getframe(1)))
            r = node.get(cls.step)
            if r is None or r[1] is not None:
                r = ld.chain_slow(task, node, cls.step, r)
            task.chain_key = r[0]
        if not self._raw.acquire(False):
            self._lock_slowpath(task)
        self._owner = task
        if k.lock_stat:
            st = self._stat
            st.acquisitions += 1
            if task.cpu != st.last_cpu:
                if st.last_cpu >= 0:
                    st.acq_bounces += 1
                st.last_cpu = task.cpu
            self._t_acq = _now()
        if d is not None:
            d("lock_acquired", task, self)

    __enter__ = lock

    def _lock_slowpath(self, task: Task) -> None:
        k = self._k
        d = k._dispatch
        if d is not None:
            d("lock_contended", task, self)
        # Where the holder took it ("contending from"), read now: by the time this task gets
        # the lock the holder has released it and its held-lock entry is gone.
        holder = self._owner
        holder_site = site_of(holder, self) if holder is not None else None
        t0 = _now()
        with self._wait_lock:
            w = None if self._raw.acquire(False) else self._enqueue()  # freed since the fast path
        if w is not None:
            try:
                k.waits.wait(task, self, lambda t: self._wait_turn(w, t))
            except BaseException:
                self._dequeue(w)
                if k._ld is not None:
                    k._ld.drop(task, self)
                raise
        # Contention is always recorded (slow path only). Written while holding the lock: exact
        # without another lock.
        self._stat.wait(_now() - t0, task.cpu, site_of(task, self), holder_site)

    def trylock(self) -> bool:
        """mutex_trylock(): True if taken. Lockdep records it but adds no edge *to* it."""
        k = self._k
        task = k.current()
        if not self._raw.acquire(False):
            return False
        d = k._dispatch
        if d is not None:
            d("lock_acquire", task, self)
        if k._ld is not None:
            k._ld.acquire(task, self, self._cls0, TRYLOCK, frame_site(2))
        self._owner = task
        if k.lock_stat:
            self._stat.acquisitions += 1
            self._t_acq = _now()
        if d is not None:
            d("lock_acquired", task, self)
        return True

    # -- mutex_unlock -----------------------------------------------------------------------
    def unlock(self, *_exc: object) -> None:
        """mutex_unlock(). Unlocking a mutex the task does not hold is a bad-unlock finding and
        leaves the mutex as it is (the kernel would corrupt it)."""
        k = self._k
        try:
            task = k._tls.task
        except AttributeError:
            task = k.current()
        if self._owner is not task:
            k.lockdep.report_bad_unlock(task, self, frame_site(2))
            return
        d = k._dispatch
        if d is not None:
            d("lock_release", task, self)
        if k._ld is not None:
            held = task.held
            if held and held[-1][0] is self:  # lock_release() fast path, inlined
                task.chain_key = held.pop()[2]
            else:
                k._ld.release(task, self)
        if k.lock_stat:
            self._stat.hold(_now() - self._t_acq)
        self._owner = None
        self._release()

    __exit__ = unlock

    # -- the wait list -----------------------------------------------------------------------
    def _enqueue(self) -> _Waiter:
        """Caller holds _wait_lock and found the mutex taken: queue at the tail, asleep."""
        w = _Waiter(self._k.raw_lock())
        self._waiters.append(w)
        return w

    def _wait_turn(self, w: _Waiter, timeout: float) -> bool:
        """One sleep of waiter ``w`` (at most ``timeout``); True once it owns the mutex."""
        if not w.sem.acquire(True, timeout):
            return False
        with self._wait_lock:
            w.woken = False
            if w.handed:
                return True  # the unlocker took it off the list and left _raw held for us
            if self._raw.acquire(False):
                self._waiters.popleft()  # only the first waiter is ever woken
                return True
            self._handoff = True  # a running task got there first: the next unlock is ours
            return False

    def _wake_first_locked(self) -> None:
        ws = self._waiters
        if ws and not ws[0].woken:
            ws[0].woken = True
            ws[0].sem.release()

    def _release(self) -> None:
        """__mutex_unlock_slowpath(): hand the mutex to a first waiter that asked for it, or
        free it and wake the first waiter."""
        with self._wait_lock:
            if self._handoff:
                self._handoff = False
                w = self._waiters.popleft()
                w.handed = w.woken = True
                w.sem.release()  # _raw stays held: it is theirs now
                return
            self._raw.release()
            self._wake_first_locked()

    def _dequeue(self, w: _Waiter) -> None:
        """A waiter unwinds (teardown): leave the list; pass on what it was given."""
        with self._wait_lock:
            if not w.handed:
                first = self._waiters[0] is w
                self._waiters.remove(w)
                if first:
                    self._handoff = False
                    if not self._raw.locked():  # its wakeup would be lost with it
                        self._wake_first_locked()
                return
        self._release()  # handed over meanwhile: it owns the mutex

    # -- state ------------------------------------------------------------------------------
    def is_held(self) -> bool:
        """mutex_is_locked() by the calling task (lockdep_is_held)."""
        return self._owner is not None and self._owner is self._k.current()

    def is_locked(self) -> bool:
        return self._raw.locked()

    @property
    def owner(self) -> Task | None:
        return self._owner

    def waiter_owners(self) -> list[Task]:
        o = self._owner
        return [o] if o is not None else []

    def init(self) -> None:
        """mutex_init() again: re-initializing a held mutex is a held-lock-freed finding."""
        o = self._owner
        self._k.lockdep.check_no_locks_freed(self, [o] if o else [], "re-initializing")

    def destroy(self) -> None:
        """mutex_destroy() / freeing the memory that holds the mutex."""
        o = self._owner
        self._k.lockdep.check_no_locks_freed(self, [o] if o else [], "freeing")


class SpinLock(Mutex):
    """spinlock_t: the same exclusion and lockdep tracking as a mutex, but taking it does not
    sleep, so it is legal inside rcu_read_lock() (the SLAB_TYPESAFE_BY_RCU reader pattern
    locks the object it found). The model still blocks on contention instead of spinning."""

    __slots__ = ()
    kind = "spinlock"
    sleeps = False
    usage_str = "{+.+.}-{2:2}"
