"""RCU for the model's threads (the kernel's kernel/rcu/, modelled on liburcu).

``k.rcu`` is one :class:`RCU` per kernel:

* :mod:`kmemcg.rcu.update`: read side, reader registry, grace periods with grace-period sharing,
  rcu_barrier(), the PROVE_RCU checks, the ``busted`` flavor;
* :mod:`kmemcg.rcu.callbacks`: call_rcu() queues and their callback threads;
* :mod:`kmemcg.rcu.rcupdate`: RCU-protected pointers and the "suspicious RCU usage" report;
* :mod:`kmemcg.rcu.torture`: rcutorture (``python -m kmemcg.rcu.torture``); not imported here.

Layer: above core and locking, below mm. Imports nothing from kmemcg.kernel.
"""

from kmemcg.rcu.rcupdate import RCUPointer
from kmemcg.rcu.update import FLAVORS, RCU, BustedRCU, RCUStats

__all__ = ["RCU", "BustedRCU", "RCUPointer", "RCUStats", "FLAVORS"]
