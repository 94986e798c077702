"""Userspace RCU for the model's threads: read side, reader registry, grace periods
(liburcu src/urcu.c and include/urcu/static/urcu-common.h; the kernel's rcu_read_lock() in
include/linux/rcupdate.h and synchronize_rcu() / rcu_barrier() in kernel/rcu/tree.c).

Read side. A thread registers on its first rcu_read_lock() (urcu's rcu_register_thread) and is
unregistered when its task exits (a do_exit() check). The outermost rcu_read_lock() copies the
grace-period number its reader record last saw into ``task.rcu_ctr`` (0 = not in a reader);
nested ones only count ``task.rcu_nesting``. The outermost rcu_read_unlock() clears
``rcu_ctr`` and, only if a grace period is waiting for this very reader, wakes it.

Grace periods. Python integers do not wrap, so the grace-period number is monotonic and ONE scan
of the readers suffices (the argument of urcu-qsbr on 64-bit; the two-phase flip of urcu exists
only because its phase is one bit). synchronize_rcu() joins a waiter queue; the first waiter is
the leader: it takes the grace-period lock, moves every queued waiter into its batch, runs one
grace period and wakes the batch (urcu's grace-period sharing: N concurrent callers cost far
fewer than N grace periods). A grace period waits exactly for the readers that were inside a
section when the scan reached them, never for a reader that entered after the scan. Unlike urcu,
a leader gives the CPU away once (os.sched_yield, which drops the GIL) before collecting its
batch when synchronize() was contended at the previous grace period: under the GIL, callers
only overlap if somebody yields, and a grace period with no reader to wait for never blocks.

Memory ordering (no reliance on the GIL). Reader state crosses threads only under a per-reader
raw lock ``r.lock``:

* read_lock ``L_r``: ``with r.lock: rcu_ctr = r.seen``; read_unlock ``L_u``: ``with r.lock:
  rcu_ctr = 0; wake = r.wake``.
* the scan ``L_w(r)``: ``with r.lock: r.seen = T; pending if rcu_ctr != 0``.

The lock totally orders each reader's ``L_r``/``L_u`` against the grace period's ``L_w(r)``
(paired: L_w(r) with L_r and with L_u). If ``L_w(r)`` comes before ``L_r``, everything the
updater did before synchronize() (its rcu_assign_pointer()) happens-before the reader's section,
which therefore cannot see the old object and is not waited for (its ``rcu_ctr`` records ``T``,
the grace period it began under; the scan did not mark it, so its unlock wakes nobody). If
``L_u`` comes before ``L_w(r)``, the section is over and ``rcu_ctr`` is 0. Otherwise the reader
is inside a section that began before the scan and may hold the old object: the scan marks it
``wake``; its ``L_u`` (or its exit) sees the mark under the same lock and reports to the leader,
so the grace period ends only after the section did, and the release of ``r.lock`` in L_u orders
the reader's loads before it. A marked flag belongs to one section, so a reader that leaves and
enters again is never waited for twice.
The per-reader lock plays the role of urcu-mb's smp_mb() pair (or urcu-memb's membarrier):
uncontended except for the instant a scan touches it.

Wake-up without polling: the scan marks each pending reader ``r.wake`` and counts them in
``_gp_nwait`` while holding ``_gp_cond``; a woken reader's L_u sees ``wake`` and decrements the
count under ``_gp_cond`` (never holding ``r.lock`` then: lock order is ``_gp_cond`` ->
``r.lock``). The leader sleeps on ``_gp_cond`` until the count is 0, through ``k.waits`` (so
teardown unwinds it and the hung-task watchdog and the deadlock detector see it). Readers that
no grace period waits for never touch ``_gp_cond``: the read side stays two uncontended lock
round trips.

Checks (PROVE_RCU, "WARNING: suspicious RCU usage"): synchronize_rcu() / rcu_barrier() inside a
reader (reported, then return at once instead of waiting for oneself), unbalanced
rcu_read_unlock(), a task exiting inside a reader (reported, then the section is ended so no
grace period waits for a dead thread), rcu_dereference_check() outside a reader without its
condition (only with lockdep on, as PROVE_RCU needs PROVE_LOCKING). Sleeping on a lock inside a
reader is reported by the lock itself (``Kernel.might_sleep_in_rcu``). rcu_read_lock() is listed
in lockdep's held locks as a check=0 pseudo-lock (when lockdep is on).

Instrumentation points (``Kernel.event``): ``rcu_read_lock`` / ``rcu_read_unlock`` (obj: the
``rcu_read_lock`` lockdep map; read_lock reports once inside the section, read_unlock before
leaving it), ``rcu_sync_queued`` (a synchronize() caller joined the waiter queue),
``rcu_gp_start`` (the grace period's pending readers are fixed: a reader entering after this is
never waited for) and ``rcu_gp_end`` (obj: the ``rcu_gp`` wait object), ``rcu_callback``
(obj: the callback's qualified name, just before it runs; see kmemcg.rcu.callbacks).

Flavors: ``RCU(k, flavor="busted")`` is rcutorture's rcu_busted: grace periods that do not wait
for readers, which the torture test must catch.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kmemcg.core.report import NOCHECK
from kmemcg.rcu.callbacks import CallRCU
from kmemcg.rcu.rcupdate import RCUPointer, check_holds, rcu_suspicious

if TYPE_CHECKING:
    from kmemcg.core.task import Task
    from kmemcg.kernel import Kernel

_getframe = sys._getframe
_yield = os.sched_yield  # releases the GIL


class _Reader:
    """A registered reader thread (urcu's ``struct urcu_reader``).

    ``lock`` guards the reader state the updater reads: ``task.rcu_ctr``, ``seen``, ``wake``.
    ``task.rcu_nesting`` is the thread's own (never read by the updater).
    """

    __slots__ = ("task", "lock", "seen", "wake")

    def __init__(self, task: Task, lock: Any, seen: int) -> None:
        self.task = task
        self.lock = lock
        self.seen = seen  # last grace-period number a scan wrote here (or at registration)
        self.wake = False  # a grace period is waiting for this reader's current section


class _GPWait:
    """What synchronize() callers sleep on (``blocked_on``): named ``rcu_gp``. Its owners, for
    the deadlock detector, are the readers the running grace period waits for."""

    __slots__ = ("name", "_rcu")

    def __init__(self, rcu: RCU) -> None:
        self.name = "rcu_gp"
        self._rcu = rcu

    def __repr__(self) -> str:
        return "<rcu_gp>"

    def waiter_owners(self) -> list[Task]:
        # Read without a lock (called under the wait tracker's lock, which the leader may
        # hold while it owns _gp_cond): ``_gp_pending`` is a tuple replaced whole, ``wake`` a
        # flag; a stale answer only delays a deadlock report by one poll.
        return [r.task for r in self._rcu._gp_pending if r.wake]


class _SyncWaiter:
    """One synchronize() caller in the waiter queue; fields guarded by ``_wq_cond``."""

    __slots__ = ("done", "retry")

    def __init__(self) -> None:
        self.done = False
        self.retry = False


@dataclass(frozen=True)
class RCUStats:
    flavor: str
    gp_seq: int  # grace periods started (the number readers snapshot)
    grace_periods: int  # grace periods completed
    sync_calls: int  # synchronize() calls that reached the waiter queue
    readers: int  # registered reader threads
    callbacks_queued: int
    callbacks_invoked: int
    callbacks_backlog: int
    callback_errors: int
    barriers: int


class RCU:
    """``k.rcu``: ``read_lock()`` / ``read_unlock()`` / ``with k.rcu.read():``,
    ``synchronize()``, ``call(fn, *args)``, ``barrier()``, ``dereference(p, check)``,
    ``pointer(value)``. ``RCU(k, flavor="busted")`` makes the broken flavor.

    One instance per kernel is the supported setup (``k.rcu``): the read-side nesting and
    snapshot live in the Task (``rcu_nesting``, ``rcu_ctr``) as in the kernel, so they are
    shared by every instance. Extra instances (tests) do not register with the kernel's
    shutdown: call ``k.on_shutdown(rcu.shutdown)``.
    """

    flavor = "rcu"

    def __new__(cls, kernel: Kernel, flavor: str | None = None, **_kw: Any) -> RCU:
        if cls is RCU and flavor is not None and flavor != RCU.flavor:
            try:
                cls = _FLAVORS[flavor]
            except KeyError:
                raise ValueError(f"unknown RCU flavor {flavor!r}; known: "
                                 f"{', '.join(sorted(_FLAVORS))}") from None
        return object.__new__(cls)

    def __init__(self, kernel: Kernel, flavor: str | None = None, *,
                 nr_cb_queues: int = 1) -> None:
        k = self._k = kernel
        self._tls = threading.local()  # this thread's _Reader (per RCU instance)
        self._map = k.lockdep_map("rcu_read_lock", "{....}-{1:2}")
        self._map_cls = self._map.lock_class()
        self._gp_obj = _GPWait(self)
        # Registry: _registry_lock guards _registry and _gp_seq.
        self._registry_lock = k.raw_lock()
        self._registry: dict[Task, _Reader] = {}
        self._gp_seq = 1  # readers' rcu_ctr is a copy: never 0, so 0 means "not in a reader"
        # Waiter queue: _wq_cond guards _queue, _nr_sync and the waiters' fields.
        self._wq_cond = threading.Condition(k.raw_lock())
        self._queue: list[_SyncWaiter] = []
        self._nr_sync = 0
        # The running grace period: _gp_lock serializes leaders (urcu's rcu_gp_lock);
        # _gp_cond guards _gp_nwait and every reader's ``wake`` transition to False.
        self._gp_lock = k.raw_lock()
        self._gp_cond = threading.Condition(k.raw_lock())
        self._gp_nwait = 0
        self._gp_pending: tuple[_Reader, ...] = ()
        self._contended = False  # last grace period served or saw other callers (_gp_lock)
        self._nr_gp = 0  # completed; written by the leader under _gp_lock, read racily
        self._nr_barrier = 0
        # rcu_state.barrier_sequence (rcu_seq: odd while a barrier runs); written under
        # barrier_mutex, read by callers before they take it: under its own raw lock, so a
        # caller never snapshots a value older than its call (a stale, smaller value would
        # let a barrier that began before the call count for it)
        self._barrier_seq = 0
        self._barrier_seq_lock = k.raw_lock()
        self.nr_barrier_shared = 0  # barriers that found their work done by another
        self.barrier_mutex = k.mutex("rcu_barrier_mutex")  # rcu_sched_state.barrier_mutex
        self._cbs = CallRCU(self, nr_cb_queues)

    def __repr__(self) -> str:
        return f"<RCU {self.flavor} gp={self._nr_gp}>"

    # ================================================================== read side
    def _register(self) -> _Reader:
        """rcu_register_thread(): on the thread's first read_lock()."""
        k = self._k
        task = k.current()
        r = _Reader(task, k.raw_lock(), 0)
        with self._registry_lock:
            # Paired with the leader's increment + registry snapshot under the same lock: a
            # reader registered after a scan's snapshot starts at that grace period's number.
            r.seen = self._gp_seq
            self._registry[task] = r
        self._tls.r = r
        return r

    def read_lock(self) -> None:
        """rcu_read_lock()."""
        try:
            r = self._tls.r
        except AttributeError:
            r = self._register()
        t = r.task
        n = t.rcu_nesting
        if n:
            t.rcu_nesting = n + 1
        else:
            # L_r: paired with the scan's L_w(r) (module docstring). acquire()/release()
            # rather than ``with``: half the cost, and a slot store cannot raise.
            lk = r.lock
            lk.acquire()
            t.rcu_ctr = r.seen
            lk.release()
            t.rcu_nesting = 1
        k = self._k
        ld = k._ld
        if ld is not None:
            # rcu_lock_acquire(&rcu_lock_map): check=0, listed as held, no dependencies.
            ld.acquire(t, self._map, self._map_cls, NOCHECK, _getframe(1))
        d = k._dispatch
        if d is not None:
            d("rcu_read_lock", t, self._map)

    __enter__ = read_lock

    def read_unlock(self, *_exc: object) -> None:
        """rcu_read_unlock()."""
        try:
            r = self._tls.r
        except AttributeError:
            r = None
        t = r.task if r is not None else self._k.current()
        n = t.rcu_nesting
        if n <= 0:
            rcu_suspicious(self._k, t, "rcu_read_unlock() without matching rcu_read_lock()!",
                           "unbalanced-unlock")
            return
        k = self._k
        d = k._dispatch
        if d is not None:
            d("rcu_read_unlock", t, self._map)
        ld = k._ld
        if ld is not None and not ld.release(t, self._map):
            ld.report_bad_unlock(t, self._map, _getframe(1))
        if n > 1:
            t.rcu_nesting = n - 1
            return
        t.rcu_nesting = 0
        if r is None:  # nesting taken through another RCU instance of this kernel
            return
        lk = r.lock
        lk.acquire()  # L_u: paired with L_w(r)
        t.rcu_ctr = 0
        wake = r.wake
        if wake:
            r.wake = False
        lk.release()
        if wake:
            self._reader_done()

    __exit__ = read_unlock

    def read(self) -> RCU:
        """``with k.rcu.read():`` is rcu_read_lock() ... rcu_read_unlock()."""
        return self

    def _reader_done(self) -> None:
        """A reader the running grace period waits for has left its section (or exited)."""
        with self._gp_cond:
            self._gp_nwait -= 1
            if self._gp_nwait <= 0:
                self._gp_cond.notify_all()

    def in_reader(self) -> bool:
        """rcu_read_lock_held() for the calling thread."""
        return self._k.current().rcu_nesting > 0

    def is_registered(self, task: Task) -> bool:
        with self._registry_lock:
            return task in self._registry

    # ================================================================== pointers
    def pointer(self, value: Any = None, name: str = "rcu_pointer") -> RCUPointer:
        """A new RCU-protected pointer cell holding ``value``."""
        return RCUPointer(self, value, name)

    def dereference(self, ref: Any, check: Any = False) -> Any:
        """rcu_dereference_check(ref, check): ``ref``'s value (an :class:`RCUPointer`, or any
        value). Outside a read-side section, ``check`` (a bool or a lock that must be held)
        must hold, else "suspicious rcu_dereference_check() usage!"."""
        v = ref._p if isinstance(ref, RCUPointer) else ref
        k = self._k
        if k._ld is not None:
            try:
                t = k._tls.task
            except AttributeError:
                t = k.current()
            if not t.rcu_nesting and not check_holds(check):
                rcu_suspicious(k, t, "suspicious rcu_dereference_check() usage!",
                               "dereference")
        return v

    def dereference_protected(self, ref: Any, check: Any = True) -> Any:
        """rcu_dereference_protected(ref, check): the updater's read; ``check`` must hold."""
        v = ref._p if isinstance(ref, RCUPointer) else ref
        k = self._k
        if k._ld is not None and not check_holds(check):
            rcu_suspicious(k, k.current(), "suspicious rcu_dereference_protected() usage!",
                           "dereference-protected")
        return v

    # ================================================================== grace periods
    def synchronize(self) -> None:
        """synchronize_rcu(): return after every reader that was inside a section when the
        call began has left it. Concurrent callers share grace periods."""
        k = self._k
        task = k.current()
        if task.rcu_nesting:
            rcu_suspicious(k, task,
                           "Illegal synchronize_rcu() in RCU read-side critical section",
                           "illegal-synchronize")
            return
        k.check_alive()
        cond = self._wq_cond
        first = True
        while True:
            w = _SyncWaiter()
            with cond:
                self._queue.append(w)
                leader = len(self._queue) == 1
                if first:
                    self._nr_sync += 1
            first = False
            if k._dispatch is not None:
                k.event("rcu_sync_queued", self._gp_obj)
            if leader:
                self._lead(task, w)
                return

            def try_once(timeout: float, w: _SyncWaiter = w) -> bool:
                with cond:
                    if not w.done:
                        cond.wait(timeout)
                    return w.done

            k.waits.wait(task, self._gp_obj, try_once)
            if not w.retry:
                return
            # The leader failed before covering us: queue again (teardown raises in wait).

    def _lead(self, task: Task, me: _SyncWaiter) -> None:
        """The queue's first waiter: one grace period for everybody queued so far."""
        k = self._k
        gp_lock = self._gp_lock
        if not gp_lock.acquire(False):
            k.waits.wait(task, self._gp_obj, lambda t: gp_lock.acquire(True, t))
        if self._contended:
            # Under the GIL, callers are never truly concurrent: a leader that does not block
            # finishes before any runnable caller gets to queue, and nothing is shared. When
            # synchronize() is contended, give the CPU away once so they can queue behind this
            # grace period (urcu's leader gets the same from real parallelism).
            _yield()
        ok = False
        batch: list[_SyncWaiter] = []
        cond = self._wq_cond
        try:
            with cond:
                # Every waiter moved here queued before the grace period below begins, so
                # that grace period covers it (urcu_move_waiters()).
                batch, self._queue = self._queue, []
            self._grace_period(task)
            ok = True
        finally:
            with cond:
                # _contended is read and written by leaders holding _gp_lock only.
                self._contended = len(batch) > 1 or bool(self._queue)
                for w in batch:
                    if w is not me:
                        w.retry = not ok
                        w.done = True
                cond.notify_all()
            gp_lock.release()

    def _grace_period(self, task: Task) -> None:
        """One grace period; caller holds ``_gp_lock``."""
        k = self._k
        with self._registry_lock:
            self._gp_seq += 1
            gp = self._gp_seq
            readers = list(self._registry.values())
        with self._gp_cond:
            n, pending = self._scan(readers, gp)
            self._gp_nwait = n
            self._gp_pending = pending
        d = k._dispatch
        if d is not None:
            d("rcu_gp_start", task, self._gp_obj)
        if n:
            self._wait_for_readers(task)
        self._gp_pending = ()
        self._nr_gp += 1
        if k._dispatch is not None:
            k.event("rcu_gp_end", self._gp_obj)

    def _scan(self, readers: list[_Reader], gp: int) -> tuple[int, tuple[_Reader, ...]]:
        """Find the pre-existing readers of grace period ``gp``; caller holds ``_gp_cond``.
        Returns how many there are and which."""
        pending = []
        for r in readers:
            with r.lock:  # L_w(r): paired with the reader's L_r and L_u
                r.seen = gp
                if r.task.rcu_ctr:  # in a section that began before this point
                    r.wake = True
                    pending.append(r)
        return len(pending), tuple(pending)

    def _wait_for_readers(self, task: Task) -> None:
        """Sleep until every pending reader has left its section (``_gp_nwait`` == 0)."""
        cond = self._gp_cond

        def try_once(timeout: float) -> bool:
            with cond:
                if self._gp_nwait > 0:
                    cond.wait(timeout)
                return self._gp_nwait <= 0

        self._k.waits.wait(task, self._gp_obj, try_once)

    @property
    def completed(self) -> int:
        """rcu_batches_completed(): grace periods completed so far (racy read, monotonic)."""
        return self._nr_gp

    # ================================================================== callbacks
    def call(self, fn: Callable[..., Any], *args: Any) -> None:
        """call_rcu(): run ``fn(*args)`` on a callback thread after a grace period."""
        k = self._k
        try:
            task = k._tls.task
        except AttributeError:
            task = k.current()
        self._cbs.call(task, fn, args)

    def barrier(self) -> None:
        """rcu_barrier(): wait until every callback queued before this call has run.

        As in v3.7 (commit 1331e7a1bbe1) it takes ``barrier_mutex`` and, with the 2012 CPU
        hotplug design, get_online_cpus() inside it: barrier_mutex -> cpu_hotplug.lock.

        "Did someone else do our work for us?" (cf3a9c4842b1, 3.5; ``barrier_sequence`` since
        4.x): a caller that waited for the mutex while a whole barrier ran, one that began
        after this call did, returns without a barrier of its own: every callback queued
        before this call ran before that barrier's completions.
        """
        k = self._k
        task = k.current()
        if task.rcu_nesting:
            rcu_suspicious(k, task, "Illegal rcu_barrier() in RCU read-side critical section",
                           "illegal-barrier")
            return
        if self._cbs.is_callback_thread(task):
            rcu_suspicious(k, task, "Illegal rcu_barrier() from an RCU callback",
                           "barrier-in-callback")
            return
        with self._barrier_seq_lock:
            snap = (self._barrier_seq + 3) & ~1  # rcu_seq_snap()
        mu = self.barrier_mutex
        mu.lock()
        try:
            with self._barrier_seq_lock:
                done = self._barrier_seq >= snap  # rcu_seq_done()
                if not done:
                    self._barrier_seq += 1  # rcu_seq_start(): odd
            if done:
                self.nr_barrier_shared += 1
                return
            self._nr_barrier += 1
            hp = getattr(k, "hotplug", None)
            took = hp is not None and getattr(hp, "barrier_takes_hotplug", False)
            if took:
                hp.get_online_cpus()
            try:
                self._cbs.barrier_wait(task)
            finally:
                if took:
                    hp.put_online_cpus()
                with self._barrier_seq_lock:
                    self._barrier_seq += 1  # rcu_seq_end(): even
        finally:
            mu.unlock()

    # ================================================================== task exit, teardown
    def exit_check(self, task: Task) -> None:
        """do_exit(): a task leaving inside a reader is a finding; then its section is ended
        (the kernel's exit_rcu()) and the thread unregistered (rcu_unregister_thread)."""
        if task.rcu_nesting:
            rcu_suspicious(self._k, task,
                           f"Task exited inside an RCU read-side critical section "
                           f"(rcu_read_lock() nesting {task.rcu_nesting})!",
                           "exit-in-reader")
            task.rcu_nesting = 0
        with self._registry_lock:
            r = self._registry.pop(task, None)
        if r is None:
            return
        with r.lock:  # as an outermost L_u
            task.rcu_ctr = 0
            wake = r.wake
            r.wake = False
        if wake:
            self._reader_done()

    def shutdown(self) -> None:
        """Kernel teardown hook (the kernel is already marked dead): wake every sleeper so it
        sees that at once instead of at its next poll."""
        for c in (self._gp_cond, self._wq_cond):
            with c:
                c.notify_all()
        self._cbs.shutdown()

    # ================================================================== introspection
    def statistics(self) -> RCUStats:
        queued, invoked, errors = self._cbs.stats()
        with self._registry_lock:
            nreaders = len(self._registry)
            gp_seq = self._gp_seq
        return RCUStats(self.flavor, gp_seq, self._nr_gp, self._nr_sync, nreaders, queued,
                        invoked, queued - invoked, errors, self._nr_barrier)


class BustedRCU(RCU):
    """rcutorture's ``rcu_busted``: grace periods that never wait for readers. Exists to show
    that the torture test (kmemcg.rcu.torture) catches a broken RCU."""

    flavor = "busted"

    def _scan(self, readers: list[_Reader], gp: int) -> tuple[int, tuple[_Reader, ...]]:
        return 0, ()


_FLAVORS: dict[str, type[RCU]] = {"rcu": RCU, "busted": BustedRCU}  # read-only table
FLAVORS = tuple(_FLAVORS)
