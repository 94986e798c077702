"""FindingLog: de-duplication by (kind, signature), counts, listeners, loguru logging."""

from __future__ import annotations

import threading

import pytest
from loguru import logger

from kmemcg.core import findings as F
from kmemcg.core.findings import FindingLog


@pytest.fixture
def log() -> FindingLog:
    import time
    return FindingLog(time.monotonic(), "unit")


def test_dedup_by_kind_and_signature_counts(log: FindingLog) -> None:
    a = log.report(F.BAD_UNLOCK, "t1", "sig", "text one", thread="x/1")
    b = log.report(F.BAD_UNLOCK, "t1 again", "sig", "text two", thread="y/2")
    assert a is b
    assert a.count == 2
    # the first occurrence's text and thread are kept
    assert a.text == "text one"
    assert a.thread == "x/1"
    # same signature, other kind: a distinct finding
    c = log.report(F.ASSERT_HELD, "t2", "sig", "text", thread="x/1")
    assert c is not a
    assert len(log) == 2
    assert [f.kind for f in log] == [F.BAD_UNLOCK, F.ASSERT_HELD]
    log.recur(a)
    assert a.count == 3


def test_text_callable_built_only_once(log: FindingLog) -> None:
    calls = []

    def text() -> str:
        calls.append(1)
        return "built"

    for _ in range(5):
        f = log.report(F.REFCOUNT, "title", "s", text)
    assert calls == [1]
    assert f.text == "built" and f.count == 5


def test_first_seen_and_to_dict(log: FindingLog) -> None:
    f = log.report(F.HUNG_TASK, "INFO: task blocked", "hung:x", "body", thread="w/3",
                   extra={"task": "w/3"})
    assert f.time >= 0.0
    d = f.to_dict()
    assert set(d) >= {"kind", "title", "signature", "count", "thread", "first_seen_s", "text"}
    assert d["kind"] == F.HUNG_TASK
    assert d["title"] == "INFO: task blocked"
    assert d["signature"] == "hung:x"
    assert d["count"] == 1
    assert d["thread"] == "w/3"
    assert d["text"] == "body"
    assert d["first_seen_s"] == round(f.time, 6)
    assert d["extra"] == {"task": "w/3"}
    # no extra -> no "extra" key
    g = log.report(F.HUNG_TASK, "t", "other", "b")
    assert "extra" not in g.to_dict()


def test_listeners_called_once_per_new_finding(log: FindingLog) -> None:
    seen = []
    log.add_listener(seen.append)
    a = log.report(F.REFCOUNT, "t", "one", "x")
    log.report(F.REFCOUNT, "t", "one", "x")
    b = log.report(F.REFCOUNT, "t", "two", "x")
    assert seen == [a, b]


def test_snapshot_of_kind_getitem_clear(log: FindingLog) -> None:
    a = log.report(F.REFCOUNT, "t", "1", "x")
    b = log.report(F.HUNG_TASK, "t", "2", "x")
    c = log.report(F.REFCOUNT, "t", "3", "x")
    snap = log.snapshot()
    assert snap == [a, b, c]
    snap.clear()  # a copy: the log is unaffected
    assert len(log) == 3
    assert log[1] is b
    assert log.of_kind(F.REFCOUNT) == [a, c]
    assert log.of_kind(F.REFCOUNT, F.HUNG_TASK) == [a, b, c]
    assert log.of_kind(F.BAD_UNLOCK) == []
    log.clear()
    assert len(log) == 0 and log.snapshot() == []
    # after clear the same signature is new again
    d = log.report(F.REFCOUNT, "t", "1", "x")
    assert d is not a and d.count == 1


def test_findings_are_logged_through_loguru(log: FindingLog) -> None:
    """The title at WARNING (a run's live log), the full text at TRACE (dmesg)."""
    records = []
    sink = logger.add(lambda m: records.append(m.record), level="TRACE", format="{message}")
    try:
        log.report(F.REFCOUNT, "refcount_t: underflow; use-after-free.", "rc:x",
                   "the {full} text", thread="t/1")
        log.report(F.REFCOUNT, "refcount_t: underflow; use-after-free.", "rc:x", "again")
    finally:
        logger.remove(sink)
    mine = [r for r in records if r["extra"].get("kernel") == "unit"]
    # a recurrence is counted, not logged
    assert [r["level"].name for r in mine] == ["WARNING", "TRACE"]
    warn, debug = mine
    assert "refcount_t: underflow" in warn["message"]
    assert F.REFCOUNT in warn["message"] and "rc:x" in warn["message"]
    assert debug["message"] == "the {full} text"  # braces in a report are not format fields
    assert all(r["extra"]["kind"] == F.REFCOUNT for r in mine)
    assert "again" not in "".join(r["message"] for r in records)


def test_concurrent_reports_of_one_signature_make_one_finding(log: FindingLog) -> None:
    n_threads, per_thread = 4, 200
    barrier = threading.Barrier(n_threads)

    def worker() -> None:
        barrier.wait(timeout=5)
        for _ in range(per_thread):
            log.report(F.REFCOUNT, "t", "same", lambda: "x")

    ts = [threading.Thread(target=worker) for _ in range(n_threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(10)
    assert not any(t.is_alive() for t in ts)
    assert len(log) == 1
    assert log[0].count == n_threads * per_thread


def test_kernel_findings_taint_release_line(kernel) -> None:
    assert "Not tainted" in kernel.release_line()
    kernel.findings.report(F.REFCOUNT, "t", "s", "x")
    assert "Tainted" in kernel.release_line() and "Not tainted" not in kernel.release_line()


def test_raising_listener_does_not_unwind_into_the_reporter(log: FindingLog) -> None:
    seen = []

    def bad(_f) -> None:
        raise RuntimeError("listener bug")

    log.add_listener(bad)
    log.add_listener(seen.append)
    errors = []
    sink = logger.add(lambda m: errors.append(m.record["message"]), level="ERROR")
    try:
        f = log.report(F.REFCOUNT, "t", "s", "x")
    finally:
        logger.remove(sink)
    assert seen == [f]  # the later listener still ran
    assert any("listener" in e for e in errors)


def test_raising_listener_leaves_lockdep_consistent(kernel) -> None:
    def bad(_f) -> None:
        raise RuntimeError("listener bug")

    kernel.findings.add_listener(bad)
    a, b = kernel.mutex("A"), kernel.mutex("B")
    sink = logger.add(lambda _m: None, level="ERROR")
    try:
        with a, b:
            pass
        with b, a:  # the circular report calls the listener from inside lockdep
            assert a.is_held() and b.is_held()
    finally:
        logger.remove(sink)
    assert kernel.current().held == []
    assert [f.kind for f in kernel.findings] == [F.CIRCULAR_LOCKING]
