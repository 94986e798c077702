"""refcount_t (include/linux/refcount.h, lib/refcount.c) with its saturation semantics.

A refcount that is raised from zero ("addition on 0") or dropped below zero ("underflow") is a
use-after-free in waiting: the kernel WARNs once and saturates the counter so the object leaks
instead of being freed twice. The model reports a finding (kind ``refcount``) for every such
event and saturates the same way, so the run goes on safely.

Each operation is atomic under a raw lock: correct on free-threaded Python, not relying on the
GIL. A refcount has a *name* (what it counts, e.g. ``kmem_cache.refcount``) used in reports
and signatures.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from kmemcg.core import findings as F
from kmemcg.core.report import warn_splat

if TYPE_CHECKING:
    from kmemcg.kernel import Kernel

REFCOUNT_MAX = 0x7FFF_FFFF  # INT_MAX: one more and the kernel's int goes negative
REFCOUNT_SATURATED = 0xC000_0000  # INT_MIN / 2 as unsigned: what refcount_warn_saturate()
# leaves behind. Any value above REFCOUNT_MAX stands for the kernel's negative counter.

ADD_UAF = "addition on 0; use-after-free."
UNDERFLOW = "underflow; use-after-free."
DEC_LEAK = "decrement hit 0; leaking memory."
ADD_OVF = "saturated; leaking memory."


class Refcount:
    __slots__ = ("_k", "name", "_v", "_lock")

    def __init__(self, kernel: Kernel, name: str, value: int = 1) -> None:
        self._k = kernel
        self.name = name
        self._v = value
        self._lock = kernel.raw_lock()

    def __repr__(self) -> str:
        return f"<refcount {self.name}={self._v}>"

    def read(self) -> int:
        return self._v

    def set(self, value: int) -> None:
        with self._lock:
            self._v = value

    def inc(self) -> None:
        """refcount_inc(): raising a zero count is a use-after-free."""
        with self._lock:
            v = self._v
            if v == 0 or v >= REFCOUNT_MAX:  # old == 0, old < 0 or old + 1 < 0
                self._v = REFCOUNT_SATURATED
                bad = ADD_UAF if v == 0 else ADD_OVF
            else:
                self._v = v + 1
                return
        self._warn(bad)

    def inc_not_zero(self) -> bool:
        """refcount_inc_not_zero(): a tryget; False once the count reached zero. Raising it
        past REFCOUNT_MAX saturates it (and WARNs) but still succeeds."""
        with self._lock:
            v = self._v
            if v == 0:
                return False
            if v < REFCOUNT_MAX:
                self._v = v + 1
                return True
            self._v = REFCOUNT_SATURATED  # old < 0 or old + 1 < 0: as refcount_inc()
        self._warn(ADD_OVF)
        return True

    def dec_and_test(self) -> bool:
        """refcount_dec_and_test(): True when this call dropped the last reference."""
        with self._lock:
            v = self._v
            if v >= REFCOUNT_SATURATED:
                return False
            if v == 0:
                self._v = REFCOUNT_SATURATED
                bad = UNDERFLOW
            else:
                self._v = v - 1
                return v == 1
        self._warn(bad)
        return False

    def dec(self) -> None:
        """refcount_dec(): must not drop the last reference (that would leak the object).
        As __refcount_dec(): an old value <= 1 (0 included) saturates the counter and WARNs
        "decrement hit 0; leaking memory." (the object is never freed)."""
        with self._lock:
            v = self._v
            if v >= REFCOUNT_SATURATED:
                return
            if v > 1:
                self._v = v - 1
                return
            self._v = REFCOUNT_SATURATED
        self._warn(DEC_LEAK)

    def _warn(self, what: str) -> None:
        """refcount_warn_saturate(): the "cut here" WARNING."""
        k = self._k
        f = sys._getframe(2)
        func = f.f_code.co_name if f is not None else "?"
        task = k.current()
        title = f"refcount_t: {what}"
        stack = k.stacks.capture(2)
        k.findings.report(
            F.REFCOUNT, title, f"{self.name}:{what.split(';')[0]}@{func}",
            lambda: warn_splat(k, task, title, f"{func}: {self.name}", stack),
            thread=task.name, extra={"refcount": self.name, "event": what})
