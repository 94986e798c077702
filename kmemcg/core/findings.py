"""Findings: the one record type every checker reports through.

Models the kernel's console splats (lockdep, KASAN, refcount_t, PROVE_RCU, the hung-task
watchdog, kmemleak). The kernel prints one lockdep report per boot and then switches the
validator off; here every *distinct* finding (by ``signature``) is kept once and each recurrence
is counted, so a long stress run loses nothing and floods nothing.

A checker calls :meth:`FindingLog.report` with a ``text`` callable: the kernel-format text is
built only the first time a signature is seen, which keeps recurrences cheap.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from loguru import logger

# Kinds: one per report template. Later layers add theirs here so that the report tools
# (filters, summaries) have one list to look at.
CIRCULAR_LOCKING = "circular_locking"
RECURSIVE_LOCKING = "recursive_locking"
BAD_UNLOCK = "bad_unlock_balance"
LOCK_HELD_AT_EXIT = "lock_held_at_exit"
ASSERT_HELD = "lockdep_assert_held"
HELD_LOCK_FREED = "held_lock_freed"
MAX_LOCK_DEPTH = "max_lock_depth"
REAL_DEADLOCK = "real_deadlock"
HUNG_TASK = "hung_task"
SUSPICIOUS_RCU = "suspicious_rcu_usage"
CALLBACK_EXCEPTION = "callback_exception"
WORK_EXCEPTION = "work_exception"
KTHREAD_EXCEPTION = "kthread_exception"
REFCOUNT = "refcount"
KASAN_UAF = "kasan_use_after_free"
KASAN_DOUBLE_FREE = "kasan_double_free"
KASAN_INVALID_FREE = "kasan_invalid_free"
KASAN_TYPE_CONFUSION = "kasan_type_confusion"
SLAB_CACHE_NOT_EMPTY = "slab_cache_not_empty"
MEMLEAK = "memory_leak"
ASSERTION = "assertion"
HOTPLUG_REFCOUNT = "hotplug_refcount"
WORKQUEUE = "workqueue"  # workqueue WARNs: leaked lock, queue on a dying workqueue


@dataclass
class Finding:
    """One distinct problem, as a kernel developer would read it on the console."""

    kind: str
    title: str  # the report's first line of substance, e.g. "WARNING: possible circular ..."
    text: str  # the full kernel-format report
    signature: str  # what makes two occurrences "the same finding"
    thread: str  # "comm/pid" of the task that first hit it
    time: float  # seconds since the kernel was created, first occurrence
    count: int = 1
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "title": self.title,
            "signature": self.signature,
            "count": self.count,
            "thread": self.thread,
            "first_seen_s": round(self.time, 6),
            "text": self.text,
            **({"extra": self.extra} if self.extra else {}),
        }


class FindingLog:
    """The kernel's findings, in first-seen order, deduplicated by signature."""

    def __init__(self, boot_time: float, name: str) -> None:
        self._lock = threading.Lock()  # raw: findings are reported from inside lockdep itself
        self._items: list[Finding] = []
        self._by_sig: dict[tuple[str, str], Finding] = {}
        self._boot = boot_time
        self._name = name
        self._listeners: list[Callable[[Finding], None]] = []
        self._defer = threading.local()  # per-thread queue while a checker holds its locks

    @contextmanager
    def deferred(self) -> Iterator[None]:
        """Hold back logging and listeners of findings reported inside the block until it
        ends. Checkers report while holding their internal locks (lockdep's graph_lock); a
        listener that takes a model lock or reads the graph must run after those are free."""
        d = self._defer
        depth = getattr(d, "depth", 0)
        if not depth:
            d.queue = []
        d.depth = depth + 1
        try:
            yield
        finally:
            d.depth = depth
            if not depth:
                queue, d.queue = d.queue, []
                for f, listeners in queue:
                    self._announce(f, listeners)

    def report(
        self,
        kind: str,
        title: str,
        signature: str,
        text: str | Callable[[], str],
        thread: str = "?",
        extra: dict[str, Any] | None = None,
    ) -> Finding:
        """Record one occurrence; build ``text`` only if the signature is new."""
        key = (kind, signature)
        with self._lock:
            f = self._by_sig.get(key)
            if f is not None:
                f.count += 1
                return f
        # Build the text outside the lock: it may walk stacks and other threads' state.
        body = text() if callable(text) else text
        with self._lock:
            f = self._by_sig.get(key)
            if f is not None:  # another thread reported the same thing meanwhile
                f.count += 1
                return f
            f = Finding(kind, title, body, signature, thread,
                        time.monotonic() - self._boot, extra=dict(extra or {}))
            self._by_sig[key] = f
            self._items.append(f)
            listeners = list(self._listeners)
        if getattr(self._defer, "depth", 0):
            self._defer.queue.append((f, listeners))
        else:
            self._announce(f, listeners)
        return f

    def _announce(self, f: Finding, listeners: list[Callable[[Finding], None]]) -> None:
        # The title at WARNING (a run's live log); the full splat at TRACE, below loguru's
        # default level, so a library user sees one line per finding (k.findings has the text).
        log = logger.bind(kernel=self._name, kind=f.kind)
        log.warning("{} [{}] {}", f.title, f.kind, f.signature)
        log.trace("{}", f.text)
        for cb in listeners:
            # Reports are made from inside the checkers (lockdep holds its graph lock, a lock
            # acquisition is half done): a listener's exception must not unwind through them.
            try:
                cb(f)
            except Exception:
                logger.exception("finding listener {!r} raised", cb)

    def recur(self, f: Finding) -> None:
        """Count one more occurrence of an already-recorded finding."""
        with self._lock:
            f.count += 1

    def add_listener(self, cb: Callable[[Finding], None]) -> None:
        """Call ``cb(finding)`` for every new finding (stress --fail-fast, the deadlock exit),
        in the reporting thread, after the reporting checker released its own locks."""
        with self._lock:
            self._listeners.append(cb)

    def __iter__(self):
        return iter(self.snapshot())

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def __getitem__(self, i: int) -> Finding:
        with self._lock:
            return self._items[i]

    def snapshot(self) -> list[Finding]:
        with self._lock:
            return list(self._items)

    def of_kind(self, *kinds: str) -> list[Finding]:
        return [f for f in self.snapshot() if f.kind in kinds]

    def clear(self) -> None:
        """Forget everything (tests that declare a finding expected, then go on)."""
        with self._lock:
            self._items.clear()
            self._by_sig.clear()
