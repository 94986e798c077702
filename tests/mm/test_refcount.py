"""refcount_t (kmemcg.core.refcount): the warnings of include/linux/refcount.h with their
saturation, inc_not_zero, and exact counting under concurrent threads."""

from __future__ import annotations

import threading

import pytest

from kmemcg import Kernel
from kmemcg.core import findings as F
from kmemcg.core.refcount import REFCOUNT_MAX, REFCOUNT_SATURATED, Refcount

JOIN = 20.0


def get_ref(r: Refcount) -> None:
    r.inc()


def put_ref(r: Refcount) -> bool:
    return r.dec_and_test()


def drop_ref(r: Refcount) -> None:
    r.dec()


def only_finding(k: Kernel) -> F.Finding:
    [f] = k.findings.snapshot()
    assert f.kind == F.REFCOUNT
    return f


def test_plain_counting_reports_nothing(kernel: Kernel) -> None:
    r = Refcount(kernel, "obj.refcount")
    assert r.read() == 1
    get_ref(r)
    get_ref(r)
    drop_ref(r)  # 3 -> 2: legal
    assert r.read() == 2 and "obj.refcount=2" in repr(r)
    assert put_ref(r) is False and put_ref(r) is True  # the last put says so
    assert r.read() == 0 and len(kernel.findings) == 0


def test_increment_from_zero_is_a_use_after_free(kernel: Kernel) -> None:
    r = Refcount(kernel, "cache.ref", 0)
    get_ref(r)
    f = only_finding(kernel)
    assert f.title == "refcount_t: addition on 0; use-after-free."
    assert r.read() == REFCOUNT_SATURATED
    assert "------------[ cut here ]------------" in f.text
    assert "at get_ref: cache.ref" in f.text and "---[ end trace ]---" in f.text
    assert "test_increment_from_zero_is_a_use_after_free" in f.text
    assert f.extra == {"refcount": "cache.ref", "event": "addition on 0; use-after-free."}


def test_underflow(kernel: Kernel) -> None:
    r = Refcount(kernel, "under", 1)
    assert put_ref(r) is True
    assert put_ref(r) is False  # 0 -> -1
    f = only_finding(kernel)
    assert f.title == "refcount_t: underflow; use-after-free."
    assert r.read() == REFCOUNT_SATURATED and "at put_ref: under" in f.text


@pytest.mark.parametrize("start", [1, 0])
def test_dec_to_zero_leaks(kernel: Kernel, start: int) -> None:
    """refcount_dec() must not drop the last reference: the kernel WARNs and saturates so
    the object is never freed (old <= 1, 0 included, as __refcount_dec() checks)."""
    r = Refcount(kernel, "leaky", start)
    drop_ref(r)
    f = only_finding(kernel)
    assert f.title == "refcount_t: decrement hit 0; leaking memory."
    assert r.read() == REFCOUNT_SATURATED
    assert put_ref(r) is False and r.read() == REFCOUNT_SATURATED  # never reaches zero


def test_inc_not_zero(kernel: Kernel) -> None:
    r = Refcount(kernel, "tryget", 1)
    assert r.inc_not_zero() is True and r.read() == 2
    assert put_ref(r) is False and put_ref(r) is True
    assert r.inc_not_zero() is False and r.read() == 0  # once dead, stays dead, quietly
    assert len(kernel.findings) == 0


def test_saturation(kernel: Kernel) -> None:
    r = Refcount(kernel, "huge", REFCOUNT_MAX - 1)
    get_ref(r)
    assert r.read() == REFCOUNT_MAX and len(kernel.findings) == 0
    get_ref(r)  # INT_MAX + 1 would be negative: saturate
    f = only_finding(kernel)
    assert f.title == "refcount_t: saturated; leaking memory."
    assert r.read() == REFCOUNT_SATURATED
    # a saturated counter never moves again: no decrement frees, no increment wraps
    drop_ref(r)
    assert put_ref(r) is False and r.inc_not_zero() is True
    assert r.read() == REFCOUNT_SATURATED
    t = Refcount(kernel, "huge_tryget", REFCOUNT_MAX)
    assert t.inc_not_zero() is True and t.read() == REFCOUNT_SATURATED
    assert {x.extra["refcount"] for x in kernel.findings} == {"huge", "huge_tryget"}


def test_same_bug_at_the_same_site_is_one_counted_finding(kernel: Kernel) -> None:
    for _ in range(3):
        get_ref(Refcount(kernel, "twice", 0))
    f = only_finding(kernel)
    assert f.count == 3
    get_ref(Refcount(kernel, "other", 0))  # another refcount: another finding
    assert len(kernel.findings) == 2


def test_concurrent_inc_and_dec_are_exact(kernel: Kernel) -> None:
    k = kernel
    r = Refcount(k, "contended", 1)
    n_threads, n_ops = 8, 3000
    go = threading.Barrier(n_threads)

    def incs() -> None:
        go.wait(JOIN)
        for _ in range(n_ops):
            r.inc()

    def decs() -> None:
        go.wait(JOIN)
        for _ in range(n_ops):
            r.dec()

    def run(fns: list) -> None:
        threads = [k.kthread_run(fn, name=f"{fn.__name__}{i}") for i, fn in enumerate(fns)]
        for t in threads:
            t.join(JOIN)
        assert not any(t.is_alive() for t in threads)

    run([incs] * n_threads)  # all at once: no increment lost
    assert r.read() == 1 + n_threads * n_ops
    run([incs, decs] * (n_threads // 2))  # mixed: never near zero, still exact
    assert r.read() == 1 + n_threads * n_ops
    run([decs] * n_threads)
    assert r.read() == 1 and len(k.findings) == 0


def test_exactly_one_thread_drops_the_last_reference(kernel: Kernel) -> None:
    """Threads take a reference with inc_not_zero() and put it; the owner's put races with
    them. Exactly one dec_and_test() returns True, and no tryget succeeds after it."""
    k = kernel
    r = Refcount(k, "lifetime", 1)
    n_threads, n_ops = 8, 2000
    last: list[str] = []
    late: list[str] = []
    lock = threading.Lock()
    go = threading.Barrier(n_threads + 1)

    def user(i: int) -> None:
        go.wait(JOIN)
        for _ in range(n_ops):
            if not r.inc_not_zero():
                continue
            if put_ref(r):
                with lock:
                    last.append(f"user{i}")
                    if len(last) > 1:
                        late.append(f"user{i}")

    threads = [k.kthread_run(user, i, name=f"user{i}") for i in range(n_threads)]
    go.wait(JOIN)
    if put_ref(r):
        with lock:
            last.append("owner")
    for t in threads:
        t.join(JOIN)
    assert not any(t.is_alive() for t in threads)
    assert len(last) == 1 and late == [] and r.read() == 0
    assert r.inc_not_zero() is False and len(k.findings) == 0
