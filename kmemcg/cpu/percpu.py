"""Per-CPU data (include/linux/percpu-defs.h: DEFINE_PER_CPU, this_cpu_ptr, per_cpu_ptr) and
the cpumask walkers as free functions.

``PerCpu(k, factory)`` holds one ``factory()`` value for every *possible* CPU (the kernel
allocates per-CPU areas for possible CPUs, so data of an offline CPU stays reachable, e.g. for
a CPU_DEAD notifier to drain it).

Difference from the kernel: nothing gives a task exclusive use of its CPU's slot. In the kernel
``this_cpu_*`` runs with preemption (or interrupts) disabled, so only one task touches a slot
at a time; here tasks are real threads and two of them may share a CPU number, so per-CPU data
that is written needs its own lock (or a pin such as a hotplug read-side section for the mask).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Generic, TypeVar

if TYPE_CHECKING:
    from kmemcg.kernel import Kernel

T = TypeVar("T")


class PerCpu(Generic[T]):
    """``PerCpu(k, factory)``: ``this_cpu()``, ``per_cpu(n)``, iteration over possible CPUs."""

    def __init__(self, k: Kernel, factory: Callable[[], T]) -> None:
        self._hp = k.hotplug
        self._slots: list[T] = [factory() for _ in range(self._hp.nr_cpus)]

    def this_cpu(self) -> T:
        """this_cpu_ptr(): the slot of the CPU the calling task runs on."""
        return self._slots[self._hp.this_cpu()]

    def per_cpu(self, cpu: int) -> T:
        """per_cpu_ptr(ptr, cpu)."""
        return self._slots[self._hp._check_cpu(cpu)]

    def __getitem__(self, cpu: int) -> T:
        return self.per_cpu(cpu)

    def __len__(self) -> int:
        return len(self._slots)

    def __iter__(self) -> Iterator[T]:
        """for_each_possible_cpu(): every slot."""
        return iter(list(self._slots))

    def online(self) -> list[tuple[int, T]]:
        """(cpu, slot) for each online CPU (a snapshot of the mask)."""
        return [(c, self._slots[c]) for c in self._hp.online_cpus()]


def for_each_online_cpu(k: Kernel) -> Iterator[int]:
    """for_each_online_cpu(cpu): see :meth:`kmemcg.cpu.hotplug.Hotplug.for_each_online_cpu`."""
    return k.hotplug.for_each_online_cpu()


def on_each_cpu_cond(k: Kernel, cond: Callable[[int], bool],
                     fn: Callable[[int], object]) -> list[int]:
    """on_each_cpu_cond(): see :meth:`kmemcg.cpu.hotplug.Hotplug.on_each_cpu_cond`."""
    return k.hotplug.on_each_cpu_cond(cond, fn)
