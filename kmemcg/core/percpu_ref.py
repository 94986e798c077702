"""percpu_ref (include/linux/percpu-refcount.h, lib/percpu-refcount.c, as of 5.3).

A reference count that starts in *percpu mode*: gets and puts touch only the current CPU's
counter, so nobody can tell when the sum reaches zero and the release callback can never run.
``percpu_ref_kill()`` marks the ref dead and starts the switch to *atomic mode*: the per-CPU
counters are summed into the atomic counter one RCU grace period later (``call_rcu`` ->
``percpu_ref_switch_to_atomic_rcu``, the "confirm" step), because until then a CPU may still
be incrementing its own counter. Only after that can a put see zero and call ``release``, in
whatever context dropped the last reference (here: any model thread, the RCU callback thread
included). ``percpu_ref_exit()`` frees the per-CPU counters; doing so while the switch is still
pending is the kernel's ``WARN_ON_ONCE(ref->confirm_switch)`` at lib/percpu-refcount.c:108
(fix a264df74df38 is about exactly that), and the pending callback then sums freed memory.

As in the kernel, the atomic counter carries ``PERCPU_COUNT_BIAS`` while the ref is in percpu
mode (and until the switch is confirmed), so that puts reaching the atomic counter during the
switch cannot see a false zero; the callback adds the per-CPU sum and removes the bias.

Model notes and differences:

* ``PercpuRef`` is a :class:`KasanObject` standing for the ``struct percpu_ref`` embedded in its
  owner: :func:`percpu_ref_init` registers it with KASAN and the owner frees it with itself
  (``k.kasan.free(ref)``), so a confirm callback that runs after the owner was freed is a
  use-after-free. The per-CPU counters are a KASAN-tracked object of their own (``alloc_percpu``
  / ``free_percpu``), freed by :meth:`PercpuRef.exit`.
* Every operation runs under one raw lock per ref (the kernel uses per-CPU ops with preemption
  disabled and ``percpu_ref_switch_lock``); correct on real threads, not relying on the GIL.
  ``release`` and WARN reports run after that lock is dropped.
* Findings (kind ``refcount``, the kernel's ``------------[ cut here ]------------`` shape):
  exit while switching (lib/percpu-refcount.c:108), a second kill (``percpu_ref_kill_and_confirm
  called more than once``), a count at or below zero when the switch completes, and (a model
  check the kernel does not make) a put that takes an atomic-mode count below zero.
* ``percpu_ref_switch_to_percpu`` / ``reinit`` / ``resurrect`` are not modelled (no user).

Window: ``percpu_ref_kill:switch_pending``, in the confirm callback before it looks at the ref:
a test breakpoint there (or a perturbing sleep) keeps the switch pending after the kill.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from kmemcg.core import findings as F
from kmemcg.core.kasan import KasanObject
from kmemcg.core.report import warn_splat

if TYPE_CHECKING:
    from kmemcg.kernel import Kernel

PERCPU_COUNT_BIAS = 1 << 63  # 1LU << (BITS_PER_LONG - 1)
EXIT_WARN_SITE = "lib/percpu-refcount.c:108"  # WARN_ON_ONCE(ref->confirm_switch), 5.3

EXIT_WHILE_SWITCHING = "percpu_ref_exit while switching"
KILLED_TWICE = "percpu_ref_kill_and_confirm called more than once"
ZERO_AFTER_SWITCH = "percpu ref <= 0 after switching to atomic"
PUT_BELOW_ZERO = "percpu ref put below zero"


class PercpuCount(KasanObject):
    """The ``alloc_percpu(unsigned long)`` area: one counter per possible CPU."""

    __slots__ = ("counts",)

    def __init__(self, nr_cpus: int) -> None:
        self.counts = [0] * nr_cpus


class PercpuRef(KasanObject):
    """``struct percpu_ref``. Use :func:`percpu_ref_init` to make one."""

    __slots__ = ("_k", "name", "release", "_lock", "_count", "_pcpu", "_atomic", "_dead",
                 "confirm_switch")

    def __init__(self, k: Kernel, name: str, release: Callable[[PercpuRef], None]) -> None:
        self._k = k
        self.name = name
        self.release = release
        self._lock = k.raw_lock()
        # the atomic counter: the initial reference, plus the bias while in percpu mode
        self._count = 1 + PERCPU_COUNT_BIAS
        self._pcpu: PercpuCount | None = PercpuCount(k.hotplug.nr_cpus)
        self._atomic = False  # __PERCPU_REF_ATOMIC: gets and puts go to _count
        self._dead = False  # __PERCPU_REF_DEAD
        # non-None while a switch to atomic mode is pending (the kernel's "in progress" mark)
        self.confirm_switch: Callable[[PercpuRef], None] | None = None

    def __repr__(self) -> str:
        return f"<percpu_ref {object.__getattribute__(self, 'name')}>"

    # ------------------------------------------------------------------ get / put
    def _cpu(self) -> int:
        return self._k.current().cpu % len(self._pcpu.counts)

    def get_many(self, nr: int = 1) -> None:
        """percpu_ref_get_many(): the caller already holds a reference (or the ref is live)."""
        with self._lock:
            if self._atomic:
                self._count += nr
            else:
                self._pcpu.counts[self._cpu()] += nr

    def get(self) -> None:
        self.get_many(1)

    def tryget(self) -> bool:
        """percpu_ref_tryget(): always succeeds in percpu mode; then only while the count is
        not zero (atomic_long_inc_not_zero), dead or not."""
        with self._lock:
            if not self._atomic:
                self._pcpu.counts[self._cpu()] += 1
                return True
            if self._count == 0:
                return False
            self._count += 1
            return True

    def tryget_live(self) -> bool:
        """percpu_ref_tryget_live(): fails once the ref was killed."""
        with self._lock:
            if not self._atomic:
                self._pcpu.counts[self._cpu()] += 1
                return True
            if self._dead or self._count == 0:
                return False
            self._count += 1
            return True

    def put_many(self, nr: int = 1) -> None:
        """percpu_ref_put_many(): in atomic mode, the put that reaches zero calls
        ``release`` (in the caller's context, after this ref's lock is dropped)."""
        with self._lock:
            if not self._atomic:
                self._pcpu.counts[self._cpu()] -= nr
                return
            self._count -= nr
            v = self._count
        if v == 0:
            self.release(self)
        elif v < 0:
            self._warn(PUT_BELOW_ZERO, f"{PUT_BELOW_ZERO}: {self.name} count {v}",
                       "percpu_ref_put_many")

    def put(self) -> None:
        self.put_many(1)

    # ------------------------------------------------------------------ kill / exit
    def kill(self) -> None:
        """percpu_ref_kill(): mark dead, start the switch to atomic mode (confirmed one grace
        period later), and drop the initial reference."""
        self.kill_and_confirm(None)

    def kill_and_confirm(self, confirm_kill: Callable[[PercpuRef], None] | None) -> None:
        k = self._k
        twice = False
        confirm_now = False
        with self._lock:
            twice = self._dead
            self._dead = True
            # __percpu_ref_switch_to_atomic()
            if self._atomic:
                confirm_now = True
            else:
                self._atomic = True  # new gets and puts go to the (biased) atomic counter
                # non-NULL confirm_switch marks the switch in progress; a noop if unspecified
                self.confirm_switch = confirm_kill or _noop_confirm
                self._count += 1  # percpu_ref_get(): put after confirmation
                pcpu = self._pcpu
                k.rcu.call(percpu_ref_switch_to_atomic_rcu, k, self, pcpu)
        if twice:
            self._warn(KILLED_TWICE, f"{KILLED_TWICE} on {self.name}!",
                       "percpu_ref_kill_and_confirm")
        if confirm_now and confirm_kill is not None:
            confirm_kill(self)
        self.put()  # the initial reference

    def exit(self) -> None:
        """percpu_ref_exit(): free the per-CPU counters. WARNs if a switch is pending: its
        callback will sum freed counters (a264df74df38)."""
        with self._lock:
            pcpu = self._pcpu
            if pcpu is None:
                return
            switching = self.confirm_switch is not None
            self._pcpu = None
            self._atomic = self._dead = True  # __PERCPU_REF_ATOMIC_DEAD
        if switching:
            self._warn(EXIT_WHILE_SWITCHING,
                       f"{EXIT_WHILE_SWITCHING}: {self.name} (confirm_switch pending)",
                       "percpu_ref_exit", site=EXIT_WARN_SITE)
        self._k.kasan.free(pcpu)  # free_percpu()

    # ------------------------------------------------------------------ queries
    def is_zero(self) -> bool:
        """percpu_ref_is_zero(): only an atomic-mode count can be seen at zero."""
        with self._lock:
            return self._atomic and self.confirm_switch is None and self._count == 0

    def is_dying(self) -> bool:
        """percpu_ref_is_dying()."""
        with self._lock:
            return self._dead

    def read(self) -> int:
        """The logical count (debug only: the per-CPU sum plus the unbiased atomic count)."""
        with self._lock:
            v = self._count
            if v >= PERCPU_COUNT_BIAS // 2:
                v -= PERCPU_COUNT_BIAS
            if self._pcpu is not None and (not self._atomic or self.confirm_switch):
                v += sum(self._pcpu.counts)
            return v

    # ------------------------------------------------------------------ report
    def _warn(self, key: str, message: str, func: str, site: str | None = None) -> None:
        """A WARN()/WARN_ON_ONCE() splat, kernel-shaped. Signature per kind of misuse and
        site: once per boot, as WARN_ON_ONCE."""
        k = self._k
        task = k.current()
        title = f"WARNING: {key}"
        where = f"{site} {func}" if site else func
        stack = k.stacks.capture(2)
        k.findings.report(
            F.REFCOUNT, title, f"percpu_ref:{key}",
            lambda: warn_splat(k, task, message, where, stack),
            thread=task.name, extra={"percpu_ref": self.name, "event": key})


def _noop_confirm(ref: PercpuRef) -> None:
    """percpu_ref_noop_confirm_switch()."""


def percpu_ref_init(k: Kernel, release: Callable[[PercpuRef], None], name: str,
                    owner: str = "") -> PercpuRef:
    """percpu_ref_init(ref, release, 0, GFP): percpu mode, one (initial) reference."""
    ref = PercpuRef(k, name, release)
    k.kasan.alloc(ref, "percpu_ref", owner or f"the owner of {name}")
    k.kasan.alloc(ref._pcpu, "percpu counters", f"percpu_ref {name}")
    return ref


def percpu_ref_switch_to_atomic_rcu(k: Kernel, ref: PercpuRef, pcpu: PercpuCount) -> None:
    """The RCU callback of the switch (percpu_ref_switch_to_atomic_rcu +
    percpu_ref_call_confirm_rcu): sum the per-CPU counters into the atomic counter, drop the
    bias, confirm, then put the reference the switch took. ``pcpu`` is the counter area the
    kill switched away from (the kernel reads it through the ref): after a premature
    percpu_ref_exit() it is freed memory."""
    k.window("percpu_ref_kill:switch_pending")
    with ref._lock:  # a freed owner (and its embedded ref) is a use-after-free here
        total = sum(pcpu.counts)
        ref._count += total - PERCPU_COUNT_BIAS
        v = ref._count
        confirm, ref.confirm_switch = ref.confirm_switch, None
    if v <= 0:
        ref._warn(ZERO_AFTER_SWITCH, f"percpu ref ({ref.name}) <= 0 ({v}) after switching "
                  "to atomic", "percpu_ref_switch_to_atomic_rcu")
    if confirm is not None:
        confirm(ref)
    ref.put()  # drop the reference from __percpu_ref_switch_to_atomic()
