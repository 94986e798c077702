"""Tasks: the kernel's ``struct task_struct`` for the threads that run model code.

Every OS thread that touches a kernel becomes a task of that kernel on first use (lockdep, RCU
and the hung-task watchdog all need per-task state). A task carries what the kernel keeps in
``current``: its held-lock stack and chain key (lockdep), RCU read-side nesting, the CPU it runs
on, the memcg it belongs to, and what it is blocked on.

Differences from the kernel: tasks are created lazily, per kernel (a thread may be a task of
several kernels at once, never sharing state between them); a task's end is seen either when its
:class:`KThread` returns or, for foreign threads, when Python tears down the thread's
thread-local storage.
"""

from __future__ import annotations

import gc
import itertools
import os
import random
import sys
import threading
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from kmemcg.core.kasan import KasanOops

if TYPE_CHECKING:
    from kmemcg.kernel import Kernel


# Frames below the first of these (the model's waits and reports, the stdlib they call) are
# noise in a stack dump of a blocked task.
_PLUMBING = (os.path.dirname(os.path.abspath(__file__)), os.path.dirname(os.__file__))


# The garbage collector is per interpreter: toggling it is serialized by a process-wide lock.
_gc_toggle = threading.Lock()


def task_rng(task: Task, key: str, seed: int) -> random.Random:
    """``task``'s own random stream for one user (``key`` in ``task.extra``), fixed by
    ``seed`` and the pid: a seed then fixes each task's choices, whichever thread draws
    first. Only the task's own thread calls it (``extra`` is its own)."""
    rng = task.extra.get(key)
    if rng is None:
        rng = task.extra[key] = random.Random(seed + task.pid)
    return rng


def current_frames() -> dict[int, Any]:
    """sys._current_frames() with automatic garbage collection held off.

    CPython (3.11) holds its thread-list lock (HEAD_LOCK) while building that dict, and the
    allocations can trigger a collection; if the collection frees a ``threading.local`` (a dead
    Kernel's task registry), its destructor takes the same non-recursive lock: the thread hangs
    in C, and with it every thread that needs the lock (thread creation, exit, pytest-timeout's
    own stack dump). No collection, no re-entry."""
    with _gc_toggle:
        enabled = gc.isenabled()
        gc.disable()
        try:
            return sys._current_frames()
        finally:
            if enabled:
                gc.enable()


class KernelTornDown(BaseException):
    """Raised in a model thread that was blocked (or reaches a blocking point) after the
    kernel it belongs to was torn down. A BaseException so that model code's ``except
    Exception`` cannot swallow it: the thread unwinds and ends."""


class Task:
    """Per-thread model state. Only its own thread writes most fields (noted per field)."""

    __slots__ = (
        "kernel", "pid", "comm", "thread_ident", "held", "chain_key", "rcu_nesting",
        "rcu_ctr", "cpu", "memcg", "blocked_on", "blocked_since", "blocked_owned", "parked_at",
        "exited",
        "hotplug_depth", "__weakref__", "extra",
    )

    def __init__(self, kernel: Kernel, pid: int, comm: str, ident: int) -> None:
        self.kernel = kernel
        self.pid = pid
        self.comm = comm
        self.thread_ident = ident
        self.held: list[tuple] = []  # lockdep held-lock stack (own thread only)
        self.chain_key: Any = None  # lockdep chain-trie node of ``held`` (own thread only)
        self.rcu_nesting = 0  # rcu_read_lock depth (own thread only)
        self.rcu_ctr = 0  # RCU grace-period snapshot; read by synchronize() (see kmemcg.rcu)
        self.cpu = 0  # simulated CPU this task runs on
        self.memcg: Any = None  # mem_cgroup the task is charged to (mm layer)
        self.blocked_on: Any = None  # what it sleeps on (written under the wait-tracker lock)
        self.blocked_since = 0.0
        self.blocked_owned = False  # held what it blocked on when it began to wait (AA)
        self.parked_at: str | None = None  # breakpoint key while parked by a test
        self.exited = False
        self.hotplug_depth = 0  # get_online_cpus() nesting (2012 hotplug design)
        self.extra: dict[str, Any] = {}

    @property
    def name(self) -> str:
        """``comm/pid``, the way the kernel names a task in its reports."""
        return f"{self.comm}/{self.pid}"

    def __repr__(self) -> str:
        return f"<Task {self.name}>"

    def python_stack(self) -> str:
        """The thread's current Python stack (for hung-task and deadlock reports), without the
        innermost frames of the model's own waiting and reporting plumbing."""
        frame = current_frames().get(self.thread_ident)
        if frame is None:
            return "       <not running>\n"
        stack = traceback.extract_stack(frame)
        while len(stack) > 1 and stack[-2].filename.startswith(_PLUMBING):
            stack.pop()
        return "".join("       " + line for line in traceback.format_list(stack))


class _ExitSentinel:
    """Lives in the thread-local storage of a foreign thread; dropped when the thread ends,
    which is when the kernel checks what the task still held (do_exit's checks).

    It is also dropped when the kernel's ``threading.local`` itself is collected, and then the
    finalizer may run in any thread, even inside the garbage collector while CPython holds its
    thread-list lock (sys._current_frames() allocates under it). Kernel code there could start
    a thread or wait for one (an RCU callback thread) and deadlock the interpreter, so only a
    real task exit (in the exiting thread, kernel alive) runs the exit checks."""

    __slots__ = ("task",)

    def __init__(self, task: Task) -> None:
        self.task = task

    def __del__(self) -> None:
        task = self.task
        if task.exited or task.kernel.is_dead() or threading.get_ident() != task.thread_ident:
            return
        try:
            task.kernel._task_exit(task)
        except Exception:  # never raise from a finalizer
            pass


class TaskRegistry:
    """The kernel's task list; hands out the current task."""

    def __init__(self, kernel: Kernel) -> None:
        self._kernel = kernel
        self.tls = threading.local()
        self._lock = threading.Lock()
        self._tasks: dict[int, Task] = {}
        self._pids = itertools.count(1)

    def register_current(self) -> Task:
        t = threading.current_thread()
        with self._lock:
            task = Task(self._kernel, next(self._pids), t.name, threading.get_ident())
            self._tasks[task.pid] = task
        self.tls.task = task
        self.tls.sentinel = _ExitSentinel(task)
        return task

    def unregister(self, task: Task) -> None:
        with self._lock:
            self._tasks.pop(task.pid, None)

    def all(self) -> list[Task]:
        with self._lock:
            return list(self._tasks.values())


class KThread(threading.Thread):
    """A model thread (kthread_run). Daemon, so a deadlocked one never keeps the process alive.

    An exception escaping ``fn`` is a finding (the kernel would oops); KernelTornDown ends the
    thread quietly, and so does a KasanOops (KASAN's report was the oops: no second finding).
    At the end the task's exit checks run (locks still held, RCU section open).
    """

    def __init__(self, kernel: Kernel, fn: Callable[..., Any], args: tuple, name: str,
                 on_exception: Callable[[Task, BaseException], None] | None = None) -> None:
        super().__init__(name=name, daemon=True)
        self._kernel = kernel
        self._fn = fn
        self._args = args
        self._on_exception = on_exception
        self.task: Task | None = None
        self.result: Any = None
        self.exception: BaseException | None = None

    def run(self) -> None:
        k = self._kernel
        task = self.task = k.current()
        try:
            self.result = self._fn(*self._args)
        except KernelTornDown:
            pass
        except KasanOops as e:
            self.exception = e  # KASAN reported it already (that report is the oops)
        except BaseException as e:  # noqa: BLE001 - reported as the kernel would oops
            self.exception = e
            (self._on_exception or k._kthread_died)(task, e)
        finally:
            if not k.is_dead():
                k._task_exit(task)
            else:
                task.exited = True
                k.tasks.unregister(task)
