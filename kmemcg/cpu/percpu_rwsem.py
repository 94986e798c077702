"""The modern CPU hotplug lock (kernel/cpu.c since v4.13): ``cpu_hotplug_lock``, a
percpu_rw_semaphore; ``cpus_read_lock()`` / ``cpus_read_unlock()`` (old names
``get_online_cpus()`` / ``put_online_cpus()``) and ``cpus_write_lock()`` /
``cpus_write_unlock()`` around the hotplug operation.

Unlike the 2012 reader count, readers really hold the lock, so lockdep sees the exclusion:
``slab_mutex -> cpu_hotplug_lock`` and ``cpu_hotplug_lock -> slab_mutex`` (a notifier taking
slab_mutex under the write side) is a cycle that can deadlock, and it is reported as such. In
this design _rcu_barrier() no longer takes the hotplug lock (``barrier_takes_hotplug`` False).

Differences from the kernel: the model's rwsem stands in for the percpu_rw_semaphore (same
lockdep view: a non-recursive read lock, writers preferred); the hotplug callbacks run in the
task that calls cpu_up()/cpu_down(), holding the write side, as v3.x notifiers did (the kernel
now runs most of them in per-CPU cpuhp threads). A read unlock without a read lock is the
rwsem's "bad unlock balance" finding.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kmemcg.cpu.hotplug import Hotplug

if TYPE_CHECKING:
    from kmemcg.kernel import Kernel


class CpuHotplugRwsem(Hotplug):
    design = "percpu_rwsem"
    barrier_takes_hotplug = False

    def __init__(self, kernel: Kernel, nr_cpus: int) -> None:
        super().__init__(kernel, nr_cpus)
        self.lock = kernel.rwsem("cpu_hotplug_lock")

    def get_online_cpus(self) -> None:
        """cpus_read_lock()."""
        task = self._k.current()
        self.lock.down_read()
        task.hotplug_depth += 1

    def put_online_cpus(self) -> None:
        """cpus_read_unlock(); without a matching read lock the rwsem reports it."""
        task = self._k.current()
        if task.hotplug_depth > 0:
            task.hotplug_depth -= 1
        self.lock.up_read()

    def cpu_hotplug_begin(self) -> None:
        """cpus_write_lock()."""
        self.lock.down_write()
        self.active_writer = self._k.current()

    def cpu_hotplug_done(self) -> None:
        """cpus_write_unlock()."""
        self.active_writer = None
        self.lock.up_write()

    def cpus_held(self) -> bool:
        return self.lock.is_held()
