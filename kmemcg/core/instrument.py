"""The one instrumentation point, and the breakpoint facility built on it.

Every primitive operation of the model (lock acquire / contended / acquired / release, RCU read
sections and grace periods, work items, and the named race windows of the mm code) calls
``kernel.event(point, obj)``. With no instrument installed the call sites test one attribute
(``kernel._dispatch is None``) and go on, so the default costs close to nothing. Installed
instruments see every event, in the thread that makes it, and may block it there: that is how
race-window perturbation (sleep or yield at a window), test breakpoints (pause a thread at a
named point until the test releases it) and, later, a controlled scheduler plug in.

Modelled on trio's ``Instrument`` (documented no-op hooks; an instrument that raises is removed
and logged), with one hook instead of many because the model's events are uniform.

Event points and their ``obj``:

=================  =====================================================
``lock_acquire``   a lock (or lockdep map) about to be taken
``lock_contended`` the lock was busy; the task is about to block
``lock_acquired``  the lock is now held
``lock_release``   the lock is about to be released
``window``         a named race window (``obj`` is the window's name)
=================  =====================================================

Later layers add points (``rcu_*``, ``work_*``, ``cpu_*``); each is listed in the module that
emits it. The *label* of an event is the lock's class name or the window's name.
"""

from __future__ import annotations

import hashlib
import random
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from loguru import logger

from kmemcg.core.task import task_rng

if TYPE_CHECKING:
    from kmemcg.core.task import Task


class Instrument:
    """Base class for instruments. Override :meth:`on_event`; the default does nothing.

    ``on_event`` runs in the thread that reached the point, with whatever model locks that
    thread holds; it may sleep or block (that is the point) but must not take model locks.
    """

    def on_event(self, point: str, label: str, task: Task, obj: Any) -> None:  # noqa: B027
        pass


def phase_draw(seed: int, phase: int, name: str) -> float:
    """A uniform draw in [0, 1) fixed by (``seed``, ``phase``, ``name``), independent of the
    draw for any other triple: the coin of a focus phase (Perturb) or a swarm phase. A
    cryptographic hash, not a CRC: a CRC is linear, so seeds or phases whose text differs in
    a few bits got correlated coins (consecutive seeds agreed on 92 % of their phases, and
    focus came in runs of eight phases)."""
    h = hashlib.blake2b(f"{seed}:{phase}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2.0**64


def label_of(obj: Any) -> str:
    if isinstance(obj, str):
        return obj
    return getattr(obj, "name", None) or type(obj).__name__


class Dispatcher:
    """Fans one event out to the installed instruments; removes one that raises.

    Immutable once built (the kernel builds a new one whenever its instrument list changes), so
    threads dispatching concurrently never see a list change under their loop. A raising
    instrument is dropped from this dispatcher at once (the rest of the event still reaches the
    others) and ``on_error(inst)`` removes it from the kernel, so a later rebuild does not bring
    it back.
    """

    def __init__(self, instruments: list[Instrument],
                 on_error: Callable[[Instrument], None] | None = None) -> None:
        self.instruments: tuple[Instrument, ...] = tuple(instruments)
        self._on_error = on_error

    def __call__(self, point: str, task: Task, obj: Any) -> None:
        label = label_of(obj)
        for inst in self.instruments:  # a tuple: rebinding below does not disturb this loop
            try:
                inst.on_event(point, label, task, obj)
            except Exception:  # an instrument bug must not become a model bug
                self._drop(inst)

    def _drop(self, inst: Instrument) -> None:
        if inst not in self.instruments:
            return  # another thread dropped it meanwhile
        logger.exception("instrument {!r} raised; removing it", inst)
        # Rebinding a tuple attribute: a racing dispatcher sees the old or the new tuple.
        self.instruments = tuple(i for i in self.instruments if i is not inst)
        if self._on_error is not None:
            self._on_error(inst)


class Breakpoint:
    """One armed breakpoint: pauses the first ``count`` tasks that reach ``point:label``.

    The test waits for a hit with :meth:`wait`, does what it wants while the task is parked,
    then lets it go with :meth:`release`. A parked task stays parked at most ``max_pause``
    seconds (then it resumes by itself) so that a test that forgets to release cannot hang.
    """

    def __init__(self, owner: Breakpoints, key: str, thread: str | None, count: int,
                 max_pause: float) -> None:
        self._owner = owner
        self.key = key
        self.thread = thread
        self.remaining = count
        self.max_pause = max_pause
        self._hits = threading.Condition(threading.Lock())  # guards ``tasks``
        self._go = threading.Event()
        self.task: Task | None = None  # the latest task parked here
        self.obj: Any = None
        self.tasks: list[Task] = []  # every task that parked here, in arrival order

    def _matches(self, task: Task) -> bool:
        return self.remaining > 0 and (self.thread is None or task.comm == self.thread)

    def _park(self, task: Task, obj: Any, is_dead: Callable[[], bool]) -> None:
        task.parked_at = self.key  # before the hit is signalled: a woken test sees it
        with self._hits:
            self.task, self.obj = task, obj
            self.tasks.append(task)
            self._hits.notify_all()
        deadline = time.monotonic() + self.max_pause
        try:
            while not self._go.wait(0.02):
                if is_dead() or time.monotonic() > deadline:
                    break
        finally:
            task.parked_at = None
        task.kernel.check_alive()

    def wait(self, timeout: float = 10.0, hits: int = 1) -> Task:
        """Block until ``hits`` tasks have reached this breakpoint (with ``count`` >= hits);
        return the one that came ``hits``-th. Raises TimeoutError otherwise."""
        with self._hits:
            if not self._hits.wait_for(lambda: len(self.tasks) >= hits, timeout):
                raise TimeoutError(f"{len(self.tasks)} of {hits} task(s) reached breakpoint "
                                   f"{self.key!r} within {timeout}s")
            return self.tasks[hits - 1]

    @property
    def hit(self) -> bool:
        with self._hits:
            return bool(self.tasks)

    def release(self) -> None:
        """Let the parked task (and any later one) go on; disarm."""
        self._owner.remove(self)
        self._go.set()


class Breakpoints(Instrument):
    """Pause tasks at named points to force an exact interleaving in a test.

    ``k.breakpoints.add("window:memcg_kmem_get_cache:after_lookup")`` or
    ``k.breakpoints.add("lock_acquire:slab_mutex", thread="destroyer")``.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._armed: dict[str, list[Breakpoint]] = {}

    def add(self, key: str, thread: str | None = None, count: int = 1,
            max_pause: float = 30.0) -> Breakpoint:
        if ":" not in key:
            raise ValueError(f"breakpoint key must be 'point:label', got {key!r}")
        bp = Breakpoint(self, key, thread, count, max_pause)
        with self._lock:
            self._armed.setdefault(key, []).append(bp)
        return bp

    def remove(self, bp: Breakpoint) -> None:
        with self._lock:
            lst = self._armed.get(bp.key, [])
            if bp in lst:
                lst.remove(bp)
            if not lst:
                self._armed.pop(bp.key, None)

    def on_event(self, point: str, label: str, task: Task, obj: Any) -> None:
        if not self._armed:
            return
        key = f"{point}:{label}"
        with self._lock:
            for bp in self._armed.get(key, ()):
                if bp._matches(task):
                    bp.remaining -= 1
                    break
            else:
                return
        bp._park(task, obj, task.kernel.is_dead)


class Perturb(Instrument):
    """Race-window perturbation: at each named window (``k.window(name)``) sleep up to
    ``longest`` seconds with probability ``prob``; one such sleep in ``1 / tail`` is a long one,
    up to ``tail_longest``: long enough for a grace period and a queued work to run inside the
    window (the memcg windows whose other side is an RCU callback, then a work, need that).

    *Focus phases* (swarm testing over the windows, after Groce et al.'s swarm testing and
    PCT's few change points): time is cut into ``phase``-second phases, and in each phase every
    window is *focused* with probability ``focus``; at a focused window the task sleeps with
    probability ``focus_prob`` up to ``focus_longest`` (default ``tail_longest``). A bug whose
    other side needs a grace period and a work inside one window gets long windows for a whole
    phase, many times in a row, instead of one long sleep in a hundred; the other windows keep
    their short sleeps, so the rest of the model is not slowed down with it. Which windows a
    phase focuses is a hash of (seed, phase, window name): no list of windows to keep, and
    nothing to know about the model.

    The start of a work (``work_start``) and of an RCU callback (``rcu_callback``) are focused
    the same way, by the work's or the callback's name: a kworker or a callback thread that
    runs late, so whatever raced with the work or the callback gets a wide window too. They
    get no unfocused delay: every work and callback of the model goes through them. The
    focused sleeps of one callback name are capped at a fifth of each phase
    (``SERIAL_BUDGET``).

    *Rare windows* (``rare`` > 0): a window hit no more than ``rare_first`` times plus
    ``rare`` of all window hits so far marks a rare state change (an array relocation, the
    first destroys of a run), and the races around a rare change are the ones a random
    schedule keeps missing: a few chances per run, each a few microseconds wide. At a rare
    window the task sleeps up to ``rare_longest``, and every window reached in the next
    ``storm`` seconds is treated as focused, so tasks half-way through the state the change
    is about to replace (a reader holding the old array) stay there while it goes on. Like
    focus, this is nothing but hit counts: no list of windows, nothing known about a bug.

    *Unlocked tails* (``unlocked_tail`` > 0): at a focused window (not in a storm), a task
    that holds no lock and is outside RCU read sections sleeps up to ``unlocked_longest``
    once in ``1 / unlocked_tail``. It stalls nobody, as a kernel task preempted or in direct
    reclaim between two steps stalls nobody, and some races need a window that long because
    their other side is a chain of grace periods and works (catalog bug 9: the memcg's
    offline, its caches' deactivation, the last css_put and css_free all have to run between
    memcg_kmem_get_cache() and the allocation: 100-600 ms in the model under load). The held
    locks are lockdep's list (``task.held``): without lockdep no sleep is an unlocked one.
    The RCU callback thread and kworkers qualify too, between two callbacks or works, and
    there the sleep does stall what is queued behind them: under light perturbation
    memcg_kmem_cache_wq (max_active 1) holds a backlog of some 400 works (2 without
    perturbation). Exempting them emptied it but cost catalog bugs 7 and 8 their detection
    (session 6, BENCHMARKS.md), so they keep it.

    The random streams are per task and derived from ``seed``, so a seed fixes every choice
    this makes (not the OS scheduler's, nor which phase an event falls in)."""

    LATENCY_POINTS = frozenset({"work_start", "rcu_callback"})
    # RCU callbacks run one after another on one thread: a late callback delays every one
    # queued behind it, so the focused sleeps of one callback name get at most this share of
    # each phase (else a backlog of seconds builds behind a frequent name, and an
    # rcu_barrier() waits long enough to look hung). Per name, so that a frequent name
    # does not use up the sleeps of a rare one.
    SERIAL_BUDGET = {"rcu_callback": 0.2}

    def __init__(self, seed: int, prob: float, longest: float, tail: float = 0.0,
                 tail_longest: float = 0.025, focus: float = 0.0, focus_prob: float = 0.5,
                 phase: float = 0.5, focus_longest: float | None = None, rare: float = 0.0,
                 rare_first: int = 8, rare_longest: float = 0.01, storm: float = 0.03,
                 unlocked_tail: float = 0.0, unlocked_longest: float = 0.3) -> None:
        self.seed, self.prob, self.longest = seed, prob, longest
        self.tail, self.tail_longest = tail, tail_longest
        self.focus, self.focus_prob, self.phase = focus, focus_prob, phase
        self.focus_longest = tail_longest if focus_longest is None else focus_longest
        self._t0 = time.monotonic()
        self.rare, self.rare_first = rare, rare_first
        self.rare_longest, self.storm = rare_longest, storm
        self.unlocked_tail, self.unlocked_longest = unlocked_tail, unlocked_longest
        self._lock = threading.Lock()  # guards _hits, _total, _serial, writes of _storm_until
        self._hits: dict[str, int] = {}
        self._total = 0
        self._storm_until = 0.0  # read unlocked: a float attribute load sees old or new
        self._serial: dict[str, tuple[int, float]] = {}  # key -> (phase, seconds slept)

    def focused(self, label: str, now: float | None = None) -> bool:
        """Is window ``label`` focused in the phase ``now`` (monotonic) falls in?"""
        if not self.focus:
            return False
        ph = self._phase(time.monotonic() if now is None else now)
        return phase_draw(self.seed, ph, label) < self.focus

    def _phase(self, t: float) -> int:
        return int((t - self._t0) / self.phase)

    def on_event(self, point: str, label: str, task: Task, obj: Any) -> None:
        if point != "window":
            if point not in self.LATENCY_POINTS:
                return  # lock events and the like: the hot path, nothing to do
            key = f"{point}:{label}"
            if not self.focused(key):
                return
            budget = self.SERIAL_BUDGET.get(point)
            if budget is None:
                self._sleep(task, self.focus_prob, self.focus_longest)
            else:
                self._sleep_within(task, key, budget * self.phase)
            return
        now = time.monotonic()
        if self.rare and self._rare_hit(label, now):
            self._sleep(task, 1.0, self.rare_longest)
        elif now < self._storm_until:
            self._sleep(task, self.focus_prob, self.focus_longest)
        elif self.focused(label, now):
            self._sleep(task, self.focus_prob, self._focused_longest(task))
        elif self.prob:
            rng = self._rng(task)
            longest = self.tail_longest if rng.random() < self.tail else self.longest
            self._sleep(task, self.prob, longest)

    def _focused_longest(self, task: Task) -> float:
        """The longest sleep at a focused window: ``unlocked_longest`` once in
        ``1 / unlocked_tail`` for a task that holds no lock and is outside RCU read sections
        (lockdep's held-lock list says so: without lockdep, never), else ``focus_longest``."""
        if self.unlocked_tail and task.kernel._ld is not None and not task.held and \
                not task.rcu_nesting and self._rng(task).random() < self.unlocked_tail:
            return self.unlocked_longest
        return self.focus_longest

    def _rare_hit(self, label: str, now: float) -> bool:
        """Count this hit; if ``label`` is rare, start (or extend) a storm and say so."""
        with self._lock:
            n = self._hits[label] = self._hits.get(label, 0) + 1
            self._total += 1
            if n > self.rare_first + self.rare * self._total:
                return False
            self._storm_until = max(self._storm_until, now + self.storm)
            return True

    def _sleep_within(self, task: Task, key: str, budget: float) -> None:
        """A focused sleep at ``key`` unless this phase's sleeps there reached ``budget``."""
        want = self._draw(task, self.focus_prob, self.focus_longest)
        if not want:
            return
        ph = self._phase(time.monotonic())
        with self._lock:
            phase, spent = self._serial.get(key, (ph, 0.0))
            if phase != ph:
                spent = 0.0
            want = min(want, budget - spent)
            if want <= 0:
                return
            self._serial[key] = (ph, spent + want)
        task.kernel.schedule_timeout(task, want)

    def _rng(self, task: Task) -> random.Random:
        return task_rng(task, "perturb_rng", self.seed * 7919)

    def _draw(self, task: Task, prob: float, longest: float) -> float:
        """With probability ``prob`` a sleep of up to ``longest`` seconds, else 0."""
        rng = self._rng(task)
        return rng.random() * longest if rng.random() < prob else 0.0

    def _sleep(self, task: Task, prob: float, longest: float) -> None:
        if d := self._draw(task, prob, longest):
            task.kernel.schedule_timeout(task, d)
