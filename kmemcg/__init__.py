"""kmemcg: a model of the Linux kernel's slab caches and memory cgroups on real threads and
real locks, with lockdep, RCU, KASAN-style and hung-task checkers.

Layers (a lower layer never imports a higher one)::

    kmemcg.core      tasks, findings, stacks, the instrumentation point, blocking waits
    kmemcg.locking   mutex, rwsem, lockdep, lock_stat
    kmemcg.kernel    the Kernel object that owns one instance of everything
    stress           drivers, command line, reports (outside the package)
"""

from kmemcg.core.findings import Finding
from kmemcg.core.instrument import Instrument
from kmemcg.core.task import KernelTornDown, Task
from kmemcg.kernel import Kernel

__all__ = ["Kernel", "Finding", "Instrument", "KernelTornDown", "Task"]
