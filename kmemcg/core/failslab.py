"""Fault injection for slab allocations: CONFIG_FAILSLAB (``should_failslab()``, mm/failslab.c
and lib/fault-inject.c), reduced to its ``probability`` attribute.

The model allocates with Python objects, which do not fail; an allocation site whose failure
path the model implements asks ``k.should_failslab(site)`` instead, and fails when told to.
Today that is one site, v3.13's ``memcg_update_cache_size()`` (the kzalloc() of a relocated
memcg_caches array): its failure path leaves the root caches already relocated with the bigger
array and the size unchanged, so the next activation relocates them all again.

Differences from the kernel: no ``interval``, ``times``, ``space`` or task filter; the choice
is drawn from a per-task stream derived from ``seed`` (as ``Perturb``'s), so a seed fixes it.
"""

from __future__ import annotations

import threading
from collections import Counter
from typing import TYPE_CHECKING

from kmemcg.core.task import task_rng

if TYPE_CHECKING:
    from kmemcg.core.task import Task


class FailSlab:
    """``k.failslab``: fail each asking allocation with probability ``probability`` (0: off,
    the default)."""

    def __init__(self, seed: int = 0, probability: float = 0.0) -> None:
        if not 0.0 <= probability <= 1.0:
            raise ValueError(f"failslab probability {probability} is not in [0, 1]")
        self.seed, self.probability = seed, probability
        self._lock = threading.Lock()  # guards injected
        self.injected: Counter[str] = Counter()  # site -> failures injected

    def should_fail(self, task: Task, site: str) -> bool:
        if not self.probability:
            return False
        if task_rng(task, "failslab_rng", self.seed * 6151).random() >= self.probability:
            return False
        with self._lock:
            self.injected[site] += 1
        return True
