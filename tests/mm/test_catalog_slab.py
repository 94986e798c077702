"""Catalog bugs 1-5 (kmemcg.catalog), the slab side: each is reproducible by switching it on,
and caught by a detector that never reads the switch.

For every bug:

(a) switched off (the fixed kernel), the same concurrent scenario produces no finding at all;
(b) switched on, a deterministic test forces the minimal interleaving (breakpoints at the race
    window, or a sequential program for what lockdep predicts) and checks the report;
(c) switched on, a randomized concurrent workload (the same one for every bug: TYPESAFE_BY_RCU
    lookups, alloc/free, cache create/destroy, shrink, cpu_up/cpu_down, RCU readers) with race
    windows widened finds it within a generous bound; it stops at the first detection and
    prints how long that took. The same workload on the fixed kernel finds nothing.
"""

from __future__ import annotations

import random
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from kmemcg import Kernel
from kmemcg.catalog import BY_NAME
from kmemcg.core import findings as F
from kmemcg.core.instrument import Perturb
from kmemcg.core.kasan import KasanOops
from kmemcg.core.task import KThread
from kmemcg.mm.slub import SLAB_TYPESAFE_BY_RCU, KmemCache
from kmemcg.mm.typesafe import (
    TypesafeTable,
    typesafe_delete,
    typesafe_insert,
    typesafe_lookup,
)
from kmemcg.testing import wait_until
from kmemcg.workqueue import Work, flush_work, queue_work

WAIT = 5.0  # bound for anything that should happen at once
FAR = 1e6  # hung_task.check(now=monotonic() + FAR): every blocked task counts as hung
RANDOM_LIMIT = 10.0  # generous bound for a randomized search
CLEAN_RUN = 1.0  # how long the fixed kernel runs the randomized workload

BUG1 = "destroy_rcu_barrier_under_slab_mutex"
BUG2 = "put_online_cpus_imbalance"
BUG3 = "typesafe_page_freed_without_grace_period"
BUG4 = "destroy_without_rcu_barrier"
BUG5 = "alias_race"
# Model crashes: never acceptable, bug on or off.
CRASHES = (F.KTHREAD_EXCEPTION, F.CALLBACK_EXCEPTION, F.WORK_EXCEPTION)


# What the tests below expect to see for each bug: it must be what the catalog promises.
EXPECTED = {
    BUG1: {F.CIRCULAR_LOCKING},
    BUG2: {F.HOTPLUG_REFCOUNT, F.BAD_UNLOCK, F.REAL_DEADLOCK, F.HUNG_TASK},
    BUG3: {F.KASAN_TYPE_CONFUSION, F.KASAN_UAF},
    BUG4: {F.KASAN_UAF},
    BUG5: {F.KASAN_UAF},
}


def test_these_are_catalog_bugs_1_to_5_with_these_detectors() -> None:
    assert [BY_NAME[b].id for b in EXPECTED] == [1, 2, 3, 4, 5]
    for bug, expected in EXPECTED.items():
        assert expected <= set(BY_NAME[bug].detector), bug
    assert BY_NAME[BUG1].presets == ("v3.6",) and BY_NAME[BUG5].presets == ("v3.16",)


# ============================================================================= helpers


def kinds(k: Kernel) -> list[str]:
    return sorted(f.kind for f in k.findings)


def blocked(t: KThread) -> bool:
    return t.task is not None and t.task.blocked_on is not None


def wait_for_kind(k: Kernel, *wanted: str, timeout: float = WAIT) -> list[F.Finding]:
    wait_until(lambda: bool(k.findings.of_kind(*wanted)), timeout)
    return k.findings.of_kind(*wanted)



def typesafe_cache_with_one_object(k: Kernel) -> tuple[KmemCache, Any]:
    """A SLAB_TYPESAFE_BY_RCU cache with one object allocated, its slab no CPU's cpu slab:
    freeing the object empties the slab. Calls kmem_cache_shrink() once: with bug 2 on, that
    is the leaking put_online_cpus()."""
    sl = k.slab
    s = sl.kmem_cache_create("tsock", 64, flags=SLAB_TYPESAFE_BY_RCU)
    obj = sl.kmem_cache_alloc(s)
    sl.kmem_cache_shrink(s)  # unfreeze the cpu slab: the last free empties the slab
    return s, obj


def free_last_object(k: Kernel, s: KmemCache, obj: Any) -> None:
    """Free it: the empty slab is discarded and (fixed or not) rcu_free_slab() is queued."""
    before = k.rcu.statistics().callbacks_queued
    k.slab.kmem_cache_free(s, obj)
    assert k.rcu.statistics().callbacks_queued == before + 1  # call_rcu(rcu_free_slab)


def typesafe_cache_with_pending_free(k: Kernel) -> KmemCache:
    """A TYPESAFE_BY_RCU cache whose only slab was just emptied: an rcu_free_slab() callback
    is queued (the kernel's state when a subsystem tears down such a cache)."""
    s, obj = typesafe_cache_with_one_object(k)
    free_last_object(k, s, obj)
    return s


# ============================================================================= bugs 1 and 2
# One scenario: D destroys a TYPESAFE_BY_RCU cache (so it runs rcu_barrier()) while H takes a
# CPU down; before that the cache was shrunk once (bug 2's leaking put). D is parked where
# rcu_barrier() is about to take its mutex (holding slab_mutex only with bug 1); H is let go
# until it either holds cpu_hotplug.lock and is about to take slab_mutex in the slab notifier
# (possible only when the hotplug count let it in next to D: bug 2) or sleeps; then both go
# on.

def destroy_vs_hotplug(k: Kernel) -> tuple[KThread, KThread]:
    s = typesafe_cache_with_pending_free(k)
    bp_d = k.breakpoints.add("lock_acquire:rcu_barrier_mutex", thread="destroyer")
    d = k.kthread_run(k.slab.kmem_cache_destroy, s, name="destroyer")
    bp_d.wait(WAIT)
    bp_h = k.breakpoints.add("lock_acquire:slab_mutex", thread="hotplug")
    h = k.kthread_run(k.hotplug.cpu_down, 1, name="hotplug")
    assert wait_until(lambda: bp_h.hit or blocked(h))
    bp_h.release()
    assert wait_until(lambda: blocked(h) or not h.is_alive())
    bp_d.release()
    return d, h


@pytest.mark.parametrize("design", ["percpu_rwsem", "2012"])
def test_bug1_off_destroy_vs_hotplug_is_clean(kernels, design: str) -> None:
    k = kernels(hotplug=design, hung_task_timeout=0.5)
    d, h = destroy_vs_hotplug(k)
    d.join(WAIT)
    h.join(WAIT)
    assert not d.is_alive() and not h.is_alive()
    assert h.result == 0 and not k.hotplug.cpu_online(1)
    assert k.hotplug.cpu_up(1) == 0  # the other hotplug direction, for lockdep's sake
    assert k.hung_task.check(now=time.monotonic() + FAR) == []
    assert kinds(k) == []


def test_bug1_lockdep_sequential(kernels) -> None:
    """Bug 1 is a lockdep prediction: one task doing the two things one after the other is
    enough for lockdep to join the orders."""
    k = kernels(config="v3.6")
    assert k.config.bug(BUG1)
    k.slab.kmem_cache_destroy(typesafe_cache_with_pending_free(k))
    assert kinds(k) == []  # one order alone is fine
    assert k.hotplug.cpu_down(1) == 0
    (f,) = k.findings
    assert f.kind == F.CIRCULAR_LOCKING
    assert f.title == "WARNING: possible circular locking dependency detected"
    text = f.text
    assert "(slab_mutex)" in text and "(cpu_hotplug.lock)" in text
    assert "(rcu_barrier_mutex)" in text  # the chain: slab_mutex -> barrier -> hotplug
    assert "slab_mutex --> rcu_barrier_mutex --> cpu_hotplug.lock" in text
    assert "kmem_cache_destroy" in text and "slab_cpu_callback" in text
    assert "*** DEADLOCK ***" in text


def test_bug1_on_concurrent_lockdep_reports_but_nothing_hangs(kernels) -> None:
    """The v3.6 kernel: the destroyer holds slab_mutex across rcu_barrier() while cpu_down()
    waits for it. Lockdep reports the ABBA; the hotplug reader count keeps the writer out
    until the destroyer is done, so there is no real deadlock and no hung task."""
    k = kernels(config="v3.6", hung_task_timeout=0.5)
    d, h = destroy_vs_hotplug(k)
    assert not k.findings.of_kind(F.REAL_DEADLOCK)
    d.join(WAIT)
    h.join(WAIT)
    assert not d.is_alive() and not h.is_alive() and h.result == 0
    (f,) = k.findings.of_kind(F.CIRCULAR_LOCKING)
    assert f.thread.startswith("hotplug/")  # H closes the cycle in the notifier
    assert "slab_mutex" in f.text and "cpu_hotplug.lock" in f.text
    assert "rcu_barrier_mutex" in f.text
    assert "destroyer/" in f.text  # D's chain, as first seen
    assert k.hung_task.check(now=time.monotonic() + FAR) == []  # nobody is stuck
    assert kinds(k) == [F.CIRCULAR_LOCKING]


def test_bug2_underflow_2012_hotplug(kernels) -> None:
    k = kernels(hotplug="2012", bugs=[BUG2])
    s = k.slab.kmem_cache_create("dentry", 64)
    k.slab.kmem_cache_shrink(s)
    (f,) = k.findings
    assert f.kind == F.HOTPLUG_REFCOUNT
    assert "put_online_cpus() with cpu_hotplug.refcount == 0" in f.text
    assert "kmem_cache_shrink" in f.text
    assert k.hotplug.refcount == -1  # the historical code, without the BUG_ON


def test_bug2_underflow_percpu_rwsem_is_a_bad_unlock(kernels) -> None:
    k = kernels(bugs=[BUG2])
    k.slab.kmem_cache_shrink(k.slab.kmem_cache_create("dentry", 64))
    (f,) = k.findings
    assert f.kind == F.BAD_UNLOCK
    assert "(cpu_hotplug_lock)" in f.text and "kmem_cache_shrink" in f.text


def test_bug2_negative_count_hangs_the_hotplug_writer(kernels) -> None:
    """cpu_hotplug_begin() waits for refcount == 0; at -1 nobody will ever wake it. The
    wait-for detector cannot see a leaked count (no owner); the hung-task watchdog can."""
    k = kernels(hotplug="2012", bugs=[BUG2], hung_task_timeout=0.3)
    k.slab.kmem_cache_shrink(k.slab.kmem_cache_create("dentry", 64))
    h = k.kthread_run(k.hotplug.cpu_down, 1, name="hotplug")
    (f,) = wait_for_kind(k, F.HUNG_TASK)
    assert f.title.startswith("INFO: task hotplug:")
    assert "blocked on (cpu_hotplug)" in f.text and "cpu_hotplug_begin" in f.text
    assert h.is_alive()
    assert kinds(k) == [F.HOTPLUG_REFCOUNT, F.HUNG_TASK]
    assert k.shutdown(WAIT) == []
    assert not h.is_alive()


def test_bug2_off_same_scenario_is_clean(kernels) -> None:
    k = kernels(hotplug="2012", hung_task_timeout=0.5)
    d, h = destroy_vs_hotplug(k)
    d.join(WAIT)
    h.join(WAIT)
    assert not d.is_alive() and not h.is_alive()
    assert kinds(k) == []


def test_bug2_with_bug1_real_abba_deadlock(kernels) -> None:
    """v3.6 + a leaked put: the destroyer's get_online_cpus() only brings the count from -1
    back to 0, so cpu_down() passes cpu_hotplug_begin() while the destroyer is inside and
    holds slab_mutex: D holds slab_mutex, wants cpu_hotplug.lock; H holds cpu_hotplug.lock,
    wants slab_mutex. Seed 004's lockdep report becomes a real deadlock; teardown unwinds it."""
    k = kernels(config="v3.6", bugs=[BUG2], hung_task_timeout=0.5)
    d, h = destroy_vs_hotplug(k)
    (dl,) = wait_for_kind(k, F.REAL_DEADLOCK)
    assert dl.title == "BUG: real deadlock: tasks wait for each other"
    assert set(dl.extra["locks"]) == {"slab_mutex", "cpu_hotplug.lock"}
    assert {t.split("/")[0] for t in dl.extra["tasks"]} == {"destroyer", "hotplug"}
    assert "is blocked on (cpu_hotplug.lock) held by hotplug/" in dl.text
    assert "is blocked on (slab_mutex) held by destroyer/" in dl.text
    assert k.deadlocked
    hung = wait_for_kind(k, F.HUNG_TASK)
    assert {f.extra["task"].split("/")[0] for f in hung} <= {"destroyer", "hotplug"}
    assert hung
    assert F.HOTPLUG_REFCOUNT in kinds(k) and F.CIRCULAR_LOCKING in kinds(k)
    assert d.is_alive() and h.is_alive()
    assert k.shutdown(WAIT) == []
    assert not d.is_alive() and not h.is_alive()
    assert not k.findings.of_kind(*CRASHES)


# ============================================================================= bug 3
# R finds an object of a TYPESAFE_BY_RCU cache under rcu_read_lock() and is parked there; the
# owner deletes it (its slab becomes empty); an allocation from another cache of the same size
# needs a page. With the bug the empty slab's page went straight back to the page allocator
# and that allocation gets it (LIFO); R then locks what is now another cache's memory.

def reader_vs_page_reuse(k: Kernel) -> tuple[dict[str, Any], bool]:
    sl = k.slab
    sock = sl.kmem_cache_create("sock", 64, flags=SLAB_TYPESAFE_BY_RCU)
    dentry = sl.kmem_cache_create("dentry", 64)
    table = TypesafeTable(k, "sock_table")
    obj = typesafe_insert(k, sock, table, "key")
    page = obj.page
    sl.kmem_cache_shrink(sock)  # unfreeze the cpu slab: deleting the object empties it
    out: dict[str, Any] = {}

    def reader() -> None:
        try:
            found = typesafe_lookup(k, table, "key")
            out["found"] = found
            if found is not None:
                found.lock.unlock()
        except KasanOops as e:
            out["oops"] = e

    bp = k.breakpoints.add("window:typesafe_lookup:found", thread="reader")
    r = k.kthread_run(reader, name="reader")
    bp.wait(WAIT)
    assert typesafe_delete(k, sock, table, "key")
    other = sl.kmem_cache_alloc(dentry)
    reused = other.page is page
    bp.release()
    r.join(WAIT)
    assert not r.is_alive()
    return out, reused


def test_bug3_off_page_waits_for_the_grace_period(kernels) -> None:
    k = kernels()
    out, reused = reader_vs_page_reuse(k)
    assert not reused  # the page was still waiting for the reader's grace period
    assert out == {"found": None}  # revalidation saw the key gone
    k.rcu.barrier()  # rcu_free_slab() ran after the reader left
    assert kinds(k) == []


def test_bug3_on_reader_sees_another_caches_object(kernels) -> None:
    k = kernels(bugs=[BUG3])
    out, reused = reader_vs_page_reuse(k)
    assert reused  # the empty slab's page went to dentry at once
    assert isinstance(out.get("oops"), KasanOops)
    (f,) = k.findings
    assert f.kind == F.KASAN_TYPE_CONFUSION
    assert f.thread.startswith("reader/")
    assert f.title == "BUG: KASAN: use-after-free in typesafe_lookup"
    assert "Read of attribute 'lock'" in f.text and "under rcu_read_lock()" in f.text
    assert "slab page was freed and reused by cache dentry" in f.text
    assert "which belongs to the cache sock" in f.text
    assert f.extra["reused_by"] == "dentry"


# ============================================================================= bug 4
# The last object of a TYPESAFE_BY_RCU cache is freed (rcu_free_slab() queued), a reader keeps
# the grace period from ending, and the cache is destroyed. The fixed destroy waits in
# rcu_barrier(); with the bug it frees the cache at once and the callback reads it later.

def destroy_vs_pending_callback(k: Kernel) -> KThread:
    s, obj = typesafe_cache_with_one_object(k)
    in_reader, leave = threading.Event(), threading.Event()

    def reader() -> None:
        with k.rcu.read():
            in_reader.set()
            leave.wait(WAIT)

    r = k.kthread_run(reader, name="reader")
    assert in_reader.wait(WAIT)
    free_last_object(k, s, obj)  # its grace period must wait for the reader
    d = k.kthread_run(k.slab.kmem_cache_destroy, s, name="destroyer")
    # fixed: d sleeps in rcu_barrier() (the callback waits for the reader); bug: d returns
    assert wait_until(lambda: blocked(d) or not d.is_alive())
    leave.set()
    r.join(WAIT)
    d.join(WAIT)
    assert not d.is_alive()
    k.rcu.barrier()  # every queued callback ran
    return d


def test_bug4_off_destroy_waits_for_the_callbacks(kernels) -> None:
    k = kernels()
    destroy_vs_pending_callback(k)
    assert k.rcu.statistics().callback_errors == 0
    assert kinds(k) == []


def test_bug4_on_callback_reads_the_freed_cache(kernels) -> None:
    k = kernels(bugs=[BUG4])
    destroy_vs_pending_callback(k)
    (f,) = k.findings  # one report: no second callback_exception finding for the oops
    assert f.kind == F.KASAN_UAF
    assert f.thread.startswith("rcuc/")  # reported from the RCU callback thread
    assert f.extra["function"] == "free_slab"
    assert "rcu_free_slab" in f.text and "of kmem_cache" in f.text
    assert "Freed by task destroyer/" in f.text and "kmem_cache_destroy" in f.text
    assert k.rcu.statistics().callback_errors == 1


def test_kasan_oops_is_one_finding_wherever_it_happens(kernels) -> None:
    """A KasanOops escaping a kthread, a work item or an RCU callback is KASAN's report, the
    oops itself: no second kthread/work/callback exception finding for it."""
    k = kernels()
    sl = k.slab
    dead = sl.kmem_cache_create("dead", 96)
    sl.kmem_cache_destroy(dead)

    def alloc_from_dead(_tag: str) -> None:
        sl.kmem_cache_alloc(dead)  # reads the freed kmem_cache

    t = k.kthread_run(alloc_from_dead, "kthread", name="oopser")
    t.join(WAIT)
    assert isinstance(t.exception, KasanOops)
    w = Work(alloc_from_dead, "work", name="oops_work")
    assert queue_work(k.system_wq, w)
    flush_work(w)
    k.rcu.call(alloc_from_dead, "callback")
    k.rcu.barrier()
    uaf = k.findings.of_kind(F.KASAN_UAF)
    assert len(uaf) == 1 and uaf[0].count == 3  # one site, three oopses
    assert kinds(k) == [F.KASAN_UAF]


# ============================================================================= bug 5
# D destroys the last alias of a mergeable cache; C creates a compatible cache meanwhile. With
# the bug D has dropped slab_mutex with the alias count at 0 and the cache still listed, so C
# merges into it; D frees it; C allocates from it.

def destroy_vs_merge(k: Kernel) -> tuple[KmemCache, KmemCache, dict[str, Any]]:
    a = k.slab.kmem_cache_create("kmalloc-96", 96)
    # D parks at the first window it reaches: slab_mutex_dropped exists only with the bug
    bps = [k.breakpoints.add(f"window:kmem_cache_destroy:{w}", thread="destroyer")
           for w in ("slab_mutex_dropped", "unlocked")]
    d = k.kthread_run(k.slab.kmem_cache_destroy, a, name="destroyer")
    assert wait_until(lambda: any(bp.hit for bp in bps))
    out: dict[str, Any] = {}

    def creator() -> None:
        c = out["cache"] = k.slab.kmem_cache_create("foo", 96)
        for bp in bps:
            bp.release()
        d.join(WAIT)
        try:
            obj = k.slab.kmem_cache_alloc(c)
            k.slab.kmem_cache_free(c, obj)
            k.slab.kmem_cache_destroy(c)
            out["ok"] = True
        except KasanOops as e:
            out["oops"] = e

    c = k.kthread_run(creator, name="creator")
    c.join(WAIT)
    assert not c.is_alive() and not d.is_alive()
    return a, out["cache"], out


def test_bug5_off_create_never_merges_into_a_doomed_cache(kernels) -> None:
    k = kernels()
    a, c, out = destroy_vs_merge(k)
    assert c is not a and out.get("ok")
    assert kinds(k) == []


def test_bug5_on_creator_allocates_from_the_freed_cache(kernels) -> None:
    k = kernels(config="v3.16")
    assert k.config.bug(BUG5)
    a, c, out = destroy_vs_merge(k)
    assert c is a  # merged into the cache being destroyed
    assert isinstance(out.get("oops"), KasanOops)
    (f,) = k.findings
    assert f.kind == F.KASAN_UAF
    assert f.thread.startswith("creator/")
    assert f.title == "BUG: KASAN: use-after-free in slab_alloc"
    assert "of kmem_cache" in f.text and "kmem_cache_alloc" in f.text
    assert "Freed by task destroyer/" in f.text


# ============================================================================= randomized


NKEYS = 8
PRIVATE_SIZES = (64, 96, 160, 192)  # 64 merges with the long-lived dentry cache
OPS = {"insert": 4, "delete": 4, "lookup": 8, "alloc": 4, "free": 4, "shrink": 1,
       "lifecycle": 2, "hotplug": 1, "reader": 2}


class SlabWorld:
    """What every actor shares: a TYPESAFE_BY_RCU cache behind an RCU lookup table, two
    long-lived ordinary caches. Actors follow the slab API's rules (free what they allocated,
    destroy only caches they created, each insert/delete its own keys), so the fixed kernel
    has nothing to report."""

    def __init__(self, k: Kernel, nthreads: int, seed: int) -> None:
        sl = k.slab
        self.k, self.n, self.seed = k, nthreads, seed
        # 512 bytes: 8 objects a slab, so cpu slabs run out and slabs empty often
        self.sock = sl.kmem_cache_create("sock", 512, flags=SLAB_TYPESAFE_BY_RCU)
        self.table = TypesafeTable(k, "sock_table")
        self.shared = [sl.kmem_cache_create("dentry", 64), sl.kmem_cache_create("inode", 128)]
        self.stop = threading.Event()
        self._lock = threading.Lock()  # guards _seq and ops
        self._seq = 0
        self.ops = 0

    def _name(self) -> str:
        with self._lock:
            self._seq += 1
            return f"priv{self._seq}"

    def actor(self, i: int) -> None:
        k, sl = self.k, self.k.slab
        rng = random.Random(self.seed * 1_000_003 + i)
        own: set[tuple[int, int]] = set()
        held: list[tuple[KmemCache, Any]] = []
        names, weights = list(OPS), list(OPS.values())
        n = 0
        try:
            while not self.stop.is_set():
                op = rng.choices(names, weights)[0]
                if op == "insert":
                    key = (i, rng.randrange(NKEYS))
                    if key not in own:
                        typesafe_insert(k, self.sock, self.table, key)
                        own.add(key)
                elif op == "delete" and own:
                    key = rng.choice(sorted(own))
                    own.discard(key)
                    typesafe_delete(k, self.sock, self.table, key)
                elif op == "lookup":
                    obj = typesafe_lookup(k, self.table,
                                          (rng.randrange(self.n), rng.randrange(NKEYS)))
                    if obj is not None:
                        obj.lock.unlock()
                elif op == "alloc":
                    c = rng.choice(self.shared)
                    held.append((c, sl.kmem_cache_alloc(c)))
                    if len(held) > 32:
                        c, obj = held.pop(rng.randrange(len(held)))
                        sl.kmem_cache_free(c, obj)
                elif op == "free" and held:
                    c, obj = held.pop(rng.randrange(len(held)))
                    sl.kmem_cache_free(c, obj)
                elif op == "shrink":
                    sl.kmem_cache_shrink(rng.choice([self.sock, *self.shared]))
                elif op == "lifecycle":
                    flags = SLAB_TYPESAFE_BY_RCU if rng.random() < 0.5 else 0
                    s = sl.kmem_cache_create(self._name(), rng.choice(PRIVATE_SIZES),
                                             flags=flags)
                    objs = [sl.kmem_cache_alloc(s) for _ in range(rng.randrange(1, 8))]
                    rng.shuffle(objs)
                    for obj in objs:
                        sl.kmem_cache_free(s, obj)
                    sl.kmem_cache_destroy(s)
                elif op == "hotplug":
                    hp = k.hotplug
                    cpu = rng.randrange(1, hp.nr_cpus)
                    (hp.cpu_down if hp.cpu_online(cpu) else hp.cpu_up)(cpu)
                elif op == "reader":
                    with k.rcu.read():
                        time.sleep(rng.random() * 0.001)
                n += 1
        except KasanOops:
            pass  # the oops ends this task, as in the kernel; KASAN reported it
        finally:
            with self._lock:
                self.ops += n


@pytest.fixture
def fast_switch() -> Iterator[None]:
    """Switch threads often (as the stress CLI does) to open the GIL's race windows."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-4)
    try:
        yield
    finally:
        sys.setswitchinterval(old)


def run_world(k: Kernel, expected: tuple[str, ...], limit: float,
              nthreads: int = 4) -> tuple[float | None, int, int]:
    """Run the randomized workload until a finding of an ``expected`` kind appears (or for
    ``limit`` seconds). Returns (seconds to detection or None, operations done, seed). The
    kernel is shut down on return, with every thread gone."""
    seed = random.SystemRandom().randrange(2**32)
    k.add_instrument(Perturb(seed, 0.5, 0.002))
    world = SlabWorld(k, nthreads, seed)
    hit = threading.Event()
    k.findings.add_listener(lambda f: hit.set() if f.kind in expected else None)
    t0 = time.monotonic()
    for i in range(nthreads):
        k.kthread_run(world.actor, i, name=f"actor{i}")
    found = hit.wait(limit)
    elapsed = time.monotonic() - t0
    world.stop.set()
    assert k.shutdown(WAIT) == []
    return (elapsed if found else None), world.ops, seed


RANDOM_CASES = [
    pytest.param(dict(config="v3.6"), (F.CIRCULAR_LOCKING,), id="bug1-v3.6"),
    pytest.param(dict(hotplug="2012", bugs=[BUG2]), (F.HOTPLUG_REFCOUNT,), id="bug2-2012"),
    pytest.param(dict(bugs=[BUG2]), (F.BAD_UNLOCK,), id="bug2-percpu_rwsem"),
    pytest.param(dict(config="v3.6", bugs=[BUG2], hung_task_timeout=0.5),
                 (F.REAL_DEADLOCK, F.HUNG_TASK), id="bug2+bug1-hang"),
    pytest.param(dict(bugs=[BUG3]), (F.KASAN_TYPE_CONFUSION, F.KASAN_UAF), id="bug3"),
    pytest.param(dict(bugs=[BUG4]), (F.KASAN_UAF,), id="bug4"),
    pytest.param(dict(config="v3.16"), (F.KASAN_UAF,), id="bug5-v3.16"),
]


@pytest.mark.parametrize(("kw", "expected"), RANDOM_CASES)
def test_randomized_finds_the_bug(kernels, fast_switch, kw: dict, expected: tuple) -> None:
    k = kernels(**kw)
    promised = {d for b in k.config.bugs for d in BY_NAME[b].detector}
    assert set(expected) <= promised  # the catalog names these detectors for these bugs
    elapsed, ops, seed = run_world(k, expected, RANDOM_LIMIT)
    found = sorted({f.kind for f in k.findings})
    when = f"{elapsed:.3f} s" if elapsed is not None else "NOT FOUND"
    print(f"\n{kw}: {expected} after {when} ({ops} ops, seed {seed}); findings: {found}")
    assert elapsed is not None, f"not found within {RANDOM_LIMIT}s (seed {seed}): {found}"
    assert set(expected) & set(found)
    assert not k.findings.of_kind(*CRASHES), [f.text for f in k.findings.of_kind(*CRASHES)]


@pytest.mark.parametrize("design", ["percpu_rwsem", "2012"])
def test_randomized_fixed_kernel_finds_nothing(kernels, fast_switch, design: str) -> None:
    k = kernels(hotplug=design, hung_task_timeout=0.5)
    everything = tuple(v for n, v in vars(F).items() if n.isupper() and isinstance(v, str))
    elapsed, ops, seed = run_world(k, everything, CLEAN_RUN)
    print(f"\nfixed/{design}: {ops} ops in {CLEAN_RUN}s (seed {seed})")
    assert ops > 0
    assert elapsed is None and kinds(k) == [], [f.text for f in k.findings]
