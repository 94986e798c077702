"""The stress world: its swarm phases (stress.world.Swarm), what its shrinker shrinks and
which memcg a service's teardown removes."""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from types import SimpleNamespace

import pytest

import stress.world
from kmemcg import Kernel
from kmemcg.mm.slub import SLAB_ACCOUNT
from kmemcg.testing import in_memcg
from stress.world import ROLES, Entry, Swarm, World, shrink_children, teardown


def quiet_set(s: Swarm, phase: int, roles: list[str]) -> set[str]:
    return {r for r in roles if s.quiet(r, s._t0 + (phase + 0.5) * Swarm.PHASE)}


def test_phase_zero_runs_every_role_then_phases_quiet_a_seeded_share() -> None:
    roles = [f"{r}{i}" for r in ROLES for i in range(60)]  # 420 names: the share shows
    s = Swarm(11, 0.3)
    assert quiet_set(s, 0, roles) == set()
    q1, q2 = quiet_set(s, 1, roles), quiet_set(s, 2, roles)
    assert 90 < len(q1) < 160 and 90 < len(q2) < 160 and q1 != q2
    assert quiet_set(Swarm(11, 0.3), 1, roles) == q1  # the seed fixes the phases' mixes
    assert quiet_set(Swarm(12, 0.3), 1, roles) != q1
    assert quiet_set(Swarm(11, 0.0), 1, roles) == set()  # --swarm 0: all run


def test_the_shrinker_shrinks_the_children_of_online_memcgs_only(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A child of an offline memcg is left to the kernel's own paths (bug 17's leak is a
    kernel that never shrinks them; a driver that did would hide it)."""
    with Kernel() as k:
        sl, mc = k.slab, k.memcg
        a = sl.kmem_cache_create("a", 192, flags=SLAB_ACCOUNT)
        kept = {}
        for name in ("on", "off"):
            m = in_memcg(k, name)
            sl.kmem_cache_free(a, sl.kmem_cache_alloc(a))  # queues the creation of A(m)
            assert k.kmemleak.quiesce()
            o = sl.kmem_cache_alloc(a)
            assert o.cache is not a
            kept[name] = (m, o)  # keeps the child, and its memcg, until freed below
        mc.attach(k.current(), mc.root)
        assert mc.offline(kept["off"][0]) == 0
        assert k.kmemleak.quiesce()
        shrunk: list = []
        with monkeypatch.context() as mp:
            mp.setattr(sl.slub, "kmem_cache_shrink", lambda c: shrunk.append(c) or 0)
            shrink_children(SimpleNamespace(k=k), a)
        assert shrunk == [kept["on"][1].cache]
        for _, o in kept.values():
            sl.kmem_cache_free(a, o)
        assert k.kmemleak.quiesce()
        sl.kmem_cache_destroy(a)
        assert not k.findings


def test_teardown_removes_a_memcg_that_used_the_cache_and_no_other() -> None:
    """Before an accounted cache's destroy, a memcg with a child of it goes offline (the
    "destroy after rmdir" of a264df74df38); a memcg without one is left alone."""
    with Kernel() as k:
        sl, mc = k.slab, k.memcg
        a = sl.kmem_cache_create("a", 192, flags=SLAB_ACCOUNT)
        b = sl.kmem_cache_create("b", 96, flags=SLAB_ACCOUNT)
        w = World(k, seed=1)
        users = {}
        for name, cache in (("uses_a", a), ("uses_b", b)):
            m = in_memcg(k, name)
            sl.kmem_cache_free(cache, sl.kmem_cache_alloc(cache))  # queues the child's creation
            assert k.kmemleak.quiesce()
            users[name] = m
        mc.attach(k.current(), mc.root)
        w.memcgs = list(users.values())
        w.tasks = [k.current()]
        ops: Counter = Counter()
        teardown(w, Entry(a, typesafe=False), random.Random(1), ops)
        assert not users["uses_a"].online and users["uses_b"].online
        assert w.memcgs == [users["uses_b"]] and ops["memcg_offline"] == 1
        teardown(w, Entry(a, typesafe=False), random.Random(1), ops)  # none left: a no-op
        assert ops["memcg_offline"] == 1
        assert mc.offline(users["uses_b"]) == 0
        assert k.kmemleak.quiesce()
        sl.kmem_cache_destroy(a)
        sl.kmem_cache_destroy(b)
        assert not k.findings


def test_memcg_creations_are_paced_across_churners(monkeypatch: pytest.MonkeyPatch) -> None:
    """pace_memcg() hands out one slot per 1/MEMCG_RATE seconds to all churners together, so
    the churn rate does not follow the scheduler (lower bounds only: a nap may run long)."""
    monkeypatch.setattr(stress.world, "MEMCG_RATE", 200.0)
    with Kernel() as k:
        w = World(k, seed=1)
        t0 = time.monotonic()
        ts = [threading.Thread(target=lambda: [w.pace_memcg() for _ in range(5)])
              for _ in range(4)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(10)
        assert time.monotonic() - t0 >= 19 / 200.0  # 20 slots: the last one 19 slots on
        assert w.next_memcg >= t0 + 20 / 200.0
        w.stop.set()
        assert w.pace_memcg() is True  # a stopping run does not wait for its slot
