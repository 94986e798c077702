"""KASAN for model objects: use-after-free, double free, invalid free, type confusion.

Models mm/kasan/ (generic KASAN with alloc/free stacks in the stack depot, report.c's text).
Every model object that can be freed (slab objects, slab pages, kmem_caches, and later
mem_cgroups and memcg params) derives from :class:`KasanObject`. ``kasan.alloc(obj)`` records
where and when it was allocated; ``kasan.free(obj)`` records the free and *poisons* the object by
switching its class to a poisoned subclass whose ``__getattribute__`` / ``__setattr__`` report.
So any attribute read or write of a freed object, whatever code path makes it (not only
instrumented spots), records "BUG: KASAN: use-after-free in FUNCTION" with the access, alloc
and free stacks, and raises :class:`KasanOops` in the offending thread, as an oops would kill
the task. Live objects pay nothing: their class is the ordinary one.

Differences from the kernel: the unit is a Python object, not a byte range (an access is an
attribute, its "size" is not modelled); special-method lookups made implicitly by the
interpreter (``len(x)``, ``x == y``, hashing) bypass ``__getattribute__`` and are not checked;
there is no quarantine: a stale reference stays poisoned forever, even after the slot it came
from is reused (an object reached under RCU in a SLAB_TYPESAFE_BY_RCU cache is handled by the
slab layer: its objects are poisoned only when their page goes back to the page allocator).

The poisoned subclass of each model class is derived once and memoised on the class: a pure
function of the class, not kernel state; which kernel to report to comes from the object.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from kmemcg.core import findings as F
from kmemcg.core.stacks import Stack, format_stack

if TYPE_CHECKING:
    from kmemcg.core.task import Task
    from kmemcg.kernel import Kernel


class KasanOops(Exception):
    """Raised in the task that touched freed memory (or double-freed) after the report."""

    def __init__(self, finding: Any) -> None:
        super().__init__(finding.title)
        self.finding = finding


class KasanInfo:
    """What KASAN keeps per object (kasan_alloc_meta / kasan_free_meta)."""

    __slots__ = ("kernel", "what", "alloc_stack", "alloc_task", "alloc_time", "free_stack",
                 "free_task", "free_time", "owner", "reused_by")

    def __init__(self, kernel: Kernel, what: str, owner: str) -> None:
        self.kernel = kernel
        self.what = what  # e.g. "object", "kmem_cache", "slab page"
        self.owner = owner  # e.g. "the cache dentry" — who the memory belongs to
        self.alloc_stack: Stack | None = None
        self.alloc_task = "?"
        self.alloc_time = 0.0
        self.free_stack: Stack | None = None
        self.free_task = "?"
        self.free_time = 0.0
        self.reused_by: str | None = None  # the memory now belongs to this other cache


class KasanObject:
    """Base of every freeable model object. ``_kasan`` is None when KASAN is off."""

    __slots__ = ("_kasan", "__weakref__")
    _kasan_freed = False  # class attribute: True only on the poisoned subclasses


_INTERNAL = frozenset({"_kasan", "__class__", "_kasan_freed"})


def _poisoned_getattribute(self: Any, name: str) -> Any:
    if name in _INTERNAL:
        return object.__getattribute__(self, name)
    _report_access(self, name, "Read")


def _poisoned_setattr(self: Any, name: str, value: Any) -> None:
    if name in _INTERNAL:
        object.__setattr__(self, name, value)
        return
    _report_access(self, name, "Write")


def _poisoned_class(cls: type) -> type:
    p = cls.__dict__.get("_kasan_poisoned_cls")
    if p is None:
        ns: dict[str, Any] = {"__getattribute__": _poisoned_getattribute,
                              "__setattr__": _poisoned_setattr, "_kasan_freed": True,
                              "__module__": cls.__module__}
        if "__slots__" in cls.__dict__ or hasattr(cls, "__slots__"):
            ns["__slots__"] = ()  # same layout: __class__ assignment is allowed
        p = type(f"freed {cls.__name__}", (cls,), ns)
        type.__setattr__(cls, "_kasan_poisoned_cls", p)
    return p


def _func_outside_checker() -> str:
    f = sys._getframe(2)
    while f is not None and f.f_code.co_filename == __file__:
        f = f.f_back
    return f.f_code.co_name if f is not None else "?"


def _report_access(obj: Any, attr: str, rw: str) -> None:
    info: KasanInfo = object.__getattribute__(obj, "_kasan")
    k = info.kernel
    func = _func_outside_checker()
    task = k.current()
    cls_name = type(obj).__mro__[1].__name__
    title = f"BUG: KASAN: use-after-free in {func}"
    stack = k.stacks.capture(2)
    access = (f"{rw} of attribute '{attr}' of {info.what} at addr {id(obj):016x} "
              f"by task {task.name}")
    kind, sig, tail = F.KASAN_UAF, f"{cls_name}.{attr}@{func}", ""
    if info.reused_by is not None:
        # The memory went back to the page allocator and another cache owns it now: a reader
        # (typically under rcu_read_lock()) is looking at another type's object.
        kind = F.KASAN_TYPE_CONFUSION
        sig = f"{cls_name}.{attr}@{func}"  # the access site; which caches varies by run
        tail = (f"\nType confusion: the slab page was freed and reused by cache "
                f"{info.reused_by}\n (was the page freed before a grace period ended?)\n")
        if task.rcu_nesting:
            access += " under rcu_read_lock()"

    f = k.findings.report(kind, title, sig, lambda: _text(k, title, access, stack, info, tail),
                          thread=task.name, extra={"object": cls_name, "attr": attr,
                                                   "access": rw.lower(), "function": func,
                                                   "reused_by": info.reused_by})
    raise KasanOops(f)


def _text(k: Kernel, title: str, access: str, stack: Stack, info: KasanInfo | None,
          tail: str = "") -> str:
    rule = "=" * 66
    out = [f"{rule}\n{title}\n{access}\n\n{k.release_line()}\nCall Trace:\n",
           format_stack(stack, " ")]
    if info is not None:
        out.append(f"\nAllocated by task {info.alloc_task} at {info.alloc_time:.6f}s:\n")
        out.append(format_stack(info.alloc_stack, " "))
        if info.free_stack is not None:
            out.append(f"\nFreed by task {info.free_task} at {info.free_time:.6f}s:\n")
            out.append(format_stack(info.free_stack, " "))
        out.append(f"\nThe buggy address belongs to the {info.what}\n which belongs to "
                   f"{info.owner}\n")
    out.append(tail)
    out.append(rule + "\n")
    return "".join(out)


class Kasan:
    """One kernel's KASAN. ``Kasan(k, enabled=False)`` records nothing and poisons nothing."""

    def __init__(self, kernel: Kernel, enabled: bool = True) -> None:
        self._k = kernel
        self.enabled = enabled

    def alloc(self, obj: KasanObject, what: str, owner: str) -> None:
        """kasan_slab_alloc(): record the allocation (task, time, stack), unpoison."""
        if not self.enabled:
            obj._kasan = None
            return
        k = self._k
        info = KasanInfo(k, what, owner)
        task = k.current()
        info.alloc_stack = k.stacks.capture(2)
        info.alloc_task = task.name
        info.alloc_time = k.uptime()
        if type(obj)._kasan_freed:  # reused after free (a TYPESAFE_BY_RCU slot, a slab page)
            object.__setattr__(obj, "__class__", type(obj).__mro__[1])
        obj._kasan = info

    def free(self, obj: KasanObject, poison: bool = True) -> None:
        """kasan_slab_free(): a second free is a double-free finding (raises KasanOops);
        otherwise record the free and, unless ``poison`` is False (a TYPESAFE_BY_RCU object:
        still readable until its page is freed), poison the object."""
        if not self.enabled:
            return
        info: KasanInfo | None = object.__getattribute__(obj, "_kasan")
        if info is None:
            return
        k = self._k
        task = k.current()
        if type(obj)._kasan_freed or info.free_stack is not None:
            self._double_free(obj, info, task)
        info.free_stack = k.stacks.capture(2)
        info.free_task = task.name
        info.free_time = k.uptime()
        if poison:
            self.poison(obj)

    def poison(self, obj: KasanObject) -> None:
        """Make every later attribute access of ``obj`` a use-after-free report."""
        if not self.enabled or type(obj)._kasan_freed:
            return
        object.__setattr__(obj, "__class__", _poisoned_class(type(obj)))

    @staticmethod
    def is_freed(obj: Any) -> bool:
        return bool(type(obj)._kasan_freed) if isinstance(obj, KasanObject) else False

    @staticmethod
    def free_recorded(obj: Any) -> bool:
        """Freed, poisoned or not yet (``free(obj, poison=False)``: kept readable for a while
        by a model that defers the poison)."""
        if not isinstance(obj, KasanObject):
            return False
        info = object.__getattribute__(obj, "_kasan")
        return bool(type(obj)._kasan_freed) or (info is not None and info.free_stack is not None)

    def _double_free(self, obj: Any, info: KasanInfo, task: Task) -> None:
        k = self._k
        cls_name = type(obj).__mro__[1].__name__ if type(obj)._kasan_freed else \
            type(obj).__name__
        func = _func_outside_checker()
        title = f"BUG: KASAN: double-free in {func}"
        stack = k.stacks.capture(2)
        f = k.findings.report(
            F.KASAN_DOUBLE_FREE, title, f"{cls_name}@{func}",
            lambda: _text(k, title, f"Free of {info.what} at addr {id(obj):016x} by task "
                          f"{task.name}", stack, info),
            thread=task.name, extra={"object": cls_name, "function": func})
        raise KasanOops(f)

    def invalid_free(self, obj: Any, detail: str) -> None:
        """An object freed to a cache it does not belong to (cache_from_obj / kfree of a
        foreign pointer): "BUG: KASAN: invalid-free"; raises KasanOops."""
        k = self._k
        task = k.current()
        func = _func_outside_checker()
        title = f"BUG: KASAN: invalid-free in {func}"
        info = object.__getattribute__(obj, "_kasan") if isinstance(obj, KasanObject) else None
        stack = k.stacks.capture(2)
        f = k.findings.report(
            F.KASAN_INVALID_FREE, title, f"{type(obj).__name__}@{func}",
            lambda: _text(k, title, f"{detail}\nby task {task.name}", stack, info),
            thread=task.name, extra={"function": func})
        raise KasanOops(f)

    def mark_reused(self, obj: Any, new_owner: str) -> None:
        """The memory of freed ``obj`` now belongs to cache ``new_owner`` (page reuse)."""
        if isinstance(obj, KasanObject):
            info = object.__getattribute__(obj, "_kasan")
            if info is not None:
                info.reused_by = new_owner
