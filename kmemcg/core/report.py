"""Pieces every kernel-format report shares: the banner and the held-lock listings.

The held-lock entries are lockdep's (``kmemcg.locking.lockdep.HeldLock`` layout); they are
formatted here, below lockdep, because the hung-task watchdog and the deadlock detector print
them too.
"""

from __future__ import annotations

from types import FrameType
from typing import TYPE_CHECKING, Any

from kmemcg.core.stacks import format_site, format_stack

if TYPE_CHECKING:
    from kmemcg.core.task import Task
    from kmemcg.kernel import Kernel

# HeldLock tuple layout (see kmemcg.locking.lockdep): lock, class, prev chain key, flags, site
H_LOCK, H_CLASS, H_PREV, H_FLAGS, H_SITE = range(5)
TRYLOCK = 1
READ = 2
NOCHECK = 4  # lock_acquire(check=0): listed as held, no dependencies (rcu_read_lock)


def banner(title: str, k: Kernel, rule: str = "=") -> str:
    """The rule line, the title and the release line every kernel splat opens with."""
    width = max(len(title), 40)
    dash = "-" * width
    return f"{rule * width}\n{title}\n{k.release_line()}\n{dash}\n"


def warn_splat(k: Kernel, task: Any, message: str, where: str, stack: Any) -> str:
    """A WARN() splat as the kernel prints it: cut here, the message, "WARNING: CPU: N PID: N
    at WHERE", the release line, the call trace."""
    return ("------------[ cut here ]------------\n"
            f"{message}\n"
            f"WARNING: CPU: {task.cpu} PID: {task.pid} at {where}\n"
            f"{k.release_line()}\nCall Trace:\n" + format_stack(stack, " ")
            + "---[ end trace ]---\n")


def site_key(site: Any) -> tuple[str, int, str] | None:
    """A site as a plain (file, line, function) tuple (frames are not kept as keys)."""
    if isinstance(site, FrameType):
        co = site.f_code
        return (co.co_filename, site.f_lineno, co.co_name)
    return site


def site_text(site: Any) -> str:
    """An acquisition site: a (file, line, function) tuple, or the acquiring frame itself as
    the fast path stores it (its *current* line then: still inside the function that holds
    the lock, which is what a reader needs, if not the exact acquisition line)."""
    if site is None:
        return "?"
    if isinstance(site, FrameType):
        co = site.f_code
        return format_site((co.co_filename, site.f_lineno, co.co_name))
    return format_site(site)


def lock_desc(lock: Any, cls: Any = None) -> str:
    name = cls.display if cls is not None else lock.name
    return f"({name}){lock.usage}"


def held_entry(i: int, e: tuple) -> str:
    lock = e[H_LOCK]
    return f" #{i}: {id(lock):016x} {lock_desc(lock, e[H_CLASS])}, at: {site_text(e[H_SITE])}\n"


def held_locks(task: Task) -> str:
    """lockdep_print_held_locks(): "N locks held by comm/pid:" and one line per lock."""
    held = list(task.held)
    if not held:
        return f"no locks held by {task.name}.\n"
    n = len(held)
    head = f"{n} lock{'s' if n != 1 else ''} held by {task.name}:\n"
    return head + "".join(held_entry(i, e) for i, e in enumerate(held))


def all_held_locks(k: Kernel) -> str:
    """debug_show_all_locks(): every task that holds a lock."""
    out = ["\nShowing all locks held in the system:\n"]
    for task in k.tasks.all():
        if task.held:
            out.append(held_locks(task))
    out.append("\n" + "=" * 40 + "\n")
    return "".join(out)
