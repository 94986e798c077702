"""Lockdep's reports (the ``print_*_bug`` family), in the kernel's text format.

Each function records one finding through the kernel's :class:`FindingLog` and returns it. The
text is built only the first time a signature is seen. Shapes follow lockdep.c of the 5.x era;
stack lines read ``function [file.py:LINE]`` instead of ``function+0xoff/0xsize``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kmemcg.core import findings as F
from kmemcg.core.findings import Finding
from kmemcg.core.report import H_CLASS, H_LOCK, H_SITE, banner, held_entry, held_locks, site_text
from kmemcg.core.stacks import format_stack

if TYPE_CHECKING:
    from kmemcg.core.task import Task
    from kmemcg.kernel import Kernel
    from kmemcg.locking.lockdep import LockClass


def _addr_desc(e: tuple) -> str:
    """``ffff... (name){usage}, at: site`` for a held-lock entry."""
    return held_entry(0, e)[len(" #0: "):]


def _held_before(task: Task, upto: int) -> str:
    """Held locks as the kernel prints them while validating: without the new one."""
    held = task.held[:upto]
    if not held:
        return f"no locks held by {task.name}.\n"
    n = len(held)
    return (f"{n} lock{'s' if n != 1 else ''} held by {task.name}:\n"
            + "".join(held_entry(i, e) for i, e in enumerate(held)))


def _backtrace(k: Kernel) -> str:
    return "\nstack backtrace:\n" + format_stack(k.stacks.capture(1))


def _cls_name(c: LockClass) -> str:
    return f"({c.display}){c.usage}"


def circular(k: Kernel, task: Task, prev: tuple, nxt: tuple, path: list[LockClass]) -> Finding:
    """print_circular_bug(): ``path`` runs next -> ... -> prev along existing edges; the new
    edge prev -> next closes the cycle."""
    names = sorted({c.display for c in path})
    sig = "+".join(names)
    title = "WARNING: possible circular locking dependency detected"
    depth = len(task.held) - 1

    def text() -> str:
        out = [banner(title, k)]
        out.append(f"{task.name} is trying to acquire lock:\n{_addr_desc(nxt)}\n")
        out.append(f"but task is already holding lock:\n{_addr_desc(prev)}\n")
        out.append("which lock already depends on the new lock.\n\n\n")
        out.append("the existing dependency chain (in reverse order) is:\n")
        n = len(path) - 1
        for i in range(n, 0, -1):
            edge = path[i - 1].after[path[i]]
            out.append(f"\n-> #{i} {_cls_name(path[i])}:\n")
            out.append(format_stack(edge.stack))
            out.append(f"       (first seen in {edge.thread} at {edge.time:.3f}s)\n")
        new = prev[H_CLASS].after.get(nxt[H_CLASS])
        out.append(f"\n-> #0 {_cls_name(path[0])}:\n")
        out.append(format_stack(new.stack if new else None))
        out.append("\nother info that might help us debug this:\n\n")
        source, target = path[0], path[-1]
        parent = path[-2]
        if len(path) > 2:
            out.append("Chain exists of:\n  "
                       + " --> ".join(f"{c.display}" for c in path) + "\n\n")
        out.append(" Possible unsafe locking scenario:\n\n")
        out.append("       CPU0                    CPU1\n")
        out.append("       ----                    ----\n")
        out.append(f"  lock({target.display});\n")
        out.append(f"                               lock({parent.display});\n")
        out.append(f"                               lock({target.display});\n")
        out.append(f"  lock({source.display});\n")
        out.append("\n *** DEADLOCK ***\n\n")
        out.append(_held_before(task, depth))
        out.append(_backtrace(k))
        return "".join(out)

    return k.findings.report(F.CIRCULAR_LOCKING, title, sig, text, thread=task.name,
                             extra={"classes": [c.display for c in path]})


def recursive(k: Kernel, task: Task, held_e: tuple, nxt: tuple) -> Finding:
    """print_deadlock_bug(): the class of ``nxt`` is already held."""
    title = "WARNING: possible recursive locking detected"
    name = nxt[H_CLASS].display
    depth = len(task.held) - 1

    def text() -> str:
        return "".join([
            banner(title, k),
            f"{task.name} is trying to acquire lock:\n{_addr_desc(nxt)}\n",
            f"but task is already holding lock:\n{_addr_desc(held_e)}\n",
            "other info that might help us debug this:\n",
            " Possible unsafe locking scenario:\n\n",
            "       CPU0\n       ----\n",
            f"  lock({name});\n  lock({name});\n",
            "\n *** DEADLOCK ***\n\n",
            " May be due to missing lock nesting notation\n\n",
            _held_before(task, depth),
            _backtrace(k),
        ])

    return k.findings.report(F.RECURSIVE_LOCKING, title, name, text, thread=task.name,
                             extra={"classes": [name]})


def bad_unlock(k: Kernel, task: Task, lock: Any, site: Any) -> Finding:
    """print_unlock_imbalance_bug()."""
    title = "WARNING: bad unlock balance detected!"
    where = site_text(site)

    def text() -> str:
        return "".join([
            banner(title, k),
            f"{task.name} is trying to release lock ({lock.name}) at:\n{where}\n",
            "but there are no more locks to release!\n\n",
            "other info that might help us debug this:\n",
            held_locks(task),
            _backtrace(k),
        ])

    return k.findings.report(F.BAD_UNLOCK, title, f"{lock.name}@{where.split(' ')[0]}", text,
                             thread=task.name, extra={"classes": [lock.name]})


def assert_held(k: Kernel, task: Task, lock: Any, site: Any) -> Finding:
    """lockdep_assert_held() failing: WARN_ON(debug_locks && !lockdep_is_held(l))."""
    where = site_text(site)
    title = f"WARNING: lockdep_assert_held({lock.name}) failed at {where}"

    def text() -> str:
        return "".join([
            banner(title, k),
            f"{task.name} does not hold ({lock.name}) at {where}\n\n",
            held_locks(task),
            _backtrace(k),
        ])

    return k.findings.report(F.ASSERT_HELD, title, f"{lock.name}@{where.split(' ')[0]}", text,
                             thread=task.name, extra={"classes": [lock.name]})


def held_at_exit(k: Kernel, task: Task) -> Finding:
    """lockdep_sys_exit(): a task ends with locks still held."""
    title = "WARNING: lock held when returning to user space!"
    names = "+".join(sorted({e[H_CLASS].display for e in task.held}))

    def text() -> str:
        return "".join([
            banner(title, k),
            f"{task.name} is leaving the kernel with locks still held!\n",
            held_locks(task),
        ])

    return k.findings.report(F.LOCK_HELD_AT_EXIT, title, names, text, thread=task.name,
                             extra={"classes": names.split("+")})


def held_lock_freed(k: Kernel, task: Task, lock: Any, holders: list[Task], what: str) -> Finding:
    """print_freed_lock_bug(): memory holding a held lock is freed or re-initialized."""
    title = "WARNING: held lock freed!"

    def text() -> str:
        out = [banner(title, k),
               f"{task.name} is {what} {id(lock):016x} ({lock.name}), with a lock still held "
               "there!\n"]
        for h in holders:
            for e in h.held:
                if e[H_LOCK] is lock:
                    out.append(f" ({lock.name}){lock.usage}, at: {site_text(e[H_SITE])}\n")
            out.append(held_locks(h))
        out.append(_backtrace(k))
        return "".join(out)

    return k.findings.report(F.HELD_LOCK_FREED, title, lock.name, text, thread=task.name,
                             extra={"classes": [lock.name]})


def max_depth(k: Kernel, task: Task) -> Finding:
    """The held-lock stack went past MAX_LOCK_DEPTH (48)."""
    from kmemcg.locking.lockdep import MAX_LOCK_DEPTH
    title = "BUG: MAX_LOCK_DEPTH too low!"

    def text() -> str:
        return "".join([
            banner(title, k),
            f"depth: {len(task.held)}  max: {MAX_LOCK_DEPTH}!\n",
            "(the model keeps tracking; the kernel would turn the validator off here)\n",
            held_locks(task),
            _backtrace(k),
        ])

    return k.findings.report(F.MAX_LOCK_DEPTH, title, task.held[-1][H_CLASS].display, text,
                             thread=task.name)
