"""The v3.13 memcg design under randomized churn with Perturb: each catalog bug switched on
alone is found within the bound; the design with every fix stays clean for a second.

The churn: root caches created (sometimes merged: two aliases), used and destroyed by their
owners once nobody uses them; allocator threads move themselves between kmem-active memcgs and
allocate (keeping some objects past their memcg's offline); a retirer moves every task out of
a memcg and takes it offline; a grower activates fresh memcgs so the ids outgrow the arrays
(relocation), then retires them."""

from __future__ import annotations

import random
import sys
import threading
import time

import pytest

from kmemcg import Kernel
from kmemcg.catalog import BY_NAME
from kmemcg.config import Config
from kmemcg.core.instrument import Perturb
from kmemcg.core.kasan import KasanOops
from kmemcg.core.task import KernelTornDown
from kmemcg.mm.slub import SLAB_ACCOUNT
from kmemcg.testing import in_memcg, relocation_ahead, settle


def config(bugs: tuple[str, ...]) -> Config:
    return Config("v3.13", frozenset(bugs), "2012", "v3.13")


class Box(list):
    """A use count compared by identity (two aliases of one root are two entries)."""

    __eq__ = object.__eq__  # type: ignore[assignment]
    __hash__ = object.__hash__  # type: ignore[assignment]


def churn(k: Kernel, stop: threading.Event, seed: int) -> list:
    sl, mc = k.slab, k.memcg
    lock = threading.Lock()
    live: list = []  # (root, users box)
    memcgs: list = []  # kmem-active online memcgs allocators may enter
    allocators: list = []

    def guard(fn, *a):
        try:
            return fn(*a)
        except (KasanOops, ValueError):
            return None

    def roots(i: int) -> None:
        rng = random.Random(seed * 100 + i)
        while not stop.is_set():
            size = rng.choice((96, 192))
            s = sl.kmem_cache_create(f"r{i}", size, flags=SLAB_ACCOUNT)
            box = Box([0])
            with lock:
                live.append((s, box))
            stop.wait(0.02 + rng.random() * 0.1)
            with lock:
                live.remove((s, box))
            while box[0]:
                time.sleep(0.0005)
            guard(sl.kmem_cache_destroy, s)

    def allocator(i: int) -> None:
        rng = random.Random(seed * 100 + 10 + i)
        me = k.current()
        allocators.append(me)
        held: list = []
        while not stop.is_set():
            with lock:  # attach before a retirer can pick the memcg (and free it)
                m = rng.choice(memcgs) if memcgs and rng.random() < 0.9 else None
                guard(mc.attach, me, m or mc.root)
            for _ in range(rng.randint(1, 4)):
                with lock:
                    e = rng.choice(live) if live else None
                    if e is not None:
                        e[1][0] += 1
                if e is None:
                    break  # (held objects are freed below: their owners wait for them)
                s, box = e
                o = guard(sl.kmem_cache_alloc, s)
                with lock:
                    if o is not None:
                        held.append((s, box, o))  # the held object keeps its use
                    else:
                        box[0] -= 1
            while held and (len(held) > 3 or rng.random() < 0.5):
                s2, box2, o2 = held.pop(rng.randrange(len(held)))
                guard(sl.kmem_cache_free, s2, o2)
                with lock:
                    box2[0] -= 1
        for s2, box2, o2 in held:
            guard(sl.kmem_cache_free, s2, o2)
            with lock:
                box2[0] -= 1

    def retire(m) -> None:
        for t in list(allocators):
            if t.memcg is m:
                guard(mc.attach, t, mc.root)
        while mc.offline(m) != 0 and not stop.is_set():
            for t in list(allocators):
                if t.memcg is m:
                    guard(mc.attach, t, mc.root)
            time.sleep(0.0005)

    def cgroups() -> None:
        rng = random.Random(seed * 100 + 50)
        n = 0
        while not stop.is_set():
            if len(memcgs) < 3 or rng.random() < 0.5:
                n += 1
                m = mc.create(f"m{n}")
                mc.memcg_activate_kmem(m)
                with lock:
                    memcgs.append(m)
            else:
                with lock:
                    m = memcgs.pop(rng.randrange(len(memcgs)))
                retire(m)
            stop.wait(0.005 + rng.random() * 0.02)

    def grower() -> None:
        rng = random.Random(seed * 100 + 60)
        n = 0
        while not stop.is_set():
            batch = []
            for _ in range(rng.randint(4, 12)):
                n += 1
                m = mc.create(f"g{n}")
                mc.memcg_activate_kmem(m)
                batch.append(m)
            stop.wait(0.02)
            for m in batch:
                mc.offline(m)
            stop.wait(0.05)

    def run(fn, *a):
        def body() -> None:
            try:
                fn(*a)
            except (KernelTornDown, KasanOops):
                pass
        return body

    ts = [k.kthread_run(run(roots, i), name=f"roots{i}") for i in range(2)]
    ts.append(k.kthread_run(run(cgroups), name="cgroups"))
    ts.append(k.kthread_run(run(grower), name="grower"))
    for i in range(3):
        ts.append(k.kthread_run(run(allocator, i), name=f"alloc{i}"))
    return ts


@pytest.mark.parametrize("bug, limit", [
    ("shrink_under_slab_caches_mutex", 20.0),
    ("children_destroyed_before_alias_check", 20.0),
    (None, 1.0),
])
def test_churn(bug: str | None, limit: float) -> None:
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-4)
    try:
        with Kernel(config=config((bug,) if bug else ())) as k:
            k.add_instrument(Perturb(1, 0.3, 0.002))
            found = threading.Event()
            k.findings.add_listener(lambda f: found.set())
            stop = threading.Event()
            ts = churn(k, stop, 1)
            t0 = time.monotonic()
            found.wait(limit)
            elapsed = time.monotonic() - t0
            stop.set()
            if bug != "shrink_under_slab_caches_mutex":
                for t in ts:
                    t.join(10)
            kinds = {f.kind for f in k.findings}
            print(f"\n{bug}: {sorted(kinds)} after {elapsed:.2f}s "
                  f"{[f.title for f in k.findings][:3]}")
            if bug is None:
                assert not kinds, [f.text for f in k.findings]
            else:
                assert found.is_set(), f"not found within {limit}s"
                assert kinds <= set(BY_NAME[bug].detector), [f.title for f in k.findings]
    finally:
        sys.setswitchinterval(old)


def finish_round(k: Kernel, threads: list, root) -> None:
    """The end of a round: join its threads, drain RCU callbacks and works, destroy the root."""
    for t in threads:
        t.join(10)
    settle(k)
    k.slab.kmem_cache_destroy(root)


# Six bugs need their operations to meet more often than the churn makes them (the ids
# outgrow the arrays only a few times in a kernel's life): two creators of one slot during a
# relocation (7), a lookup during a relocation (13), the last page of a child freed during
# its memcg's offline (8, 10), a lookup of an empty child while a mover takes the task out
# and offlines the memcg (9: the churn finds it in 3-10 s), an offline's destroy work during
# the root destroy (14). Rounds on fresh kernels, timing randomized by Perturb and random
# delays.
def round_creators_vs_relocation(k: Kernel, rng: random.Random) -> None:
    sl, mc = k.slab, k.memcg
    s, m = relocation_ahead(k)
    delays = [rng.random() * 0.004 for _ in range(4)]

    def alloc(d: float) -> None:
        mc.attach(k.current(), m)
        for _ in range(3):
            time.sleep(d / 3)
            sl.kmem_cache_free(s, sl.kmem_cache_alloc(s))
        mc.attach(k.current(), mc.root)

    def activate(d: float) -> None:
        time.sleep(d)
        mc.memcg_activate_kmem(mc.create("big"))

    ts = [k.kthread_run(alloc, d, name=f"alloc{i}") for i, d in enumerate(delays[:3])]
    ts.append(k.kthread_run(activate, delays[3], name="activate"))
    finish_round(k, ts, s)


def round_offline_vs_root_destroy(k: Kernel, rng: random.Random) -> None:
    sl, mc = k.slab, k.memcg
    s = sl.kmem_cache_create("dentry", 192, flags=SLAB_ACCOUNT)
    m = in_memcg(k)
    sl.kmem_cache_free(s, sl.kmem_cache_alloc(s))
    k.system_wq.flush()
    c = mc.cache_from_memcg_idx(s, m.kmemcg_id)
    sl.kmem_cache_free(s, sl.kmem_cache_alloc(s))
    mc.attach(k.current(), mc.root)
    if c is not None:
        sl.kmem_cache_shrink(c)
    k.rcu.barrier()
    d1, d2 = rng.random() * 0.002, rng.random() * 0.002

    def offline() -> None:
        time.sleep(d1)
        mc.offline(m)

    def destroy() -> None:
        time.sleep(d2)
        try:
            sl.kmem_cache_destroy(s)
        except KasanOops:
            pass

    ts = [k.kthread_run(offline, name="rmdir"), k.kthread_run(destroy, name="destroyer")]
    for t in ts:
        t.join(10)
    settle(k)  # RCU callbacks and works, until nothing is in flight


def round_last_free_vs_offline(k: Kernel, rng: random.Random) -> None:
    sl, mc = k.slab, k.memcg
    s = sl.kmem_cache_create("dentry", 192, flags=SLAB_ACCOUNT)
    m = in_memcg(k)
    sl.kmem_cache_free(s, sl.kmem_cache_alloc(s))
    k.system_wq.flush()
    obj = sl.kmem_cache_alloc(s)
    mc.attach(k.current(), mc.root)
    if obj.cache is not s:
        sl.kmem_cache_shrink(obj.cache)  # off the cpu: its last free discards the slab
    k.rcu.barrier()
    d1, d2 = rng.random() * 0.002, rng.random() * 0.002

    def freer() -> None:
        time.sleep(d1)
        try:
            sl.kmem_cache_free(s, obj)
        except KasanOops:
            pass

    def offline() -> None:
        time.sleep(d2)
        mc.offline(m)

    ts = [k.kthread_run(freer, name="freer"), k.kthread_run(offline, name="rmdir")]
    finish_round(k, ts, s)


def round_lookup_vs_offline(k: Kernel, rng: random.Random) -> None:
    sl, mc = k.slab, k.memcg
    s = sl.kmem_cache_create("dentry", 192, flags=SLAB_ACCOUNT)
    m = in_memcg(k)
    sl.kmem_cache_free(s, sl.kmem_cache_alloc(s))
    k.system_wq.flush()
    obj = sl.kmem_cache_alloc(s)
    c = obj.cache
    sl.kmem_cache_free(s, obj)
    if c is not s:
        sl.kmem_cache_shrink(c)  # empty: nr_pages 0
    mc.attach(k.current(), mc.root)
    d1, d2 = rng.random() * 0.002, rng.random() * 0.002
    ready = threading.Event()
    held: list = []

    def task() -> None:
        mc.attach(k.current(), m)
        ready.set()
        time.sleep(d1)
        try:
            held.append(sl.kmem_cache_alloc(s))
        except KasanOops:
            pass

    def mover() -> None:
        ready.wait(5)
        time.sleep(d2)
        mc.attach(t.task, mc.root)
        k.rcu.barrier()
        mc.offline(m)

    t = k.kthread_run(task, name="task")
    mv = k.kthread_run(mover, name="mover")
    for x in (t, mv):
        x.join(10)
    for o in held:
        sl.kmem_cache_free(s, o)
    settle(k)  # RCU callbacks and works, until nothing is in flight
    sl.kmem_cache_destroy(s)


def round_lookups_vs_relocation(k: Kernel, rng: random.Random) -> None:
    sl, mc = k.slab, k.memcg
    s, m = relocation_ahead(k)
    stop = threading.Event()

    def reader() -> None:
        mc.attach(k.current(), m)
        try:
            while not stop.is_set():
                sl.kmem_cache_free(s, sl.kmem_cache_alloc(s))
        except KasanOops:
            pass
        mc.attach(k.current(), mc.root)

    ts = [k.kthread_run(reader, name=f"reader{i}") for i in range(2)]
    time.sleep(rng.random() * 0.003)
    mc.memcg_activate_kmem(mc.create("big"))
    stop.set()
    finish_round(k, ts, s)


@pytest.mark.parametrize("bug, scenario, limit", [
    ("memcg_params_freed_without_rcu", round_lookups_vs_relocation, 20.0),
    (None, round_lookups_vs_relocation, 1.0),
    ("get_cache_without_reference", round_lookup_vs_offline, 20.0),
    (None, round_lookup_vs_offline, 1.0),
    ("memcg_create_without_slab_mutex_recheck", round_creators_vs_relocation, 20.0),
    (None, round_creators_vs_relocation, 1.0),
    ("destroy_work_scheduled_twice", round_last_free_vs_offline, 20.0),
    ("free_path_touches_cache_after_uncharge", round_last_free_vs_offline, 20.0),
    (None, round_last_free_vs_offline, 1.0),
    ("cancel_work_sync_self_freeing_work", round_offline_vs_root_destroy, 20.0),
    (None, round_offline_vs_root_destroy, 1.0),
])
def test_rounds(bug: str | None, scenario, limit: float) -> None:
    t0 = time.monotonic()
    n = 0
    kinds: set = set()
    titles: list = []
    while time.monotonic() - t0 < limit and not kinds:
        n += 1
        rng = random.Random(n)
        with Kernel(config=config((bug,) if bug else ())) as k:
            k.add_instrument(Perturb(n, 0.5, 0.002))
            scenario(k, rng)
            kinds = {f.kind for f in k.findings}
            titles = [f.title for f in k.findings]
    print(f"\n{bug}: {sorted(kinds)} after {time.monotonic() - t0:.2f}s, {n} rounds {titles[:2]}")
    if bug is None:
        assert not kinds, titles
    else:
        assert kinds, f"not found within {limit}s ({n} rounds)"
        assert kinds <= set(BY_NAME[bug].detector), titles
