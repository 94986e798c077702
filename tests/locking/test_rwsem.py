"""struct rw_semaphore: shared readers, exclusive writers, writer preference, and the lockdep
checks (bad unlock, non-recursive read side)."""

from __future__ import annotations

import threading

from kmemcg import Instrument, Kernel
from kmemcg.core import findings as F
from kmemcg.testing import wait_until


def test_context_managers_and_is_held(kernel) -> None:
    s = kernel.rwsem("sem")
    me = kernel.current()
    with s.read():
        assert s.is_held() and not s.is_held_write()
        assert [e[0] for e in me.held] == [s]
    assert not s.is_held()
    with s.write():
        assert s.is_held() and s.is_held_write()
    assert not s.is_held() and me.held == []
    s.down_read()
    s.up_read()
    s.down_write()
    s.up_write()
    assert len(kernel.findings) == 0


def test_many_concurrent_readers(kernel) -> None:
    """All readers are inside the read section at once: the barrier inside it only opens
    when every one of them has arrived."""
    s = kernel.rwsem("sem")
    n = 4
    inside = threading.Barrier(n)

    def reader() -> int:
        with s.read():
            return inside.wait(5)

    ts = [kernel.kthread_run(reader, name=f"r{i}") for i in range(n)]
    for t in ts:
        t.join(10)
    assert not any(t.is_alive() for t in ts)
    assert sorted(t.result for t in ts) == list(range(n))  # nobody broke the barrier
    assert len(kernel.findings) == 0


def test_writer_excludes_readers_and_writers(kernel) -> None:
    s = kernel.rwsem("sem")
    order: list[str] = []
    bp_r = kernel.breakpoints.add("lock_contended:sem", thread="reader")
    bp_w = kernel.breakpoints.add("lock_contended:sem", thread="writer2")

    def reader() -> None:
        with s.read():
            order.append("reader")

    def writer2() -> None:
        with s.write():
            order.append("writer2")

    s.down_write()
    tr = kernel.kthread_run(reader, name="reader")
    tw = kernel.kthread_run(writer2, name="writer2")
    assert bp_r.wait(5) is tr.task  # the reader found it busy
    assert bp_w.wait(5) is tw.task  # so did the second writer
    bp_r.release()
    bp_w.release()
    # trylocks from another thread fail while the writer holds it
    tries = kernel.kthread_run(lambda: (s.down_read_trylock(), s.down_write_trylock()),
                               name="trier")
    tries.join(5)
    assert tries.result == (False, False)
    assert order == []
    order.append("writer1")
    s.up_write()
    tr.join(5)
    tw.join(5)
    assert not tr.is_alive() and not tw.is_alive()
    assert order[0] == "writer1" and sorted(order[1:]) == ["reader", "writer2"]
    assert len(kernel.findings) == 0


def test_readers_exclude_writer(kernel) -> None:
    s = kernel.rwsem("sem")
    got = threading.Event()
    bp = kernel.breakpoints.add("lock_contended:sem", thread="writer")

    def writer() -> None:
        with s.write():
            got.set()

    s.down_read()
    t = kernel.kthread_run(writer, name="writer")
    bp.wait(5)
    bp.release()
    assert wait_until(lambda: t.task.blocked_on is s)
    assert not got.is_set()
    s.up_read()
    assert got.wait(5)
    t.join(5)


def test_waiting_writer_blocks_new_readers(kernel) -> None:
    """Writer preference: with reader R1 inside and writer W queued, a new reader R2 queues
    behind W (it does not join R1), and W gets the rwsem before R2."""
    s = kernel.rwsem("sem")
    order: list[str] = []
    r1_in, r1_go = threading.Event(), threading.Event()

    def r1() -> None:
        with s.read():
            r1_in.set()
            r1_go.wait(5)

    def w() -> None:
        with s.write():
            order.append("writer")

    def r2() -> None:
        with s.read():
            order.append("reader2")

    t1 = kernel.kthread_run(r1, name="r1")
    assert r1_in.wait(5)
    bp_w = kernel.breakpoints.add("lock_contended:sem", thread="w")
    tw = kernel.kthread_run(w, name="w")
    bp_w.wait(5)  # W is queued: it counts as a waiting writer from here on
    bp_w.release()
    # a new reader cannot get in although only a reader holds the rwsem
    trier = kernel.kthread_run(s.down_read_trylock, name="trier")
    trier.join(5)
    assert trier.result is False
    bp_r2 = kernel.breakpoints.add("lock_contended:sem", thread="r2")
    t2 = kernel.kthread_run(r2, name="r2")
    assert bp_r2.wait(5) is t2.task  # R2 blocked behind the waiting writer
    bp_r2.release()
    assert order == []
    r1_go.set()
    for t in (t1, tw, t2):
        t.join(5)
        assert not t.is_alive()
    assert order == ["writer", "reader2"]
    assert len(kernel.findings) == 0


def test_trylocks(kernel) -> None:
    s = kernel.rwsem("sem")
    assert s.down_read_trylock() is True
    assert s.down_write_trylock() is False  # a reader (this task) holds it
    other = kernel.kthread_run(lambda: (s.down_read_trylock(), s.down_write_trylock(),
                                        s.up_read()), name="other")
    other.join(5)
    assert other.result[:2] == (True, False)  # readers share; the writer is refused
    s.up_read()
    assert s.down_write_trylock() is True
    assert s.is_held_write()
    assert s.down_read_trylock() is False
    assert s.down_write_trylock() is False
    s.up_write()
    assert not s.is_held()
    assert len(kernel.findings) == 0


def test_up_read_without_down_read_is_bad_unlock(kernel) -> None:
    s = kernel.rwsem("sem")
    s.up_read()
    [f] = kernel.findings.of_kind(F.BAD_UNLOCK)
    assert "sem" in f.text and "but there are no more locks to release!" in f.text
    assert not s.is_held()
    # the rwsem still works
    with s.write():
        pass


def test_up_write_by_a_reader_is_bad_unlock_and_keeps_state(kernel) -> None:
    s = kernel.rwsem("sem")
    with s.read():
        s.up_write()
        assert s.is_held() and not s.is_held_write()
    assert [f.kind for f in kernel.findings] == [F.BAD_UNLOCK]
    assert not s.is_held()


def test_up_read_by_another_thread_is_bad_unlock(kernel) -> None:
    s = kernel.rwsem("sem")
    s.down_read()
    t = kernel.kthread_run(s.up_read, name="intruder")
    t.join(5)
    [f] = kernel.findings.of_kind(F.BAD_UNLOCK)
    assert f.thread == t.task.name
    assert s.is_held()
    s.up_read()


def test_read_twice_on_one_instance_is_recursive_locking(kernel) -> None:
    s = kernel.rwsem("sem")
    s.down_read()
    s.down_read()  # no writer waits: it does not block, but it could deadlock
    s.up_read()
    s.up_read()
    [f] = kernel.findings.of_kind(F.RECURSIVE_LOCKING)
    assert "possible recursive locking detected" in f.text
    assert "sem" in f.text
    assert not s.is_held()


def test_read_of_two_instances_of_one_class_is_recursive_locking(kernel) -> None:
    x1, x2 = kernel.rwsem("X"), kernel.rwsem("X")
    with x1.read(), x2.read():
        pass
    assert [f.kind for f in kernel.findings] == [F.RECURSIVE_LOCKING]
    # with a nesting annotation it is fine
    kernel.findings.clear()
    with x1.read(), x2.read(1):
        pass
    assert len(kernel.findings) == 0


def test_recursive_read_with_a_waiting_writer_really_deadlocks() -> None:
    """Why lockdep reports down_read(X); down_read(X): a writer arriving in between makes the
    second down_read wait for the writer, which waits for the first."""
    k = Kernel(name="rsem_aa")
    s = k.rwsem("sem")
    first_in, go_again = threading.Event(), threading.Event()

    def reader() -> None:
        with s.read():
            first_in.set()
            go_again.wait(5)
            with s.read():
                pass

    def writer() -> None:
        with s.write():
            pass

    try:
        tr = k.kthread_run(reader, name="reader")
        assert first_in.wait(5)
        bp = k.breakpoints.add("lock_contended:sem", thread="writer")
        tw = k.kthread_run(writer, name="writer")
        bp.wait(5)
        bp.release()
        go_again.set()
        assert wait_until(lambda: bool(k.findings.of_kind(F.REAL_DEADLOCK)))
        assert k.deadlocked
        assert k.findings.of_kind(F.RECURSIVE_LOCKING)
        [dl] = k.findings.of_kind(F.REAL_DEADLOCK)
        assert "reader" in dl.text
    finally:
        stuck = k.shutdown(timeout=5)
    assert stuck == []
    assert not tr.is_alive() and not tw.is_alive()
    assert s._wwait == 0 and not s._readers and s._writer is None  # fully unwound


def test_destroy_held_rwsem(kernel) -> None:
    s = kernel.rwsem("sem")
    s.destroy()
    assert len(kernel.findings) == 0
    with s.read():
        s.destroy()
    assert [f.kind for f in kernel.findings] == [F.HELD_LOCK_FREED]


def test_rwsem_without_lockdep() -> None:
    with Kernel(name="nolockdep", lockdep=False) as k:
        s = k.rwsem("sem")
        s.down_read()
        s.down_read()  # recursive read: not checked
        s.up_read()
        s.up_read()
        with s.write():
            assert s.is_held_write()
        assert k.current().held == []
        assert len(k.findings) == 0


def test_a_leaving_writer_hands_the_rwsem_to_the_readers_that_wait(kernel):
    """The kernel's wait queue: when a writer leaves, the readers that were waiting go before
    a writer that queued after them. Without the hand-off, writer preference would keep the
    reader out for as long as writers keep coming (a writer retaking it at once starved
    readers)."""
    k = kernel
    s = k.rwsem("fair_rwsem")
    contended = {}

    class Seen(Instrument):
        def on_event(self, point, label, task, obj):
            if point == "lock_contended" and label == "fair_rwsem":
                contended[task.comm].set()

    contended["reader"] = threading.Event()
    contended["writer2"] = threading.Event()
    k.add_instrument(Seen())
    order = []

    def reader():
        s.down_read()
        order.append("reader")
        s.up_read()

    def writer2():
        s.down_write()
        order.append("writer2")
        s.up_write()

    s.down_write()
    r = k.kthread_run(reader, name="reader")
    assert contended["reader"].wait(10)
    w = k.kthread_run(writer2, name="writer2")
    assert contended["writer2"].wait(10)  # both queued: the reader first
    s.up_write()
    r.join(10)
    w.join(10)
    assert order == ["reader", "writer2"]
    assert not k.findings.snapshot()
