"""RCU misuse: the "WARNING: suspicious RCU usage" family (PROVE_RCU)."""

from __future__ import annotations

import os
import threading

from kmemcg import Kernel
from kmemcg.core.findings import Finding

from . import F, Reader, Runner, unexpected

HERE = os.path.basename(__file__)


def rcu_findings(k: Kernel, key: str) -> list[Finding]:
    return [f for f in k.findings.of_kind(F.SUSPICIOUS_RCU) if f.extra.get("rcu") == key]


def test_synchronize_inside_reader_is_reported_and_returns(kernel: Kernel) -> None:
    a = Reader(kernel, "other_reader")  # a pre-existing reader: waiting would also hang
    with kernel.rcu.read():
        kernel.rcu.synchronize()  # must return: a grace period cannot wait for its caller
    (f,) = rcu_findings(kernel, "illegal-synchronize")
    assert f.title == "WARNING: suspicious RCU usage"
    assert "Illegal synchronize_rcu() in RCU read-side critical section" in f.text
    assert f"{HERE}:" in f.text and "(rcu_read_lock){....}-{1:2}" in f.text
    assert "stack backtrace:" in f.text
    a.exit_section()
    assert unexpected(kernel, F.SUSPICIOUS_RCU) == []


def test_barrier_inside_reader_is_reported_and_returns(kernel: Kernel) -> None:
    kernel.rcu.call(lambda: None)
    with kernel.rcu.read():
        kernel.rcu.barrier()
    (f,) = rcu_findings(kernel, "illegal-barrier")
    assert "Illegal rcu_barrier() in RCU read-side critical section" in f.text
    assert not kernel.rcu.barrier_mutex.is_locked()


def test_same_misuse_at_same_site_is_one_finding_counted(kernel: Kernel) -> None:
    for _ in range(3):
        with kernel.rcu.read():
            kernel.rcu.synchronize()
    (f,) = rcu_findings(kernel, "illegal-synchronize")
    assert f.count == 3


def test_unbalanced_read_unlock(kernel: Kernel) -> None:
    kernel.rcu.read_unlock()
    (f,) = rcu_findings(kernel, "unbalanced-unlock")
    assert "rcu_read_unlock() without matching rcu_read_lock()" in f.text
    t = kernel.current()
    assert t.rcu_nesting == 0
    with kernel.rcu.read():  # the read side still works
        assert t.rcu_nesting == 1
    kernel.rcu.synchronize()
    assert unexpected(kernel, F.SUSPICIOUS_RCU) == []


def test_blocking_lock_inside_reader_is_reported(kernel: Kernel) -> None:
    m = kernel.mutex("some_mutex")
    sem = kernel.rwsem("some_rwsem")
    with kernel.rcu.read():
        with m:
            pass
        sem.down_read()
        sem.up_read()
    texts = [f.text for f in kernel.findings.of_kind(F.SUSPICIOUS_RCU)]
    assert any("some_mutex: Illegal context switch in RCU read-side critical section" in t
               for t in texts)
    assert any("some_rwsem: Illegal context switch" in t for t in texts)
    with m:  # outside a reader: fine
        pass
    assert len(kernel.findings.of_kind(F.SUSPICIOUS_RCU)) == 2


def test_exit_inside_reader_is_reported_and_unblocks_grace_periods(kernel: Kernel) -> None:
    inside = threading.Event()
    proceed = threading.Event()

    def leaky() -> None:
        kernel.rcu.read_lock()
        inside.set()
        assert proceed.wait(10)
        # returns without rcu_read_unlock()

    r = Runner(kernel, leaky, "leaky_reader")
    assert inside.wait(10)
    s = Runner(kernel, kernel.rcu.synchronize, "synchronizer")  # waits for the leaky reader
    assert not s.done.wait(0.1)
    proceed.set()
    assert s.done.wait(10) and s.error is None  # the exit ended the section
    r.thread.join(10)
    (f,) = rcu_findings(kernel, "exit-in-reader")
    assert "exited inside an RCU read-side critical section" in f.text
    assert f.thread == r.task.name
    assert not kernel.rcu.is_registered(r.task)
    kernel.rcu.synchronize()
    # lockdep also sees rcu_read_lock still held at exit, as the kernel's would
    assert unexpected(kernel, F.SUSPICIOUS_RCU, F.LOCK_HELD_AT_EXIT) == []


def test_dereference_check(kernel: Kernel) -> None:
    m = kernel.mutex("update_lock")
    p = kernel.rcu.pointer("obj", "ptr")
    with kernel.rcu.read():
        assert p.dereference() == "obj"  # inside a reader: fine
    assert p.dereference(check=True) == "obj"  # caller says it is safe
    with m:
        assert p.dereference(check=m) == "obj"  # lockdep_is_held(update_lock)
        assert p.protected(m) == "obj"
    assert rcu_findings(kernel, "dereference") == []
    assert p.dereference() == "obj"  # outside a reader, no condition
    (f,) = rcu_findings(kernel, "dereference")
    assert "suspicious rcu_dereference_check() usage!" in f.text
    assert kernel.rcu.dereference(p, check=m) == "obj"  # lock not held: another site
    assert len(rcu_findings(kernel, "dereference")) == 2
    p.protected(m)
    (g,) = rcu_findings(kernel, "dereference-protected")
    assert "suspicious rcu_dereference_protected() usage!" in g.text


def test_dereference_check_needs_lockdep() -> None:
    k = Kernel(name="nolockdep", lockdep=False)
    try:
        p = k.rcu.pointer(1)
        assert p.dereference() == 1
        assert k.findings.of_kind(F.SUSPICIOUS_RCU) == []
    finally:
        k.shutdown()


def test_barrier_from_callback_is_reported_not_deadlocked(kernel: Kernel) -> None:
    ran = threading.Event()

    def cb() -> None:
        kernel.rcu.barrier()
        ran.set()

    kernel.rcu.call(cb)
    kernel.rcu.barrier()
    assert ran.is_set()
    (f,) = rcu_findings(kernel, "barrier-in-callback")
    assert "Illegal rcu_barrier() from an RCU callback" in f.text
