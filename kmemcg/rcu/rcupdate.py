"""RCU-protected pointers and the PROVE_RCU report (include/linux/rcupdate.h,
kernel/locking/lockdep.c: lockdep_rcu_suspicious()).

:class:`RCUPointer` is a cell updaters publish into with ``assign`` (rcu_assign_pointer) and
readers load with ``dereference`` (rcu_dereference_check). :func:`rcu_suspicious` builds the
kernel's "WARNING: suspicious RCU usage" splat for every RCU misuse the model detects
(dereference outside a reader without the update-side lock, synchronize_rcu() or rcu_barrier()
inside a reader, an unbalanced rcu_read_unlock(), a task exiting inside a reader).

Memory ordering of the cell: ``assign`` stores the reference under the cell's update lock (the
kernel's rcu_assign_pointer() is a store-release; updaters are serialized by their own lock
anyway); ``dereference`` loads it without a lock. A Python object reference is read and written
whole (never torn) on every CPython build, and an object is fully constructed before a reference
to it exists, so a reader that loads the new reference sees an initialized object: the role of
the kernel's address dependency. Whether a reader sees the old or the new reference is decided
by the grace-period machinery (kmemcg.rcu.update), which does not rely on the GIL.

Differences from the kernel: a report is kept once per (message, call site) and counted
afterwards, like RCU_LOCKDEP_WARN's per-site ``__warned`` but without losing the count; the
file:line is the first caller outside the RCU and locking plumbing.
"""

from __future__ import annotations

import os
import sys
from types import FrameType
from typing import TYPE_CHECKING, Any

from kmemcg.core import findings as F
from kmemcg.core import stacks as _stacks
from kmemcg.core.findings import Finding
from kmemcg.core.report import banner, held_locks
from kmemcg.core.stacks import format_stack
from kmemcg.locking import lockdep as _lockdep

if TYPE_CHECKING:
    from kmemcg.core.task import Task
    from kmemcg.kernel import Kernel
    from kmemcg.rcu.update import RCU

_DIR = os.path.dirname(os.path.abspath(__file__))
# Frames a reader of a report does not want as the "file:line" of a misuse: this package's
# plumbing (not torture.py, which is a user of RCU), core, locking and threading.py.
_PLUMBING = frozenset(os.path.join(_DIR, n) for n in
                      ("__init__.py", "update.py", "callbacks.py", "rcupdate.py"))
_OTHER = (os.path.dirname(os.path.abspath(_stacks.__file__)),
          os.path.dirname(os.path.abspath(_lockdep.__file__)))
_THREADING = os.path.join(os.path.dirname(os.__file__), "threading.py")


def _plumbing(filename: str) -> bool:
    return filename in _PLUMBING or filename.startswith(_OTHER) or filename == _THREADING


def caller_frame(skip: int = 1) -> FrameType | None:
    """The first frame above the caller that is not RCU / locking / core plumbing."""
    f: FrameType | None = sys._getframe(skip + 1)
    while f is not None and _plumbing(f.f_code.co_filename):
        f = f.f_back
    return f


def rcu_suspicious(k: Kernel, task: Task, message: str, key: str,
                   extra: dict[str, Any] | None = None) -> Finding:
    """lockdep_rcu_suspicious(): record "WARNING: suspicious RCU usage" for ``message``.

    ``key`` names the misuse (``"illegal-synchronize"``...); with the call site it makes the
    finding's signature, so each misuse is kept once per site and counted afterwards.
    """
    frame = caller_frame(1)
    if frame is not None:
        fn, line = frame.f_code.co_filename, frame.f_lineno
    else:
        fn, line = "?", 0
    where = f"{os.path.basename(fn)}:{line}"
    title = "WARNING: suspicious RCU usage"

    def text() -> str:
        return "".join([
            banner(title, k),
            f"{where} {message}\n\n",
            "other info that might help us debug this:\n\n\n",
            f"rcu_scheduler_active = 2, debug_locks = {int(k._ld is not None)}\n",
            f"RCU read-side nesting of {task.name}: {task.rcu_nesting}\n",
            held_locks(task),
            "\nstack backtrace:\n",
            format_stack(k.stacks.capture(frame=frame) if frame is not None else None),
        ])

    ex = {"rcu": key, "site": where}
    ex.update(extra or {})
    return k.findings.report(F.SUSPICIOUS_RCU, title, f"{key}@{fn}:{line}", text,
                             thread=task.name, extra=ex)


class RCUPointer:
    """An ``__rcu`` pointer: ``p = k.rcu.pointer(obj)``; ``p.assign(new)`` publishes,
    ``p.dereference()`` reads inside rcu_read_lock(), ``p.dereference(check=lock)`` reads where
    holding ``lock`` makes it safe, ``p.protected(lock)`` is the updater's read.

    Lock contract: ``_lock`` (a raw lock) serializes ``assign``; readers never take it.
    """

    __slots__ = ("_rcu", "_p", "name", "_lock")

    def __init__(self, rcu: RCU, value: Any = None, name: str = "rcu_pointer") -> None:
        self._rcu = rcu
        self._p = value
        self.name = name
        self._lock = rcu._k.raw_lock()

    def __repr__(self) -> str:
        return f"<RCUPointer {self.name} -> {self._p!r}>"

    def assign(self, value: Any) -> Any:
        """rcu_assign_pointer(): publish ``value``; returns the previous value (what the updater
        then retires with synchronize() or call()). The store is made under the cell's lock:
        the release that orders the new object's initialization before its publication."""
        with self._lock:
            old = self._p
            self._p = value
        return old

    def dereference(self, check: Any = False) -> Any:
        """rcu_dereference_check(p, check): the value; a finding when called outside a
        read-side section and ``check`` (a bool, or a lock that must be held) is false."""
        return self._rcu.dereference(self, check)

    def protected(self, check: Any = True) -> Any:
        """rcu_dereference_protected(p, check): the updater's read, no reader needed; a
        finding when ``check`` is false."""
        return self._rcu.dereference_protected(self, check)

    def access(self) -> Any:
        """rcu_access_pointer(): the value, for comparing against None, never to follow."""
        return self._p


def check_holds(check: Any) -> bool:
    """Evaluate an rcu_dereference_check() condition: a bool, or a lock (``lockdep_is_held``)."""
    is_held = getattr(check, "is_held", None)
    if is_held is not None:
        return bool(is_held())
    return bool(check)
