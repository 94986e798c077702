"""Catalog bug 11 (seed 000, v4.11-v4.17): a root cache destroyed while a child's deactivation
is still queued. Switched on by the v4.17 preset; caught by KASAN, which knows nothing of it."""

from __future__ import annotations

import random
import threading

import pytest

from kmemcg import Kernel
from kmemcg.catalog import BY_NAME
from kmemcg.core import findings as F
from kmemcg.core.instrument import Perturb
from kmemcg.mm.slub import SLAB_ACCOUNT
from kmemcg.testing import (
    OwnedCaches,
    check_churn_outcome,
    fast_switching,
    hold_grace_period,
    in_memcg,
    memcg_user_loop,
    run_until_found,
)


def deactivation_pending_during_root_destroy(k: Kernel) -> None:
    """The minimal interleaving: a memcg with an (empty) child goes offline while an RCU reader
    keeps the grace period open, so the child's deactivation waits as an RCU callback; the root
    is destroyed meanwhile; then the grace period ends and the deactivation runs."""
    sl, mc = k.slab, k.memcg
    s = sl.kmem_cache_create("dentry", 192, flags=SLAB_ACCOUNT)
    m = in_memcg(k)
    sl.kmem_cache_free(s, sl.kmem_cache_alloc(s))  # queues the child's creation
    k.rcu.barrier()
    k.memcg_slab.wq.flush()
    sl.kmem_cache_free(s, sl.kmem_cache_alloc(s))  # from the child: it exists
    assert s.memcg_params.children
    mc.attach(k.current(), mc.root)
    out, r = hold_grace_period(k)
    assert mc.offline(m) == 0  # the deactivation is now an RCU callback
    destroyed = threading.Event()

    def destroyer() -> None:
        sl.kmem_cache_destroy(s)
        destroyed.set()

    d = k.kthread_run(destroyer, name="destroyer")
    if k.config.bug("root_destroy_without_flush"):
        assert destroyed.wait(5)  # 4.17: nothing to wait for, the children are freed now
    out.set()
    r.join(5)
    d.join(10)
    assert destroyed.is_set()
    k.rcu.barrier()
    k.memcg_slab.wq.flush()
    k.system_wq.flush()


def test_fixed_root_destroy_waits_for_the_pending_deactivation() -> None:
    with Kernel(config="fixed") as k:
        deactivation_pending_during_root_destroy(k)
        assert not k.findings.snapshot(), [f.title for f in k.findings]


def test_v417_deactivation_after_root_destroy_is_a_use_after_free_in_has_cpu_slab() -> None:
    with Kernel(config="v4.17") as k:
        assert k.config.bug("root_destroy_without_flush")
        deactivation_pending_during_root_destroy(k)
        (f,) = k.findings
        assert f.kind == F.KASAN_UAF and f.kind in BY_NAME["root_destroy_without_flush"].detector
        assert f.title == "BUG: KASAN: use-after-free in has_cpu_slab"  # seed 000's GPF site
        assert "Freed by task destroyer/" in f.text
        assert "kmemcg_deactivate_workfn" in f.thread or "kworker" in f.thread


@pytest.mark.parametrize("config, expect", [("v4.17", True), ("fixed", False)])
def test_randomized_memcg_churn_against_root_destroy(config: str, expect: bool) -> None:
    """memcgs come and go while accounted root caches are created, used and destroyed: the
    4.17 kernel is caught within the bound; the fixed one stays clean for a second."""
    limit = 30.0 if expect else 1.0
    with fast_switching():
        with Kernel(config=config) as k:
            k.add_instrument(Perturb(1, 0.3, 0.002))
            sl = k.slab
            stop = threading.Event()
            found = threading.Event()
            k.findings.add_listener(lambda f: found.set())
            owned = OwnedCaches(per_cache=True)  # a cache is destroyed once nobody uses it

            def caches() -> None:
                rng = random.Random(1)
                while not stop.is_set():
                    s = sl.kmem_cache_create(rng.choice(("a", "b")), rng.choice((96, 192)),
                                             flags=SLAB_ACCOUNT)
                    h = owned.publish(s)
                    stop.wait(0.003)
                    owned.destroy(k, h, s)

            def memcgs(i: int) -> None:
                rng = random.Random(10 + i)
                memcg_user_loop(k, stop, f"m{i}", 3, lambda: owned.alloc_free(k, rng))

            ts = [k.kthread_run(caches, name="caches")]
            ts += [k.kthread_run(memcgs, i, name=f"memcgs{i}") for i in range(3)]
            elapsed = run_until_found(ts, stop, found, limit)
            check_churn_outcome(k, expect, found.is_set(),
                                BY_NAME["root_destroy_without_flush"].detector, limit, config,
                                elapsed)
