"""kmemleak's scan while the kernel runs (``Kmemleak.scan_undeactivated(min_age)``, the stress
driver's scan thread): children of memcgs offline for ``min_age`` seconds that were never
deactivated are a leak for certain (catalog bug 17), but not a child that is younger, nor one a
destroy of its root is about to shut down."""

from __future__ import annotations

import threading
import time

from kmemcg import Kernel
from kmemcg.config import MEMCG_V53, Config
from kmemcg.core import findings as F
from kmemcg.mm.slub import SLAB_ACCOUNT
from kmemcg.testing import in_memcg

BUG17 = "dying_set_before_alias_check"
AGE = 0.05  # seconds: the scans below wait twice that


def v53(*bugs: str) -> Config:
    return Config.make("fixed", bugs=list(bugs), memcg=MEMCG_V53)


def child_then_alias_destroyed_then_offline(k: Kernel):
    """A merged into by B; memcg M gets a child A(M); B destroyed (one alias of two); M
    offline; quiesced. Returns (A, the child, M)."""
    sl, mc = k.slab, k.memcg
    a = sl.kmem_cache_create("a", 192, flags=SLAB_ACCOUNT)
    b = sl.kmem_cache_create("b", 192, flags=SLAB_ACCOUNT)
    assert b is a
    m = in_memcg(k)
    sl.kmem_cache_free(a, sl.kmem_cache_alloc(a))  # queues the creation of A(M)
    assert k.kmemleak.quiesce()
    o = sl.kmem_cache_alloc(a)
    child = o.cache
    assert child is not a
    sl.kmem_cache_free(a, o)
    mc.attach(k.current(), mc.root)
    sl.kmem_cache_destroy(b)
    assert mc.offline(m) == 0
    assert k.kmemleak.quiesce()
    return a, child, m


def test_an_undeactivated_child_is_reported_once_old_enough() -> None:
    for cfg in ("v4.18", v53(BUG17)):
        with Kernel(config=cfg) as k:
            a, child, m = child_then_alias_destroyed_then_offline(k)
            assert k.kmemleak.scan_undeactivated(min_age=3600) == []  # too young
            time.sleep(2 * AGE)
            (f,) = k.kmemleak.scan_undeactivated(min_age=AGE)
            assert f.kind == F.MEMLEAK and f.title.endswith("never deactivated")
            assert f"per-memcg kmem_cache {child.name}" in f.text
            # the end-of-run scans see the same child: still one leak, counted once
            assert k.kmemleak.scan_undeactivated() == [f]
            assert f in k.kmemleak.scan("caches")
            assert [x for x in k.findings if child.name in x.text] == [f] and f.count == 1
            k.findings.clear()
            k.slab.kmem_cache_destroy(a)
            assert k.kmemleak.quiesce()


def test_fixed_designs_deactivate_every_child_at_offline() -> None:
    for cfg in ("fixed", v53()):
        with Kernel(config=cfg) as k:
            a, _child, _m = child_then_alias_destroyed_then_offline(k)
            time.sleep(2 * AGE)
            assert k.kmemleak.scan_undeactivated(min_age=AGE) == []
            k.slab.kmem_cache_destroy(a)
            assert k.kmemleak.quiesce()
            assert not k.findings.snapshot(), [f.title for f in k.findings]


def test_a_child_left_to_a_root_destroy_in_progress_is_no_leak() -> None:
    """Fixed v4: the last destroy of A marks it dying and flushes with no lock held; M goes
    offline meanwhile and skips its child (the destroy shuts it down). An aged scan then must
    not report it; once the destroy is done, nothing is left."""
    with Kernel(config="fixed") as k:
        sl, mc = k.slab, k.memcg
        a = sl.kmem_cache_create("a", 192, flags=SLAB_ACCOUNT)
        m = in_memcg(k)
        sl.kmem_cache_free(a, sl.kmem_cache_alloc(a))
        assert k.kmemleak.quiesce()
        sl.kmem_cache_free(a, sl.kmem_cache_alloc(a))  # from the child, which keeps a slab
        mc.attach(k.current(), mc.root)
        bp = k.breakpoints.add("window:kmem_cache_destroy:flush")
        t = threading.Thread(target=sl.kmem_cache_destroy, args=(a,), name="destroyer")
        t.start()
        bp.wait()
        assert a.memcg_params.dying and sl.destroy_in_progress(a)
        assert mc.offline(m) == 0  # deactivation skipped: the root is dying
        time.sleep(2 * AGE)
        assert k.kmemleak.scan_undeactivated(min_age=AGE) == []
        bp.release()
        t.join(10)
        assert not t.is_alive() and not sl.destroy_in_progress(a)
        assert k.kmemleak.quiesce()
        assert k.kmemleak.scan() == []
        assert not k.findings.snapshot(), [f.title for f in k.findings]
