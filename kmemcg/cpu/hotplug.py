"""What both CPU hotplug designs share (kernel/cpu.c): the online mask, which CPU a task runs
on, the notifier chain, and ``cpu_up()`` / ``cpu_down()``.

``cpu_up(n)`` / ``cpu_down(n)``: ``cpu_maps_update_begin()`` (mutex ``cpu_add_remove_lock``),
then the design's write side (``cpu_hotplug_begin()`` or ``cpus_write_lock()``), then the
notifier chain (UP_PREPARE, mark online, ONLINE; or DOWN_PREPARE, mark offline, DEAD) with the
write side held, as ``_cpu_up()`` / ``_cpu_down()`` of v3.x ran ``__cpu_notify()``; then the
write side and ``cpu_add_remove_lock`` are released. The last online CPU cannot go down
(-EBUSY); bringing up an online CPU or down an offline one is -EINVAL; a CPU number outside
0..nr_cpus-1 is a ValueError.

Tasks and CPUs: every task runs on one simulated CPU (``task.cpu``), assigned at first use
round-robin over the online CPUs. The kernel moves tasks off a dying CPU at once
(``migrate_tasks()``); the model cannot move another thread, so a task notices at its next
marked point: :meth:`Hotplug.this_cpu` (``smp_processor_id()``, never returns an offline CPU),
:meth:`Hotplug.migrate` (always moves to another online CPU when there is one) and
:meth:`Hotplug.cond_resched` (moves only off an offline CPU). Unlike the kernel nothing pins a
task to its CPU (no preempt_disable): a CPU number read outside a hotplug read-side section may
go offline right after; hold ``get_online_cpus()`` to keep the mask stable.

Events: ``cpu_up`` / ``cpu_down`` (obj: a :class:`CpuId`, label ``cpuN``) once the write side is
held, just before the notifiers; ``cpu_migrate`` (obj: the new CpuId) at :meth:`migrate`.

Lock contract: the online mask and the round-robin pointer are guarded by ``_mask_lock`` (raw);
they are written only with ``cpu_add_remove_lock`` and the write side held, so a task inside a
read-side section sees a stable mask. The notifier list is guarded by ``cpu_add_remove_lock``
(register_cpu_notifier() takes it too). ``task.cpu`` is written by the task's own thread, under
``_mask_lock``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kmemcg.core.task import Task
    from kmemcg.kernel import Kernel

# Notifier events (CPU_UP_PREPARE, CPU_ONLINE, CPU_DOWN_PREPARE, CPU_DEAD).
UP_PREPARE = "UP_PREPARE"
ONLINE = "ONLINE"
DOWN_PREPARE = "DOWN_PREPARE"
DEAD = "DEAD"
EINVAL = 22
EBUSY = 16

_ASSIGNED = "cpu.assigned"  # task.extra key: the task has been placed on a CPU

Notifier = Callable[[str, int], object]


class CpuId(int):
    """A CPU number whose event label is ``cpuN`` (breakpoint key ``"cpu_down:cpu2"``)."""

    @property
    def name(self) -> str:
        return f"cpu{int(self)}"


class Hotplug(ABC):
    """The design-independent part; subclasses supply the lock (get/put_online_cpus and
    cpu_hotplug_begin/done)."""

    design = "?"
    name = "cpu_hotplug"
    # rcu_barrier() takes get_online_cpus() in this design (_rcu_barrier after 1331e7a1bbe1).
    barrier_takes_hotplug = False

    def __init__(self, kernel: Kernel, nr_cpus: int) -> None:
        if nr_cpus < 1:
            raise ValueError(f"need at least one CPU, got {nr_cpus}")
        self._k = kernel
        self.nr_cpus = nr_cpus
        self._mask_lock = kernel.raw_lock()
        self._online = [True] * nr_cpus
        self._next = 0  # round-robin placement pointer
        self.cpu_add_remove_lock = kernel.mutex("cpu_add_remove_lock")
        self._notifiers: list[tuple[int, int, Notifier]] = []
        self._nseq = 0
        self.active_writer: Task | None = None  # task inside cpu_up/cpu_down's write side
        self.nr_hotplug_ops = 0  # successful cpu_up + cpu_down (under cpu_add_remove_lock)

    # ------------------------------------------------------------------ the lock (subclass)
    @abstractmethod
    def get_online_cpus(self) -> None:
        """get_online_cpus(): enter a hotplug read-side section."""

    @abstractmethod
    def put_online_cpus(self) -> None:
        """put_online_cpus(): leave it."""

    @abstractmethod
    def cpu_hotplug_begin(self) -> None:
        """cpu_hotplug_begin(): the writer's side, held through the notifiers."""

    @abstractmethod
    def cpu_hotplug_done(self) -> None:
        """cpu_hotplug_done()."""

    @abstractmethod
    def cpus_held(self) -> bool:
        """lockdep_assert_cpus_held() as a predicate: the current task is in a read-side
        section or is the hotplug writer."""

    # Modern names for the same operations.
    def cpus_read_lock(self) -> None:
        self.get_online_cpus()

    def cpus_read_unlock(self) -> None:
        self.put_online_cpus()

    def cpus_write_lock(self) -> None:
        self.cpu_hotplug_begin()

    def cpus_write_unlock(self) -> None:
        self.cpu_hotplug_done()

    @contextmanager
    def cpus_read(self) -> Iterator[None]:
        """``with k.hotplug.cpus_read():`` = get_online_cpus() ... put_online_cpus()."""
        self.get_online_cpus()
        try:
            yield
        finally:
            self.put_online_cpus()

    def cpu_maps_update_begin(self) -> None:
        self.cpu_add_remove_lock.lock()

    def cpu_maps_update_done(self) -> None:
        self.cpu_add_remove_lock.unlock()

    # ------------------------------------------------------------------ mask
    def _check_cpu(self, cpu: int) -> CpuId:
        if not isinstance(cpu, int) or isinstance(cpu, bool) or not 0 <= cpu < self.nr_cpus:
            raise ValueError(f"no such CPU {cpu!r} (nr_cpu_ids = {self.nr_cpus})")
        return CpuId(cpu)

    def cpu_online(self, cpu: int) -> bool:
        cpu = self._check_cpu(cpu)
        with self._mask_lock:
            return self._online[cpu]

    def online_cpus(self) -> list[int]:
        """cpu_online_mask as a list (a snapshot)."""
        with self._mask_lock:
            return [c for c, on in enumerate(self._online) if on]

    def num_online_cpus(self) -> int:
        with self._mask_lock:
            return sum(self._online)

    def for_each_online_cpu(self) -> Iterator[int]:
        """for_each_online_cpu(): over a snapshot; stable only inside a read-side section."""
        return iter(self.online_cpus())

    def for_each_possible_cpu(self) -> Iterator[int]:
        return iter(range(self.nr_cpus))

    # ------------------------------------------------------------------ tasks on CPUs
    def _place_locked(self, task: Task, avoid: int | None) -> int:
        n = self.nr_cpus
        online = self._online
        choice = None
        for i in range(n):
            c = (self._next + i) % n
            if online[c] and c != avoid:
                choice = c
                break
        if choice is None:  # avoid was the only online CPU
            choice = avoid if avoid is not None and online[avoid] else online.index(True)
        self._next = (choice + 1) % n
        task.cpu = choice
        task.extra[_ASSIGNED] = True
        return choice

    def this_cpu(self, task: Task | None = None) -> int:
        """smp_processor_id(): the task's CPU; placed at first use, moved if it went offline.
        ``task`` other than the caller's own is for tests."""
        task = task or self._k.current()
        with self._mask_lock:
            if task.extra.get(_ASSIGNED) and self._online[task.cpu]:
                return task.cpu
            return self._place_locked(task, None)

    def migrate(self, task: Task | None = None) -> int:
        """A scheduling point that moves the task to another online CPU (if there is one)."""
        task = task or self._k.current()
        with self._mask_lock:
            cur = task.cpu if task.extra.get(_ASSIGNED) else None
            cpu = self._place_locked(task, cur)
        d = self._k._dispatch
        if d is not None:
            d("cpu_migrate", task, CpuId(cpu))
        return cpu

    def cond_resched(self, task: Task | None = None) -> int:
        """A scheduling point that moves the task only off an offline CPU."""
        return self.this_cpu(task)

    # ------------------------------------------------------------------ notifiers
    def register_notifier(self, fn: Notifier, priority: int = 0) -> None:
        """register_cpu_notifier(): ``fn(event, cpu)``; higher priority first, then in
        registration order. Takes cpu_add_remove_lock, as the kernel does."""
        self.cpu_maps_update_begin()
        try:
            self._nseq += 1
            self._notifiers.append((-priority, self._nseq, fn))
            self._notifiers.sort(key=lambda e: (e[0], e[1]))
        finally:
            self.cpu_maps_update_done()

    def unregister_notifier(self, fn: Notifier) -> None:
        self.cpu_maps_update_begin()
        try:
            self._notifiers = [e for e in self._notifiers if e[2] is not fn]
        finally:
            self.cpu_maps_update_done()

    def _notify(self, event: str, cpu: CpuId) -> None:
        for _, _, fn in list(self._notifiers):
            fn(event, cpu)

    # ------------------------------------------------------------------ cpu_up / cpu_down
    def cpu_up(self, cpu: int) -> int:
        """cpu_up(): 0, or -EINVAL if already online. A notifier's exception propagates after
        the locks are released (the CPU state is then whatever the notifiers reached)."""
        return self._hotplug_op(self._check_cpu(cpu), up=True)

    def cpu_down(self, cpu: int) -> int:
        """cpu_down(): 0, -EINVAL if already offline, -EBUSY for the last online CPU."""
        return self._hotplug_op(self._check_cpu(cpu), up=False)

    def _hotplug_op(self, cpu: CpuId, up: bool) -> int:
        k = self._k
        self.cpu_maps_update_begin()
        try:
            with self._mask_lock:
                online = self._online[cpu]
                last = sum(self._online) == 1
            if online == up:
                return -EINVAL
            if not up and last:
                return -EBUSY
            self.cpu_hotplug_begin()
            try:
                d = k._dispatch
                if d is not None:
                    d("cpu_up" if up else "cpu_down", k.current(), cpu)
                self._notify(UP_PREPARE if up else DOWN_PREPARE, cpu)
                with self._mask_lock:
                    self._online[cpu] = up
                self._notify(ONLINE if up else DEAD, cpu)
                self.nr_hotplug_ops += 1
            finally:
                self.cpu_hotplug_done()
        finally:
            self.cpu_maps_update_done()
        return 0

    # ------------------------------------------------------------------ on_each_cpu_cond
    def on_each_cpu_cond(self, cond: Callable[[int], bool],
                         fn: Callable[[int], object]) -> list[int]:
        """on_each_cpu_cond(): ``fn(cpu)`` for each online CPU where ``cond(cpu)``; returns
        those CPUs.

        The kernel runs ``fn`` on each CPU (IPIs, with preemption disabled so the mask cannot
        change). The model runs it in the caller, one CPU after the other, inside a hotplug
        read-side section (skipped when the caller already holds the hotplug lock, as a
        notifier or a get_online_cpus() section does), so ``fn`` may sleep here where the
        kernel's may not, and ``this_cpu()`` inside ``fn`` is the caller's CPU, not ``cpu``.
        """
        pin = not self.cpus_held()
        if pin:
            self.get_online_cpus()
        try:
            ran = []
            for cpu in self.online_cpus():
                if cond(cpu):
                    fn(cpu)
                    ran.append(cpu)
            return ran
        finally:
            if pin:
                self.put_online_cpus()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} online={self.online_cpus()}/{self.nr_cpus}>"
