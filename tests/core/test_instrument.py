"""The instrumentation point (``Kernel.event`` / ``Kernel.window``), instruments, and the test
breakpoints built on it."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from loguru import logger

from kmemcg import Instrument, Kernel, Task
from kmemcg.core.instrument import Perturb


class Recorder(Instrument):
    """Records (point, label, task, obj); optionally signals when a given point is seen."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, Task, Any]] = []
        self._lock = threading.Lock()
        self.contended = threading.Event()

    def on_event(self, point: str, label: str, task: Task, obj: Any) -> None:
        with self._lock:
            self.events.append((point, label, task, obj))
        if point == "lock_contended":
            self.contended.set()

    def of(self, task: Task) -> list[tuple[str, str]]:
        with self._lock:
            return [(p, lbl) for p, lbl, t, _ in self.events if t is task]


class Raiser(Instrument):
    def __init__(self) -> None:
        self.calls = 0

    def on_event(self, point: str, label: str, task: Task, obj: Any) -> None:
        self.calls += 1
        raise RuntimeError("instrument bug")


# ----------------------------------------------------------------------------- instruments

def test_no_instrument_means_no_dispatcher(kernel) -> None:
    assert kernel._dispatch is None
    kernel.window("nobody_listens")  # a no-op, no error
    kernel.event("lock_acquire", object())
    rec = Recorder()
    kernel.add_instrument(rec)
    assert kernel._dispatch is not None
    kernel.remove_instrument(rec)
    assert kernel._dispatch is None
    kernel.remove_instrument(rec)  # removing twice is harmless
    assert kernel._dispatch is None


def test_mutex_events_with_class_labels(kernel) -> None:
    rec = Recorder()
    kernel.add_instrument(rec)
    m = kernel.mutex("slab_mutex")
    me = kernel.current()
    with m:
        pass
    assert rec.of(me) == [("lock_acquire", "slab_mutex"), ("lock_acquired", "slab_mutex"),
                          ("lock_release", "slab_mutex")]
    assert all(obj is m for _, _, _, obj in rec.events)


def test_mutex_trylock_events(kernel) -> None:
    rec = Recorder()
    kernel.add_instrument(rec)
    m = kernel.mutex("try_me")
    me = kernel.current()
    assert m.trylock()
    assert rec.of(me) == [("lock_acquire", "try_me"), ("lock_acquired", "try_me")]
    m.unlock()
    before = len(rec.of(me))
    held = threading.Event()
    done = threading.Event()

    def holder() -> None:
        with m:
            held.set()
            done.wait(5)

    t = kernel.kthread_run(holder, name="holder")
    assert held.wait(5)
    assert not m.trylock()
    done.set()
    t.join(5)
    # the failed trylock made no event of the calling task
    assert rec.of(me)[before:] == []


def test_contended_mutex_events(kernel) -> None:
    rec = Recorder()
    kernel.add_instrument(rec)
    m = kernel.mutex("contended_mutex")

    def taker() -> None:
        m.lock()
        m.unlock()

    m.lock()
    t = kernel.kthread_run(taker, name="taker")
    assert rec.contended.wait(5)
    m.unlock()
    t.join(5)
    assert not t.is_alive()
    assert rec.of(t.task) == [("lock_acquire", "contended_mutex"),
                              ("lock_contended", "contended_mutex"),
                              ("lock_acquired", "contended_mutex"),
                              ("lock_release", "contended_mutex")]


def test_rwsem_events(kernel) -> None:
    rec = Recorder()
    kernel.add_instrument(rec)
    s = kernel.rwsem("mmap_sem")
    me = kernel.current()
    with s.read():
        pass
    with s.write():
        pass
    assert s.down_read_trylock()
    s.up_read()
    names = [p for p, _ in rec.of(me)]
    assert names == ["lock_acquire", "lock_acquired", "lock_release"] * 3
    assert {lbl for _, lbl in rec.of(me)} == {"mmap_sem"}


def test_window_and_custom_events(kernel) -> None:
    rec = Recorder()
    kernel.add_instrument(rec)
    kernel.window("kmem_cache_destroy:unlocked")
    kernel.event("custom_point", "some_label")
    me = kernel.current()
    assert rec.of(me) == [("window", "kmem_cache_destroy:unlocked"),
                          ("custom_point", "some_label")]
    assert rec.events[0][3] == "kmem_cache_destroy:unlocked"


def test_events_are_delivered_in_the_thread_that_makes_them(kernel) -> None:
    seen = []

    class ThreadRec(Instrument):
        def on_event(self, point: str, label: str, task: Task, obj: Any) -> None:
            seen.append((threading.current_thread().name, task.comm))

    kernel.add_instrument(ThreadRec())
    t = kernel.kthread_run(lambda: kernel.window("w"), name="windowed")
    t.join(5)
    assert seen == [("windowed", "windowed")]


def test_raising_instrument_is_removed_and_model_keeps_working(kernel) -> None:
    bad, rec = Raiser(), Recorder()
    kernel.add_instrument(bad)
    kernel.add_instrument(rec)
    messages = []
    sink = logger.add(lambda msg: messages.append(msg.record["message"]), level="ERROR")
    try:
        kernel.window("first")
    finally:
        logger.remove(sink)
    assert bad.calls == 1
    # the event still reached the instrument behind the raising one
    assert rec.of(kernel.current()) == [("window", "first")]
    assert any("raised; removing it" in m for m in messages)
    assert bad not in kernel._instruments
    # the model keeps working, and the raising instrument stays out even after a rebuild
    m = kernel.mutex("still_works")
    with m:
        assert m.is_held()
    kernel.add_instrument(Recorder())
    kernel.window("second")
    assert bad.calls == 1
    assert ("window", "second") in rec.of(kernel.current())


def test_only_raising_instrument_removed_leaves_no_dispatcher(kernel) -> None:
    bad = Raiser()
    kernel.add_instrument(bad)
    sink = logger.add(lambda _m: None, level="ERROR")
    try:
        kernel.window("x")
    finally:
        logger.remove(sink)
    assert kernel._dispatch is None


def test_remove_instrument_stops_delivery(kernel) -> None:
    a, b = Recorder(), Recorder()
    kernel.add_instrument(a)
    kernel.add_instrument(b)
    kernel.window("both")
    kernel.remove_instrument(a)
    kernel.window("only_b")
    me = kernel.current()
    assert a.of(me) == [("window", "both")]
    assert b.of(me) == [("window", "both"), ("window", "only_b")]


def test_kernels_do_not_share_instruments() -> None:
    with Kernel(name="one") as k1, Kernel(name="two") as k2:
        rec = Recorder()
        k1.add_instrument(rec)
        k2.window("in_k2")
        assert rec.events == []
        assert k2._dispatch is None


# ----------------------------------------------------------------------------- breakpoints

def test_breakpoint_forces_a_lost_update(kernel) -> None:
    """T1 reads, parks in the window, the test writes meanwhile, T1 writes back: the test's
    update is lost, deterministically."""
    box = {"v": 0}

    def incr() -> None:
        v = box["v"]
        kernel.window("foo")
        box["v"] = v + 1

    bp = kernel.breakpoints.add("window:foo")
    t = kernel.kthread_run(incr, name="incrementer")
    task = bp.wait(5)
    assert task is t.task
    assert task.parked_at == "window:foo"
    assert bp.hit and bp.obj == "foo"
    box["v"] = 100  # the test's update, made while T1 is parked between read and write
    assert t.is_alive()
    bp.release()
    t.join(5)
    assert not t.is_alive()
    assert box["v"] == 1  # lost update
    assert task.parked_at is None


def test_breakpoint_thread_filter(kernel) -> None:
    bp = kernel.breakpoints.add("window:foo", thread="chosen")
    passed = []
    other = kernel.kthread_run(lambda: (kernel.window("foo"), passed.append("other")),
                               name="other")
    other.join(5)
    assert not other.is_alive() and passed == ["other"]  # not caught
    assert not bp.hit
    chosen = kernel.kthread_run(lambda: (kernel.window("foo"), passed.append("chosen")),
                                name="chosen")
    assert bp.wait(5) is chosen.task
    assert passed == ["other"]
    bp.release()
    chosen.join(5)
    assert passed == ["other", "chosen"]


def test_breakpoint_before_lock_acquire(kernel) -> None:
    slab_mutex = kernel.mutex("slab_mutex")
    got = threading.Event()

    def taker() -> None:
        with slab_mutex:
            got.set()

    bp = kernel.breakpoints.add("lock_acquire:slab_mutex")
    t = kernel.kthread_run(taker, name="taker")
    task = bp.wait(5)
    assert bp.obj is slab_mutex
    # parked *before* taking it: the mutex is free, the task holds nothing
    assert not slab_mutex.is_locked()
    assert task.held == []
    assert slab_mutex.trylock()
    slab_mutex.unlock()
    assert not got.is_set()
    bp.release()
    assert got.wait(5)
    t.join(5)


def test_breakpoint_count_two_parks_two_hits(kernel) -> None:
    bp = kernel.breakpoints.add("window:foo", count=2)
    done = []
    ts = [kernel.kthread_run(lambda i=i: (kernel.window("foo"), done.append(i)), name=f"w{i}")
          for i in range(2)]
    bp.wait(5, hits=2)
    assert {t.task for t in ts} == set(bp.tasks)
    assert all(t.task.parked_at == "window:foo" for t in ts)
    # the count is used up: a third task goes through
    third = kernel.kthread_run(lambda: (kernel.window("foo"), done.append(2)), name="w2")
    third.join(5)
    assert done == [2]
    bp.release()
    for t in ts:
        t.join(5)
    assert sorted(done) == [0, 1, 2]


def test_parked_thread_is_released_at_shutdown() -> None:
    k = Kernel(name="bp_shutdown")
    after = threading.Event()

    def parks() -> None:
        k.window("foo")
        after.set()

    bp = k.breakpoints.add("window:foo")
    t = k.kthread_run(parks, name="parker")
    bp.wait(5)
    assert k.shutdown(timeout=5) == []
    assert not t.is_alive()
    assert not after.is_set()  # it unwound (KernelTornDown) instead of going on
    assert t.exception is None
    assert len(k.findings) == 0


def test_breakpoint_wait_times_out(kernel) -> None:
    bp = kernel.breakpoints.add("window:never")
    with pytest.raises(TimeoutError):
        bp.wait(0.05)
    bp2 = kernel.breakpoints.add("window:once", count=2)
    kernel.kthread_run(kernel.window, "once", name="lonely")
    bp2.wait(5)
    with pytest.raises(TimeoutError):
        bp2.wait(0.05, hits=2)
    bp2.release()


def test_breakpoint_max_pause_resumes_a_forgotten_task(kernel) -> None:
    bp = kernel.breakpoints.add("window:forgotten", max_pause=0.05)
    t = kernel.kthread_run(kernel.window, "forgotten", name="forgotten")
    bp.wait(5)
    t.join(5)
    assert not t.is_alive()


def test_breakpoint_key_must_name_point_and_label(kernel) -> None:
    with pytest.raises(ValueError):
        kernel.breakpoints.add("no_colon")


def test_breakpoints_installed_once(kernel) -> None:
    assert kernel.breakpoints is kernel.breakpoints
    assert kernel._instruments.count(kernel.breakpoints) == 1


# ------------------------------------------------------------------ Perturb's focus phases
WINDOWS = [f"w{i}" for i in range(400)]


def test_focus_phases_pick_a_share_of_windows_that_changes_with_phase_and_seed() -> None:
    p = Perturb(7, prob=0.0, longest=0.0, focus=0.25, phase=0.5)
    t0 = p._t0
    phase0 = {w for w in WINDOWS if p.focused(w, t0 + 0.1)}
    assert phase0 == {w for w in WINDOWS if p.focused(w, t0 + 0.4)}  # one phase, one set
    phase1 = {w for w in WINDOWS if p.focused(w, t0 + 0.6)}
    assert 60 < len(phase0) < 140 and 60 < len(phase1) < 140  # about a quarter
    assert phase0 != phase1
    again = Perturb(7, prob=0.0, longest=0.0, focus=0.25, phase=0.5)
    assert phase0 == {w for w in WINDOWS if again.focused(w, again._t0 + 0.1)}  # seeded
    other = Perturb(8, prob=0.0, longest=0.0, focus=0.25, phase=0.5)
    assert phase0 != {w for w in WINDOWS if other.focused(w, other._t0 + 0.1)}
    off = Perturb(7, prob=0.0, longest=0.0)
    assert not any(off.focused(w) for w in WINDOWS)


def test_focus_coins_are_independent_across_seeds_and_phases() -> None:
    """Neighbouring seeds must not share their focus phases, and a window must not stay
    focused for runs of phases: a CRC of "seed:phase:label" did both (linear in its input)."""
    phases = range(400)

    def pattern(seed: int) -> list[bool]:
        p = Perturb(seed, prob=0.0, longest=0.0, focus=0.25, phase=0.5)
        return [p.focused("memcg_kmem_get_cache:returned", p._t0 + (ph + 0.5) * 0.5)
                for ph in phases]

    pats = [pattern(s) for s in range(100, 110)]
    agree = [sum(a == b for a, b in zip(x, y)) / len(phases) for x, y in zip(pats, pats[1:])]
    # independent coins with p = 0.25 agree on 0.625 of the phases (the CRC: 0.92)
    assert all(0.5 < a < 0.75 for a in agree), agree
    runs = [len(r) for pat in pats for r in "".join("x" if f else "." for f in pat).split(".")
            if r]
    assert sum(runs) / len(runs) < 1.6  # independent: 1 / 0.75 = 1.33 (the CRC: 2.1)


def test_a_focused_window_sleeps_long_an_unfocused_one_short(kernel, monkeypatch) -> None:
    from kmemcg.core import instrument
    slept: list[tuple[str, float]] = []
    label = ["?"]
    monkeypatch.setattr(instrument.time, "sleep", lambda s: slept.append((label[0], s)))
    p = Perturb(3, prob=1.0, longest=0.001, focus=0.5, focus_prob=1.0, tail_longest=0.5,
                phase=3600)
    kernel.add_instrument(p)
    hot = [w for w in WINDOWS if p.focused(w)][:20]
    cold = [w for w in WINDOWS if not p.focused(w)][:20]
    for w in hot + cold:
        label[0] = w
        kernel.window(w)
    assert [w for w, _ in slept] == hot + cold  # prob and focus_prob 1: a sleep each
    assert all(s <= 0.001 for w, s in slept if w in cold)
    assert max(s for w, s in slept if w in hot) > 0.01  # up to tail_longest


def test_a_focused_window_sleeps_longer_when_the_task_holds_no_lock(kernel, monkeypatch) -> None:
    """unlocked_tail: a task at a focused window that holds no lock and is outside RCU read
    sections may sleep up to unlocked_longest that often (it stalls nobody); with a mutex
    held or inside rcu_read_lock() the focused sleeps stay within focus_longest."""
    from kmemcg.core import instrument
    slept: list[tuple[str, float]] = []
    where = ["?"]
    monkeypatch.setattr(instrument.time, "sleep", lambda s: slept.append((where[0], s)))
    kernel.add_instrument(Perturb(3, prob=0.0, longest=0.0, focus=1.0, focus_prob=1.0,
                                  focus_longest=0.01, unlocked_tail=0.5,
                                  unlocked_longest=0.5))
    m = kernel.mutex("test_mutex")
    for _ in range(50):
        where[0] = "free"
        kernel.window("w")
        with m:
            where[0] = "mutex"
            kernel.window("w")
        kernel.rcu.read_lock()
        where[0] = "rcu"
        kernel.window("w")
        kernel.rcu.read_unlock()
    by = {w: [s for x, s in slept if x == w] for w in ("free", "mutex", "rcu")}
    assert all(len(v) == 50 for v in by.values())
    assert max(by["free"]) > 0.1
    assert max(by["mutex"]) <= 0.01 and max(by["rcu"]) <= 0.01


# ------------------------------------------------------------------ Perturb's rare windows
def test_a_rare_window_sleeps_and_starts_a_storm_that_focuses_every_window(kernel,
                                                                           monkeypatch) -> None:
    from kmemcg.core import instrument
    clock = [100.0]
    slept: list[tuple[str, float]] = []
    label = ["?"]
    monkeypatch.setattr(instrument.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(instrument.time, "sleep", lambda s: slept.append((label[0], s)))
    # unfocused windows never sleep (prob 0); focused ones always do, long
    p = Perturb(3, prob=0.0, longest=0.0, focus_prob=1.0, focus_longest=0.5, rare=0.01,
                rare_first=2, rare_longest=0.2, storm=0.03)
    kernel.add_instrument(p)

    def hit(w: str) -> None:
        label[0] = w
        kernel.window(w)

    for _ in range(2):
        hit("common")  # the first rare_first hits of any window are rare
    assert [w for w, _ in slept] == ["common", "common"]
    clock[0] += 1.0  # past their storms
    for _ in range(400):
        hit("common")
    assert len(slept) == 2  # common now, and no storm: no sleep
    hit("rare")  # its first hit: rare, a sleep of its own and a storm
    assert slept[-1][0] == "rare" and slept[-1][1] <= 0.2
    clock[0] += 0.02  # inside the storm: every window is focused
    hit("common")
    assert slept[-1][0] == "common" and len(slept) == 4
    clock[0] += 0.02  # the storm is over
    hit("common")
    assert len(slept) == 4
    for _ in range(3):
        hit("rare")  # hits 2-4 <= 2 + 1 % of ~407: still rare
    assert [w for w, _ in slept[-3:]] == ["rare"] * 3 and len(slept) == 7
    for _ in range(10):
        clock[0] += 0.05  # each past the storm the hit before may have started
        hit("rare")  # hits 5 and 6 <= 2 + 1 % of ~410: rare; 7 and on: not
    assert len(slept) == 9


def test_rare_windows_off_by_default(kernel, monkeypatch) -> None:
    from kmemcg.core import instrument
    slept: list[float] = []
    monkeypatch.setattr(instrument.time, "sleep", slept.append)
    kernel.add_instrument(Perturb(3, prob=0.0, longest=0.0))
    for w in ("a", "b", "a"):
        kernel.window(w)
    assert slept == []


def test_an_rcu_callback_names_focused_sleeps_stay_within_a_fifth_of_each_phase(
        kernel, monkeypatch) -> None:
    """One thread runs every RCU callback: the focused sleeps of one callback name are capped
    per phase, so it delays the queue behind it by at most a fifth of the phase."""
    from kmemcg.core import instrument
    clock = [50.0]
    slept: list[float] = []
    monkeypatch.setattr(instrument.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(instrument.time, "sleep", slept.append)
    p = Perturb(3, prob=0.0, longest=0.0, focus=1.0, focus_prob=1.0, focus_longest=0.05,
                phase=0.5)
    task = Task.__new__(Task)
    task.kernel, task.pid, task.extra = kernel, 1, {}  # sleeps go through its kernel
    for _ in range(50):
        p.on_event("rcu_callback", "cb", task, None)
    assert 0.09 < sum(slept) <= 0.1 + 1e-9  # the budget: 0.2 x 0.5 s, spent
    assert len(slept) < 15  # then no more sleeping this phase (about 4 sleeps spend it)
    p.on_event("rcu_callback", "other", task, None)  # another name: a budget of its own
    assert len(slept) < 16 and slept[-1] > 0
    n = len(slept)
    clock[0] += 0.5  # the next phase: a new budget
    p.on_event("rcu_callback", "cb", task, None)
    assert len(slept) == n + 1 and slept[-1] > 0
    for _ in range(50):  # works run on many kworkers: no cap
        p.on_event("work_start", "w", task, None)
    assert sum(slept[n + 1:]) > 0.5
