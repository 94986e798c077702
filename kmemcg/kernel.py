"""The Kernel: one isolated simulated kernel that owns every lock, checker, thread and finding.

Nothing in the model lives at module level: two ``Kernel()`` objects in one process never see
each other's locks, lockdep graph, findings or threads, so tests stay isolated and a soak worker
can run many kernels one after another.

``Kernel.event`` is the single instrumentation point every primitive operation reports through
(see :mod:`kmemcg.core.instrument`).
"""

from __future__ import annotations

import platform
import threading
import time
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

from loguru import logger

from kmemcg.catalog import BY_NAME
from kmemcg.config import HOTPLUG_2012, Config
from kmemcg.core import findings as F
from kmemcg.core.failslab import FailSlab
from kmemcg.core.findings import FindingLog
from kmemcg.core.instrument import Breakpoints, Dispatcher, Instrument
from kmemcg.core.kasan import Kasan
from kmemcg.core.report import banner, held_locks
from kmemcg.core.sched import RunQueue
from kmemcg.core.stacks import StackDepot, format_stack
from kmemcg.core.task import KernelTornDown, KThread, Task, TaskRegistry
from kmemcg.core.wait import WaitTracker
from kmemcg.cpu import Hotplug, make_hotplug
from kmemcg.hung_task import HungTaskWatchdog
from kmemcg.locking import lock_stat as _lock_stat
from kmemcg.locking import lockdep_proc
from kmemcg.locking.lockdep import Lockdep, LockdepMap
from kmemcg.locking.mutex import Mutex, SpinLock
from kmemcg.locking.rwsem import RWSem
from kmemcg.mm.kmemleak import Kmemleak
from kmemcg.mm.memcg_designs import make_memcg_slab
from kmemcg.mm.memcg_slab import MemcgSlab
from kmemcg.mm.memcontrol import MemcgSubsys
from kmemcg.mm.page_alloc import PageAllocator
from kmemcg.mm.slab_common import SlabCommon
from kmemcg.rcu import RCU
from kmemcg.workqueue import Workqueue, Workqueues

VERSION = "0.1.0"


class Kernel:
    """``Kernel(config="fixed", bugs=(), lockdep=True, kasan=True, lock_stat=False)``; use as
    a context manager or call :meth:`shutdown` so that its threads end.

    ``config`` is a preset name or a :class:`Config` (which design, which historical bugs
    switched back on, see :mod:`kmemcg.config`); ``bugs`` adds switches on top of it;
    ``hotplug`` overrides the preset's CPU-hotplug lock design.

    ``lock_stat`` (CONFIG_LOCK_STAT) adds acquisition counts and hold times to the fast path;
    contentions and wait times are always recorded (they cost only on the contended path).
    """

    def __init__(self, *, config: Config | str | None = None, bugs: Iterable[str] = (),
                 name: str | None = None, lockdep: bool = True, kasan: bool = True,
                 lock_stat: bool = False, rcu_flavor: str = "rcu", cpus: int = 4,
                 hotplug: str | None = None,
                 hung_task_timeout: float | None = None) -> None:
        if isinstance(bugs, str):  # one bug name, not its characters
            bugs = (bugs,)
        if not isinstance(config, Config):
            config = Config.make(config or "fixed", list(bugs), hotplug)
        elif bugs or hotplug:
            # keep the given design unless a new switch lives in another one
            memcg: str | None = config.memcg
            if any(BY_NAME[b].requires_memcg and memcg not in BY_NAME[b].requires_memcg
                   for b in bugs if b in BY_NAME):
                memcg = None
            config = Config.make(config.preset, [*config.bugs, *bugs],
                                 hotplug or config.hotplug, memcg)
        self.config = config
        self.name = name or f"kernel@{id(self):x}"
        self.boot = time.monotonic()
        self.stacks = StackDepot()
        self.findings = FindingLog(self.boot, self.name)
        self.tasks = TaskRegistry(self)
        self._tls = self.tasks.tls  # hot paths read ``k._tls.task`` directly
        self.waits = WaitTracker(self)
        self._instr_lock = threading.Lock()
        self._instruments: list[Instrument] = []
        self._dispatch: Dispatcher | None = None  # None = no instrument: call sites skip
        self._breakpoints: Breakpoints | None = None
        # At most that many tasks run at once (kmemcg.core.sched); None: every thread runs.
        self.rq: RunQueue | None = None
        self.lockdep = Lockdep(self, enabled=lockdep)
        self._ld: Lockdep | None = self.lockdep if lockdep else None
        self.lock_stat = lock_stat
        self.deadlocked = False
        self._dead = False
        self._kthreads: list[KThread] = []
        self._shutdown_hooks: list[Callable[[], None]] = []
        self._exit_checks: list[Callable[[Task], None]] = []
        # CPU hotplug ("percpu_rwsem" = cpus_read_lock; "2012" = the v3.6 refcount lock)
        self.hotplug: Hotplug = make_hotplug(self, config.hotplug, cpus)
        if config.hotplug == HOTPLUG_2012:
            # The 2012 code had no BUG_ON: an extra put_online_cpus() drove the count
            # negative (the debug check reports it either way).
            self.hotplug.allow_underflow = True
        self.workqueues = Workqueues(self, pool_id=2 * cpus)  # kworker/u{2*cpus}:N
        # khungtaskd: None = off; else seconds a task may stay blocked before a report
        self.hung_task: HungTaskWatchdog | None = None
        self.rcu = RCU(self, flavor=rcu_flavor)  # rcu_flavor="busted": rcutorture's rcu_busted
        self.on_shutdown(self.rcu.shutdown)
        self.add_exit_check(self.rcu.exit_check)
        # mm: KASAN, the page allocator and the slab allocator (k.slab)
        self.kasan = Kasan(self, enabled=kasan)
        self.failslab = FailSlab()  # CONFIG_FAILSLAB, off until a driver sets it
        self.page_alloc = PageAllocator(self)
        self.memcg: MemcgSubsys | None = None  # root caches made before it get no params
        self.memcg_slab: MemcgSlab | None = None
        self.slab = SlabCommon(self)
        self.memcg = MemcgSubsys(self)
        self.memcg_slab = make_memcg_slab(self)  # the configuration's memcg design
        self.kmemleak = Kmemleak(self)  # scanned on demand only (k.kmemleak.scan())
        if hung_task_timeout is not None:  # last: it scans everything above
            self.hung_task = HungTaskWatchdog(self, hung_task_timeout)

    # ------------------------------------------------------------------ tasks
    def current(self) -> Task:
        """``current``: the calling thread's task in this kernel (registered on first use)."""
        try:
            return self._tls.task
        except AttributeError:
            task = self.tasks.register_current()
            task.chain_key = self.lockdep.root  # lockdep's chain-cache trie: empty chain
            return task

    def uptime(self) -> float:
        return time.monotonic() - self.boot

    def release_line(self) -> str:
        taint = "Tainted: G        W" if len(self.findings) else "Not tainted"
        return f"kmemcg {VERSION} (python {platform.python_version()}) {taint}"

    def kthread_run(self, fn: Callable[..., Any], *args: Any, name: str | None = None,
                    on_exception: Callable[[Task, BaseException], None] | None = None
                    ) -> KThread:
        """kthread_run(): start ``fn(*args)`` on a new daemon model thread."""
        self.check_alive()
        t = KThread(self, fn, args, name or getattr(fn, "__name__", "kthread"), on_exception)
        with self._instr_lock:
            self._kthreads = [x for x in self._kthreads if x.is_alive()]
            self._kthreads.append(t)
        t.start()
        return t

    def add_exit_check(self, fn: Callable[[Task], None]) -> None:
        """Register a do_exit()-time check (RCU adds "exit inside a read-side section")."""
        self._exit_checks.append(fn)

    def _task_exit(self, task: Task) -> None:
        if task.exited:
            return
        task.exited = True
        if self._ld is not None:
            self.lockdep.check_held_at_exit(task)
        for fn in self._exit_checks:
            fn(task)
        self.tasks.unregister(task)

    def _kthread_died(self, task: Task, exc: BaseException) -> None:
        title = f"BUG: kernel thread {task.comm} died: {type(exc).__name__}: {exc}"
        stack = self.stacks.capture(frame=exc.__traceback__.tb_frame) if exc.__traceback__ \
            else None
        import traceback
        tb = "".join(traceback.format_exception(exc))
        self.findings.report(
            F.KTHREAD_EXCEPTION, title, f"{type(exc).__name__}@{task.comm}",
            lambda: banner(title, self) + tb + format_stack(stack), thread=task.name)

    # ------------------------------------------------------------------ locks
    def raw_lock(self) -> threading.Lock:
        """Every OS-level lock the model uses is made here (one place for a scheduler)."""
        return threading.Lock()

    def mutex(self, name: str) -> Mutex:
        return Mutex(self, name)

    def spinlock(self, name: str) -> SpinLock:
        return SpinLock(self, name)

    def rwsem(self, name: str) -> RWSem:
        return RWSem(self, name)

    def lockdep_map(self, name: str, usage: str = "{+.+.}-{0:0}") -> LockdepMap:
        """A pseudo-lock lockdep tracks without a real lock (lockdep_map)."""
        return LockdepMap(self, name, usage)

    # ------------------------------------------------------------------ workqueues
    def create_workqueue(self, name: str, max_active: int = 0) -> Workqueue:
        """alloc_workqueue(name, 0, max_active); 0 = WQ_DFL_ACTIVE (see kmemcg.workqueue)."""
        return self.workqueues.create(name, max_active)

    @property
    def system_wq(self) -> Workqueue:
        """system_wq ("events"), created on first use."""
        return self.workqueues.system_wq

    def might_sleep_in_rcu(self, task: Task, what: Any) -> None:
        """might_sleep() inside rcu_read_lock(): with non-preemptible RCU a reader must not
        block. Reported whether or not this particular acquisition would have blocked."""
        name = getattr(what, "name", str(what))
        title = "WARNING: suspicious RCU usage"

        def text() -> str:
            return (banner(title, self)
                    + f"{name}: Illegal context switch in RCU read-side critical section!\n\n"
                    + "other info that might help us debug this:\n\n"
                    + "rcu_scheduler_active = 2, debug_locks = 1\n"
                    + held_locks(task)
                    + "\nstack backtrace:\n" + format_stack(self.stacks.capture(1)))

        self.findings.report(F.SUSPICIOUS_RCU, title, f"sleep-in-rcu:{name}", text,
                             thread=task.name, extra={"rcu": "sleep", "lock": name})

    # ------------------------------------------------------------------ instrumentation
    def should_failslab(self, site: str) -> bool:
        """should_failslab(): whether the allocation at ``site`` (one with a failure path in
        the model) fails now. An injected failure is reported as event ``failslab``."""
        if not self.failslab.should_fail(self.current(), site):
            return False
        self.event("failslab", site)
        return True

    def event(self, point: str, obj: Any = None) -> None:
        """The instrumentation point: every primitive operation reports here."""
        d = self._dispatch
        if d is not None:
            d(point, self.current(), obj)

    def off_cpu(self, task: Task) -> AbstractContextManager[None]:
        """Around a sleep of ``task``: off its run-queue CPU meanwhile (kmemcg.core.sched), if
        the kernel has a run queue."""
        return self.rq.off_cpu(task) if self.rq is not None else nullcontext()

    def schedule_timeout(self, task: Task, seconds: float) -> None:
        """schedule_timeout_uninterruptible(): sleep ``seconds``, off the run queue's CPU."""
        with self.off_cpu(task):
            time.sleep(seconds)

    def window(self, name: str) -> None:
        """A named race window of the model (e.g. ``"kmem_cache_destroy:unlocked"``): where a
        perturbing instrument may sleep and a test breakpoint may park the task."""
        d = self._dispatch
        if d is not None:
            d("window", self.current(), name)

    def add_instrument(self, inst: Instrument) -> None:
        with self._instr_lock:
            self._instruments.append(inst)
            self._dispatch = Dispatcher(self._instruments, self.remove_instrument)

    def remove_instrument(self, inst: Instrument) -> None:
        with self._instr_lock:
            if inst in self._instruments:
                self._instruments.remove(inst)
            self._dispatch = (Dispatcher(self._instruments, self.remove_instrument)
                              if self._instruments else None)

    @property
    def breakpoints(self) -> Breakpoints:
        """The test breakpoint facility, installed as an instrument on first use."""
        if self._breakpoints is None:
            bp = Breakpoints()
            self._breakpoints = bp
            self.add_instrument(bp)
        return self._breakpoints

    # ------------------------------------------------------------------ introspection
    def proc_lock_stat(self) -> str:
        return _lock_stat.proc_lock_stat(list(self.lockdep.classes))

    def proc_lockdep(self) -> str:
        return lockdep_proc.proc_lockdep(self.lockdep)

    def proc_lockdep_stats(self) -> str:
        return lockdep_proc.proc_lockdep_stats(self.lockdep)

    def proc_lockdep_chains(self) -> str:
        return lockdep_proc.proc_lockdep_chains(self.lockdep)

    def lockdep_graph(self) -> dict[str, Any]:
        return lockdep_proc.graph_json(self.lockdep)

    def lockdep_dot(self) -> str:
        return lockdep_proc.graph_dot(self.lockdep_graph(), self.name)

    # ------------------------------------------------------------------ teardown
    def is_dead(self) -> bool:
        return self._dead

    def check_alive(self) -> None:
        """Called at every blocking point: a torn-down kernel unwinds its threads."""
        if self._dead:
            raise KernelTornDown(self.name)

    def on_shutdown(self, fn: Callable[[], None]) -> None:
        self._shutdown_hooks.append(fn)

    def shutdown(self, timeout: float = 5.0) -> list[str]:
        """Tear down: blocked model threads unwind (KernelTornDown), workers stop. Returns the
        names of threads still alive after ``timeout`` (daemon threads: they cannot keep the
        process alive)."""
        if self._dead:
            return []
        self._dead = True
        for fn in reversed(self._shutdown_hooks):
            try:
                fn()
            except Exception:
                logger.exception("shutdown hook {} failed", fn)
        deadline = time.monotonic() + timeout
        me = threading.current_thread()
        with self._instr_lock:
            threads = list(self._kthreads)
        for t in threads:
            if t is not me:
                t.join(max(0.0, deadline - time.monotonic()))
        stuck = [t.name for t in threads if t.is_alive() and t is not me]
        if stuck:
            logger.warning("kernel {}: {} thread(s) still alive after shutdown: {}",
                           self.name, len(stuck), ", ".join(stuck[:10]))
        return stuck

    def __enter__(self) -> Kernel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
