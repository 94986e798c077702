"""Catalog bugs 9 and 10 (seed 002), on the v3.16 design and on the v4 design.

Bug 9 (``get_cache_without_reference``): memcg_kmem_get_cache() hands out a child cache with no
reference; between it and the allocation the task moves away, its memcg goes offline and the
(empty) child is destroyed: the allocation runs on a freed kmem_cache.
Bug 10 (``free_path_touches_cache_after_uncharge``): the free path touches the child after the
count drop (nr_pages in 3.16, the page's css reference in 3.19+) that let a destroyer free it.

v3.16 destroys an empty child directly at offline; v4 (and v3.16 with bug 9's fix, which brings
3.19's lifetime) destroys children at css_free, one grace period and a work after the memcg's
last reference: the deterministic tests hold the window with a breakpoint until the child is
freed. Each scenario is also run with the switch off: no finding.
"""

from __future__ import annotations

import random
import sys
import threading
import time
from typing import Any

import pytest

from kmemcg import Kernel
from kmemcg.catalog import BY_NAME
from kmemcg.config import Config
from kmemcg.core import findings as F
from kmemcg.core.instrument import Perturb
from kmemcg.core.kasan import Kasan, KasanOops
from kmemcg.mm.slub import SLAB_ACCOUNT
from kmemcg.testing import settle, wait_until

BUG9 = "get_cache_without_reference"
BUG10 = "free_path_touches_cache_after_uncharge"
WAIT = 5.0
CRASHES = (F.KTHREAD_EXCEPTION, F.CALLBACK_EXCEPTION, F.WORK_EXCEPTION)


def config(design: str, *bugs: str) -> Config:
    if design == "v3.16":
        return Config.make("fixed", bugs=list(bugs), hotplug="2012", memcg="v3.16")
    return Config.make("fixed", bugs=list(bugs), memcg="v4")




def child_of_memcg(k: Kernel) -> tuple[Any, Any, Any]:
    """An accounted root ``s``, a kmem-active memcg ``m`` and its child ``c`` of ``s``; the
    calling task is back in the root memcg."""
    sl, mc = k.slab, k.memcg
    s = sl.kmem_cache_create("dentry", 192, flags=SLAB_ACCOUNT)
    m = mc.create("m")
    mc.memcg_activate_kmem(m)
    mc.attach(k.current(), m)
    sl.kmem_cache_free(s, sl.kmem_cache_alloc(s))  # a miss: the creation is queued
    settle(k)
    c = mc.cache_from_memcg_idx(s, m.kmemcg_id)
    assert c is not None and c.memcg_params.memcg is m
    return s, m, c


def test_the_catalog_entries() -> None:
    for b in (BUG9, BUG10):
        assert F.KASAN_UAF in BY_NAME[b].detector
        assert {"v3.16", "v4"} <= set(BY_NAME[b].requires_memcg)
        assert "v3.16" in BY_NAME[b].presets
    assert BY_NAME[BUG9].window == "memcg_kmem_get_cache:returned"
    assert BY_NAME[BUG10].window == "memcg_uncharge_slab:after_put"
    assert {BUG9, BUG10, "alias_race"} <= Config.make("v3.16").bugs
    assert Config.make("fixed", bugs=[BUG9]).memcg == "v4"


# ============================================================================= bug 9
# T (in m) allocates from s and is parked between memcg_kmem_get_cache() and the allocation;
# the main thread moves T to the root memcg and offlines m; with the bug the child goes (at
# once in 3.16, at css_free in v4), and T then allocates from it.

def alloc_vs_offline(k: Kernel) -> tuple[Any, dict[str, Any]]:
    sl, mc = k.slab, k.memcg
    s, m, c = child_of_memcg(k)
    obj = sl.kmem_cache_alloc(s)  # the child gets a page ...
    sl.kmem_cache_free(s, obj)  # ... and is empty again
    mc.attach(k.current(), mc.root)
    out: dict[str, Any] = {}
    bp = k.breakpoints.add("window:memcg_kmem_get_cache:returned", thread="T")

    def t_fn() -> None:
        mc.attach(k.current(), m)
        try:
            o = sl.kmem_cache_alloc(s)
            out["cache"] = o.cache
            sl.kmem_cache_free(s, o)
        except KasanOops as e:
            out["oops"] = e

    t = k.kthread_run(t_fn, name="T")
    bp.wait(WAIT)
    mc.attach(t.task, mc.root)
    assert mc.offline(m) == 0
    if k.config.bug(BUG9):
        assert wait_until(lambda: Kasan.is_freed(c), WAIT)  # 3.16: now; v4: at css_free
    else:
        settle(k)
        assert not Kasan.is_freed(c)  # T's css reference keeps m, and with it c
    bp.release()
    t.join(WAIT)
    assert not t.is_alive()
    settle(k)
    return c, out


@pytest.mark.parametrize("design", ["v3.16", "v4"])
def test_bug9_on_allocation_from_the_destroyed_child(kernels, design: str) -> None:
    k = kernels(config(design, BUG9))
    c, out = alloc_vs_offline(k)
    assert isinstance(out.get("oops"), KasanOops)
    (f,) = k.findings
    assert f.kind == F.KASAN_UAF and f.thread.startswith("T/")
    assert f.title.startswith("BUG: KASAN: use-after-free in slab_alloc")
    assert "of kmem_cache" in f.text and "Freed by task" in f.text
    if design == "v3.16":  # destroyed by the offline itself, under memcg_slab_mutex
        assert "memcg_deactivate_kmem_caches" in f.text  # mem_cgroup_destroy_all_caches
        assert "memcg_kmem_destroy_cache" in f.text
    else:
        assert "memcg_destroy_kmem_caches" in f.text  # at css_free


@pytest.mark.parametrize("design", ["v3.16", "v4"])
def test_bug9_off_the_reference_keeps_the_child(kernels, design: str) -> None:
    k = kernels(config(design))
    c, out = alloc_vs_offline(k)
    assert out.get("cache") is c and "oops" not in out
    assert not k.findings.snapshot(), [f.text for f in k.findings]


# ============================================================================= bug 10
# F frees the last object of the child's only slab (not a cpu slab): the slab is discarded and
# uncharged; F is parked right after the count drop (with the bug). Meanwhile m goes offline
# and the child is destroyed (3.16: offline sees nr_pages == 0; v4: the memcg's last
# reference went, css_free destroys it). F then touches the child.

def free_vs_destroy(k: Kernel) -> tuple[Any, dict[str, Any]]:
    sl, mc = k.slab, k.memcg
    s, m, c = child_of_memcg(k)
    obj = sl.kmem_cache_alloc(s)
    assert obj.cache is c
    sl.kmem_cache_shrink(c)  # unfreeze the cpu slab: freeing obj empties and discards it
    mc.attach(k.current(), mc.root)
    out: dict[str, Any] = {}
    bp = k.breakpoints.add("window:memcg_uncharge_slab:after_put", thread="F")

    def f_fn() -> None:
        try:
            sl.kmem_cache_free(s, obj)
            out["ok"] = True
        except KasanOops as e:
            out["oops"] = e

    t = k.kthread_run(f_fn, name="F")
    if k.config.bug(BUG10):
        bp.wait(WAIT)
    else:
        t.join(WAIT)
    assert mc.offline(m) == 0
    assert wait_until(lambda: Kasan.is_freed(c), WAIT)  # empty and offline: it goes
    bp.release()
    t.join(WAIT)
    assert not t.is_alive()
    settle(k)
    return c, out


@pytest.mark.parametrize("design, bugs", [("v3.16", (BUG9, BUG10)), ("v3.16", (BUG10,)),
                                          ("v4", (BUG10,))],
                         ids=["v3.16", "v3.16-3.19-lifetime", "v4"])
def test_bug10_on_free_path_touches_the_destroyed_child(kernels, design: str,
                                                        bugs: tuple) -> None:
    k = kernels(config(design, *bugs))
    c, out = free_vs_destroy(k)
    assert isinstance(out.get("oops"), KasanOops)
    (f,) = k.findings
    assert f.kind == F.KASAN_UAF and f.thread.startswith("F/")
    assert f.title == "BUG: KASAN: use-after-free in memcg_uncharge_slab"
    assert "of kmem_cache" in f.text and "Freed by task" in f.text


@pytest.mark.parametrize("design, bugs", [("v3.16", (BUG9,)), ("v3.16", ()), ("v4", ())],
                         ids=["v3.16", "v3.16-3.19-lifetime", "v4"])
def test_bug10_off_same_scenario_is_clean(kernels, design: str, bugs: tuple) -> None:
    k = kernels(config(design, *bugs))
    c, out = free_vs_destroy(k)
    assert out.get("ok")
    assert not k.findings.snapshot(), [f.text for f in k.findings]


# ============================================================================= randomized
# The stress driver's operations: a mover creates memcgs, activates them, moves workers in and
# out and offlines them; workers allocate from accounted roots and free (some objects are freed
# by another worker: remote frees discard slabs outside their cpu slab); a cache thread creates
# and destroys accounted roots (owner protocol: destroyed once nobody uses them).

class Churn:
    def __init__(self, k: Kernel, seed: int, nworkers: int = 3, keep: float = 0.6) -> None:
        self.k, self.seed, self.n, self.keep = k, seed, nworkers, keep
        sl = k.slab
        # big objects (4 a slab): cpu slabs fill up and are unfrozen, so frees discard slabs
        self.roots = [sl.kmem_cache_create("dentry", 192, flags=SLAB_ACCOUNT),
                      sl.kmem_cache_create("inode", 1024, flags=SLAB_ACCOUNT)]
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.pool: list[tuple[Any, Any]] = []  # objects handed over for a remote free
        self.live: list[Any] = []  # transient roots and their users (owner protocol)
        self.users: dict[int, int] = {}
        self.tasks: list[Any] = []
        self.ops = 0

    def _guard(self, fn: Any, *a: Any) -> None:
        try:
            fn(*a)
        except KasanOops:
            pass  # the oops ends this operation; KASAN reported it

    def worker(self, i: int) -> None:
        k, sl = self.k, self.k.slab
        rng = random.Random(self.seed * 31 + i)
        with self.lock:
            self.tasks.append(k.current())
        while not self.stop.is_set():
            with self.lock:
                s = rng.choice(self.live + self.roots)
                if s in self.live:
                    self.users[id(s)] += 1
            objs = []
            try:
                for _ in range(rng.randrange(1, 4)):
                    objs.append(sl.kmem_cache_alloc(s))
                # objects of the long-lived roots may outlive their memcg: handed over, freed
                # later by another worker (remote frees that discard slabs of dead children)
                keep = [o for o in objs if s in self.roots and rng.random() < self.keep]
                for o in objs:
                    if o in keep:
                        with self.lock:
                            self.pool.append((s, o))
                    else:
                        sl.kmem_cache_free(s, o)
                theirs = []
                with self.lock:
                    while len(self.pool) > 12:
                        theirs.append(self.pool.pop(rng.randrange(len(self.pool))))
                for c, o in theirs:
                    sl.kmem_cache_free(c, o)
                if rng.random() < 0.3:  # frees from another CPU: slabs discarded by frees
                    k.hotplug.migrate()
            except KasanOops:
                pass
            finally:
                if s in self.live:
                    with self.lock:
                        self.users[id(s)] -= 1
            with self.lock:
                self.ops += 1

    def mover(self) -> None:
        mc = self.k.memcg
        rng = random.Random(self.seed)
        n = 0
        while not self.stop.is_set():
            n += 1
            m = mc.create(f"m{n}")
            mc.memcg_activate_kmem(m)
            with self.lock:
                ts = list(self.tasks)
            moved = rng.sample(ts, rng.randrange(1, len(ts) + 1)) if ts else []
            for t in moved:
                mc.attach(t, m)
            self.stop.wait(rng.random() * 0.004)
            for t in moved:
                mc.attach(t, mc.root)
            if rng.random() < 0.3:
                self._guard(self.k.slab.kmem_cache_shrink, rng.choice(self.roots))
            self._guard(mc.offline, m)

    def caches(self) -> None:
        sl = self.k.slab
        rng = random.Random(self.seed + 7)
        while not self.stop.is_set():
            s = sl.kmem_cache_create(rng.choice(("a", "b")), rng.choice((96, 320)),
                                     flags=SLAB_ACCOUNT)
            with self.lock:
                self.live.append(s)
                self.users[id(s)] = 0
            self.stop.wait(0.005)
            with self.lock:
                self.live.remove(s)
            while not self.stop.is_set():
                with self.lock:
                    if self.users[id(s)] == 0:
                        break
                time.sleep(0.0005)
            self._guard(sl.kmem_cache_destroy, s)


class WindowPerturb(Perturb):
    """Perturb one window only (with longer sleeps than the general perturbation)."""

    def __init__(self, seed: int, prob: float, longest: float, window: str) -> None:
        super().__init__(seed, prob, longest)
        self.window = window

    def on_event(self, point: str, label: str, task: Any, obj: Any) -> None:
        if label == self.window:
            super().on_event(point, label, task, obj)


def run_churn(k: Kernel, limit: float, expected: tuple[str, ...],
              focus: tuple[str, float] | None = None,
              pred: Any = None, keep: float = 0.6) -> tuple[float | None, int, int]:
    """Run the churn until a finding of an ``expected`` kind (and ``pred(finding)``) or for
    ``limit`` s. ``focus`` = (window, longest sleep) widens the bug's own window."""
    seed = random.SystemRandom().randrange(2**32)
    k.add_instrument(Perturb(seed, 0.3, 0.002))
    if focus is not None:
        k.add_instrument(WindowPerturb(seed + 1, 0.5, focus[1], focus[0]))
    world = Churn(k, seed, keep=keep)
    hit = threading.Event()
    k.findings.add_listener(lambda f: hit.set() if f.kind in expected and (
        pred is None or pred(f)) else None)
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-4)
    try:
        t0 = time.monotonic()
        ts = [k.kthread_run(world.worker, i, name=f"worker{i}") for i in range(world.n)]
        ts += [k.kthread_run(world.mover, name="mover"), k.kthread_run(world.caches,
                                                                         name="caches")]
        found = hit.wait(limit)
        elapsed = time.monotonic() - t0
        world.stop.set()
        for t in ts:
            t.join(WAIT)
        assert not any(t.is_alive() for t in ts)
    finally:
        sys.setswitchinterval(old)
    return (elapsed if found else None), world.ops, seed


RANDOM_FIND = 20.0
CLEAN_RUN = 1.0
EVERYTHING = tuple(v for n, v in vars(F).items() if n.isupper() and isinstance(v, str))


def is_bug10(f: Any) -> bool:
    return f.kind == F.KASAN_UAF and f.extra.get("function") == "memcg_uncharge_slab"


# (design, switches, the bug's window and its longest perturbation, what counts as found,
# the share of objects handed over to outlive their memcg)
RANDOM_CASES = [
    pytest.param("v3.16", (BUG9,), ("memcg_kmem_get_cache:returned", 0.002), None, 0.6,
                 id="bug9-v3.16"),
    pytest.param("v4", (BUG9,), ("memcg_kmem_get_cache:returned", 0.02), None, 0.6,
                 id="bug9-v4"),
    # the v3.16 preset's pair: bug 9 shows too; wait for bug 10's own report. 3.16 destroys
    # a child at offline only if it has no page left: few objects outlive the memcg.
    pytest.param("v3.16", (BUG9, BUG10), ("memcg_uncharge_slab:after_put", 0.02), is_bug10,
                 0.2, id="bug10-v3.16"),
    pytest.param("v3.16", (BUG10,), ("memcg_uncharge_slab:after_put", 0.02), is_bug10, 0.6,
                 id="bug10-v3.16-3.19-lifetime"),
    # v4: the child goes at css_free, a grace period and a work after the last page's put
    pytest.param("v4", (BUG10,), ("memcg_uncharge_slab:after_put", 0.02), is_bug10, 0.6,
                 id="bug10-v4"),
]


@pytest.mark.parametrize("design, bugs, focus, pred, keep", RANDOM_CASES)
def test_randomized_churn_finds_the_bug(kernels, design: str, bugs: tuple, focus: tuple,
                                        pred: Any, keep: float) -> None:
    k = kernels(config(design, *bugs))
    promised = tuple({d for b in bugs for d in BY_NAME[b].detector})
    # the 3.16 pair: bug 9's oopses slow bug 10's search down (measured 0.3-9 s)
    limit = 30.0 if len(bugs) == 2 else RANDOM_FIND
    elapsed, ops, seed = run_churn(k, limit, promised, focus, pred, keep)
    found = sorted({f.title for f in k.findings})
    when = f"{elapsed:.2f} s" if elapsed is not None else "NOT FOUND"
    print(f"\n{design} {bugs}: found after {when} ({ops} ops, seed {seed}); {found}")
    assert elapsed is not None, f"not found in {limit}s (seed {seed}): {found}"
    # an oops (bug 9) ends an operation with its objects still allocated: the cache's owner
    # then destroys a cache that still has objects
    assert {f.kind for f in k.findings} <= {*promised, F.SLAB_CACHE_NOT_EMPTY}, found
    assert not k.findings.of_kind(*CRASHES)


@pytest.mark.parametrize("design, bugs", [("v3.16", ()), ("v4", ()), ("v3.16", (BUG9,))],
                         ids=["v3.16", "v4", "v3.16-bug9-only-no-bug10"])
def test_randomized_churn_fixed_is_clean(kernels, design: str, bugs: tuple) -> None:
    k = kernels(config(design, *bugs))
    if bugs:  # bug 9's switch alone (3.16's lifetime): bug 10's window stays closed
        elapsed, ops, seed = run_churn(k, CLEAN_RUN, (F.KASAN_UAF,), pred=is_bug10)
        assert elapsed is None and not any(is_bug10(f) for f in k.findings)
        assert {f.kind for f in k.findings} <= set(BY_NAME[BUG9].detector), \
            [f.title for f in k.findings]
        return
    elapsed, ops, seed = run_churn(k, CLEAN_RUN, EVERYTHING)
    print(f"\n{design} fixed: {ops} ops in {CLEAN_RUN}s (seed {seed})")
    assert ops > 0
    assert elapsed is None and not k.findings.snapshot(), [f.text for f in k.findings]
