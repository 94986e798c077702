"""kmemleak (mm/kmemleak.c): ``echo scan > /sys/kernel/debug/kmemleak``, run on demand.

``k.kmemleak.scan(what=...)`` looks for what a torn-down scenario should have released and
reports each as a MEMLEAK finding in kmemleak's format ("unreferenced object 0x... (size N):",
comm, pid, jiffies, backtrace = the allocation stack):

``caches``
    every kmem_cache still on slab_caches (root or per-memcg child); its creation stack is
    KASAN's allocation record of the kmem_cache.
``memcgs``
    zombie memcgs: offline, still in the cgroup tree, css references left.
``works``
    works pending or running on any workqueue.
``rcu``
    RCU callbacks queued and not yet invoked.
``objects``
    slab objects allocated and never freed (the slab layer keeps each cache's live objects,
    ``KmemCache.live``), with KASAN's allocation stack.

Differences from kmemleak: no reference scanning of memory (Python has no untyped memory to
scan, and the model's leaks are lifecycle leaks: anything still live at the scan point is
unreferenced by definition of the scenario), so the caller decides *when* to scan: after it
quiesced the kernel (:meth:`Kmemleak.quiesce`: RCU barrier + every workqueue flushed, until
nothing is left in flight) and released what it owned. Never run automatically at shutdown.

Like kmemleak reading kernel memory, the scan reads other subsystems' state directly: each
cache's live-object set, the cgroup tree (cgroup_mutex), the workqueue lists and workers (the
workqueue subsystem's lock) and the RCU callback queues (each queue's lock).

Each leaked item is reported once (kmemleak's OBJECT_REPORTED flag): a later scan that sees
the same item again returns its finding without counting it twice. Findings are deduplicated
by signature ``what:name`` (a child cache's or an object's name without the memcg serial, so
that a churn run's many memcgs of one name make one finding, counted per item).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from kmemcg.core import findings as F
from kmemcg.core.findings import Finding
from kmemcg.core.kasan import KasanOops
from kmemcg.core.stacks import Stack, format_site
from kmemcg.mm.slub import cache_signature
from kmemcg.rcu.callbacks import cb_name

if TYPE_CHECKING:
    from kmemcg.kernel import Kernel
    from kmemcg.mm.memcontrol import MemCgroup

CACHES, MEMCGS, WORKS, RCU_CBS, OBJECTS = "caches", "memcgs", "works", "rcu", "objects"
ALL = (CACHES, MEMCGS, WORKS, RCU_CBS, OBJECTS)
HZ = 1000
INITIAL_JIFFIES = (-300 * HZ) & 0xFFFFFFFF  # include/linux/jiffies.h


def _kasan_info(obj: Any) -> Any:
    try:
        return object.__getattribute__(obj, "_kasan")
    except AttributeError:
        return None


class Kmemleak:
    """``k.kmemleak``."""

    def __init__(self, k: Kernel) -> None:
        self._k = k
        self._lock = k.raw_lock()  # serialises scans (kmemleak's scan_mutex)
        # Items already reported (OBJECT_REPORTED) -> the signature of their finding, weakly: a
        # reported object may still be freed later and its id reused. One item seen by two
        # scans (an undeactivated child, then a cache left) stays one leak.
        self._reported: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()
        self._reported_keys: dict[tuple[str, int], str] = {}  # RCU callbacks (no weakref)
        self.nr_scans = 0

    # ------------------------------------------------------------------ quiesce
    def quiesce(self, rounds: int = 20) -> bool:
        """RCU barrier and flush every workqueue until nothing is in flight (an RCU callback
        queues a work that calls call_rcu(), and so on: css_put -> css_free -> parent put).
        Returns whether it settled within ``rounds``. Call with no lock held."""
        k = self._k
        for _ in range(rounds):
            k.rcu.barrier()
            for wq in k.workqueues.workqueues():
                wq.flush()
            if not self._pending_works() and not self._pending_callbacks()[1]:
                return True
        return False

    # ------------------------------------------------------------------ scan
    def scan(self, what: str | Iterable[str] | None = None) -> list[Finding]:
        """``echo scan > /sys/kernel/debug/kmemleak``: report what is still alive among
        ``what`` (one of :data:`ALL` or several; all by default). Returns the findings of the
        items seen by this scan, one per signature, in report order."""
        kinds = ALL if what is None else ((what,) if isinstance(what, str) else tuple(what))
        bad = [w for w in kinds if w not in ALL]
        if bad:
            raise ValueError(f"kmemleak: unknown scan target(s) {bad}; known: {ALL}")
        out: dict[int, Finding] = {}
        with self._lock:
            self.nr_scans += 1
            if CACHES in kinds:
                self._scan_caches(out)
            if MEMCGS in kinds:
                self._scan_memcgs(out)
            if WORKS in kinds:
                self._scan_works(out)
            if RCU_CBS in kinds:
                self._scan_rcu(out)
            if OBJECTS in kinds:
                self._scan_objects(out)
        return list(out.values())

    def scan_memcgs(self) -> list[Finding]:
        """Zombie memcgs only: for the quiesce point where the root caches are still alive."""
        return self.scan(MEMCGS)

    def scan_caches(self) -> list[Finding]:
        return self.scan(CACHES)

    def scan_undeactivated(self, min_age: float = 0.0) -> list[Finding]:
        """Per-memcg caches of offline memcgs that the design's offline never deactivated
        (kmemcg.mm.memcg_slab.MemcgSlab.offline_children_not_deactivated): their empty slabs
        pin the memcg for as long as the root lives. Call after quiesce(), or with
        ``min_age`` > 0 while the kernel runs (the scan thread: only memcgs offline for at
        least ``min_age`` seconds, as kmemleak reports only objects older than its
        jiffies_min_age)."""
        out: dict[int, Finding] = {}
        ms = self._k.memcg_slab
        if ms is None:
            return []
        with self._lock:
            self.nr_scans += 1
            for c in ms.offline_children_not_deactivated(min_age):
                try:
                    p = c.memcg_params
                    active, total, slabs = self._k.slab.slub.counts(c)
                    extra = (f"  per-memcg kmem_cache {c.name} (memcg {p.memcg.path}), unpublished "
                             f"at its memcg's offline, never deactivated: {slabs} slab(s) "
                             f"kept\n")
                    self._leak(out, c, CACHES, f"undeactivated:{cache_signature(c.name)}",
                               f"kmem_cache {cache_signature(c.name)} never deactivated",
                               c.size, extra)
                except KasanOops:
                    continue
        return list(out.values())

    def scan_memcg_caches(self) -> list[Finding]:
        """Per-memcg child caches only: for the quiesce point where every memcg is offline
        and every object freed, so no child has a reason to live (whatever memcg it was
        reparented to), while the root caches still may."""
        out: dict[int, Finding] = {}
        with self._lock:
            self.nr_scans += 1
            for s in self._k.slab.caches():
                try:
                    p = s.memcg_params
                    if p is not None and not p.is_root_cache:
                        self._scan_cache(out, s)
                except KasanOops:
                    continue
        return list(out.values())

    def scan_objects(self) -> list[Finding]:
        return self.scan(OBJECTS)

    def scan_pending(self) -> list[Finding]:
        """Works and RCU callbacks still in flight."""
        return self.scan((WORKS, RCU_CBS))

    def _scan_caches(self, out: dict[int, Finding]) -> None:
        k = self._k
        for s in k.slab.caches():
            try:
                self._scan_cache(out, s)
            except KasanOops:
                continue  # a cache reaching freed memory: KASAN reported it already

    def _scan_cache(self, out: dict[int, Finding], s: Any) -> None:
        k = self._k
        p = s.memcg_params
        child = p is not None and not p.is_root_cache
        what = "per-memcg kmem_cache" if child else "kmem_cache"
        aliases = object.__getattribute__(s, "alias_count")
        extra = f"  {what} {s.name}, {aliases} alias(es)"
        if child:
            extra += f", memcg {p.memcg.path}"
        ref = s.lifetime_ref
        if ref is not None:
            extra += f", lifetime refcount {ref.read()}"
        active, total, slabs = k.slab.slub.counts(s)
        extra += f", {active}/{total} objects in {slabs} slabs\n"
        self._leak(out, s, CACHES, cache_signature(s.name), f"kmem_cache {cache_signature(s.name)}",
                   s.size, extra)

    def offline_memcgs(self) -> list[MemCgroup]:
        """Memcgs offline but not yet freed (still linked in the tree: css_free unlinks)."""
        mc = self._k.memcg
        found: list[MemCgroup] = []
        with mc.cgroup_mutex:
            stack = [mc.root]
            while stack:
                m = stack.pop()
                if not m.online:
                    found.append(m)
                stack.extend(m.children)
        return found

    def _scan_memcgs(self, out: dict[int, Finding]) -> None:
        for m in self.offline_memcgs():
            try:
                self._scan_memcg(out, m)
            except KasanOops:
                continue

    def _scan_memcg(self, out: dict[int, Finding], m: MemCgroup) -> None:
        refs = m.css_ref.read()
        if not refs:
            return  # its free is in flight: a pending callback or work, not a zombie
        pages = sum(len(c.slabs) for c in list(m.kmem_caches))
        extra = (f"  mem_cgroup {m.path} (serial {m.serial}) offline, css_ref={refs}, "
                 f"kmem={m.kmem_state}, {len(m.kmem_caches)} child cache(s) holding "
                 f"{pages} slab page(s): "
                 + ", ".join(c.name for c in list(m.kmem_caches)) + "\n")
        # one signature per parent: a stress run's thousands of zombies make one finding
        parent = m.parent.path if m.parent is not None else ""
        self._leak(out, m, MEMCGS, f"{parent.rstrip('/')}/*", f"mem_cgroup {m.path}", 0, extra)

    def _pending_works(self) -> list[tuple[Any, Any, str]]:
        """(work, workqueue, state) for every work queued or running."""
        k = self._k
        s = k.workqueues
        found = []
        with s._lock:  # the workqueue subsystem's lock guards lists and worker state
            for wq in s._wqs:
                for w in wq._worklist:
                    found.append((w, wq, "pending"))
                for wk in wq._workers:
                    if wk.current is not None:
                        found.append((wk.current, wq, f"running on {wk.name}"))
                    for w in wk.scheduled:
                        found.append((w, wq, "scheduled"))
        return found

    def _scan_works(self, out: dict[int, Finding]) -> None:
        for w, wq, state in self._pending_works():
            extra = f"  work {w.name} on workqueue {wq.name}: {state}\n"
            self._leak(out, w, WORKS, f"{wq.name}:{w.name}", f"work {w.name} on {wq.name}",
                       0, extra)

    def _pending_callbacks(self) -> tuple[list[Any], int]:
        """The callbacks still queued, and how many were queued and not yet invoked (queued
        plus the batch a callback thread is running)."""
        cbs = self._k.rcu._cbs
        found = []
        for q in cbs._queues:
            with q.cond:
                found.extend(q.cbs)
        queued, invoked, _errors = cbs.stats()
        return found, queued - invoked

    def _scan_rcu(self, out: dict[int, Finding]) -> None:
        found, inflight = self._pending_callbacks()
        for fn, args in found:
            name = cb_name(fn)
            extra = f"  RCU callback {name}({', '.join(map(repr, args))}) not invoked\n"
            self._leak(out, (fn, args), RCU_CBS, name, f"rcu callback {name}", 0, extra)
        if inflight > len(found):
            n = inflight - len(found)
            self._leak(out, None, RCU_CBS, "in-flight", "rcu callbacks in flight", 0,
                       f"  {n} RCU callback(s) taken by a callback thread, not yet invoked\n")

    def _scan_objects(self, out: dict[int, Finding]) -> None:
        k = self._k
        for s in k.slab.caches():
            sig = cache_signature(s.name)
            for o in list(s.live):
                self._leak(out, o, OBJECTS, sig, f"object of {sig}", s.object_size,
                           f"  object {o.idx} of a slab of {s.name}\n")

    # ------------------------------------------------------------------ report
    def _leak(self, out: dict[int, Finding], obj: Any, what: str, name: str, title: str,
              size: int, extra: str) -> None:
        k = self._k
        sig = f"{what}:{name}"
        info = _kasan_info(obj) if obj is not None and not isinstance(obj, tuple) else None
        addr = id(obj)
        text = self._text(addr, size, info, extra)
        first = self._first_time(obj, sig)
        if first is None:
            f = k.findings.report(F.MEMLEAK, f"kmemleak: unreferenced object: {title}", sig,
                                  text, thread=k.current().name,
                                  extra={"what": what, "name": name})
        else:
            f = self._find(first)
            if f is None:  # the log was cleared since: report it afresh
                f = k.findings.report(F.MEMLEAK, f"kmemleak: unreferenced object: {title}",
                                      sig, text, thread=k.current().name,
                                      extra={"what": what, "name": name})
        out.setdefault(id(f), f)

    def _first_time(self, obj: Any, sig: str) -> str | None:
        """OBJECT_REPORTED: None the first time ``obj`` is seen leaking (it is then recorded
        under ``sig``), else the signature it was first reported under."""
        if obj is None:
            return None
        if isinstance(obj, tuple):  # an RCU callback (fn, args): no weak reference
            key = (cb_name(obj[0]), id(obj[1]))
            seen = self._reported_keys.get(key)
            if seen is None:
                self._reported_keys[key] = sig
            return seen
        seen = self._reported.get(obj)
        if seen is None:
            self._reported[obj] = sig
        return seen

    def _find(self, sig: str) -> Finding | None:
        for f in self._k.findings.of_kind(F.MEMLEAK):
            if f.signature == sig:
                return f
        return None

    def _text(self, addr: int, size: int, info: Any, extra: str) -> str:
        if info is not None:
            task = info.alloc_task
            comm, _, pid = task.rpartition("/")
            t = info.alloc_time
            stack: Stack | None = info.alloc_stack
        else:
            comm, pid, t, stack = "?", "0", 0.0, None
        jiffies = (INITIAL_JIFFIES + int(t * HZ)) & 0xFFFFFFFF
        lines = [f"unreferenced object 0x{addr:016x} (size {size}):\n",
                 f"  comm \"{comm}\", pid {pid or 0}, jiffies {jiffies}\n", extra,
                 "  backtrace:\n"]
        if stack:
            for fr in stack:
                lines.append(f"    [<{hash(fr) & 0xFFFFFFFFFFFFFFFF:016x}>] {format_site(fr)}\n")
        else:
            lines.append("    <no allocation stack recorded (KASAN off)>\n")
        return "".join(lines)
