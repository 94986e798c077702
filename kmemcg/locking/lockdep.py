"""Lock-order validator: kernel/locking/lockdep.c for the model's locks.

Finds, from the order in which tasks take lock *classes* (every lock made with one name is one
class), the bugs lockdep finds, even when the current run never deadlocks:

* circular dependencies (A -> B recorded once, B -> A later, in any task, at any time);
* recursive locking (a class taken twice without a nesting annotation);
* bad unlock balance, locks held at task exit, failed ``lockdep_assert_held``, a held lock
  re-initialized or freed, held-lock stacks deeper than MAX_LOCK_DEPTH.

How it stays cheap, as in the kernel: each task keeps a stack of held locks and its position in
the *chain cache*. A held-class sequence seen before was validated already, so an acquisition
costs a push and one dict lookup. Only a new chain takes ``graph_lock`` and walks the held stack
(``check_prevs_add``); only a new edge runs the BFS cycle check and saves a stack trace.

The chain cache is a trie rather than the kernel's hash table of 64-bit chain keys: a task's
"chain key" is the trie node of its held sequence, and acquiring class C moves to the child
for C. Lookups are as cheap as a hash step and exact (no collisions can hide a new chain).

Differences from the kernel:

* It keeps going after the first report. Each distinct finding (a cycle is identified by its set
  of classes) is reported once and counted on every recurrence: chains and edges remember the
  findings they produced, so a cached chain still counts.
* An edge that closes a cycle is still added to the graph (marked), so exported graphs and
  ``stress report diff`` show it; the kernel stops at the report.
* rwsem reads are non-recursive reads (read=1) and, as in pre-5.x lockdep, take part in the
  dependency graph like writes; recursive reads (read=2, rwlock) are not modelled.
* lock_stat hold times are per instance, merged per class (subclasses included).
"""

from __future__ import annotations

import threading
from collections import deque
from types import FrameType
from typing import TYPE_CHECKING, Any

from kmemcg.core.findings import Finding
from kmemcg.core.report import H_CLASS, H_FLAGS, H_LOCK, H_PREV, H_SITE, NOCHECK, READ, TRYLOCK
from kmemcg.core.stacks import Stack, frame_site
from kmemcg.locking import lockdep_report as _rep

if TYPE_CHECKING:
    from kmemcg.core.task import Task
    from kmemcg.kernel import Kernel

MAX_LOCK_DEPTH = 48  # include/linux/sched.h; deeper stacks are a finding, then tracked anyway
MAX_LOCKDEP_SUBCLASSES = 8

_STEP_FLAGS = TRYLOCK | NOCHECK  # acquisitions validated differently get their own trie steps

__all__ = ["Lockdep", "LockClass", "LockdepMap", "Edge", "MAX_LOCK_DEPTH", "NOCHECK", "READ",
           "TRYLOCK"]


class LockClass:
    """A lockdep class: one (name, subclass). Never freed, as in the kernel."""

    __slots__ = ("idx", "step", "base", "subclass", "kind", "after", "before", "usage",
                 "_stat_lock", "_retired", "_live")

    def __init__(self, idx: int, base: str, subclass: int, kind: str, usage: str) -> None:
        self.idx = idx
        self.step = idx << 3  # chain-trie step; | TRYLOCK/NOCHECK bits (see Lockdep.acquire)
        self.base = base
        self.subclass = subclass
        self.kind = kind
        self.usage = usage
        # Dependency lists (locks_after / locks_before); written under graph_lock only,
        # read lock-free by the proc listings (dict iteration over a snapshot copy).
        self.after: dict[LockClass, Edge] = {}
        self.before: dict[LockClass, Edge] = {}
        self._stat_lock = threading.Lock()
        self._retired: Any = None  # lock_stat of dead instances, merged (see LockStat)
        self._live: list[Any] = []  # weakrefs of live instances' LockStat holders

    @property
    def display(self) -> str:
        """How the kernel prints a class: ``name`` or ``name/subclass``."""
        return self.base if not self.subclass else f"{self.base}/{self.subclass}"

    def __repr__(self) -> str:
        return f"<LockClass {self.display}>"


class Edge:
    """``prev -> next``: ``next`` was taken while ``prev`` was held. Stack saved once."""

    __slots__ = ("prev", "next", "stack", "thread", "time", "findings", "closes_cycle")

    def __init__(self, prev: LockClass, nxt: LockClass, stack: Stack, thread: str,
                 t: float) -> None:
        self.prev = prev
        self.next = nxt
        self.stack = stack
        self.thread = thread
        self.time = t
        self.findings: tuple[Finding, ...] = ()
        self.closes_cycle = False


class LockdepMap:
    """What lockdep tracks (``struct lockdep_map``): the base of the model's locks, and on its
    own a pseudo-lock such as ``rcu_read_lock`` or a workqueue's flush map."""

    __slots__ = ("_k", "name", "_cls0", "_subs", "usage", "__weakref__")
    kind = "map"

    def __init__(self, kernel: Kernel, name: str, usage: str = "{+.+.}-{0:0}") -> None:
        self._k = kernel
        self.name = name
        self.usage = usage
        self._cls0 = kernel.lockdep.register_class(name, 0, self.kind, usage)
        self._subs: dict[int, LockClass] | None = None

    def lock_class(self, subclass: int = 0) -> LockClass:
        if not subclass:
            return self._cls0
        subs = self._subs
        if subs is None:
            subs = self._subs = {}
        cls = subs.get(subclass)
        if cls is None:
            if not 0 <= subclass < MAX_LOCKDEP_SUBCLASSES:
                raise ValueError(f"lock subclass {subclass} out of range 0..7 for {self.name}")
            cls = subs[subclass] = self._k.lockdep.register_class(
                self.name, subclass, self.kind, self.usage)
        return cls

    # Pseudo-lock use: lock_map_acquire() / lock_map_release() in the kernel.
    def acquire(self, subclass: int = 0, read: bool = False, trylock: bool = False,
                check: bool = True) -> None:
        ld = self._k._ld
        if ld is not None:
            flags = (READ if read else 0) | (TRYLOCK if trylock else 0) | (0 if check else NOCHECK)
            ld.acquire(self._k.current(), self, self.lock_class(subclass), flags,
                       frame_site(2))

    def release(self) -> None:
        ld = self._k._ld
        if ld is not None:
            task = self._k.current()
            if not ld.release(task, self):
                ld.report_bad_unlock(task, self, frame_site(2))

    def is_held(self) -> bool:
        return any(e[H_LOCK] is self for e in self._k.current().held)

    def waiter_owners(self) -> list[Task]:
        return []


class Lockdep:
    """One kernel's lock validator: classes, the dependency graph and the chain cache."""

    def __init__(self, kernel: Kernel, enabled: bool = True) -> None:
        self._k = kernel
        self.enabled = enabled
        self._graph_lock = threading.Lock()  # raw lock: lockdep cannot track itself
        self._classes: dict[tuple[str, int], LockClass] = {}
        self.classes: list[LockClass] = []
        # The chain cache (a trie): node = {step: (child node, findings or None)}.
        # Read lock-free on the fast path (dict.get is atomic, also on free-threaded builds),
        # written under graph_lock; entries are never removed (but by reset()).
        self.root: dict[int, tuple[dict, tuple[Finding, ...] | None]] = {}
        self._nr_chains = 0
        self.nr_edges = 0
        self.max_depth = 0
        self.max_bfs_queue = 0
        self.chain_misses = 0
        self.chain_classes: list[tuple[str, ...]] = []  # /proc/lockdep_chains (misses only)

    # ------------------------------------------------------------------ classes
    def register_class(self, name: str, subclass: int, kind: str, usage: str) -> LockClass:
        key = (name, subclass)
        with self._graph_lock:
            cls = self._classes.get(key)
            if cls is None:
                cls = LockClass(len(self.classes), name, subclass, kind, usage)
                self._classes[key] = cls
                self.classes.append(cls)
            elif cls.kind != kind:
                raise ValueError(f"lock class {name!r} is a {cls.kind}, cannot make a {kind}")
            return cls

    def find_class(self, name: str, subclass: int = 0) -> LockClass | None:
        return self._classes.get((name, subclass))

    # ------------------------------------------------------------------ acquire / release
    def acquire(self, task: Task, lock: Any, cls: LockClass, flags: int, site: Any) -> None:
        """lock_acquire(): push on the held stack, step down the chain trie, validate a new
        chain. ``site`` is the acquiring frame (or a (file, line, func) tuple).

        Called *before* the task blocks on the real lock, as in the kernel, so an ABBA that
        does deadlock is reported before it hangs. Mutex.lock() inlines these lines.
        """
        node = task.chain_key
        task.held.append((lock, cls, node, flags, site))
        step = cls.step | (flags & _STEP_FLAGS)
        r = node.get(step)
        if r is None or r[1] is not None:
            r = self.chain_slow(task, node, step, r)
        task.chain_key = r[0]

    def chain_slow(self, task: Task, node: dict, step: int, r: tuple | None) -> tuple:
        """A chain-cache miss (validate) or a known chain that produced findings (count)."""
        if r is None:
            return self._validate(task, node, step)
        for f in r[1]:
            self._k.findings.recur(f)
        return r

    def release(self, task: Task, lock: Any) -> bool:
        """lock_release(): pop ``lock``; out-of-order unlock re-acquires the locks above it.
        Returns False when the task does not hold it (the caller reports the bad unlock)."""
        held = task.held
        if held and held[-1][H_LOCK] is lock:
            task.chain_key = held.pop()[H_PREV]
            return True
        for i in range(len(held) - 1, -1, -1):
            if held[i][H_LOCK] is lock:
                break
        else:
            return False
        # reacquire_held_locks(): the entries above form new chains, validated like any other.
        above = held[i + 1:]
        task.chain_key = held[i][H_PREV]
        del held[i:]
        for e in above:
            self.acquire(task, e[H_LOCK], e[H_CLASS], e[H_FLAGS], e[H_SITE])
        return True

    def drop(self, task: Task, lock: Any) -> None:
        """Forget an acquisition that never completed (the task was torn down while blocked)."""
        self.release(task, lock)

    # ------------------------------------------------------------------ validation
    def _validate(self, task: Task, node: dict, step: int) -> tuple:
        """validate_chain() on a chain-cache miss: AA check, then check_prevs_add().
        Returns the new trie entry (child node, findings)."""
        held = task.held
        nxt = held[-1]
        if isinstance(nxt[H_SITE], FrameType):  # the frame is at the acquisition line now
            f = nxt[H_SITE]
            nxt = held[-1] = nxt[:H_SITE] + ((f.f_code.co_filename, f.f_lineno,
                                              f.f_code.co_name),)
        found: list[Finding] = []
        with self._k.findings.deferred(), self._graph_lock:
            r = node.get(step)
            if r is not None:  # another task validated the same chain meanwhile
                for f in r[1] or ():
                    self._k.findings.recur(f)
                return r
            self.chain_misses += 1
            self._nr_chains += 1
            self.chain_classes.append(tuple(e[H_CLASS].display for e in held))
            depth = len(held)
            if depth > self.max_depth:
                self.max_depth = depth
            if depth > MAX_LOCK_DEPTH:
                found.append(_rep.max_depth(self._k, task))
            if not nxt[H_FLAGS] & _STEP_FLAGS:  # trylock and check=0: nothing to validate
                aa = self._check_deadlock(task, nxt)
                if aa is not None:
                    found.append(_rep.recursive(self._k, task, aa, nxt))
                else:
                    for prev in reversed(held[:-1]):
                        if prev[H_FLAGS] & NOCHECK:
                            continue
                        self._check_prev_add(task, prev, nxt, found)
                        if not prev[H_FLAGS] & TRYLOCK:
                            break  # the first blocking lock already links to all below
            r = node[step] = ({}, tuple(found) or None)
            return r

    @staticmethod
    def _check_deadlock(task: Task, nxt: tuple) -> tuple | None:
        """check_deadlock(): is this class already held? (rwsem reads are not recursive)"""
        cls = nxt[H_CLASS]
        for e in task.held[:-1]:
            if e[H_CLASS] is cls and not e[H_FLAGS] & NOCHECK:
                return e
        return None

    def _check_prev_add(self, task: Task, prev: tuple, nxt: tuple,
                        found: list[Finding]) -> None:
        a, b = prev[H_CLASS], nxt[H_CLASS]
        if a is b:
            return
        edge = a.after.get(b)
        if edge is not None:
            # A known cycle reached through a new chain: this acquisition is one more
            # occurrence (the cached chain counts the later ones). Once per finding, even if
            # several held locks lead to it.
            for f in edge.findings:
                if not any(f is g for g in found):
                    self._k.findings.recur(f)
                    found.append(f)
            return
        path = self._bfs(b, a)  # does next already (transitively) depend on prev?
        edge = Edge(a, b, self._k.stacks.capture(1), task.name, self._k.uptime())
        a.after[b] = edge
        b.before[a] = edge
        self.nr_edges += 1
        if path is not None:
            edge.closes_cycle = True
            f = _rep.circular(self._k, task, prev, nxt, path)
            edge.findings = (f,)
            found.append(f)

    def _bfs(self, src: LockClass, target: LockClass) -> list[LockClass] | None:
        """Shortest path src -> ... -> target along locks_after (check_noncircular).
        Caller holds graph_lock, so the adjacency dicts cannot change under the walk."""
        parent: dict[LockClass, LockClass | None] = {src: None}
        q = deque([src])
        while q:
            if len(q) > self.max_bfs_queue:
                self.max_bfs_queue = len(q)
            c = q.popleft()
            for n in c.after:
                if n in parent:
                    continue
                parent[n] = c
                if n is target:
                    path = [n]
                    p = c
                    while p is not None:
                        path.append(p)
                        p = parent[p]
                    return path[::-1]
                q.append(n)
        return None

    # ------------------------------------------------------------------ other checks
    def report_bad_unlock(self, task: Task, lock: Any, site: Any) -> Finding:
        return _rep.bad_unlock(self._k, task, lock, site)

    def assert_held(self, lock: Any) -> bool:
        """lockdep_assert_held(): a finding (not an exception) when the caller does not hold
        ``lock``. Returns whether it was held."""
        if not self.enabled or lock.is_held():  # a no-op without lockdep, as in the kernel
            return True
        _rep.assert_held(self._k, self._k.current(), lock, frame_site(2))
        return False

    def check_held_at_exit(self, task: Task) -> None:
        """lockdep_sys_exit() / debug_check_no_locks_held() at task exit."""
        if task.held:
            _rep.held_at_exit(self._k, task)

    def check_no_locks_freed(self, lock: Any, holders: list[Task], what: str) -> None:
        """debug_check_no_locks_freed(): ``lock`` is being re-initialized or freed while held."""
        if holders and self.enabled:
            _rep.held_lock_freed(self._k, self._k.current(), lock, holders, what)

    # ------------------------------------------------------------------ introspection
    def edges(self) -> list[Edge]:
        with self._graph_lock:
            return [e for c in self.classes for e in c.after.values()]

    def nr_chains(self) -> int:
        return self._nr_chains

    def reset(self) -> None:
        """Forget every chain and edge (the kernel's lockdep_reset(), for tests)."""
        with self._graph_lock:
            self.root.clear()
            self._nr_chains = 0
            self.chain_classes.clear()
            for c in self.classes:
                c.after.clear()
                c.before.clear()
            self.nr_edges = 0
