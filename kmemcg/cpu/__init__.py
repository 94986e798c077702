"""CPU hotplug and per-CPU data: kernel/cpu.c, include/linux/cpumask.h, include/linux/percpu.h.

``Kernel(cpus=4, hotplug="percpu_rwsem" | "2012")`` builds ``k.hotplug``:

* :mod:`kmemcg.cpu.hotplug`: what both designs share: the online mask, the CPU each task runs
  on, the notifier chain, ``cpu_up()`` / ``cpu_down()`` under ``cpu_add_remove_lock``,
  ``for_each_online_cpu()`` and ``on_each_cpu_cond()``.
* :mod:`kmemcg.cpu.hotplug2012`: the v3.6 reader-count lock (``struct cpu_hotplug``), whose
  exclusion lockdep cannot see (seed 004).
* :mod:`kmemcg.cpu.percpu_rwsem`: the modern ``cpu_hotplug_lock`` rwsem
  (``cpus_read_lock()`` / ``cpus_write_lock()``), fully visible to lockdep.
* :mod:`kmemcg.cpu.percpu`: ``PerCpu`` data (``DEFINE_PER_CPU`` / ``alloc_percpu``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kmemcg.cpu.hotplug import (
    DEAD,
    DOWN_PREPARE,
    EBUSY,
    EINVAL,
    ONLINE,
    UP_PREPARE,
    CpuId,
    Hotplug,
)
from kmemcg.cpu.hotplug2012 import CpuHotplug2012
from kmemcg.cpu.percpu import PerCpu, for_each_online_cpu, on_each_cpu_cond
from kmemcg.cpu.percpu_rwsem import CpuHotplugRwsem

if TYPE_CHECKING:
    from kmemcg.kernel import Kernel

__all__ = ["Hotplug", "CpuHotplug2012", "CpuHotplugRwsem", "CpuId", "PerCpu",
           "for_each_online_cpu", "on_each_cpu_cond", "make_hotplug", "UP_PREPARE", "ONLINE",
           "DOWN_PREPARE", "DEAD", "EBUSY", "EINVAL"]


def make_hotplug(k: Kernel, design: str, cpus: int) -> Hotplug:
    """The hotplug object for ``Kernel(hotplug=design, cpus=cpus)``."""
    if design == "2012":
        return CpuHotplug2012(k, cpus)
    if design == "percpu_rwsem":
        return CpuHotplugRwsem(k, cpus)
    raise ValueError(f"unknown hotplug design {design!r} (expected '2012' or 'percpu_rwsem')")
