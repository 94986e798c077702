"""Which per-memcg kmem cache design a kernel runs (``Config.memcg``, from the preset or brought
by a bug switch; see kmemcg.config). Each design is one class implementing the interface of
:class:`kmemcg.mm.memcg_slab.MemcgSlab`, in a module of its own, imported only when used."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from kmemcg.config import (
    MEMCG_V4,
    MEMCG_V4_REFCOUNT,
    MEMCG_V53,
    MEMCG_V59,
    MEMCG_V313,
    MEMCG_V316,
)

if TYPE_CHECKING:
    from kmemcg.kernel import Kernel
    from kmemcg.mm.memcg_slab import MemcgSlab

DESIGNS: dict[str, tuple[str, str]] = {
    MEMCG_V313: ("kmemcg.mm.memcg_v313", "MemcgSlabV313"),
    MEMCG_V316: ("kmemcg.mm.memcg_v316", "MemcgSlabV316"),
    MEMCG_V4: ("kmemcg.mm.memcg_slab", "MemcgSlab"),
    MEMCG_V4_REFCOUNT: ("kmemcg.mm.memcg_v4_refcount", "MemcgSlabRefcount"),
    MEMCG_V53: ("kmemcg.mm.memcg_v53", "MemcgSlabV53"),
    MEMCG_V59: ("kmemcg.mm.memcg_v59", "ObjCgroupV59"),
}


def make_memcg_slab(k: Kernel) -> MemcgSlab:
    module, cls = DESIGNS[k.config.memcg]
    return getattr(importlib.import_module(module), cls)(k)
