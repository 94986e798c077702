"""lib/locking-selftest.c's non-IRQ families, and lockdep's other semantics, on the model.

Each selftest family runs twice: in one task, and split across tasks that never run at the same
time (one thread does "AB" and ends, the next does "BA", ...). Lockdep validates lock *classes*
over the whole run, so a split ABBA is still a report; a nest that is split between tasks (AA
with each half in its own task) is not.

Programs are written in a small notation: ``L(A)``/``U(A)`` mutex_lock/unlock, ``W``/``UW``
down_write/up_write, ``R``/``UR`` down_read/up_read, ``I(A)`` mutex_init again, and ``P``: the
step's thread parks there (holding what it holds) while the next steps run, then finishes.
``X1``/``X2`` are two instances of one class ``X``.
"""

from __future__ import annotations

import random
import re
import threading
from collections.abc import Callable

import pytest

from kmemcg import Kernel
from kmemcg.core import findings as F

CIRC = F.CIRCULAR_LOCKING
REC = F.RECURSIVE_LOCKING
BAD = F.BAD_UNLOCK
FREED = F.HELD_LOCK_FREED

_OP = re.compile(r"(UR|UW|L|U|R|W|I)\(([A-Z]+)(\d*)\)|(P)")
WAIT_S = 10.0  # bound on every wait: a broken test fails instead of hanging


def _ops(step: str) -> list[tuple[str, str]]:
    out = []
    for m in _OP.finditer(step):
        out.append(("P", "") if m.group(4) else (m.group(1), m.group(2) + m.group(3)))
    assert "".join(step.split()) == "".join(
        ("P" if op == "P" else f"{op}({n})") for op, n in out), f"bad program {step!r}"
    return out


def _do(op: str, lk) -> None:
    {"L": lambda: lk.lock(), "U": lambda: lk.unlock(), "W": lambda: lk.down_write(),
     "UW": lambda: lk.up_write(), "R": lambda: lk.down_read(), "UR": lambda: lk.up_read(),
     "I": lambda: lk.init()}[op]()


def run_program(k: Kernel, steps: list[str], kind: str, split: bool) -> None:
    """Run ``steps`` in one model thread (``split=False``) or one thread per step, each started
    after the previous one ended or parked at ``P``."""
    locks: dict[str, object] = {}
    for step in steps:
        for op, name in _ops(step):
            if op != "P" and name not in locks:
                cls = name.rstrip("0123456789")
                locks[name] = k.mutex(cls) if kind == "mutex" else k.rwsem(cls)
    if not split:
        steps = [" ".join(steps)]  # and ``P`` does nothing: there is no other task to run
    go = threading.Event()
    threads = []
    for i, step in enumerate(steps):
        yielded = threading.Event()

        def body(step: str = step, yielded: threading.Event = yielded) -> None:
            try:
                for op, name in _ops(step):
                    if op == "P":
                        if split:
                            yielded.set()
                            assert go.wait(WAIT_S)
                    else:
                        _do(op, locks[name])
            finally:
                yielded.set()

        threads.append(k.kthread_run(body, name=f"selftest{i}"))
        assert yielded.wait(WAIT_S), f"step {i} neither ended nor parked"
    go.set()
    for t in threads:
        t.join(WAIT_S)
        assert not t.is_alive()


def kinds(k: Kernel) -> set[str]:
    return {f.kind for f in k.findings}


# (id, lock kind, program in one task, expected, program split over tasks, expected,
#  expected cycle signature for circular reports)
FAMILIES = [
    ("AA-mutex", "mutex",
     ["L(X1) L(X2) U(X2) U(X1)"], {REC},
     ["L(X1) P U(X1)", "L(X2) U(X2)"], set(), None),
    ("AA-rwsem-write", "rwsem",
     ["W(X1) W(X2) UW(X2) UW(X1)"], {REC},
     ["W(X1) P UW(X1)", "W(X2) UW(X2)"], set(), None),
    ("ABBA", "mutex",
     ["L(A) L(B) U(B) U(A)", "L(B) L(A) U(A) U(B)"], {CIRC},
     None, {CIRC}, "A+B"),
    ("ABBA-instances", "mutex",
     ["L(A1) L(B1) U(B1) U(A1)", "L(B2) L(A2) U(A2) U(B2)"], {CIRC},
     None, {CIRC}, "A+B"),
    ("ABBA-rwsem", "rwsem",
     ["R(A) W(B) UW(B) UR(A)", "R(B) W(A) UW(A) UR(B)"], {CIRC},
     None, {CIRC}, "A+B"),
    ("ABBCCA", "mutex",
     ["L(A) L(B) U(B) U(A)", "L(B) L(C) U(C) U(B)", "L(C) L(A) U(A) U(C)"], {CIRC},
     None, {CIRC}, "A+B+C"),
    ("ABCABC", "mutex",
     ["L(A) L(B) U(B) U(A)", "L(C) L(A) U(A) U(C)", "L(B) L(C) U(C) U(B)"], {CIRC},
     None, {CIRC}, "A+B+C"),
    ("ABBCCDDA", "mutex",
     ["L(A) L(B) U(B) U(A)", "L(B) L(C) U(C) U(B)", "L(C) L(D) U(D) U(C)",
      "L(D) L(A) U(A) U(D)"], {CIRC},
     None, {CIRC}, "A+B+C+D"),
    ("ABCDBDDA", "mutex",
     ["L(A) L(B) U(B) U(A)", "L(C) L(D) U(D) U(C)", "L(B) L(D) U(D) U(B)",
      "L(D) L(A) U(A) U(D)"], {CIRC},
     None, {CIRC}, "A+B+D"),
    ("ABCDBCDA", "mutex",
     ["L(A) L(B) U(B) U(A)", "L(C) L(D) U(D) U(C)", "L(B) L(C) U(C) U(B)",
      "L(D) L(A) U(A) U(D)"], {CIRC},
     None, {CIRC}, "A+B+C+D"),
    ("double-unlock", "mutex",
     ["L(A) U(A) U(A)"], {BAD},
     ["L(A) U(A)", "U(A)"], {BAD}, None),
    ("init-held", "mutex",
     ["L(A) I(A) U(A)"], {FREED},
     ["L(A) P U(A)", "I(A)"], {FREED}, None),
    ("init-not-held", "mutex",
     ["L(A) U(A) I(A)"], set(),
     ["L(A) U(A)", "I(A)"], set(), None),
    ("rsem-AA", "rwsem",
     ["R(X1) R(X1) UR(X1) UR(X1)"], {REC},
     ["R(X1) P UR(X1)", "R(X1) UR(X1)"], set(), None),
    ("read-write-same-class", "rwsem",
     ["R(X1) W(X2) UW(X2) UR(X1)"], {REC},
     ["R(X1) P UR(X1)", "W(X2) UW(X2)"], set(), None),
    ("write-read-same-class", "rwsem",
     ["W(X1) R(X2) UR(X2) UW(X1)"], {REC},
     ["W(X1) P UW(X1)", "R(X2) UR(X2)"], set(), None),
    ("bad-unlock-order", "mutex",
     ["L(A) L(B) U(A) U(B)"], set(),
     ["L(A) L(B) U(A) U(B)", "L(A) L(B) U(A) U(B)"], set(), None),
    ("AB-BC-CD-consistent", "mutex",
     ["L(A) L(B) U(B) U(A)", "L(B) L(C) U(C) U(B)", "L(A) L(C) L(D) U(D) U(C) U(A)"], set(),
     None, set(), None),
]

CASES = []
for fid, kind, one, one_exp, split, split_exp, sig in FAMILIES:
    CASES.append(pytest.param(kind, one, False, one_exp, sig, id=f"{fid}-one-task"))
    CASES.append(pytest.param(kind, split or one, True, split_exp, sig, id=f"{fid}-split"))


@pytest.mark.parametrize("kind,steps,split,expected,sig", CASES)
def test_selftest_family(kernel: Kernel, kind: str, steps: list[str], split: bool,
                         expected: set[str], sig: str | None) -> None:
    run_program(kernel, steps, kind, split)
    assert kinds(kernel) == expected, [f.text for f in kernel.findings]
    if sig is not None:
        (f,) = kernel.findings.of_kind(CIRC)
        assert f.signature == sig


# ---------------------------------------------------------------------- nesting annotation
def test_nesting_annotation_suppresses_aa(kernel: Kernel) -> None:
    m1, m2 = kernel.mutex("X"), kernel.mutex("X")
    m1.lock()
    m2.lock(subclass=1)  # mutex_lock_nested(&m2, SINGLE_DEPTH_NESTING)
    m2.unlock()
    m1.unlock()
    assert len(kernel.findings) == 0
    edges = {(e.prev.display, e.next.display) for e in kernel.lockdep.edges()}
    assert edges == {("X", "X/1")}
    proc = kernel.proc_lockdep()
    assert ": X/1\n" in proc and "] X/1\n" in proc
    # Without the annotation the same nest is recursive locking.
    m1.lock()
    m2.lock()
    m2.unlock()
    m1.unlock()
    assert kinds(kernel) == {REC}


def test_subclass_named_in_reports(kernel: Kernel) -> None:
    m1, m2 = kernel.mutex("X"), kernel.mutex("X")
    m1.lock()
    m2.lock(subclass=1)
    m2.unlock()
    m1.unlock()
    m2.lock(subclass=1)  # the inverse nest: X/1 then X
    m1.lock()
    m1.unlock()
    m2.unlock()
    (f,) = kernel.findings
    assert f.kind == CIRC and f.signature == "X+X/1"
    assert "(X/1){" in f.text and "lock(X/1);" in f.text
    # Two locks of one subclass nested: recursive, named with the subclass.
    m1.lock(subclass=2)
    m2.lock(subclass=2)
    m2.unlock()
    m1.unlock()
    (r,) = kernel.findings.of_kind(REC)
    assert "lock(X/2);\n  lock(X/2);" in r.text


def test_rwsem_nested_subclass(kernel: Kernel) -> None:
    s1, s2 = kernel.rwsem("S"), kernel.rwsem("S")
    s1.down_write()
    s2.down_write(subclass=1)
    s2.up_write()
    s1.up_write()
    assert len(kernel.findings) == 0
    assert {(e.prev.display, e.next.display) for e in kernel.lockdep.edges()} == {("S", "S/1")}


def test_subclass_out_of_range(kernel: Kernel) -> None:
    m = kernel.mutex("X")
    with pytest.raises(ValueError):
        m.lock(subclass=8)
    assert not kernel.current().held


# ---------------------------------------------------------------------- trylock
def _edges(k: Kernel) -> set[tuple[str, str]]:
    return {(e.prev.display, e.next.display) for e in k.lockdep.edges()}


def _in_thread(k: Kernel, fn: Callable[[], None]) -> None:
    t = k.kthread_run(fn, name="other")
    t.join(WAIT_S)
    assert not t.is_alive()
    assert t.exception is None


def test_trylock_adds_no_dependency_to_itself(kernel: Kernel) -> None:
    a, b = kernel.mutex("A"), kernel.mutex("B")

    def held_a_trylock_b() -> None:
        a.lock()
        assert b.trylock()
        b.unlock()
        a.unlock()

    def b_then_a() -> None:
        b.lock()
        a.lock()
        a.unlock()
        b.unlock()

    _in_thread(kernel, held_a_trylock_b)
    assert _edges(kernel) == set()
    _in_thread(kernel, b_then_a)
    assert _edges(kernel) == {("B", "A")}
    assert len(kernel.findings) == 0


def test_blocking_lock_after_trylock_depends_on_it(kernel: Kernel) -> None:
    a, b = kernel.mutex("A"), kernel.mutex("B")

    def trylock_a_then_b() -> None:
        assert a.trylock()
        b.lock()
        b.unlock()
        a.unlock()

    def b_then_a() -> None:
        b.lock()
        a.lock()
        a.unlock()
        b.unlock()

    _in_thread(kernel, trylock_a_then_b)
    assert _edges(kernel) == {("A", "B")}
    _in_thread(kernel, b_then_a)
    assert kinds(kernel) == {CIRC}


def test_edges_reach_below_a_trylock(kernel: Kernel) -> None:
    """check_prevs_add() walks down past trylocks to the first blocking held lock."""
    a, t, b = kernel.mutex("A"), kernel.mutex("T"), kernel.mutex("B")
    a.lock()
    assert t.trylock()
    b.lock()
    for m in (b, t, a):
        m.unlock()
    assert _edges(kernel) == {("A", "B"), ("T", "B")}


def test_failed_trylock_records_nothing(kernel: Kernel) -> None:
    a, b, c = kernel.mutex("A"), kernel.mutex("B"), kernel.mutex("C")
    holding, done = threading.Event(), threading.Event()

    def holder() -> None:
        b.lock()
        holding.set()
        assert done.wait(WAIT_S)
        b.unlock()

    t = kernel.kthread_run(holder, name="holder")
    try:
        assert holding.wait(WAIT_S)
        a.lock()
        assert not b.trylock()
        assert [e[1].display for e in kernel.current().held] == ["A"]
        c.lock()
        c.unlock()
        assert not a.trylock()  # the task's own lock: fails, no AA report either
        a.unlock()
    finally:
        done.set()
        t.join(WAIT_S)
    assert _edges(kernel) == {("A", "C")}
    assert len(kernel.findings) == 0
    assert kernel.current().held == []


def test_trylock_of_held_class_is_recursive(kernel: Kernel) -> None:
    """check_deadlock() looks at trylocked held locks too: a blocking X2 under a trylocked X1."""
    x1, x2 = kernel.mutex("X"), kernel.mutex("X")
    assert x1.trylock()
    x2.lock()
    x2.unlock()
    x1.unlock()
    assert kinds(kernel) == {REC}


# ---------------------------------------------------------------------- out-of-order unlock
def test_out_of_order_unlock_revalidates_locks_above(kernel: Kernel) -> None:
    a, b, c = kernel.mutex("A"), kernel.mutex("B"), kernel.mutex("C")
    a.lock()
    b.lock()
    c.lock()
    assert _edges(kernel) == {("A", "B"), ("B", "C")}
    b.unlock()  # reacquire_held_locks(): C re-acquired on top of A
    assert _edges(kernel) == {("A", "B"), ("B", "C"), ("A", "C")}
    task = kernel.current()
    assert [e[1].display for e in task.held] == ["A", "C"]
    c.unlock()
    a.unlock()
    assert task.held == []
    assert len(kernel.findings) == 0
    chains = kernel.lockdep.nr_chains()
    a.lock()  # the chain [A] is known: nothing new to validate
    a.unlock()
    assert kernel.lockdep.nr_chains() == chains


def test_out_of_order_unlock_can_close_a_cycle(kernel: Kernel) -> None:
    """The re-acquisition is validated like any other: C -> A recorded elsewhere, then A, B, C
    held and B dropped: the new A -> C edge closes the cycle."""
    a, b, c = kernel.mutex("A"), kernel.mutex("B"), kernel.mutex("C")

    def c_then_a() -> None:
        c.lock()
        a.lock()
        a.unlock()
        c.unlock()

    _in_thread(kernel, c_then_a)
    a.lock()
    b.lock()
    assert len(kernel.findings) == 0
    c.lock()  # A -> B -> C against C -> A: already a cycle of three
    assert kinds(kernel) == {CIRC}
    assert kernel.findings[0].signature == "A+B+C"
    b.unlock()  # A -> C against C -> A: a second cycle, of two
    c.unlock()
    a.unlock()
    assert sorted(f.signature for f in kernel.findings) == ["A+B+C", "A+C"]


# ---------------------------------------------------------------------- many threads
def test_64_threads_consistent_order_no_finding(kernel: Kernel) -> None:
    classes = [[kernel.mutex(c) for _ in range(6)] for c in "PQRS"]
    n_threads = 64
    start = threading.Barrier(n_threads + 1)
    stop = threading.Event()
    counts = [0] * n_threads

    def worker(i: int) -> None:
        rnd = random.Random(i)
        start.wait(WAIT_S)
        n = 0
        while not stop.is_set():
            nest = [rnd.choice(insts) for insts in classes if rnd.random() < 0.6]
            for m in nest:
                m.lock()
            if nest and rnd.random() < 0.3:  # out-of-order unlock of one lock
                nest.pop(rnd.randrange(len(nest))).unlock()
            for m in reversed(nest):
                m.unlock()
            n += len(nest)
            counts[i] = n

    threads = [kernel.kthread_run(worker, i, name=f"w{i}") for i in range(n_threads)]
    start.wait(WAIT_S)
    stop.wait(2.0)  # run length, not a timing assertion
    stop.set()
    for t in threads:
        t.join(WAIT_S)
    assert not any(t.is_alive() for t in threads)
    assert [t.exception for t in threads if t.exception] == []
    assert kernel.findings.snapshot() == []
    total = sum(counts)
    print(f"\n64 threads: {total} acquisitions, {kernel.lockdep.nr_chains()} chains, "
          f"{kernel.lockdep.nr_edges} edges")
    assert total >= 64 * 20
    assert all(counts)
    edges = _edges(kernel)
    assert edges and all("PQRS".index(a) < "PQRS".index(b) for a, b in edges)


# ---------------------------------------------------------------------- dedup / counting
def _nest(*locks) -> None:
    for m in locks:
        m.lock()
    for m in reversed(locks):
        m.unlock()


def test_same_cycle_is_one_counted_finding(kernel: Kernel) -> None:
    a, b, c, d = (kernel.mutex(n) for n in "ABCD")
    n = 5
    for _ in range(n):
        _in_thread(kernel, lambda: _nest(a, b))
        _in_thread(kernel, lambda: _nest(b, a))
    (f,) = kernel.findings
    assert f.kind == CIRC and f.signature == "A+B"
    assert f.count >= n
    before = f.count
    # The same cycle reached through a new chain (X held below) is the same finding, counted.
    x = kernel.mutex("X")
    _nest(x, b, a)
    assert len(kernel.findings) == 1
    assert f.count == before + 1
    # Another cycle: a second finding.
    _nest(c, d)
    _nest(d, c)
    assert [g.signature for g in kernel.findings] == ["A+B", "C+D"]
    assert kernel.findings[1].count == 1
    d_ = f.to_dict()
    assert d_["count"] == f.count and d_["signature"] == "A+B"


def test_signature_is_the_set_of_classes(kernel: Kernel) -> None:
    """The cycle A -> B -> C -> A closed at different edges gives the one signature."""
    a, b, c = (kernel.mutex(n) for n in "ABC")
    _nest(a, b)
    _nest(b, c)
    _nest(c, a)
    k2 = Kernel(name="other")
    try:
        a2, b2, c2 = (k2.mutex(n) for n in "ABC")
        _nest(c2, a2)
        _nest(b2, c2)
        _nest(a2, b2)
        assert [f.signature for f in kernel.findings] == [f.signature for f in k2.findings] \
            == ["A+B+C"]
    finally:
        k2.shutdown()


# ---------------------------------------------------------------------- isolation
def test_two_kernels_are_isolated() -> None:
    k1, k2 = Kernel(name="k1"), Kernel(name="k2")
    try:
        a1, b1 = k1.mutex("A"), k1.mutex("B")
        a2, b2 = k2.mutex("A"), k2.mutex("B")
        _nest(a1, b1)
        _nest(b2, a2)  # B -> A in the other kernel: no cycle anywhere
        assert len(k1.findings) == 0 and len(k2.findings) == 0
        assert _edges(k1) == {("A", "B")} and _edges(k2) == {("B", "A")}
        _nest(b1, a1)  # the cycle in k1 only
        assert kinds(k1) == {CIRC} and len(k2.findings) == 0
        # One thread holding locks of both kernels: each kernel sees only its own.
        a1.lock()
        a2.lock()
        assert [e[1].display for e in k1.current().held] == ["A"]
        assert [e[1].display for e in k2.current().held] == ["A"]
        a1.unlock()
        a2.unlock()
        assert len(k2.findings) == 0
    finally:
        k1.shutdown()
        k2.shutdown()
